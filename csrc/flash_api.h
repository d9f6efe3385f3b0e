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

// q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_*: (batch + 1,) int32.
// Returns out (total_q, nheads, d) and softmax_lse (nheads, total_q) float32.
std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                              const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                              int64_t max_seqlen_k, double softmax_scale,
                                              bool causal);

// q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d).
// Returns out (batch, seqlen_q, nheads, d) and softmax_lse (batch, nheads, seqlen_q) float32.
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, double softmax_scale, bool causal);

// Gradients of varlen_fwd. dout, out like q; softmax_lse (and softmax_lse_grad, the gradient of
// the loss with respect to it, when given) (nheads, total_q) float32. dq, dk, dv, when given,
// are written in place (rows past cu_seqlens[-1] untouched); otherwise they are allocated, with
// rows past cu_seqlens[-1] set to 0. Returns (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& softmax_lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale, bool causal, bool deterministic,
    const std::optional<at::Tensor>& softmax_lse_grad, const std::optional<at::Tensor>& dq,
    const std::optional<at::Tensor>& dk, const std::optional<at::Tensor>& dv);

// Gradients of fwd; softmax_lse (batch, nheads, seqlen_q). Returns (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& softmax_lse, double softmax_scale, bool causal,
    bool deterministic, const std::optional<at::Tensor>& softmax_lse_grad,
    const std::optional<at::Tensor>& dq, const std::optional<at::Tensor>& dk,
    const std::optional<at::Tensor>& dv);

}  // namespace flash_varlen
