// Online softmax state of one thread's rows of a wgmma accumulator (Milakov & Gimelshein 2018;
// the FlashAttention papers), with the conventions of the sm80 family (sm80/online_softmax.h):
// the state keeps the maximum of the raw scores, exponentiates with exp2 and a scale, and a row
// that sees no key gets output 0 and LSE = sink (-inf without sinks), never NaN.
//
// Unlike the sm80 version, a block's update is split in two, because the main loop overlaps it
// with the GEMMs (FlashAttention-3's intra-warpgroup overlap): fold_block turns the scores into
// probabilities and returns the factor by which O must be rescaled, and the caller applies it
// with rescale once the P V product that was in flight has landed in O.
//
// The maximum a row exponentiates against may lag the true one (the conditional rescaling of
// FlashAttention-4's Blackwell softmax, SoftmaxSm100 in flash_attn/cute/softmax.py; its Hopper
// forward rescales every block): while a block raises a row's maximum by at most
// kStaleMaxLog2 (in log2 units of the scaled scores), the row keeps its old maximum, so its
// factor is 1, and a warp whose rows all keep theirs skips the rescale of O. The result is the
// same softmax (every term and the row sum share the one reference, and the LSE uses it too);
// the probabilities of such a block are then at most 2^kStaleMaxLog2, well inside bf16 / fp16
// and the float32 sums.
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
    // FlashAttention-4's threshold: probabilities up to 2^8 = 256.
    static constexpr float kStaleMaxLog2 = 8.f;

    // What fold_block returns: the factor for each row of O, and whether any row of this thread's
    // warp has a factor other than 1 (uniform over the warp, so the skip is a uniform branch).
    struct Correction {
        RowValues factor;
        bool any_row;
    };
    // Maximum of the raw scores seen so far; -inf while a row has seen no visible key.
    RowValues row_max;
    // This thread's share of sum(exp2(scale * (score - row_max))); summed over the quad at the end.
    RowValues row_sum;

    __device__ OnlineSoftmax() {
        fill(row_max, -INFINITY);
        fill(row_sum, 0.f);
    }

    // Folds one block of (masked) raw scores into the state and overwrites them with the
    // unnormalised probabilities exp2(scale * (score - reference)), the reference being the row's
    // maximum or, while the block raises it by at most kStaleMaxLog2, the old one. Returns per row
    // the factor exp2(scale * (old reference - new reference)) that everything accumulated so far
    // must be multiplied by (the row sums already are). On the first block it is 0: there is
    // nothing to rescale.
    template <typename AccS>
    __device__ __forceinline__ Correction fold_block(AccS& acc_s, float scale_log2) {
        Tensor scores = make_tensor(acc_s.data(), accumulator_as_rows_cols(acc_s.layout()));
        static_assert(decltype(size<0>(scores))::value == kRows, "row count mismatch");
        Correction correction;
        bool any_row = false;
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            float block_max = row_max(r);
            CUTE_UNROLL
            for (int c = 0; c < size<1>(scores); ++c) block_max = fmaxf(block_max, scores(r, c));
            const float new_max = quad_allreduce_max(block_max);
            // The same in the four threads of a row (the reduction made new_max so). False while
            // the row has seen no key (-inf - -inf is NaN) and on its first visible key (+inf).
            const bool keep_reference = (new_max - row_max(r)) * scale_log2 <= kStaleMaxLog2;
            if (!keep_reference) {
                // A row with no visible key so far keeps max -inf; subtracting 0 instead of -inf
                // keeps exp2(-inf - (-inf)) = NaN out: its scores are all -inf and become 0.
                const float new_max_scaled = new_max == -INFINITY ? 0.f : new_max * scale_log2;
                correction.factor(r) = exp2f(row_max(r) * scale_log2 - new_max_scaled);
                row_max(r) = new_max;
                any_row = true;
            } else {
                correction.factor(r) = 1.f;
            }
            const float reference_scaled = row_max(r) == -INFINITY ? 0.f : row_max(r) * scale_log2;
            float sum = 0.f;
            CUTE_UNROLL
            for (int c = 0; c < size<1>(scores); ++c) {
                // One FFMA and one MUFU.EX2 per score.
                scores(r, c) = exp2f(scores(r, c) * scale_log2 - reference_scaled);
                sum += scores(r, c);
            }
            row_sum(r) = row_sum(r) * correction.factor(r) + sum;
        }
        correction.any_row = __any_sync(0xffffffffu, any_row);
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
