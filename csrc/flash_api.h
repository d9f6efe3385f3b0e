// The functions the pybind11 module exposes. Forward and backward each have one implementation
// (run_forward, run_backward); the fixed-length entry points are the varlen ones with implicit
// uniform lengths.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace flash_varlen {

// The variant arguments (window_left ... dropout_p) are documented in variant_options.h and
// flash_params.h; a window side of -1 is unbounded and causal means window_right = 0.

// (out, softmax_lse, dropout pattern, rng_state). The pattern is (batch, nheads, max_seqlen_q
// and max_seqlen_k rounded up to 128) in q's dtype when return_dropout_mask and dropout_p > 0
// (testing only; a dropped pair has its sign bit set), else empty. rng_state is the (2,) int64
// Philox (seed, offset) the backward needs when dropout_p > 0, else empty.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_*: (batch + 1,) int32;
// seqused_*: (batch,) int32 used lengths. out (total_q, nheads, d) and softmax_lse (nheads,
// total_q) float32; rows past seqused_q are not written.
ForwardResult varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                         int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                         bool causal, int64_t window_left, int64_t window_right, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes,
                         const std::optional<at::Tensor>& seqused_q,
                         const std::optional<at::Tensor>& seqused_k, bool causal_top_left,
                         double dropout_p, bool return_dropout_mask);

// q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d).
// out (batch, seqlen_q, nheads, d) and softmax_lse (batch, nheads, seqlen_q) float32.
ForwardResult fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                  double softcap, const std::optional<at::Tensor>& alibi_slopes,
                  bool causal_top_left, double dropout_p, bool return_dropout_mask);

// Gradients of varlen_fwd. dout, out like q; softmax_lse (and softmax_lse_grad, the gradient of
// the loss with respect to it, when given) (nheads, total_q) float32. dq, dk, dv, when given,
// are written in place (rows past cu_seqlens[-1], or past the used lengths, untouched);
// otherwise they are allocated, with those rows set to 0. The variant arguments must be the
// forward's, and rng_state its fourth output when dropout_p > 0. Returns (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& softmax_lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale, bool causal, bool deterministic,
    const std::optional<at::Tensor>& softmax_lse_grad, const std::optional<at::Tensor>& dq,
    const std::optional<at::Tensor>& dk, const std::optional<at::Tensor>& dv, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& seqused_q, const std::optional<at::Tensor>& seqused_k,
    bool causal_top_left, double dropout_p, const std::optional<at::Tensor>& rng_state);

// Gradients of fwd; softmax_lse (batch, nheads, seqlen_q). Returns (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& softmax_lse, double softmax_scale, bool causal,
    bool deterministic, const std::optional<at::Tensor>& softmax_lse_grad,
    const std::optional<at::Tensor>& dq, const std::optional<at::Tensor>& dk,
    const std::optional<at::Tensor>& dv, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, bool causal_top_left, double dropout_p,
    const std::optional<at::Tensor>& rng_state);

}  // namespace flash_varlen
