// The sm90-family forward kernel (Hopper: wgmma, TMA, warp specialization; built for sm_90a).
//
// A tile is one row block (kBlockM query rows) of one head of one sequence, or, for GQA, of the
// query heads of one key/value group packed together (query_rows.h). The grid is
// persistent: one thread block per SM computes tile after tile, drawn from a counter in launch
// order (kernels/common/persistent_tiles.h), so that the loads of a block's next tile run while
// it finishes the last one (the cost a launch of one block per tile pays in full at every tile:
// an idle SM while a new block starts, loads Q and its first K block, and, at the end, while it
// writes O). The structure is FlashAttention-3's (Shah et al. 2024; Dao-AILab/flash-attention
// hopper/):
// - warpgroup 0, the producer, gives its registers back (setmaxnreg); its first warp finds the
//   tiles and one of its threads issues every TMA load: per tile Q once, then K and V of the
//   visible key blocks from the last one down, into kStages shared-memory buffers each
//   (PipelineTmaAsync: a "full" mbarrier per buffer that the TMA completes by byte count, an
//   "empty" one that every consumer thread arrives on when done). The K and V stages carry on
//   from one tile to the next; Q has one buffer, which the next tile's Q takes once the
//   consumers have staged and read back this tile's O there (q_empty);
// - warpgroups 1.., the consumers, take the registers and own 64 query rows each: S = Q K^T
//   (wgmma, both operands in shared memory), mask, online softmax in registers, O += P V (wgmma,
//   P from registers). Inside a warpgroup the softmax of block n runs while the tensor cores do
//   S of block n - 1 and P V of block n + 1 ("intra-warpgroup overlap"), and the warpgroups take
//   turns issuing their GEMMs (named barriers), so that one's softmax overlaps the other's GEMMs.
//
// Varlen and what lies past a sequence. The TMA descriptors cover the whole packed buffers,
// (total rows, d, heads, 1) (fixed length: (seqlen, d, heads, batch)), and a tile's row coordinate
// is its sequence's first row plus the tile's offset. A box that runs past the sequence end reads
// the next sequence's rows (or zeros past the buffer end, which TMA fills itself):
// - Q rows past the end produce garbage rows of S and O; rows are independent in every step
//   (row max, row sum and O row r depend only on Q row r), and the epilogue never writes them.
// - K rows past the end give scores in columns >= seqlen_k, which the mask replaces by -inf
//   whatever they held (NaN and inf included: the mask selects, it does not add). The highest
//   visited key block is always in the masked range (MaskPolicy::unmasked_block_end rounds down).
// - V rows past the end meet P = 0 in O += P V. 0 * x = 0 only for finite x, and those rows need
//   not be finite: the next sequence's values are the user's (a NaN in one document must not
//   poison another; the sm80 family zero-fills them), and rows past cu_seqlens[-1] or past
//   seqused_k are unused memory (torch.empty, CUDA graph buffers with fewer tokens) that may hold
//   any bit pattern. So the consumers zero those rows of the one V tile that straddles the end
//   before its first use (zero_rows.h); it is the first tile loaded, once per row
//   block, only in the varlen layout (fixed length reads zeros there from TMA's bounds).
//
// The mask (causal with either alignment, sliding windows, the sequence tail) is the common
// MaskPolicy; kIsLocal selects the instantiation, as in the sm80 family. ALiBi (its bias before
// the mask, alibi_fragment.h) and dropout (dropout_fragment.h: the sm80 family's keep mask and
// pattern output; 1 / (1 - p) in the finalize) run in a second kernel of each instantiation,
// kHasVariants, that the launcher picks at run time, as the sm80 family's variants do. As
// runtime switches in one kernel they cost the plain path registers (measured on the branch
// these were written on: with dropout's code the bf16 d128 kernel spilled and its masked loop
// grew by some 60 instructions per step; with ALiBi's alone d256's spills grew). Soft-capping is
// a runtime switch in both kernels (tanh of each score before ALiBi and the mask, the sm80
// family's order; the same branch in every step, so it is uniform and predictable). Attention
// sinks are in the finalize.
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/mask_policy.h"
#include "kernels/common/persistent_tiles.h"
#include "kernels/common/philox.h"
#include "kernels/common/score_transforms.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/sm90/alibi_fragment.h"
#include "kernels/sm90/dropout_fragment.h"
#include "kernels/sm90/fragment_layouts.h"
#include "kernels/sm90/fwd_kernel_traits.h"
#include "kernels/sm90/named_barriers.h"
#include "kernels/sm90/online_softmax.h"
#include "kernels/sm90/query_rows.h"
#include "kernels/sm90/warpgroup_gemm.h"
#include "kernels/sm90/zero_rows.h"

