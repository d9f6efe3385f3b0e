// The two memory-bound steps around the main backward kernel, one warp per (row, head):
//  - preprocess: D = rowsum(dO * O) - dLSE per query row, the term every dS = P * (dP - D) needs
//    (rowsum(dO * O) = rowsum(P * dP), the softmax Jacobian's diagonal correction);
//  - convert: dQ = softmax_scale * dQ_accum, float32 to the input dtype.
// A warp covers a row of up to 256 elements with one 16-byte access per lane.
#pragma once

#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

#include <cute/tensor.hpp>

#include "flash_params.h"
#include "seqlen_info.h"

namespace flash_varlen {

constexpr int kRowKernelWarps = 4;
constexpr int kRowKernelRowsPerBlock = 64;
constexpr int kElemsPerLane = 8;  // 16 bytes of fp16/bf16
constexpr int kWarpSize = 32;

constexpr int kLaneAccessBytes = 16;

// AlignedArray, not Array: the alignment lets the compiler emit one 16-byte access per vector.
template <typename Element>
using LaneVector = cutlass::AlignedArray<Element, kElemsPerLane, kLaneAccessBytes>;
using LaneAccumVector = cutlass::AlignedArray<float, kElemsPerLane, kLaneAccessBytes>;

__device__ __forceinline__ float warp_allreduce_sum(float x) {
    CUTE_UNROLL
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        x += __shfl_xor_sync(0xffffffff, x, offset);
    }
    return x;
}

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kRowKernelWarps * kWarpSize)
    flash_bwd_preprocess_kernel(const __grid_constant__ FlashBwdParams params) {
    static_assert(kHeadDim <= kWarpSize * kElemsPerLane, "one access per lane covers a row");
    const int batch = blockIdx.y;
    const int head = blockIdx.z;
    const SeqlenInfo seq(params, batch);
    const int lane = threadIdx.x % kWarpSize;
    const int col = lane * kElemsPerLane;
    const bool lane_active = col < params.head_dim;
    const int64_t row_stats_offset =
        head * params.lse_head_stride + seq.lse_offset(params.lse_batch_stride, batch);
    const Element* do_base = static_cast<const Element*>(params.do_ptr) +
                             seq.q_offset(params.do_batch_stride, params.do_row_stride, batch) +
                             head * params.do_head_stride + col;
    const Element* o_base = static_cast<const Element*>(params.o_ptr) +
                            seq.q_offset(params.o_batch_stride, params.o_row_stride, batch) +
                            head * params.o_head_stride + col;
    const int row_end = min(seq.seqlen_q, int(blockIdx.x + 1) * kRowKernelRowsPerBlock);
    for (int row = blockIdx.x * kRowKernelRowsPerBlock + threadIdx.x / kWarpSize; row < row_end;
         row += kRowKernelWarps) {
        float dot = 0.f;
        if (lane_active) {
            const auto d_out =
                *reinterpret_cast<const LaneVector<Element>*>(do_base + row * params.do_row_stride);
            const auto out =
                *reinterpret_cast<const LaneVector<Element>*>(o_base + row * params.o_row_stride);
            CUTE_UNROLL
            for (int i = 0; i < kElemsPerLane; ++i) dot += float(d_out[i]) * float(out[i]);
        }
        dot = warp_allreduce_sum(dot);
        if (lane == 0) {
            const float lse_grad = params.softmax_lse_grad_ptr == nullptr
                                       ? 0.f
                                       : params.softmax_lse_grad_ptr[row_stats_offset + row];
            params.softmax_d_ptr[row_stats_offset + row] = dot - lse_grad;
        }
    }
}

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kRowKernelWarps * kWarpSize)
    flash_bwd_convert_dq_kernel(const __grid_constant__ FlashBwdParams params) {
    static_assert(kHeadDim <= kWarpSize * kElemsPerLane, "one access per lane covers a row");
    const int batch = blockIdx.y;
    const int head = blockIdx.z;
    const SeqlenInfo seq(params, batch);
    const int col = (threadIdx.x % kWarpSize) * kElemsPerLane;
    if (col >= params.head_dim) return;
    const int64_t accum_first_row =
        seq.is_varlen ? int64_t(seq.q_start) : int64_t(batch) * params.seqlen_q;
    const float* accum_base = params.dq_accum_ptr +
                              accum_first_row * params.dq_accum_row_stride + head * kHeadDim +
                              col;
    Element* dq_base = static_cast<Element*>(params.dq_ptr) +
                       seq.q_offset(params.dq_batch_stride, params.dq_row_stride, batch) +
                       head * params.dq_head_stride + col;
    cutlass::NumericArrayConverter<Element, float, kElemsPerLane> convert;
    const int row_end = min(seq.seqlen_q, int(blockIdx.x + 1) * kRowKernelRowsPerBlock);
    for (int row = blockIdx.x * kRowKernelRowsPerBlock + threadIdx.x / kWarpSize; row < row_end;
         row += kRowKernelWarps) {
        LaneAccumVector accum = *reinterpret_cast<const LaneAccumVector*>(
            accum_base + row * params.dq_accum_row_stride);
        CUTE_UNROLL
        for (int i = 0; i < kElemsPerLane; ++i) accum[i] *= params.softmax_scale;
        const cutlass::Array<Element, kElemsPerLane> dq = convert(accum);
        *reinterpret_cast<LaneVector<Element>*>(dq_base + row * params.dq_row_stride) =
            *reinterpret_cast<const LaneVector<Element>*>(&dq);
    }
}

}  // namespace flash_varlen
