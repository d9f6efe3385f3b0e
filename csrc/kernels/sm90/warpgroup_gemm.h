// One warpgroup GEMM: issues the wgmma instructions of a tile product and commits them as one
// group, without waiting; the caller waits (warpgroup_wait<N>) where it needs the result, so
// that softmax work can run while the tensor cores do.
#pragma once

#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/tensor.hpp>

namespace flash_varlen {
namespace sm90 {

using namespace cute;

// acc (+)= A B over every k-slice of the operands. kZeroInit: acc = A B (the first slice
// overwrites the accumulator instead of reading it, so acc need not be cleared). A is either a
// shared-memory descriptor fragment (SS) or registers (RS); B is always a descriptor fragment.
template <bool kZeroInit, typename TiledMma, typename FragA, typename FragB, typename FragC>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& tiled_mma, FragA& frag_a,
                                               const FragB& frag_b, FragC& acc) {
    constexpr bool kAInRegisters =
        !cute::is_base_of<GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value;
    // The register fences keep the compiler from moving reads or writes of the operands in
    // registers across the asynchronous instructions that use them.
    if constexpr (kAInRegisters) warpgroup_fence_operand(frag_a);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    if constexpr (kZeroInit) tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(frag_a); ++k) {
        cute::gemm(tiled_mma, frag_a(_, _, k), frag_b(_, _, k), acc);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_fence_operand(acc);
    if constexpr (kAInRegisters) warpgroup_fence_operand(frag_a);
}

}  // namespace sm90
}  // namespace flash_varlen
