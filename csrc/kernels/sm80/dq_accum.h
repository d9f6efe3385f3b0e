// The float32 accumulator of dQ. Every key block of a sequence adds its share of dQ for each
// query row block it sees; a conversion kernel then scales the sum and writes dQ in the input
// dtype.
//
// Layout: (nheads, rows, head-dim bucket), cut into (kBlockM, bucket) tiles, one per row block,
// each stored contiguously in the order of the dQ product's register fragments: float4 number j
// of thread t sits at float offset 4 * (j * kNThreads + t) of its tile. A warp's adds then cover
// 512 contiguous bytes per instruction at compile-time offsets from one pointer, where a
// row-major tile took one address per row and eight separate 32-byte pieces per instruction
// (ncu, H200, bf16 d128: those adds and the stalls behind them were 12% of the main kernel's
// samples). FlashAttention-3 (Shah et al., 2024) keeps its dQ accumulator in fragment order too.
//
// Rows per head: the backward's padded rows (common/padded_rows.h, as the sm90 family's): sequence
// b's tiles start at its first query row plus kBlockM rows of slack per earlier sequence, rounded
// down to a whole tile, so tiles of different sequences never overlap (the slack covers the
// rounding and the last tile's overhang), and the host sizes the accumulator as query rows +
// batch * kBlockM rows, rounded up to a tile, without reading cu_seqlens.
#pragma once

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/padded_row_blocks.h"
#include "kernels/common/seqlen_info.h"
#include "kernels/sm80/fragment_layouts.h"
#include "kernels/sm80/tile_copy.h"

namespace flash_varlen {
namespace sm80 {

using namespace cute;

constexpr int kDqAccumVector = 4;  // floats per add instruction and per load

// The first float of row block m_block's tile of sequence `batch`, head `head`.
template <typename Traits>
__device__ __forceinline__ float* dq_accum_tile(const FlashBwdParams& params, const SeqlenInfo& seq,
                                                int batch, int head, int m_block) {
    const int64_t row = PaddedRows<Traits::kBlockM>::first_row(params, seq, batch) +
                        int64_t(m_block) * Traits::kBlockM;
    return params.dq_accum_ptr + head * params.dq_accum_head_stride + row * Traits::kHeadDim;
}

// Fire-and-forget float32 adds to global memory (PTX red; no result is returned, so nothing
// waits for it). Four neighbouring floats per instruction on Hopper and later, one before.
__device__ __forceinline__ void red_add_vector(float* address, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(address), "f"(a), "f"(b),
                 "f"(c), "f"(d)
                 : "memory");
#else
    asm volatile("red.global.add.f32 [%0], %1;" ::"l"(address), "f"(a) : "memory");
    asm volatile("red.global.add.f32 [%0], %1;" ::"l"(address + 1), "f"(b) : "memory");
    asm volatile("red.global.add.f32 [%0], %1;" ::"l"(address + 2), "f"(c) : "memory");
    asm volatile("red.global.add.f32 [%0], %1;" ::"l"(address + 3), "f"(d) : "memory");
#endif
}

// Adds this thread's dQ fragment (the accumulator of the dQ product) into a tile.
template <int kNThreads, typename Fragment>
__device__ __forceinline__ void add_dq_fragment(float* tile, const Fragment& acc_dq) {
    constexpr int kSize = decltype(size(acc_dq))::value;
    static_assert(kSize % kDqAccumVector == 0, "fragments split into whole vectors");
    float* mine = tile + threadIdx.x * kDqAccumVector;
    CUTE_UNROLL
    for (int j = 0; j < kSize / kDqAccumVector; ++j) {
        const int i = j * kDqAccumVector;
        red_add_vector(mine + j * kNThreads * kDqAccumVector, acc_dq(i), acc_dq(i + 1),
                       acc_dq(i + 2), acc_dq(i + 3));
    }
}

// Hopper path: the fragment goes to a shared-memory copy of the tile (same order, so a warp
// writes 512 contiguous bytes per store), and one thread hands the whole tile to the bulk-copy
// engine as a single asynchronous reduce-add into global memory (FlashAttention-3's scheme). The
// registers are free as soon as the shared stores issue, where `red` held them until the adds
// left the load/store queue: the next row block's first instructions waited on that (ncu, H200,
// bf16 d128, 4 x 2048 tokens: 5% of the kernel's samples; main kernel 1.11 ms -> 1.07 ms
// non-causal, 679 us -> 645 us causal). Protocol, all threads unless noted:
//   stage_dq_fragment (then fence_staged_dq), a barrier, issue_dq_tile_add (one thread), ...,
//   wait_dq_tile_read (the issuing thread) and a barrier before the next stage_dq_fragment.
template <int kNThreads, typename Fragment>
__device__ __forceinline__ void stage_dq_fragment(float* staging, const Fragment& acc_dq) {
    constexpr int kSize = decltype(size(acc_dq))::value;
    float* mine = staging + threadIdx.x * kDqAccumVector;
    CUTE_UNROLL
    for (int j = 0; j < kSize / kDqAccumVector; ++j) {
        const int i = j * kDqAccumVector;
        *reinterpret_cast<float4*>(mine + j * kNThreads * kDqAccumVector) =
            make_float4(acc_dq(i), acc_dq(i + 1), acc_dq(i + 2), acc_dq(i + 3));
    }
}

// Whether this compilation pass has the bulk reduce (sm_90 and later). The host learns the same
// from the kernel binary it launches (launch_flash_bwd), as it must size shared memory to match.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kDqBulkAdds = true;
#else
constexpr bool kDqBulkAdds = false;
#endif
constexpr int kDqBulkAddsMinArch = 90;  // cudaFuncAttributes::ptxVersion

// The four operations below compile to nothing where kDqBulkAdds is false; callers test it.
// Makes this thread's shared-memory stores visible to the bulk-copy engine (the async proxy).
__device__ __forceinline__ void fence_staged_dq() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

__device__ __forceinline__ void issue_dq_tile_add(float* tile, const float* staging, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const uint32_t src = static_cast<uint32_t>(__cvta_generic_to_shared(staging));
    asm volatile(
        "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
        "cp.async.bulk.commit_group;" ::"l"(tile),
        "r"(src), "r"(bytes)
        : "memory");
#endif
}

// The issuing thread: the engine has read the staged tile (shared memory may be rewritten).
__device__ __forceinline__ void wait_dq_tile_read() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
#endif
}

