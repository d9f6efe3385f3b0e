// Backward entry points: check inputs on the host (never reading device memory), allocate the
// gradients, fill the params struct and dispatch to a registered kernel (dispatch.h), which
// brings its own workspace, on the current stream. Both layouts run one path, run_backward.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <utility>
#include <vector>

#include "bindings/dispatch.h"
#include "bindings/error_message.h"
#include "bindings/input_checks.h"
#include "bindings/kernel_params.h"
#include "generated/entry_points.h"
#include "kernels/common/flash_params.h"

namespace flash_varlen {
namespace {

// The caller's gradient buffer `name` for `like` (named like_name), checked, if given.
void check_gradient_buffer(const std::optional<at::Tensor>& given, const char* name,
                           const at::Tensor& like, const char* like_name, const at::Tensor& q) {
    if (!given.has_value()) return;
    check_qkv_tensor(*given, name, q.scalar_type(), like.dim());
    check_same_shape(*given, name, like, like_name);
}

// The caller's buffer, or a new contiguous one. New varlen buffers get their rows past
// cu_seqlens[-1] (which the attention kernels do not write) zeroed on the device; see
// clear_rows_past_end.h. With used lengths (seqused_q / seqused_k) the kernels also leave rows
// inside the slots unwritten, so new buffers are zero-filled whole (`zeroed`).
at::Tensor gradient_buffer(const std::optional<at::Tensor>& given, const at::Tensor& like,
                           bool zeroed) {
    if (given.has_value()) return *given;
    const auto options = like.options().memory_format(at::MemoryFormat::Contiguous);
    return zeroed ? at::zeros_like(like, options) : at::empty_like(like, options);
}

struct GradientArgs {
    const std::optional<at::Tensor>& softmax_lse_grad;
    const std::optional<at::Tensor>& dq;
    const std::optional<at::Tensor>& dk;
    const std::optional<at::Tensor>& dv;
};

struct BackwardTensors {
    at::Tensor dout, q, k, v, out, softmax_lse;
    std::optional<at::Tensor> softmax_lse_grad;
    at::Tensor dq, dk, dv;
    bool gradients_allocated[3];  // dq, dk, dv: allocated by the backward, not given
};

// The inputs, with each gradient the caller's buffer or a new one (and which of them are new).
BackwardTensors backward_tensors(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& softmax_lse, const GradientArgs& grads,
                                 const AttentionOptions& options) {
    const bool zeroed = options.seqused_q.has_value() || options.seqused_k.has_value();
    return {dout,
            q,
            k,
            v,
            out,
            softmax_lse,
            grads.softmax_lse_grad,
            gradient_buffer(grads.dq, q, zeroed),
            gradient_buffer(grads.dk, k, zeroed),
            gradient_buffer(grads.dv, v, zeroed),
            {!grads.dq.has_value(), !grads.dk.has_value(), !grads.dv.has_value()}};
}

// The gradient of learnable_sink from the kernels' per-row terms (laid out like softmax_lse:
// (nheads, total_q) varlen, (batch, nheads, seqlen_q) fixed length): their sum per head. Without
// sinks, an empty float32 tensor.
at::Tensor sink_gradient(const at::Tensor& sink_grad_rows, const at::Tensor& q) {
    if (!sink_grad_rows.defined()) return at::empty({0}, q.options().dtype(at::kFloat));
    const std::vector<int64_t> row_dims =
        sink_grad_rows.dim() == 2 ? std::vector<int64_t>{1} : std::vector<int64_t>{0, 2};
    return sink_grad_rows.sum(row_dims);
}

// Runs the backward into t.dq, t.dk, t.dv and returns the gradient of learnable_sink.
at::Tensor run_backward(BackwardTensors& t, const BatchShape& shape,
                        const AttentionOptions& options,
                        const std::optional<at::Tensor>& rng_state) {
    // Zero-filled: rows the kernels do not write (past the used lengths or cu_seqlens[-1]) add 0.
    at::Tensor sink_grad_rows;
    if (options.learnable_sink.has_value()) {
        sink_grad_rows = at::zeros_like(t.softmax_lse,
                                        t.softmax_lse.options().memory_format(
                                            at::MemoryFormat::Contiguous));
    }
    // The per-row statistics are small; a contiguous copy (only if they are not) gives the
    // preprocess output and both inputs one layout.
    const at::Tensor lse = t.softmax_lse.contiguous();
    const at::Tensor softmax_d = at::empty_like(lse);
    at::Tensor lse_grad;
    if (t.softmax_lse_grad.has_value()) lse_grad = t.softmax_lse_grad->contiguous();
    const bool is_varlen = shape.cu_seqlens_q != nullptr;
    const bool has_batch = !is_varlen;
    FlashBwdParams params{};
    params.q_ptr = t.q.data_ptr();
    params.k_ptr = t.k.data_ptr();
    params.v_ptr = t.v.data_ptr();
    params.o_ptr = t.out.data_ptr();
    params.do_ptr = t.dout.data_ptr();
    params.dq_ptr = t.dq.data_ptr();
    params.dk_ptr = t.dk.data_ptr();
    params.dv_ptr = t.dv.data_ptr();
    set_strides(&params.q_batch_stride, &params.q_row_stride, &params.q_head_stride, t.q,
                has_batch);
    set_strides(&params.k_batch_stride, &params.k_row_stride, &params.k_head_stride, t.k,
                has_batch);
    set_strides(&params.v_batch_stride, &params.v_row_stride, &params.v_head_stride, t.v,
                has_batch);
    set_strides(&params.o_batch_stride, &params.o_row_stride, &params.o_head_stride, t.out,
                has_batch);
    set_strides(&params.do_batch_stride, &params.do_row_stride, &params.do_head_stride, t.dout,
                has_batch);
    set_strides(&params.dq_batch_stride, &params.dq_row_stride, &params.dq_head_stride, t.dq,
                has_batch);
    set_strides(&params.dk_batch_stride, &params.dk_row_stride, &params.dk_head_stride, t.dk,
                has_batch);
    set_strides(&params.dv_batch_stride, &params.dv_row_stride, &params.dv_head_stride, t.dv,
                has_batch);
    params.softmax_lse_ptr = const_cast<float*>(lse.data_ptr<float>());
    params.lse_batch_stride = has_batch ? lse.stride(0) : 0;
    params.lse_head_stride = lse.stride(-2);
    params.softmax_lse_grad_ptr = lse_grad.defined() ? lse_grad.data_ptr<float>() : nullptr;
    params.softmax_d_ptr = softmax_d.data_ptr<float>();
    params.sink_grad_rows_ptr =
        sink_grad_rows.defined() ? sink_grad_rows.data_ptr<float>() : nullptr;
    params.deterministic = options.deterministic;
    if (is_varlen) {
        const at::Tensor* const gradients[] = {&t.dq, &t.dk, &t.dv};
        int64_t* const clear_until[] = {&params.clear_dq_rows_until, &params.clear_dk_rows_until,
                                        &params.clear_dv_rows_until};
        for (int i = 0; i < 3; ++i) {
            *clear_until[i] = t.gradients_allocated[i] ? gradients[i]->size(0) : 0;
        }
    }
    set_batch_params(params, shape);
    const OptionTensors option_tensors =
        set_option_params(params, options, shape.seqlen_q, shape.seqlen_k);
    use_recorded_philox_state(params, options, rng_state, t.q.device());
    const KernelEntry<FlashBwdParams>& kernel = select_kernel<FlashBwdParams>(
        kernel_config(t.q, shape, options), &params, compute_capability(t.q.device()),
        shape.heads.head_dim, "backward");
    // Only a fixed-length batch can be empty (varlen needs batch >= 1), and then so are the
    // tensors: nothing to compute, nothing to write.
    if (shape.batch == 0) return sink_gradient(sink_grad_rows, t.q);
    launch_kernel(kernel, params, t.q.device(), "backward");
    return sink_gradient(sink_grad_rows, t.q);
}

// Every rule but the devices for the tensors both layouts share; `rank` is 3 (varlen) or 4
// (fixed length), lse_shape that of softmax_lse.
HeadShape check_backward_layouts(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& softmax_lse, const GradientArgs& grads,
                                 int rank) {
    check_qkv_tensor(q, "q", q.scalar_type(), rank);
    check_qkv_tensor(k, "k", q.scalar_type(), rank);
    check_qkv_tensor(v, "v", q.scalar_type(), rank);
    check_qkv_tensor(out, "out", q.scalar_type(), rank);
    check_same_shape(out, "out", q, "q");
    check_qkv_tensor(dout, "dout", q.scalar_type(), rank);
    check_same_shape(dout, "dout", q, "q");
    const HeadShape heads = check_heads(q, k, v);
    const std::vector<int64_t> lse_shape =
        rank == 3 ? std::vector<int64_t>{heads.nheads, q.size(0)}
                  : std::vector<int64_t>{q.size(0), heads.nheads, q.size(1)};
    check_row_stats(softmax_lse, "softmax_lse", lse_shape);
    if (grads.softmax_lse_grad.has_value()) {
        check_row_stats(*grads.softmax_lse_grad, "softmax_lse_grad", lse_shape);
    }
    check_gradient_buffer(grads.dq, "dq", q, "q", q);
    check_gradient_buffer(grads.dk, "dk", k, "k", q);
    check_gradient_buffer(grads.dv, "dv", v, "v", q);
    return heads;
}

// The devices, after every other rule.
void check_backward_devices(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& softmax_lse, const GradientArgs& grads) {
    for (const auto& [t, name] : {std::pair{&q, "q"},
                                  {&k, "k"},
                                  {&v, "v"},
                                  {&out, "out"},
                                  {&dout, "dout"},
                                  {&softmax_lse, "softmax_lse"}}) {
        check_device(*t, name, q.device());
    }
    for (const auto& [t, name] : {std::pair{&grads.softmax_lse_grad, "softmax_lse_grad"},
                                  {&grads.dq, "dq"},
                                  {&grads.dk, "dk"},
                                  {&grads.dv, "dv"}}) {
        if (t->has_value()) check_device(**t, name, q.device());
    }
}

}  // namespace

BackwardResult varlen_bwd(const VarlenBwdArgs& args) {
    const GradientArgs grads{args.softmax_lse_grad, args.dq, args.dk, args.dv};
    const at::Tensor& q = args.q;
    const HeadShape heads =
        check_backward_layouts(args.dout, q, args.k, args.v, args.out, args.softmax_lse, grads, 3);
    const int64_t batch =
        check_varlen_batch(q, args.k, args.v, args.cu_seqlens_q, args.cu_seqlens_k,
                           args.max_seqlen_q, args.max_seqlen_k);
    check_attention_options(args.options, {batch, heads.nheads});
    check_backward_devices(args.dout, q, args.k, args.v, args.out, args.softmax_lse, grads);
    check_device(args.cu_seqlens_q, "cu_seqlens_q", q.device());
    check_device(args.cu_seqlens_k, "cu_seqlens_k", q.device());
    check_attention_option_devices(args.options, q.device());

    BackwardTensors t = backward_tensors(args.dout, q, args.k, args.v, args.out, args.softmax_lse,
                                         grads, args.options);
    const BatchShape shape = varlen_shape(heads, q, args.k, args.cu_seqlens_q, args.cu_seqlens_k,
                                          batch, args.max_seqlen_q, args.max_seqlen_k);
    const at::Tensor sink_grad = run_backward(t, shape, args.options, args.rng_state);
    return {t.dq, t.dk, t.dv, sink_grad};
}

BackwardResult bwd(const BwdArgs& args) {
    const GradientArgs grads{args.softmax_lse_grad, args.dq, args.dk, args.dv};
    const at::Tensor& q = args.q;
    const HeadShape heads =
        check_backward_layouts(args.dout, q, args.k, args.v, args.out, args.softmax_lse, grads, 4);
    check_fixed_batch(q, args.k, args.v);
    check_attention_options(args.options, {q.size(0), heads.nheads});
    check_backward_devices(args.dout, q, args.k, args.v, args.out, args.softmax_lse, grads);
    check_attention_option_devices(args.options, q.device());

    BackwardTensors t = backward_tensors(args.dout, q, args.k, args.v, args.out, args.softmax_lse,
                                         grads, args.options);
    const BatchShape shape = fixed_shape(heads, q, args.k);
    const at::Tensor sink_grad = run_backward(t, shape, args.options, args.rng_state);
    return {t.dq, t.dk, t.dv, sink_grad};
}

}  // namespace flash_varlen
