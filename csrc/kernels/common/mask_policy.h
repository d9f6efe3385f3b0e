// Which (query, key) pairs of a sequence are visible, and the ALiBi bias of the visible ones.
// Keys past the sequence end are never visible. A local mask (causal attention and sliding
// windows) also shows query i only the keys
//   i + diagonal - window_left <= j <= i + diagonal + window_right,
// where diagonal = seqlen_k - seqlen_q (bottom-right alignment, as flash-attn) or 0 (top-left
// alignment, PyTorch's is_causal); causal attention is window_right = 0. The main loops ask this
// policy which key blocks (forward) or query row blocks (backward) to visit at all and which of
// them need element-wise masking; every other block runs without any masking work.
//
// The visible keys of a row form one interval that moves right by one key per row, so the
// visible pairs of a row block are exactly the keys from the first row's first visible key to the
// last row's last one, and every range below is exact rather than conservative: the forward and
// the backward agree on which (row block, key block) tiles have work, which the deterministic
// backward's ordering relies on.
#pragma once

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/seqlen_info.h"

namespace flash_varlen {

// ALiBi's slope of one (sequence, head) in raw-score units: the logit bias divided by
// logit_scale, so that it is added to raw scores. Every family takes it from here, and the bias
// from alibi_bias, so that all compute one formula.
__device__ __forceinline__ float alibi_raw_slope(const FlashFwdParams& params, int batch,
                                                 int head) {
    return params.alibi_slopes[batch * params.alibi_batch_stride + head] / params.logit_scale;
}

// ALiBi's bias of pair (row, col) in raw-score units: -slope * |row + diagonal - col|, the
// distance from the key aligned with the query (the causal alignment's diagonal).
__device__ __forceinline__ float alibi_bias(float raw_slope, int row, int col, int diagonal) {
    return -raw_slope * fabsf(float(row + diagonal - col));
}

// kHasAlibi: the launch passes ALiBi slopes (a variant kernel; see flash_fwd_kernel.h). The
// plain kernels hold only the lengths (and, local, the window): the main loops run at the
// register limit, and a reference to the params here cost the backward 4% (more register moves
// in its loop; H200, bf16 d128).
template <bool kIsLocal, bool kHasAlibi>
struct MaskPolicy {
    int seqlen_q;
    int seqlen_k;
    int diagonal;  // the key aligned with query 0
    int window_left;
    int window_right;
    // In raw-score units (the logit bias divided by logit_scale); 0 in a variant kernel launched
    // without slopes.
    float alibi_slope;

    __device__ MaskPolicy(const FlashFwdParams& params, const SeqlenInfo& seq, int batch, int head)
        : seqlen_q(seq.seqlen_q),
          seqlen_k(seq.seqlen_k),
          diagonal(params.causal_top_left ? 0 : seq.seqlen_k - seq.seqlen_q),
          window_left(kIsLocal ? params.window_left : 0),
          window_right(kIsLocal ? params.window_right : 0),
          alibi_slope(kHasAlibi && params.alibi_slopes != nullptr
                          ? alibi_raw_slope(params, batch, head)
                          : 0.f) {}

    // The first key query `row` may see; may be negative (then 0) or past the end.
    __device__ int visible_col_begin(int row) const {
        return kIsLocal ? row + diagonal - window_left : 0;
    }

    // One past the last key query `row` may see; zero or less when it sees none.
    __device__ int visible_col_end(int row) const {
        return kIsLocal ? min(seqlen_k, row + diagonal + window_right + 1) : seqlen_k;
    }

    // The last query row of row block m_block that lies inside the sequence.
    template <int kBlockM>
    __device__ int last_row_of(int m_block) const {
        return min((m_block + 1) * kBlockM, seqlen_q) - 1;
    }

    // Forward: the key blocks [key_block_begin, key_block_end) hold every key some query row of
    // first_row .. last_row (inside the sequence) sees; an empty range when they see none. A
    // tile's rows are one such interval: a row block, or the same tokens of several heads when
    // the sm90 forward packs a GQA group into one tile (sm90/query_rows.h).
    template <int kBlockN>
    __device__ int key_block_begin_of_rows(int first_row) const {
        const int first_col = visible_col_begin(first_row);
        return first_col <= 0 ? 0 : first_col / kBlockN;
    }

    template <int kBlockN>
    __device__ int key_block_end_of_rows(int last_row) const {
        const int col_end = visible_col_end(last_row);
        return col_end <= 0 ? 0 : cute::ceil_div(col_end, kBlockN);
    }

    // Forward, plain kernels: key blocks in [unmasked_block_begin, unmasked_block_end) are
    // visible to every row of first_row .. last_row in full: they need no masking. The range may
    // be empty; blocks outside it (and inside the visited range) are masked. (The variant
    // kernels mask every block: ALiBi biases them all.)
    template <int kBlockN>
    __device__ int unmasked_block_begin_of_rows(int last_row) const {
        const int first_col = visible_col_begin(last_row);
        return first_col <= 0 ? 0 : cute::ceil_div(first_col, kBlockN);
    }

