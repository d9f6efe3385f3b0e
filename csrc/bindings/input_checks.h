// Host-side input checks shared by the forward and backward bindings. They read only shapes,
// strides, dtypes and devices, never device memory, and name the argument and the rule.
#pragma once

// ATen's tensor and error macros, not <torch/extension.h> (all of libtorch's C++ API and
// pybind11): each host file took about 35 CPU seconds to compile with it, 2 to 13 s without.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "generated/contract.h"
#include "kernels/common/kernel_registry.h"

namespace flash_varlen {

// The smallest bucket of kHeadDimBuckets >= head_dim, or -1.
int head_dim_bucket(int head_dim);

const char* dtype_name(ElementType t);
ElementType element_type_of(const at::Tensor& t);

// Devices are checked last (check_device, after every other rule), as in the Python layer, so
// that every other rule can be tested without a GPU.

// A (tokens, heads, d) or (batch, seqlen, heads, d) fp16/bf16 tensor the kernels can read in
// place: dtype `dtype`, `rank` dims, contiguous last dim, other strides multiples of 8 elements,
// a row stride that fits the kernels' 32-bit in-tile offsets, 16-byte aligned.
void check_qkv_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int rank);

// t is a CUDA tensor on `device` (the device of q).
void check_device(const at::Tensor& t, const char* name, const at::Device& device);

// t must have exactly the shape of `like` (named like_name), besides check_qkv_tensor's rules.
void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& like,
                      const char* like_name);

void check_cu_seqlens(const at::Tensor& t, const char* name, int64_t expected_len);

// A float32 per-row statistic (softmax_lse or its gradient) of the given shape.
void check_row_stats(const at::Tensor& t, const char* name, at::IntArrayRef shape);

// The shapes every layout shares once the batch and sequence modes are set aside.
struct HeadShape {
    int nheads;
    int nheads_k;
    int head_dim;
};

HeadShape check_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// Varlen: (batch + 1) entries of cu_seqlens_q, checked against cu_seqlens_k and the max lengths.
int64_t check_varlen_batch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                           int64_t max_seqlen_q, int64_t max_seqlen_k);

// Fixed length: q, k, v agree on the batch size and k, v on seqlen_k.
void check_fixed_batch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// An int32 index tensor (cache lengths, a block table) of sizes.size() dims with the given sizes
// (-1: any), last dim contiguous; shape_text names the dims in the message ("(batch,)").
void check_index_tensor(const at::Tensor& t, const char* name, std::initializer_list<int64_t> sizes,
                        const char* shape_text);

// Paged K/V in the varlen forward: k and v are (num_pages, page_size, nheads_k, d) pools of one
// shape (their other rules are check_qkv_tensor's), block_table an int32 (batch, max_pages)
// index tensor with max_pages * page_size >= max_seqlen_k.
void check_paged_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& block_table,
                    int64_t batch, int64_t max_seqlen_k);

// One shape a tensor option may have: its sizes, and how messages name them ("(batch, nheads)").
struct OptionShape {
    const char* names;
    std::vector<int64_t> sizes;
};

// A tensor option (alibi_slopes, seqused_q, ...) of dtype `dtype` (named dtype_name in
// messages) and one of `shapes`; `note` follows the shapes in the message. Any strides: the
// bindings make it contiguous.
void check_option_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                         const char* dtype_name, std::initializer_list<OptionShape> shapes,
                         const char* note);

// Batch, row and head strides in elements of a (tokens, heads, d) or (batch, seqlen, heads, d)
// tensor; the batch stride is 0 for the packed layout.
void set_strides(int64_t* batch, int64_t* row, int64_t* head, const at::Tensor& t, bool has_batch);

}  // namespace flash_varlen
