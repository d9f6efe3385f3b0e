// Attention dropout with a counter-based random number generator, so that the backward
// regenerates the forward's mask instead of storing it.
//
// Each (batch, head, query row i, key j) pair gets a 32-bit draw from Philox4x32-10 (Salmon et
// al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), keyed by the seed of PyTorch's
// CUDA generator. One Philox call yields four draws, and one thread of an SM80 m16n8k16 MMA holds
// four scores of each MMA tile: (r, c), (r, c + 1), (r + 8, c), (r + 8, c + 1), with r % 16 < 8
// and c even. The call's counter is therefore built from that group's position alone,
//   (c / 2, (r / 16) * 8 + r % 8, batch * nheads + head, offset / kPhiloxOffsetGranularity),
// which makes every draw a function of (batch, head, i, j) and the generator state only: the
// forward and the backward, with different tile shapes, see the same mask. Offsets are multiples
// of kPhiloxOffsetGranularity, so dividing loses nothing and leaves 2^32 launches before the
// counter's last word wraps.
#pragma once

#include <cstdint>
#include <cute/tensor.hpp>

#include "flash_params.h"

namespace flash_varlen {

__device__ __forceinline__ uint4 philox4x32_10(uint4 counter, uint2 key) {
    // The multipliers and Weyl increments of Philox4x32 (the paper's recommended constants).
    constexpr uint32_t kMul0 = 0xD2511F53u;
    constexpr uint32_t kMul1 = 0xCD9E8D57u;
    constexpr uint32_t kWeyl0 = 0x9E3779B9u;
    constexpr uint32_t kWeyl1 = 0xBB67AE85u;
    constexpr int kRounds = 10;
    CUTE_UNROLL
    for (int round = 0; round < kRounds; ++round) {
        const uint32_t hi0 = __umulhi(kMul0, counter.x);
        const uint32_t lo0 = kMul0 * counter.x;
        const uint32_t hi1 = __umulhi(kMul1, counter.z);
        const uint32_t lo1 = kMul1 * counter.z;
        counter = make_uint4(hi1 ^ counter.y ^ key.x, lo1, hi0 ^ counter.w ^ key.y, lo0);
        key.x += kWeyl0;
        key.y += kWeyl1;
    }
    return counter;
}

// The generator state of one launch: the values the host passed, or (under CUDA graph capture,
// and in the backward) the ones behind the device pointers, plus the extra offset.
__device__ __forceinline__ uint64_t philox_seed(const FlashFwdParams& params) {
    return params.philox_seed_ptr != nullptr ? uint64_t(*params.philox_seed_ptr)
                                             : params.philox_seed;
}

__device__ __forceinline__ uint64_t philox_offset(const FlashFwdParams& params) {
    const uint64_t base = params.philox_offset_ptr != nullptr ? uint64_t(*params.philox_offset_ptr)
                                                              : params.philox_offset;
    return base + params.philox_offset_extra;
}

struct Dropout {
    uint2 key;
    uint32_t stream;  // batch * nheads + head
    uint32_t offset_word;
    uint32_t threshold;

    __device__ Dropout(const FlashFwdParams& params, int batch, int head)
        : stream(uint32_t(batch) * uint32_t(params.nheads) + uint32_t(head)),
          threshold(params.dropout_threshold) {
        const uint64_t seed = philox_seed(params);
        key = make_uint2(uint32_t(seed), uint32_t(seed >> 32));
        offset_word = uint32_t(philox_offset(params) / kPhiloxOffsetGranularity);
    }

    // Keep bits of the four scores of the MMA fragment whose first score is (row, col) of the
    // sequence: bit v for fragment value v (value order (r, c), (r, c + 1), (r + 8, c),
    // (r + 8, c + 1), the m16n8 accumulator layout).
    __device__ uint32_t keep_bits(int row, int col) const {
        constexpr int kRowsPerGroup = 16;  // an MMA tile's rows; r and r + 8 share a call
        constexpr int kRowHalf = 8;
        const uint32_t row_code =
            uint32_t(row / kRowsPerGroup) * kRowHalf + uint32_t(row % kRowHalf);
        const uint4 draws =
            philox4x32_10(make_uint4(uint32_t(col) / 2, row_code, stream, offset_word), key);
        return uint32_t(draws.x >= threshold) | uint32_t(draws.y >= threshold) << 1 |
               uint32_t(draws.z >= threshold) << 2 | uint32_t(draws.w >= threshold) << 3;
    }
};

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

}  // namespace flash_varlen
