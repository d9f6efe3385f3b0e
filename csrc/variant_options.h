// The attention variants both directions share (sliding window, causal alignment, soft-capping,
// ALiBi, used lengths, dropout): checked on the host, never reading device memory, and written
// into the params as runtime fields (flash_params.h), so that no variant adds a template
// instantiation besides the local-mask one.
#pragma once

#include <torch/extension.h>

#include <optional>

#include "kernels/flash_params.h"

namespace flash_varlen {

// The binding arguments, as flash-attn names them. A window side of -1 is unbounded.
struct VariantOptions {
    bool causal;
    int64_t window_left;
    int64_t window_right;
    double softcap;
    std::optional<at::Tensor> alibi_slopes;  // (nheads,) or (batch, nheads) float32
    std::optional<at::Tensor> seqused_q;     // (batch,) int32, varlen only
    std::optional<at::Tensor> seqused_k;
    bool causal_top_left;
    double dropout_p;
};

// The device tensors the params point into, kept alive until the launch.
struct VariantTensors {
    at::Tensor alibi_slopes;
    at::Tensor seqused_q;
    at::Tensor seqused_k;
};

// Every rule but the devices: window sides >= -1, a finite softcap >= 0, dropout_p in [0, 1),
// and the dtypes and shapes of the slopes and used lengths.
void check_variant_options(const VariantOptions& options, int64_t batch, int64_t nheads);

// The devices of the optional tensors (q's device), after every other rule.
void check_variant_devices(const VariantOptions& options, const at::Device& device);

// Whether the local-mask kernel is needed: causal, or a window side that can hide some key of
// sequences up to max_seqlen_q x max_seqlen_k.
bool needs_local_mask(const VariantOptions& options, int64_t max_seqlen_q, int64_t max_seqlen_k);

// Fills the scales, the window, the ALiBi slopes, the used lengths and dropout's threshold into
// params (not the Philox state; see below) and returns the tensors they point into.
VariantTensors set_variant_params(FlashFwdParams& params, const VariantOptions& options,
                                  double softmax_scale, int64_t max_seqlen_q, int64_t max_seqlen_k);

// Forward with dropout: takes the Philox state from PyTorch's default CUDA generator for this
// launch (graph-safe) and returns the (2,) int64 device tensor the kernel records (seed, offset)
// in for the backward. Without dropout: an empty (0,) int64 tensor.
at::Tensor take_philox_state(FlashFwdParams& params, const VariantOptions& options,
                             const at::Device& device);

// Backward with dropout: the forward's recorded state (checked: (2,) int64 on the device).
void use_recorded_philox_state(FlashFwdParams& params, const VariantOptions& options,
                               const std::optional<at::Tensor>& rng_state,
                               const at::Device& device);

}  // namespace flash_varlen
