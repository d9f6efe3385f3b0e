// Launch order of a varlen forward's tiles (one row block of one head unit of one sequence each:
// a head unit is a head, or the query heads of a GQA group when the kernel packs them into one
// tile, sm90/query_rows.h), so that a packed batch launches only the tiles it has, longest
// sequences first.
//
// A grid of (row blocks of the longest sequence, batch, heads) launches max_seqlen_q / kBlockM
// thread blocks for every sequence: with one 16k-token document among 258 tiny ones that is
// 530k blocks per call, of which 6k have work, and the long document's blocks run wherever the
// launch order happens to put them. Instead, a one-block prepare kernel (no host sync: it reads
// cu_seqlens and seqused on the device) writes
// - sequence_order: the sequences by decreasing work (rows x keys, in power-of-two classes:
//   longest-processing-time-first order, the classic greedy bound for list scheduling), and
// - tile_start: where each sequence's tiles start in launch order (an exclusive prefix sum of
//   row blocks x head units),
// and the main kernel's tiles are the indices of that order, up to a bound the host knows without
// reading the device (total_q / rows + batch per head unit): a thread block finds the tile of an
// index by a 32-way search, and stops at the first index past the last tile (the persistent
// grid of kernels/common/persistent_tiles.h hands the indices out). Within a sequence the row
// blocks of one head unit are adjacent (they share K and V in L2; so do the heads of a GQA
// group, which follow each other), with the causal row blocks that see the most keys first.
//
// Only the order of execution depends on the schedule: every tile computes the same values
// wherever it runs, so outputs stay bitwise reproducible.
#pragma once

#include <cub/block/block_scan.cuh>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/common/flash_params.h"
#include "kernels/common/seqlen_info.h"

namespace flash_varlen {

// The workspace of one schedule, int32: sequence_order (batch) then tile_start (batch + 1).
struct VarlenTileSchedule {
    const int* sequence_order;
    const int* tile_start;

    static int64_t bytes(int batch) { return (2 * int64_t(batch) + 1) * int64_t(sizeof(int)); }

    // An upper bound of the tiles, known on the host, for row blocks of `tokens` tokens each. A
    // sequence of length n has ceil(n / tokens) <= n / tokens + 1 row blocks, and the lengths (or
    // used lengths) sum to at most total_q.
    static int64_t tile_bound(int64_t total_q, int batch, int tokens, int head_units) {
        return ((total_q + tokens - 1) / tokens + batch) * head_units;
    }
};

// What one tile computes: row block m_block of head unit `head` of sequence `batch`.
struct TileCoordinates {
    int m_block;
    int batch;
    int head;
};

namespace varlen_schedule_detail {

constexpr int kThreads = 1024;
// Work classes: floor(log2(rows x keys)) + 1, 0 for no work; rows and keys are below 2^31.
constexpr int kWorkClasses = 64;

__device__ __forceinline__ int work_class(const SeqlenInfo& seq) {
    const uint64_t work = uint64_t(max(seq.seqlen_q, 0)) * uint64_t(max(seq.seqlen_k, 0));
    return work == 0 ? 0 : 64 - __clzll(work);
}

__device__ __forceinline__ int row_blocks(const SeqlenInfo& seq, int tokens) {
    return (max(seq.seqlen_q, 0) + tokens - 1) / tokens;
}

}  // namespace varlen_schedule_detail

// One thread block of varlen_schedule_detail::kThreads threads, for row blocks of `tokens` tokens
// of `head_units` head units. `order` and `tile_start` are the two arrays of VarlenTileSchedule,
// writable here. (kBlockM, the kernel's tile rows, only gives each instantiation its own copy.)
template <int kBlockM>
__global__ void __launch_bounds__(varlen_schedule_detail::kThreads)
    prepare_varlen_tile_schedule(const __grid_constant__ FlashFwdParams params, int tokens,
                                 int head_units, int* order, int* tile_start) {
    using namespace varlen_schedule_detail;
    using BlockScan = cub::BlockScan<int, kThreads>;
    __shared__ typename BlockScan::TempStorage scan_storage;
    __shared__ int class_count[kWorkClasses];
    __shared__ int class_cursor[kWorkClasses];
    const int batch = params.batch;
    const int tid = threadIdx.x;

    // A counting sort by work class, largest class first. The order inside a class follows the
    // shared-memory atomics (it may differ between calls; the results do not).
    if (tid < kWorkClasses) class_count[tid] = 0;
    __syncthreads();
    for (int b = tid; b < batch; b += kThreads) {
        atomicAdd(&class_count[work_class(SeqlenInfo(params, b))], 1);
    }
    __syncthreads();
    if (tid == 0) {
        int running = 0;
        for (int c = kWorkClasses - 1; c >= 0; --c) {
            class_cursor[c] = running;
            running += class_count[c];
        }
    }
    __syncthreads();
    for (int b = tid; b < batch; b += kThreads) {
        order[atomicAdd(&class_cursor[work_class(SeqlenInfo(params, b))], 1)] = b;
    }
    __syncthreads();  // the order, written to global memory by other threads, is visible

    // tile_start: exclusive prefix sum of row blocks x head units in launch order, kThreads at a
    // time.
    int carry = 0;
    for (int first = 0; first < batch; first += kThreads) {
        const int slot = first + tid;
        const int tiles =
            slot < batch ? row_blocks(SeqlenInfo(params, order[slot]), tokens) * head_units : 0;
        int before = 0;
        int chunk_total = 0;
        BlockScan(scan_storage).ExclusiveSum(tiles, before, chunk_total);
        if (slot < batch) tile_start[slot] = carry + before;
        carry += chunk_total;
        __syncthreads();  // scan_storage is reused by the next chunk
    }
    if (tid == 0) tile_start[batch] = carry;
}

// Orders a varlen launch's tiles on `stream` (no host sync): the prepare kernel writes the two
// arrays into `scratch`, VarlenTileSchedule::bytes(params.batch) of the launch's workspace, and
// `schedule` then points at them.
template <int kBlockM>
cudaError_t launch_varlen_tile_schedule(const FlashFwdParams& params, int tokens, int head_units,
                                        void* scratch, cudaStream_t stream,
                                        VarlenTileSchedule& schedule) {
    int* order = static_cast<int*>(scratch);
    int* tile_start = order + params.batch;
    prepare_varlen_tile_schedule<kBlockM><<<1, varlen_schedule_detail::kThreads, 0, stream>>>(
        params, tokens, head_units, order, tile_start);
    const cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) schedule = VarlenTileSchedule{order, tile_start};
    return err;
}

