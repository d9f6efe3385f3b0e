// Compile-time shape of the sm90-family backward kernel (issue 15, in progress: see
// csrc/kernels/sm90/backward_plan.md): tile sizes, warpgroup roles, the five wgmma products,
// shared-memory layouts, TMA copy types and pipelines.
//
// One thread block owns a key block (kBlockN keys of one head of one sequence): K and V stay in
// shared memory, dK and dV in registers, while the query blocks that see those keys stream
// through in kBlockM-row steps (Q and dO by TMA, kStages buffers each). The structure is
// FlashAttention-3's (Shah et al. 2024, Dao-AILab/flash-attention hopper/
// mainloop_bwd_sm90_tma_gmma_ws.hpp), written here from its description:
// - S^T = K Q^T and dP^T = V dO^T are computed transposed (keys as rows), so that P^T and dS^T,
//   already in registers, are the A operands of dV += P^T dO and dK += dS^T Q;
// - dQ = dS K needs all kBlockN keys of dS for each query row, held by two warpgroups: dS goes
//   through shared memory, and the warpgroups split dQ's head-dim columns.
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>
#include <cutlass/gemm/collective/builders/sm90_common.inl>  // ss_smem_selector
#include <cutlass/pipeline/sm90_pipeline.hpp>
#include <type_traits>

#include "kernels/common/seqlen_info.h"
#include "kernels/common/varlen_tile_schedule.h"  // TileCoordinates
#include "kernels/sm90/fwd_kernel_traits.h"       // kThreadsPerWarpgroup, kRowsPerMmaWarpgroup
#include "kernels/sm90/register_split.h"

namespace flash_varlen {
namespace sm90 {

using namespace cute;

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_>
struct BwdKernelTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_;  // query rows per step
    static constexpr int kBlockN = kBlockN_;  // keys per thread block
    static constexpr int kStages = kStages_;  // buffers of Q and of dO

    // Warpgroup 0 is the producer (one thread issues every TMA load); warpgroups 1.. compute,
    // each owning 64 keys of the block in S^T, dP^T, dK and dV, and half of dQ (kDqSplitsRows).
    static constexpr int kNumMmaWarpgroups = kBlockN / kRowsPerMmaWarpgroup;
    static_assert(kBlockN % kRowsPerMmaWarpgroup == 0, "consumers own whole 64-key slices");
    static_assert(kNumMmaWarpgroups == 2, "two consumer warpgroups");
    static constexpr int kNumMmaThreads = kNumMmaWarpgroups * kThreadsPerWarpgroup;
    static constexpr int kNumThreads = kNumMmaThreads + kThreadsPerWarpgroup;
    // dQ = dS K, (queries, head dim): with 64 query rows per step the warpgroups split its
    // head-dim columns; with 128 (one wgmma M extent per warpgroup) they split its rows, as
    // FlashAttention-3's d = 64 tile (hopper/flash_bwd_launch_template.h, AtomLayoutMdQ = 2).
    static constexpr bool kDqSplitsRows = kBlockM == kNumMmaWarpgroups * kRowsPerMmaWarpgroup;
    static_assert(kDqSplitsRows || kBlockM == kRowsPerMmaWarpgroup, "64 or 128 query rows");
    static_assert(kDqSplitsRows || kHeadDim % (kNumMmaWarpgroups * 8) == 0,
                  "dQ columns split evenly");
    // The order of a step's products. At 64 rows dV += P^T dO is issued as soon as P^T is
    // converted, so that it runs while dS^T is computed. At 128 rows S^T and dP^T take 64 floats
    // per thread each, and a 16-bit P^T held beside them (the dV product's operand) spilled 100
    // bytes (d = 64, nvcc 13.0, backward_plan.md): there dS^T comes first, then P^T and dS^T are
    // converted and dV is issued (FlashAttention-4's order, flash_attn/cute/flash_bwd_sm90.py,
    // with the conversion of P^T moved after dS^T).
    static constexpr bool kDvAfterDs = kBlockM > kRowsPerMmaWarpgroup;

