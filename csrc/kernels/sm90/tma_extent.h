// TMA descriptor extents shared by the sm90 family's launchers.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/common/flash_params.h"

namespace flash_varlen {
namespace sm90 {

// TMA descriptors take 32-bit extents of at least 1: an empty buffer (every key sequence empty)
// still gets a valid descriptor, which no load then uses (every row block sees no key block).
inline int32_t tma_extent(int64_t extent) { return int32_t(std::max<int64_t>(extent, 1)); }

// The extents of a call's Q and K descriptors: varlen buffers are one batch of all rows (a
// tile's row coordinate is its sequence's first row plus its offset); fixed length is
// (seqlen, d, heads, batch).
struct TmaRows {
    bool is_varlen;
    int32_t rows_q;
    int32_t rows_k;
    int32_t batches;

    explicit TmaRows(const FlashFwdParams& params)
        : is_varlen(params.cu_seqlens_q != nullptr),
          rows_q(tma_extent(is_varlen ? params.total_q : params.seqlen_q)),
          rows_k(tma_extent(is_varlen ? params.total_k : params.seqlen_k)),
          batches(is_varlen ? 1 : tma_extent(params.batch)) {}

    // The batch stride of a one-batch varlen buffer is never used, but TMA wants a valid one.
    int64_t batch_stride(int64_t stride, int64_t row_stride) const {
        return is_varlen ? row_stride : stride;
    }
};

}  // namespace sm90
}  // namespace flash_varlen
