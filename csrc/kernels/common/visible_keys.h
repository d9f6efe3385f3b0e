// Which (query, key) pairs of a sequence are visible, and from that which blocks of them the main
// loops visit and which need element-wise masking: the integer arithmetic of MaskPolicy
// (mask_policy.h), in plain C++ so that the host compiler can check it against the pairs of
// many small sequences (tests/test_visible_keys_cpu.py).
//
// Keys past the sequence end are never visible. A local mask (causal attention and sliding
// windows) also shows query i only the keys
//   i + diagonal - window_left <= j <= i + diagonal + window_right,
// where diagonal = seqlen_k - seqlen_q (bottom-right alignment, as flash-attn) or 0 (top-left
// alignment, PyTorch's is_causal); causal attention is window_right = 0. The visible keys of a
// row form one interval that moves right by one key per row, so the visible pairs of a row block
// are the keys from the first row's first visible key to the last row's last one, and the ranges
// below are exact: a visited range holds exactly the blocks with a visible pair, an unmasked
// range exactly the blocks without a hidden one, tile_has_hidden_pair says exactly whether there
// is one. One exception, wasted work and never a wrong result: where no row of the range sees
// any key (the interval the formula reaches lies past the sequence end of the rows or keys), a
// visited range may still hold one block, which the kernels then visit fully masked. The forward
// and the backward derive their work from the same functions, which the deterministic
// backward's ordering relies on. tests/test_visible_keys_cpu.py checks all of this pair by pair.
#pragma once

// Every function is constexpr and nothing else: device code calls constexpr functions as the
// build passes --expt-relaxed-constexpr (as padded_rows.h), and the host compiler sees plain
// C++. (__forceinline__ here changed the sm80 backward's register assignment.)
namespace flash_varlen {

namespace visible_keys_detail {

constexpr int min_of(int a, int b) { return a < b ? a : b; }

// For value >= 0.
constexpr int ceil_div(int value, int divisor) { return (value + divisor - 1) / divisor; }

}  // namespace visible_keys_detail

template <bool kIsLocal>
struct VisibleKeys {
    int seqlen_q;
    int seqlen_k;
    int diagonal;  // the key aligned with query 0
    int window_left;
    int window_right;

    // The first key query `row` may see; may be negative (then 0) or past the end.
    constexpr int visible_col_begin(int row) const {
        return kIsLocal ? row + diagonal - window_left : 0;
    }

    // One past the last key query `row` may see; zero or less when it sees none.
    constexpr int visible_col_end(int row) const {
        return kIsLocal ? visible_keys_detail::min_of(seqlen_k, row + diagonal + window_right + 1)
                        : seqlen_k;
    }

    // The last query row of row block m_block that lies inside the sequence.
    template <int kBlockM>
    constexpr int last_row_of(int m_block) const {
        return visible_keys_detail::min_of((m_block + 1) * kBlockM, seqlen_q) - 1;
    }

    // Forward: the key blocks [key_block_begin, key_block_end) hold every key some query row of
    // first_row .. last_row (inside the sequence) sees; an empty range when they see none. A
    // tile's rows are one such interval: a row block, or the same tokens of several heads when
    // the sm90 forward packs a GQA group into one tile (sm90/query_rows.h).
    template <int kBlockN>
    constexpr int key_block_begin_of_rows(int first_row) const {
        const int first_col = visible_col_begin(first_row);
        return first_col <= 0 ? 0 : first_col / kBlockN;
    }

    template <int kBlockN>
    constexpr int key_block_end_of_rows(int last_row) const {
        const int col_end = visible_col_end(last_row);
        return col_end <= 0 ? 0 : visible_keys_detail::ceil_div(col_end, kBlockN);
    }

    // Forward: key blocks in [unmasked_block_begin, unmasked_block_end) are visible to every row
    // of first_row .. last_row in full: they need no masking. The range may be empty; the
    // visited blocks outside it hold a hidden pair.
    template <int kBlockN>
    constexpr int unmasked_block_begin_of_rows(int last_row) const {
        const int first_col = visible_col_begin(last_row);
        return first_col <= 0 ? 0 : visible_keys_detail::ceil_div(first_col, kBlockN);
    }