    // setmaxnreg: per consumer thread dK and dV (2 x 64 floats at d = 128), S^T and dP^T (2 x 32
    // floats), P^T and dS^T in 16 bits (2 x 16) and dQ (32 floats) during its product:
    // FlashAttention-3's 240, which leaves the producer 24. Its whole first warp walks the tiles
    // and steps, one lane issuing the loads (flash_bwd_kernel.h), so ptxas keeps most of the walk
    // in uniform registers: walked by one thread, it spilled 36 bytes at 24 (and 40 / 232 made
    // the d = 128 local consumers spill 4), bf16.
    static constexpr int kProducerRegisters = 24;
    static constexpr int kConsumerRegisters = 240;
    static_assert(register_split_fits(kThreadsPerWarpgroup, kProducerRegisters, kConsumerRegisters,
                                      kNumMmaWarpgroups),
                  "setmaxnreg counts past what the launch gives the block (register_split.h)");

    using MmaWarpgroupsAlongM = Layout<Shape<Int<kNumMmaWarpgroups>, _1, _1>>;
    using MmaWarpgroupsAlongN = Layout<Shape<_1, Int<kNumMmaWarpgroups>, _1>>;

    // S^T = K Q^T and dP^T = V dO^T: (M, N, K) = (keys, queries, head dim), both operands in
    // shared memory with the head dim contiguous (K-major).
    using TileShapeSdP = Shape<Int<kBlockN>, Int<kBlockM>, Int<kHeadDim>>;
    using TiledMmaSdP = decltype(make_tiled_mma(
        GMMA::ss_op_selector<Element, Element, float,
                             Shape<Int<kRowsPerMmaWarpgroup>, Int<kBlockM>, Int<kHeadDim>>>(),
        MmaWarpgroupsAlongM{}));
    // dV += P^T dO and dK += dS^T Q: (keys, head dim, queries); A from registers (the 16-bit
    // P^T / dS^T), B = dO / Q read transposed (the head dim, this product's N, is contiguous:
    // MN-major).
    using TileShapeDKV = Shape<Int<kBlockN>, Int<kHeadDim>, Int<kBlockM>>;
    using TiledMmaDKV = decltype(make_tiled_mma(
        GMMA::rs_op_selector<Element, Element, float,
                             Shape<Int<kRowsPerMmaWarpgroup>, Int<kHeadDim>, Int<kBlockM>>,
                             GMMA::Major::K, GMMA::Major::MN>(),
        MmaWarpgroupsAlongM{}));
    // dQ = dS K: (queries, head dim, keys), both from shared memory: dS as written by the
    // consumers (queries contiguous: MN-major), K read transposed (head dim contiguous:
    // MN-major). Each warpgroup computes 64 rows (kDqSplitsRows) or kHeadDim / 2 columns.
    static constexpr int kDqRowsPerWarpgroup = kDqSplitsRows ? kRowsPerMmaWarpgroup : kBlockM;
    static constexpr int kDqColsPerWarpgroup =
        kDqSplitsRows ? kHeadDim : kHeadDim / kNumMmaWarpgroups;
    using TileShapeDQ = Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>;
    using TiledMmaDQ = decltype(make_tiled_mma(
        GMMA::ss_op_selector<
            Element, Element, float,
            Shape<Int<kDqRowsPerWarpgroup>, Int<kDqColsPerWarpgroup>, Int<kBlockN>>,
            GMMA::Major::MN, GMMA::Major::MN>(),
        std::conditional_t<kDqSplitsRows, MmaWarpgroupsAlongM, MmaWarpgroupsAlongN>{}));
    static_assert(size(TiledMmaSdP{}) == kNumMmaThreads && size(TiledMmaDKV{}) == kNumMmaThreads &&
                  size(TiledMmaDQ{}) == kNumMmaThreads);
    static_assert(size<1>(typename TiledMmaSdP::AtomShape_MNK{}) == kBlockM,
                  "one wgmma atom spans the query rows of S^T");
    static_assert(size<1>(typename TiledMmaDKV::AtomShape_MNK{}) == kHeadDim,
                  "one wgmma atom spans the head dim of dK, dV");

