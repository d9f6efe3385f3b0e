// pybind11 bindings: check inputs on the host (never reading device memory), fill the params
// struct, pick the current stream, and dispatch to a registered kernel. The fixed-length entry
// point is the varlen one with implicit uniform lengths: both end in run_forward.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "error_message.h"
#include "kernels/flash_params.h"
#include "kernels/kernel_registry.h"

namespace flash_varlen {
namespace {

constexpr int kHeadDimBuckets[] = {64, 96, 128, 192, 256};
constexpr int kMaxHeadDim = 256;
constexpr int kHeadDimMultiple = 8;  // 16-byte vector loads of fp16/bf16
constexpr int kVectorElems = 8;      // elements per 16-byte access
// In-tile offsets are 32-bit: a 128-row tile times the row stride must stay below 2^31.
constexpr int64_t kMaxRowStride = (int64_t(1) << 31) / 128;

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

void check_qkv_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int rank,
                      const at::Device& device) {
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
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                message(name, "'s data pointer must be 16-byte aligned"));
    // Devices last, as in the Python layer: the other rules are then testable without a GPU.
    TORCH_CHECK(t.is_cuda(), message(name, " must be a CUDA tensor, got device ", t.device()));
    TORCH_CHECK(t.device() == device,
                message(name, " must be on the device of q (", device, "), got ", t.device()));
}

void check_cu_seqlens(const at::Tensor& t, const char* name, int64_t expected_len,
                      const at::Device& device) {
    TORCH_CHECK(t.scalar_type() == at::kInt,
                message(name, " must be int32, got ", t.scalar_type()));
    TORCH_CHECK(t.dim() == 1, message(name, " must be 1-D, got ", t.dim(), " dimensions"));
    TORCH_CHECK(t.size(0) == expected_len, message(name, " must have batch + 1 = ", expected_len,
                                                   " entries, got ", t.size(0)));
    TORCH_CHECK(t.is_contiguous(), message(name, " must be contiguous"));
    TORCH_CHECK(t.is_cuda() && t.device() == device,
                message(name, " must be on the device of q (", device, "), got ", t.device()));
}

// The shapes every layout shares once the batch and sequence modes are set aside.
struct HeadShape {
    int nheads;
    int nheads_k;
    int head_dim;
};

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

FwdLauncher find_launcher(const at::Tensor& q, int head_dim, bool causal) {
    const ElementType type = element_type_of(q);
    const int bucket = head_dim_bucket(head_dim);
    FwdLauncher launch = find_fwd_kernel({type, bucket, causal});
    TORCH_CHECK_NOT_IMPLEMENTED(
        launch != nullptr,
        message("flash_varlen was built without the forward kernel for dtype=", dtype_name(type),
                ", head-dim bucket ", bucket, " (head dim ", head_dim, "), causal=", causal,
                ". Rebuild with FLASH_VARLEN_DTYPES / FLASH_VARLEN_HEAD_DIMS covering it "
                "(unset both for the full build)."));
    return launch;
}

void set_strides(int64_t* batch, int64_t* row, int64_t* head, const at::Tensor& t, bool has_batch) {
    // t is (tokens, heads, d) or (batch, seqlen, heads, d).
    *batch = has_batch ? t.stride(0) : 0;
    *row = t.stride(-3);
    *head = t.stride(-2);
}

void run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                 at::Tensor& lse, const HeadShape& heads, const int* cu_seqlens_q,
                 const int* cu_seqlens_k, int batch, int seqlen_q, int seqlen_k,
                 double softmax_scale, bool causal) {
    TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0,
                message("softmax_scale must be a positive finite number, got ", softmax_scale));
    const FwdLauncher launch = find_launcher(q, heads.head_dim, causal);
    if (batch == 0 || q.numel() == 0) return;  // nothing to compute, nothing to write

    const bool has_batch = q.dim() == 4;
    FlashFwdParams params{};
    params.q_ptr = q.data_ptr();
    params.k_ptr = k.data_ptr();
    params.v_ptr = v.data_ptr();
    params.o_ptr = out.data_ptr();
    params.softmax_lse_ptr = lse.data_ptr<float>();
    set_strides(&params.q_batch_stride, &params.q_row_stride, &params.q_head_stride, q, has_batch);
    set_strides(&params.k_batch_stride, &params.k_row_stride, &params.k_head_stride, k, has_batch);
    set_strides(&params.v_batch_stride, &params.v_row_stride, &params.v_head_stride, v, has_batch);
    set_strides(&params.o_batch_stride, &params.o_row_stride, &params.o_head_stride, out,
                has_batch);
    // lse: (nheads, total_q) varlen or (batch, nheads, seqlen_q) fixed; rows of a head contiguous.
    params.lse_batch_stride = has_batch ? lse.stride(0) : 0;
    params.lse_head_stride = lse.stride(-2);
    params.cu_seqlens_q = cu_seqlens_q;
    params.cu_seqlens_k = cu_seqlens_k;
    params.batch = batch;
    params.nheads = heads.nheads;
    params.nheads_k = heads.nheads_k;
    params.head_dim = heads.head_dim;
    params.seqlen_q = seqlen_q;
    params.seqlen_k = seqlen_k;
    params.softmax_scale = static_cast<float>(softmax_scale);
    params.softmax_scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);

    const at::cuda::CUDAGuard device_guard(q.device());
    const cudaError_t err = launch(params, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess,
                message("flash_varlen forward kernel launch failed: ", cudaGetErrorString(err)));
}

}  // namespace

