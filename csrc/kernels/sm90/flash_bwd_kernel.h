// The sm90-family backward main kernel (Hopper: wgmma, TMA, warp specialization; sm_90a).
// Issue 15, in progress (csrc/kernels/sm90/backward_plan.md has the plan this follows): dispatch's
// default for the backward calls it serves (flash_bwd_launch.h).
//
// A tile is one key block (kBlockN keys of one key/value head of one sequence). The grid is
// persistent: one thread block per SM computes tile after tile, drawn from a counter in launch
// order (kernels/common/persistent_tiles.h: longest sequences first where the lengths differ
// widely, the key blocks of one head in a row), so that the loads of a block's next tile run
// while it writes the last one's dK and dV, and no block is launched for the key blocks past a
// sequence's end (a grid of (key blocks of the longest sequence, heads, batch) launched 530k
// blocks for one 16k document among 258 short ones). A tile loads its K and V once, then walks,
// for each query head of the key/value group (GQA: the group's dK and dV are summed in
// registers, no atomics and no float32 copy of them), the query row blocks that see any of its
// keys (MaskPolicy's row_block_begin / row_block_end), kBlockM rows at a time:
// - the producer warpgroup's first warp finds each tile and publishes it to the consumers with
//   its K and V (kv_full; the next tile's K and V wait for kv_empty, the consumers' last read);
//   its first thread loads Q and dO of each row block by TMA into kStages buffers each
//   (PipelineTmaAsync), from one tile to the next;
// - each consumer warpgroup owns 64 of the keys: S^T = K Q^T and dP^T = V dO^T (wgmma, shared
//   memory operands), P^T = exp2(S^T * scale_log2 - LSE_log2) with the mask, dS^T = P^T (dP^T -
//   D) where D = rowsum(dO O) - dLSE and LSE_log2 come from the row kernel before (and ride with
//   Q and dO into shared memory), dV += P^T dO and dK += dS^T Q
//   (P^T, dS^T from registers), dS^T written to shared memory, and, once both warpgroups' halves
//   are there, its half of the columns of dQ = dS K, staged in shared memory;
// - the producer warpgroup's second warp adds each staged dQ part in float32 into the dQ
//   accumulator by one bulk reduce-add (dq_accumulator.h; rows past the sequence end add zeros
//   into the sequence's padding), in deterministic mode in each row block's turn;
// - at the end dK (times the softmax scale) and dV are written, rows inside the sequence only.
// What lies past a sequence: TMA reads the next sequence's rows there (zeros past the buffer),
// which may hold anything (the user's next document, unused memory of a CUDA graph's buffer), and
// a zero probability does not cancel a NaN or an infinity inside a GEMM (0 * inf = NaN). So the
// consumers zero the K and V rows past the sequence's keys and the Q and dO rows past its
// queries in shared memory before any product reads them (the forward does so for V), P^T is 0
// for those pairs by selection, and their dQ, dK, dV rows are never written.
//
// Soft-capping and ALiBi run in a second kernel of each instantiation, kHasVariants, that the
// launcher picks at run time, as the forward's and the sm80 backward's variants do: their code
// then costs the plain kernel no registers (its machine code is the same as before they were
// added). There the raw score is capped, raw = tanh(S^T * prescale), and the step's query head's
// ALiBi bias added before the mask, and the cap's derivative rides in P^T's float32 copy into
// dS^T (variant_probabilities). Attention sinks change only the row kernel (the sinks' gradient,
// bwd_row_kernels.h): the forward's LSE counts the sink, so P^T is right without more. These
// three pass the GPU tests but serve a call only when FLASH_VARLEN_KERNEL_FAMILY=sm90 forces
// this family until their speed is measured against the sm80 family's (bwd_unsupported_option).
// The sm80 family keeps dropout and the head dims other than 64 and 128 (flash_bwd_launch.h has
// the tiles).
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/mask_policy.h"
#include "kernels/common/persistent_tiles.h"
#include "kernels/common/score_transforms.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/sm90/bwd_kernel_traits.h"
#include "kernels/sm90/bwd_row_kernels.h"
#include "kernels/sm90/dq_accumulator.h"
#include "kernels/sm90/fragment_layouts.h"
#include "kernels/sm90/named_barriers.h"  // kNumUserBarriers
#include "kernels/sm90/warpgroup_gemm.h"
#include "kernels/sm90/zero_rows.h"

