// The memory-bound step before the sm90-family backward main kernel (flash_bwd_kernel.h): D =
// rowsum(dO * O) - dLSE of every query row (the term of every dS = P (dP - D)) and LSE in log2
// units, padded per sequence. (dQ's conversion after the main kernel is in dq_accumulator.h.)
#pragma once

#include <cutlass/array.h>

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/sm90/padded_rows.h"

namespace flash_varlen {
namespace sm90 {

constexpr int kRowKernelThreads = 128;
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

// D and LSE_log2 of every padded row of the sequences (see PaddedRows). A row is read by
// kHeadDim / 8 (16-bit) threads, one 16-byte vector of O and of dO each: a warp per row, as
// first written, left half of its lanes idle at d = 128 and took 0.094 ms where O and dO take
// 0.045 at 3 TB/s (ncu, 8 x 2048 rows, 16 heads, H100). Grid: (row groups of the longest
// sequence's padded rows, batch, heads).
template <typename Element, int kHeadDim, int kBlockM>
struct RowStatsKernel {
    static constexpr int kElems = kRowVectorBytes / sizeof(Element);
    static constexpr int kThreadsPerRow = kHeadDim / kElems;
    static_assert(kHeadDim % kElems == 0 && 32 % kThreadsPerRow == 0,
                  "a row's threads are a power-of-two part of a warp");
    static constexpr int kRowsPerBlock = kRowKernelThreads / kThreadsPerRow;
    static constexpr uint32_t kRowLanes =
        kThreadsPerRow == 32 ? 0xffffffffu : (1u << kThreadsPerRow) - 1;  // of lane 0's row

    static dim3 grid(const FlashBwdParams& params) {
        const int padded_rows = cute::ceil_div(params.seqlen_q, kBlockM) * kBlockM;
        return dim3(cute::ceil_div(padded_rows, kRowsPerBlock), params.batch, params.nheads);
    }
};

template <typename Element, int kHeadDim, int kBlockM>
__global__ void __launch_bounds__(kRowKernelThreads)
    flash_bwd_row_stats_kernel(const __grid_constant__ FlashBwdParams params, RowStats stats) {
    using Kernel = RowStatsKernel<Element, kHeadDim, kBlockM>;
    constexpr int kElems = Kernel::kElems;
    constexpr int kThreadsPerRow = Kernel::kThreadsPerRow;
    const int batch = blockIdx.y, head = blockIdx.z;
    const int row = blockIdx.x * Kernel::kRowsPerBlock + threadIdx.x / kThreadsPerRow;
    const int part = threadIdx.x % kThreadsPerRow;  // this thread's vector of the row
    const SeqlenInfo seq(params, batch);
    if (row >= cute::ceil_div(seq.seqlen_q, kBlockM) * kBlockM) return;
    const int64_t out = int64_t(head) * stats.head_stride +
                        PaddedRows<kBlockM>::first_row(params, seq, batch) + row;
    if (row >= seq.seqlen_q) {
        if (part == 0) {
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
    const int col = part * kElems;
    if (col < params.head_dim) {  // head dims below the bucket: whole vectors (multiples of 8)
        const RowVector<Element> o = *reinterpret_cast<const RowVector<Element>*>(o_row + col);
        const RowVector<Element> d_o = *reinterpret_cast<const RowVector<Element>*>(do_row + col);
        CUTE_UNROLL
        for (int i = 0; i < kElems; ++i) sum += float(o[i]) * float(d_o[i]);
    }
    // The row's threads are kThreadsPerRow consecutive lanes: xor offsets below it stay inside,
    // and only they take part (the warp's other row may have left).
    const uint32_t row_lanes = Kernel::kRowLanes
                               << (threadIdx.x % 32 / kThreadsPerRow * kThreadsPerRow);
    CUTE_UNROLL
    for (int offset = kThreadsPerRow / 2; offset > 0; offset /= 2) {
        sum += __shfl_xor_sync(row_lanes, sum, offset);
    }
    if (part == 0) {
        const int64_t in = int64_t(head) * params.lse_head_stride +
                           seq.lse_offset(params.lse_batch_stride, batch) + row;
        const float dlse =
            params.softmax_lse_grad_ptr == nullptr ? 0.f : params.softmax_lse_grad_ptr[in];
        const float d = sum - dlse;
        stats.d[out] = d;
        // A row that saw no key has LSE = -inf (and output 0): +inf makes its P 0.
        const float lse = params.softmax_lse_ptr[in];
        stats.lse_log2[out] = lse == -INFINITY ? INFINITY : lse * float(M_LOG2E);
        if (params.learnable_sink != nullptr) {
            // The row's term of the sink's gradient, the sm80 family's (sm80/
            // flash_bwd_preprocess.h): the sink's probability exp(sink - lse) times -D. The
            // forward's LSE counts the sink, so nothing else of the backward changes.
            params.sink_grad_rows_ptr[in] = -expf(params.learnable_sink[head] - lse) * d;
        }
    }
}

}  // namespace sm90
}  // namespace flash_varlen
