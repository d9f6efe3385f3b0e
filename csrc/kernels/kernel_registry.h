// A table of the forward kernels this build contains. Each generated instantiation file adds its
// launcher at load time, so a narrowed development build simply has fewer entries and the bindings
// can refuse an uncovered call with a clear message instead of a link error or a silent no-op.
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include "flash_params.h"

namespace flash_varlen {

enum class ElementType { kFloat16, kBFloat16 };

using FwdLauncher = cudaError_t (*)(const FlashFwdParams&, cudaStream_t);

struct FwdKernelKey {
    ElementType element_type;
    int head_dim_bucket;
    bool is_causal;
};

struct FwdKernelEntry {
    FwdKernelKey key;
    FwdLauncher launch;
};

void register_fwd_kernel(const FwdKernelKey& key, FwdLauncher launch);

// Returns nullptr when this build does not contain the kernel.
FwdLauncher find_fwd_kernel(const FwdKernelKey& key);

const std::vector<FwdKernelEntry>& registered_fwd_kernels();

// A static instance of this in an instantiation file registers its kernel when the library loads.
struct FwdKernelRegistration {
    FwdKernelRegistration(const FwdKernelKey& key, FwdLauncher launch) {
        register_fwd_kernel(key, launch);
    }
};

}  // namespace flash_varlen
