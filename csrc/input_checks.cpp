#include "input_checks.h"

#include <cmath>

#include "error_message.h"

namespace flash_varlen {
namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kHeadDimMultiple = 8;  // 16-byte vector loads of fp16/bf16
constexpr int kVectorElems = 8;      // elements per 16-byte access
constexpr int kAccessBytes = 16;
// In-tile offsets are 32-bit: a 128-row tile times the row stride must stay below 2^31.
constexpr int64_t kMaxRowStride = (int64_t(1) << 31) / 128;

}  // namespace

int head_dim_bucket(int head_dim) {
    for (int bucket : kHeadDimBuckets) {
        if (head_dim <= bucket) return bucket;
    }
    return -1;
}

const char* dtype_name(ElementType t) {
    return t == ElementType::kFloat16 ? "float16" : "bfloat16";
}

ElementType element_type_of(const at::Tensor& t) {
    return t.scalar_type() == at::kHalf ? ElementType::kFloat16 : ElementType::kBFloat16;
}

void check_qkv_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int rank) {
    TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                message(name, " must be float16 or bfloat16, got ", t.scalar_type()));
    TORCH_CHECK(t.scalar_type() == dtype,
                message(name, " must have the dtype of q (", dtype, "), got ", t.scalar_type()));
    TORCH_CHECK(t.dim() == rank, message(name, " must have ", rank, " dimensions, got ", t.dim()));
    TORCH_CHECK(
        t.stride(-1) == 1,
        message(name, " must have a contiguous last dimension (stride 1), got ", t.stride(-1)));
    for (int d = 0; d < rank - 1; ++d) {
        // A stride of a dim of size 0 or 1 never multiplies a nonzero index.
        if (t.size(d) <= 1) continue;
        TORCH_CHECK(t.stride(d) % kVectorElems == 0,
                    message(name, ".stride(", d, ") must be a multiple of ", kVectorElems,
                            " elements (16-byte loads), got ", t.stride(d)));
    }
    TORCH_CHECK(
        t.size(rank - 3) <= 1 || t.stride(rank - 3) < kMaxRowStride,
        message(name, "'s row stride must be below ", kMaxRowStride, ", got ", t.stride(rank - 3)));
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % kAccessBytes == 0,
                message(name, "'s data pointer must be 16-byte aligned"));
}

void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
    TORCH_CHECK(t.is_cuda(), message(name, " must be a CUDA tensor, got device ", t.device()));
    TORCH_CHECK(t.device() == device,
                message(name, " must be on the device of q (", device, "), got ", t.device()));
}

void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& like,
                      const char* like_name) {
    TORCH_CHECK(t.sizes() == like.sizes(), message(name, " must have the shape of ", like_name,
                                                   " ", like.sizes(), ", got ", t.sizes()));
}

void check_cu_seqlens(const at::Tensor& t, const char* name, int64_t expected_len) {
    TORCH_CHECK(t.scalar_type() == at::kInt,
                message(name, " must be int32, got ", t.scalar_type()));
    TORCH_CHECK(t.dim() == 1, message(name, " must be 1-D, got ", t.dim(), " dimensions"));
    TORCH_CHECK(t.size(0) == expected_len, message(name, " must have batch + 1 = ", expected_len,
                                                   " entries, got ", t.size(0)));
    TORCH_CHECK(t.is_contiguous(), message(name, " must be contiguous"));
}

void check_row_stats(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.scalar_type() == at::kFloat,
                message(name, " must be float32, got ", t.scalar_type()));
    TORCH_CHECK(t.sizes() == shape,
                message(name, " must have shape ", shape, ", got ", t.sizes()));
}

HeadShape check_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    const int head_dim = q.size(-1);
    TORCH_CHECK(head_dim % kHeadDimMultiple == 0 && head_dim > 0 && head_dim <= kMaxHeadDim,
                message("head dim (q.shape[-1]) must be a positive multiple of ", kHeadDimMultiple,
                        " and at most ", kMaxHeadDim, ", got ", head_dim));
    TORCH_CHECK(k.size(-1) == head_dim && v.size(-1) == head_dim,
                message("k and v must have the head dim of q (", head_dim, "), got ", k.size(-1),
                        " and ", v.size(-1)));
    const int nheads = q.size(-2);
    const int nheads_k = k.size(-2);
    TORCH_CHECK(v.size(-2) == nheads_k,
                message("v must have the number of heads of k (", nheads_k, "), got ", v.size(-2)));
    TORCH_CHECK(nheads_k > 0 && nheads % nheads_k == 0,
                message("nheads of q (", nheads, ") must be a multiple of nheads of k and v (",
                        nheads_k, ")"));
    return {nheads, nheads_k, head_dim};
}

int64_t check_varlen_batch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                           int64_t max_seqlen_q, int64_t max_seqlen_k) {
    TORCH_CHECK(k.size(0) == v.size(0), message("k and v must have the same number of tokens, got ",
                                                k.size(0), " and ", v.size(0)));
    const int64_t batch_plus_one = cu_seqlens_q.numel();
    TORCH_CHECK(batch_plus_one >= 2,
                message("cu_seqlens_q must have at least 2 entries (batch + 1)"));
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", batch_plus_one);
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", batch_plus_one);
    TORCH_CHECK(max_seqlen_q > 0 && max_seqlen_k > 0,
                message("max_seqlen_q and max_seqlen_k must be positive, got ", max_seqlen_q,
                        " and ", max_seqlen_k));
    return batch_plus_one - 1;
}

void check_fixed_batch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                message("q, k and v must have the same batch size, got ", q.size(0), ", ",
                        k.size(0), " and ", v.size(0)));
    TORCH_CHECK(k.size(1) == v.size(1), message("k and v must have the same seqlen_k, got ",
                                                k.size(1), " and ", v.size(1)));
}

void check_softmax_scale(double softmax_scale) {
    TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0,
                message("softmax_scale must be a positive finite number, got ", softmax_scale));
}

template <typename Params>
Launcher<Params> find_launcher(const at::Tensor& q, int head_dim, bool local,
                               const char* direction) {
    const ElementType type = element_type_of(q);
    const int bucket = head_dim_bucket(head_dim);
    const Launcher<Params> launch = find_kernel<Params>({type, bucket, local});
    TORCH_CHECK_NOT_IMPLEMENTED(
        launch != nullptr,
        message("flash_varlen was built without the ", direction, " kernel for dtype=",
                dtype_name(type), ", head-dim bucket ", bucket, " (head dim ", head_dim,
                "), local mask=", local,
                ". Rebuild with FLASH_VARLEN_DTYPES / FLASH_VARLEN_HEAD_DIMS covering it "
                "(unset both for the full build)."));
    return launch;
}

template FwdLauncher find_launcher<FlashFwdParams>(const at::Tensor&, int, bool, const char*);
template BwdLauncher find_launcher<FlashBwdParams>(const at::Tensor&, int, bool, const char*);

void set_strides(int64_t* batch, int64_t* row, int64_t* head, const at::Tensor& t,
                 bool has_batch) {
    *batch = has_batch ? t.stride(0) : 0;
    *row = t.stride(-3);
    *head = t.stride(-2);
}

}  // namespace flash_varlen