// The last slot whose tiles start at or before `tile` (slots without tiles start where the next
// one does, so it is always a slot with tiles), for tile < tile_start[batch]. Every warp searches
// on its own (all threads need the answer; the warps search in parallel): its 32 lanes probe 32
// evenly spaced slots of the range left, and a ballot keeps the last probe at or before the
// tile, so that the search takes ceil(log32(batch)) rounds of one read each (2 up to 1024
// sequences) where a binary search takes log2(batch) dependent reads before the block's first
// load. Needs the whole warp.
__device__ __forceinline__ int slot_of_tile(const int* tile_start, int batch, int tile) {
    constexpr int kWarpSize = 32;
    const int lane = threadIdx.x % kWarpSize;
    int lo = 0;  // tile_start[lo] <= tile < tile_start[hi]
    int hi = batch;
    while (hi - lo > 1) {
        const int step = (hi - lo + kWarpSize - 1) / kWarpSize;
        const int probe = lo + lane * step;
        const bool at_or_before = probe < hi && tile_start[probe] <= tile;
        // Lane 0 probes lo, which is at or before: the ballot is a non-empty prefix of lanes.
        const unsigned probes_before = __ballot_sync(0xffffffffu, at_or_before);
        lo += (kWarpSize - 1 - __clz(probes_before)) * step;
        hi = min(lo + step, hi);
    }
    return lo;
}

// The tile at index `tile` of the launch order, or false past the last one. reverse_row_blocks:
// the row blocks of a head unit in decreasing order (causal: the later rows see more keys).
// Called by every thread of the block (slot_of_tile needs whole warps).
__device__ __forceinline__ bool varlen_tile(const VarlenTileSchedule& schedule, int batch,
                                            int head_units, int tile, bool reverse_row_blocks,
                                            TileCoordinates& coordinates) {
    if (tile >= schedule.tile_start[batch]) return false;
    const int slot = slot_of_tile(schedule.tile_start, batch, tile);
    const int first = schedule.tile_start[slot];
    const int row_blocks = (schedule.tile_start[slot + 1] - first) / head_units;
    const int local = tile - first;
    const int m = local % row_blocks;
    coordinates.head = local / row_blocks;
    coordinates.m_block = reverse_row_blocks ? row_blocks - 1 - m : m;
    coordinates.batch = schedule.sequence_order[slot];
    return true;
}

}  // namespace flash_varlen