namespace flash_varlen {
namespace sm90 {

using namespace cute;

// The producer warpgroup's warps: the first finds the tiles and loads (produce); the next two
// add the consumer warpgroups' dQ into the accumulator, one warp per consumer warpgroup
// (write_dq); the last exits at once.
constexpr int kLoadWarp = 0;
constexpr int kFirstDqWriterWarp = 1;

// Named barriers of the backward (hardware ids 8.. as in named_barriers.h). Over every consumer
// thread: the tail rows of a K/V or Q/dO buffer are zeroed; every share of dS is written. Over
// one consumer warpgroup (+ its index, as kBarrierOStaged in the forward): its dQ part is staged.
constexpr uint32_t kBarrierTailZeroed = 0;
constexpr uint32_t kBarrierDsWritten = 1;
constexpr uint32_t kBarrierDqStaged = 2;
static_assert(kBarrierDqStaged + 2 <= kNumUserBarriers, "two consumer warpgroups");

// What the launcher passes: the host's params, the TMA descriptors and the global shapes they
// were built with (the device rebuilds their coordinate tensors from them).
template <typename Traits>
struct BwdKernelParams {
    FlashBwdParams params;
    typename Traits::TmaQ tma_q;
    typename Traits::TmadO tma_do;
    typename Traits::TmaK tma_k;
    typename Traits::TmaV tma_v;
    typename Traits::GmemShape shape_q;  // (rows, d, heads, batch), also dO's
    typename Traits::GmemShape shape_k;  // also V's
    // The dQ accumulator: float32 (heads, padded rows, kHeadDim), zero at the launch
    // (dq_accumulator.h).
    float* dq_accum;
    int64_t dq_accum_head_stride;
    DqOrder dq_order;  // deterministic mode's counters (dq_accumulator.h)
    // LSE (log2 units) and D of every query row, padded per sequence (bwd_row_kernels.h).
    RowStats stats;
    // The launch order of the tiles (a tile's "row block" is its key block, its head unit its
    // key/value head) and the counter that hands them out (zero at the launch).
    TileOrder tiles;
    int* tile_counter;
    // The key blocks of each (sequence, head) in decreasing order: deterministic mode with a
    // local mask (Work::dq_adds_before).
    bool reverse_key_blocks;
};

// kHasVariants: the launch soft-caps the scores or biases them by ALiBi (see the top of the file).
template <typename Traits, bool kIsLocal, bool kHasVariants>
struct FlashBwdKeyBlock {
    using Element = typename Traits::Element;
    static constexpr int kBlockM = Traits::kBlockM;
    static constexpr int kBlockN = Traits::kBlockN;
    static constexpr int kHeadDim = Traits::kHeadDim;
    static constexpr int kNumMmaThreads = Traits::kNumMmaThreads;
    using Mask = MaskPolicy<kIsLocal, /*kHasAlibi=*/false>;
    // The variants kernel's mask of one step: the tile's visible pairs, the step's query head's
    // ALiBi slope.
    using StepMask = MaskPolicy<kIsLocal, /*kHasAlibi=*/true>;
    using SharedStorage = typename Traits::SharedStorage;
    using PipelineQdO = typename Traits::PipelineQdO;
    using PipelineState = typename Traits::PipelineState;
    // The dQ staging buffers this kernel uses of the Traits::kDqStages there are: the variants
    // kernel takes one, since with two its bf16 d = 128 consumers spilled 4 bytes (a per-thread
    // shared-memory address reloaded every step, nvcc 13.0), which CI's compile check refuses;
    // its deterministic mode then waits for the writer as before the second buffer.
    static constexpr int kDqStages = kHasVariants ? 1 : Traits::kDqStages;
    // Where dV is issued (Traits::kDvAfterDs). The variants kernel computes P^T and its 16-bit
    // copy together (variant_probabilities), so it runs on tiles that issue dV before dS (the
    // launcher's BwdTileConfig::VariantsTraits): at 128 rows it spilled 104 bytes of stores with
    // dV after dS, 248 with the cap's derivative recovered from P^T in the dS^T loop as the sm80
    // family does (bf16 d = 64, nvcc 13.0).
    static constexpr bool kDvAfterDs = Traits::kDvAfterDs;
    static_assert(!(kHasVariants && kDvAfterDs), "the variants kernel issues dV before dS");
    static_assert(kDqStages == 1 || kDqStages == Traits::kStages, "dQ follows the Q / dO stage");

    // A tile's key block, its sequence, the query heads of its key/value head and the query row
    // blocks that see it, which the producer and the consumers derive alike from the tile. The
    // steps are (query head, row block) pairs, the row blocks of one head in a row.
    struct Work {
        int n_block;
        int head_k;
        int batch;
        int heads_per_group;  // query heads per key/value head (1 without GQA)
        SeqlenInfo seq;
        Mask mask;  // no ALiBi here: the head it is built for does not matter
        int m_begin;
        int m_end;

        __device__ Work(const FlashBwdParams& params, const TileCoordinates& tile,
                        const SeqlenInfo& seq)
            : n_block(tile.m_block),
              head_k(tile.head),
              batch(tile.batch),
              heads_per_group(params.nheads / params.nheads_k),
              seq(seq),
              mask(params, seq, tile.batch, tile.head * (params.nheads / params.nheads_k)),
              m_begin(mask.template row_block_begin<kBlockM, kBlockN>(n_block)),
              m_end(mask.template row_block_end<kBlockM, kBlockN>(n_block)) {}

        __device__ bool has_keys() const { return n_block * kBlockN < seq.seqlen_k; }
        __device__ int steps() const { return heads_per_group * max(m_end - m_begin, 0); }
        __device__ int head_of(int step) const {
            return head_k * heads_per_group + step / (m_end - m_begin);
        }
        __device__ int m_block_of(int step) const { return m_begin + step % (m_end - m_begin); }

        // Deterministic mode: how many key blocks of the sequence add into row block m_block (of
        // any one query head) before this one. Without a local mask every key block visits every
        // row block, in ascending order. With one, key blocks go in descending order (the
        // longest causal ones, which start at the top rows, would otherwise hold back every later
        // block at its first row block: FlashAttention-3 reverses the order for causal
        // determinism too): the later blocks that visit m_block (visible_keys.h). The tiles of
        // one (sequence, head) are drawn in the same order (BwdKernelParams::reverse_key_blocks),
        // so that a tile waits only for tiles drawn before it, which run or have run: drawn the
        // other way, the resident blocks could all wait for tiles that no block is free to take.
        __device__ int dq_adds_before(int m_block) const {
            if constexpr (!kIsLocal) {
                return n_block;
            } else {
                return mask.template later_key_blocks_visiting<kBlockM, kBlockN>(n_block, m_block);
            }
        }
    };

