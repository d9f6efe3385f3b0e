// The two GEMMs of the attention main loop, with the shared-memory to register loads of step k + 1
// issued before the MMAs of step k, so ldmatrix latency hides behind tensor-core work.
#pragma once

#include <cute/tensor.hpp>

namespace flash_varlen {
namespace sm80 {

using namespace cute;

// acc += A * B^T with both operands in shared memory (S = Q K^T).
// rA, rB: this thread's register fragments (MMA, MMA_M|N, MMA_K); sA, sB: its shared-memory
// partitions for the ldmatrix copies (CPY, CPY_M|N, CPY_K).
template <typename TiledMma, typename Acc, typename RegA, typename RegB, typename SmemA,
          typename SmemB, typename TiledCopyA, typename TiledCopyB, typename ThrCopyA,
          typename ThrCopyB>
__device__ void gemm_smem_smem(const TiledMma& tiled_mma, Acc& acc, RegA& rA, RegB& rB,
                               const SmemA& sA, const SmemB& sB, const TiledCopyA& copy_a,
                               const TiledCopyB& copy_b, const ThrCopyA& thr_copy_a,
                               const ThrCopyB& thr_copy_b) {
    Tensor rA_view = thr_copy_a.retile_D(rA);  // (CPY, CPY_M, CPY_K)
    Tensor rB_view = thr_copy_b.retile_D(rB);  // (CPY, CPY_N, CPY_K)
    constexpr int kSteps = decltype(size<2>(rA))::value;
    copy(copy_a, sA(_, _, 0), rA_view(_, _, 0));
    copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
    CUTE_UNROLL
    for (int k = 0; k < kSteps; ++k) {
        if (k + 1 < kSteps) {
            copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
            copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
        }
        cute::gemm(tiled_mma, rA(_, _, k), rB(_, _, k), acc);
    }
}

// acc += A * B^T with A already in registers (O += P V) and B in shared memory.
template <typename TiledMma, typename Acc, typename RegA, typename RegB, typename SmemB,
          typename TiledCopyB, typename ThrCopyB>
__device__ void gemm_reg_smem(const TiledMma& tiled_mma, Acc& acc, const RegA& rA, RegB& rB,
                              const SmemB& sB, const TiledCopyB& copy_b,
                              const ThrCopyB& thr_copy_b) {
    Tensor rB_view = thr_copy_b.retile_D(rB);  // (CPY, CPY_N, CPY_K)
    constexpr int kSteps = decltype(size<2>(rA))::value;
    copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
    CUTE_UNROLL
    for (int k = 0; k < kSteps; ++k) {
        if (k + 1 < kSteps) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
        cute::gemm(tiled_mma, rA(_, _, k), rB(_, _, k), acc);
    }
}

}  // namespace sm80
}  // namespace flash_varlen
