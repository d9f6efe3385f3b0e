// Forward entry points: check inputs on the host (never reading device memory), fill the params
// struct, and dispatch to a registered kernel (dispatch.h) on the current stream. Both layouts
// run one path, run_forward: fixed length is varlen with cu_seqlens = nullptr and a batch stride,
// and paged K/V (varlen with a block table) is varlen whose k and v are page pools.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <utility>

#include "bindings/dispatch.h"
#include "bindings/error_message.h"
#include "bindings/input_checks.h"
#include "bindings/kernel_params.h"
#include "generated/contract.h"
#include "generated/entry_points.h"
#include "kernels/common/flash_params.h"

namespace flash_varlen {
namespace {

int64_t round_up(int64_t value, int64_t multiple) {
    return (value + multiple - 1) / multiple * multiple;
}

// Returns (dropout pattern, rng_state); both are empty tensors when not produced.
// block_table: paged K/V (k and v are page pools), or none.
std::pair<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                                              const BatchShape& shape,
                                              const AttentionOptions& options,
                                              const std::optional<at::Tensor>& block_table) {
    FlashFwdParams params{};
    set_tensor_params(params, q, k, v, out, lse);
    set_batch_params(params, shape);
    if (block_table.has_value()) set_paged_kv_params(params, k, block_table);
    const OptionTensors option_tensors =
        set_option_params(params, options, shape.seqlen_q, shape.seqlen_k);
    const KernelEntry<FlashFwdParams>& kernel = select_kernel<FlashFwdParams>(
        kernel_config(q, shape, options), &params, compute_capability(q.device()),
        shape.heads.head_dim, "forward");

    at::Tensor dropout_mask = at::empty({0}, q.options());
    if (options.return_dropout_mask && options.dropout_p > 0.0) {
        // Zeroed: pairs the kernel skips (invisible, or past a sequence end) read as kept zeros.
        dropout_mask =
            at::zeros({shape.batch, shape.heads.nheads, round_up(shape.seqlen_q, kDropoutMaskBlock),
                       round_up(shape.seqlen_k, kDropoutMaskBlock)},
                      q.options());
        params.dropout_mask_ptr = dropout_mask.data_ptr();
        params.dropout_mask_batch_stride = dropout_mask.stride(0);
        params.dropout_mask_head_stride = dropout_mask.stride(1);
        params.dropout_mask_row_stride = dropout_mask.stride(2);
    }
    at::Tensor rng_state = take_philox_state(params, options, q.device());
    if (shape.batch == 0 || q.numel() == 0) return {dropout_mask, rng_state};  // nothing to do

    launch_kernel(kernel, params, q.device(), "forward");
    return {dropout_mask, rng_state};
}

}  // namespace

ForwardResult varlen_fwd(const VarlenFwdArgs& args) {
    const at::Tensor& q = args.q;
    const bool paged = args.block_table.has_value();
    // Paged: k and v are (num_pages, page_size, nheads_k, d) pools.
    const int kv_rank = paged ? 4 : 3;
    check_qkv_tensor(q, "q", q.scalar_type(), 3);
    check_qkv_tensor(args.k, "k", q.scalar_type(), kv_rank);
    check_qkv_tensor(args.v, "v", q.scalar_type(), kv_rank);
    const HeadShape heads = check_heads(q, args.k, args.v);
    const int64_t batch =
        check_varlen_batch(q, args.k, args.v, args.cu_seqlens_q, args.cu_seqlens_k,
                           args.max_seqlen_q, args.max_seqlen_k);
    if (paged) check_paged_kv(args.k, args.v, *args.block_table, batch, args.max_seqlen_k);
    check_attention_options(args.options, {batch, heads.nheads});
    for (const auto& [t, name] : {std::pair{&q, "q"},
                                  {&args.k, "k"},
                                  {&args.v, "v"},
                                  {&args.cu_seqlens_q, "cu_seqlens_q"},
                                  {&args.cu_seqlens_k, "cu_seqlens_k"}}) {
        check_device(*t, name, q.device());
    }
    if (paged) check_device(*args.block_table, "block_table", q.device());
    check_attention_option_devices(args.options, q.device());

    at::Tensor out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor lse = at::empty({heads.nheads, q.size(0)}, q.options().dtype(at::kFloat));
    const BatchShape shape = varlen_shape(heads, q, args.k, args.cu_seqlens_q, args.cu_seqlens_k,
                                          batch, args.max_seqlen_q, args.max_seqlen_k);
    auto [dropout_mask, rng_state] =
        run_forward(q, args.k, args.v, out, lse, shape, args.options, args.block_table);
    return {out, lse, dropout_mask, rng_state};
}

ForwardResult fwd(const FwdArgs& args) {
    const at::Tensor& q = args.q;
    check_qkv_tensor(q, "q", q.scalar_type(), 4);
    check_qkv_tensor(args.k, "k", q.scalar_type(), 4);
    check_qkv_tensor(args.v, "v", q.scalar_type(), 4);
    check_fixed_batch(q, args.k, args.v);
    const HeadShape heads = check_heads(q, args.k, args.v);
    check_attention_options(args.options, {q.size(0), heads.nheads});
    for (const auto& [t, name] : {std::pair{&q, "q"}, {&args.k, "k"}, {&args.v, "v"}}) {
        check_device(*t, name, q.device());
    }
    check_attention_option_devices(args.options, q.device());

    at::Tensor out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor lse = at::empty({q.size(0), heads.nheads, q.size(1)}, q.options().dtype(at::kFloat));
    const BatchShape shape = fixed_shape(heads, q, args.k);
    auto [dropout_mask, rng_state] =
        run_forward(q, args.k, args.v, out, lse, shape, args.options, std::nullopt);
    return {out, lse, dropout_mask, rng_state};
}

}  // namespace flash_varlen