namespace flash_varlen {
namespace sm90 {

using namespace cute;

// What the launcher passes: the host's params plus the TMA descriptors built from them (and the
// global shapes the K and V descriptors were built with, which the device needs to rebuild their
// coordinate tensors). A __grid_constant__ kernel parameter: TMA reads the descriptors from
// parameter space.
template <typename Traits>
struct FwdKernelParams {
    FlashFwdParams params;
    // Q as (d, heads of a tile, rows, head units, batch): one box per tile and column chunk
    // (flash_fwd_launch.h, make_query_descriptor).
    TmaDescriptor tma_q;
    typename Traits::TmaK tma_k;
    typename Traits::TmaV tma_v;
    typename Traits::GmemShape shape_k;   // (rows, d, heads_k, batch)
    typename Traits::GmemShape shape_vt;  // (d, rows, heads_k, batch)
    // Query heads per tile: the GQA group when packed, else 1 (query_rows.h).
    int heads_per_tile;
    // The launch order of the tiles and the counter that hands them out (zero at the launch).
    TileOrder tiles;
    int* tile_counter;
};

// kHasVariants: the launch has ALiBi or dropout (see the top of the file).
template <typename Traits, bool kIsLocal, bool kHasVariants>
struct FlashFwdRowBlock {
    using Element = typename Traits::Element;
    static constexpr int kBlockM = Traits::kBlockM;
    static constexpr int kBlockN = Traits::kBlockN;
    static constexpr int kHeadDim = Traits::kHeadDim;
    static constexpr int kNumMmaWarpgroups = Traits::kNumMmaWarpgroups;
    static constexpr int kNumMmaThreads = Traits::kNumMmaThreads;
    using Mask = MaskPolicy<kIsLocal, /*kHasAlibi=*/false>;
    using SharedStorage = typename Traits::SharedStorage;
    using PipelineKV = typename Traits::PipelineKV;
    using PipelineState = typename Traits::PipelineState;
    // Rows of S (and O) per consumer thread: two per 64-row wgmma atom.
    static constexpr int kRowsPerThread = 2;
    using Softmax = OnlineSoftmax<kRowsPerThread>;
    using RowValues = typename Softmax::RowValues;
    using ThreadRows = cute::array<int, kRowsPerThread>;
    // Whether the consumer warpgroups take turns issuing their GEMMs. FlashAttention-3 does for
    // head dims up to 128 with the intra-warpgroup overlap (mainloop_fwd_sm90_tma_gmma_ws.hpp,
    // UseSchedulerBarrier); to be measured here.
    static constexpr bool kMmaTurns = kHeadDim <= 128;

    // The key blocks a tile visits, in the order it visits them: [begin, end), from the last
    // down. The producer and the consumers derive every loop bound from this, so they agree on
    // the number of loads. A tile's rows cover the tokens first_token .. last_token.
    struct KeyBlocks {
        int begin;
        int end;
        int unmasked_begin;  // blocks in [unmasked_begin, unmasked_end) need no masking
        int unmasked_end;

        __device__ KeyBlocks(const Mask& mask, int first_token, int last_token)
            : begin(mask.template key_block_begin_of_rows<kBlockN>(first_token)),
              end(mask.template key_block_end_of_rows<kBlockN>(last_token)),
              unmasked_begin(mask.template unmasked_block_begin_of_rows<kBlockN>(last_token)),
              unmasked_end(mask.template unmasked_block_end_of_rows<kBlockN>(first_token)) {}

        __device__ bool empty() const { return begin >= end; }
        __device__ bool needs_mask(int n_block) const {
            return n_block >= unmasked_end || (kIsLocal && n_block < unmasked_begin);
        }
    };

    // A tile's rows, sequence, mask and key blocks, which the producer and the consumers derive
    // alike from its coordinates (coordinates.head is its head unit: a head, or a GQA group).
    struct Tile {
        TileCoordinates coordinates;
        QueryRows rows;
        SeqlenInfo seq;
        Mask mask;
        KeyBlocks blocks;

        __device__ Tile(const FlashFwdParams& params, const TileCoordinates& coordinates,
                        int heads_per_tile, const SeqlenInfo& seq)
            : coordinates(coordinates),
              rows(QueryRows::of_tile<kBlockM>(heads_per_tile, coordinates.m_block,
                                               coordinates.head)),
              seq(seq),
              mask(params, seq, coordinates.batch, rows.first_head),
              blocks(mask, rows.first_token, rows.last_token<kBlockM>(seq.seqlen_q)) {}
    };

