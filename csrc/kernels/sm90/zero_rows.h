// Zeroing the rows of a shared-memory tile that lie past a sequence's end, before any wgmma
// reads them (what TMA loads there is the next sequence's data or unused memory, and 0 * NaN is
// NaN inside a product): the forward's V tile (flash_fwd_kernel.h), the backward's K, V, Q and
// dO tiles (flash_bwd_kernel.h).
#pragma once

#include <cute/tensor.hpp>

namespace flash_varlen {
namespace sm90 {

// Zeroes rows [first_row, kRows) of a tile of kRowElems 16-bit elements per row, 16 bytes per
// store, spread over kThreads threads (thread: 0 .. kThreads - 1). element(row, col) is the
// tile's element: the 128-byte swizzle moves whole 16-byte chunks, so 8 consecutive elements of
// a row starting at a multiple of 8 stay contiguous. The caller fences (the generic proxy's
// stores before the async proxy's reads) and synchronises the threads.
template <int kRows, int kRowElems, int kThreads, typename Element, typename ElementAt>
__device__ __forceinline__ void zero_rows_past_end(int first_row, int thread, ElementAt element) {
    constexpr int kElemsPerChunk = 16 / sizeof(Element);
    constexpr int kChunksPerRow = kRowElems / kElemsPerChunk;
    const int chunks = (kRows - first_row) * kChunksPerRow;
    for (int i = thread; i < chunks; i += kThreads) {
        const int row = first_row + i / kChunksPerRow;
        const int col = (i % kChunksPerRow) * kElemsPerChunk;
        *reinterpret_cast<uint4*>(&element(row, col)) = make_uint4(0, 0, 0, 0);
    }
}

}  // namespace sm90
}  // namespace flash_varlen
