// Online softmax state of one thread's rows (Milakov & Gimelshein 2018; the FlashAttention
// papers): a running maximum and a running sum per row, the output accumulator rescaled whenever
// the maximum grows, and the log-sum-exp produced at the end.
#pragma once

#include <cute/tensor.hpp>

#include "kernels/common/softmax_rows.h"
#include "kernels/sm80/fragment_layouts.h"

namespace flash_varlen {
namespace sm80 {

using namespace cute;

template <int kRows>
struct OnlineSoftmax {
    // Maximum of the raw (unscaled) scores seen so far; -inf while a row has seen no visible key.
    Tensor<ArrayEngine<float, kRows>, Layout<Shape<Int<kRows>>>> row_max;
    // This thread's share of sum(exp(scale * (score - row_max))); summed over the quad at the end.
    Tensor<ArrayEngine<float, kRows>, Layout<Shape<Int<kRows>>>> row_sum;

    __device__ OnlineSoftmax() {
        fill(row_max, -INFINITY);
        fill(row_sum, 0.f);
    }

    // Folds one block of scores into the state: raises the row maxima, rescales acc_o and the sums
    // by exp(old_max - new_max), and overwrites acc_s with the unnormalised probabilities.
    template <typename AccS, typename AccO>
    __device__ void update(AccS& acc_s, AccO& acc_o, float scale_log2) {
        Tensor scores = make_tensor(acc_s.data(), accumulator_as_rows_cols(acc_s.layout()));
        Tensor out = make_tensor(acc_o.data(), accumulator_as_rows_cols(acc_o.layout()));
        static_assert(decltype(size<0>(scores))::value == kRows, "row count mismatch");
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            float block_max = row_max(r);
            CUTE_UNROLL
            for (int c = 0; c < size<1>(scores); ++c) block_max = fmaxf(block_max, scores(r, c));
            const float new_max = quad_allreduce_max(block_max);
            // A row with no visible key so far keeps max -inf. Subtracting 0 instead of -inf keeps
            // exp2(-inf - (-inf)) = NaN out: its scores are all -inf and become exactly 0.
            const float new_max_scaled = new_max == -INFINITY ? 0.f : new_max * scale_log2;
            const float correction = exp2f(row_max(r) * scale_log2 - new_max_scaled);
            row_max(r) = new_max;
            row_sum(r) *= correction;
            CUTE_UNROLL
            for (int c = 0; c < size<1>(out); ++c) out(r, c) *= correction;
            float sum = 0.f;
            CUTE_UNROLL
            for (int c = 0; c < size<1>(scores); ++c) {
                // One FFMA and one EX2 per score: scale * score - scale * max, in base 2.
                scores(r, c) = exp2f(scores(r, c) * scale_log2 - new_max_scaled);
                sum += scores(r, c);
            }
            row_sum(r) += sum;
        }
    }

    // Normalises acc_o by the row sums (and multiplies it by out_scale: dropout's 1 / (1 - p))
    // and returns the natural-log LSE of each row; logit_scale turns the raw scores the state
    // holds into logits. sink: one more logit in every row's sum, with no value (attention
    // sinks), or -inf for none. A row that saw no visible key gets output 0 and LSE = sink
    // (-inf without a sink, so that merging partial results by LSE works).
    template <typename AccO>
    __device__ auto finalize(AccO& acc_o, float logit_scale, float out_scale, float sink) {
        Tensor out = make_tensor(acc_o.data(), accumulator_as_rows_cols(acc_o.layout()));
        Tensor lse = make_tensor<float>(Shape<Int<kRows>>{});
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            const float sum = quad_allreduce_sum(row_sum(r));
            const bool saw_no_key = !(sum > 0.f);
            // sum is relative to the largest logit; the sink's term is added relative to the
            // larger of the two, so that neither exponential overflows whatever the sink's size.
            // Without a sink (-inf) both factors are exactly 1 and 0 and this is the plain
            // softmax's normalisation.
            const float max_logit = row_max(r) * logit_scale;
            const float top = fmaxf(max_logit, sink);
            const float keys_share = expf(max_logit - top);
            const float total = sum * keys_share + expf(sink - top);
            lse(r) = saw_no_key ? sink : top + __logf(total);
            const float inv_sum = saw_no_key ? 0.f : out_scale * keys_share / total;
            CUTE_UNROLL
            for (int c = 0; c < size<1>(out); ++c) out(r, c) *= inv_sum;
        }
        return lse;
    }
};

}  // namespace sm80
}  // namespace flash_varlen
