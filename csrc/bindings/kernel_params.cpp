#include "bindings/kernel_params.h"

#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>
#include <mutex>

#include "bindings/error_message.h"
#include "bindings/input_checks.h"
#include "generated/contract.h"

namespace flash_varlen {
namespace {

// A window side that no (query, key) distance reaches in sequences up to these lengths: the
// kernels then need no special case for an unbounded side.
int64_t unbounded_side(int64_t max_seqlen_q, int64_t max_seqlen_k) {
    return max_seqlen_q + max_seqlen_k + 1;
}

// The side as the kernels use it: unbounded sides, and sides too wide to hide anything, become
// unbounded_side.
int64_t effective_side(int64_t side, int64_t max_seqlen_q, int64_t max_seqlen_k) {
    const int64_t unbounded = unbounded_side(max_seqlen_q, max_seqlen_k);
    return side == kUnboundedWindowSide || side > unbounded ? unbounded : side;
}

int64_t effective_right(const AttentionOptions& options, int64_t max_seqlen_q,
                        int64_t max_seqlen_k) {
    return options.causal ? 0 : effective_side(options.window_right, max_seqlen_q, max_seqlen_k);
}

// The kernels draw 32 bits per pair and keep it when the draw is >= the threshold.
uint32_t dropout_threshold(double dropout_p) {
    if (dropout_p == 0.0) return 0;
    constexpr double kDraws = 4294967296.0;  // 2^32
    const double threshold = std::floor(dropout_p * kDraws);
    // At least 1, so that a tiny p still takes the dropout path (threshold 0 means "none").
    return static_cast<uint32_t>(std::min(std::max(threshold, 1.0), kDraws - 1.0));
}

}  // namespace

BatchShape varlen_shape(const HeadShape& heads, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                        int64_t batch, int64_t max_seqlen_q, int64_t max_seqlen_k) {
    return {heads,
            cu_seqlens_q.data_ptr<int>(),
            cu_seqlens_k.data_ptr<int>(),
            static_cast<int>(batch),
            static_cast<int>(max_seqlen_q),
            static_cast<int>(max_seqlen_k),
            q.size(0),
            // A page pool's rows: every page's.
            k.dim() == 4 ? k.size(0) * k.size(1) : k.size(0)};
}

BatchShape fixed_shape(const HeadShape& heads, const at::Tensor& q, const at::Tensor& k) {
    return {heads,
            nullptr,
            nullptr,
            static_cast<int>(q.size(0)),
            static_cast<int>(q.size(1)),
            static_cast<int>(k.size(1)),
            q.size(0) * q.size(1),
            k.size(0) * k.size(1)};
}

KernelConfig kernel_config(const at::Tensor& q, const BatchShape& shape,
                           const AttentionOptions& options) {
    return {element_type_of(q), head_dim_bucket(shape.heads.head_dim),
            needs_local_mask(options, shape.seqlen_q, shape.seqlen_k)};
}

void set_tensor_params(FlashFwdParams& params, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
    const bool has_batch = q.dim() == 4;
    const bool kv_has_batch = k.dim() == 4;
    params.q_ptr = q.data_ptr();
    params.k_ptr = k.data_ptr();
    params.v_ptr = v.data_ptr();
    params.o_ptr = out.data_ptr();
    params.softmax_lse_ptr = lse.data_ptr<float>();
    set_strides(&params.q_batch_stride, &params.q_row_stride, &params.q_head_stride, q, has_batch);
    set_strides(&params.k_batch_stride, &params.k_row_stride, &params.k_head_stride, k,
                kv_has_batch);
    set_strides(&params.v_batch_stride, &params.v_row_stride, &params.v_head_stride, v,
                kv_has_batch);
    set_strides(&params.o_batch_stride, &params.o_row_stride, &params.o_head_stride, out,
                has_batch);
    // Rows of one head are contiguous in both lse layouts.
    params.lse_batch_stride = has_batch ? lse.stride(0) : 0;
    params.lse_head_stride = lse.stride(-2);
}

void set_batch_params(FlashFwdParams& params, const BatchShape& shape) {
    params.cu_seqlens_q = shape.cu_seqlens_q;
    params.cu_seqlens_k = shape.cu_seqlens_k;
    params.batch = shape.batch;
    params.nheads = shape.heads.nheads;
    params.nheads_k = shape.heads.nheads_k;
    params.head_dim = shape.heads.head_dim;
    params.seqlen_q = shape.seqlen_q;
    params.seqlen_k = shape.seqlen_k;
    params.total_q = shape.query_rows;
    params.total_k = shape.key_rows;
}

void set_paged_kv_params(FlashFwdParams& params, const at::Tensor& k,
                         const std::optional<at::Tensor>& block_table) {
    params.block_table = block_table.has_value() ? block_table->data_ptr<int>() : nullptr;
    params.block_table_batch_stride = block_table.has_value() ? block_table->stride(0) : 0;
    params.page_size = static_cast<int>(k.size(1));
    params.num_pages = static_cast<int>(k.size(0));
}

bool needs_local_mask(const AttentionOptions& options, int64_t max_seqlen_q, int64_t max_seqlen_k) {
    const int64_t unbounded = unbounded_side(max_seqlen_q, max_seqlen_k);
    return effective_side(options.window_left, max_seqlen_q, max_seqlen_k) < unbounded ||
           effective_right(options, max_seqlen_q, max_seqlen_k) < unbounded;
}

OptionTensors set_option_params(FlashFwdParams& params, const AttentionOptions& options,
                                int64_t max_seqlen_q, int64_t max_seqlen_k) {
    const double softmax_scale = options.softmax_scale;
    // The kernels add a side to a row index and a diagonal in 32-bit arithmetic.
    constexpr int64_t kMaxSide = std::numeric_limits<int>::max() / 4;
    TORCH_CHECK_VALUE(unbounded_side(max_seqlen_q, max_seqlen_k) <= kMaxSide,
                      message("max_seqlen_q + max_seqlen_k must be below ", kMaxSide, ", got ",
                              max_seqlen_q + max_seqlen_k));
    params.window_left =
        static_cast<int>(effective_side(options.window_left, max_seqlen_q, max_seqlen_k));
    params.window_right = static_cast<int>(effective_right(options, max_seqlen_q, max_seqlen_k));
    params.causal_top_left = options.causal_top_left;

    params.softmax_scale = static_cast<float>(softmax_scale);
    const bool capped = options.softcap > 0.0;
    const double logit_scale = capped ? options.softcap : softmax_scale;
    params.logit_scale = static_cast<float>(logit_scale);
    params.logit_scale_log2 = static_cast<float>(logit_scale * M_LOG2E);
    params.softcap_prescale = capped ? static_cast<float>(softmax_scale / options.softcap) : 0.f;

    OptionTensors tensors;
    if (options.alibi_slopes.has_value()) {
        tensors.alibi_slopes = options.alibi_slopes->contiguous();
        params.alibi_slopes = tensors.alibi_slopes.data_ptr<float>();
        params.alibi_batch_stride = tensors.alibi_slopes.dim() == 2 ? params.nheads : 0;
    }
    if (options.seqused_q.has_value()) {
        tensors.seqused_q = options.seqused_q->contiguous();
        params.seqused_q = tensors.seqused_q.data_ptr<int>();
    }
    if (options.seqused_k.has_value()) {
        tensors.seqused_k = options.seqused_k->contiguous();
        params.seqused_k = tensors.seqused_k.data_ptr<int>();
    }
    if (options.learnable_sink.has_value()) {
        tensors.learnable_sink = options.learnable_sink->contiguous();
        params.learnable_sink = tensors.learnable_sink.data_ptr<float>();
    }

    params.dropout_threshold = dropout_threshold(options.dropout_p);
    params.dropout_rescale = static_cast<float>(1.0 / (1.0 - options.dropout_p));
    return tensors;
}

at::Tensor take_philox_state(FlashFwdParams& params, const AttentionOptions& options,
                             const at::Device& device) {
    const auto int64_on_device = at::TensorOptions().dtype(at::kLong).device(device);
    if (options.dropout_p == 0.0) return at::empty({0}, int64_on_device);
    at::Tensor rng_state = at::empty({kRngStateSize}, int64_on_device);
    auto* generator = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
    at::PhiloxCudaState state;
    {
        std::lock_guard<std::mutex> lock(generator->mutex_);
        state = generator->philox_cuda_state(kPhiloxOffsetGranularity);
    }
    if (state.captured_) {
        params.philox_seed_ptr = state.seed_.ptr;
        params.philox_offset_ptr = state.offset_.ptr;
        params.philox_offset_extra = state.offset_intragraph_;
    } else {
        params.philox_seed = state.seed_.val;
        params.philox_offset = state.offset_.val;
    }
    params.rng_state_out = rng_state.data_ptr<int64_t>();
    return rng_state;
}

void use_recorded_philox_state(FlashFwdParams& params, const AttentionOptions& options,
                               const std::optional<at::Tensor>& rng_state,
                               const at::Device& device) {
    if (options.dropout_p == 0.0) return;
    TORCH_CHECK_VALUE(rng_state.has_value(),
                      "rng_state (the forward's fourth output) is required when dropout_p > 0");
    TORCH_CHECK_TYPE(rng_state->scalar_type() == at::kLong,
                     message("rng_state must be int64, got ", rng_state->scalar_type()));
    TORCH_CHECK_VALUE(
        rng_state->dim() == 1 && rng_state->size(0) == kRngStateSize && rng_state->is_contiguous(),
        message("rng_state must be a contiguous (", kRngStateSize, ",) tensor, got ",
                rng_state->sizes()));
    check_device(*rng_state, "rng_state", device);
    params.philox_seed_ptr = rng_state->data_ptr<int64_t>();
    params.philox_offset_ptr = params.philox_seed_ptr + 1;
}

}  // namespace flash_varlen
