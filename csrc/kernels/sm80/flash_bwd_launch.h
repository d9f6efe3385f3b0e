// Host-side launch of the backward pass for one (element type, head-dim bucket, local mask)
// instantiation: preprocess (D, clearing the dQ accumulator), the main kernel (dK, dV, dQ
// accumulation), convert (dQ), and clearing unused rows of gradients the backward allocated;
// and the workspace it needs (the dQ accumulator, and the semaphores of deterministic mode).
#pragma once

#include <cuda_runtime_api.h>

#include <cute/tensor.hpp>

#include "kernels/common/clear_rows_past_end.h"
#include "kernels/common/flash_params.h"
#include "kernels/common/padded_row_blocks.h"
#include "kernels/common/workspace.h"
#include "kernels/sm80/bwd_kernel_traits.h"
#include "kernels/sm80/dq_accum.h"
#include "kernels/sm80/flash_bwd_kernel.h"
#include "kernels/sm80/flash_bwd_preprocess.h"

namespace flash_varlen {
namespace sm80 {

// Rows of the dQ accumulator per head: the padded rows (common/padded_rows.h), one row block of
// slack per sequence, so that each sequence's tiles start on a whole row block (dq_accum.h).
template <typename Traits>
int64_t dq_accum_rows(const FlashBwdParams& params) {
    return PaddedRows<Traits::kBlockM>::rows_per_head(params);
}

// Scratch: the float32 dQ accumulator, (nheads, dq_accum_rows, kHeadDim), not zeroed (the
// preprocess kernel clears every tile the main kernel adds into). Zeroed, in deterministic mode:
// the int32 semaphores, (nheads, dq_semaphore_slots_per_head) (dq_semaphore.h).
template <typename Element, int kHeadDim>
WorkspaceSize flash_bwd_workspace_size(const FlashBwdParams& params) {
    using Traits = typename BwdTileConfig<Element, kHeadDim>::Traits;
    WorkspaceSize size;
    size.scratch_bytes =
        int64_t(params.nheads) * dq_accum_rows<Traits>(params) * kHeadDim * int64_t(sizeof(float));
    if (params.deterministic) {
        size.zeroed_bytes =
            int64_t(params.nheads) * dq_semaphore_slots_per_head(params) * int64_t(sizeof(int));
    }
    return size;
}

template <typename Element, int kHeadDim, bool kIsLocal>
cudaError_t launch_flash_bwd(const FlashBwdParams& call_params, const Workspace& workspace,
                             cudaStream_t stream) {
    using Traits = typename BwdTileConfig<Element, kHeadDim>::Traits;
    FlashBwdParams params = call_params;
    params.dq_accum_ptr = static_cast<float*>(workspace.scratch);
    params.dq_accum_head_stride = dq_accum_rows<Traits>(params) * kHeadDim;
    params.dq_semaphore = params.deterministic ? static_cast<int*>(workspace.zeroed) : nullptr;
    params.dq_semaphore_head_stride = static_cast<int>(dq_semaphore_slots_per_head(params));
    // Grid of the preprocess and conversion kernels: one padded row block of one head per
    // thread block (common/padded_row_blocks.h).
    const dim3 row_block_grid = PaddedRows<Traits::kBlockM>::row_block_grid(params);
    // Empty launches are invalid: with no query rows there is no D and no dQ, and with no keys no
    // key block (dK, dV have no rows; dQ is the zeroed accumulator, converted).
    const bool has_query_rows = params.seqlen_q > 0 && params.nheads > 0 && params.batch > 0;
    if (has_query_rows) {
        flash_bwd_preprocess_kernel<Traits>
            <<<row_block_grid, kPreprocessThreads, 0, stream>>>(params);
    }

    // Soft-capping, ALiBi and dropout run in a kernel of their own (flash_bwd_kernel.h).
    const bool has_variants = params.dropout_threshold != 0 || params.softcap_prescale != 0.f ||
                              params.alibi_slopes != nullptr;
    auto kernel = has_variants ? &flash_bwd_kernel<Traits, kIsLocal, true>
                               : &flash_bwd_kernel<Traits, kIsLocal, false>;
    // Whether dQ goes through the staged bulk adds, which need one more tile of shared memory
    // (dq_accum.h), follows the virtual architecture the kernel this device runs was compiled
    // for (its __CUDA_ARCH__; a binary JIT-compiled from older PTX takes the older path).
    cudaFuncAttributes kernel_attributes;
    cudaError_t err = cudaFuncGetAttributes(&kernel_attributes, kernel);
    if (err != cudaSuccess) return err;
    const bool bulk_dq_adds = kernel_attributes.ptxVersion >= kDqBulkAddsMinArch;
    const int smem_bytes = Traits::kSmemBytes + (bulk_dq_adds ? Traits::kSmemDqStagingBytes : 0);
    constexpr int kDefaultSmemLimit = 48 * 1024;  // above this a kernel must opt in
    if (smem_bytes > kDefaultSmemLimit) {
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
        if (err != cudaSuccess) return err;
    }
    // Key blocks: (key blocks of the longest sequence, batch, kv heads). The blocks past a shorter
    // sequence's keys exit at once; giving this kernel the tile schedule's 1-D grid, as the
    // forward's (flash_fwd_launch.h), made its plain kernels spill (bf16 d = 64 local: 8 -> 304
    // bytes of stores at sm_80, accumulators reloaded in the main loop; d = 256 0 -> 20 at
    // sm_90; nvcc 13.0): the looked-up coordinates stay live where blockIdx could be re-read.
    const dim3 grid(cute::ceil_div(params.seqlen_k, Traits::kBlockN), params.batch,
                    params.nheads_k);
    if (grid.x > 0) kernel<<<grid, Traits::kNThreads, smem_bytes, stream>>>(params);

    if (has_query_rows) {
        constexpr int kConvertSmemBytes = Traits::kSmemElemsQdO * int(sizeof(Element));
        static_assert(kConvertSmemBytes <= kDefaultSmemLimit, "no opt-in needed");
        flash_bwd_convert_dq_kernel<Traits>
            <<<row_block_grid, Traits::kNThreads, kConvertSmemBytes, stream>>>(params);
    }
    launch_clear_rows_past_end<Element>(params, stream);
    return cudaGetLastError();
}

}  // namespace sm80
}  // namespace flash_varlen
