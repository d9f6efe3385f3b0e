// The attention options in the kernels' terms: the runtime fields of the params struct
// (kernels/common/flash_params.h) that the options set, and whether a call needs the local-mask
// instantiation. No option adds a template instantiation besides the local-mask one.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "bindings/input_checks.h"
#include "generated/attention_options.h"
#include "kernels/common/flash_params.h"
#include "kernels/common/kernel_registry.h"

namespace flash_varlen {

// A call's batch in kernel terms, the same for both layouts and directions.
struct BatchShape {
    HeadShape heads;
    const int* cu_seqlens_q;  // nullptr: fixed length
    const int* cu_seqlens_k;
    int batch;
    int seqlen_q;  // fixed length: the lengths; varlen: upper bounds
    int seqlen_k;
    int64_t query_rows;  // total_q, or batch * seqlen_q
    int64_t key_rows;    // total_k, or batch * seqlen_k
};

// The batch of a varlen call (lengths bounded by max_seqlen_q/k) and of a fixed-length one.
BatchShape varlen_shape(const HeadShape& heads, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                        int64_t batch, int64_t max_seqlen_q, int64_t max_seqlen_k);
BatchShape fixed_shape(const HeadShape& heads, const at::Tensor& q, const at::Tensor& k);

// The kernel a call needs: q's dtype, its head dim's bucket, and whether the mask is local.
KernelConfig kernel_config(const at::Tensor& q, const BatchShape& shape,
                           const AttentionOptions& options);

// Fills the pointers and strides of q, k, v, out and softmax_lse: (tokens, heads, d) tensors and
// an (nheads, total_q) lse (varlen), or (batch, seqlen, heads, d) tensors and a (batch, nheads,
// seqlen_q) lse (q has 4 dims: fixed length, and the KV-cache call). k and v of 4 dims have a
// batch stride: fixed length, or a page or entry stride for page pools (paged varlen, whose q
// has 3 dims) and KV caches.
void set_tensor_params(FlashFwdParams& params, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse);

// Fills the batch's fields of params: cu_seqlens, batch, heads, head dim, lengths and rows.
void set_batch_params(FlashFwdParams& params, const BatchShape& shape);

// Fills the paged K/V fields of params (flash_params.h) for k, a pool of (num_pages, page_size,
// nheads_k, d), and an int32 (batch, max_pages) block table, or none: the decode family's
// contiguous cache (batch_cache, seqlen_cache, ...), whose entries count as pages.
void set_paged_kv_params(FlashFwdParams& params, const at::Tensor& k,
                         const std::optional<at::Tensor>& block_table);

// The device tensors the params point into, kept alive until the launch.
struct OptionTensors {
    at::Tensor alibi_slopes;
    at::Tensor seqused_q;
    at::Tensor seqused_k;
    at::Tensor learnable_sink;
};

// Whether the local-mask kernel is needed: causal, or a window side that can hide some key of
// sequences up to max_seqlen_q x max_seqlen_k.
bool needs_local_mask(const AttentionOptions& options, int64_t max_seqlen_q, int64_t max_seqlen_k);

// Fills the scales, the window, the ALiBi slopes, the used lengths, the sinks and dropout's
// threshold into params (not the Philox state; see below) and returns the tensors they point into.
OptionTensors set_option_params(FlashFwdParams& params, const AttentionOptions& options,
                                int64_t max_seqlen_q, int64_t max_seqlen_k);

// Forward with dropout: takes the Philox state from PyTorch's default CUDA generator for this
// launch (graph-safe) and returns the (2,) int64 device tensor the kernel records (seed, offset)
// in for the backward. Without dropout: an empty (0,) int64 tensor.
at::Tensor take_philox_state(FlashFwdParams& params, const AttentionOptions& options,
                             const at::Device& device);

// Backward with dropout: the forward's recorded state (checked: (2,) int64 on the device).
void use_recorded_philox_state(FlashFwdParams& params, const AttentionOptions& options,
                               const std::optional<at::Tensor>& rng_state,
                               const at::Device& device);

}  // namespace flash_varlen