    __device__ static void run(const FwdKernelParams<Traits>& kp, char* smem) {
        SharedStorage& shared = *reinterpret_cast<SharedStorage*>(smem);
        const int warpgroup = cutlass::canonical_warp_group_idx();
        constexpr int kProducerWarpgroup = 0;

        if (threadIdx.x == 0) {
            // The swizzle the consumers compute (V's tail rows, O) matches the one TMA and wgmma
            // apply to addresses only on an aligned base (fwd_kernel_traits.h): fail loudly.
            if (cute::cast_smem_ptr_to_uint(smem) % Traits::kSmemAlignment != 0) __trap();
            // The variants' per-row coordinates assume one head per tile (query_rows.h).
            if (kHasVariants && kp.heads_per_tile != 1) __trap();
            cute::prefetch_tma_descriptor(&kp.tma_q);
            cute::prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
            cute::prefetch_tma_descriptor(kp.tma_v.get_tma_descriptor());
            shared.q_full.init(/*arrive_count=*/1);
            shared.q_empty.init(/*arrive_count=*/kNumMmaThreads);
        }
        typename PipelineKV::Params pipeline_params;
        pipeline_params.transaction_bytes = Traits::kTmaBytesKV;
        pipeline_params.role = warpgroup == kProducerWarpgroup
                                   ? PipelineKV::ThreadCategory::Producer
                                   : PipelineKV::ThreadCategory::Consumer;
        pipeline_params.is_leader = threadIdx.x == 0;  // the one thread that issues the loads
        pipeline_params.num_consumers = kNumMmaThreads;
        // Without a cluster every consumer thread arrives on the empty barrier itself (the
        // arrival count is kNumMmaThreads), so a release needs no warpgroup-wide sync first.
        PipelineKV pipeline_k(shared.pipeline_k, pipeline_params, Shape<_1, _1, _1>{});
        PipelineKV pipeline_v(shared.pipeline_v, pipeline_params, Shape<_1, _1, _1>{});
        __syncthreads();  // the barrier initialisations (fenced by the pipelines) are visible

        if (warpgroup == kProducerWarpgroup) {
            cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
            if (threadIdx.x < cutlass::NumThreadsPerWarp) {
                produce(kp, shared, pipeline_k, pipeline_v);
            }
            return;
        }
        cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
        consume(kp, shared, pipeline_k, pipeline_v, warpgroup - 1);
    }

    // The producer's first warp: finds each tile (the schedule's search needs the whole warp),
    // publishes it to the consumers and, in one thread, issues its loads. A tile of a row block
    // past its sequence's end (grid order) is skipped; the consumers never see it.
    __device__ static void produce(const FwdKernelParams<Traits>& kp, SharedStorage& shared,
                                   PipelineKV& pipeline_k, PipelineKV& pipeline_v) {
        const FlashFwdParams& params = kp.params;
        const bool leader = threadIdx.x == 0;
        PipelineState write = cutlass::make_producer_start_state<PipelineKV>();
        int published = 0;  // tiles handed to the consumers so far
        // Waits until the consumers are done with the last published tile's Q buffer (and its
        // slot in shared memory). At most one q_empty phase is ever pending: the consumers learn
        // a tile only after this wait for the one before.
        auto wait_q_empty = [&] {
            if (published > 0) shared.q_empty.wait((published - 1) % 2);
        };
        TileCoordinates coordinates;
        for (int index = blockIdx.x; kp.tiles.lookup(index, kIsLocal, coordinates);) {
            // The next index, drawn now; its atomic's latency hides behind this tile's loads.
            int next_index = 0;
            if (leader) next_index = next_tile_index(kp.tile_counter);
            next_index = __shfl_sync(0xffffffffu, next_index, 0);
            const Tile tile(params, coordinates, kp.heads_per_tile,
                            SeqlenInfo(params, coordinates.batch));
            if (tile.rows.first_token < tile.seq.seqlen_q && leader) {
                load(kp, shared, pipeline_k, pipeline_v, tile, write, wait_q_empty);
                ++published;
            }
            __syncwarp();
            index = next_index;
        }
        if (leader) {  // no tile left: tell the consumers
            wait_q_empty();
            shared.tile.m_block = -1;
            shared.q_full.arrive();
        }
    }

    // The producer thread, one tile: publishes it, then loads Q, and K and V of every visited key
    // block, last block first. V lags K by one block because the consumers use V(n) one step
    // after K(n) (the overlap above). The first K block goes before anything that waits for the
    // consumers' previous tile: its stage is free as soon as they have done that tile's last
    // S = Q K^T.
    template <typename WaitQEmpty>
    __device__ static void load(const FwdKernelParams<Traits>& kp, SharedStorage& shared,
                                PipelineKV& pipeline_k, PipelineKV& pipeline_v, const Tile& tile,
                                PipelineState& write, WaitQEmpty& wait_q_empty) {
        const FlashFwdParams& params = kp.params;
        const SeqlenInfo& seq = tile.seq;
        const KeyBlocks& blocks = tile.blocks;
        const QueryRows& rows = tile.rows;
        const int batch = tile.coordinates.batch;
        const int head_unit = tile.coordinates.head;
        if (blocks.empty()) {  // nothing to load: publish the tile alone
            wait_q_empty();
            shared.tile = tile.coordinates;
            shared.tile_seq = seq;
            shared.q_full.arrive();
            return;
        }
        const int head_k = rows.first_head / (params.nheads / params.nheads_k);
        const int batch_coord = seq.is_varlen ? 0 : batch;  // varlen buffers are one batch
        Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
        Tensor sVt = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutVt{});

