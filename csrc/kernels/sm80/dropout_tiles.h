// Dropout on the register tiles of the sm80 kernels: the keep decisions of a whole m16n8
// accumulator tile, one bit per value, drawn through common/philox.h's per-group draws; the
// kept probabilities of a tile; and the testing-only dropout pattern.
#pragma once

#include <cstdint>
#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/philox.h"

namespace flash_varlen {
namespace sm80 {

// The keep decisions of a whole (MMA = 4, MMA_M, MMA_N) tile, one bit per value (bit
// v + 4 * (mi + MMA_M * ni), the value's index in the compact fragment).
template <int kFragments>
struct TileKeepBits {
    static constexpr int kValuesPerFragment = 4;
    static constexpr int kBitsPerWord = 32;
    uint32_t words[(kFragments * kValuesPerFragment + kBitsPerWord - 1) / kBitsPerWord];

    __device__ bool kept(int i) const {
        return (words[i / kBitsPerWord] >> (i % kBitsPerWord)) & 1u;
    }
};

// The keep bits of the tile whose coordinates (this thread's partition of an identity tensor
// over the tile) start at (row0, col0) of the sequence.
template <typename Coords>
__device__ auto tile_keep_bits(Dropout dropout, Coords coords, int row0, int col0) {
    constexpr int kRowFragments = decltype(cute::size<1>(coords))::value;
    constexpr int kColFragments = decltype(cute::size<2>(coords))::value;
    using KeepBits = TileKeepBits<kRowFragments * kColFragments>;
    KeepBits keep;
    CUTE_UNROLL
    for (int w = 0; w < int(sizeof(keep.words) / sizeof(keep.words[0])); ++w) keep.words[w] = 0;
    CUTE_UNROLL
    for (int ni = 0; ni < kColFragments; ++ni) {
        CUTE_UNROLL
        for (int mi = 0; mi < kRowFragments; ++mi) {
            const int bit = (mi + kRowFragments * ni) * KeepBits::kValuesPerFragment;
            keep.words[bit / KeepBits::kBitsPerWord] |=
                dropout.keep_bits(row0 + cute::get<0>(coords(0, mi, ni)),
                                  col0 + cute::get<1>(coords(0, mi, ni)))
                << (bit % KeepBits::kBitsPerWord);
        }
    }
    return keep;
}

// The kept probabilities of a tile scaled by `rescale` and the dropped ones 0, converted to To
// (the layout of convert_fragment's result).
template <typename To, typename Probs, typename KeepBits>
__device__ auto dropped_fragment(const Probs& probs, const KeepBits& keep, float rescale) {
    cute::Tensor dst = cute::make_tensor<To>(probs.layout());
    CUTE_UNROLL
    for (int i = 0; i < cute::size(probs); ++i) {
        dst(i) = To(keep.kept(i) ? probs(i) * rescale : 0.f);
    }
    return dst;
}

// Testing only: writes the dropout pattern of one tile to params.dropout_mask_ptr, the
// probability negated where dropped (-0.0 for a dropped zero), for pairs inside the sequence.
// probs: the tile's values in compact fragment order.
template <typename Element, size_t kValues, typename KeepBits, typename Coords>
__device__ void write_dropout_pattern(cute::array<float, kValues> probs, KeepBits keep,
                                      Coords coords, const FlashFwdParams& params, int batch,
                                      int head, int row0, int col0, int seqlen_q, int seqlen_k) {
    Element* pattern = static_cast<Element*>(params.dropout_mask_ptr) +
                       batch * params.dropout_mask_batch_stride +
                       head * params.dropout_mask_head_stride;
    CUTE_UNROLL
    for (int i = 0; i < int(kValues); ++i) {
        const int row = row0 + cute::get<0>(coords(i));
        const int col = col0 + cute::get<1>(coords(i));
        if (row < seqlen_q && col < seqlen_k) {
            pattern[row * params.dropout_mask_row_stride + col] =
                Element(keep.kept(i) ? probs[i] : -probs[i]);
        }
    }
}

}  // namespace sm80
}  // namespace flash_varlen
