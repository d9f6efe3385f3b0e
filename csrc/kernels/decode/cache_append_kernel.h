// The append step of a decode call (flash_attn_with_kvcache with new keys k, v and rotary
// tables): one kernel that writes the new keys, rotated, and the new values into their cache
// cells, and writes the rotated queries that the attention then reads. It replaces about a dozen
// elementwise torch launches (flash_varlen/kvcache.py's append_to_cache and apply_rotary, which
// stay as the reference and the path of calls the decode kernels do not serve).
//
// One thread block per (request, row, head): row i of request b's new keys and values goes to
// cache position cache_seqlens[b] + i (the length before the append); row i of its queries is
// rotated at position cache_seqlens[b] + i with a causal or local mask, else at cache_seqlens[b]
// (flash-attn's rule). blockIdx.y says which of the two a block does. The threads walk the
// head's head_dim elements (one or two each); an element of the rotary part reads its pair
// partner too (dims 2j and 2j + 1 interleaved, j and j + rotary_dim / 2 otherwise). A block per
// row instead, its threads walking every head, cost a fixed ~20 us per decode step on an H100
// (bench_decode.py --append, the same at every cache size: 32 query heads x 128 dims are 32
// iterations per thread, each waiting for its global loads, since the compiler cannot move the
// next loads above a store that may alias them).
//
// The rotation is computed as the torch path computes it, in float32 with each product rounded
// on its own (no fused multiply-add) and subnormals kept (the build's --use_fast_math flushes
// them in compiler-generated float arithmetic, PyTorch's kernels do not), so that both give the
// same bits (tests compare them). The new keys must not overlap the cells they are written to:
// an element's pair partner may already have been overwritten (the torch path rotates into a
// new tensor first).
//
// A position outside the cache (cache_seqlens beyond capacity - seqlen_new, or negative), a
// cache_batch_idx outside the cache's entries, a page number outside the pool, or a position
// beyond the rotary tables stops the kernel (a trap: the call fails with a CUDA error) instead of
// writing elsewhere, as the torch path's indexed stores do with a device-side assertion. Debug
// mode (FLASH_VARLEN_DEBUG=1) checks these values on the host first, with messages that name them.
#pragma once

#include <cuda_runtime_api.h>
#include <cutlass/fast_math.h>

#include <cstdint>

#include "kernels/common/flash_params.h"

namespace flash_varlen {
namespace decode {

constexpr int kAppendThreads = 128;

// Round-to-nearest float32 arithmetic without flushing subnormals (PTX written out: nvcc's
// -ftz=true, part of --use_fast_math, would otherwise turn __fmul_rn into mul.rn.ftz).
__device__ __forceinline__ float multiply(float a, float b) {
    float result;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(result) : "f"(a), "f"(b));
    return result;
}

__device__ __forceinline__ float add(float a, float b) {
    float result;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(result) : "f"(a), "f"(b));
    return result;
}

__device__ __forceinline__ float subtract(float a, float b) {
    float result;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(result) : "f"(a), "f"(b));
    return result;
}

// Element `dim` of one head vector `x` after the rotary embedding at `position` (x as it is past
// rotary_dim, or without tables).
template <typename Element, typename Table>
__device__ __forceinline__ Element rotated_element(const Element* x, int dim, int position,
                                                   const CacheAppend& append) {
    if (append.rotary_cos == nullptr || dim >= append.rotary_dim) return x[dim];
    if (position < 0 || position >= append.rotary_rows) __trap();
    const int half = append.rotary_dim / 2;
    const int pair = append.rotary_interleaved ? dim / 2 : (dim < half ? dim : dim - half);
    const int first_dim = append.rotary_interleaved ? 2 * pair : pair;
    const int second_dim = append.rotary_interleaved ? first_dim + 1 : pair + half;
    const float cos = float(static_cast<const Table*>(
        append.rotary_cos)[int64_t(position) * append.rotary_cos_row_stride + pair]);
    const float sin = float(static_cast<const Table*>(
        append.rotary_sin)[int64_t(position) * append.rotary_sin_row_stride + pair]);
    const float first = float(x[first_dim]);
    const float second = float(x[second_dim]);
    const float rotated = dim == first_dim
                              ? subtract(multiply(first, cos), multiply(second, sin))
                              : add(multiply(first, sin), multiply(second, cos));
    return Element(rotated);
}

// Element offset, from the cache's base, of the cell of position `position` of `request`
// (heads and dims add to it). page_size: the pool's page size (paged caches only).
__device__ __forceinline__ int64_t cache_cell_offset(const FlashDecodeParams& params,
                                                     const cutlass::FastDivmod& page_size,
                                                     int request, int position) {
    // params.seqlen_k is the capacity of one request's cache.
    if (position < 0 || position >= params.seqlen_k) __trap();
    int page = 0;
    int slot = position;
    if (params.block_table != nullptr) {
        int page_index = 0;
        page_size(page_index, slot, position);
        page = params.block_table[int64_t(request) * params.block_table_batch_stride + page_index];
    } else {
        page = params.cache_batch_idx == nullptr ? request : params.cache_batch_idx[request];
    }
    // num_pages: the pool's pages, or the contiguous cache's entries.
    if (page < 0 || page >= params.num_pages) __trap();
    return int64_t(page) * params.k_batch_stride + int64_t(slot) * params.k_row_stride;
}

