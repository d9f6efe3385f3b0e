// How the sm90-family backward accumulates dQ: every key block of a sequence adds its share of
// each query row block's dQ into one float32 accumulator, which a last kernel converts.
//
// The accumulator is laid out as (heads, padded rows, kHeadDim) with the padded rows of the row
// statistics (bwd_row_kernels.h, PaddedRows): a row block is one contiguous chunk of
// kBlockM x kHeadDim floats that lies inside its sequence's rows, so that a consumer warpgroup
// adds its part of a row block with a single bulk reduce-add from shared memory
// (cp.reduce.async.bulk) instead of one atomic per pair of values. The first version added pairs
// with red.global.add.v2.f32: under ncu (equal2k-like, 8 x 2048, 16 heads, H100) their address
// arithmetic and the long-scoreboard stalls behind them held 15% of the kernel's stall samples.
// (FlashAttention-3 hands dQ to a bulk reduce-add too, from a dedicated warp: Shah et al. 2024,
// Dao-AILab/flash-attention hopper/epilogue_bwd.hpp.)
//
// Inside a chunk the values sit in the order the wgmma accumulators hold them (DqChunk), so that
// the consumers write shared memory with 16-byte stores free of bank conflicts; the conversion
// kernel below puts them back in (row, column) order.
#pragma once

#include <cutlass/arch/barrier.h>

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/sm90/bwd_row_kernels.h"

namespace flash_varlen {
namespace sm90 {

// The chunk of one row block: consumer warpgroup w's part (its share of the kBlockM x kHeadDim
// values: kHeadDim / 2 columns, or 64 rows where BwdKernelTraits::kDqSplitsRows) is floats
// [w x kPartFloats, (w + 1) x kPartFloats); inside it, value i of thread t is at
// ((i / 4) x kThreadsPerWarpgroup + t) x 4 + i % 4: a warp's float4 stores cover 512
// consecutive bytes.
template <typename Traits>
struct DqChunk {
    static constexpr int kFloats = Traits::kBlockM * Traits::kHeadDim;
    static constexpr int kPartFloats = kFloats / Traits::kNumMmaWarpgroups;
    static constexpr int kFloatsPerThread = kPartFloats / kThreadsPerWarpgroup;
    static constexpr int kVector = 4;
    static_assert(kFloatsPerThread % kVector == 0, "whole float4 per thread");
    static constexpr uint32_t kPartBytes = kPartFloats * sizeof(float);
    static_assert(kPartBytes % 16 == 0, "bulk copies move multiples of 16 bytes");

    // Where value 4 x group .. 4 x group + 3 of consumer thread `thread` starts.
    __device__ static int vector_offset(int thread, int group) {
        const int warpgroup = thread / kThreadsPerWarpgroup;
        const int lane_in_group = thread % kThreadsPerWarpgroup;
        return warpgroup * kPartFloats + (group * kThreadsPerWarpgroup + lane_in_group) * kVector;
    }
};

// Adds `bytes` (a multiple of 16) of float32 from shared memory into global memory, element by
// element, asynchronously: the issuing thread commits it as a bulk group and, before the shared
// memory is written again, waits for the group's reads (cute::tma_store_arrive / tma_store_wait).
__device__ inline void bulk_reduce_add(float* gmem, const float* smem, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(gmem),
        "r"(cute::cast_smem_ptr_to_uint(smem)), "r"(bytes)
        : "memory");
#endif
}

// Deterministic mode (bitwise reproducible dq): the key blocks that add into one warpgroup part
// of one row block do so in a fixed order, counted by an int32 counter per (query head, padded
// row block, warpgroup), zero at the launch. The part's dQ writer thread (flash_bwd_kernel.h,
// write_dq) waits until the counter equals the number of key blocks before its own
// (Work::dq_adds_before), adds, waits for its add to complete, and increments the counter.
// (FlashAttention-3's semaphores, Shah et al. 2024, hopper/flash_bwd_kernel_sm90.h, also waited
// for in a dedicated warp: in the consumers' issuing threads, every wait stalled a warpgroup.)
struct DqOrder {
    int* counters;        // nullptr: no ordering (the default backward)
    int64_t head_stride;  // padded row blocks x warpgroups
};

// Spins until *counter == expected; acquire at GPU scope, so that the adds released before the
// count (by another block's bulk reduce-add) are visible, then orders them before this thread's
// own bulk reduce-add (another proxy).
__device__ inline void wait_for_dq_turn(const int* counter, int expected) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    int value;
    do {
        asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(counter) : "memory");
    } while (value != expected);
    asm volatile("fence.proxy.async.global;" ::: "memory");