        // Coordinate tensors of the descriptors, shifted to the sequence's first row.
        Tensor mK = kp.tma_k.get_tma_tensor(kp.shape_k)(_, _, head_k, batch_coord);  // (rows, D)
        Tensor gK =
            local_tile(domain_offset(make_coord(seq.k_start, _0{}), mK),
                       Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));     // (BN, D, n)
        Tensor mVt = kp.tma_v.get_tma_tensor(kp.shape_vt)(_, _, head_k, batch_coord);  // (D, rows)
        Tensor gVt =
            local_tile(domain_offset(make_coord(_0{}, seq.k_start), mVt),
                       Shape<Int<kHeadDim>, Int<kBlockN>>{}, make_coord(_0{}, _));  // (D, BN, n)

        auto tma_k = kp.tma_k.get_slice(_0{});
        Tensor tKgK = group_modes<0, 3>(tma_k.partition_S(gK));  // (TMA, n)
        Tensor tKsK = group_modes<0, 3>(tma_k.partition_D(sK));  // (TMA, stage)
        auto tma_v = kp.tma_v.get_slice(_0{});
        Tensor tVgVt = group_modes<0, 3>(tma_v.partition_S(gVt));  // (TMA, n)
        Tensor tVsVt = group_modes<0, 3>(tma_v.partition_D(sVt));  // (TMA, stage)

        // K and V are read by every row block of the head (and every head of a GQA group):
        // keep them in L2; Q is read once.
        auto load_k = [&](int n_block, const PipelineState& state) {
            pipeline_k.producer_acquire(state);  // also arms the full barrier with the byte count
            copy(kp.tma_k.with(*pipeline_k.producer_get_barrier(state), 0,
                               TMA::CacheHintSm90::EVICT_LAST),
                 tKgK(_, n_block), tKsK(_, state.index()));
        };
        auto load_v = [&](int n_block, const PipelineState& state) {
            pipeline_v.producer_acquire(state);
            copy(kp.tma_v.with(*pipeline_v.producer_get_barrier(state), 0,
                               TMA::CacheHintSm90::EVICT_LAST),
                 tVgVt(_, n_block), tVsVt(_, state.index()));
        };

