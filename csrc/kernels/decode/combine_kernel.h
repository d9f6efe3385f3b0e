// Merges the key splits of a decode call: per query row, the splits' partial outputs (each
// normalised over its own keys) weighted by exp(lse_split - lse), lse = log(sum_split
// exp(lse_split) + exp(sink)) (FlashAttention-2's combine_attn_seqk_parallel, FlashInfer's
// merge_states). A split that saw no key has lse -inf and weight 0; a row no split saw gets
// output 0 and lse -inf (sink[head] with sinks); nothing is NaN.
#pragma once

#include <cutlass/array.h>
#include <cutlass/numeric_types.h>

#include <cmath>

#include "kernels/common/flash_params.h"

namespace flash_varlen {
namespace decode {

constexpr int kCombineWarps = 4;  // one query row per warp

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kCombineWarps * 32)
    combine_kernel(const __grid_constant__ FlashDecodeParams params) {
    // Each lane owns kHeadDim / 32 consecutive columns: float2 or float4 reads, coalesced.
    constexpr int kCols = kHeadDim / 32;
    const int lane = threadIdx.x % 32;
    const int64_t rows = int64_t(params.batch) * params.nheads * params.seqlen_q;
    const int64_t row = int64_t(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
    if (row >= rows) return;
    const int splits = params.num_splits;
    const int head = int(row / params.seqlen_q % params.nheads);

    // The row's largest term: the splits' LSEs (lanes stride over the splits) and the sink.
    const float sink = params.learnable_sink == nullptr ? -INFINITY : params.learnable_sink[head];
    float top = sink;
    for (int s = lane; s < splits; s += 32) top = fmaxf(top, params.partial_lse[s * rows + row]);
    for (int offset = 16; offset > 0; offset /= 2) {
        top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, offset));
    }
    const float reference = top == -INFINITY ? 0.f : top;
    float total = 0.f;
    for (int s = lane; s < splits; s += 32) {
        total += expf(params.partial_lse[s * rows + row] - reference);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
        total += __shfl_xor_sync(0xffffffff, total, offset);
    }
    total += expf(sink - reference);
    const bool saw_no_key = top == -INFINITY;
    const float lse = saw_no_key ? -INFINITY : reference + logf(total);

    float o[kCols] = {};
    for (int s = 0; s < splits; ++s) {
        const float weight = saw_no_key ? 0.f : expf(params.partial_lse[s * rows + row] - lse);
        const float* src = params.partial_out + (s * rows + row) * kHeadDim + lane * kCols;
#pragma unroll
        for (int c = 0; c < kCols; ++c) o[c] += weight * src[c];
    }

    // row = (request, head, token), the partial results' order; out and lse are strided.
    const int token = int(row % params.seqlen_q);
    const int request = int(row / params.seqlen_q / params.nheads);
    const int col = lane * kCols;
    if (col < params.head_dim) {
        Element* out = static_cast<Element*>(params.o_ptr) + request * params.o_batch_stride +
                       token * params.o_row_stride + head * params.o_head_stride + col;
        cutlass::Array<Element, kCols> values;
#pragma unroll
        for (int c = 0; c < kCols; ++c) values[c] = Element(o[c]);
        *reinterpret_cast<cutlass::Array<Element, kCols>*>(out) = values;
    }
    if (lane == 0) {
        params.softmax_lse_ptr[request * params.lse_batch_stride + head * params.lse_head_stride +
                               token] = saw_no_key ? sink : lse;
    }
}

}  // namespace decode
}  // namespace flash_varlen