#endif
}

// Waits until this thread's bulk reduce-adds have completed (not only read shared memory), then
// increments the counter with release semantics at GPU scope: the next key block's add follows.
__device__ inline void pass_dq_turn(int* counter) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
    asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(counter) : "memory");
#endif
}

// dQ = softmax scale x the accumulator, in the input type: a block of kNumMmaThreads threads per
// padded row block of one head (PaddedRows::row_block_grid; the block finds its sequence), thread
// t reading back what consumer thread t added (DqChunk) into a (row, column) tile in shared
// memory, then every row written with 16-byte stores.
template <typename Traits>
__global__ void __launch_bounds__(Traits::kNumMmaThreads)
    flash_bwd_convert_dq_kernel(const __grid_constant__ FlashBwdParams params,
                                const float* __restrict__ dq_accum, int64_t dq_accum_head_stride) {
    using Element = typename Traits::Element;
    using Chunk = DqChunk<Traits>;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kHeadDim = Traits::kHeadDim;
    // One float of padding per row: the scattered writes of the accumulator order then spread
    // over the banks.
    constexpr int kTileStride = kHeadDim + 1;
    __shared__ float tile[kBlockM * kTileStride];

    const PaddedRowBlock<kBlockM> block(params);
    if (!block.has_rows()) return;
    const int head = block.head;
    const int thread = threadIdx.x;
    const int64_t block_row = block.padded_row;
    const int batch = block.batch;
    const SeqlenInfo& seq = block.seq;
    const int query0 = block.query0;

    const float* chunk =
        dq_accum + int64_t(head) * dq_accum_head_stride + block_row * kHeadDim;
    typename Traits::TiledMmaDQ tiled_mma_dq;
    auto coord = tiled_mma_dq.get_thread_slice(thread).partition_C(
        cute::make_identity_tensor(cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
    static_assert(decltype(cute::size(coord))::value == Chunk::kFloatsPerThread);
    CUTE_UNROLL
    for (int group = 0; group < Chunk::kFloatsPerThread / Chunk::kVector; ++group) {
        const float4 values =
            *reinterpret_cast<const float4*>(chunk + Chunk::vector_offset(thread, group));
        const float value[Chunk::kVector] = {values.x, values.y, values.z, values.w};
        CUTE_UNROLL
        for (int e = 0; e < Chunk::kVector; ++e) {
            const auto row_col = coord(group * Chunk::kVector + e);
            tile[cute::get<0>(row_col) * kTileStride + cute::get<1>(row_col)] = value[e];
        }
    }
    __syncthreads();

    constexpr int kElems = kRowVectorBytes / sizeof(Element);
    constexpr int kVectorsPerRow = kHeadDim / kElems;
    Element* dq_seq = static_cast<Element*>(params.dq_ptr) +
                      seq.q_offset(params.dq_batch_stride, params.dq_row_stride, batch) +
                      int64_t(head) * params.dq_head_stride;
    for (int v = thread; v < kBlockM * kVectorsPerRow; v += Traits::kNumMmaThreads) {
        const int row = v / kVectorsPerRow;
        const int col = (v % kVectorsPerRow) * kElems;
        if (query0 + row >= seq.seqlen_q || col >= params.head_dim) continue;
        RowVector<Element> dq;
        CUTE_UNROLL
        for (int i = 0; i < kElems; ++i) {
            dq[i] = Element(tile[row * kTileStride + col + i] * params.softmax_scale);
        }
        *reinterpret_cast<RowVector<Element>*>(
            dq_seq + int64_t(query0 + row) * params.dq_row_stride + col) = dq;
    }
}

}  // namespace sm90
}  // namespace flash_varlen
