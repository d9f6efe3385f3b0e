// Tile shapes of the sm90-family forward per (head-dim bucket, local mask).
//
// Taken from FlashAttention-3's tile_size_fwd_sm90 (Dao-AILab/flash-attention hopper/tile_size.h,
// 16-bit inputs, P kept in registers for O += P V, softmax of one block overlapped with the
// GEMMs of the next inside each warpgroup). Its reasoning, restated:
// - kBlockN as wide as registers and shared memory allow: every key block costs a fixed amount
//   of synchronisation and softmax bookkeeping, and wider blocks amortise it.
// - d = 128: 128 x 176 uses 32 KB (Q) + 2 x 2 x 44 KB (K, V, two stages) = 208 KB of the 227 KB,
//   and 2 consumer warpgroups at 240 registers hold S (88), P (44) and O (64 floats) per thread.
//   Local masks (causal, windows) take 128 x 128: their diagonal blocks are masked work, and a
//   narrower block wastes less of it.
// - d = 64: 192-row tiles with 3 consumer warpgroups (O is small, so more rows per K/V load),
//   at 160 registers each. FA3 takes 192 x 192 without a local mask and 192 x 128 with one. Here
//   192 x 192 spills (ptxas, bf16 sm_90a: 808 bytes of spill stores; per thread S is 96 floats,
//   P 48 registers and O 32 floats, all live while the GEMMs run), so both use 192 x 128
//   (12 bytes of spills, one register in the left-edge loop of the local kernel). FA3 also notes
//   that 192-row tiles lose at short sequences to tile quantisation; the varlen scheduler is
//   where that gets measured.
// - d = 96: FA3 runs 192 x 144 with P through shared memory, which this kernel does not have; with
//   P in registers, d = 128's tiles fit (per thread S 88 + P 44 + O 48 registers; 156 KB of
//   shared memory).
// - d = 192: 128 x 112 (128 x 96 with a local mask); d = 256: 128 x 80 (128 x 64 local). O grows
//   with the head dim (96 and 128 floats per thread), so kBlockN shrinks until S, P and O fit
//   240 registers, and Q plus two stages of K and V fit shared memory (216 KB and 224 KB). FA3
//   does not take turns between the warpgroups at these head dims (flash_fwd_kernel.h).
// Stages: 2 for K and 2 for V (FA3's choice on sm90: a third stage does not fit d = 128 x 176).
// These are FA3's measured choices on H100, not ours: they must be re-measured on the H200 with
// our kernel (the issue asks for a table chosen by measurement).
#pragma once

#include "kernels/sm90/fwd_kernel_traits.h"

namespace flash_varlen {
namespace sm90 {

constexpr int kFwdStages = 2;

template <typename Element, int kHeadDim, bool kIsLocal>
struct FwdTileConfig;

template <typename Element, bool kIsLocal>
struct FwdTileConfig<Element, 64, kIsLocal> {
    using Traits = FwdKernelTraits<Element, 64, 192, 128, kFwdStages>;
};

template <typename Element, bool kIsLocal>
struct FwdTileConfig<Element, 96, kIsLocal> {
    using Traits = FwdKernelTraits<Element, 96, 128, kIsLocal ? 128 : 176, kFwdStages>;
};

template <typename Element, bool kIsLocal>
struct FwdTileConfig<Element, 128, kIsLocal> {
    using Traits = FwdKernelTraits<Element, 128, 128, kIsLocal ? 128 : 176, kFwdStages>;
};

template <typename Element, bool kIsLocal>
struct FwdTileConfig<Element, 192, kIsLocal> {
    using Traits = FwdKernelTraits<Element, 192, 128, kIsLocal ? 96 : 112, kFwdStages>;
};

template <typename Element, bool kIsLocal>
struct FwdTileConfig<Element, 256, kIsLocal> {
    using Traits = FwdKernelTraits<Element, 256, 128, kIsLocal ? 64 : 80, kFwdStages>;
};

}  // namespace sm90
}  // namespace flash_varlen
