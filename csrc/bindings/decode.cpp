// The KV-cache entry point, kvcache_fwd: checks the cache, its lengths and its addressing on the
// host (shapes, dtypes, strides and devices only: the lengths and tables stay on the device, so
// a decode step is CUDA-graph safe), fills FlashDecodeParams and runs the decode family
// (kernels/decode/) through the same dispatch and workspace path as the other directions.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <limits>
#include <utility>

#include "bindings/dispatch.h"
#include "bindings/error_message.h"
#include "bindings/input_checks.h"
#include "bindings/kernel_params.h"
#include "generated/entry_points.h"
#include "kernels/common/flash_params.h"

namespace flash_varlen {
namespace {

const int* index_ptr(const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->data_ptr<int>() : nullptr;
}

// The append step's inputs (kernels/decode/cache_append_kernel.h reads them element by element,
// so any strides but a contiguous last dim): k_new and v_new (batch, seqlen_new, nheads_k, d) in
// q's dtype, the rotary tables (seqlen_ro, rotary_dim / 2) float32 or in q's dtype, with
// 1 <= rotary_dim / 2 <= d / 2 and seqlen_ro >= the capacity.
void check_append_inputs(const KvcacheFwdArgs& args, const HeadShape& heads, int64_t capacity) {
    TORCH_CHECK_VALUE(args.k_new.has_value() == args.v_new.has_value(),
                      "k_new and v_new must be given together");
    TORCH_CHECK_VALUE(args.rotary_cos.has_value() == args.rotary_sin.has_value(),
                      "rotary_cos and rotary_sin must be given together");
    TORCH_CHECK_VALUE(!args.rotary_cos.has_value() || args.k_new.has_value(),
                      "rotary_cos and rotary_sin need k_new and v_new");
    if (!args.k_new.has_value()) return;
    const at::Tensor& q = args.q;
    // One thread block per (request, row) of the longer of the two (cache_append_kernel.h).
    const int64_t rows = std::max(args.k_new->dim() > 1 ? args.k_new->size(1) : 0, q.size(1));
    TORCH_CHECK_VALUE(q.size(0) * rows <= std::numeric_limits<int>::max(),
                      message("batch x max(seqlen_new, seqlen_q) must be below 2^31, got ",
                              q.size(0), " x ", rows));
    for (const auto& [t, name] : {std::pair{&*args.k_new, "k_new"}, {&*args.v_new, "v_new"}}) {
        TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(),
                         message(name, " must have the dtype of q (", q.scalar_type(), "), got ",
                                 t->scalar_type()));
        TORCH_CHECK_VALUE(
            t->dim() == 4 && t->size(0) == q.size(0) && t->size(2) == heads.nheads_k &&
                t->size(3) == heads.head_dim && t->sizes() == args.k_new->sizes(),
            message(name, " must have shape (batch, seqlen_new, nheads_k, d) = (", q.size(0),
                    ", seqlen_new, ", heads.nheads_k, ", ", heads.head_dim, ") like k_new, got ",
                    t->sizes()));
        TORCH_CHECK_VALUE(t->stride(3) == 1 || t->size(3) == 1,
                          message(name, " must have a contiguous last dim, got strides ",
                                  t->strides()));
    }
    TORCH_CHECK_VALUE(args.k_new->size(1) <= capacity,
                      message("k_new holds ", args.k_new->size(1), " new keys per request, more "
                              "than the cache holds (", capacity, ")"));
    if (!args.rotary_cos.has_value()) return;
    const at::Tensor& cos = *args.rotary_cos;
    for (const auto& [t, name] :
         {std::pair{&cos, "rotary_cos"}, {&*args.rotary_sin, "rotary_sin"}}) {
        TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == q.scalar_type(),
                         message(name, " must be float32 or have the dtype of q, got ",
                                 t->scalar_type()));
        TORCH_CHECK_VALUE(t->dim() == 2 && t->sizes() == cos.sizes() &&
                              t->scalar_type() == cos.scalar_type() &&
                              (t->stride(1) == 1 || t->size(1) == 1),
                          message(name, " must be (seqlen_ro, rotary_dim / 2) with a contiguous "
                                        "last dim, with rotary_cos's shape and dtype, got ",
                                  t->sizes(), " / ", t->strides(), " ", t->scalar_type()));
    }
    TORCH_CHECK_VALUE(cos.size(1) >= 1 && 2 * cos.size(1) <= heads.head_dim,
                      message("rotary_cos.shape[1] (rotary_dim / 2) must be in [1, d / 2 = ",
                              heads.head_dim / 2, "], got ", cos.size(1)));
    TORCH_CHECK_VALUE(cos.size(0) >= capacity,
                      message("rotary_cos.shape[0] must be at least the cache capacity (",
                              capacity, "), got ", cos.size(0)));
}