// Row `row` of request `request` of a (batch, rows, heads, d) tensor with these strides.
template <typename Element>
__device__ __forceinline__ Element* row_of(const void* base, int64_t batch_stride,
                                           int64_t row_stride, int request, int row) {
    return static_cast<Element*>(const_cast<void*>(base)) + int64_t(request) * batch_stride +
           int64_t(row) * row_stride;
}

// fn(dim) for every element of one head vector, over the block's threads.
template <typename Fn>
__device__ __forceinline__ void for_each_dim(int head_dim, Fn fn) {
    for (int dim = threadIdx.x; dim < head_dim; dim += kAppendThreads) fn(dim);
}

// page_size: the pool's page size (any value for a contiguous cache, which never divides).
template <typename Element, typename Table>
__global__ void __launch_bounds__(kAppendThreads)
    cache_append_kernel(const __grid_constant__ FlashDecodeParams params,
                        const __grid_constant__ cutlass::FastDivmod page_size) {
    const CacheAppend& append = params.append;
    const bool queries = blockIdx.y == 1;
    // The grid has a block for each row of the longer of the two, per request, and for each head
    // of the one with more heads.
    const int grid_rows = gridDim.x / params.batch;
    const int request = blockIdx.x / grid_rows;
    const int row = blockIdx.x % grid_rows;
    const int head = blockIdx.z;
    if (row >= (queries ? params.seqlen_q : append.seqlen_new)) return;
    if (head >= (queries ? params.nheads : params.nheads_k)) return;
    const int length = params.cache_seqlens[request];
    const int head_dim = params.head_dim;

    if (queries) {
        const int position = length + (append.q_consecutive ? row : 0);
        const Element* q =
            row_of<Element>(append.q, append.q_batch_stride, append.q_row_stride, request, row);
        // The rotated copy the attention reads (params.q_ptr, q_* strides).
        Element* rotated = row_of<Element>(append.q_rotated, params.q_batch_stride,
                                           params.q_row_stride, request, row);
        for_each_dim(head_dim, [&](int dim) {
            rotated[head * params.q_head_stride + dim] = rotated_element<Element, Table>(
                q + head * append.q_head_stride, dim, position, append);
        });
        return;
    }
    const int position = length + row;
    const int64_t cell = cache_cell_offset(params, page_size, request, position);
    Element* k_cache = static_cast<Element*>(const_cast<void*>(params.k_ptr)) + cell;
    Element* v_cache = static_cast<Element*>(const_cast<void*>(params.v_ptr)) + cell;
    const Element* k =
        row_of<Element>(append.k, append.k_batch_stride, append.k_row_stride, request, row);
    const Element* v =
        row_of<Element>(append.v, append.v_batch_stride, append.v_row_stride, request, row);
    for_each_dim(head_dim, [&](int dim) {
        k_cache[head * params.k_head_stride + dim] = rotated_element<Element, Table>(
            k + head * append.k_head_stride, dim, position, append);
        v_cache[head * params.v_head_stride + dim] = v[head * append.v_head_stride + dim];
    });
}

// Launches the append step when the call has one (new keys, or rotary tables: those come only
// with new keys). No host-device sync: the lengths and tables are read on the device. The
// bindings keep batch x rows below 2^31 (the grid's x limit); heads past 65535 (its z limit)
// fail the launch with a CUDA error.
template <typename Element>
cudaError_t launch_cache_append(const FlashDecodeParams& params, cudaStream_t stream) {
    const CacheAppend& append = params.append;
    if (append.k == nullptr || params.batch == 0) return cudaSuccess;
    const bool rotates_q = append.rotary_cos != nullptr && params.seqlen_q > 0;
    const int rows = rotates_q ? max(append.seqlen_new, params.seqlen_q) : append.seqlen_new;
    if (rows == 0) return cudaSuccess;
    const int heads = rotates_q ? max(params.nheads, params.nheads_k) : params.nheads_k;
    const dim3 grid(unsigned(int64_t(params.batch) * rows), rotates_q ? 2 : 1, unsigned(heads));
    const cutlass::FastDivmod page_size(params.block_table != nullptr ? params.page_size : 1);
    auto kernel = append.rotary_tables_float ? &cache_append_kernel<Element, float>
                                             : &cache_append_kernel<Element, Element>;
    kernel<<<grid, kAppendThreads, 0, stream>>>(params, page_size);
    return cudaGetLastError();
}

}  // namespace decode
}  // namespace flash_varlen
