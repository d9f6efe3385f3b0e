// Compile-time shape of the decode kernel: tiles, the per-warp MMA, shared-memory layouts and
// the global-load geometry, from (element type, head-dim bucket, warps along the query rows).
//
// Why mma.sync and not wgmma or FMA. A CTA reads each K and V element once and uses it for
// every query row of its tile: rows = (nheads / nheads_k) * seqlen_q, 4 to 64 in the target
// workloads (GQA 32/8, seqlen_q 1..16). That is 2 * rows flops per 2-byte element, 4 to 64
// flop/byte. At the 4.3 TB/s the H200 copies, 4 flop/byte (one token, GQA 4) needs 17 TFLOP/s,
// which even FMA could give (67 TFLOP/s fp32), but 64 flop/byte (16 tokens) needs 275 TFLOP/s,
// out of FMA's reach and under half of what mma.sync sustains on Hopper (the sm80 family's
// forward runs at 350+ TFLOP/s with the softmax in the loop). wgmma needs 64-row warpgroup tiles
// and buys throughput the kernel cannot use: the bound is HBM. So: mma.sync m16n8k16, which
// also runs on Ampere and Ada, with one 16-row MMA tile per warp.
#pragma once

#include <cutlass/numeric_types.h>

#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>

#include "kernels/common/swizzled_rows.h"

namespace flash_varlen {
namespace decode {

using namespace cute;

// kWarpsM: warps along the query rows. 1 for up to 16 rows (one token of GQA up to 16, or a few
// tokens of GQA 4): the 4 warps split each key block instead, every warp running its own online
// softmax over its quarter of the keys, merged once at the end through shared memory
// (FlashDecoding's split, inside the CTA). 4 for up to 64 rows (speculative decoding: 16
// tokens of GQA 4): each warp owns 16 rows and all keys, as in a prefill tile. More rows run
// several row blocks, each reading the same K/V (from L2 when they run together).
template <typename Element_, int kHeadDim_, int kWarpsM_>
struct DecodeKernelTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kNWarps = 4;
    static constexpr int kNThreads = kNWarps * 32;
    static constexpr int kWarpsM = kWarpsM_;
    static constexpr int kWarpsN = kNWarps / kWarpsM;
    static constexpr int kMmaRows = 16;  // rows of one m16n8k16 tile
    static constexpr int kBlockM = kMmaRows * kWarpsM;
    // Keys per pipeline stage: 64 keys of K and V are 32 KB at d = 128.
    static constexpr int kBlockN = 64;
    static constexpr int kWarpKeys = kBlockN / kWarpsN;  // each warp's slice of a stage
    // A warp works through its slice in steps of at most 32 keys, each a full online-softmax
    // update: the scores of a 64-key step (32 accumulators, 16 registers of P and a 64-key B
    // ring) pushed the row-split kernel past 255 registers into spills at d = 128.
    static constexpr int kStepKeys = kWarpKeys < 32 ? kWarpKeys : 32;
    static constexpr int kStepsPerWarp = kWarpKeys / kStepKeys;
    static_assert(kStepKeys % 16 == 0, "a step's keys are the K dim of whole P V MMAs");
    // Three stages: two blocks in flight while one is computed. With 2 CTAs per SM (d = 128:
    // 3 x 32 KB + Q) that is 128 KB of loads in flight per SM; Little's law asks for about 33 KB
    // (4.3 TB/s / 132 SMs = 33 B/ns, times about 1 us of loaded HBM latency).
    static constexpr int kStages = 3;

    using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                       MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                       MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
    // One warp's MMA over 16 rows; N = 16 so that one ldmatrix.x4 feeds two n8 atoms.
    using WarpMma = TiledMMA<MmaAtom, Layout<Shape<_1, _1, _1>>, Tile<_16, _16, _16>>;

    // Shared-memory rows in swizzled chunks, as in the sm80 family (common/swizzled_rows.h).
    using SmemLayoutAtom = typename SwizzledRows<kHeadDim>::Atom;
    using SmemLayoutQ =
        decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    using SmemLayoutKV = decltype(tile_to_shape(
        SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
    // V read as V^T (head_dim, keys, stage) for O += P V: ldmatrix.trans transposes on the way.
    using SmemLayoutVt = decltype(composition(
        SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{},
                                    make_stride(Int<kBlockN>{}, _1{}, Int<kBlockN * kHeadDim>{}))));

    using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
    using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;

    // Global loads: 16-byte vectors, a row of the head dim covered by kVectorsPerRow threads;
    // the CTA covers kRowsPerPass rows per pass.
    static constexpr int kElemsPerVector = 16 / int(sizeof(Element));
    static constexpr int kVectorsPerRow = kHeadDim / kElemsPerVector;
    static_assert(kNThreads % kVectorsPerRow == 0, "threads must tile the rows");
    static constexpr int kRowsPerPass = kNThreads / kVectorsPerRow;
    static constexpr int kKeyPasses = kBlockN / kRowsPerPass;  // rows of a stage per thread
    static constexpr int kQueryPasses = cute::ceil_div(kBlockM, kRowsPerPass);

    // The epilogue merges the warps' key slices in float32 through shared memory (aliasing the
    // pipeline, dead by then); rows padded by 4 floats against bank conflicts of the fragment
    // stores, keeping 16-byte alignment for the vector reads.
    static constexpr int kReduceRowStride = kHeadDim + 4;
    static constexpr int kReduceFloats =
        kWarpsN * kBlockM * kReduceRowStride + 2 * kWarpsN * kBlockM;

    static constexpr int kSmemBytesQ = kBlockM * kHeadDim * int(sizeof(Element));
    static constexpr int kSmemBytesKV = 2 * kStages * kBlockN * kHeadDim * int(sizeof(Element));
    static constexpr int kSmemBytes =
        cute::max(kSmemBytesQ + kSmemBytesKV, kReduceFloats* int(sizeof(float)));
};

}  // namespace decode
}  // namespace flash_varlen
