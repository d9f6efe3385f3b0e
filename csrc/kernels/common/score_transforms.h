// Soft-capping of attention scores (Gemma 2): logit = softcap * tanh(softmax_scale * q.k /
// softcap). The kernels keep raw = tanh(q.k * softcap_prescale) and use logit_scale = softcap
// (flash_params.h), so the softmax code is the same with or without the cap.
#pragma once

#include <cute/tensor.hpp>

namespace flash_varlen {

// raw = tanh(q.k * prescale) for every score of a tile, before masking: a masked score is set
// to -inf afterwards, whatever the cap made of it.
template <typename Scores>
__device__ __forceinline__ void apply_softcap(Scores& acc_s, float prescale) {
    CUTE_UNROLL
    for (int i = 0; i < cute::size(acc_s); ++i) acc_s(i) = tanhf(acc_s(i) * prescale);
}

// d raw / d (q.k * prescale) = 1 - raw^2, from the probability p = exp2(raw_biased *
// logit_scale_log2 - lse_log2) the backward recomputed (raw_biased = raw + ALiBi bias), so that
// the capped scores need not stay in registers across the dP product. A probability of 0 (a
// masked or underflowed pair) gets 0: its dS is 0 whatever the factor.
__device__ __forceinline__ float softcap_derivative(float p, float lse_log2, float logit_scale_log2,
                                                    float bias) {
    if (!(p > 0.f)) return 0.f;
    const float raw = (__log2f(p) + lse_log2) / logit_scale_log2 - bias;
    return 1.f - raw * raw;
}

}  // namespace flash_varlen
