// Where a key position of one sequence lives in a paged K/V pool (num_pages, page_size, heads,
// head_dim): position p is row p % page_size of page table[p / page_size], `table` being the
// sequence's row of the block table (flash_params.h). The sm80 forward (paged prefill) and the
// decode family (kv_cache_rows.h) both address keys through it.
//
// The division by a run-time page size uses CUTLASS's FastDivmod (a multiply and a shift), as
// FlashAttention-3's paged KV loads do, so that page size 1 and sizes that are not powers of two
// cost the same as any other. Page numbers read from the table are clamped into the pool: a
// wrong table gives wrong keys, never a read outside the pool (the Python layer's debug mode,
// FLASH_VARLEN_DEBUG=1, reports such tables).
#pragma once

#include <cutlass/fast_math.h>

#include <cstdint>

namespace flash_varlen {

class PagedRows {
public:
    // page_size: the pool's page size as a FastDivmod (built on the host: its constructor
    // divides in 64 bits). table: the sequence's pages, or nullptr when the caller addresses
    // pages it knows itself (row_offset only). page_stride, row_stride: in elements.
    __device__ PagedRows(const cutlass::FastDivmod& page_size, const int* table, int num_pages,
                         int64_t page_stride, int64_t row_stride)
        : page_size_(page_size),
          table_(table),
          last_page_(num_pages - 1),
          page_stride_(page_stride),
          row_stride_(row_stride) {}

    // The page holding position p: a table read (callers that can, issue it early so that its
    // latency overlaps other work).
    __device__ int page_of(int position) const {
        int page_index = 0;
        int slot = 0;
        page_size_(page_index, slot, position);
        return clamp_page(table_[page_index]);
    }

    // Element offset, from the pool's base, of position p's row in `page` (page_of(p)).
    __device__ int64_t row_offset(int position, int page) const {
        int page_index = 0;
        int slot = 0;
        page_size_(page_index, slot, position);
        return int64_t(page) * page_stride_ + int64_t(slot) * row_stride_;
    }

    // Element offset of position p's row, its page looked up in the table.
    __device__ int64_t row_offset(int position) const {
        return row_offset(position, page_of(position));
    }

    __device__ int clamp_page(int page) const { return min(max(page, 0), last_page_); }

private:
    cutlass::FastDivmod page_size_;
    const int* table_;
    int last_page_;
    int64_t page_stride_;
    int64_t row_stride_;
};

}  // namespace flash_varlen
