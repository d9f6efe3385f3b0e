// The backward's row kernels (D, the dQ accumulator's zeroing and conversion: both families)
// run one padded row block (padded_rows.h) of one head per thread block, and each block finds its
// sequence by a search over cu_seqlens_q. A grid of (row blocks of the longest sequence, batch,
// heads), as both families first had, launches max_seqlen_q / kBlockM blocks for every sequence:
// for one 16k document among 250 short ones (the `skewed` workload) 1 M to 8 M mostly empty
// blocks, which took 5.9 of the sm90 backward's 15.3 ms there (H100, bf16, d = 128, MHA 16
// heads; benchmarks/results/2026-12-06_h100_sm90_bwd_row_grid.md).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/common/flash_params.h"
#include "kernels/common/padded_rows.h"
#include "kernels/common/seqlen_info.h"

namespace flash_varlen {

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
    // The sequence whose padded rows hold padded row `row` (padded_row_sequence).
    __device__ static int sequence_of_row(const FlashBwdParams& params, int64_t row) {
        return padded_row_sequence(params.cu_seqlens_q != nullptr, params.cu_seqlens_q,
                                   params.batch, params.seqlen_q, row, kBlockM);
    }
    // The row kernels' grid: (padded row blocks of a head, heads).
    static dim3 row_block_grid(const FlashBwdParams& params) {
        return dim3(uint32_t(rows_per_head(params) / kBlockM), uint32_t(params.nheads));
    }
};

// The row block of a row kernel's thread block: padded row block blockIdx.x of head blockIdx.y
// (PaddedRows::row_block_grid).
template <int kBlockM>
struct PaddedRowBlock {
    int head;
    int64_t padded_row;  // its first padded row of the head
    int batch;           // the sequence whose padded rows hold it
    SeqlenInfo seq;
    int64_t first_row;  // the sequence's first padded row
    int query0;         // its first row within the sequence, a multiple of kBlockM

    __device__ explicit PaddedRowBlock(const FlashBwdParams& params)
        : head(blockIdx.y),
          padded_row(int64_t(blockIdx.x) * kBlockM),
          batch(PaddedRows<kBlockM>::sequence_of_row(params, padded_row)),
          seq(params, batch),
          first_row(PaddedRows<kBlockM>::first_row(params, seq, batch)),
          query0(int(padded_row - first_row)) {}

    // False for a block past its sequence's rows rounded up to kBlockM: between two sequences'
    // padded rows, which no row block of the main kernel touches.
    __device__ bool has_rows() const { return query0 < seq.seqlen_q; }
};

}  // namespace flash_varlen
