// The named barriers of the sm90 forward. cutlass::arch::NamedBarrier adds the ids CUTLASS
// reserves for itself (FirstUserBarrier = 8), so these map to hardware barriers 8..15; barrier 0
// is __syncthreads'.
#pragma once

#include <cstdint>

namespace flash_varlen {
namespace sm90 {

// Consumer warpgroup w (0-based among the consumers) issues its GEMMs only while it holds its
// turn, barrier kMmaTurn + w (up to 3 consumer warpgroups: ids 0..2).
constexpr uint32_t kBarrierMmaTurn = 0;
// Every consumer thread: the rows of the first V tile that lie past the sequence end are zero.
constexpr uint32_t kBarrierVTailZeroed = 3;
// + consumer warpgroup index (ids 4..6): that warpgroup's O rows are staged in shared memory.
// One id per warpgroup: the warpgroups reach the epilogue at different times, and a barrier
// shared by two groups of 128 threads would let one group's arrivals release the other.
constexpr uint32_t kBarrierOStaged = 4;
constexpr uint32_t kNumUserBarriers = 8;
static_assert(kBarrierOStaged + 3 <= kNumUserBarriers, "16 hardware barriers, 8 reserved");

}  // namespace sm90
}  // namespace flash_varlen