    // The tile at `index` of the launch order, or false past the last one. Called by a whole
    // warp (the schedule's search needs one).
    __device__ static bool lookup_tile(const BwdKernelParams<Traits>& kp, int index,
                                       TileCoordinates& tile) {
        if (!kp.tiles.lookup(index, kp.reverse_key_blocks, tile)) return false;
        // The grid order (no schedule) lists the key blocks of the longest sequence ascending;
        // reversed, a shorter sequence's blocks past its keys come first and are skipped.
        if (kp.reverse_key_blocks && kp.tiles.schedule.tile_start == nullptr) {
            tile.m_block = kp.tiles.row_blocks - 1 - tile.m_block;
        }
        return true;
    }

    __device__ static void run(const BwdKernelParams<Traits>& kp, char* smem) {
        SharedStorage& shared = *reinterpret_cast<SharedStorage*>(smem);
        const int warpgroup = cutlass::canonical_warp_group_idx();
        constexpr int kProducerWarpgroup = 0;

        if (threadIdx.x == 0) {
            if (cute::cast_smem_ptr_to_uint(smem) % Traits::kSmemAlignment != 0) __trap();
            cute::prefetch_tma_descriptor(kp.tma_q.get_tma_descriptor());
            cute::prefetch_tma_descriptor(kp.tma_do.get_tma_descriptor());
            cute::prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
            cute::prefetch_tma_descriptor(kp.tma_v.get_tma_descriptor());
            shared.kv_full.init(/*arrive_count=*/1);
            shared.kv_empty.init(/*arrive_count=*/kNumMmaThreads);
            for (int stage = 0; stage < Traits::kDqStages; ++stage) {
                for (int warpgroup = 0; warpgroup < Traits::kNumMmaWarpgroups; ++warpgroup) {
                    shared.dq_free[stage][warpgroup].init(/*arrive_count=*/1);
                    shared.dq_staged[stage][warpgroup].init(/*arrive_count=*/1);
                }
            }
        }
        typename PipelineQdO::Params pipeline_params;
        pipeline_params.transaction_bytes = Traits::kTmaBytesQ;
        static_assert(Traits::kTmaBytesQ == Traits::kTmaBytesdO, "one params for both pipelines");
        pipeline_params.role = warpgroup == kProducerWarpgroup
                                   ? PipelineQdO::ThreadCategory::Producer
                                   : PipelineQdO::ThreadCategory::Consumer;
        pipeline_params.is_leader = threadIdx.x == 0;
        pipeline_params.num_consumers = kNumMmaThreads;
        PipelineQdO pipeline_q(shared.pipeline_q, pipeline_params, Shape<_1, _1, _1>{});
        PipelineQdO pipeline_do(shared.pipeline_do, pipeline_params, Shape<_1, _1, _1>{});
        __syncthreads();  // the barrier initialisations (fenced by the pipelines) are visible

        if (warpgroup == kProducerWarpgroup) {
            cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
            const int warp = cutlass::canonical_warp_idx_sync();
            if (warp == kLoadWarp) produce(kp, shared, pipeline_q, pipeline_do);
            const int writes_for = warp - kFirstDqWriterWarp;  // the consumer warpgroup it serves
            if (writes_for >= 0 && writes_for < Traits::kNumMmaWarpgroups) {
                write_dq(shared, writes_for);
            }
            return;
        }
        cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
        consume(kp, shared, pipeline_q, pipeline_do, int(threadIdx.x) - kThreadsPerWarpgroup);
    }

    // The producer's first warp: finds each tile (the schedule's search needs the whole warp) and
    // walks its steps, all 32 lanes alike, one lane publishing the tile and issuing the loads
    // (FlashAttention-3's producer warp does the same): values the whole warp holds alike can
    // live in uniform registers, which the producer's 24 per thread do not count. A key block
    // past its sequence's keys (grid order) is skipped; the consumers never see it. (The
    // forward's producer walks its tiles alike, flash_fwd_kernel.h; one helper for both changed
    // the forward's machine code, so it waits until the two can be measured together.)
    __device__ static void produce(const BwdKernelParams<Traits>& kp, SharedStorage& shared,
                                   PipelineQdO& pipeline_q, PipelineQdO& pipeline_do) {
        const FlashBwdParams& params = kp.params;
        const bool leader = threadIdx.x == 0;
        PipelineState write = cutlass::make_producer_start_state<PipelineQdO>();
        int published = 0;  // tiles handed to the consumers so far
        // Waits until the consumers are done with the last published tile's K and V (and its
        // slot in shared memory). At most one kv_empty phase is ever pending: the consumers
        // learn a tile only after this wait for the one before.
        auto wait_kv_empty = [&] {
            if (published > 0) shared.kv_empty.wait((published - 1) % 2);
        };
        TileCoordinates tile;
        for (int index = blockIdx.x; lookup_tile(kp, index, tile);) {
            const Work work(params, tile, SeqlenInfo(params, tile.batch));
            if (work.has_keys()) {  // uniform over the warp
                load(kp, shared, pipeline_q, pipeline_do, work, write, wait_kv_empty);
                ++published;
            }
            // The next index, drawn once this tile's loads are issued: the consumers are then
            // within kStages steps of its end, which hide the atomic and the lookup. Drawn before
            // the loads, a block would hold a whole tile in reserve while it computes one, and
            // the grid's last tiles would wait in the reserves of busy blocks while others idle
            // (scripts/model_bwd_tile_orders.py --claim-ahead 1 against 0).
            int next_index = 0;
            if (leader) next_index = next_tile_index(kp.tile_counter);
            index = __shfl_sync(0xffffffffu, next_index, 0);
        }
        if (leader) {  // no tile left: tell the consumers
            wait_kv_empty();
            shared.tile.m_block = -1;
            shared.kv_full.arrive();
        }
    }

