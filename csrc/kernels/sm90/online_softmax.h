// Online softmax state of one thread's rows of a wgmma accumulator (Milakov & Gimelshein 2018;
// the FlashAttention papers), with the conventions of the sm80 family (sm80/online_softmax.h):
// the state keeps the maximum of the raw scores, exponentiates with exp2 and a scale, and a row
// that sees no key gets output 0 and LSE = sink (-inf without sinks), never NaN.
//
// Unlike the sm80 version, a block's update is split in two, because the main loop overlaps it
// with the GEMMs (FlashAttention-3's intra-warpgroup overlap): fold_block turns the scores into
// probabilities and returns the factor by which O must be rescaled, and the caller applies it
// with rescale once the P V product that was in flight has landed in O.
#pragma once

#include <cute/tensor.hpp>

#include "kernels/common/softmax_rows.h"
#include "kernels/sm90/fragment_layouts.h"

namespace flash_varlen {
namespace sm90 {

using namespace cute;

template <int kRows>
struct OnlineSoftmax {
    using RowValues = Tensor<ArrayEngine<float, kRows>, Layout<Shape<Int<kRows>>>>;
    // Maximum of the raw scores seen so far; -inf while a row has seen no visible key.
    RowValues row_max;
    // This thread's share of sum(exp2(scale * (score - row_max))); summed over the quad at the end.
    RowValues row_sum;

    __device__ OnlineSoftmax() {
        fill(row_max, -INFINITY);
        fill(row_sum, 0.f);
    }

    // Folds one block of (masked) raw scores into the state and overwrites them with the
    // unnormalised probabilities exp2(scale * (score - new_max)). Returns per row the factor
    // exp2(scale * (old_max - new_max)) that everything accumulated so far must be multiplied by
    // (the row sums already are). On the first block it is 0: there is nothing to rescale.
    template <typename AccS>
    __device__ __forceinline__ RowValues fold_block(AccS& acc_s, float scale_log2) {
        Tensor scores = make_tensor(acc_s.data(), accumulator_as_rows_cols(acc_s.layout()));
        static_assert(decltype(size<0>(scores))::value == kRows, "row count mismatch");
        RowValues correction;
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            float block_max = row_max(r);
            CUTE_UNROLL
            for (int c = 0; c < size<1>(scores); ++c) block_max = fmaxf(block_max, scores(r, c));
            const float new_max = quad_allreduce_max(block_max);
            // A row with no visible key so far keeps max -inf; subtracting 0 instead of -inf keeps
            // exp2(-inf - (-inf)) = NaN out: its scores are all -inf and become exactly 0.
            const float new_max_scaled = new_max == -INFINITY ? 0.f : new_max * scale_log2;
            correction(r) = exp2f(row_max(r) * scale_log2 - new_max_scaled);
            row_max(r) = new_max;
            float sum = 0.f;
            CUTE_UNROLL
            for (int c = 0; c < size<1>(scores); ++c) {
                // One FFMA and one MUFU.EX2 per score.
                scores(r, c) = exp2f(scores(r, c) * scale_log2 - new_max_scaled);
                sum += scores(r, c);
            }
            row_sum(r) = row_sum(r) * correction(r) + sum;
        }
        return correction;
    }

    // Multiplies each row of an accumulator by its factor.
    template <typename AccO>
    __device__ __forceinline__ static void rescale(AccO& acc_o, const RowValues& factor) {
        Tensor out = make_tensor(acc_o.data(), accumulator_as_rows_cols(acc_o.layout()));
        static_assert(decltype(size<0>(out))::value == kRows, "row count mismatch");
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            CUTE_UNROLL
            for (int c = 0; c < size<1>(out); ++c) out(r, c) *= factor(r);
        }
    }

    // The per-row factor that normalises O and each row's LSE in `lse` (common/softmax_rows.h,
    // the arithmetic of every family); sinks: each row's attention sink (-inf without).
    __device__ __forceinline__ RowValues finalize(float logit_scale, float out_scale,
                                                  const RowValues& sinks, RowValues& lse) {
        RowValues factor;
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            const RowNormalisation row = normalise_row(quad_allreduce_sum(row_sum(r)), row_max(r),
                                                       logit_scale, out_scale, sinks(r));
            lse(r) = row.lse;
            factor(r) = row.factor;
        }
        return factor;
    }
};

}  // namespace sm90
}  // namespace flash_varlen
