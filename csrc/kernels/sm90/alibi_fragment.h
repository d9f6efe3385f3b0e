// ALiBi on a consumer thread's raw scores of one key block in the sm90 forward.
//
// The bias is the common formula (common/mask_policy.h's alibi_raw_slope and alibi_bias), so it
// is the sm80 family's to the bit. A tile of the variants kernel, where ALiBi runs, is one head
// (one slope; query_rows.h) and one row block: each row's query index is its token.
#pragma once

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/mask_policy.h"

namespace flash_varlen {
namespace sm90 {

// Adds the bias to `scores`, a (kRows, cols) view of the accumulator whose row r is query
// tokens[r], with the tile's head's slope (raw-score units); cols(0, c) holds the block column
// of column c (the same view of an identity tensor), col0 the block's first key, diagonal the
// sequence's (MaskPolicy::diagonal).
template <size_t kRows, typename Scores, typename Cols>
__device__ __forceinline__ void add_alibi_bias(Scores& scores, const Cols& cols, float slope,
                                               const cute::array<int, kRows>& tokens, int col0,
                                               int diagonal) {
    CUTE_UNROLL
    for (int r = 0; r < int(kRows); ++r) {
        CUTE_UNROLL
        for (int c = 0; c < cute::size<1>(scores); ++c) {
            scores(r, c) += alibi_bias(slope, tokens[r], col0 + cute::get<1>(cols(0, c)), diagonal);
        }
    }
}

}  // namespace sm90
}  // namespace flash_varlen
