// Dropout on a consumer thread's probabilities of one key block in the sm90 forward: the keep
// decision of each of its values, the testing-only dropout pattern, and the zeroing of the
// dropped values.
//
// A pair's keep decision is common/philox.h's: one Philox call per group of pairs of a sequence
// and head (rows i, i + 8 with i % 16 < 8, columns j, j + 1 with j even), the pair taking its
// place among the call's four draws. It depends on (batch, head, i, j) and the generator state
// alone, so this forward draws the sm80 family's mask (which its backward regenerates),
// whichever thread of whichever tile holds a pair here.
//
// Per 8 columns, a thread of a wgmma accumulator holds (r, c), (r, c + 1), (r + 8, c),
// (r + 8, c + 1) of its tile rows r and r + 8, with r % 16 < 8 (fragment_layouts.h). A tile is
// one head and one row block (128 or 192 tokens, starting at a multiple of the block), so tile
// rows r and r + 8 are tokens t and t + 8 of one head with t % 16 < 8: those four are one group,
// and the thread makes one call per group, as the sm80 family does.
#pragma once

#include <cstdint>
#include <cute/tensor.hpp>
#include <type_traits>

#include "kernels/common/flash_params.h"
#include "kernels/common/philox.h"

namespace flash_varlen {
namespace sm90 {

// The keep decisions of a thread's (2, kCols) view of the accumulator (two rows; kCols columns
// in pairs c, c + 1 of one group), one bit per value. The pairs are drawn in order and shifted
// in from the low end, so that pair p = c / 2 ends as nibble kPairs - 1 - p, its four bits in
// Dropout::keep_bits's order (bit 2 * r + c % 2 of the nibble).
template <int kCols>
struct FragmentKeepBits {
    static_assert(kCols % 2 == 0, "columns come in pairs");
    static constexpr int kPairs = kCols / 2;
    static constexpr int kBitsPerPair = 4;
    static constexpr int kBitsPerWord = 32;
    static constexpr int kWords = (kPairs * kBitsPerPair + kBitsPerWord - 1) / kBitsPerWord;
    uint32_t words[kWords];

    // Appends the bits of the next pair (Dropout::keep_bits's four).
    __device__ __forceinline__ void push(uint32_t pair_bits) {
        CUTE_UNROLL
        for (int w = kWords - 1; w > 0; --w) {
            words[w] = words[w] << kBitsPerPair | words[w - 1] >> (kBitsPerWord - kBitsPerPair);
        }
        words[0] = words[0] << kBitsPerPair | pair_bits;
    }

    // Row r's two bits in pair p: bit 0 for column 2 * p, bit 1 for 2 * p + 1.
    __device__ __forceinline__ uint32_t row_bits(int r, int p) const {
        const int bit = kBitsPerPair * (kPairs - 1 - p) + 2 * r;  // even: both in one word
        return (words[bit / kBitsPerWord] >> (bit % kBitsPerWord)) & 3u;
    }
};

// What dropout knows of a thread's two rows of a tile (tile rows r and r + 8): the Philox stream
// of the tile's head and each row's token (query row of the sequence).
struct DropoutRows {
    Dropout dropout;
    int token[2];