// The append step's params. q_rotated: where the rotated queries go (with rotary tables), which
// then become the attention's q.
void set_append_params(FlashDecodeParams& params, const KvcacheFwdArgs& args,
                       const at::Tensor& q_rotated) {
    CacheAppend& append = params.append;
    if (!args.k_new.has_value()) return;
    const at::Tensor& k = *args.k_new;
    const at::Tensor& v = *args.v_new;
    append.k = k.data_ptr();
    append.v = v.data_ptr();
    set_strides(&append.k_batch_stride, &append.k_row_stride, &append.k_head_stride, k, true);
    set_strides(&append.v_batch_stride, &append.v_row_stride, &append.v_head_stride, v, true);
    append.seqlen_new = int(k.size(1));
    if (!args.rotary_cos.has_value()) return;
    const at::Tensor& cos = *args.rotary_cos;
    append.rotary_cos = cos.data_ptr();
    append.rotary_sin = args.rotary_sin->data_ptr();
    append.rotary_cos_row_stride = cos.stride(0);
    append.rotary_sin_row_stride = args.rotary_sin->stride(0);
    append.rotary_rows = int(std::min<int64_t>(cos.size(0), std::numeric_limits<int>::max()));
    append.rotary_dim = int(2 * cos.size(1));
    append.rotary_tables_float = cos.scalar_type() == at::kFloat;
    append.rotary_interleaved = args.rotary_interleaved;
    // flash-attn's rule (flash_varlen/kvcache_validation.py, rotates_q_consecutively): the
    // queries sit at consecutive positions when the mask is causal or local.
    append.q_consecutive =
        args.options.causal || args.options.window_left != -1 || args.options.window_right != -1;
    append.q = args.q.data_ptr();
    set_strides(&append.q_batch_stride, &append.q_row_stride, &append.q_head_stride, args.q,
                true);
    append.q_rotated = q_rotated.data_ptr();
    params.q_ptr = q_rotated.data_ptr();
    set_strides(&params.q_batch_stride, &params.q_row_stride, &params.q_head_stride, q_rotated,
                true);
}

}  // namespace

