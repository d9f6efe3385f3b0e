// A table of the kernels this build contains, one per direction. Each generated instantiation
// file adds its entry at load time, so a narrowed development build simply has fewer entries and
// the bindings can refuse an uncovered call with a clear message instead of a link error or a
// silent no-op. An entry names its kernel family and the architectures its code was compiled
// for, so that dispatch (bindings/dispatch.cpp) can pick a family per call and device.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "generated/kernel_families.h"
#include "kernels/common/flash_params.h"
#include "kernels/common/workspace.h"

namespace flash_varlen {

// The environment variable that forces one kernel family (its name) on every call; dispatch
// (bindings/dispatch.cpp) reads it, and family_is_forced below.
constexpr const char* kFamilyOverrideVariable = "FLASH_VARLEN_KERNEL_FAMILY";

// Whether the override names `family`: a family's option check asks it to serve code that has
// not run on a GPU yet, or whose speed is not measured yet, only when forced (the sm90
// backward's soft-capping, ALiBi and sinks: sm90/flash_bwd_launch.h bwd_unsupported_option).
inline bool family_is_forced(KernelFamily family) {
    const char* value = std::getenv(kFamilyOverrideVariable);
    if (value == nullptr) return false;
    for (const KernelFamilyInfo& info : kKernelFamilies) {
        if (info.family == family) return std::strcmp(value, info.name) == 0;
    }
    return false;
}

enum class ElementType { kFloat16, kBFloat16 };

// What a call needs of a kernel, whichever family provides it.
struct KernelConfig {
    ElementType element_type;
    int head_dim_bucket;
    bool is_local;  // a local mask: causal and/or a sliding window (mask_policy.h)

    bool operator==(const KernelConfig& other) const {
        return element_type == other.element_type && head_dim_bucket == other.head_dim_bucket &&
               is_local == other.is_local;
    }
};

struct KernelKey {
    KernelFamily family;
    KernelConfig config;

    bool operator==(const KernelKey& other) const {
        return family == other.family && config == other.config;
    }
};

// Launches one call. The workspace is what the entry's WorkspaceSizer asked for.
template <typename Params>
using Launcher = cudaError_t (*)(const Params&, const Workspace&, cudaStream_t);
// The workspace one call needs (params are filled, workspace pointers excepted).
template <typename Params>
using WorkspaceSizer = WorkspaceSize (*)(const Params&);
// The first option of a call that a family's kernels do not implement, in words ("ALiBi"), or
// nullptr when they implement the call.
template <typename Params>
using OptionCheck = const char* (*)(const Params&);

template <typename Params>
struct KernelEntry {
    KernelKey key;
    // The architectures the code was compiled for, as __CUDA_ARCH__ values (800 for sm_80).
    std::vector<int> archs;
    Launcher<Params> launch;
    WorkspaceSizer<Params> workspace_size;
    // nullptr: the kernels implement every option.
    OptionCheck<Params> unsupported_option;

    // Whether the compiled code runs on a device of this compute capability (major * 10 +
    // minor): machine code for sm_XY runs on compute capability X.Z with Z >= Y.
    bool runs_on(int compute_capability) const {
        constexpr int kArchPerCapability = 10;  // __CUDA_ARCH__ 860 is compute capability 86
        constexpr int kMinorsPerMajor = 10;
        for (const int arch : archs) {
            const int built = arch / kArchPerCapability;
            const bool same_major = built / kMinorsPerMajor == compute_capability / kMinorsPerMajor;
            if (same_major && built <= compute_capability) return true;
        }
        return false;
    }
};

// The table of one direction. A function-local static, so registrations from other translation
// units never run before the table exists, whatever order the loader runs their static
// initializers in. Defined (and explicitly instantiated for both directions) in the .cpp, so the
// whole library shares one table per direction.
template <typename Params>
std::vector<KernelEntry<Params>>& kernel_table();

// The entry of `key`, or nullptr when this build does not contain it.
template <typename Params>
const KernelEntry<Params>* find_kernel(const KernelKey& key) {
    for (const KernelEntry<Params>& entry : kernel_table<Params>()) {
        if (entry.key == key) return &entry;
    }
    return nullptr;
}

// The architectures (__CUDA_ARCH__ values) of a FLASH_VARLEN_MACHINE_ARCHS mask: bit i stands
// for kTargetArchs[i].
inline std::vector<int> machine_archs(unsigned mask) {
    std::vector<int> archs;
    for (unsigned i = 0; i < sizeof(kTargetArchs) / sizeof(kTargetArchs[0]); ++i) {
        if (mask & (1u << i)) archs.push_back(kTargetArchs[i]);
    }
    return archs;
}

// A static instance of this in an instantiation file registers its kernel when the library loads.
template <typename Params>
struct KernelRegistration {
    KernelRegistration(const KernelKey& key, std::vector<int> archs,
                       Launcher<Params> launch, WorkspaceSizer<Params> workspace_size,
                       OptionCheck<Params> unsupported_option) {
        kernel_table<Params>().push_back(
            {key, std::move(archs), launch, workspace_size, unsupported_option});
    }
};

}  // namespace flash_varlen
