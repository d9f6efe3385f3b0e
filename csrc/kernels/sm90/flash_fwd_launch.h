// Host-side launch of the sm90-family forward for one (element type, head-dim bucket, local mask)
// instantiation: builds the TMA descriptors and launches one thread block per (row block, batch,
// head). The same interface as sm80/flash_fwd_launch.h, so that the registry calls it alike.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include <cute/tensor.hpp>

#include "kernels/common/device_sm_count.h"
#include "kernels/common/flash_params.h"
#include "kernels/common/varlen_tile_schedule.h"
#include "kernels/common/workspace.h"
#include "kernels/sm90/flash_fwd_kernel.h"
#include "kernels/sm90/fwd_tile_config.h"

namespace flash_varlen {
namespace sm90 {

// The first option of a call that this family's forward does not implement yet, or nullptr:
// dispatch then runs the call on the next family (sm80), which implements every option.
inline const char* fwd_unsupported_option(const FlashFwdParams& params) {
    // Its TMA loads read K and V as one strided tensor; the sm80 family gathers paged rows.
    if (params.block_table != nullptr) return "paged KV cache";
    return nullptr;
}

// TMA descriptors take 32-bit extents of at least 1: an empty buffer (every key sequence empty)
// still gets a valid descriptor, which no load then uses (every row block sees no key block).
inline int32_t tma_extent(int64_t extent) {
    return int32_t(std::max<int64_t>(extent, 1));
}

// Every call needs the persistent grid's tile counter, zeroed (kernels/common/persistent_tiles.h);
// varlen calls the tile schedule's workspace too (kernels/common/varlen_tile_schedule.h).
template <typename Element, int kHeadDim>
WorkspaceSize fwd_workspace_size(const FlashFwdParams& params) {
    WorkspaceSize size;
    if (params.cu_seqlens_q != nullptr) size.scratch_bytes = VarlenTileSchedule::bytes(params.batch);
    size.zeroed_bytes = sizeof(int);
    return size;
}

// A persistent grid of one thread block per SM (the shared memory of one tile fills an SM) walks
// the tiles in launch order (kernels/common/persistent_tiles.h). Varlen: a one-block kernel
// orders them (longest sequences first); fixed length, and varlen batches of about equal
// lengths: the order of a (row blocks, batch, heads) grid, the row blocks of one (sequence, head)
// adjacent so that the tiles sharing K and V run together and read them from L2.
template <typename Element, int kHeadDim, bool kIsLocal>
cudaError_t launch_flash_fwd(const FlashFwdParams& params, const Workspace& workspace,
                             cudaStream_t stream) {
    using Traits = typename FwdTileConfig<Element, kHeadDim, kIsLocal>::Traits;
    if (fwd_unsupported_option(params) != nullptr) return cudaErrorNotSupported;

    // Varlen: one batch of all rows, each sequence found by its first row (flash_fwd_kernel.h).
    // Fixed length: (seqlen, d, heads, batch). The host has checked that every stride and the
    // base addresses are multiples of 16 bytes, which TMA requires (bindings/input_checks.cpp).
    const bool is_varlen = params.cu_seqlens_q != nullptr;
    const int32_t rows_q = tma_extent(is_varlen ? params.total_q : params.seqlen_q);
    const int32_t rows_k = tma_extent(is_varlen ? params.total_k : params.seqlen_k);
    const int32_t batches = is_varlen ? 1 : tma_extent(params.batch);
    // The batch stride of a one-batch varlen buffer is never used, but TMA wants a valid one.
    auto batch_stride = [&](int64_t stride, int64_t row_stride) {
        return is_varlen ? row_stride : stride;
    };

    using namespace cute;
    FwdKernelParams<Traits> kp{};
    kp.params = params;
    kp.shape_q = make_shape(rows_q, int32_t(params.head_dim), int32_t(params.nheads), batches);
    kp.shape_k = make_shape(rows_k, int32_t(params.head_dim), int32_t(params.nheads_k), batches);
    kp.shape_vt = make_shape(int32_t(params.head_dim), rows_k, int32_t(params.nheads_k), batches);
    // The real head dim is the descriptors' extent: columns of the tile past it read zeros.
    Tensor mQ = make_tensor(
        make_gmem_ptr(static_cast<const Element*>(params.q_ptr)), kp.shape_q,
        make_stride(params.q_row_stride, _1{}, params.q_head_stride,
                    batch_stride(params.q_batch_stride, params.q_row_stride)));
    Tensor mK = make_tensor(
        make_gmem_ptr(static_cast<const Element*>(params.k_ptr)), kp.shape_k,
        make_stride(params.k_row_stride, _1{}, params.k_head_stride,
                    batch_stride(params.k_batch_stride, params.k_row_stride)));
    Tensor mVt = make_tensor(
        make_gmem_ptr(static_cast<const Element*>(params.v_ptr)), kp.shape_vt,
        make_stride(_1{}, params.v_row_stride, params.v_head_stride,
                    batch_stride(params.v_batch_stride, params.v_row_stride)));
    kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, typename Traits::SmemLayoutQ{},
                             Shape<Int<Traits::kBlockM>, Int<kHeadDim>>{}, _1{});
    kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, take<0, 2>(typename Traits::SmemLayoutK{}),
                             Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{}, _1{});
    kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mVt, take<0, 2>(typename Traits::SmemLayoutVt{}),
                             Shape<Int<kHeadDim>, Int<Traits::kBlockN>>{}, _1{});

    const int row_blocks = cute::ceil_div(params.seqlen_q, Traits::kBlockM);
    const int64_t grid_order_tiles = int64_t(row_blocks) * params.batch * params.nheads;
    const int64_t schedule_tiles = VarlenTileSchedule::tile_bound(params.total_q, params.batch,
                                                                  Traits::kBlockM, params.nheads);
    // The schedule pays a prepare launch and a lookup per tile; it wins where the grid order has
    // many indices past their sequence's end (measured on the H200 with one thread block per
    // index, 7cec657's record: skewed, 64x the tiles, +31 to +68%; docs, 5.9x, +1 to +3%; short,
    // 1.25x, -9 to -10%; with this rule short takes the grid order: +9 to +11%,
    // benchmarks/results/2026-12-05_h200_sm90_bisect.md).
    constexpr int64_t kScheduleGridRatio = 2;
    const bool use_schedule = is_varlen && grid_order_tiles > kScheduleGridRatio * schedule_tiles;
    int64_t tiles = grid_order_tiles;
    kp.tiles = TileOrder{VarlenTileSchedule{nullptr, nullptr}, row_blocks, params.batch,
                         params.nheads, 0};
    if (use_schedule) {
        int* order = static_cast<int*>(workspace.scratch);
        int* tile_start = order + params.batch;
        prepare_varlen_tile_schedule<Traits::kBlockM>
            <<<1, varlen_schedule_detail::kThreads, 0, stream>>>(params, order, tile_start);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        kp.tiles.schedule = VarlenTileSchedule{order, tile_start};
        tiles = schedule_tiles;
    }
    if (tiles > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidConfiguration;
    kp.tiles.tiles = int(tiles);
    kp.tile_counter = static_cast<int*>(workspace.zeroed);
    const dim3 grid(uint32_t(std::max<int64_t>(std::min<int64_t>(tiles, device_sm_count()), 1)));

    // ALiBi and dropout run in a kernel of their own (flash_fwd_kernel.h).
    const bool has_variants = params.alibi_slopes != nullptr || params.dropout_threshold != 0;
    auto kernel = has_variants ? &flash_fwd_kernel<Traits, kIsLocal, true>
                               : &flash_fwd_kernel<Traits, kIsLocal, false>;
    constexpr int kSmemBytes = Traits::kSmemBytes;
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err != cudaSuccess) return err;
    kernel<<<grid, Traits::kNumThreads, kSmemBytes, stream>>>(kp);
    return cudaGetLastError();
}

}  // namespace sm90
}  // namespace flash_varlen
