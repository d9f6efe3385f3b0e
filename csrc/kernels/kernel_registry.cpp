#include "kernel_registry.h"

namespace flash_varlen {

namespace {

// A function-local static, so registrations from other translation units never run before the
// table exists, whatever order the loader runs their static initializers in.
std::vector<FwdKernelEntry>& fwd_kernel_table() {
    static std::vector<FwdKernelEntry> table;
    return table;
}

bool same_key(const FwdKernelKey& a, const FwdKernelKey& b) {
    return a.element_type == b.element_type && a.head_dim_bucket == b.head_dim_bucket &&
           a.is_causal == b.is_causal;
}

}  // namespace

void register_fwd_kernel(const FwdKernelKey& key, FwdLauncher launch) {
    fwd_kernel_table().push_back({key, launch});
}

FwdLauncher find_fwd_kernel(const FwdKernelKey& key) {
    for (const FwdKernelEntry& entry : fwd_kernel_table()) {
        if (same_key(entry.key, key)) return entry.launch;
    }
    return nullptr;
}

const std::vector<FwdKernelEntry>& registered_fwd_kernels() { return fwd_kernel_table(); }

}  // namespace flash_varlen
