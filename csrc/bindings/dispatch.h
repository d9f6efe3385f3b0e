// Which kernel runs a call. Per call, dispatch takes the first kernel family of kKernelFamilies
// (best first) that serves the device's compute capability, that this build contains for the
// call's (dtype, head-dim bucket, local mask), and whose compiled code runs on the device. The
// environment variable FLASH_VARLEN_KERNEL_FAMILY=<family name>, read at every call, considers
// that family alone (tests run each family a GPU can run this way). Then the kernel's workspace
// is allocated as its launcher asks, and the kernel launched on the current stream.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "bindings/error_message.h"
#include "kernels/common/kernel_registry.h"

namespace flash_varlen {

// The compute capability of a CUDA device as major * 10 + minor (90 for 9.0); no device sync.
int compute_capability(const at::Device& device);

// The family FLASH_VARLEN_KERNEL_FAMILY names, or nullptr when it is unset or empty; raises
// ValueError when it names no family.
const KernelFamilyInfo* forced_family();

// The kernel of `direction` ("forward" or "backward") for `config` on a device of
// `compute_capability`, as described above, skipping a family whose kernels do not implement an
// option the call's `params` set (nullptr: options not considered). Raises NotImplementedError
// naming the call and why each family does not apply, and the build variables that would cover
// it; head_dim is the call's, for the message.
template <typename Params>
const KernelEntry<Params>& select_kernel(const KernelConfig& config, const Params* params,
                                         int compute_capability, int head_dim,
                                         const char* direction);

// Allocates the workspace the kernel asks for (through PyTorch's caching allocator, so it is
// stream-ordered and graph-capturable) and launches it on the device's current stream.
template <typename Params>
void launch_kernel(const KernelEntry<Params>& kernel, const Params& params,
                   const at::Device& device, const char* direction) {
    const at::cuda::CUDAGuard device_guard(device);
    const WorkspaceSize size = kernel.workspace_size(params);
    const auto bytes = at::TensorOptions().dtype(at::kByte).device(device);
    at::Tensor scratch;
    at::Tensor zeroed;
    Workspace workspace;
    if (size.scratch_bytes > 0) {
        scratch = at::empty({size.scratch_bytes}, bytes);
        workspace.scratch = scratch.data_ptr();
    }
    if (size.zeroed_bytes > 0) {
        zeroed = at::zeros({size.zeroed_bytes}, bytes);
        workspace.zeroed = zeroed.data_ptr();
    }
    const cudaError_t err =
        kernel.launch(params, workspace, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, message("flash_varlen ", direction,
                                            " kernel launch failed: ", cudaGetErrorString(err)));
}

}  // namespace flash_varlen
