// The memory-bound step before the main backward kernel. Per (row block, head) of each sequence,
// with the main kernel's row blocks:
//  - D = rowsum(dO * O) - dLSE per query row, the term every dS = P * (dP - D) needs
//    (rowsum(dO * O) = rowsum(P * dP), the softmax Jacobian's diagonal correction), with one
//    16-byte access per lane and row; with attention sinks also each row's term of the sink's
//    gradient, -exp(sink - lse) * D;
//  - zeroing the row block's tile of the dQ accumulator (dq_accum.h), which the main kernel's key
//    blocks then add into. Done here rather than by a memset of the whole accumulator: one launch
//    fewer, and the slack rows between sequences' tiles are never touched (FlashAttention-2
//    clears its accumulator in the same pass).
#pragma once

#include <cutlass/array.h>

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/padded_row_blocks.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/sm80/dq_accum.h"

namespace flash_varlen {
namespace sm80 {

constexpr int kPreprocessWarps = 4;
constexpr int kElemsPerLane = 8;  // 16 bytes of fp16/bf16
constexpr int kWarpSize = 32;
constexpr int kPreprocessThreads = kPreprocessWarps * kWarpSize;

constexpr int kLaneAccessBytes = 16;

// AlignedArray, not Array: the alignment lets the compiler emit one 16-byte access per vector.
template <typename Element>
using LaneVector = cutlass::AlignedArray<Element, kElemsPerLane, kLaneAccessBytes>;

// Sum over groups of kLanes neighbouring lanes (a power of two); every lane gets its group's sum.
template <int kLanes>
__device__ __forceinline__ float lane_group_sum(float x) {
    CUTE_UNROLL
    for (int offset = kLanes / 2; offset > 0; offset /= 2) {
        x += __shfl_xor_sync(0xffffffff, x, offset);
    }
    return x;
}

// Grid: one padded row block of one head per thread block (PaddedRows::row_block_grid),
// kPreprocessWarps warps.
template <typename Traits>
__global__ void __launch_bounds__(kPreprocessThreads)
    flash_bwd_preprocess_kernel(const __grid_constant__ FlashBwdParams params) {
    using Element = typename Traits::Element;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kHeadDim = Traits::kHeadDim;
    static_assert(kHeadDim <= kWarpSize * kElemsPerLane, "one access per lane covers a row");
    const PaddedRowBlock<kBlockM> block(params);
    if (!block.has_rows()) return;
    const int m_block = block.query0 / kBlockM;
    const int batch = block.batch;
    const int head = block.head;
    const SeqlenInfo& seq = block.seq;

    float4* accum_tile =
        reinterpret_cast<float4*>(dq_accum_tile<Traits>(params, seq, batch, head, m_block));
    constexpr int kTileVectors = kBlockM * kHeadDim / kDqAccumVector;
    static_assert(kTileVectors % kPreprocessThreads == 0, "every thread clears the same number");
    CUTE_UNROLL
    for (int j = 0; j < kTileVectors / kPreprocessThreads; ++j) {
        accum_tile[j * kPreprocessThreads + threadIdx.x] = make_float4(0.f, 0.f, 0.f, 0.f);
    }

    // A row takes kLanesPerRow lanes (a power of two), so a warp covers kRowsPerPass rows at once,
    // and each warp has kPassesInFlight passes' loads in flight before it reduces: with one row
    // per warp and pass, half the lanes idled at d = 128 and every row waited for its loads
    // (ncu, H200: 46 us for 8k tokens x 16 heads x d128, against 34 us for FlashAttention-2's
    // pass, which also clears its accumulator).
    constexpr int kLanesPerRow = kHeadDim <= 64 ? 8 : kHeadDim <= 128 ? 16 : 32;
    constexpr int kRowsPerPass = kWarpSize / kLanesPerRow;
    constexpr int kPassesInFlight = 2;
    constexpr int kRowsPerWarpStep = kRowsPerPass * kPassesInFlight;
    const int lane = threadIdx.x % kWarpSize;
    const int col = (lane % kLanesPerRow) * kElemsPerLane;
    const bool lane_active = col < params.head_dim;
    const int64_t row_stats_offset =
        head * params.lse_head_stride + seq.lse_offset(params.lse_batch_stride, batch);
    const Element* do_base = static_cast<const Element*>(params.do_ptr) +
                             seq.q_offset(params.do_batch_stride, params.do_row_stride, batch) +
                             head * params.do_head_stride + col;
    const Element* o_base = static_cast<const Element*>(params.o_ptr) +
                            seq.q_offset(params.o_batch_stride, params.o_row_stride, batch) +
                            head * params.o_head_stride + col;
    const int row_end = min(seq.seqlen_q, (m_block + 1) * kBlockM);
    const int warp = threadIdx.x / kWarpSize;
    for (int first_row = m_block * kBlockM + warp * kRowsPerWarpStep; first_row < row_end;
         first_row += kPreprocessWarps * kRowsPerWarpStep) {
        float dot[kPassesInFlight];
        CUTE_UNROLL
        for (int pass = 0; pass < kPassesInFlight; ++pass) {
            const int row = first_row + pass * kRowsPerPass + lane / kLanesPerRow;
            dot[pass] = 0.f;
            if (lane_active && row < row_end) {
                const auto d_out = *reinterpret_cast<const LaneVector<Element>*>(
                    do_base + row * params.do_row_stride);
                const auto out = *reinterpret_cast<const LaneVector<Element>*>(
                    o_base + row * params.o_row_stride);
                CUTE_UNROLL
                for (int i = 0; i < kElemsPerLane; ++i) {
                    dot[pass] += float(d_out[i]) * float(out[i]);
                }
            }
        }
        CUTE_UNROLL
        for (int pass = 0; pass < kPassesInFlight; ++pass) {
            const float row_dot = lane_group_sum<kLanesPerRow>(dot[pass]);
            const int row = first_row + pass * kRowsPerPass + lane / kLanesPerRow;
            if (lane % kLanesPerRow == 0 && row < row_end) {
                const float lse_grad = params.softmax_lse_grad_ptr == nullptr
                                           ? 0.f
                                           : params.softmax_lse_grad_ptr[row_stats_offset + row];
                const float d = row_dot - lse_grad;
                params.softmax_d_ptr[row_stats_offset + row] = d;
                if (params.learnable_sink != nullptr) {
                    // The sink's probability in this row is exp(sink - lse); every key's
                    // probability shrinks by it as the sink grows (see flash_params.h).
                    const float lse = params.softmax_lse_ptr[row_stats_offset + row];
                    params.sink_grad_rows_ptr[row_stats_offset + row] =
                        -expf(params.learnable_sink[head] - lse) * d;
                }
            }
        }
    }
}

}  // namespace sm80
}  // namespace flash_varlen