    template <int kBlockN>
    constexpr int unmasked_block_end_of_rows(int first_row) const {
        const int col_end = visible_col_end(first_row);
        return col_end <= 0 ? 0 : col_end / kBlockN;
    }

    // The same ranges for row block m_block of kBlockM consecutive rows.
    template <int kBlockM, int kBlockN>
    constexpr int key_block_begin(int m_block) const {
        return key_block_begin_of_rows<kBlockN>(m_block * kBlockM);
    }

    template <int kBlockM, int kBlockN>
    constexpr int key_block_end(int m_block) const {
        return key_block_end_of_rows<kBlockN>(last_row_of<kBlockM>(m_block));
    }

    template <int kBlockM, int kBlockN>
    constexpr int unmasked_block_begin(int m_block) const {
        return unmasked_block_begin_of_rows<kBlockN>(last_row_of<kBlockM>(m_block));
    }

    template <int kBlockM, int kBlockN>
    constexpr int unmasked_block_end(int m_block) const {
        return unmasked_block_end_of_rows<kBlockN>(m_block * kBlockM);
    }

    // Backward: the query row blocks [row_block_begin, row_block_end) hold every row that sees
    // some key of key block n_block.
    template <int kBlockM, int kBlockN>
    constexpr int row_block_begin(int n_block) const {
        if constexpr (!kIsLocal) return 0;
        // The first row whose last visible key reaches the block's first key.
        const int first_row = n_block * kBlockN - diagonal - window_right;
        return first_row <= 0 ? 0 : first_row / kBlockM;
    }

    template <int kBlockM, int kBlockN>
    constexpr int row_block_end(int n_block) const {
        const int all_blocks = visible_keys_detail::ceil_div(seqlen_q, kBlockM);
        if constexpr (!kIsLocal) return all_blocks;
        // One past the last row whose first visible key is at most the block's last key.
        const int last_col = visible_keys_detail::min_of((n_block + 1) * kBlockN, seqlen_k) - 1;
        const int row_end = last_col - diagonal + window_left + 1;
        return row_end <= 0 ? 0
                            : visible_keys_detail::min_of(
                                  all_blocks, visible_keys_detail::ceil_div(row_end, kBlockM));
    }

    // Backward, deterministic order with a local mask (key blocks add into dQ in descending
    // order): how many key blocks after n_block, of the sequence's ceil(seqlen_k / kBlockN), visit
    // row block m_block, which n_block visits. row_block_begin and row_block_end do not decrease
    // with the block, so every later block's range ends past m_block and those are the blocks up
    // to the first whose range starts past it: a binary search. A wrong count hangs the kernel
    // (a turn that never comes), so the CPU test checks it against a count block by block.
    template <int kBlockM, int kBlockN>
    constexpr int later_key_blocks_visiting(int n_block, int m_block) const {
        int first_past = n_block + 1;
        int end = visible_keys_detail::ceil_div(seqlen_k, kBlockN);  // key blocks with keys
        while (first_past < end) {  // the first block in [first_past, end) starting past it
            const int middle = (first_past + end) / 2;
            if (row_block_begin<kBlockM, kBlockN>(middle) > m_block) {
                end = middle;
            } else {
                first_past = middle + 1;
            }
        }
        return first_past - (n_block + 1);
    }

    // Backward: whether the (kBlockM, kBlockN) tile at (row0, col0) holds a hidden pair for a
    // row inside the sequence.
    template <int kBlockM, int kBlockN>
    constexpr bool tile_has_hidden_pair(int row0, int col0) const {
        const int last_row = visible_keys_detail::min_of(row0 + kBlockM, seqlen_q) - 1;
        return col0 + kBlockN > visible_col_end(row0) ||
               (kIsLocal && col0 < visible_col_begin(last_row));
    }
};

}  // namespace flash_varlen