// q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_*: (batch + 1,) int32.
// Returns out (total_q, nheads, d) and softmax_lse (nheads, total_q) float32.
std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                              const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                              int64_t max_seqlen_k, double softmax_scale,
                                              bool causal) {
    check_qkv_tensor(q, "q", q.scalar_type(), 3, q.device());
    check_qkv_tensor(k, "k", q.scalar_type(), 3, q.device());
    check_qkv_tensor(v, "v", q.scalar_type(), 3, q.device());
    TORCH_CHECK(k.size(0) == v.size(0), message("k and v must have the same number of tokens, got ",
                                                k.size(0), " and ", v.size(0)));
    const HeadShape heads = check_heads(q, k, v);
    const int64_t batch_plus_one = cu_seqlens_q.numel();
    TORCH_CHECK(batch_plus_one >= 2,
                message("cu_seqlens_q must have at least 2 entries (batch + 1)"));
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", batch_plus_one, q.device());
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", batch_plus_one, q.device());
    TORCH_CHECK(max_seqlen_q > 0 && max_seqlen_k > 0,
                message("max_seqlen_q and max_seqlen_k must be positive, got ", max_seqlen_q,
                        " and ", max_seqlen_k));

    at::Tensor out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor lse = at::empty({heads.nheads, q.size(0)}, q.options().dtype(at::kFloat));
    run_forward(q, k, v, out, lse, heads, cu_seqlens_q.data_ptr<int>(),
                cu_seqlens_k.data_ptr<int>(), static_cast<int>(batch_plus_one - 1),
                static_cast<int>(max_seqlen_q), static_cast<int>(max_seqlen_k), softmax_scale,
                causal);
    return {out, lse};
}

// q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d).
// Returns out (batch, seqlen_q, nheads, d) and softmax_lse (batch, nheads, seqlen_q) float32.
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, double softmax_scale, bool causal) {
    check_qkv_tensor(q, "q", q.scalar_type(), 4, q.device());
    check_qkv_tensor(k, "k", q.scalar_type(), 4, q.device());
    check_qkv_tensor(v, "v", q.scalar_type(), 4, q.device());
    TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                message("q, k and v must have the same batch size, got ", q.size(0), ", ",
                        k.size(0), " and ", v.size(0)));
    TORCH_CHECK(k.size(1) == v.size(1), message("k and v must have the same seqlen_k, got ",
                                                k.size(1), " and ", v.size(1)));
    const HeadShape heads = check_heads(q, k, v);

    at::Tensor out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor lse = at::empty({q.size(0), heads.nheads, q.size(1)}, q.options().dtype(at::kFloat));
    run_forward(q, k, v, out, lse, heads, nullptr, nullptr, static_cast<int>(q.size(0)),
                static_cast<int>(q.size(1)), static_cast<int>(k.size(1)), softmax_scale, causal);
    return {out, lse};
}

std::vector<std::tuple<std::string, int>> compiled_kernels() {
    std::vector<std::tuple<std::string, int>> configs;
    for (const FwdKernelEntry& entry : registered_fwd_kernels()) {
        std::tuple<std::string, int> config{dtype_name(entry.key.element_type),
                                            entry.key.head_dim_bucket};
        bool seen = false;
        for (const auto& c : configs) seen = seen || c == config;
        if (!seen) configs.push_back(config);
    }
    return configs;
}

std::vector<int> head_dim_buckets() {
    return std::vector<int>(std::begin(kHeadDimBuckets), std::end(kHeadDimBuckets));
}

}  // namespace flash_varlen

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "flash_varlen CUDA kernels: exact attention over packed variable-length sequences";
    m.def("varlen_fwd", &flash_varlen::varlen_fwd, "Forward attention over packed sequences",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"),
          py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
          py::arg("softmax_scale"), py::arg("causal"));
    m.def("fwd", &flash_varlen::fwd, "Forward attention over fixed-length sequences", py::arg("q"),
          py::arg("k"), py::arg("v"), py::arg("softmax_scale"), py::arg("causal"));
    m.def("compiled_kernels", &flash_varlen::compiled_kernels,
          "(dtype name, head-dim bucket) pairs this build contains");
    m.def("head_dim_buckets", &flash_varlen::head_dim_buckets,
          "head-dim buckets the kernels know; a head dim runs in the smallest bucket >= it");
}
