// Host-side launch of the sm90-family forward for one (element type, head-dim bucket, local mask)
// instantiation: builds the TMA descriptors and launches a persistent grid over the tiles (row
// blocks of one head, or of a GQA group's heads packed together, of one sequence). The same
// interface as sm80/flash_fwd_launch.h, so that the registry calls it alike.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cute/tensor.hpp>
#include <limits>

#include "kernels/common/device_sm_count.h"
#include "kernels/common/flash_params.h"
#include "kernels/common/persistent_tiles.h"  // use_varlen_schedule
#include "kernels/common/varlen_tile_schedule.h"
#include "kernels/common/workspace.h"
#include "kernels/sm90/flash_fwd_kernel.h"
#include "kernels/sm90/fwd_tile_config.h"
#include "kernels/sm90/query_rows.h"
#include "kernels/sm90/tma_extent.h"

namespace flash_varlen {
namespace sm90 {

// The first option of a call that this family's forward does not implement yet, or nullptr:
// dispatch then runs the call on the next family (sm80), which implements every option.
inline const char* fwd_unsupported_option(const FlashFwdParams& params) {
    // Its TMA loads read K and V as one strided tensor; the sm80 family gathers paged rows.
    if (params.block_table != nullptr) return "paged KV cache";
    return nullptr;
}

// A TMA byte stride: TMA wants each a multiple of 16 bytes. A dimension of extent 1 never
// multiplies a nonzero index, and the input checks skip its stride (it may be anything for a
// view), so it gets the smallest valid one.
inline uint64_t tma_stride_bytes(uint64_t extent, int64_t stride, uint64_t element_bytes) {
    constexpr uint64_t kTmaStrideAlignment = 16;
    return extent > 1 ? uint64_t(stride) * element_bytes : kTmaStrideAlignment;
}

// Q's TMA descriptor: the tensor (d, heads of a tile, rows, head units, batch), whose box
// (columns of a chunk, heads of a tile, tokens of a tile, 1, 1) is one chunk of a tile's Q in the
// shared-memory layout (query_rows.h; fwd_kernel_traits.h checks the chunk layout). The G heads
// of a token are one head stride apart, so one box loads them all. Built here rather than by
// CuTe's make_tma_copy, which needs the box at compile time: G is known only at the call.
template <typename Traits>
cudaError_t make_query_descriptor(const FlashFwdParams& params, int heads_per_tile, int32_t rows,
                                  int32_t batches, int64_t batch_stride,
                                  cute::TmaDescriptor& desc) {
    using Element = typename Traits::Element;
    constexpr int kRank = 5;
    const uint64_t bytes = sizeof(Element);
    const cute::array<uint64_t, kRank> extents = {
        uint64_t(params.head_dim), uint64_t(heads_per_tile), uint64_t(rows),
        uint64_t(params.nheads / heads_per_tile), uint64_t(batches)};
    // Byte strides of dimensions 1.. (dimension 0, the head dim, is contiguous).
    const cute::array<uint64_t, kRank - 1> strides = {
        tma_stride_bytes(extents[1], params.q_head_stride, bytes),
        tma_stride_bytes(extents[2], params.q_row_stride, bytes),
        tma_stride_bytes(extents[3], heads_per_tile * params.q_head_stride, bytes),
        tma_stride_bytes(extents[4], batch_stride, bytes)};
    const cute::array<uint32_t, kRank> box = {
        uint32_t(Traits::kQChunkCols), uint32_t(heads_per_tile),
        uint32_t(QueryRows::tokens_per_tile<Traits::kBlockM>(heads_per_tile)), 1u, 1u};
    const cute::array<uint32_t, kRank> element_strides = {1u, 1u, 1u, 1u, 1u};
    const auto swizzle = cute::get_swizzle_portion(typename Traits::SmemLayoutQ{});
    const CUresult result = CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
        &desc, cute::TMA::to_CUtensorMapDataType<Element>(), kRank, const_cast<void*>(params.q_ptr),
        extents.data(), strides.data(), box.data(), element_strides.data(),
        CU_TENSOR_MAP_INTERLEAVE_NONE,
        cute::TMA::to_CUtensorMapSwizzle(cute::detail::get_tma_swizzle_bits(swizzle),
                                         cute::detail::get_tma_swizzle_base(swizzle)),
        CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Every call needs the persistent grid's tile counter, zeroed (kernels/common/persistent_tiles.h);
// varlen calls the tile schedule's workspace too (kernels/common/varlen_tile_schedule.h).
template <typename Element, int kHeadDim>
WorkspaceSize fwd_workspace_size(const FlashFwdParams& params) {
    WorkspaceSize size;
    if (params.cu_seqlens_q != nullptr)
        size.scratch_bytes = VarlenTileSchedule::bytes(params.batch);
    size.zeroed_bytes = sizeof(int);
    return size;
}

// A persistent grid of one thread block per SM (the shared memory of one tile fills an SM) walks
// the tiles in launch order (kernels/common/persistent_tiles.h). Varlen: a one-block kernel
// orders them (longest sequences first); fixed length, and varlen batches of about equal
// lengths: the order of a (row blocks, batch, head units) grid, the row blocks of one (sequence,
// head unit) adjacent so that the tiles sharing K and V run together and read them from L2.
template <typename Element, int kHeadDim, bool kIsLocal>
cudaError_t launch_flash_fwd(const FlashFwdParams& params, const Workspace& workspace,
                             cudaStream_t stream) {
    using Traits = typename FwdTileConfig<Element, kHeadDim, kIsLocal>::Traits;
    if (fwd_unsupported_option(params) != nullptr) return cudaErrorNotSupported;

    // Varlen: one batch of all rows, each sequence found by its first row (flash_fwd_kernel.h).
    // Fixed length: (seqlen, d, heads, batch). The host has checked that every stride and the
    // base addresses are multiples of 16 bytes, which TMA requires (bindings/input_checks.cpp).
    const TmaRows rows(params);

    using namespace cute;
    FwdKernelParams<Traits> kp{};
    kp.params = params;
    kp.shape_k =
        make_shape(rows.rows_k, int32_t(params.head_dim), int32_t(params.nheads_k), rows.batches);
    kp.shape_vt =
        make_shape(int32_t(params.head_dim), rows.rows_k, int32_t(params.nheads_k), rows.batches);
    // The real head dim is the descriptors' extent: columns of the tile past it read zeros.
    Tensor mK =
        make_tensor(make_gmem_ptr(static_cast<const Element*>(params.k_ptr)), kp.shape_k,
                    make_stride(params.k_row_stride, _1{}, params.k_head_stride,
                                rows.batch_stride(params.k_batch_stride, params.k_row_stride)));
    Tensor mVt =
        make_tensor(make_gmem_ptr(static_cast<const Element*>(params.v_ptr)), kp.shape_vt,
                    make_stride(_1{}, params.v_row_stride, params.v_head_stride,
                                rows.batch_stride(params.v_batch_stride, params.v_row_stride)));
    kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, take<0, 2>(typename Traits::SmemLayoutK{}),
                             Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{}, _1{});
    kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mVt, take<0, 2>(typename Traits::SmemLayoutVt{}),
                             Shape<Int<kHeadDim>, Int<Traits::kBlockN>>{}, _1{});

