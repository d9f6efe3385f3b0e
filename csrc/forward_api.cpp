// Forward bindings: check inputs on the host (never reading device memory), fill the params
// struct, pick the current stream, and dispatch to a registered kernel.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <utility>

#include "error_message.h"
#include "flash_api.h"
#include "input_checks.h"
#include "kernels/flash_params.h"
#include "variant_options.h"

namespace flash_varlen {
namespace {

// The dropout pattern's rows and columns are rounded up to this (flash-attn's S_dmask shape).
constexpr int64_t kDropoutMaskRounding = 128;

int64_t round_up(int64_t value, int64_t multiple) {
    return (value + multiple - 1) / multiple * multiple;
}

// Returns (dropout pattern, rng_state); both are empty tensors when not produced.
std::pair<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                                              const HeadShape& heads, const int* cu_seqlens_q,
                                              const int* cu_seqlens_k, int batch, int seqlen_q,
                                              int seqlen_k, double softmax_scale,
                                              const VariantOptions& options,
                                              bool return_dropout_mask) {
    check_softmax_scale(softmax_scale);
    const FwdLauncher launch = find_launcher<FlashFwdParams>(
        q, heads.head_dim, needs_local_mask(options, seqlen_q, seqlen_k), "forward");

    const bool has_batch = q.dim() == 4;
    FlashFwdParams params{};
    params.q_ptr = q.data_ptr();
    params.k_ptr = k.data_ptr();
    params.v_ptr = v.data_ptr();
    params.o_ptr = out.data_ptr();
    params.softmax_lse_ptr = lse.data_ptr<float>();
    set_strides(&params.q_batch_stride, &params.q_row_stride, &params.q_head_stride, q, has_batch);
    set_strides(&params.k_batch_stride, &params.k_row_stride, &params.k_head_stride, k, has_batch);
    set_strides(&params.v_batch_stride, &params.v_row_stride, &params.v_head_stride, v, has_batch);
    set_strides(&params.o_batch_stride, &params.o_row_stride, &params.o_head_stride, out,
                has_batch);
    // lse: (nheads, total_q) varlen or (batch, nheads, seqlen_q) fixed; rows of a head contiguous.
    params.lse_batch_stride = has_batch ? lse.stride(0) : 0;
    params.lse_head_stride = lse.stride(-2);
    params.cu_seqlens_q = cu_seqlens_q;
    params.cu_seqlens_k = cu_seqlens_k;
    params.batch = batch;
    params.nheads = heads.nheads;
    params.nheads_k = heads.nheads_k;
    params.head_dim = heads.head_dim;
    params.seqlen_q = seqlen_q;
    params.seqlen_k = seqlen_k;
    const VariantTensors variant_tensors =
        set_variant_params(params, options, softmax_scale, seqlen_q, seqlen_k);

    at::Tensor dropout_mask = at::empty({0}, q.options());
    if (return_dropout_mask && options.dropout_p > 0.0) {
        // Zeroed: pairs the kernel skips (invisible, or past a sequence end) read as kept zeros.
        dropout_mask = at::zeros({batch, heads.nheads, round_up(seqlen_q, kDropoutMaskRounding),
                                  round_up(seqlen_k, kDropoutMaskRounding)},
                                 q.options());
        params.dropout_mask_ptr = dropout_mask.data_ptr();
        params.dropout_mask_batch_stride = dropout_mask.stride(0);
        params.dropout_mask_head_stride = dropout_mask.stride(1);
        params.dropout_mask_row_stride = dropout_mask.stride(2);
    }
    at::Tensor rng_state = take_philox_state(params, options, q.device());
    if (batch == 0 || q.numel() == 0) return {dropout_mask, rng_state};  // nothing to compute

    const at::cuda::CUDAGuard device_guard(q.device());
    const cudaError_t err = launch(params, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess,
                message("flash_varlen forward kernel launch failed: ", cudaGetErrorString(err)));
    return {dropout_mask, rng_state};
}

}  // namespace

ForwardResult varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                         int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                         bool causal, int64_t window_left, int64_t window_right, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes,
                         const std::optional<at::Tensor>& seqused_q,
                         const std::optional<at::Tensor>& seqused_k, bool causal_top_left,
                         double dropout_p, bool return_dropout_mask) {
    check_qkv_tensor(q, "q", q.scalar_type(), 3);
    check_qkv_tensor(k, "k", q.scalar_type(), 3);
    check_qkv_tensor(v, "v", q.scalar_type(), 3);
    const HeadShape heads = check_heads(q, k, v);
    const int64_t batch =
        check_varlen_batch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
    const VariantOptions options{causal,    window_left, window_right,    softcap,  alibi_slopes,
                                 seqused_q, seqused_k,   causal_top_left, dropout_p};
    check_variant_options(options, batch, heads.nheads);
    for (const auto& [t, name] : {std::pair{&q, "q"},
                                  {&k, "k"},
                                  {&v, "v"},
                                  {&cu_seqlens_q, "cu_seqlens_q"},
                                  {&cu_seqlens_k, "cu_seqlens_k"}}) {
        check_device(*t, name, q.device());
    }
    check_variant_devices(options, q.device());

    at::Tensor out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor lse = at::empty({heads.nheads, q.size(0)}, q.options().dtype(at::kFloat));
    auto [dropout_mask, rng_state] = run_forward(
        q, k, v, out, lse, heads, cu_seqlens_q.data_ptr<int>(), cu_seqlens_k.data_ptr<int>(),
        static_cast<int>(batch), static_cast<int>(max_seqlen_q), static_cast<int>(max_seqlen_k),
        softmax_scale, options, return_dropout_mask);
    return {out, lse, dropout_mask, rng_state};
}

ForwardResult fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                  double softcap, const std::optional<at::Tensor>& alibi_slopes,
                  bool causal_top_left, double dropout_p, bool return_dropout_mask) {
    check_qkv_tensor(q, "q", q.scalar_type(), 4);
    check_qkv_tensor(k, "k", q.scalar_type(), 4);
    check_qkv_tensor(v, "v", q.scalar_type(), 4);
    check_fixed_batch(q, k, v);
    const HeadShape heads = check_heads(q, k, v);
    const VariantOptions options{causal,       window_left,     window_right,
                                 softcap,      alibi_slopes,    std::nullopt,
                                 std::nullopt, causal_top_left, dropout_p};
    check_variant_options(options, q.size(0), heads.nheads);
    for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
        check_device(*t, name, q.device());
    }
    check_variant_devices(options, q.device());

    at::Tensor out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor lse = at::empty({q.size(0), heads.nheads, q.size(1)}, q.options().dtype(at::kFloat));
    auto [dropout_mask, rng_state] =
        run_forward(q, k, v, out, lse, heads, nullptr, nullptr, static_cast<int>(q.size(0)),
                    static_cast<int>(q.size(1)), static_cast<int>(k.size(1)), softmax_scale,
                    options, return_dropout_mask);
    return {out, lse, dropout_mask, rng_state};
}

}  // namespace flash_varlen
