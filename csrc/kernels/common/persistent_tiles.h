// The tiles of a persistent forward launch (one thread block per SM that computes tile after
// tile), handed out in launch order by a counter in device memory.
//
// Launch order is an index -> (row block, sequence, head unit) map, the TileOrder (a head unit is a
// head, or a GQA group whose query heads share each tile: sm90/query_rows.h):
// - varlen launches with a VarlenTileSchedule: longest sequences first
//   (kernels/common/varlen_tile_schedule.h);
// - otherwise the order of a (row blocks, batch, head units) grid, row blocks fastest, so that the row
//   blocks sharing one sequence's K and V run together and read them from L2. Varlen launches
//   take it where their sequences are about equally long (the launcher's rule), and skip the
//   indices past a sequence's end.
//
// Each thread block takes index blockIdx.x first, then gridDim.x + (the counter's value before
// its increment): a block asks for its next tile only when it is about to start it, so the
// blocks that drew cheap tiles take more (greedy list scheduling, as the hardware does for a
// non-persistent grid). A fixed assignment (block b takes b, b + G, ...) would give some blocks
// only expensive causal row blocks: with 16 row blocks per head on 132 SMs, blocks with
// b % 4 == 3 draw row blocks {3, 7, 11, 15} (40 key blocks) against {0, 4, 8, 12} (28).
// FlashAttention-3 hands out its causal and varlen tiles the same way (hopper/tile_scheduler.hpp,
// DynamicPersistentTileScheduler).
//
// The counter must be 0 when the launch starts: it lives in the launch's zero-filled workspace.
#pragma once

#include "kernels/common/varlen_tile_schedule.h"

namespace flash_varlen {

struct TileOrder {
    VarlenTileSchedule schedule;  // tile_start == nullptr: the grid order
    int row_blocks;               // grid order: row blocks of the longest sequence
    int batch;
    int head_units;
    int tiles;  // indices in the order (the schedule's is an upper bound: see lookup)

    // The tile at `index`, or false past the last one. Grid order: coordinates of a row block that
    // may lie past its sequence's end (the caller checks against the sequence's length). Called
    // by a whole warp (the schedule's search needs one). reverse_row_blocks reverses the row
    // blocks of each sequence in the schedule's order only; the grid order ignores it (the
    // forward passes its local mask and keeps the grid ascending; the sm90 backward's
    // lookup_tile reverses the grid order's key blocks itself). One meaning for both orders
    // would change the forward's machine code: left until it can be measured on a GPU.
    __device__ __forceinline__ bool lookup(int index, bool reverse_row_blocks,
                                           TileCoordinates& tile) const {
        if (index >= tiles) return false;
        if (schedule.tile_start != nullptr) {
            return varlen_tile(schedule, batch, head_units, index, reverse_row_blocks, tile);
        }
        tile.m_block = index % row_blocks;
        const int sequence_and_head = index / row_blocks;
        tile.batch = sequence_and_head % batch;
        tile.head = sequence_and_head / batch;
        return true;
    }
};

// Whether a varlen launch takes a VarlenTileSchedule's order rather than the grid order. The
// schedule pays a prepare launch and a lookup per tile; it wins where the grid order has many
// indices past their sequence's end (measured with the sm90 forward on the H200, one thread block
// per index, 7cec657's record: skewed, 64x the tiles, +31 to +68%; docs, 5.9x, +1 to +3%; short,
// 1.25x, -9 to -10%; with this rule short takes the grid order: +9 to +11%,
// benchmarks/results/2026-12-05_h200_sm90_bisect.md).
inline bool use_varlen_schedule(bool is_varlen, int64_t grid_order_tiles, int64_t schedule_tiles) {
    constexpr int64_t kScheduleGridRatio = 2;
    return is_varlen && grid_order_tiles > kScheduleGridRatio * schedule_tiles;
}

// The index of a thread block's next tile after its first (blockIdx.x). One thread calls it.
__device__ __forceinline__ int next_tile_index(int* counter) {
    return int(gridDim.x) + atomicAdd(counter, 1);
}

}  // namespace flash_varlen
