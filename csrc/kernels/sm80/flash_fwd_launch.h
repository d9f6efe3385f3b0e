// Host-side launch of the forward kernel for one (traits, local mask) instantiation.
#pragma once

#include <cuda_runtime_api.h>
#include <cutlass/fast_math.h>

#include <cute/tensor.hpp>

#include <cstdint>
#include <limits>

#include "kernels/common/flash_params.h"
#include "kernels/common/varlen_tile_schedule.h"
#include "kernels/common/workspace.h"
#include "kernels/sm80/flash_fwd_kernel.h"
#include "kernels/sm80/fwd_kernel_traits.h"

namespace flash_varlen {
namespace sm80 {

// Varlen calls may take the tile schedule's workspace (kernels/common/varlen_tile_schedule.h).
template <typename Element, int kHeadDim>
WorkspaceSize fwd_workspace_size(const FlashFwdParams& params) {
    WorkspaceSize size;
    if (params.cu_seqlens_q != nullptr) size.scratch_bytes = VarlenTileSchedule::bytes(params.batch);
    return size;
}

// Grid: (row blocks of the longest sequence, batch, heads). Row blocks of one (sequence, head)
// are adjacent in launch order, so the thread blocks that share a K/V tile run together and
// read it from L2. Row blocks past a shorter sequence's end exit at once. A varlen batch whose
// grid would be mostly such blocks (one long sequence among many short ones: the grid sizes
// every sequence by the longest) takes the sm90 family's tile schedule instead: a one-block
// kernel orders the tiles longest sequence first and a 1-D grid of an upper bound of the tiles
// runs them (kernels/common/varlen_tile_schedule.h). Elsewhere the natural order stays: the
// longest causal row blocks first measured no gain on docs or equal2k and -1.5 to -2% on short
// (benchmarks/NOTES.md).
template <typename Element, int kHeadDim, bool kIsLocal>
cudaError_t launch_flash_fwd(const FlashFwdParams& params, const Workspace& workspace,
                             cudaStream_t stream) {
    using Traits = typename FwdTileConfig<Element, kHeadDim>::Traits;
    // Soft-capping, ALiBi, dropout and paged K/V run in a kernel of their own, the general one
    // (flash_fwd_kernel.h).
    const bool general = params.dropout_threshold != 0 || params.softcap_prescale != 0.f ||
                         params.alibi_slopes != nullptr || params.block_table != nullptr;
    auto kernel = general ? &flash_fwd_kernel<Traits, kIsLocal, true>
                          : &flash_fwd_kernel<Traits, kIsLocal, false>;
    constexpr int kSmemBytes = Traits::kSmemBytes;
    constexpr int kDefaultSmemLimit = 48 * 1024;  // above this a kernel must opt in
    if constexpr (kSmemBytes > kDefaultSmemLimit) {
        const cudaError_t err =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
        if (err != cudaSuccess) return err;
    }
    dim3 grid(cute::ceil_div(params.seqlen_q, Traits::kBlockM), params.batch, params.nheads);
    const int64_t grid_blocks = int64_t(grid.x) * grid.y * grid.z;
    const int64_t tiles = VarlenTileSchedule::tile_bound(params.total_q, params.batch,
                                                         Traits::kBlockM, params.nheads);
    // The schedule pays a prepare launch and a lookup per block: worth it where the grid has
    // many times the tiles (skewed: 64x with 128-row tiles; docs 5.9x, short 1.25x). Measured
    // on an H100 with this threshold (benchmarks/results/2026-12-05_h100_experiments.md):
    // skewed +8 to +13% non-causal, +24 to +40% causal at d = 64, 128 and 256; docs, below it,
    // unchanged. Whether docs gains from the schedule too (the sm90 family takes it above 2x,
    // +1 to +3% there) is not measured for this family.
    constexpr int64_t kScheduleGridRatio = 8;
    VarlenTileSchedule schedule{nullptr, nullptr};
    // The general kernel keeps the grid (flash_fwd_kernel.h says why).
    const bool use_schedule = !general && params.cu_seqlens_q != nullptr &&
                              grid_blocks > kScheduleGridRatio * tiles &&
                              tiles <= std::numeric_limits<int32_t>::max();
    if (use_schedule) {
        const cudaError_t err = launch_varlen_tile_schedule<Traits::kBlockM>(
            params, Traits::kBlockM, params.nheads, workspace.scratch, stream, schedule);
        if (err != cudaSuccess) return err;
        grid = dim3(uint32_t(tiles));
    }
    // FastDivmod divides by its argument when built: 1 stands in for "not paged".
    const cutlass::FastDivmod page_size(params.block_table == nullptr ? 1 : params.page_size);
    kernel<<<grid, Traits::kNThreads, kSmemBytes, stream>>>(params, page_size, schedule);
    return cudaGetLastError();
}

}  // namespace sm80
}  // namespace flash_varlen
