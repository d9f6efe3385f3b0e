#include "input_checks.h"

#include <cmath>
#include <limits>

#include "bindings/error_message.h"

namespace flash_varlen {

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
        TORCH_CHECK(t.stride(d) % kVectorElements == 0,
                    message(name, ".stride(", d, ") must be a multiple of ", kVectorElements,
                            " elements (16-byte loads), got ", t.stride(d)));
    }
    TORCH_CHECK(
        t.size(rank - 3) <= 1 || t.stride(rank - 3) < kMaxRowStride,
        message(name, "'s row stride must be below ", kMaxRowStride, ", got ", t.stride(rank - 3)));
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % kVectorBytes == 0,
                message(name, "'s data pointer must be 16-byte aligned"));
}

void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
    TORCH_CHECK(t.is_cuda(), message(name, " must be a CUDA tensor, got device ", t.device()));
    TORCH_CHECK(t.device() == device,
                message(name, " must be on the device of q (", device, "), got ", t.device()));
}

void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& like,
                      const char* like_name) {
    TORCH_CHECK(t.sizes() == like.sizes(), message(name, " must have the shape of ", like_name, " ",
                                                   like.sizes(), ", got ", t.sizes()));
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
    TORCH_CHECK(t.sizes() == shape, message(name, " must have shape ", shape, ", got ", t.sizes()));
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

void check_index_tensor(const at::Tensor& t, const char* name, std::initializer_list<int64_t> sizes,
                        const char* shape_text) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kInt,
                     message(name, " must have dtype torch.int32, got ", t.scalar_type()));
    bool shape_ok = t.dim() == int64_t(sizes.size());
    int dim = 0;
    for (const int64_t size : sizes) {
        shape_ok = shape_ok && (size < 0 || t.size(dim) == size);
        ++dim;
    }
    TORCH_CHECK_VALUE(shape_ok,
                      message(name, " must have shape ", shape_text, ", got ", t.sizes()));
    TORCH_CHECK_VALUE(t.stride(-1) == 1 || t.size(-1) == 1,
                      message(name, " must have a contiguous last dim"));
}

void check_paged_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& block_table,
                    int64_t batch, int64_t max_seqlen_k) {
    TORCH_CHECK_VALUE(k.sizes() == v.sizes(),
                      message("v must have the shape of k ", k.sizes(), " (page pools), got ",
                              v.sizes()));
    const int64_t num_pages = k.size(0);
    const int64_t page_size = k.size(1);
    constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
    TORCH_CHECK_VALUE(num_pages >= 1 && num_pages <= kMaxInt && page_size >= 1 &&
                          page_size <= kMaxInt,
                      message("k.shape[0] (num_pages) and k.shape[1] (page_size) must be in [1, ",
                              kMaxInt, "], got ", num_pages, " and ", page_size));
    check_index_tensor(block_table, "block_table", {batch, -1}, "(batch, max_pages)");
    TORCH_CHECK_VALUE(block_table.size(1) >= 1, "block_table must name at least one page");
    TORCH_CHECK_VALUE(block_table.size(1) * page_size >= max_seqlen_k,
                      message("block_table holds max_pages * page_size = ",
                              block_table.size(1) * page_size,
                              " keys per sequence, fewer than max_seqlen_k = ", max_seqlen_k));
}

void check_option_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                         const char* dtype_name, std::initializer_list<OptionShape> shapes,
                         const char* note) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype,
                     message(name, " must be ", dtype_name, ", got ", t.scalar_type()));
    std::string allowed;
    for (const OptionShape& shape : shapes) {
        if (t.sizes() == at::IntArrayRef(shape.sizes)) return;
        if (!allowed.empty()) allowed += " or ";
        allowed += message(shape.names, " = ", at::IntArrayRef(shape.sizes));
    }
    const std::string noted = note[0] != '\0' ? message(", ", note) : std::string();
    TORCH_CHECK_VALUE(false,
                      message(name, " must have shape ", allowed, noted, ", got ", t.sizes()));
}

void set_strides(int64_t* batch, int64_t* row, int64_t* head, const at::Tensor& t, bool has_batch) {
    *batch = has_batch ? t.stride(0) : 0;
    *row = t.stride(-3);
    *head = t.stride(-2);
}

}  // namespace flash_varlen
