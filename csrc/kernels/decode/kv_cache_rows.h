// Where key position p of a request lives in the cache, for both cache layouts:
//   paged:      page block_table[b, c / page_size], slot c % page_size,
//   contiguous: entry cache_batch_idx[b] (or b), row c,
// with c = cache_leftpad[b] + p (leftpad is contiguous-only). A contiguous cache is addressed
// as one page per request (the entry) whose size is the entry's capacity, so both layouts share
// the branch-free row arithmetic of common/paged_rows.h, `page * page_stride + slot *
// row_stride`; only where the page comes from differs, once per key block.
#pragma once

#include <cutlass/fast_math.h>

#include <cstdint>

#include "kernels/common/flash_params.h"
#include "kernels/common/paged_rows.h"

namespace flash_varlen {
namespace decode {

// The page size a launcher builds its FastDivmod from: the pages of a paged cache, the whole
// entry of a contiguous one (at least 1: FastDivmod divides by it).
inline int addressing_page_size(const FlashDecodeParams& params) {
    const int size = params.block_table == nullptr ? params.seqlen_k : params.page_size;
    return size > 0 ? size : 1;
}

class KvCacheRows {
public:
    // page_size: addressing_page_size(params) as a FastDivmod (built on the host).
    __device__ KvCacheRows(const FlashDecodeParams& params, const cutlass::FastDivmod& page_size,
                           int request)
        : paged_(params.block_table != nullptr),
          rows_(page_size,
                paged_ ? params.block_table + request * params.block_table_batch_stride : nullptr,
                params.num_pages, params.k_batch_stride, params.k_row_stride),
          entry_(rows_.clamp_page(params.cache_batch_idx == nullptr
                                      ? request
                                      : params.cache_batch_idx[request])),
          start_(params.cache_leftpad == nullptr ? 0 : max(params.cache_leftpad[request], 0)) {}

    // The first cache position of the request's keys (its left padding).
    __device__ int start() const { return start_; }

    __device__ bool paged() const { return paged_; }

    // The page of every key of a contiguous cache: its entry.
    __device__ int entry() const { return entry_; }

    // The page holding key position p of a paged cache: a table read (issue it ahead of
    // row_offset so that its latency overlaps other work).
    __device__ int page_of(int position) const { return rows_.page_of(start_ + position); }

    // Element offset (from the cache's base and KV head) of key position p's row, in `page`
    // (page_of(p), or entry() for a contiguous cache).
    __device__ int64_t row_offset(int position, int page) const {
        return rows_.row_offset(start_ + position, page);
    }

private:
    bool paged_;
    PagedRows rows_;
    int entry_;
    int start_;
};

}  // namespace decode
}  // namespace flash_varlen
