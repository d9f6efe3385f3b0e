// Compile-time shape of the sm80-family forward kernel: tile sizes, MMA, shared-memory layouts and
// copy atoms, derived from (element type, head-dim bucket, block sizes, warps).
#pragma once

#include <cutlass/numeric_types.h>

#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>

#include "kernels/common/swizzled_rows.h"

namespace flash_varlen {
namespace sm80 {

using namespace cute;

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdKernelTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kNWarps = kNWarps_;
    static constexpr int kNThreads = kNWarps * 32;
    static_assert(kHeadDim % 32 == 0, "head-dim buckets are multiples of 32");
    static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole 16-row MMA tiles");

    using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                       MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                       MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
    // Warps are stacked along M only: every row of S lives inside one warp, so the softmax needs
    // only quad shuffles, never shared memory.
    using TiledMma =
        TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>, Tile<Int<16 * kNWarps>, _16, _16>>;

    // Shared-memory rows in swizzled chunks (common/swizzled_rows.h).
    static constexpr int kSmemRowChunk = SwizzledRows<kHeadDim>::kRowChunk;
    using SmemLayoutAtom = typename SwizzledRows<kHeadDim>::Atom;
    using SmemLayoutQ =
        decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    using SmemLayoutKV =
        decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    // V read as V^T (head_dim, kBlockN) for O += P V, without moving it: ldmatrix.trans does it.
    using SmemLayoutVt = decltype(composition(
        SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
    // Register fragments are sized from a layout without the swizzle (only its shape matters).
    using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));
    // The output tile is staged through the shared memory of Q, which is dead by then.
    using SmemLayoutO = SmemLayoutQ;

    using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
    using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
    using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

    // Global memory is read with 16-byte cp.async (zero-filling rows and columns past the ends)
    // and written with 16-byte stores: kGmemThreadsPerRow threads cover one kSmemRowChunk.
    static constexpr int kGmemElemsPerAccess = 16 / sizeof(Element);
    static constexpr int kGmemThreadsPerRow = kSmemRowChunk / kGmemElemsPerAccess;
    static_assert(kNThreads % kGmemThreadsPerRow == 0, "threads must tile the rows");
    using GmemThreadLayout =
        Layout<Shape<Int<kNThreads / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>,
               Stride<Int<kGmemThreadsPerRow>, _1>>;
    using GmemValueLayout = Layout<Shape<_1, Int<kGmemElemsPerAccess>>>;
    using GmemTiledCopyQKV = decltype(make_tiled_copy(
        Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>, Element>{}, GmemThreadLayout{},
        GmemValueLayout{}));
    using GmemTiledCopyO =
        decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{},
                                 GmemThreadLayout{}, GmemValueLayout{}));

    static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kHeadDim * int(sizeof(Element));
};

// Tile shapes per head-dim bucket. These follow the configurations FlashAttention-2 settled on
// for sm80/sm90 (Dao, 2023): 128-row query blocks, 4 warps up to d = 128 and 8 warps above, where
// the accumulator of a 128 x d tile no longer fits 4 warps' registers.
template <typename Element, int kHeadDim>
struct FwdTileConfig;

template <typename Element>
struct FwdTileConfig<Element, 64> {
    using Traits = FwdKernelTraits<Element, 64, 128, 128, 4>;
};
template <typename Element>
struct FwdTileConfig<Element, 96> {
    using Traits = FwdKernelTraits<Element, 96, 128, 64, 4>;
};
template <typename Element>
struct FwdTileConfig<Element, 128> {
    using Traits = FwdKernelTraits<Element, 128, 128, 64, 4>;
};
template <typename Element>
struct FwdTileConfig<Element, 192> {
    using Traits = FwdKernelTraits<Element, 192, 128, 64, 8>;
};
template <typename Element>
struct FwdTileConfig<Element, 256> {
    using Traits = FwdKernelTraits<Element, 256, 128, 64, 8>;
};

}  // namespace sm80
}  // namespace flash_varlen
