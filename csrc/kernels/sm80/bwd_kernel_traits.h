// Compile-time shape of the sm80-family backward kernel: tile sizes, the three tiled MMAs (one per
// product shape), shared-memory layouts with their transposed views, and copy atoms.
#pragma once

#include <cutlass/numeric_types.h>

#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/sm80/bwd_tile_shape.h"
#include "kernels/sm80/dq_semaphore.h"

namespace flash_varlen {
namespace sm80 {

using namespace cute;

// kWarpsAlongM{SdP,dQ} and kWarpsAlongNdKV split the warps over the first mode of each product:
// S and dP are (kBlockM, kBlockN), dK and dV are (kBlockN, kHeadDim), dQ is (kBlockM, kHeadDim).
// kQStages = 2 double-buffers Q so that the next row block's Q loads behind three GEMMs.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_,
          int kWarpsAlongMSdP, int kWarpsAlongNdKV, int kWarpsAlongMdQ, int kQStages_>
struct BwdKernelTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kNWarps = kNWarps_;
    static constexpr int kNThreads = kNWarps * 32;
    static constexpr int kQStages = kQStages_;
    static_assert(kHeadDim % 32 == 0, "head-dim buckets are multiples of 32");
    static_assert(kBlockM % kSemaphoreRows == 0, "dq_semaphore slots assume this granularity");
    static_assert(kQStages == 1 || kQStages == 2, "Q is single- or double-buffered");

    using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                       MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                       MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
    template <int kWarpsAlongFirst>
    using WarpGridMma =
        TiledMMA<MmaAtom, Layout<Shape<Int<kWarpsAlongFirst>, Int<kNWarps / kWarpsAlongFirst>, _1>>,
                 Tile<Int<16 * kWarpsAlongFirst>, Int<16 * (kNWarps / kWarpsAlongFirst)>, _16>>;
    using TiledMmaSdP = WarpGridMma<kWarpsAlongMSdP>;
    using TiledMmadKV = WarpGridMma<kWarpsAlongNdKV>;
    using TiledMmadQ = WarpGridMma<kWarpsAlongMdQ>;

    // Rows stored in 64-element (128-byte) chunks when the width allows, XOR-swizzled in 16-byte
    // units so that cp.async row writes and ldmatrix reads (plain and transposed) avoid bank
    // conflicts, as in the forward kernel.
    template <int kWidth>
    using SwizzledAtom =
        decltype(composition(Swizzle<(kWidth % 64 == 0 ? 3 : 2), 3, 3>{},
                             Layout<Shape<_8, Int<(kWidth % 64 == 0 ? 64 : 32)>>,
                                    Stride<Int<(kWidth % 64 == 0 ? 64 : 32)>, _1>>{}));
    template <int kRows, int kCols>
    using SwizzledTile =
        decltype(tile_to_shape(SwizzledAtom<kCols>{}, Shape<Int<kRows>, Int<kCols>>{}));
    // The transpose of a (kRows, kCols) tile, read with ldmatrix.trans, and its register shape.
    template <typename SmemLayout, int kRows, int kCols>
    using Transposed = decltype(composition(
        SmemLayout{}, make_layout(Shape<Int<kCols>, Int<kRows>>{}, GenRowMajor{})));
    template <typename SmemLayout, int kRows, int kCols>
    using TransposedNoSwizzle =
        decltype(get_nonswizzle_portion(Transposed<SmemLayout, kRows, kCols>{}));

    using SmemLayoutQdO = SwizzledTile<kBlockM, kHeadDim>;  // Q and dO: (BM, D)
    using SmemLayoutQdOt = Transposed<SmemLayoutQdO, kBlockM, kHeadDim>;
    using SmemLayoutQdOtNoSwizzle = TransposedNoSwizzle<SmemLayoutQdO, kBlockM, kHeadDim>;
    using SmemLayoutKV = SwizzledTile<kBlockN, kHeadDim>;  // K and V: (BN, D); also dK, dV out
    using SmemLayoutKt = Transposed<SmemLayoutKV, kBlockN, kHeadDim>;
    using SmemLayoutKtNoSwizzle = TransposedNoSwizzle<SmemLayoutKV, kBlockN, kHeadDim>;
    using SmemLayoutPdS = SwizzledTile<kBlockM, kBlockN>;  // P and dS: (BM, BN)
    using SmemLayoutPdSt = Transposed<SmemLayoutPdS, kBlockM, kBlockN>;
    using SmemLayoutPdStNoSwizzle = TransposedNoSwizzle<SmemLayoutPdS, kBlockM, kBlockN>;

