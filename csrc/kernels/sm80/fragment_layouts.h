// Re-indexing of the register fragments of the SM80 m16n8k16 MMA, so that the softmax can walk
// rows and columns and the probabilities can feed the second GEMM without leaving registers.
#pragma once

#include <cutlass/numeric_conversion.h>

#include <cute/tensor.hpp>

namespace flash_varlen {
namespace sm80 {

using namespace cute;

// An accumulator fragment is ((2, 2), MMA_M, MMA_N): per MMA tile a thread holds two adjacent
// columns in row r and the same two columns in row r + 8. Viewed as (rows, cols) it becomes
// ((2, MMA_M), (2, MMA_N)), so that row-wise reductions are loops over the second mode.
template <typename Layout>
__device__ constexpr auto accumulator_as_rows_cols(Layout acc_layout) {
    static_assert(decltype(rank(acc_layout))::value == 3, "expected (MMA, MMA_M, MMA_N)");
    static_assert(decltype(size<0>(acc_layout))::value == 4, "expected 4 values per MMA tile");
    auto split = logical_divide(acc_layout, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
    return make_layout(make_layout(get<0, 1>(split), get<1>(split)),
                       make_layout(get<0, 0>(split), get<2>(split)));
}

// The accumulators of two neighbouring n8 tiles hold exactly the values that the A operand of an
// m16n8k16 MMA wants from this thread, in the same order. So (4, MMA_M, MMA_N) regroups to
// ((4, 2), MMA_M, MMA_N / 2) with no data movement: P = softmax(S) is consumed from registers.
template <typename Layout>
__device__ constexpr auto accumulator_as_a_operand(Layout acc_layout) {
    static_assert(decltype(size<0>(acc_layout))::value == 4, "expected 4 values per MMA tile");
    static_assert(decltype(size<2>(acc_layout))::value % 2 == 0, "MMA_N must be even");
    auto split = logical_divide(acc_layout, Shape<X, X, _2>{});  // (4, MMA_M, (2, MMA_N / 2))
    return make_layout(make_layout(get<0>(split), get<2, 0>(split)), get<1>(split),
                       get<2, 1>(split));
}

// Converts a whole register fragment at once, so the compiler emits packed two-wide conversions.
template <typename To, typename Engine, typename Layout>
__device__ auto convert_fragment(const Tensor<Engine, Layout>& src) {
    using From = typename Engine::value_type;
    constexpr int kSize = decltype(size(src))::value;
    Tensor dst = make_tensor<To>(src.layout());
    cutlass::NumericArrayConverter<To, From, kSize> convert;
    *reinterpret_cast<cutlass::Array<To, kSize>*>(raw_pointer_cast(dst.data())) = convert(
        *reinterpret_cast<const cutlass::Array<From, kSize>*>(raw_pointer_cast(src.data())));
    return dst;
}

}  // namespace sm80
}  // namespace flash_varlen
