// The two memory-bound steps around the sm90-family backward main kernel (flash_bwd_kernel.h),
// one warp per (query row, head): before it, D = rowsum(dO * O) - dLSE of every query row (the
// term of every dS = P (dP - D)) and LSE in log2 units, padded per sequence; after it, dQ =
// softmax scale x the float32 accumulator, in the input type. Work in progress for issue 15, not
// yet run on a GPU.
#pragma once

#include <cutlass/array.h>

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/sm90/padded_rows.h"

namespace flash_varlen {
namespace sm90 {

constexpr int kRowKernelWarps = 4;  // query rows per thread block
constexpr int kRowKernelThreads = kRowKernelWarps * 32;
constexpr int kRowVectorBytes = 16;

template <typename Element>
using RowVector =
    cutlass::AlignedArray<Element, kRowVectorBytes / sizeof(Element), kRowVectorBytes>;

// The row statistics the main kernel reads, LSE in log2 units and D, float32, each laid out as
// (heads, padded rows) (padded_rows.h): a sequence's rows start at a multiple of kBlockM, so that
// the main kernel loads a row block's kBlockM values with one aligned bulk copy, and the rows
// from its end up to the next multiple (which its last row block reads) hold LSE = +inf and
// D = 0: P = 0 there.
template <int kBlockM>
struct PaddedRows {
    static int64_t rows_per_head(const FlashBwdParams& params) {
        return padded_rows_per_head(params.cu_seqlens_q != nullptr, params.total_q, params.batch,
                                    params.seqlen_q, kBlockM);
    }
    __device__ static int64_t first_row(const FlashBwdParams& params, const SeqlenInfo& seq,
                                        int batch) {
        return padded_first_row(seq.is_varlen, seq.q_start, batch, params.seqlen_q, kBlockM);
    }
};

// Where the row kernels write the statistics (and the main kernel reads them).
struct RowStats {
    float* lse_log2;
    float* d;
    int64_t head_stride;  // padded rows per head
};

// The (query row, head, sequence) of a row kernel's warp. Grid: (row groups of the longest
// sequence, batch, heads), kRowKernelWarps warps per block, a row per warp.
struct RowKernelWarp {
    int batch;
    int head;
    int lane;
    int row;
    SeqlenInfo seq;

    __device__ explicit RowKernelWarp(const FlashBwdParams& params)
        : batch(blockIdx.y),
          head(blockIdx.z),
          lane(threadIdx.x % 32),
          row(blockIdx.x * kRowKernelWarps + threadIdx.x / 32),
          seq(params, blockIdx.y) {}
};

// D and LSE_log2 of every padded row of the sequences (see PaddedRows).
template <typename Element, int kBlockM>
__global__ void __launch_bounds__(kRowKernelThreads)
    flash_bwd_row_stats_kernel(const __grid_constant__ FlashBwdParams params, RowStats stats) {
    constexpr int kElems = kRowVectorBytes / sizeof(Element);
    const RowKernelWarp warp(params);
    const int batch = warp.batch, head = warp.head, lane = warp.lane, row = warp.row;
    const SeqlenInfo& seq = warp.seq;
    if (row >= cute::ceil_div(seq.seqlen_q, kBlockM) * kBlockM) return;
    const int64_t out = int64_t(head) * stats.head_stride +
                        PaddedRows<kBlockM>::first_row(params, seq, batch) + row;
    if (row >= seq.seqlen_q) {
        if (lane == 0) {
            stats.lse_log2[out] = INFINITY;
            stats.d[out] = 0.f;
        }
        return;
    }
    const Element* o_row = static_cast<const Element*>(params.o_ptr) +
                           seq.q_offset(params.o_batch_stride, params.o_row_stride, batch) +
                           int64_t(row) * params.o_row_stride +
                           int64_t(head) * params.o_head_stride;
    const Element* do_row = static_cast<const Element*>(params.do_ptr) +
                            seq.q_offset(params.do_batch_stride, params.do_row_stride, batch) +
                            int64_t(row) * params.do_row_stride +
                            int64_t(head) * params.do_head_stride;
    float sum = 0.f;
    for (int col = lane * kElems; col < params.head_dim; col += 32 * kElems) {
        const RowVector<Element> o = *reinterpret_cast<const RowVector<Element>*>(o_row + col);
        const RowVector<Element> d_o = *reinterpret_cast<const RowVector<Element>*>(do_row + col);
        CUTE_UNROLL
        for (int i = 0; i < kElems; ++i) sum += float(o[i]) * float(d_o[i]);
    }
    CUTE_UNROLL
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) {
        const int64_t in = int64_t(head) * params.lse_head_stride +
                           seq.lse_offset(params.lse_batch_stride, batch) + row;
        const float dlse =
            params.softmax_lse_grad_ptr == nullptr ? 0.f : params.softmax_lse_grad_ptr[in];
        stats.d[out] = sum - dlse;
        // A row that saw no key has LSE = -inf (and output 0): +inf makes its P 0.
        const float lse = params.softmax_lse_ptr[in];
        stats.lse_log2[out] = lse == -INFINITY ? INFINITY : lse * float(M_LOG2E);
    }
}

// dq_accum: float32 (heads, query rows, kHeadDim), rows as the main kernel adds them.
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kRowKernelThreads)
    flash_bwd_convert_dq_kernel(const __grid_constant__ FlashBwdParams params,
                                const float* __restrict__ dq_accum, int64_t dq_accum_head_stride) {
    constexpr int kElems = kRowVectorBytes / sizeof(Element);
    const RowKernelWarp warp(params);
    const int batch = warp.batch, head = warp.head, lane = warp.lane, row = warp.row;
    const SeqlenInfo& seq = warp.seq;
    if (row >= seq.seqlen_q) return;
    const int64_t accum_row =
        seq.is_varlen ? int64_t(seq.q_start) + row : int64_t(batch) * params.seqlen_q + row;
    const float* accum = dq_accum + int64_t(head) * dq_accum_head_stride + accum_row * kHeadDim;
    Element* dq_row = static_cast<Element*>(params.dq_ptr) +
                      seq.q_offset(params.dq_batch_stride, params.dq_row_stride, batch) +
                      int64_t(row) * params.dq_row_stride + int64_t(head) * params.dq_head_stride;
    for (int col = lane * kElems; col < params.head_dim; col += 32 * kElems) {
        RowVector<Element> dq;
        CUTE_UNROLL
        for (int i = 0; i < kElems; ++i) dq[i] = Element(accum[col + i] * params.softmax_scale);
        *reinterpret_cast<RowVector<Element>*>(dq_row + col) = dq;
    }
}

}  // namespace sm90
}  // namespace flash_varlen