    using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
    using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
    // Register accumulators (P, dS, dK, dV) to shared memory, as wide as the layout allows.
    using SmemCopyAtomStore = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

    static constexpr int kGmemElemsPerAccess = 16 / sizeof(Element);
    static constexpr int kGmemRowChunk = kHeadDim % 64 == 0 ? 64 : 32;
    static constexpr int kGmemThreadsPerRow = kGmemRowChunk / kGmemElemsPerAccess;
    static_assert(kNThreads % kGmemThreadsPerRow == 0, "threads must tile the rows");
    using GmemThreadLayout =
        Layout<Shape<Int<kNThreads / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>,
               Stride<Int<kGmemThreadsPerRow>, _1>>;
    using GmemValueLayout = Layout<Shape<_1, Int<kGmemElemsPerAccess>>>;
    using GmemTiledCopyLoad = decltype(make_tiled_copy(
        Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>, Element>{}, GmemThreadLayout{},
        GmemValueLayout{}));
    using GmemTiledCopyStore =
        decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{},
                                 GmemThreadLayout{}, GmemValueLayout{}));

    static constexpr int kSmemElemsQdO = kBlockM * kHeadDim;
    static constexpr int kSmemElemsKV = kBlockN * kHeadDim;
    static constexpr int kSmemElemsPdS = kBlockM * kBlockN;
    // Per Q stage, the row block's LSE and D (float32), staged with Q by cp.async.
    static constexpr int kSmemRowStatsFloats = 2 * kBlockM;
    static_assert(kNThreads >= kSmemRowStatsFloats, "one thread copies one row statistic");
    // Q stages, dO, K, V, P, dS, then the row statistics of each stage.
    static constexpr int kSmemBytes =
        ((kQStages + 1) * kSmemElemsQdO + 2 * kSmemElemsKV + 2 * kSmemElemsPdS) *
            int(sizeof(Element)) +
        kQStages * kSmemRowStatsFloats * int(sizeof(float));
    // On Hopper and later, plus a float32 copy of one dQ tile for the bulk adds (dq_accum.h).
    static constexpr int kSmemDqStagingBytes = kBlockM * kHeadDim * int(sizeof(float));
};

// Per head-dim bucket: FlashAttention-2's (Dao, 2023) sm80 warp layouts for GPUs with large
// shared memory (H100: 227 KB per block), with the tile sizes of bwd_tile_shape. Every one keeps
// the dK and dV accumulators of a whole key block in registers across the loop over query blocks.
// d = 256 keeps Q single-buffered so that it also fits the 163 KB of an A100.
template <typename Element, int kHeadDim>
struct BwdTileConfig;

template <typename Element, int kHeadDim, int kWarpsAlongMSdP, int kWarpsAlongNdKV,
          int kWarpsAlongMdQ, int kQStages>
using BwdTraitsFor = BwdKernelTraits<Element, kHeadDim, bwd_tile_shape(kHeadDim).block_m,
                                     bwd_tile_shape(kHeadDim).block_n, 8, kWarpsAlongMSdP,
                                     kWarpsAlongNdKV, kWarpsAlongMdQ, kQStages>;

template <typename Element>
struct BwdTileConfig<Element, 64> {
    using Traits = BwdTraitsFor<Element, 64, 4, 4, 4, 2>;
};
template <typename Element>
struct BwdTileConfig<Element, 96> {
    using Traits = BwdTraitsFor<Element, 96, 2, 4, 4, 2>;
};
template <typename Element>
struct BwdTileConfig<Element, 128> {
    using Traits = BwdTraitsFor<Element, 128, 2, 4, 2, 2>;
};
template <typename Element>
struct BwdTileConfig<Element, 192> {
    using Traits = BwdTraitsFor<Element, 192, 4, 2, 2, 2>;
};
template <typename Element>
struct BwdTileConfig<Element, 256> {
    using Traits = BwdTraitsFor<Element, 256, 4, 2, 2, 1>;
};

}  // namespace sm80
}  // namespace flash_varlen
