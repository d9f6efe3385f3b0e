// The per-row arithmetic of the online softmax that the kernel families share: the quad
// reductions (both families) and the normalisation of a finished row, with attention sinks (sm90;
// the sm80 family's finalize in sm80/online_softmax.h computes the same expressions inline, which
// keeps its SASS as measured), so that the families agree on the output and the LSE.
//
// Both mma.sync (sm80) and wgmma (sm90) accumulators give the columns of a row to the four
// threads of a quad (lanes 4g .. 4g + 3): the quad reductions below combine a row's partial
// maxima and sums.
#pragma once

#include <cuda_runtime.h>

namespace flash_varlen {

__device__ __forceinline__ float quad_allreduce_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
}

__device__ __forceinline__ float quad_allreduce_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 2);
    return x + __shfl_xor_sync(0xffffffff, x, 1);
}

// How a finished row is normalised: its natural-log LSE; O row *= factor.
struct RowNormalisation {
    float lse;
    float factor;
};

// A row whose softmax state is `sum` (the quad-reduced sum of exp relative to the row's maximum
// raw score `row_max`): logit_scale turns raw scores into logits, out_scale multiplies the
// output (dropout's 1 / (1 - p)), and sink is one more logit in the row's sum with no value
// (attention sinks), or -inf. A row that saw no visible key gets factor 0 and LSE = sink.
__device__ __forceinline__ RowNormalisation normalise_row(float sum, float row_max,
                                                          float logit_scale, float out_scale,
                                                          float sink) {
    const bool saw_no_key = !(sum > 0.f);
    // sum is relative to the largest logit; the sink's term is added relative to the larger of
    // the two, so that neither exponential overflows whatever the sink's size. Without a sink
    // (-inf) both factors are exactly 1 and 0 and this is the plain softmax's normalisation.
    const float max_logit = row_max * logit_scale;
    const float top = fmaxf(max_logit, sink);
    const float keys_share = expf(max_logit - top);
    const float total = sum * keys_share + expf(sink - top);
    return {saw_no_key ? sink : top + __logf(total),
            saw_no_key ? 0.f : out_scale * keys_share / total};
}

}  // namespace flash_varlen