    __device__ DropoutRows(const FlashFwdParams& params, int batch, int head,
                           const cute::array<int, 2>& tokens)
        : dropout(params, batch, head), token{tokens[0], tokens[1]} {}
};

// Testing only: the row of params.dropout_mask_ptr of each of the thread's rows (tokens of the
// tile's head), or nullptr for a row past the sequence's queries.
template <typename Element>
__device__ __forceinline__ cute::array<Element*, 2> dropout_pattern_rows(
    const FlashFwdParams& params, int batch, int head, const cute::array<int, 2>& tokens,
    int seqlen_q) {
    cute::array<Element*, 2> pattern_rows;
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
        pattern_rows[r] = tokens[r] < seqlen_q ? static_cast<Element*>(params.dropout_mask_ptr) +
                                                     batch * params.dropout_mask_batch_stride +
                                                     head * params.dropout_mask_head_stride +
                                                     tokens[r] * params.dropout_mask_row_stride
                                               : nullptr;
    }
    return pattern_rows;
}

// The keep bits of a thread's (2, kCols) view of the accumulator; cols(0, c) holds the block
// column of column c (the same view of an identity tensor), col0 the block's first key.
template <typename Cols>
__device__ __forceinline__ auto fragment_keep_bits(const DropoutRows& rows, const Cols& cols,
                                                   int col0) {
    using KeepBits = FragmentKeepBits<decltype(cute::size<1>(cols))::value>;
    // The wgmma layout this relies on (see the top of the file): the thread's row 1 is its row 0
    // plus 8, and its columns 2 p, 2 p + 1 are adjacent.
    using Stride = decltype(cute::stride(cols.layout()));
    static_assert(std::is_same_v<cute::remove_cvref_t<decltype(cute::get<0, 0>(Stride{}))>,
                                 cute::ScaledBasis<cute::Int<8>, 0>> &&
                      std::is_same_v<cute::remove_cvref_t<decltype(cute::get<1, 0>(Stride{}))>,
                                     cute::ScaledBasis<cute::Int<1>, 1>>,
                  "rows r, r + 8 and columns c, c + 1 of the wgmma accumulator layout");
    KeepBits keep;
    CUTE_UNROLL
    for (int w = 0; w < KeepBits::kWords; ++w) keep.words[w] = 0;
    // Not unrolled: a Philox call is some 50 instructions, and unrolled over the pairs, the calls
    // of every copy of the step made the bf16 d128 kernel 19 k instructions instead of 5 k
    // (compile time, instruction cache). The rolled loop only shifts the bits into place.
#pragma unroll 1
    for (int pair = 0; pair < KeepBits::kPairs; ++pair) {
        const int col = col0 + cute::get<1>(cols(0, 2 * pair));  // even: the pair's first
        keep.push(rows.dropout.keep_bits(rows.token[0], col));
    }
    return keep;
}

// Dropout is applied to P, the probabilities converted to 16 bits for P V, where fewer registers
// are live than around S (flash_fwd_kernel.h). A 32-bit register of P holds the two values of one
// row in one column pair (the accumulator's adjacent columns c, c + 1, low half first; the
// conversion keeps the order), so the pattern and the zeroing work on such words: per value the
// same operations as the sm80 family's, two at a time, with bit masks instead of selects of
// 16-bit values (which the compiler made branchy and spilling at d256).

// The word of P holding row r's values in column pair p of a (2, kCols) view.
template <typename P>
__device__ __forceinline__ uint32_t& pair_word(P& probs, int r, int p) {
    static_assert(sizeof(typename P::value_type) == 2, "16-bit probabilities");
    using Stride = decltype(cute::stride(probs.layout()));
    static_assert(decltype(cute::get<1, 0>(Stride{}))::value == 1 &&
                      decltype(cute::get<1, 1>(Stride{}))::value % 2 == 0 &&
                      decltype(cute::get<0, 0>(Stride{}))::value % 2 == 0,
                  "a pair's two columns are adjacent, the first at an even index");
    return reinterpret_cast<uint32_t*>(
        cute::raw_pointer_cast(probs.data()))[probs.layout()(r, 2 * p) / 2];
}

// 0xFFFF in each 16-bit half of a word whose bit (bit 0: low half) is set in two_bits.
__device__ __forceinline__ uint32_t halves_of(uint32_t two_bits) {
    return (two_bits & 1u ? 0x0000FFFFu : 0u) | (two_bits & 2u ? 0xFFFF0000u : 0u);
}

// Testing only: writes the pattern of one block to params.dropout_mask_ptr, the probability
// negated where dropped (-0.0 for a dropped zero), as the sm80 family does. probs: the block's
// 16-bit probabilities (the sm80 family negates the float and then converts: rounding to nearest
// commutes with negation, so the values are the same). pattern_rows[r]: the pattern's row of row
// r's (head, token), or nullptr for a row that is not a query of the sequence; only keys before
// seqlen_k are written. A pair goes as one 4-byte store: the pattern's rows are multiples of
// kDropoutMaskBlock (128) elements (bindings/forward.cpp), and pairs start at even columns.
template <typename Element, typename Probs, typename KeepBits, typename Cols>
__device__ __forceinline__ void write_dropout_pattern(Probs& probs, const KeepBits& keep,
                                                      const Cols& cols,
                                                      const cute::array<Element*, 2>& pattern_rows,
                                                      int col0, int seqlen_k) {
    constexpr uint32_t kSignBits = 0x80008000u;
    // Columns as compile-time offsets from the thread's first one: a store is one address plus
    // an immediate. (Computed from the column indices, the stores kept the mask's 44 indices
    // alive until here, and the bf16 d128 kernel spilled.)
    const int first_col = col0 + cute::get<1>(cols(0, 0));
    const int cols_left = seqlen_k - first_col;
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
        if (pattern_rows[r] == nullptr) continue;
        Element* out = pattern_rows[r] + first_col;
        CUTE_UNROLL
        for (int p = 0; p < KeepBits::kPairs; ++p) {
            const int offset = cute::get<1>(cols(0, 2 * p)) - cute::get<1>(cols(0, 0));
            const uint32_t dropped = halves_of(~keep.row_bits(r, p) & 3u);
            const uint32_t word = pair_word(probs, r, p) ^ (dropped & kSignBits);
            // Both columns before seqlen_k, or only the first (two conditions rather than an
            // else: two predicated stores, no branches).
            if (offset + 1 < cols_left) {
                *reinterpret_cast<uint32_t*>(out + offset) = word;
            }
            if (offset + 1 == cols_left) {
                *reinterpret_cast<uint16_t*>(out + offset) = uint16_t(word);
            }
        }
    }
}

// Zeroes the dropped values of a (2, kCols) view of 16-bit probabilities (the output is scaled
// by 1 / (1 - p) at the end instead).
template <typename Probs, typename KeepBits>
__device__ __forceinline__ void zero_dropped(Probs& probs, const KeepBits& keep) {
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
        CUTE_UNROLL
        for (int p = 0; p < KeepBits::kPairs; ++p) {
            pair_word(probs, r, p) &= halves_of(keep.row_bits(r, p));
        }
    }
}

}  // namespace sm90
}  // namespace flash_varlen
