// Which (query, key) pairs of a sequence are visible (visible_keys.h: the causal alignments,
// sliding windows, the sequence end, and the block ranges derived from them), plus the ALiBi bias
// of the visible ones and the element-wise masking of score tiles. The main loops ask this policy
// which key blocks (forward) or query row blocks (backward) to visit at all and which of them need
// element-wise masking; every other block runs without any masking work.
#pragma once

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/common/visible_keys.h"

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
struct MaskPolicy : VisibleKeys<kIsLocal> {
    using Keys = VisibleKeys<kIsLocal>;
    // In raw-score units (the logit bias divided by logit_scale); 0 in a variant kernel launched
    // without slopes.
    float alibi_slope;

    __device__ MaskPolicy(const FlashFwdParams& params, const SeqlenInfo& seq, int batch, int head)
        : Keys{seq.seqlen_q, seq.seqlen_k, params.causal_top_left ? 0 : seq.seqlen_k - seq.seqlen_q,
               kIsLocal ? params.window_left : 0, kIsLocal ? params.window_right : 0},
          alibi_slope(kHasAlibi && params.alibi_slopes != nullptr
                          ? alibi_raw_slope(params, batch, head)
                          : 0.f) {}

    // Another policy's visible pairs with a slope of one's own: the sm90 backward builds one per
    // (query head, row block) step from its tile's mask, which holds no slope (the query head
    // changes from step to step in a GQA group; flash_bwd_kernel.h).
    __device__ MaskPolicy(const Keys& keys, float alibi_slope)
        : Keys(keys), alibi_slope(alibi_slope) {}

    // Backward: whether the (kBlockM, kBlockN) tile at (row0, col0) may hold an invisible pair
    // for a row inside the sequence, or biased scores. (The forward's variant kernels likewise
    // mask every key block, not only those outside the unmasked range: ALiBi biases them all.)
    template <int kBlockM, int kBlockN>
    __device__ bool tile_needs_mask(int row0, int col0) const {
        if constexpr (kHasAlibi) return true;
        return this->template tile_has_hidden_pair<kBlockM, kBlockN>(row0, col0);
    }

    // ALiBi's bias of pair (row, col) in raw-score units; 0 without ALiBi.
    __device__ float alibi_bias(int row, int col) const {
        if constexpr (kHasAlibi) {
            return flash_varlen::alibi_bias(alibi_slope, row, col, this->diagonal);
        }
        return 0.f;
    }

    // The score of pair (row, col) after masking and ALiBi's bias.
    __device__ float masked_score(float score, int row, int col) const {
        if (col < this->visible_col_begin(row) || col >= this->visible_col_end(row))
            return -INFINITY;
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
