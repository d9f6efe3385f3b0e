// A table of the kernels this build contains, one per direction. Each generated instantiation
// file adds its launcher at load time, so a narrowed development build simply has fewer entries
// and the bindings can refuse an uncovered call with a clear message instead of a link error or a
// silent no-op.
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include "flash_params.h"

namespace flash_varlen {

enum class ElementType { kFloat16, kBFloat16 };

struct KernelKey {
    ElementType element_type;
    int head_dim_bucket;
    bool is_local;  // a local mask: causal and/or a sliding window (mask_policy.h)

    bool operator==(const KernelKey& other) const {
        return element_type == other.element_type && head_dim_bucket == other.head_dim_bucket &&
               is_local == other.is_local;
    }
};

template <typename Params>
using Launcher = cudaError_t (*)(const Params&, cudaStream_t);
using FwdLauncher = Launcher<FlashFwdParams>;
using BwdLauncher = Launcher<FlashBwdParams>;

template <typename Params>
struct KernelEntry {
    KernelKey key;
    Launcher<Params> launch;
};

// The table of one direction. A function-local static, so registrations from other translation
// units never run before the table exists, whatever order the loader runs their static
// initializers in. Defined (and explicitly instantiated for both directions) in the .cpp, so the
// whole library shares one table per direction.
template <typename Params>
std::vector<KernelEntry<Params>>& kernel_table();

// Returns nullptr when this build does not contain the kernel.
template <typename Params>
Launcher<Params> find_kernel(const KernelKey& key) {
    for (const KernelEntry<Params>& entry : kernel_table<Params>()) {
        if (entry.key == key) return entry.launch;
    }
    return nullptr;
}

// A static instance of this in an instantiation file registers its kernel when the library loads.
template <typename Params>
struct KernelRegistration {
    KernelRegistration(const KernelKey& key, Launcher<Params> launch) {
        kernel_table<Params>().push_back({key, launch});
    }
};
using FwdKernelRegistration = KernelRegistration<FlashFwdParams>;
using BwdKernelRegistration = KernelRegistration<FlashBwdParams>;

}  // namespace flash_varlen
