// Which query (token, head) each of the kBlockM rows of an sm90 forward tile holds.
//
// Without packing, a tile is kBlockM consecutive tokens of one head. With GQA packing, the G query
// heads that read one key/value head share the tile: kBlockM / G consecutive tokens of each,
// token-major (row r holds token first_token + r / G of head first_head + r % G), the layout of
// FlashAttention-4's pack_gqa (Dao-AILab/flash-attention, flash_attn/cute/pack_gqa.py), whose
// idea this follows. Then a short sequence fills a tile G times better: with 32 query and 8
// key/value heads, a 20-token sequence runs as 8 tiles of 4 heads x 20 tokens (80 useful rows of
// 128) instead of 32 tiles of 20 useful rows, and each of its K and V blocks is read by 8 tiles
// instead of 32. (A long sequence has as many tiles, and as many K and V reads, either way.)
// The layout is chosen so that
// - Q lands with one TMA box per chunk of columns, (columns, G, tokens), because the G heads of a
//   token lie at one head stride from each other in memory (flash_fwd_launch.h's descriptor);
// - the rows of a tile cover one token interval, [first_token, first_token + tokens), so the key
//   blocks they visit are those of the interval (MaskPolicy::*_of_rows) and the mask of a score
//   needs only its row's token.
// The unpacked tile is the case G = 1 of the same mapping, so both run one code path.
//
// When G does not divide kBlockM the last kBlockM - G * tokens rows are padding; so are the rows
// of tokens past the sequence end. Rows are independent in every step of the kernel (a row's
// scores, maximum, sum and output depend on its own Q row only), so padding rows compute garbage
// that is never written.
#pragma once

#include <cute/config.hpp>

namespace flash_varlen {
namespace sm90 {

struct QueryRows {
    int heads;        // query heads in the tile: G when packed, else 1
    int first_token;  // of the sequence
    int first_head;

    // Row block m_block of head unit `unit` (a head, or a GQA group when heads > 1).
    template <int kBlockM>
    __device__ static QueryRows of_tile(int heads, int m_block, int unit) {
        return QueryRows{heads, m_block * tokens_per_tile<kBlockM>(heads), unit * heads};
    }

    // Consecutive tokens of each head in a tile of kBlockM rows.
    template <int kBlockM>
    __host__ __device__ static int tokens_per_tile(int heads) {
        return kBlockM / heads;
    }

    __device__ int token(int row) const { return first_token + row / heads; }
    __device__ int head(int row) const { return first_head + row % heads; }

    // The last token of the tile that lies inside the sequence (a tile starts inside it).
    template <int kBlockM>
    __device__ int last_token(int seqlen_q) const {
        return min(first_token + tokens_per_tile<kBlockM>(heads), seqlen_q) - 1;
    }

    // Whether row `row` holds a query of the sequence (its output and LSE are written).
    template <int kBlockM>
    __device__ bool holds_query(int row, int seqlen_q) const {
        return row < heads * tokens_per_tile<kBlockM>(heads) && token(row) < seqlen_q;
    }
};

// The query heads a tile packs: the whole GQA group when a group has more than one query head
// and at least one token of each fits a tile, else 1. FlashAttention-3 packs varlen GQA calls
// (hopper/heuristics.h) and FlashAttention-4 packs every GQA call on sm90; fixed-length calls
// are packed here too, since a tile of one head's tokens gains nothing over a tile of the
// group's (the key blocks it visits are read G times instead of once). The variants kernel
// (ALiBi, dropout) keeps one head per tile: its per-row coordinates (slopes, the dropout stream)
// are per (head, token) of an unpacked tile.
template <int kBlockM>
__host__ __device__ inline int query_heads_per_tile(int nheads, int nheads_k, bool has_variants) {
    const int group = nheads / nheads_k;
    return !has_variants && group > 1 && group <= kBlockM ? group : 1;
}

}  // namespace sm90
}  // namespace flash_varlen