ForwardResult kvcache_fwd(const KvcacheFwdArgs& args) {
    const at::Tensor& q = args.q;
    const at::Tensor& k_cache = args.k_cache;
    const at::Tensor& v_cache = args.v_cache;
    check_qkv_tensor(q, "q", q.scalar_type(), 4);
    check_qkv_tensor(k_cache, "k_cache", q.scalar_type(), 4);
    check_qkv_tensor(v_cache, "v_cache", q.scalar_type(), 4);
    const HeadShape heads = check_heads(q, k_cache, v_cache);
    // One offset per key row serves both caches (kernels/decode/kv_cache_rows.h).
    TORCH_CHECK_VALUE(
        k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
        message("k_cache and v_cache must have the same shape and strides, got ", k_cache.sizes(),
                " / ", k_cache.strides(), " and ", v_cache.sizes(), " / ", v_cache.strides()));
    const int64_t batch = q.size(0);
    const bool paged = args.block_table.has_value();
    check_index_tensor(args.cache_seqlens, "cache_seqlens", {batch}, "(batch,)");
    if (paged) {
        check_index_tensor(*args.block_table, "block_table", {batch, -1}, "(batch, max_pages)");
        TORCH_CHECK_VALUE(args.block_table->size(1) > 0, "block_table must name at least one page");
        TORCH_CHECK_VALUE(!args.cache_batch_idx.has_value() && !args.cache_leftpad.has_value(),
                          "cache_batch_idx and cache_leftpad cannot be combined with block_table");
    }
    for (const auto& [t, name] : {std::pair{&args.cache_batch_idx, "cache_batch_idx"},
                                  {&args.cache_leftpad, "cache_leftpad"}}) {
        if (t->has_value()) check_index_tensor(**t, name, {batch}, "(batch,)");
    }
    TORCH_CHECK_VALUE(args.num_splits >= 0,
                      message("num_splits must be >= 0 (0: heuristic), got ", args.num_splits));
    check_attention_options(args.options, {batch, heads.nheads});
    const int64_t page_size = k_cache.size(1);
    const int64_t capacity = paged ? args.block_table->size(1) * page_size : page_size;
    TORCH_CHECK_VALUE(capacity <= std::numeric_limits<int>::max(),
                      message("a request's cache holds at most 2^31 - 1 keys, got ", capacity));
    check_append_inputs(args, heads, capacity);
    check_device(q, "q", q.device());
    for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"},
                                  {&v_cache, "v_cache"},
                                  {&args.cache_seqlens, "cache_seqlens"}}) {
        check_device(*t, name, q.device());
    }
    for (const auto& [t, name] : {std::pair{&args.block_table, "block_table"},
                                  {&args.cache_batch_idx, "cache_batch_idx"},
                                  {&args.cache_leftpad, "cache_leftpad"}}) {
        if (t->has_value()) check_device(**t, name, q.device());
    }
    for (const auto& [t, name] : {std::pair{&args.k_new, "k_new"},
                                  {&args.v_new, "v_new"},
                                  {&args.rotary_cos, "rotary_cos"},
                                  {&args.rotary_sin, "rotary_sin"}}) {
        if (t->has_value()) check_device(**t, name, q.device());
    }
    check_attention_option_devices(args.options, q.device());
    at::Tensor out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor lse = at::empty({batch, heads.nheads, q.size(1)}, q.options().dtype(at::kFloat));

    FlashDecodeParams params{};
    set_tensor_params(params, q, k_cache, v_cache, out, lse);
    // q's fixed-length layout; no packed keys (cu_seqlens stay nullptr).
    BatchShape shape{};
    shape.heads = heads;
    shape.batch = int(batch);
    shape.seqlen_q = int(q.size(1));
    shape.seqlen_k = int(capacity);  // the bound of every request's keys
    shape.query_rows = batch * q.size(1);
    shape.key_rows = k_cache.size(0) * page_size;
    set_batch_params(params, shape);
    const OptionTensors option_tensors =
        set_option_params(params, args.options, shape.seqlen_q, shape.seqlen_k);
    params.cache_seqlens = args.cache_seqlens.data_ptr<int>();
    set_paged_kv_params(params, k_cache, args.block_table);
    params.cache_batch_idx = index_ptr(args.cache_batch_idx);
    params.cache_leftpad = index_ptr(args.cache_leftpad);
    params.num_splits = int(args.num_splits);
    const bool rotates = args.rotary_cos.has_value();
    const at::Tensor q_rotated = rotates ? at::empty_like(q, q.options().memory_format(
                                                                 at::MemoryFormat::Contiguous))
                                         : at::Tensor();
    set_append_params(params, args, q_rotated);

    const KernelConfig config{element_type_of(q), head_dim_bucket(heads.head_dim),
                              /*is_local=*/false};
    const KernelEntry<FlashDecodeParams>& kernel = select_kernel<FlashDecodeParams>(
        config, &params, compute_capability(q.device()), heads.head_dim, "decode");
    // The two unused outputs (the forward's layout of returns) are distinct tensors: a custom
    // op's returns may not alias one another (torch.library checks it at every call).
    auto unused = [&] { return at::empty({0}, q.options()); };
    // The launcher runs the append step (if any) before the attention, which it skips without
    // query rows.
    const bool appends = args.k_new.has_value() && args.k_new->numel() != 0;
    if (batch != 0 && (q.numel() != 0 || appends)) {
        launch_kernel(kernel, params, q.device(), "decode");
    }
    return {out, lse, unused(), unused()};
}

}  // namespace flash_varlen