    // ALiBi and dropout run in a kernel of their own (flash_fwd_kernel.h), one head per tile.
    const bool has_variants = params.alibi_slopes != nullptr || params.dropout_threshold != 0;
    kp.heads_per_tile =
        query_heads_per_tile<Traits::kBlockM>(params.nheads, params.nheads_k, has_variants);
    const cudaError_t q_err = make_query_descriptor<Traits>(
        params, kp.heads_per_tile, rows.rows_q, rows.batches,
        rows.batch_stride(params.q_batch_stride, params.q_row_stride), kp.tma_q);
    if (q_err != cudaSuccess) return q_err;

    // Tiles: row blocks of `tokens` tokens of each head unit (a head, or a packed GQA group).
    const int tokens = QueryRows::tokens_per_tile<Traits::kBlockM>(kp.heads_per_tile);
    const int head_units = params.nheads / kp.heads_per_tile;
    const int row_blocks = cute::ceil_div(params.seqlen_q, tokens);
    const int64_t grid_order_tiles = int64_t(row_blocks) * params.batch * head_units;
    const int64_t schedule_tiles =
        VarlenTileSchedule::tile_bound(params.total_q, params.batch, tokens, head_units);
    const bool use_schedule = use_varlen_schedule(rows.is_varlen, grid_order_tiles, schedule_tiles);
    int64_t tiles = grid_order_tiles;
    kp.tiles =
        TileOrder{VarlenTileSchedule{nullptr, nullptr}, row_blocks, params.batch, head_units, 0};
    if (use_schedule) {
        const cudaError_t err = launch_varlen_tile_schedule<Traits::kBlockM>(
            params, tokens, head_units, workspace.scratch, stream, kp.tiles.schedule);
        if (err != cudaSuccess) return err;
        tiles = schedule_tiles;
    }
    if (tiles > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidConfiguration;
    kp.tiles.tiles = int(tiles);
    kp.tile_counter = static_cast<int*>(workspace.zeroed);
    const dim3 grid(uint32_t(std::max<int64_t>(std::min<int64_t>(tiles, device_sm_count()), 1)));

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