// The issuing thread: every issued add is complete in global memory.
__device__ __forceinline__ void wait_dq_tile_adds() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#endif
}

// dQ = softmax_scale * accumulator, in the input dtype. Grid: one padded row block of one head per
// thread block (PaddedRows::row_block_grid), Traits::kNThreads threads, Traits::kSmemElemsQdO
// elements of dynamic shared memory. Each thread reads back its own fragment (fully coalesced),
// and the tile goes through shared memory to row-contiguous 16-byte stores, as the main kernel's
// dK and dV do.
template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads)
    flash_bwd_convert_dq_kernel(const __grid_constant__ FlashBwdParams params) {
    using Element = typename Traits::Element;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kHeadDim = Traits::kHeadDim;
    extern __shared__ __align__(128) char smem[];
    const PaddedRowBlock<kBlockM> block(params);
    if (!block.has_rows()) return;
    const int m_block = block.query0 / kBlockM;
    const SeqlenInfo& seq = block.seq;
    const int rows_left = seq.seqlen_q - block.query0;

    typename Traits::TiledMmadQ mma_dq;
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    const float* mine =
        dq_accum_tile<Traits>(params, seq, block.batch, block.head, m_block) +
        threadIdx.x * kDqAccumVector;
    CUTE_UNROLL
    for (int j = 0; j < size(acc_dq) / kDqAccumVector; ++j) {
        const float4 sum =
            *reinterpret_cast<const float4*>(mine + j * Traits::kNThreads * kDqAccumVector);
        const int i = j * kDqAccumVector;
        acc_dq(i) = sum.x * params.softmax_scale;
        acc_dq(i + 1) = sum.y * params.softmax_scale;
        acc_dq(i + 2) = sum.z * params.softmax_scale;
        acc_dq(i + 3) = sum.w * params.softmax_scale;
    }
    Tensor rdQ = convert_fragment<Element>(acc_dq);

    Tensor sdQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)),
                             typename Traits::SmemLayoutQdO{});
    auto copy_store = make_tiled_copy_C(typename Traits::SmemCopyAtomStore{}, mma_dq);
    auto thr_copy_store = copy_store.get_thread_slice(threadIdx.x);
    copy(copy_store, thr_copy_store.retile_S(rdQ), thr_copy_store.partition_D(sdQ));
    __syncthreads();

    Element* dq_base = static_cast<Element*>(params.dq_ptr) +
                       seq.q_offset(params.dq_batch_stride, params.dq_row_stride, block.batch) +
                       block.head * params.dq_head_stride;
    Tensor gdQ = row_tile<kBlockM, kHeadDim>(dq_base, m_block, params.dq_row_stride);
    store_tile_from_smem<typename Traits::GmemTiledCopyStore>(sdQ, gdQ, rows_left, params.head_dim);
}

}  // namespace sm80
}  // namespace flash_varlen