    // Shared memory. Q and dO: (queries, head dim, stage), K-major, 128-byte swizzle; also read
    // transposed, (head dim, queries, stage), as the MN-major B operand of dK and dV: the same
    // bytes, composed with a layout that swaps the first two modes.
    using SmemLayoutAtomQ = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                                     GMMA::Major::K, Element, Int<kBlockM>, Int<kHeadDim>>());
    using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtomQ{},
                                               Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
    using SmemLayoutQt = decltype(composition(
        SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{},
                                   Stride<Int<kBlockM>, _1, Int<kBlockM * kHeadDim>>{})));
    using SmemLayoutdO = SmemLayoutQ;
    using SmemLayoutdOt = SmemLayoutQt;
    // K and V: (keys, head dim), K-major; K also read transposed, (head dim, keys), as the B
    // operand of dQ.
    using SmemLayoutAtomK = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                                     GMMA::Major::K, Element, Int<kBlockN>, Int<kHeadDim>>());
    using SmemLayoutK =
        decltype(tile_to_shape(SmemLayoutAtomK{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    using SmemLayoutKt =
        decltype(composition(SmemLayoutK{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{},
                                                        Stride<Int<kBlockN>, _1>{})));
    using SmemLayoutV = SmemLayoutK;
    // dS: (queries, keys, stage) with the queries contiguous (MN-major A operand of dQ); atoms
    // laid along the queries first, CUTLASS's order for MN-major operands. Two buffers, one per
    // Q / dO stage (a row block's dS goes with its stage's index): a row block writes its dS
    // while the other warpgroup's dQ product may still read the previous one's, so that one
    // barrier over both warpgroups per row block suffices (FlashAttention-3's Stages_dS = 2,
    // hopper/mainloop_bwd_sm90_tma_gmma_ws.hpp).
    static constexpr int kDsStages = kStages;
    using SmemLayoutAtomdS =
        decltype(cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::MN, Element,
                                                                     Int<kBlockM>, Int<kBlockN>>());
    using SmemLayoutdS = decltype(tile_to_shape(SmemLayoutAtomdS{},
                                                Shape<Int<kBlockM>, Int<kBlockN>, Int<kDsStages>>{},
                                                Step<_2, _1, _3>{}));
    // The same bytes as (keys, queries, stage), as the consumers write dS^T from the accumulator
    // layout of S^T: stmatrix, 8 x 8 16-bit tiles per instruction (each key's queries are
    // contiguous).
    using SmemLayoutdSt = decltype(composition(
        SmemLayoutdS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>, Int<kDsStages>>{},
                                    Stride<Int<kBlockM>, _1, Int<kBlockM * kBlockN>>{})));
    using SmemCopyAtomdS = Copy_Atom<SM90_U32x4_STSM_N, Element>;

    // dQ staging buffers per consumer warpgroup: with two, a warpgroup stages a row block's dQ
    // part while its writer still waits, in deterministic mode, for the previous part's turn
    // (flash_bwd_kernel.h, write_dq), so the consumers run up to two row blocks ahead of the
    // turns: deterministic GQA causal rows +5 to +6% (0.85-0.86 -> 0.91 of the default speed;
    // H100, benchmarks/results/2026-12-06_h100_sm90_bwd_dq_stages.md), the default backward level.
    // 32 KB more at d = 128 (231,424 of the 232,448 bytes a block may have). The variants kernel
    // uses one of them (flash_bwd_kernel.h, kDqStages).
    static constexpr int kDqStages = 2;

    // Global tensors as the TMA descriptors see them: (rows, head dim, heads, batch); varlen
    // buffers are one batch of all rows, a tile's row coordinate its sequence's first row plus
    // its offset (as in the forward, fwd_kernel_traits.h).
    using GmemShape = Shape<int32_t, int32_t, int32_t, int32_t>;
    using GmemStride = Stride<int64_t, _1, int64_t, int64_t>;
    using TmaQ = decltype(make_tma_copy(
        SM90_TMA_LOAD{},
        make_tensor(make_gmem_ptr(static_cast<const Element*>(nullptr)), GmemShape{}, GmemStride{}),
        take<0, 2>(SmemLayoutQ{}), Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{}));
    using TmadO = TmaQ;
    using TmaK = decltype(make_tma_copy(
        SM90_TMA_LOAD{},
        make_tensor(make_gmem_ptr(static_cast<const Element*>(nullptr)), GmemShape{}, GmemStride{}),
        SmemLayoutK{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{}));
    using TmaV = TmaK;

    // A stage of Q carries the row block's LSE (log2 units), a stage of dO its D: kBlockM floats
    // each, one bulk copy on the same barrier (bwd_row_kernels.h pads them for alignment).
    static constexpr uint32_t kRowStatsBytes = kBlockM * sizeof(float);
    static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element) + kRowStatsBytes;
    static constexpr uint32_t kTmaBytesdO = kTmaBytesQ;
    static constexpr uint32_t kTmaBytesKV = 2 * kBlockN * kHeadDim * sizeof(Element);

    using PipelineQdO = cutlass::PipelineTmaAsync<kStages>;
    using PipelineState = typename cutlass::PipelineState<kStages>;

    static constexpr int kSmemAlignment = 1024;  // the 128-byte swizzle's period (forward traits)
    struct SharedStorage {
        cute::array_aligned<Element, cosize_v<SmemLayoutQ>, kSmemAlignment> q;
        cute::array_aligned<Element, cosize_v<SmemLayoutdO>, kSmemAlignment> d_o;
        cute::array_aligned<Element, cosize_v<SmemLayoutK>, kSmemAlignment> k;
        cute::array_aligned<Element, cosize_v<SmemLayoutV>, kSmemAlignment> v;
        cute::array_aligned<Element, cosize_v<SmemLayoutdS>, kSmemAlignment> ds;
        // dQ of the last kDqStages row blocks, float32, for the bulk reduce-adds
        // (dq_accumulator.h): stage s holds parts s, s + kDqStages, ... of each warpgroup.
        cute::array_aligned<float, kBlockM * kHeadDim * kDqStages, 128> dq;
        cute::array_aligned<float, kBlockM * kStages, 128> lse_log2;  // (row, stage)
        cute::array_aligned<float, kBlockM * kStages, 128> d;
        alignas(16) cutlass::arch::ClusterTransactionBarrier kv_full;  // K and V landed
        alignas(16) cutlass::arch::ClusterBarrier kv_empty;  // the consumers are done with them
        alignas(16) typename PipelineQdO::SharedStorage pipeline_q;
        alignas(16) typename PipelineQdO::SharedStorage pipeline_do;
        // The tile whose K and V kv_full announces (flash_bwd_kernel.h); a key block of -1: no
        // tile left.
        TileCoordinates tile;
        SeqlenInfo tile_seq;
        // Where each consumer warpgroup's staged dQ part goes, for the dQ writer warp
        // (flash_bwd_kernel.h, write_dq).
        struct DqAdd {
            float* rows;       // the part's first float in the accumulator
            int* turn;         // deterministic mode's counter (dq_accumulator.h), else nullptr
            int turns_before;  // the count the turn waits for
            int last;          // nonzero: the consumers are done, nothing is staged
        };
        DqAdd dq_add[kDqStages][kNumMmaWarpgroups];
        // Per dQ stage and consumer warpgroup: its staging part is free (the writer's last add
        // from it has read it); the next part is staged there and dq_add says where it goes.
        cutlass::arch::ClusterBarrier dq_free[kDqStages][kNumMmaWarpgroups];
        cutlass::arch::ClusterBarrier dq_staged[kDqStages][kNumMmaWarpgroups];
    };
    static constexpr int kSmemBytes = int(sizeof(SharedStorage));
    static constexpr int kMaxSmemBytes = 227 * 1024;
    static_assert(kSmemBytes <= kMaxSmemBytes, "tile does not fit shared memory");
};

}  // namespace sm90
}  // namespace flash_varlen
