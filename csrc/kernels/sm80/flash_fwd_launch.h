// Host-side launch of the forward kernel for one (traits, local mask) instantiation.
#pragma once

#include <cuda_runtime_api.h>
#include <cutlass/fast_math.h>

#include <cute/tensor.hpp>

#include "kernels/common/flash_params.h"
#include "kernels/common/workspace.h"
#include "kernels/sm80/flash_fwd_kernel.h"
#include "kernels/sm80/fwd_kernel_traits.h"

namespace flash_varlen {
namespace sm80 {

// Grid: (row blocks of the longest sequence, batch, heads). Row blocks of one (sequence, head)
// are adjacent in launch order, so the thread blocks that share a K/V tile run together and
// read it from L2. Row blocks past a shorter sequence's end exit at once. The forward needs no
// workspace (kernel_families.py registers no_workspace for it).
template <typename Element, int kHeadDim, bool kIsLocal>
cudaError_t launch_flash_fwd(const FlashFwdParams& params, const Workspace&, cudaStream_t stream) {
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
    const dim3 grid(cute::ceil_div(params.seqlen_q, Traits::kBlockM), params.batch, params.nheads);
    // FastDivmod divides by its argument when built: 1 stands in for "not paged".
    const cutlass::FastDivmod page_size(params.block_table == nullptr ? 1 : params.page_size);
    kernel<<<grid, Traits::kNThreads, kSmemBytes, stream>>>(params, page_size);
    return cudaGetLastError();
}

}  // namespace sm80
}  // namespace flash_varlen
