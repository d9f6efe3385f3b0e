// MaskPolicy (common/mask_policy.h) applied to the accumulator of the sm80 family's tiled
// m16n8k16 MMA, walking the fragment layout directly.
#pragma once

#include <cute/tensor.hpp>

#include "kernels/common/mask_policy.h"
#include "kernels/sm80/fragment_layouts.h"

namespace flash_varlen {
namespace sm80 {

// Masks and biases one thread's (MMA, MMA_M, MMA_N) accumulator of a tiled SM80 m16n8k16 MMA
// whose kNWarps warps are stacked along M; row0/col0 place the tile in the sequence.
// Coordinates are computed from the lane here rather than carried in registers across the
// main loop: a hoisted coordinate tensor costs two registers per score.
template <int kNWarps, typename Mask, typename ScoreTensor>
__device__ void mask_accumulator(const Mask& mask, ScoreTensor& acc_s, int row0, int col0) {
    constexpr int kMmaRows = 16;       // rows of one MMA tile (a warp's share of a row slab)
    constexpr int kMmaCols = 8;        // columns of one MMA tile
    constexpr int kRowHalf = 8;        // a thread holds rows r and r + 8 of its tile
    constexpr int kThreadsPerRow = 4;  // a quad of lanes shares a row, 2 columns each
    constexpr int kColsPerThread = 2;
    Tensor scores = make_tensor(
        acc_s.data(), accumulator_as_rows_cols(acc_s.layout()));  // ((2, MMA_M), (2, MMA_N))
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int thread_row = row0 + warp * kMmaRows + lane / kThreadsPerRow;
    const int thread_col = col0 + (lane % kThreadsPerRow) * kColsPerThread;
    CUTE_UNROLL
    for (int mi = 0; mi < cute::size<0, 1>(scores); ++mi) {
        CUTE_UNROLL
        for (int half = 0; half < 2; ++half) {
            const int row = thread_row + mi * kMmaRows * kNWarps + half * kRowHalf;
            CUTE_UNROLL
            for (int ni = 0; ni < cute::size<1, 1>(scores); ++ni) {
                CUTE_UNROLL
                for (int j = 0; j < kColsPerThread; ++j) {
                    float& score = scores(make_coord(half, mi), make_coord(j, ni));
                    score = mask.masked_score(score, row, thread_col + ni * kMmaCols + j);
                }
            }
        }
    }
}

}  // namespace sm80
}  // namespace flash_varlen
