// One warp's acc += A * B^T with A already in registers (Q for S = Q K^T, P for O += P V) and B
// read from shared memory by ldmatrix into a two-deep register ring: step k + 1's ldmatrix is
// issued before step k's MMAs, and only two steps of B are ever live. (A whole B fragment of a
// 64-key slice is 128 registers at d = 128; letting the compiler keep it all pushed the
// row-split kernel past 255 registers into spills.)
#pragma once

#include <cute/tensor.hpp>

namespace flash_varlen {
namespace decode {

using namespace cute;

// rA: (MMA, MMA_M, K steps) registers; sB: the thread's ldmatrix partition (CPY, CPY_N, K
// steps) of B in shared memory; kNColumns: B's rows (the MMA's N).
template <int kNColumns, typename WarpMma, typename Acc, typename RegA, typename SmemB,
          typename CopyB, typename ThrCopyB>
__device__ __forceinline__ void gemm_a_in_registers(const WarpMma& mma, Acc& acc, const RegA& rA,
                                                    const SmemB& sB, const CopyB& copy_b,
                                                    const ThrCopyB& thr_copy_b) {
    constexpr int kSteps = decltype(size<2>(rA))::value;
    constexpr int kRing = kSteps < 2 ? kSteps : 2;
    constexpr int kMmaK = 16;
    Tensor rB = make_tensor<typename RegA::value_type>(
        partition_shape_B(mma, Shape<Int<kNColumns>, Int<kMmaK * kRing>>{}));  // (MMA, N, ring)
    Tensor rB_view = thr_copy_b.retile_D(rB);
    copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
    CUTE_UNROLL
    for (int k = 0; k < kSteps; ++k) {
        if (k + 1 < kSteps) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, (k + 1) % kRing));
        cute::gemm(mma, rA(_, _, k), rB(_, _, k % kRing), acc);
    }
}

}  // namespace decode
}  // namespace flash_varlen
