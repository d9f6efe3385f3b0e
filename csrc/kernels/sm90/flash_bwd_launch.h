// Host-side launch of the sm90-family backward for one (element type, head dim, local mask):
// D (bwd_row_kernels.h), the order of the key-block tiles (varlen batches of unequal lengths),
// the persistent main kernel (flash_bwd_kernel.h), dQ's conversion, and clearing the unused rows
// of gradients the backward allocated. d = 64 and 128 so far (issue 15, csrc/kernel_families.py);
// the options it lacks go to the sm80 family (bwd_unsupported_option).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cute/tensor.hpp>
#include <limits>
#include <utility>

#include "kernels/common/clear_rows_past_end.h"
#include "kernels/common/device_sm_count.h"
#include "kernels/common/flash_params.h"
#include "kernels/common/kernel_registry.h"  // family_is_forced
#include "kernels/common/persistent_tiles.h"
#include "kernels/common/varlen_tile_schedule.h"
#include "kernels/common/workspace.h"
#include "kernels/sm90/bwd_kernel_traits.h"
#include "kernels/sm90/bwd_row_kernels.h"
#include "kernels/sm90/dq_accumulator.h"
#include "kernels/sm90/flash_bwd_kernel.h"
#include "kernels/sm90/tma_extent.h"

namespace flash_varlen {
namespace sm90 {

// Tiles per head-dim bucket: (query rows per step, keys per block, Q / dO buffers), Traits for
// the plain kernel, VariantsTraits for the soft-capping / ALiBi kernel (flash_bwd_kernel.h,
// kDvAfterDs says why it may need another).
template <typename Element, int kHeadDim>
struct BwdTileConfig;

// FlashAttention-3's d = 128 tile for causal masks: 64 query rows per step, 128 keys per block,
// two Q / dO buffers. Without a mask FlashAttention-3 and -4 take 80 rows; ours on 80 rows (branch
// sm90-bwd-80rows, backward_plan.md) measured 0.92 (MHA) and 0.96 (GQA) of this tile's speed on
// docs (H100, benchmarks/results/2026-12-06_h100_sm90_bwd_tiles.md), so 64 rows serve both.
template <typename Element>
struct BwdTileConfig<Element, 128> {
    using Traits = BwdKernelTraits<Element, 128, 64, 128, 2>;
    using VariantsTraits = Traits;
};

// d = 64: 128 query rows per step, 128 keys per block, as FlashAttention-3 and -4
// (hopper/flash_bwd_launch_template.h, flash_attn/cute/interface.py): half the steps of the
// 64-row tile and their fixed costs; dQ's rows split between the warpgroups and dV issued after
// dS (BwdKernelTraits::kDqSplitsRows, kDvAfterDs). Against 64 rows: +10% (docs) and +14%
// (skewed) without a mask, +2% and +6% causal, deterministic +16% / +6% on docs (H100,
// benchmarks/results/2026-12-06_h100_sm90_bwd_tiles.md). The variants kernel keeps 64 rows.
// Its plain kernels spill (nvcc 13.0, bf16 and fp16 alike; CI compiles d = 128 only): without a
// local mask 4 bytes, one per-thread value reloaded once per tile; with one 16 bytes, four
// values reloaded every step (4 local loads a step, measured inside the causal rows' +2 to +6%):
// to remove.
template <typename Element>
struct BwdTileConfig<Element, 64> {
    using Traits = BwdKernelTraits<Element, 64, 128, 128, 2>;
    using VariantsTraits = BwdKernelTraits<Element, 64, 64, 128, 2>;
};

// Soft-capping or ALiBi: the variants kernel (flash_bwd_kernel.h) on BwdTileConfig's
// VariantsTraits.
inline bool bwd_has_variants(const FlashBwdParams& params) {
    return params.softcap_prescale != 0.f || params.alibi_slopes != nullptr;
}

// The first option of a call that this first version does not implement, or nullptr: dispatch
// then gives the call to the sm80 family.
inline const char* bwd_unsupported_option(const FlashBwdParams& params) {
    // Dropout stays with the sm80 family: a thread's S^T entries fall in four different Philox
    // groups, so the forward's one call per four draws would become four (backward_plan.md).
    if (params.dropout_threshold != 0) return "dropout";
    // Soft-capping and ALiBi (the variants kernel) and the sinks' gradient (the row kernel) pass
    // the GPU tests and compute-sanitizer under the override (H100, 2026-12-06), but their speed
    // against the sm80 family's is not measured yet: they serve a call only when the override
    // names this family.
    if (!family_is_forced(KernelFamily::kSm90)) {
        if (params.softcap_prescale != 0.f) {
            return "soft-capping (speed not yet measured against the sm80 family; "
                   "FLASH_VARLEN_KERNEL_FAMILY=sm90 runs it)";
        }
        if (params.alibi_slopes != nullptr) {
            return "ALiBi (speed not yet measured against the sm80 family; "
                   "FLASH_VARLEN_KERNEL_FAMILY=sm90 runs it)";
        }
        if (params.learnable_sink != nullptr) {
            return "attention sinks (speed not yet measured against the sm80 family; "
                   "FLASH_VARLEN_KERNEL_FAMILY=sm90 runs them)";
        }
    }
    if (params.block_table != nullptr) return "paged KV cache";
    return nullptr;
}

// Workspace, with R = the padded rows per head (common/padded_rows.h: total_q + batch x kBlockM
// rounded up, or batch x seqlen_q rounded up per sequence): zeroed, the float32 dQ accumulator
// (heads, R, kHeadDim) (dq_accumulator.h), in deterministic mode after it the int32 counters
// (heads, R / kBlockM, consumer warpgroups), then the persistent grid's tile counter (one
// int32); not zeroed, the row statistics, LSE_log2 and D (heads, R) each, written by the row
// kernel, then for varlen calls the tile schedule (2 x batch + 1 int32).
template <typename Traits>
int64_t bwd_dq_order_head_stride(const FlashBwdParams& params) {
    return PaddedRows<Traits::kBlockM>::rows_per_head(params) / Traits::kBlockM *
           Traits::kNumMmaWarpgroups;
}

template <typename Traits>
WorkspaceSize bwd_tile_workspace_size(const FlashBwdParams& params) {
    constexpr int kHeadDim = Traits::kHeadDim;
    const int64_t padded_rows = PaddedRows<Traits::kBlockM>::rows_per_head(params);
    WorkspaceSize size;
    size.zeroed_bytes = int64_t(params.nheads) * padded_rows * kHeadDim * int64_t(sizeof(float));
    if (params.deterministic) {
        size.zeroed_bytes += int64_t(params.nheads) * bwd_dq_order_head_stride<Traits>(params) *
                             int64_t(sizeof(int));
    }
    size.zeroed_bytes += int64_t(sizeof(int));  // the tile counter
    size.scratch_bytes = 2 * int64_t(params.nheads) * padded_rows * int64_t(sizeof(float));
    if (params.cu_seqlens_q != nullptr)
        size.scratch_bytes += VarlenTileSchedule::bytes(params.batch);
    return size;
}

// The workspace of the tile the launch will take.
template <typename Element, int kHeadDim>
WorkspaceSize bwd_workspace_size(const FlashBwdParams& params) {
    using Config = BwdTileConfig<Element, kHeadDim>;
    return bwd_has_variants(params)
               ? bwd_tile_workspace_size<typename Config::VariantsTraits>(params)
               : bwd_tile_workspace_size<typename Config::Traits>(params);
}

// The tile schedule orders row blocks of each sequence's queries (varlen_tile_schedule.h); the
// backward's tiles are key blocks, so it gets the call's lengths with queries and keys swapped
// (its work classes, queries x keys, stay the same).
inline FlashFwdParams keys_as_rows(const FlashFwdParams& params) {
    FlashFwdParams swapped = params;
    std::swap(swapped.cu_seqlens_q, swapped.cu_seqlens_k);
    std::swap(swapped.seqused_q, swapped.seqused_k);
    std::swap(swapped.seqlen_q, swapped.seqlen_k);
    std::swap(swapped.total_q, swapped.total_k);
    return swapped;
}

// The backward on one tile configuration; kHasVariants: soft-capping or ALiBi.
template <typename Traits, bool kIsLocal, bool kHasVariants>
cudaError_t launch_flash_bwd_tiles(const FlashBwdParams& params, const Workspace& workspace,
                                   cudaStream_t stream) {
    using Element = typename Traits::Element;
    constexpr int kHeadDim = Traits::kHeadDim;
    constexpr int kBlockM = Traits::kBlockM;
    float* dq_accum = static_cast<float*>(workspace.zeroed);
    const int64_t stats_head_stride = PaddedRows<kBlockM>::rows_per_head(params);
    const int64_t dq_accum_head_stride = stats_head_stride * kHeadDim;
    float* stats = static_cast<float*>(workspace.scratch);
    const RowStats row_stats{stats, stats + int64_t(params.nheads) * stats_head_stride,
                             stats_head_stride};

    // Launches with no work are invalid: no query rows means no D and no dQ; no keys, no
    // key block (dK, dV have no rows, dQ is the zeroed accumulator, converted).
    const bool has_query_rows = params.seqlen_q > 0 && params.nheads > 0 && params.batch > 0;
    // Both row kernels: one padded row block of one head per thread block.
    const dim3 row_block_grid = PaddedRows<kBlockM>::row_block_grid(params);
    if (has_query_rows) {
        flash_bwd_row_stats_kernel<Element, kHeadDim, kBlockM>
            <<<row_block_grid, kRowKernelThreads, 0, stream>>>(params, row_stats);
    }

    using namespace cute;
    const TmaRows rows(params);
    BwdKernelParams<Traits> kp{};
    kp.params = params;
    kp.shape_q =
        make_shape(rows.rows_q, int32_t(params.head_dim), int32_t(params.nheads), rows.batches);
    kp.shape_k =
        make_shape(rows.rows_k, int32_t(params.head_dim), int32_t(params.nheads_k), rows.batches);
    auto gmem = [&](const void* ptr, const typename Traits::GmemShape& shape, int64_t row_stride,
                    int64_t head_stride, int64_t batch_stride_) {
        return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)), shape,
                           make_stride(row_stride, _1{}, head_stride,
                                       rows.batch_stride(batch_stride_, row_stride)));
    };
    kp.tma_q = make_tma_copy(SM90_TMA_LOAD{},
                             gmem(params.q_ptr, kp.shape_q, params.q_row_stride,
                                  params.q_head_stride, params.q_batch_stride),
                             take<0, 2>(typename Traits::SmemLayoutQ{}),
                             Shape<Int<Traits::kBlockM>, Int<kHeadDim>>{}, _1{});
    kp.tma_do = make_tma_copy(SM90_TMA_LOAD{},
                              gmem(params.do_ptr, kp.shape_q, params.do_row_stride,
                                   params.do_head_stride, params.do_batch_stride),
                              take<0, 2>(typename Traits::SmemLayoutdO{}),
                              Shape<Int<Traits::kBlockM>, Int<kHeadDim>>{}, _1{});
    kp.tma_k = make_tma_copy(SM90_TMA_LOAD{},
                             gmem(params.k_ptr, kp.shape_k, params.k_row_stride,
                                  params.k_head_stride, params.k_batch_stride),
                             typename Traits::SmemLayoutK{},
                             Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{}, _1{});
    kp.tma_v = make_tma_copy(SM90_TMA_LOAD{},
                             gmem(params.v_ptr, kp.shape_k, params.v_row_stride,
                                  params.v_head_stride, params.v_batch_stride),
                             typename Traits::SmemLayoutV{},
                             Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{}, _1{});
    kp.dq_accum = dq_accum;
    kp.dq_accum_head_stride = dq_accum_head_stride;
    int* counters =
        reinterpret_cast<int*>(dq_accum + int64_t(params.nheads) * dq_accum_head_stride);
    if (params.deterministic) {
        kp.dq_order = DqOrder{counters, bwd_dq_order_head_stride<Traits>(params)};
        counters += int64_t(params.nheads) * kp.dq_order.head_stride;
    }
    kp.tile_counter = counters;
    kp.stats = row_stats;

    // Tiles: the key blocks of each key/value head of each sequence, in the grid order or, for
    // varlen batches whose lengths differ widely, the schedule's (persistent_tiles.h).
    const int key_blocks = cute::ceil_div(params.seqlen_k, Traits::kBlockN);
    const int64_t grid_order_tiles = int64_t(key_blocks) * params.batch * params.nheads_k;
    const int64_t schedule_tiles = VarlenTileSchedule::tile_bound(params.total_k, params.batch,
                                                                  Traits::kBlockN, params.nheads_k);
    int64_t tiles = grid_order_tiles;
    kp.tiles = TileOrder{VarlenTileSchedule{nullptr, nullptr}, key_blocks, params.batch,
                         params.nheads_k, 0};
    if (use_varlen_schedule(rows.is_varlen, grid_order_tiles, schedule_tiles)) {
        void* schedule_scratch = stats + 2 * int64_t(params.nheads) * stats_head_stride;
        const cudaError_t err = launch_varlen_tile_schedule<kBlockM>(
            keys_as_rows(params), Traits::kBlockN, params.nheads_k, schedule_scratch, stream,
            kp.tiles.schedule);
        if (err != cudaSuccess) return err;
        tiles = schedule_tiles;
    }
    if (tiles > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidConfiguration;
    kp.tiles.tiles = int(tiles);
    kp.reverse_key_blocks = kIsLocal && params.deterministic;

    auto kernel = &flash_bwd_kernel<Traits, kIsLocal, kHasVariants>;
    constexpr int kSmemBytes = Traits::kSmemBytes;
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err != cudaSuccess) return err;
    // One thread block per SM at most (the shared memory of one tile fills an SM).
    if (tiles > 0) {
        const dim3 grid(uint32_t(std::min<int64_t>(tiles, device_sm_count())));
        kernel<<<grid, Traits::kNumThreads, kSmemBytes, stream>>>(kp);
    }

    if (has_query_rows) {
        flash_bwd_convert_dq_kernel<Traits>
            <<<row_block_grid, Traits::kNumMmaThreads, 0, stream>>>(params, dq_accum,
                                                                     dq_accum_head_stride);
    }
    launch_clear_rows_past_end<Element>(params, stream);
    return cudaGetLastError();
}

template <typename Element, int kHeadDim, bool kIsLocal>
cudaError_t launch_flash_bwd(const FlashBwdParams& params, const Workspace& workspace,
                             cudaStream_t stream) {
    if (bwd_unsupported_option(params) != nullptr) return cudaErrorNotSupported;
    using Config = BwdTileConfig<Element, kHeadDim>;
    // Soft-capping and ALiBi run in a kernel of their own (flash_bwd_kernel.h).
    if (bwd_has_variants(params)) {
        return launch_flash_bwd_tiles<typename Config::VariantsTraits, kIsLocal, true>(
            params, workspace, stream);
    }
    return launch_flash_bwd_tiles<typename Config::Traits, kIsLocal, false>(params, workspace,
                                                                             stream);
}

}  // namespace sm90
}  // namespace flash_varlen
