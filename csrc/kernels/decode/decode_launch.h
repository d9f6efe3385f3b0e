// Host side of the decode family: the split count, the workspace it needs, the launches (the
// decode kernel, then the combine kernel when there are splits), and the options the family
// refuses. Everything here reads shapes and device attributes only, never device memory: no
// host-device sync, so a decode step can be captured in a CUDA graph and replayed with new
// cache lengths and block tables.
#pragma once

#include <cuda_runtime_api.h>
#include <cutlass/fast_math.h>

#include <cute/tensor.hpp>

#include "kernels/common/device_sm_count.h"
#include "kernels/common/flash_params.h"
#include "kernels/common/workspace.h"
#include "kernels/decode/cache_append_kernel.h"
#include "kernels/decode/combine_kernel.h"
#include "kernels/decode/decode_kernel.h"
#include "kernels/decode/decode_kernel_traits.h"
#include "kernels/decode/kv_cache_rows.h"
#include "kernels/decode/split_heuristic.h"

namespace flash_varlen {
namespace decode {

// Up to this many query rows (nheads / nheads_k * seqlen_q) the warps split each key block;
// beyond it they split the rows (decode_kernel_traits.h).
constexpr int kMaxRowsOfKeySplitWarps = 16;

template <typename Element, int kHeadDim, int kWarpsM>
struct DecodeLaunch {
    using Traits = DecodeKernelTraits<Element, kHeadDim, kWarpsM>;

    static int row_blocks(const FlashDecodeParams& params) {
        return cute::ceil_div(params.nheads / params.nheads_k * params.seqlen_q, Traits::kBlockM);
    }

    static cudaError_t allow_smem() {
        constexpr int kDefaultSmemLimit = 48 * 1024;  // above this a kernel must opt in
        if constexpr (Traits::kSmemBytes > kDefaultSmemLimit) {
            return cudaFuncSetAttribute(decode_kernel<Traits>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Traits::kSmemBytes);
        }
        return cudaSuccess;
    }

    // The split count of a call: params.num_splits when given, else the heuristic on this
    // device's SM count and the kernel's occupancy (attribute queries: no sync, no launch).
    static int num_splits(const FlashDecodeParams& params) {
        const int sm_count = device_sm_count();
        int ctas_per_sm = 1;
        if (allow_smem() == cudaSuccess) {
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, decode_kernel<Traits>,
                                                          Traits::kNThreads, Traits::kSmemBytes);
        }
        const SplitProblem problem{
            int64_t(params.batch) * params.nheads_k * row_blocks(params),
            cute::ceil_div(int64_t(params.seqlen_k), int64_t(Traits::kBlockN)), sm_count,
            ctas_per_sm};
        return resolve_num_splits(params.num_splits, problem);
    }

    static cudaError_t launch(FlashDecodeParams params, const Workspace& workspace,
                              cudaStream_t stream) {
        cudaError_t err = allow_smem();
        if (err != cudaSuccess) return err;
        err = launch_cache_append<Element>(params, stream);
        if (err != cudaSuccess) return err;
        // A call without query rows only appends (the bindings launch it for that).
        if (params.seqlen_q == 0) return cudaSuccess;
        params.num_splits = num_splits(params);
        if (params.num_splits > 1) {
            const int64_t query_rows = int64_t(params.batch) * params.nheads * params.seqlen_q;
            const SplitWorkspace sizes = split_workspace(params.num_splits, query_rows, kHeadDim);
            params.partial_out = static_cast<float*>(workspace.scratch);
            params.partial_lse = params.partial_out + sizes.partial_out_floats;
        }
        const cutlass::FastDivmod page_size(addressing_page_size(params));
        const int64_t ctas =
            int64_t(params.batch) * params.nheads_k * row_blocks(params) * params.num_splits;
        decode_kernel<Traits>
            <<<dim3(unsigned(ctas)), Traits::kNThreads, Traits::kSmemBytes, stream>>>(params,
                                                                                      page_size);
        if (params.num_splits > 1) {
            const int64_t rows = int64_t(params.batch) * params.nheads * params.seqlen_q;
            combine_kernel<Element, kHeadDim>
                <<<dim3(unsigned(cute::ceil_div(rows, int64_t(kCombineWarps)))), kCombineWarps * 32,
                   0, stream>>>(params);
        }
        return cudaGetLastError();
    }
};

// The registry's launcher (kernel_registry.h): the key-split or the row-split kernel by the
// call's rows. The family declares no local-mask variant: its kernels read the window at run time.
template <typename Element, int kHeadDim, bool kIsLocal>
cudaError_t launch_decode(const FlashDecodeParams& params, const Workspace& workspace,
                          cudaStream_t stream) {
    static_assert(!kIsLocal, "the decode family masks at run time: no local-mask instantiation");
    if (params.nheads / params.nheads_k * params.seqlen_q <= kMaxRowsOfKeySplitWarps) {
        return DecodeLaunch<Element, kHeadDim, 1>::launch(params, workspace, stream);
    }
    return DecodeLaunch<Element, kHeadDim, 4>::launch(params, workspace, stream);
}

template <typename Element, int kHeadDim>
WorkspaceSize decode_workspace_size(const FlashDecodeParams& params) {
    const bool key_split =
        params.nheads / params.nheads_k * params.seqlen_q <= kMaxRowsOfKeySplitWarps;
    const int splits = key_split ? DecodeLaunch<Element, kHeadDim, 1>::num_splits(params)
                                 : DecodeLaunch<Element, kHeadDim, 4>::num_splits(params);
    const int64_t query_rows = int64_t(params.batch) * params.nheads * params.seqlen_q;
    return {split_workspace(splits, query_rows, kHeadDim).bytes(), 0};
}

// Dropout is a training option; decode serves inference and refuses it (the bindings then
// name it in a NotImplementedError).
inline const char* decode_unsupported_option(const FlashDecodeParams& params) {
    return params.dropout_threshold != 0 ? "dropout" : nullptr;
}

}  // namespace decode
}  // namespace flash_varlen