        int n_block = blocks.end - 1;
        load_k(n_block, write);
        wait_q_empty();
        shared.tile = tile.coordinates;
        shared.tile_seq = seq;
        // The arrival (release) also publishes the tile written just before. Q: one box
        // (columns, heads, tokens) per chunk of columns, into the chunk's part of the buffer
        // (query_rows.h); the box counts its zero-filled parts too.
        const int tokens = QueryRows::tokens_per_tile<kBlockM>(rows.heads);
        shared.q_full.arrive_and_expect_tx(Traits::kQBytesPerRow * rows.heads * tokens);
        const int q_row = seq.q_start + rows.first_token;  // q_start is 0 in fixed length
        CUTE_UNROLL
        for (int chunk = 0; chunk < Traits::kQChunks; ++chunk) {
            SM90_TMA_LOAD_5D::copy(&kp.tma_q, reinterpret_cast<uint64_t*>(&shared.q_full),
                                   static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_FIRST),
                                   shared.q.data() + chunk * Traits::kQChunkElems,
                                   chunk * Traits::kQChunkCols, 0, q_row, head_unit, batch_coord);
        }
        // Not unrolled: each iteration waits for a free stage anyway, and unrolled copies of the
        // issue sequence made ptxas spill around each TMA issue in the producer's 32 registers
        // (d = 64, bf16: 164 bytes of spill stores).
        CUTE_NO_UNROLL
        for (--n_block; n_block >= blocks.begin; --n_block) {
            const PipelineState write_v = write;  // V(n + 1) goes where K(n + 1) went
            ++write;
            load_k(n_block, write);
            load_v(n_block + 1, write_v);
        }
        load_v(blocks.begin, write);
        ++write;  // the next tile's first K and V take the next stage
        // No producer_tail: without a cluster no other block waits on this one's barriers, and
        // the block cannot retire before its consumers, which wait for every load.
    }

    // A consumer warpgroup: the tiles the producer publishes, until it says none is left.
    __device__ static void consume(const FwdKernelParams<Traits>& kp, SharedStorage& shared,
                                   PipelineKV& pipeline_k, PipelineKV& pipeline_v,
                                   int mma_warpgroup) {
        const FlashFwdParams& params = kp.params;
        // Warpgroup 0 starts with the GEMM turn (main_loop): its own arrival plus its first wait
        // fill the barrier. The turns then alternate across tiles: every tile gives both
        // warpgroups the same number of steps.
        if constexpr (kMmaTurns) {
            if (mma_warpgroup == 0) {
                cutlass::arch::NamedBarrier::arrive(2 * kThreadsPerWarpgroup, kBarrierMmaTurn);
            }
        }
        PipelineState read;  // the K and V stages carry on from tile to tile, as the producer's
        for (int consumed = 0;; ++consumed) {
            shared.q_full.wait(consumed % 2);
            const TileCoordinates coordinates = shared.tile;
            if (coordinates.m_block < 0) return;
            compute(kp, shared, pipeline_k, pipeline_v,
                    Tile(params, coordinates, kp.heads_per_tile, shared.tile_seq), read,
                    mma_warpgroup);
        }
    }

    // A consumer warpgroup, one tile: its 64 rows of the row block, then its part of the
    // epilogue.
    __device__ static void compute(const FwdKernelParams<Traits>& kp, SharedStorage& shared,
                                   PipelineKV& pipeline_k, PipelineKV& pipeline_v, const Tile& tile,
                                   PipelineState& read, int mma_warpgroup) {
        const FlashFwdParams& params = kp.params;
        const SeqlenInfo& seq = tile.seq;
        const QueryRows& rows = tile.rows;
        const int batch = tile.coordinates.batch;
        const int thread = threadIdx.x - kThreadsPerWarpgroup;  // among the consumer threads
        typename Traits::TiledMmaPV tiled_mma_pv;
        Tensor acc_o = partition_fragment_C(
            tiled_mma_pv, select<0, 1>(typename Traits::TileShapePV{}));  // ((2, 2, D/8), 1, 1)
        Softmax softmax;
        RowValues lse;

        if (tile.blocks.empty()) {  // a tile that sees no key: output 0, LSE = sink
            clear(acc_o);
            constexpr float kAnyOutputScale = 1.f;  // every row's factor is 0
            softmax.finalize(params.logit_scale, kAnyOutputScale, row_sinks(params, rows, thread),
                             lse);
        } else {
            main_loop(params, shared, pipeline_k, pipeline_v, seq, tile.mask, tile.blocks, rows,
                      batch, mma_warpgroup, thread, tiled_mma_pv, read, acc_o, softmax, lse);
        }
        store_output(kp, shared, tiled_mma_pv, acc_o, lse, mma_warpgroup, thread);
    }

    // This thread's rows of the tile (0 .. kBlockM - 1): S and O, both wgmma accumulators, share
    // the row layout. Derived where they are needed rather than held through the loop.
    __device__ static ThreadRows thread_rows(int thread) {
        typename Traits::TiledMmaPV tiled_mma_pv;
        Tensor tOcO = tiled_mma_pv.get_thread_slice(thread).partition_C(
            make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // ((2, 2, D/8), 1, 1)
        Tensor tOcO_rc = make_tensor(tOcO.data(), accumulator_as_rows_cols(tOcO.layout()));
        ThreadRows rows;
        CUTE_UNROLL
        for (int r = 0; r < kRowsPerThread; ++r) rows[r] = get<0>(tOcO_rc(r, 0));
        return rows;
    }

    // The query rows (tokens) of the sequence that this thread's rows hold.
    __device__ static ThreadRows thread_tokens(const QueryRows& rows, int thread) {
        ThreadRows tokens = thread_rows(thread);
        CUTE_UNROLL
        for (int r = 0; r < kRowsPerThread; ++r) tokens[r] = rows.token(tokens[r]);
        return tokens;
    }

    // The attention sink of each of this thread's rows (its head's), -inf without sinks.
    __device__ static RowValues row_sinks(const FlashFwdParams& params, const QueryRows& rows,
                                          int thread) {
        const ThreadRows tile_rows = thread_rows(thread);
        RowValues sinks;
        CUTE_UNROLL
        for (int r = 0; r < kRowsPerThread; ++r) {
            sinks(r) = params.learnable_sink == nullptr
                           ? -INFINITY
                           : params.learnable_sink[rows.head(tile_rows[r])];
        }
        return sinks;
    }

    template <typename TiledMmaPV, typename AccO>
    __device__ static void main_loop(const FlashFwdParams& params, SharedStorage& shared,
                                     PipelineKV& pipeline_k, PipelineKV& pipeline_v,
                                     const SeqlenInfo& seq, const Mask& mask,
                                     const KeyBlocks& blocks, const QueryRows& rows, int batch,
                                     int mma_warpgroup, int thread, TiledMmaPV& tiled_mma_pv,
                                     PipelineState& read, AccO& acc_o, Softmax& softmax,
                                     RowValues& lse) {
        Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});
        Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
        Tensor sVt = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutVt{});

        typename Traits::TiledMmaQK tiled_mma_qk;
        auto thr_mma_qk = tiled_mma_qk.get_thread_slice(thread);
        auto thr_mma_pv = tiled_mma_pv.get_thread_slice(thread);
        // Shared-memory descriptors; a warpgroup's A descriptors cover its own 64 rows of Q.
        Tensor tSrQ = thr_mma_qk.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_D)
        Tensor tSrK = thr_mma_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_D, stage)
        Tensor tOrV = thr_mma_pv.partition_fragment_B(sVt);  // (MMA, MMA_D, MMA_N, stage)
        // (row, col) of each of this thread's scores within the tile, for the mask.
        Tensor tScS = thr_mma_qk.partition_C(
            make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));  // ((2, 2, N/8), 1, 1)
        const float scale_log2 = params.logit_scale_log2;
        const bool softcap = params.softcap_prescale != 0.f;
        // The sequence row (token) of each of this thread's rows, and the key of each of its
        // columns within a block: the coordinates of the mask, ALiBi and dropout.
        const ThreadRows tokens = thread_tokens(rows, thread);
        Tensor tScS_rc = make_tensor(tScS.data(), accumulator_as_rows_cols(tScS.layout()));

        // ALiBi and dropout exist in the variants kernel only (see the top of the file), where
        // they are uniform runtime switches, and where a tile holds one head (query_rows.h).
        const bool alibi = kHasVariants && params.alibi_slopes != nullptr;
        const bool dropout = kHasVariants && params.dropout_threshold != 0;
        const int head = rows.first_head;
        // The tile's head's ALiBi slope, read once.
        const float alibi_slope = alibi ? alibi_raw_slope(params, batch, head) : 0.f;
        // Raw scores -> tanh(score * prescale) when soft-capping, then + ALiBi's bias, both
        // before the mask, which replaces whatever they made of a masked score (the sm80
        // family's order).
        auto transform_scores = [&](auto& acc_s, int n_block) CUTLASS_LAMBDA_FUNC_INLINE {
            if (softcap) apply_softcap(acc_s, params.softcap_prescale);
            if (alibi) {
                Tensor scores = make_tensor(acc_s.data(), accumulator_as_rows_cols(acc_s.layout()));
                add_alibi_bias(scores, tScS_rc, alibi_slope, tokens, n_block * kBlockN,
                               mask.diagonal);
            }
        };
        // The dropped probabilities of P become 0 before its P V; the output is scaled by
        // 1 / (1 - p) in the finalize. Applied to P once converted, after the previous P V has
        // landed, where the fewest registers are live. The row sums were taken before, over
        // every probability, as in the sm80 family.
        auto drop_probabilities = [&](auto& rP, int n_block) CUTLASS_LAMBDA_FUNC_INLINE {
            Tensor probs = make_tensor(rP.data(), accumulator_as_rows_cols(rP.layout()));
            const int col0 = n_block * kBlockN;
            const auto keep =
                fragment_keep_bits(DropoutRows(params, batch, head, tokens), tScS_rc, col0);
            if (params.dropout_mask_ptr != nullptr) {
                write_dropout_pattern(
                    probs, keep, tScS_rc,
                    dropout_pattern_rows<Element>(params, batch, head, tokens, seq.seqlen_q), col0,
                    seq.seqlen_k);
            }
            zero_dropped(probs, keep);
        };

        auto mask_scores = [&](auto& acc_s, int n_block) {
            Tensor scores = make_tensor(acc_s.data(), accumulator_as_rows_cols(acc_s.layout()));
            mask.apply_by_rows(scores, tScS_rc, tokens, n_block * kBlockN);
        };
        auto wait_turn = [&] {
            if constexpr (kMmaTurns) {
                cutlass::arch::NamedBarrier::sync(2 * kThreadsPerWarpgroup,
                                                  kBarrierMmaTurn + mma_warpgroup);
            }
        };
        auto pass_turn = [&] {
            if constexpr (kMmaTurns) {
                cutlass::arch::NamedBarrier::arrive(
                    2 * kThreadsPerWarpgroup,
                    kBarrierMmaTurn + (mma_warpgroup + 1) % kNumMmaWarpgroups);
            }
        };
        // The first (highest) key block: S, mask, softmax; its P V waits for the next step.
        int n_block = blocks.end - 1;
        Tensor acc_s = partition_fragment_C(
            tiled_mma_qk, select<0, 1>(typename Traits::TileShapeQK{}));  // ((2, 2, N/8), 1, 1)
        pipeline_k.consumer_wait(read);
        warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_qk, tSrQ, tSrK(_, _, _, read.index()), acc_s);
        warpgroup_wait<0>();
        pipeline_k.consumer_release(read);
        transform_scores(acc_s, n_block);
        if (blocks.needs_mask(n_block)) mask_scores(acc_s, n_block);
        softmax.fold_block(acc_s, scale_log2);  // nothing accumulated yet: no rescale
        // P, in the register layout of the A operand of P V; lives until the next step's P V.
        Tensor rP = make_tensor<Element>(acc_s.layout());
        convert_fragment(acc_s, rP);
        if (dropout) drop_probabilities(rP, n_block);
        Tensor tOrP = make_tensor(rP.data(), accumulator_as_a_operand(rP.layout()));

        if (seq.is_varlen && blocks.end * kBlockN > seq.seqlen_k) {  // uniform over the block
            pipeline_v.consumer_wait(read);
            Tensor sVt_stage = sVt(_, _, read.index());  // (D, BN): key rows are its columns
            zero_rows_past_end<kBlockN, kHeadDim, kNumMmaThreads, Element>(
                seq.seqlen_k - n_block * kBlockN, thread,
                [&](int row, int col) -> Element& { return sVt_stage(col, row); });
            // The zeros were written through the generic proxy; wgmma reads through the async
            // one. Fence, then make sure every consumer's share is written before any P V.
            cutlass::arch::fence_view_async_shared();
            cutlass::arch::NamedBarrier::sync(kNumMmaThreads, kBarrierVTailZeroed);
        }
        clear(acc_o);

        // One step: S of block n_block and P V of block n_block + 1 in flight together, then the
        // softmax of n_block while P V finishes. Always inlined (three call sites; the sm80
        // family saw its equivalent outlined with a stack frame).
        auto step = [&](int n_block, auto apply_mask) CUTLASS_LAMBDA_FUNC_INLINE {
            const PipelineState read_v = read;  // V(n_block + 1) sits where K(n_block + 1) did
            ++read;
            Tensor acc_s =
                partition_fragment_C(tiled_mma_qk, select<0, 1>(typename Traits::TileShapeQK{}));
            pipeline_k.consumer_wait(read);
            wait_turn();
            warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_qk, tSrQ, tSrK(_, _, _, read.index()),
                                               acc_s);
            pipeline_v.consumer_wait(read_v);
            warpgroup_gemm</*kZeroInit=*/false>(tiled_mma_pv, tOrP, tOrV(_, _, _, read_v.index()),
                                                acc_o);
            pass_turn();
            warpgroup_wait<1>();  // S landed; P V may still run
            pipeline_k.consumer_release(read);
            transform_scores(acc_s, n_block);
            if constexpr (decltype(apply_mask)::value) mask_scores(acc_s, n_block);
            const typename Softmax::Correction correction = softmax.fold_block(acc_s, scale_log2);
            warpgroup_wait<0>();  // P V landed: P may be overwritten and O rescaled
            pipeline_v.consumer_release(read_v);
            convert_fragment(acc_s, rP);
            if (dropout) drop_probabilities(rP, n_block);
            if (correction.any_row) Softmax::rescale(acc_o, correction.factor);
        };

        if constexpr (kHasVariants) {
            // Every block through the masking pass, as in the sm80 family's variants kernel: one
            // copy of the step instead of two or three. The variants' own work per score
            // outweighs the mask's, and with three copies the inliner left main_loop out of line
            // (bf16 d128), where ptxas serializes its wgmmas and keeps the accumulators in local
            // memory (scripts/check_overlap.py then finds no step in the kernel).
            for (--n_block; n_block >= blocks.begin; --n_block) step(n_block, cute::true_type{});
        } else {
            // The highest blocks may hold masked pairs (sequence tail, causal diagonal, the
            // window's right edge) and, with a local mask, the lowest ones too (the window's
            // left edge).
            for (--n_block; n_block >= blocks.begin && n_block >= blocks.unmasked_end; --n_block) {
                step(n_block, cute::true_type{});
            }
            for (; n_block >= blocks.begin && n_block >= blocks.unmasked_begin; --n_block) {
                step(n_block, cute::false_type{});
            }
            if constexpr (kIsLocal) {
                for (; n_block >= blocks.begin; --n_block) step(n_block, cute::true_type{});
            }
        }

        // The last P V, with the normalisation computed while it runs.
        pipeline_v.consumer_wait(read);
        warpgroup_gemm</*kZeroInit=*/false>(tiled_mma_pv, tOrP, tOrV(_, _, _, read.index()), acc_o);
        const RowValues normalise =
            softmax.finalize(params.logit_scale, dropout ? params.dropout_rescale : 1.f,
                             row_sinks(params, rows, thread), lse);
        warpgroup_wait<0>();
        pipeline_v.consumer_release(read);
        ++read;  // the next tile's first K and V come in the next stage
        Softmax::rescale(acc_o, normalise);
    }

    // Normalised O to global memory through shared memory (Q's, this warpgroup's rows only), and
    // the LSE, for the rows that hold a query of the sequence (query_rows.h). Staging gives
    // 16-byte stores of whole row segments, where the accumulator layout would give 4-byte stores
    // scattered over 8 rows per instruction.
    template <typename TiledMmaPV, typename AccO>
    __device__ static void store_output(const FwdKernelParams<Traits>& kp, SharedStorage& shared,
                                        TiledMmaPV& tiled_mma_pv, AccO& acc_o, const RowValues& lse,
                                        int mma_warpgroup, int consumer_thread) {
        const FlashFwdParams& params = kp.params;
        // The thread's index, made opaque to the compiler: the row and shared-memory offsets
        // derived from it are then computed here at every tile rather than hoisted out of the
        // tile loop and held in registers (ptxas spilled them at bf16 d128).
        int thread = consumer_thread;
        asm volatile("" : "+r"(thread));
        // The tile as published: it stays in shared memory until this thread arrives on q_empty
        // below, and reading it here frees the registers that would hold it through the loop.
        const TileCoordinates coordinates = shared.tile;
        const SeqlenInfo seq = shared.tile_seq;
        const int batch = coordinates.batch;
        const QueryRows rows =
            QueryRows::of_tile<kBlockM>(kp.heads_per_tile, coordinates.m_block, coordinates.head);
        // LSE: the four threads of a quad hold the same rows; the one holding column 0 writes.
        auto thr_mma_pv = tiled_mma_pv.get_thread_slice(thread);
        Tensor tOcO = thr_mma_pv.partition_C(
            make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // ((2, 2, D/8), 1, 1)
        Tensor tOcO_rc = make_tensor(tOcO.data(), accumulator_as_rows_cols(tOcO.layout()));
        if (get<1>(tOcO_rc(0, 0)) == 0) {
            float* lse_seq =
                params.softmax_lse_ptr + seq.lse_offset(params.lse_batch_stride, batch);
            CUTE_UNROLL
            for (int r = 0; r < kRowsPerThread; ++r) {
                const int row = get<0>(tOcO_rc(r, 0));
                if (rows.holds_query<kBlockM>(row, seq.seqlen_q)) {
                    lse_seq[rows.head(row) * params.lse_head_stride + rows.token(row)] = lse(r);
                }
            }
        }

        // This warpgroup's last wgmma that read its rows of Q has completed (main_loop waited
        // for all of them), no other warpgroup reads those rows, and the producer loads the next
        // tile's Q only after q_empty: overwrite them with O.
        Tensor rO = make_tensor<Element>(acc_o.layout());
        convert_fragment(acc_o, rO);
        Tensor sO = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutO{});
        auto smem_tiled_copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma_pv);
        auto smem_thr_copy_o = smem_tiled_copy_o.get_thread_slice(thread);
        copy(smem_tiled_copy_o, smem_thr_copy_o.retile_S(rO), smem_thr_copy_o.partition_D(sO));
        cutlass::arch::NamedBarrier::sync(kThreadsPerWarpgroup, kBarrierOStaged + mma_warpgroup);

        const int wg_row0 = mma_warpgroup * kRowsPerMmaWarpgroup;
        Tensor sO_wg = local_tile(sO, Shape<Int<kRowsPerMmaWarpgroup>, Int<kHeadDim>>{},
                                  make_coord(mma_warpgroup, _0{}));  // (64, D)
        typename Traits::GmemTiledCopyO gmem_tiled_copy_o;
        auto gmem_thr_copy_o = gmem_tiled_copy_o.get_thread_slice(thread % kThreadsPerWarpgroup);
        Tensor tOsO = gmem_thr_copy_o.partition_S(sO_wg);  // (CPY, CPY_M, CPY_D)
        Tensor tOcO_g = gmem_thr_copy_o.partition_S(
            make_identity_tensor(Shape<Int<kRowsPerMmaWarpgroup>, Int<kHeadDim>>{}));
        Tensor tOrO = make_fragment_like(tOsO);
        copy(gmem_tiled_copy_o, tOsO, tOrO);
        // Q's buffer is free for the next tile's Q once both warpgroups have read their O back.
        // The fence orders these generic-proxy reads before the TMA's async-proxy writes.
        cutlass::arch::fence_view_async_shared();
        shared.q_empty.arrive();
        // Each row goes to its (token, head); padding rows and rows past the sequence end are not
        // written (the latter belong to the next sequence), nor are columns past the real head
        // dim (the next head's; head_dim is a multiple of 8: a 16-byte chunk is wholly inside or
        // outside).
        Element* o_seq = static_cast<Element*>(params.o_ptr) +
                         seq.q_offset(params.o_batch_stride, params.o_row_stride, batch);
        CUTE_UNROLL
        for (int m = 0; m < size<1>(tOrO); ++m) {
            const int row = wg_row0 + get<0>(tOcO_g(0, m, 0));
            if (!rows.holds_query<kBlockM>(row, seq.seqlen_q)) continue;
            Element* o_row = o_seq + int64_t(rows.token(row)) * params.o_row_stride +
                             int64_t(rows.head(row)) * params.o_head_stride;
            CUTE_UNROLL
            for (int k = 0; k < size<2>(tOrO); ++k) {
                const int col = get<1>(tOcO_g(0, m, k));
                if (col < params.head_dim) {
                    copy(gmem_tiled_copy_o, tOrO(_, m, k),
                         make_tensor(make_gmem_ptr(o_row + col), tOrO(_, m, k).layout()));
                }
            }
        }
    }
};

template <typename Traits, bool kIsLocal, bool kHasVariants>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    flash_fwd_kernel(const __grid_constant__ FwdKernelParams<Traits> kp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(Traits::kSmemAlignment) char smem[];
    // The generator state this launch used, for the backward (one thread of the grid writes it,
    // before any early exit), as in the sm80 family. The host asks for it only with dropout,
    // which runs in the variants kernel.
    const FlashFwdParams& params = kp.params;
    if (kHasVariants && params.rng_state_out != nullptr && blockIdx.x == 0 && blockIdx.y == 0 &&
        blockIdx.z == 0 && threadIdx.x == 0) {
        params.rng_state_out[0] = int64_t(philox_seed(params));
        params.rng_state_out[1] = int64_t(philox_offset(params));
    }
    FlashFwdRowBlock<Traits, kIsLocal, kHasVariants>::run(kp, smem);
#else
    // wgmma and setmaxnreg exist only in sm_90a code; the family is built for nothing else.
    __trap();
#endif
}

}  // namespace sm90
}  // namespace flash_varlen
