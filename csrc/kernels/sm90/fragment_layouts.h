// Views of a wgmma accumulator fragment, and conversion of fragments to 16-bit types.
//
// A thread's share of a 64 x N wgmma accumulator has the value layout (2, 2, N / 8): two
// adjacent columns, two rows eight apart (r and r + 8), and N / 8 groups of 8 columns; the four
// threads of a quad (lanes 4g .. 4g + 3) hold the same two rows. partition_fragment_C gives
// ((2, 2, N / 8), MMA_M, MMA_N).
#pragma once

#include <cutlass/numeric_conversion.h>

#include <cute/tensor.hpp>

namespace flash_varlen {
namespace sm90 {

using namespace cute;

// ((2, 2, N / 8), MMA_M, MMA_N) -> (rows = (2, MMA_M), cols = (2, N / 8, MMA_N)).
template <typename Layout>
__device__ constexpr auto accumulator_as_rows_cols(Layout acc) {
    static_assert(decltype(rank<0>(acc))::value == 3, "a wgmma accumulator layout");
    return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                       make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
}

// The accumulator of S = Q K^T read as the register A operand of O += P V (16-bit P): a k-slice
// of 16 keys of the A fragment holds (2 keys, 2 rows, keys + 8), which are the values of two
// consecutive 8-column groups of the accumulator, so only the grouping changes:
// ((2, 2, N / 8), MMA_M, MMA_N) -> ((2, 2, 2), MMA_M, N / 16 * MMA_N).
template <typename Layout>
__device__ constexpr auto accumulator_as_a_operand(Layout acc) {
    static_assert(decltype(rank<0>(acc))::value == 3, "a wgmma accumulator layout");
    auto groups = logical_divide(get<0, 2>(acc), Tile<_2>{});  // ((2, N / 16))
    return make_layout(make_layout(get<0, 0>(acc), get<0, 1>(acc), get<0, 0>(groups)), get<1>(acc),
                       coalesce(make_layout(get<0, 1>(groups), get<2>(acc))));
}

// dst = src converted element by element; both fragments have the same (compact) layout, so
// their register arrays correspond index by index, and pairs convert with one packed
// instruction (F2FP).
template <typename SrcTensor, typename DstTensor>
__device__ __forceinline__ void convert_fragment(const SrcTensor& src, DstTensor& dst) {
    using From = typename SrcTensor::value_type;
    using To = typename DstTensor::value_type;
    constexpr int kSize = decltype(size(src))::value;
    static_assert(kSize == decltype(size(dst))::value && kSize % 2 == 0, "same even size");
    cutlass::NumericArrayConverter<To, From, 2> convert_pair;
    CUTE_UNROLL
    for (int i = 0; i < kSize; i += 2) {
        cutlass::Array<From, 2> pair;
        pair[0] = src.data()[i];
        pair[1] = src.data()[i + 1];
        const cutlass::Array<To, 2> converted = convert_pair(pair);
        dst.data()[i] = converted[0];
        dst.data()[i + 1] = converted[1];
    }
}

}  // namespace sm90
}  // namespace flash_varlen
