// The backward's per-sequence padded rows: each sequence's rows start at a multiple of the row
// block, so that a row block of the dQ accumulator (both families) and of the sm90 family's row
// statistics (sm90/bwd_row_kernels.h) is one aligned chunk. The backward's row kernels run one
// padded row block per thread block and find its sequence by padded_row_sequence. Plain C++
// (constexpr, no CUDA), so that the host compiler can test it (tests/test_padded_rows_cpu.py).
#pragma once

#include <cstdint>

namespace flash_varlen {

constexpr int64_t round_up_to(int64_t value, int64_t multiple) {
    return (value + multiple - 1) / multiple * multiple;
}

// The first padded row of sequence `batch`. Varlen: (its first query row + batch x block_rows),
// rounded down to a multiple of block_rows (FlashAttention-3's padding, hopper/seqlen.h): each
// sequence's padded rows, its length rounded up to block_rows, end before the next sequence's
// start. Fixed length: batch x seqlen_q rounded up.
constexpr int64_t padded_first_row(bool is_varlen, int64_t first_query_row, int64_t batch,
                                   int64_t seqlen_q, int64_t block_rows) {
    return is_varlen ? (first_query_row + batch * block_rows) / block_rows * block_rows
                     : batch * round_up_to(seqlen_q, block_rows);
}

// Padded rows per head: every sequence's padded rows fit (varlen: query rows + batch x
// block_rows), rounded up to a multiple of block_rows so that every head starts aligned too.
constexpr int64_t padded_rows_per_head(bool is_varlen, int64_t total_q, int64_t batch,
                                       int64_t seqlen_q, int64_t block_rows) {
    return round_up_to(
        is_varlen ? total_q + batch * block_rows : batch * round_up_to(seqlen_q, block_rows),
        block_rows);
}

// The sequence whose padded rows hold padded row `row` (of one head): the last sequence whose
// first padded row is at or before it. Varlen: a binary search over cu_seqlens_q (log2(batch)
// reads); fixed length: a division. The row may lie between two sequences' padded rows, past the
// first one's length rounded up: the caller checks.
constexpr int padded_row_sequence(bool is_varlen, const int* cu_seqlens_q, int batch,
                                  int64_t seqlen_q, int64_t row, int64_t block_rows) {
    if (!is_varlen) {
        const int64_t rows_per_sequence = round_up_to(seqlen_q, block_rows);
        return rows_per_sequence == 0 ? 0 : int(row / rows_per_sequence);
    }
    int first = 0;     // padded_first_row(first) <= row (sequence 0 starts at row 0)
    int past = batch;  // padded_first_row(past) > row, or past == batch
    while (past - first > 1) {
        const int middle = first + (past - first) / 2;
        if (padded_first_row(true, cu_seqlens_q[middle], middle, seqlen_q, block_rows) <= row) {
            first = middle;
        } else {
            past = middle;
        }
    }
    return first;
}

}  // namespace flash_varlen