    // A dQ writer: one thread of the producer warpgroup's warp kFirstDqWriterWarp + warpgroup.
    // Part after part (part p in staging buffer p % kDqStages), it waits until the consumer
    // warpgroup has staged the part and said where it goes (dq_staged, SharedStorage::dq_add),
    // adds it into the accumulator with one bulk reduce-add and hands the buffer back (dq_free)
    // once the add has read it; in deterministic mode it first waits for the row block's turn
    // (DqOrder) and passes the turn on once the add has completed, while the warpgroup may
    // already stage the next part in the other buffer (kDqStages). The consumers'
    // issuing threads did this themselves before, and their warpgroups stalled on every turn and
    // on each add's completion; FlashAttention-3's backward gives the job to a warp of its
    // producer warpgroup too (Shah et al. 2024, hopper/epilogue_bwd.hpp). A single writer for
    // both warpgroups, which passed the first part's turn only once the second part's add was
    // issued, made the deterministic GQA causal docs row slower (268 -> 232 TFLOP/s, H100); one
    // writer per warpgroup keeps the parts' turns apart. The consumers say where each part goes,
    // so that the writer follows no tile itself.
    __device__ static void write_dq(SharedStorage& shared, int warpgroup) {
        using DqChunk = sm90::DqChunk<Traits>;
        if (!cute::elect_one_sync()) return;
        for (int stage = 0; stage < kDqStages; ++stage) shared.dq_free[stage][warpgroup].arrive();
        for (int part = 0;; ++part) {
            const int stage = part % kDqStages;
            shared.dq_staged[stage][warpgroup].wait((part / kDqStages) % 2);
            const typename SharedStorage::DqAdd add = shared.dq_add[stage][warpgroup];
            if (add.last) break;
            if (add.turn != nullptr) wait_for_dq_turn(add.turn, add.turns_before);
            bulk_reduce_add(add.rows, dq_stage(shared, stage) + warpgroup * DqChunk::kPartFloats,
                            DqChunk::kPartBytes);
            cute::tma_store_arrive();
            if (add.turn != nullptr) pass_dq_turn(add.turn);
            cute::tma_store_wait<0>();  // the add has read the buffer
            shared.dq_free[stage][warpgroup].arrive();
        }
    }

    // The first float of dQ staging buffer `stage` (SharedStorage::dq).
    __device__ static float* dq_stage(SharedStorage& shared, int stage) {
        return shared.dq.data() + stage * (kBlockM * kHeadDim);
    }

    // The buffer of the dQ part a consumer step hands its writer, and the phase of that buffer's
    // dq_free and dq_staged barriers: parts follow the Q / dO stages, one per step, as dS does,
    // so the step's pipeline state names them (a separate count of the parts, with two buffers,
    // spilled in the variants kernel too).
    __device__ static int dq_stage_of(const PipelineState& read) {
        return kDqStages == 1 ? 0 : read.index();
    }
    __device__ static uint32_t dq_phase_of(const PipelineState& read) {
        return kDqStages == 1 ? read.count() % 2 : read.phase();
    }

    // The producer warp, one tile: Q and dO of its first kStages steps (their buffers free as
    // the consumers finish the previous tile's last steps), then, once the consumers are done
    // with the previous tile's K and V, the tile published with its K and V, then Q and dO of
    // the other steps.
    template <typename WaitKvEmpty>
    __device__ static void load(const BwdKernelParams<Traits>& kp, SharedStorage& shared,
                                PipelineQdO& pipeline_q, PipelineQdO& pipeline_do, const Work& work,
                                PipelineState& write, WaitKvEmpty& wait_kv_empty) {
        const FlashBwdParams& params = kp.params;
        const SeqlenInfo& seq = work.seq;
        const int head_k = work.head_k;
        const int batch_coord = seq.is_varlen ? 0 : work.batch;  // varlen buffers are one batch
        const bool leader = cute::elect_one_sync();              // the lane that issues

        Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
        Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutV{});
        Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});
        Tensor sdO = make_tensor(make_smem_ptr(shared.d_o.data()), typename Traits::SmemLayoutdO{});

