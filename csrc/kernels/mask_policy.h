// Which (query, key) pairs of a sequence are visible: keys past the sequence end never are, and
// with causal masking query i sees key j only when j <= i + seqlen_k - seqlen_q (bottom-right
// alignment, as flash-attn). The main loop asks this policy how many key blocks to visit and which
// of them need element-wise masking; all other blocks run without any masking work.
#pragma once

#include <cute/tensor.hpp>

#include "fragment_layouts.h"

namespace flash_varlen {

template <bool kIsCausal>
struct MaskPolicy {
    int seqlen_q;
    int seqlen_k;

    __device__ MaskPolicy(int seqlen_q_, int seqlen_k_)
        : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_) {}

    // One past the last key block that any row of row block m_block can see. Zero or less means
    // the whole row block sees no key.
    template <int kBlockM, int kBlockN>
    __device__ int key_block_end(int m_block) const {
        const int all_blocks = cute::ceil_div(seqlen_k, kBlockN);
        if constexpr (!kIsCausal) {
            return all_blocks;
        } else {
            // The last row of the block sees keys up to (m_block + 1) * kBlockM - 1 + seqlen_k -
            // seqlen_q.
            const int last_visible_key_plus_one = (m_block + 1) * kBlockM + seqlen_k - seqlen_q;
            if (last_visible_key_plus_one <= 0) return 0;
            return min(all_blocks, cute::ceil_div(last_visible_key_plus_one, kBlockN));
        }
    }

    // How many key blocks, counted down from key_block_end - 1, may hold a masked pair for some
    // valid row. The highest block may run past seqlen_k. With causal masking the diagonal of a
    // kBlockM-row block spans kBlockM - 1 key columns, which touch at most
    // ceil(kBlockM / kBlockN) + 1 key blocks, the highest of them the one key_block_end points
    // past.
    template <int kBlockM, int kBlockN>
    __device__ static constexpr int masked_block_count() {
        return kIsCausal ? cute::ceil_div(kBlockM, kBlockN) + 1 : 1;
    }

    // The key column one past the last one that query row `row` may see.
    __device__ int visible_col_end(int row) const {
        if constexpr (kIsCausal) return min(seqlen_k, row + 1 + seqlen_k - seqlen_q);
        return seqlen_k;
    }

    // Whether a (kBlockM, kBlockN) tile at (row0, col0) may hold an invisible pair for a row
    // inside the sequence: the key tail, or (causal) a column right of the first row's diagonal.
    template <int kBlockM, int kBlockN>
    __device__ bool tile_needs_mask(int row0, int col0) const {
        const int col_end = col0 + kBlockN;
        return col_end > seqlen_k || visible_col_end(row0) < col_end;
    }

    // Sets invisible scores to -inf for any tiled-MMA layout: coords is this thread's partition
    // of an identity tensor over the score tile, built by the caller where it is used (the
    // compiler folds it into constants plus a per-thread offset).
    template <typename ScoreTensor, typename CoordTensor>
    __device__ void apply_by_coordinates(ScoreTensor& acc_s, const CoordTensor& coords, int row0,
                                         int col0) const {
        CUTE_UNROLL
        for (int i = 0; i < cute::size(acc_s); ++i) {
            const int row = row0 + cute::get<0>(coords(i));
            const int col = col0 + cute::get<1>(coords(i));
            if (col >= visible_col_end(row)) acc_s(i) = -INFINITY;
        }
    }

    // Sets invisible scores to -inf. acc_s is one thread's (MMA, MMA_M, MMA_N) accumulator of a
    // tiled SM80 m16n8k16 MMA whose kNWarps warps are stacked along M; row0/col0 place the tile in
    // the sequence. Coordinates are computed from the lane here rather than carried in registers
    // across the main loop: a hoisted coordinate tensor costs two registers per score.
    template <int kNWarps, typename ScoreTensor>
    __device__ void apply(ScoreTensor& acc_s, int row0, int col0) const {
        constexpr int kMmaRows = 16;       // rows of one MMA tile (a warp's share of a row slab)
        constexpr int kMmaCols = 8;        // columns of one MMA tile
        constexpr int kRowHalf = 8;        // a thread holds rows r and r + 8 of its tile
        constexpr int kThreadsPerRow = 4;  // a quad of lanes shares a row, 2 columns each
        constexpr int kColsPerThread = 2;
        Tensor scores = make_tensor(
            acc_s.data(), accumulator_as_rows_cols(acc_s.layout()));  // ((2, MMA_M), (2, MMA_N))
        const int lane = threadIdx.x % 32;
        const int warp = threadIdx.x / 32;
        const int thread_row = row0 + warp * kMmaRows + lane / kThreadsPerRow;
        const int thread_col = col0 + (lane % kThreadsPerRow) * kColsPerThread;
        CUTE_UNROLL
        for (int mi = 0; mi < cute::size<0, 1>(scores); ++mi) {
            CUTE_UNROLL
            for (int half = 0; half < 2; ++half) {
                const int row = thread_row + mi * kMmaRows * kNWarps + half * kRowHalf;
                int col_end = seqlen_k;  // first invisible column of this row
                if constexpr (kIsCausal) col_end = min(col_end, row + 1 + seqlen_k - seqlen_q);
                CUTE_UNROLL
                for (int ni = 0; ni < cute::size<1, 1>(scores); ++ni) {
                    CUTE_UNROLL
                    for (int j = 0; j < kColsPerThread; ++j) {
                        if (thread_col + ni * kMmaCols + j >= col_end) {
                            scores(make_coord(half, mi), make_coord(j, ni)) = -INFINITY;
                        }
                    }
                }
            }
        }
    }
};

}  // namespace flash_varlen
