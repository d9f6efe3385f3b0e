// Where key position p of a request lives in the cache, for both cache layouts:
//   paged:      page block_table[b, c / page_size], slot c % page_size,
//   contiguous: entry cache_batch_idx[b] (or b), row c,
// with c = cache_leftpad[b] + p (leftpad is contiguous-only). A contiguous cache is addressed
// as one page per request (the entry) whose size is the entry's capacity, so both layouts share
// the branch-free row arithmetic `page * page_stride + slot * row_stride`; only where the page
// comes from differs, once per key block. The division by a run-time page size uses CUTLASS's
// FastDivmod (a multiply and a shift), as FlashAttention-3's paged KV loads do: page size 1 and
// sizes that are not powers of two cost the same.
#pragma once

#include <cutlass/fast_math.h>

#include <cstdint>

#include "kernels/common/flash_params.h"

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
        : page_size_(page_size),
          block_table_(params.block_table == nullptr
                           ? nullptr
                           : params.block_table + request * params.block_table_batch_stride),
          last_entry_(params.cache_entries - 1),
          entry_(clamp_entry(params.cache_batch_idx == nullptr ? request
                                                               : params.cache_batch_idx[request])),
          start_(params.cache_leftpad == nullptr ? 0 : max(params.cache_leftpad[request], 0)),
          page_stride_(params.k_batch_stride),
          row_stride_(params.k_row_stride) {}

    // The first cache position of the request's keys (its left padding).
    __device__ int start() const { return start_; }

    __device__ bool paged() const { return block_table_ != nullptr; }

    // The page of every key of a contiguous cache: its entry.
    __device__ int entry() const { return entry_; }

    // The page holding key position p of a paged cache: a table read (issue it ahead of
    // row_offset so that its latency overlaps other work).
    __device__ int page_of(int position) const {
        int page = 0;
        int slot = 0;
        page_size_(page, slot, start_ + position);
        return clamp_entry(block_table_[page]);
    }

    // Element offset (from the cache's base and KV head) of key position p's row, in `page`
    // (page_of(p), or entry() for a contiguous cache).
    __device__ int64_t row_offset(int position, int page) const {
        int page_index = 0;
        int slot = 0;
        page_size_(page_index, slot, start_ + position);
        return int64_t(page) * page_stride_ + int64_t(slot) * row_stride_;
    }

private:
    __device__ int clamp_entry(int entry) const { return min(max(entry, 0), last_entry_); }

    cutlass::FastDivmod page_size_;
    const int* block_table_;
    int last_entry_;
    int entry_;
    int start_;
    int64_t page_stride_;
    int64_t row_stride_;
};

}  // namespace decode
}  // namespace flash_varlen