        // The row statistics of the sequence's padded rows (16-byte aligned row blocks).
        const int64_t stats_row = PaddedRows<kBlockM>::first_row(params, seq, work.batch);
        // One stage of Q (with its rows' LSE_log2) or of dO (with their D): row block m_block of
        // one query head by TMA, its kBlockM statistics by a bulk copy on the same barrier.
        auto load_stage = [&](PipelineQdO& pipeline, const auto& tma, auto& smem_rows,
                              const float* stats, float* smem_stats, int head, int m_block) {
            pipeline.producer_acquire(write);  // arms the barrier with both loads' bytes
            uint64_t* full = pipeline.producer_get_barrier(write);
            Tensor m_rows = tma.get_tma_tensor(kp.shape_q)(_, _, head, batch_coord);
            Tensor g_rows =
                local_tile(domain_offset(make_coord(seq.q_start, _0{}), m_rows),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, _0{}));
            auto tma_rows = tma.get_slice(_0{});
            const int64_t block_stats =
                int64_t(head) * kp.stats.head_stride + stats_row + int64_t(m_block) * kBlockM;
            if (leader) {
                copy(tma.with(*full, 0, TMA::CacheHintSm90::EVICT_LAST),
                     tma_rows.partition_S(g_rows),
                     tma_rows.partition_D(smem_rows(_, _, write.index())));
                SM90_BULK_COPY_G2S::copy(stats + block_stats, full,
                                         smem_stats + write.index() * kBlockM,
                                         Traits::kRowStatsBytes);
            }
        };
        auto load_step = [&](int step) {
            const int head = work.head_of(step);
            const int m_block = work.m_block_of(step);
            load_stage(pipeline_q, kp.tma_q, sQ, kp.stats.lse_log2, shared.lse_log2.data(), head,
                       m_block);
            load_stage(pipeline_do, kp.tma_do, sdO, kp.stats.d, shared.d.data(), head, m_block);
            ++write;
        };

        const int steps = work.steps();
        const int early_steps = min(steps, Traits::kStages);
        int step = 0;
        CUTE_NO_UNROLL
        for (; step < early_steps; ++step) load_step(step);

        wait_kv_empty();
        if (leader) {
            shared.tile = TileCoordinates{work.n_block, work.batch, head_k};
            shared.tile_seq = seq;
            // The arrival (release) also publishes the tile written just before.
            shared.kv_full.arrive_and_expect_tx(Traits::kTmaBytesKV);
        }
        // Coordinate tensors of the descriptors, shifted to the sequence's first row.
        Tensor mK = kp.tma_k.get_tma_tensor(kp.shape_k)(_, _, head_k, batch_coord);
        Tensor gK = local_tile(domain_offset(make_coord(seq.k_start, _0{}), mK),
                               Shape<Int<kBlockN>, Int<kHeadDim>>{},
                               make_coord(work.n_block, _0{}));  // (BN, D)
        Tensor mV = kp.tma_v.get_tma_tensor(kp.shape_k)(_, _, head_k, batch_coord);
        Tensor gV =
            local_tile(domain_offset(make_coord(seq.k_start, _0{}), mV),
                       Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(work.n_block, _0{}));
        auto tma_k = kp.tma_k.get_slice(_0{});
        auto tma_v = kp.tma_v.get_slice(_0{});
        // K and V are read by this tile only (each head's key block is one tile): evict them
        // first; Q and dO are read by every key block of the sequence: keep them.
        if (leader) {
            copy(kp.tma_k.with(reinterpret_cast<uint64_t&>(shared.kv_full), 0,
                               TMA::CacheHintSm90::EVICT_FIRST),
                 tma_k.partition_S(gK), tma_k.partition_D(sK));
            copy(kp.tma_v.with(reinterpret_cast<uint64_t&>(shared.kv_full), 0,
                               TMA::CacheHintSm90::EVICT_FIRST),
                 tma_v.partition_S(gV), tma_v.partition_D(sV));
        }

        CUTE_NO_UNROLL
        for (; step < steps; ++step) load_step(step);
    }

    // The consumer threads (thread: 0 .. kNumMmaThreads - 1): the tiles the producer publishes,
    // until it says none is left.
    __device__ static void consume(const BwdKernelParams<Traits>& kp, SharedStorage& shared,
                                   PipelineQdO& pipeline_q, PipelineQdO& pipeline_do, int thread) {
        // The Q and dO stages carry on from tile to tile, as the producer's; each step hands its
        // warpgroup's writer one dQ part, so `read` counts the parts too (dq_stage_of).
        PipelineState read;
        for (int consumed = 0;; ++consumed) {
            shared.kv_full.wait(consumed % 2);
            const TileCoordinates tile = shared.tile;
            if (tile.m_block < 0) break;
            compute(kp, shared, pipeline_q, pipeline_do, Work(kp.params, tile, shared.tile_seq),
                    read, thread);
        }
        // No tile left: the warpgroup's dQ writer stops.
        const int warpgroup = thread / kThreadsPerWarpgroup;
        if (thread % kThreadsPerWarpgroup == 0) {
            shared.dq_free[dq_stage_of(read)][warpgroup].wait(dq_phase_of(read));
            shared.dq_add[dq_stage_of(read)][warpgroup].last = 1;
            shared.dq_staged[dq_stage_of(read)][warpgroup].arrive();
        }
    }

    // The consumer threads, one tile, its K and V landed.
    __device__ static void compute(const BwdKernelParams<Traits>& kp, SharedStorage& shared,
                                   PipelineQdO& pipeline_q, PipelineQdO& pipeline_do,
                                   const Work& work, PipelineState& read, int thread) {
        const FlashBwdParams& params = kp.params;
        const SeqlenInfo& seq = work.seq;
        Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
        Tensor sKt = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutKt{});
        Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutV{});
        Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});
        Tensor sQt = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQt{});
        Tensor sdO = make_tensor(make_smem_ptr(shared.d_o.data()), typename Traits::SmemLayoutdO{});
        Tensor sdOt =
            make_tensor(make_smem_ptr(shared.d_o.data()), typename Traits::SmemLayoutdOt{});
        Tensor sdS = make_tensor(make_smem_ptr(shared.ds.data()), typename Traits::SmemLayoutdS{});
        Tensor sdSt =
            make_tensor(make_smem_ptr(shared.ds.data()), typename Traits::SmemLayoutdSt{});

        typename Traits::TiledMmaSdP tiled_mma_sdp;
        typename Traits::TiledMmaDKV tiled_mma_dkv;
        typename Traits::TiledMmaDQ tiled_mma_dq;
        auto thr_mma_sdp = tiled_mma_sdp.get_thread_slice(thread);
        auto thr_mma_dkv = tiled_mma_dkv.get_thread_slice(thread);
        auto thr_mma_dq = tiled_mma_dq.get_thread_slice(thread);

        // Descriptor fragments: K and V as the A operands of S^T and dP^T (this warpgroup's 64
        // keys), Q and dO as their B operands; dO^T and Q^T as the B operands of dV and dK; dS
        // and K^T as the operands of dQ.
        Tensor tSrK = thr_mma_sdp.partition_fragment_A(sK);  // (MMA, MMA_M, MMA_D)
        Tensor tSrQ = thr_mma_sdp.partition_fragment_B(sQ);  // (MMA, MMA_N, MMA_D, stage)
        Tensor tdPrV = thr_mma_sdp.partition_fragment_A(sV);
        Tensor tdPrdO = thr_mma_sdp.partition_fragment_B(sdO);
        Tensor tdVrdOt = thr_mma_dkv.partition_fragment_B(sdOt);  // (MMA, MMA_D, MMA_M, stage)
        Tensor tdKrQt = thr_mma_dkv.partition_fragment_B(sQt);
        Tensor tdQrdS = thr_mma_dq.partition_fragment_A(sdS);  // (MMA, MMA_M, MMA_N, stage)
        Tensor tdQrKt = thr_mma_dq.partition_fragment_B(sKt);  // (MMA, MMA_D, MMA_N)

        // (key, query) of each of this thread's S^T entries within a (kBlockN, kBlockM) tile.
        Tensor tScS =
            thr_mma_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
        // dS^T from registers to shared memory (stmatrix).
        auto smem_tiled_copy_ds =
            make_tiled_copy_C(typename Traits::SmemCopyAtomdS{}, tiled_mma_sdp);
        auto smem_thr_copy_ds = smem_tiled_copy_ds.get_thread_slice(thread);
        Tensor tdSsdS = smem_thr_copy_ds.partition_D(sdSt);

        Tensor acc_dk =
            partition_fragment_C(tiled_mma_dkv, select<0, 1>(typename Traits::TileShapeDKV{}));
        Tensor acc_dv =
            partition_fragment_C(tiled_mma_dkv, select<0, 1>(typename Traits::TileShapeDKV{}));
        clear(acc_dk);
        clear(acc_dv);

        using DqChunk = sm90::DqChunk<Traits>;
        const int warpgroup = thread / kThreadsPerWarpgroup;
        // The thread of each warpgroup that says where its dQ parts go (SharedStorage::dq_add).
        const bool describes_dq = thread % kThreadsPerWarpgroup == 0;
        const int64_t dq_first_row = PaddedRows<kBlockM>::first_row(params, seq, work.batch);
        const int key0 = work.n_block * kBlockN;

        if (key0 + kBlockN > seq.seqlen_k) {  // uniform over the block
            zero_rows(sK, seq.seqlen_k - key0, thread);
            zero_rows(sV, seq.seqlen_k - key0, thread);
            cutlass::arch::fence_view_async_shared();
            cutlass::arch::NamedBarrier::sync(kNumMmaThreads, kBarrierTailZeroed);
        }
        CUTE_NO_UNROLL
        for (int step = 0; step < work.steps(); ++step) {
            const int m_block = work.m_block_of(step);
            const int query0 = m_block * kBlockM;
            Tensor acc_s =
                partition_fragment_C(tiled_mma_sdp, select<0, 1>(typename Traits::TileShapeSdP{}));
            Tensor acc_dp =
                partition_fragment_C(tiled_mma_sdp, select<0, 1>(typename Traits::TileShapeSdP{}));
            pipeline_q.consumer_wait(read);
            pipeline_do.consumer_wait(read);
            if (query0 + kBlockM > seq.seqlen_q) {  // the last row block: uniform
                zero_rows(sQ(_, _, read.index()), seq.seqlen_q - query0, thread);
                zero_rows(sdO(_, _, read.index()), seq.seqlen_q - query0, thread);
                cutlass::arch::fence_view_async_shared();
                cutlass::arch::NamedBarrier::sync(kNumMmaThreads, kBarrierTailZeroed);
            }
            // The variants kernel's mask of this step (the plain kernel leaves it unused): the
            // tile's visible pairs and the query head's ALiBi slope, read before the products are
            // issued so that the load runs while they do.
            const StepMask step_mask(work.mask, kHasVariants && params.alibi_slopes != nullptr
                                                    ? alibi_raw_slope(params, work.batch,
                                                                      work.head_of(step))
                                                    : 0.f);
            warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_sdp, tSrK, tSrQ(_, _, _, read.index()),
                                               acc_s);
            warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_sdp, tdPrV, tdPrdO(_, _, _, read.index()),
                                               acc_dp);

            // The row block's statistics, by query (this thread's columns of S^T): LSE in log2
            // units (+inf past the sequence end and for rows that saw no key: P = 0 there), D.
            const float* lse_log2 = shared.lse_log2.data() + read.index() * kBlockM;
            const float* d_rows = shared.d.data() + read.index() * kBlockM;
            constexpr int kScoresPerThread = decltype(size(acc_s))::value;

            warpgroup_wait<1>();  // S^T landed
            Tensor rP = make_tensor<Element>(acc_s.layout());
            Tensor tdVrP = make_tensor(rP.data(), accumulator_as_a_operand(rP.layout()));
            // dV += P^T dO with P^T from registers (where: kDvAfterDs).
            auto issue_dv = [&] {
                warpgroup_gemm</*kZeroInit=*/false>(tiled_mma_dkv, tdVrP,
                                                    tdVrdOt(_, _, _, read.index()), acc_dv);
            };
            if constexpr (!kHasVariants) {
                // P^T, masked: keys past the end and pairs the local mask hides (score -inf).
                CUTE_UNROLL
                for (int i = 0; i < kScoresPerThread; ++i) {
                    const int key = key0 + get<0>(tScS(i));
                    const int query = get<1>(tScS(i));
                    const float score = work.mask.masked_score(acc_s(i), query0 + query, key);
                    acc_s(i) = exp2f(score * params.logit_scale_log2 - lse_log2[query]);
                }
                if constexpr (!kDvAfterDs) convert_fragment(acc_s, rP);
            } else {
                variant_probabilities(params, step_mask, key0, tScS, lse_log2, query0, acc_s, rP);
            }
            // Before dS, so that dV runs meanwhile.
            if constexpr (!kDvAfterDs) issue_dv();
            // dP^T landed (dV, if issued, may still run).
            warpgroup_wait<kDvAfterDs ? 0 : 1>();
            // dS^T = P^T (dP^T - D), in place of dP^T.
            CUTE_UNROLL
            for (int i = 0; i < kScoresPerThread; ++i) {
                acc_dp(i) = acc_s(i) * (acc_dp(i) - d_rows[get<1>(tScS(i))]);
            }
            if constexpr (kDvAfterDs) convert_fragment(acc_s, rP);
            Tensor rdS = make_tensor<Element>(acc_dp.layout());
            convert_fragment(acc_dp, rdS);
            Tensor tdKrdS = make_tensor(rdS.data(), accumulator_as_a_operand(rdS.layout()));
            // After dS, in its shared-memory store's shadow.
            if constexpr (kDvAfterDs) issue_dv();

            // dS (queries, keys) to shared memory for dQ, into this stage's buffer: the row block
            // before used the other one, and the last that used this one has passed
            // kBarrierDsWritten since, which every consumer reaches only after its dQ product of
            // that row block completed.
            static_assert(Traits::kDsStages == Traits::kStages, "dS follows the Q / dO stage");
            copy(smem_tiled_copy_ds, smem_thr_copy_ds.retile_S(rdS), tdSsdS(_, _, _, read.index()));
            cutlass::arch::fence_view_async_shared();  // generic-proxy writes, wgmma reads
            cutlass::arch::NamedBarrier::sync(kNumMmaThreads, kBarrierDsWritten);

            // dQ = dS K, then dK += dS^T Q (dS^T from registers), which runs while dQ is staged
            // (FlashAttention-3's order: hopper/mainloop_bwd_sm90_tma_gmma_ws.hpp).
            Tensor acc_dq =
                partition_fragment_C(tiled_mma_dq, select<0, 1>(typename Traits::TileShapeDQ{}));
            Tensor tdQrdS_stage = tdQrdS(_, _, _, read.index());
            warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_dq, tdQrdS_stage, tdQrKt, acc_dq);
            warpgroup_gemm</*kZeroInit=*/false>(tiled_mma_dkv, tdKrdS,
                                                tdKrQt(_, _, _, read.index()), acc_dk);
            warpgroup_wait<1>();  // dV and dQ landed: this thread's reads of dS and dO are done
            // This warpgroup stages its dQ part once its writer has read out the part staged
            // kDqStages parts before in the same buffer (dq_stage_of).
            shared.dq_free[dq_stage_of(read)][warpgroup].wait(dq_phase_of(read));

            // dQ: staged in the chunk order for the writer's bulk reduce-add (write_dq).
            CUTE_UNROLL
            for (int group = 0; group < DqChunk::kFloatsPerThread / DqChunk::kVector; ++group) {
                const int i = group * DqChunk::kVector;
                *reinterpret_cast<float4*>(dq_stage(shared, dq_stage_of(read)) +
                                           DqChunk::vector_offset(thread, group)) =
                    make_float4(acc_dq(i), acc_dq(i + 1), acc_dq(i + 2), acc_dq(i + 3));
            }
            if (describes_dq) {
                const int head = work.head_of(step);
                typename SharedStorage::DqAdd add;
                add.rows = kp.dq_accum + int64_t(head) * kp.dq_accum_head_stride +
                           (dq_first_row + query0) * kHeadDim + warpgroup * DqChunk::kPartFloats;
                add.turn = nullptr;
                add.turns_before = 0;
                add.last = 0;
                if (kp.dq_order.counters != nullptr) {
                    add.turn = kp.dq_order.counters + int64_t(head) * kp.dq_order.head_stride +
                               (dq_first_row / kBlockM + m_block) * Traits::kNumMmaWarpgroups +
                               warpgroup;
                    add.turns_before = work.dq_adds_before(m_block);
                }
                shared.dq_add[dq_stage_of(read)][warpgroup] = add;
            }
            cutlass::arch::fence_view_async_shared();  // generic-proxy writes, bulk-copy reads
            cutlass::arch::NamedBarrier::sync(kThreadsPerWarpgroup, kBarrierDqStaged + warpgroup);
            if (describes_dq) {
                shared.dq_staged[dq_stage_of(read)][warpgroup].arrive();  // releases dq_add too
            }
            warpgroup_wait<0>();  // dK landed: the reads of Q are done too
            pipeline_q.consumer_release(read);
            pipeline_do.consumer_release(read);
            ++read;
        }
        // Every product of this thread has completed: the producer may load the next tile's K
        // and V (dK and dV are in registers, the last dQ part in its own buffer).
        shared.kv_empty.arrive();

        store_dk_dv(params, seq, work, tiled_mma_dkv, acc_dk, acc_dv, thread);
    }

    // The variants kernel's P^T of one step: the raw scores capped (raw = tanh(S^T * prescale),
    // the forward's apply_softcap) and biased by the step's query head's ALiBi slope before the
    // mask, in the forward's order (flash_fwd_kernel.h), then P^T = exp2(score *
    // logit_scale_log2 - LSE_log2) into rP in 16 bits, the dV product's operand, and into acc_s in
    // float32 times the cap's derivative 1 - raw^2, which dS^T = P^T (dP^T - D) then carries
    // (d logit / d (q.k) = softmax_scale (1 - raw^2); softmax_scale is applied to dK and dQ at
    // the end, as without the cap). The derivative is taken while raw is at hand, so nothing more
    // lives across the dP^T product (the sm80 family recovers raw from P in the dS loop, which
    // spilled in the lost first version of this kernel, backward_plan.md). Shape, for the
    // registers (bf16 d = 128 without a local mask, nvcc 13.0): the tanh of every score first, in
    // place, then one loop that converts P^T in pairs as it goes; the tanh and the derivative
    // inside that loop (raw and 1 - raw^2 live beside P^T) spilled 4 bytes, and that with P^T
    // converted one value at a time 8. The step's mask is
    // built from the tile's (its visible pairs) and a slope: the lost first version of this kernel
    // spilled with a slope in the tile's mask or a step mask derived from the params again.
    template <typename ScoreCoords, typename AccS, typename FragP>
    __device__ static void variant_probabilities(const FlashBwdParams& params,
                                                 const StepMask& mask, int key0,
                                                 const ScoreCoords& tScS, const float* lse_log2,
                                                 int query0, AccS& acc_s, FragP& rP) {
        const bool softcap = params.softcap_prescale != 0.f;  // uniform: the same every step
        constexpr int kScoresPerThread = decltype(size(acc_s))::value;
        if (softcap) apply_softcap(acc_s, params.softcap_prescale);
        cutlass::NumericArrayConverter<Element, float, 2> convert_pair;
        CUTE_UNROLL
        for (int i = 0; i < kScoresPerThread; i += 2) {
            cutlass::Array<float, 2> p;
            CUTE_UNROLL
            for (int j = 0; j < 2; ++j) {
                const int key = key0 + get<0>(tScS(i + j));
                const int query = get<1>(tScS(i + j));
                const float raw = acc_s(i + j);
                const float score = mask.masked_score(raw, query0 + query, key);
                p[j] = exp2f(score * params.logit_scale_log2 - lse_log2[query]);
                acc_s(i + j) = softcap ? p[j] - p[j] * raw * raw : p[j];  // p (1 - raw^2)
            }
            const cutlass::Array<Element, 2> converted = convert_pair(p);
            rP(i) = converted[0];
            rP(i + 1) = converted[1];
        }
    }

    // Zeroes rows [first_row, rows) of one (rows, head dim) buffer (zero_rows.h).
    template <typename SmemRows>
    __device__ static void zero_rows(SmemRows tile, int first_row, int thread) {
        constexpr int kRows = decltype(size<0>(tile))::value;
        zero_rows_past_end<kRows, kHeadDim, kNumMmaThreads, Element>(
            first_row, thread, [&](int row, int col) -> Element& { return tile(row, col); });
    }

    // dK (times the softmax scale: dS is the gradient of the scaled scores' exponent) and dV of
    // the block's keys inside the sequence, two adjacent columns per store.
    template <typename TiledMmaDKV, typename AccDK, typename AccDV>
    __device__ static void store_dk_dv(const FlashBwdParams& params, const SeqlenInfo& seq,
                                       const Work& work, TiledMmaDKV& tiled_mma_dkv, AccDK& acc_dk,
                                       AccDV& acc_dv, int thread) {
        Tensor tdKcdK = tiled_mma_dkv.get_thread_slice(thread).partition_C(
            make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
        Element* dk_seq = static_cast<Element*>(params.dk_ptr) +
                          seq.k_offset(params.dk_batch_stride, params.dk_row_stride, work.batch) +
                          int64_t(work.head_k) * params.dk_head_stride;
        Element* dv_seq = static_cast<Element*>(params.dv_ptr) +
                          seq.k_offset(params.dv_batch_stride, params.dv_row_stride, work.batch) +
                          int64_t(work.head_k) * params.dv_head_stride;
        const int key0 = work.n_block * kBlockN;
        CUTE_UNROLL
        for (int i = 0; i < size(acc_dk); i += 2) {
            const int key = key0 + get<0>(tdKcdK(i));
            const int col = get<1>(tdKcdK(i));
            if (key >= seq.seqlen_k || col >= params.head_dim) continue;
            cutlass::Array<Element, 2> dk_pair, dv_pair;
            dk_pair[0] = Element(acc_dk(i) * params.softmax_scale);
            dk_pair[1] = Element(acc_dk(i + 1) * params.softmax_scale);
            dv_pair[0] = Element(acc_dv(i));
            dv_pair[1] = Element(acc_dv(i + 1));
            *reinterpret_cast<cutlass::Array<Element, 2>*>(
                dk_seq + int64_t(key) * params.dk_row_stride + col) = dk_pair;
            *reinterpret_cast<cutlass::Array<Element, 2>*>(
                dv_seq + int64_t(key) * params.dv_row_stride + col) = dv_pair;
        }
    }
};

template <typename Traits, bool kIsLocal, bool kHasVariants>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    flash_bwd_kernel(const __grid_constant__ BwdKernelParams<Traits> kp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(Traits::kSmemAlignment) char smem[];
    FlashBwdKeyBlock<Traits, kIsLocal, kHasVariants>::run(kp, smem);
#else
    __trap();  // wgmma and setmaxnreg exist only in sm_90a code
#endif
}

}  // namespace sm90
}  // namespace flash_varlen
