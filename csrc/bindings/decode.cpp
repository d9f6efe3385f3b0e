// The KV-cache entry point, kvcache_fwd: checks the cache, its lengths and its addressing on the
// host (shapes, dtypes, strides and devices only: the lengths and tables stay on the device, so
// a decode step is CUDA-graph safe), fills FlashDecodeParams and runs the decode family
// (kernels/decode/) through the same dispatch and workspace path as the other directions.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

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
    check_attention_option_devices(args.options, q.device());

    const int64_t page_size = k_cache.size(1);
    const int64_t capacity = paged ? args.block_table->size(1) * page_size : page_size;
    TORCH_CHECK_VALUE(capacity <= std::numeric_limits<int>::max(),
                      message("a request's cache holds at most 2^31 - 1 keys, got ", capacity));
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

    const KernelConfig config{element_type_of(q), head_dim_bucket(heads.head_dim),
                              /*is_local=*/false};
    const KernelEntry<FlashDecodeParams>& kernel = select_kernel<FlashDecodeParams>(
        config, &params, compute_capability(q.device()), heads.head_dim, "decode");
    // The two unused outputs (the forward's layout of returns) are distinct tensors: a custom
    // op's returns may not alias one another (torch.library checks it at every call).
    auto unused = [&] { return at::empty({0}, q.options()); };
    if (batch != 0 && q.numel() != 0) launch_kernel(kernel, params, q.device(), "decode");
    return {out, lse, unused(), unused()};
}

}  // namespace flash_varlen
