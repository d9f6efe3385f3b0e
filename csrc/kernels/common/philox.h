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
// counter's last word wraps. The grouping is part of the mask's definition, shared by every
// kernel family: a family whose register fragments group pairs differently still draws pair
// (i, j) from the call of the group that holds it, so all families see the same mask. The
// per-tile helpers of the sm80 family are in sm80/dropout_tiles.h, those of the sm90 forward
// in sm90/dropout_fragment.h.
#pragma once

#include <cstdint>
#include <cute/config.hpp>

#include "kernels/common/flash_params.h"

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
    static constexpr int kRowsPerGroup = 16;  // an MMA tile's rows; r and r + 8 share a call
    static constexpr int kRowHalf = 8;

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

    // The four draws of the group that holds pair (row, col) of the sequence, in the order
    // (r, c), (r, c + 1), (r + 8, c), (r + 8, c + 1) for the group's first pair (r, c).
    __device__ uint4 group_draws(int row, int col) const {
        const uint32_t row_code =
            uint32_t(row / kRowsPerGroup) * kRowHalf + uint32_t(row % kRowHalf);
        return philox4x32_10(make_uint4(uint32_t(col) / 2, row_code, stream, offset_word), key);
    }

    // Keep bits of the four scores of the MMA fragment whose first score is (row, col) of the
    // sequence: bit v for fragment value v (value order (r, c), (r, c + 1), (r + 8, c),
    // (r + 8, c + 1), the m16n8 accumulator layout).
    __device__ uint32_t keep_bits(int row, int col) const {
        const uint4 draws = group_draws(row, col);
        return uint32_t(draws.x >= threshold) | uint32_t(draws.y >= threshold) << 1 |
               uint32_t(draws.z >= threshold) << 2 | uint32_t(draws.w >= threshold) << 3;
    }
};

}  // namespace flash_varlen
