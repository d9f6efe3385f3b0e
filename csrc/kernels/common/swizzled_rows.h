// The shared-memory layout of the row-major tiles (rows of head-dim elements) that the mma.sync
// kernels, the sm80 family's forward and the decode family, fill with 16-byte cp.async writes
// along the rows and read with ldmatrix down the columns.
#pragma once

#include <cute/tensor.hpp>

namespace flash_varlen {

// Rows are stored in chunks of 64 elements (128 bytes) when the head dim allows, else 32,
// XOR-swizzled in 16-byte units so that both the 16-byte cp.async writes of a row and the 8x8
// ldmatrix reads down a column hit distinct banks (no conflicts). Tiles are this atom repeated
// (cute::tile_to_shape).
template <int kHeadDim>
struct SwizzledRows {
    static constexpr int kRowChunk = kHeadDim % 64 == 0 ? 64 : 32;
    static constexpr int kSwizzleBits = kRowChunk == 64 ? 3 : 2;
    using Atom = decltype(cute::composition(
        cute::Swizzle<kSwizzleBits, 3, 3>{},
        cute::Layout<cute::Shape<cute::_8, cute::Int<kRowChunk>>,
                     cute::Stride<cute::Int<kRowChunk>, cute::_1>>{}));
};

}  // namespace flash_varlen