    template <int kBlockN>
    __device__ int unmasked_block_end_of_rows(int first_row) const {
        const int col_end = visible_col_end(first_row);
        return col_end <= 0 ? 0 : col_end / kBlockN;
    }

    // The same ranges for row block m_block of kBlockM consecutive rows.
    template <int kBlockM, int kBlockN>
    __device__ int key_block_begin(int m_block) const {
        return key_block_begin_of_rows<kBlockN>(m_block * kBlockM);
    }

    template <int kBlockM, int kBlockN>
    __device__ int key_block_end(int m_block) const {
        return key_block_end_of_rows<kBlockN>(last_row_of<kBlockM>(m_block));
    }

    template <int kBlockM, int kBlockN>
    __device__ int unmasked_block_begin(int m_block) const {
        return unmasked_block_begin_of_rows<kBlockN>(last_row_of<kBlockM>(m_block));
    }

    template <int kBlockM, int kBlockN>
    __device__ int unmasked_block_end(int m_block) const {
        return unmasked_block_end_of_rows<kBlockN>(m_block * kBlockM);
    }

    // Backward: the query row blocks [row_block_begin, row_block_end) hold every row that sees
    // some key of key block n_block.
    template <int kBlockM, int kBlockN>
    __device__ int row_block_begin(int n_block) const {
        if constexpr (!kIsLocal) return 0;
        // The first row whose last visible key reaches the block's first key.
        const int first_row = n_block * kBlockN - diagonal - window_right;
        return first_row <= 0 ? 0 : first_row / kBlockM;
    }

    template <int kBlockM, int kBlockN>
    __device__ int row_block_end(int n_block) const {
        const int all_blocks = cute::ceil_div(seqlen_q, kBlockM);
        if constexpr (!kIsLocal) return all_blocks;
        // One past the last row whose first visible key is at most the block's last key.
        const int last_col = min((n_block + 1) * kBlockN, seqlen_k) - 1;
        const int row_end = last_col - diagonal + window_left + 1;
        return row_end <= 0 ? 0 : min(all_blocks, cute::ceil_div(row_end, kBlockM));
    }

    // Backward: whether the (kBlockM, kBlockN) tile at (row0, col0) may hold an invisible pair
    // for a row inside the sequence, or biased scores.
    template <int kBlockM, int kBlockN>
    __device__ bool tile_needs_mask(int row0, int col0) const {
        if constexpr (kHasAlibi) return true;
        const int last_row = min(row0 + kBlockM, seqlen_q) - 1;
        return col0 + kBlockN > visible_col_end(row0) ||
               (kIsLocal && col0 < visible_col_begin(last_row));
    }

    // ALiBi's bias of pair (row, col) in raw-score units; 0 without ALiBi.
    __device__ float alibi_bias(int row, int col) const {
        if constexpr (kHasAlibi) return flash_varlen::alibi_bias(alibi_slope, row, col, diagonal);
        return 0.f;
    }

    // The score of pair (row, col) after masking and ALiBi's bias.
    __device__ float masked_score(float score, int row, int col) const {
        if (col < visible_col_begin(row) || col >= visible_col_end(row)) return -INFINITY;
        // Not `score + 0`: that is not folded away (it turns -0 into +0), and the plain kernels
        // must not pay an add per masked score.
        if constexpr (kHasAlibi) score += alibi_bias(row, col);
        return score;
    }

    // Masks and biases the scores of any tiled-MMA layout: coords is this thread's partition of
    // an identity tensor over the score tile, built by the caller where it is used (the compiler
    // folds it into constants plus a per-thread offset). A family with a fixed fragment layout
    // may walk it directly instead (sm80/mask_fragments.h).
    template <typename ScoreTensor, typename CoordTensor>
    __device__ void apply_by_coordinates(ScoreTensor& acc_s, const CoordTensor& coords, int row0,
                                         int col0) const {
        CUTE_UNROLL
        for (int i = 0; i < cute::size(acc_s); ++i) {
            acc_s(i) = masked_score(acc_s(i), row0 + cute::get<0>(coords(i)),
                                    col0 + cute::get<1>(coords(i)));
        }
    }

    // Masks a score tile viewed as (rows, cols) whose rows the caller names by their query row in
    // the sequence (row_of[r] for row r of the view; a tile that packs several heads repeats a
    // row for each), the columns by coordinates as above.
    template <typename ScoreRowsCols, typename CoordRowsCols, typename RowOf>
    __device__ void apply_by_rows(ScoreRowsCols& scores, const CoordRowsCols& coords,
                                  const RowOf& row_of, int col0) const {
        CUTE_UNROLL
        for (int r = 0; r < cute::size<0>(scores); ++r) {
            CUTE_UNROLL
            for (int c = 0; c < cute::size<1>(scores); ++c) {
                scores(r, c) =
                    masked_score(scores(r, c), row_of[r], col0 + cute::get<1>(coords(r, c)));
            }
        }
    }
};

}  // namespace flash_varlen
