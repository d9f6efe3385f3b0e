// Ordering of the dQ accumulation in deterministic mode. Every key block of a sequence adds its
// share of dQ for a query row block into the same float32 rows; floating-point addition is not
// associative, so unordered atomic adds give run-to-run differences in the last bits. With one
// counter per (head, query row block), key block j waits until the counter reads j, adds, and
// then sets it to j + 1: the adds happen in key-block order, every run (the scheme of
// FlashAttention-3, Shah et al. 2024).
//
// Deadlock freedom: key block j only waits for key block j - 1 of the same (sequence, head), which
// has the lower block index in the grid's fastest mode and so was dispatched before it.
#pragma once

#include <cstdint>

#include "kernels/common/flash_params.h"

namespace flash_varlen {
namespace sm80 {

__device__ __forceinline__ int load_acquire_gpu(const int* address) {
    int value;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
    return value;
}

__device__ __forceinline__ void store_release_gpu(int* address, int value) {
    asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(address), "r"(value) : "memory");
}

// Granularity of the dq_semaphore slots; every backward row block is a multiple of it.
constexpr int kSemaphoreRows = 64;

// The counter of the query row block starting at row `first_row` of sequence `batch`, head
// `head`. Slots are kSemaphoreRows rows wide: varlen sequence b starts at slot
// cu_seqlens_q[b] / kSemaphoreRows + b, which never overlaps the previous sequence's slots, so
// the launcher sizes the array as total_q / kSemaphoreRows + batch + 1 per head without device
// reads (dq_semaphore_slots_per_head).
__device__ __forceinline__ int* dq_semaphore_slot(const FlashBwdParams& params, int batch, int head,
                                                  int q_start, int first_row) {
    const int slot = params.cu_seqlens_q != nullptr
                         ? (q_start + first_row) / kSemaphoreRows + batch
                         : batch * ((params.seqlen_q + kSemaphoreRows - 1) / kSemaphoreRows) +
                               first_row / kSemaphoreRows;
    return params.dq_semaphore + int64_t(head) * params.dq_semaphore_head_stride + slot;
}

// Counters per head: every slot dq_semaphore_slot can return.
inline int64_t dq_semaphore_slots_per_head(const FlashBwdParams& params) {
    if (params.cu_seqlens_q != nullptr) return params.total_q / kSemaphoreRows + params.batch + 1;
    return int64_t(params.batch) * ((params.seqlen_q + kSemaphoreRows - 1) / kSemaphoreRows);
}

// Blocks the thread block until it is key block `n_block`'s turn on this counter.
__device__ __forceinline__ void wait_for_turn(const int* counter, int n_block) {
    if (threadIdx.x == 0) {
        while (load_acquire_gpu(counter) != n_block) {
        }
    }
    __syncthreads();
}

// Publishes this thread block's adds and hands the counter to key block n_block + 1.
__device__ __forceinline__ void pass_turn(int* counter, int n_block) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) store_release_gpu(counter, n_block + 1);
}

}  // namespace sm80
}  // namespace flash_varlen
