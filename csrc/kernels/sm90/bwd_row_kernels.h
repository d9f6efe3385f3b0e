// The memory-bound step before the sm90-family backward main kernel (flash_bwd_kernel.h): D =
// rowsum(dO * O) - dLSE of every query row (the term of every dS = P (dP - D)) and LSE in log2
// units, padded per sequence. (dQ's conversion after the main kernel is in dq_accumulator.h.)
#pragma once

#include <cutlass/array.h>

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/common/padded_row_blocks.h"

namespace flash_varlen {
namespace sm90 {

constexpr int kRowKernelThreads = 128;
constexpr int kRowVectorBytes = 16;

template <typename Element>
using RowVector =
    cutlass::AlignedArray<Element, kRowVectorBytes / sizeof(Element), kRowVectorBytes>;

// Where the row kernel writes the statistics the main kernel reads, LSE in log2 units and D,
// float32, each laid out as (heads, padded rows) (common/padded_rows.h, PaddedRows): a sequence's
// rows start at a multiple of kBlockM, so that the main kernel loads a row block's kBlockM values
// with one aligned bulk copy, and the rows from its end up to the next multiple (which its last
// row block reads) hold LSE = +inf and D = 0: P = 0 there.
struct RowStats {
    float* lse_log2;
    float* d;
    int64_t head_stride;  // padded rows per head
};

// D and LSE_log2 of every padded row of the sequences (see PaddedRows), one padded row block of
// one head per thread block (PaddedRows::row_block_grid). A row is read by kHeadDim / 8 (16-bit)
// threads, one 16-byte vector of O and of dO each: a warp per row, as first written, left half of
// its lanes idle at d = 128 and took 0.094 ms where O and dO take 0.045 at 3 TB/s (ncu, 8 x 2048
// rows, 16 heads, H100). The block's kBlockM rows go in kPasses passes, every pass's loads issued
// before the first sum.
template <typename Element, int kHeadDim, int kBlockM>
struct RowStatsKernel {
    static constexpr int kElems = kRowVectorBytes / sizeof(Element);
    static constexpr int kThreadsPerRow = kHeadDim / kElems;
    static_assert(kHeadDim % kElems == 0 && 32 % kThreadsPerRow == 0,
                  "a row's threads are a power-of-two part of a warp");
    static constexpr int kRowsPerPass = kRowKernelThreads / kThreadsPerRow;
    static_assert(kBlockM % kRowsPerPass == 0, "whole passes per row block");
    static constexpr int kPasses = kBlockM / kRowsPerPass;
};

template <typename Element, int kHeadDim, int kBlockM>
__global__ void __launch_bounds__(kRowKernelThreads)
    flash_bwd_row_stats_kernel(const __grid_constant__ FlashBwdParams params, RowStats stats) {
    using Kernel = RowStatsKernel<Element, kHeadDim, kBlockM>;
    constexpr int kElems = Kernel::kElems;
    constexpr int kThreadsPerRow = Kernel::kThreadsPerRow;
    const PaddedRowBlock<kBlockM> block(params);
    if (!block.has_rows()) return;
    const int head = block.head;
    const int batch = block.batch;
    const SeqlenInfo& seq = block.seq;
    const int64_t first_row = block.first_row;
    const int row0 = block.query0;

    const int part = threadIdx.x % kThreadsPerRow;  // this thread's vector of its rows
    const int col = part * kElems;
    const Element* o_seq = static_cast<const Element*>(params.o_ptr) +
                           seq.q_offset(params.o_batch_stride, params.o_row_stride, batch) +
                           int64_t(head) * params.o_head_stride + col;
    const Element* do_seq = static_cast<const Element*>(params.do_ptr) +
                            seq.q_offset(params.do_batch_stride, params.do_row_stride, batch) +
                            int64_t(head) * params.do_head_stride + col;
    float sums[Kernel::kPasses];
    CUTE_UNROLL
    for (int pass = 0; pass < Kernel::kPasses; ++pass) {
        const int row = row0 + pass * Kernel::kRowsPerPass + int(threadIdx.x) / kThreadsPerRow;
        sums[pass] = 0.f;
        // Head dims below the bucket: whole vectors (multiples of 8).
        if (row < seq.seqlen_q && col < params.head_dim) {
            const RowVector<Element> o = *reinterpret_cast<const RowVector<Element>*>(
                o_seq + int64_t(row) * params.o_row_stride);
            const RowVector<Element> d_o = *reinterpret_cast<const RowVector<Element>*>(
                do_seq + int64_t(row) * params.do_row_stride);
            CUTE_UNROLL
            for (int i = 0; i < kElems; ++i) sums[pass] += float(o[i]) * float(d_o[i]);
        }
    }
    CUTE_UNROLL
    for (int pass = 0; pass < Kernel::kPasses; ++pass) {
        // A row's threads are kThreadsPerRow consecutive lanes: xor offsets below it stay inside
        // (every thread of the block is here).
        float sum = sums[pass];
        CUTE_UNROLL
        for (int offset = kThreadsPerRow / 2; offset > 0; offset /= 2) {
            sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        }
        const int row = row0 + pass * Kernel::kRowsPerPass + int(threadIdx.x) / kThreadsPerRow;
        if (part != 0) continue;
        const int64_t out = int64_t(head) * stats.head_stride + first_row + row;
        if (row >= seq.seqlen_q) {
            stats.lse_log2[out] = INFINITY;
            stats.d[out] = 0.f;
            continue;
        }
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
