#include "bindings/dispatch.h"

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <string>

#include "bindings/input_checks.h"

namespace flash_varlen {
namespace {

constexpr int kMinorsPerMajor = 10;

// "9.0" for 90.
std::string capability_text(int compute_capability) {
    return message(compute_capability / kMinorsPerMajor, ".", compute_capability % kMinorsPerMajor);
}

// "sm_80, sm_90" for the architectures of an entry (__CUDA_ARCH__ values).
std::string archs_text(const std::vector<int>& archs) {
    constexpr int kArchPerCapability = 10;
    std::string text;
    for (const int arch : archs) {
        if (!text.empty()) text += ", ";
        text += message("sm_", arch / kArchPerCapability);
    }
    return text;
}

// Why `family` cannot run `config` here, or "" when its kernel can (then *found is set).
template <typename Params>
std::string why_not(const KernelFamilyInfo& family, const KernelConfig& config,
                    const Params* params, int compute_capability,
                    const KernelEntry<Params>** found) {
    if (compute_capability < family.min_compute_capability ||
        compute_capability > family.max_compute_capability) {
        return message("serves compute capability ", capability_text(family.min_compute_capability),
                       " to ", capability_text(family.max_compute_capability));
    }
    const KernelEntry<Params>* entry = find_kernel<Params>({family.family, config});
    if (entry == nullptr) return "not in this build";
    if (!entry->runs_on(compute_capability)) {
        return message("compiled for ", archs_text(entry->archs), " only");
    }
    if (params != nullptr && entry->unsupported_option != nullptr) {
        const char* option = entry->unsupported_option(*params);
        if (option != nullptr) return message("does not implement ", option);
    }
    *found = entry;
    return "";
}

}  // namespace

int compute_capability(const at::Device& device) {
    // Attribute queries read the driver's cached device description: no sync, no launch.
    int major = 0;
    int minor = 0;
    const int index = device.index();
    cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index);
    if (err == cudaSuccess) {
        err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index);
    }
    TORCH_CHECK(err == cudaSuccess, message("flash_varlen: cannot read the compute capability of ",
                                            device, ": ", cudaGetErrorString(err)));
    return major * kMinorsPerMajor + minor;
}

const KernelFamilyInfo* forced_family() {
    const char* value = std::getenv(kFamilyOverrideVariable);
    if (value == nullptr || value[0] == '\0') return nullptr;
    std::string known;
    for (const KernelFamilyInfo& family : kKernelFamilies) {
        if (std::string(value) == family.name) return &family;
        if (!known.empty()) known += ", ";
        known += family.name;
    }
    C10_THROW_ERROR(ValueError, message(kFamilyOverrideVariable, "=", value,
                                        " names no kernel family; known: ", known));
}

template <typename Params>
const KernelEntry<Params>& select_kernel(const KernelConfig& config, const Params* params,
                                         int compute_capability, int head_dim,
                                         const char* direction) {
    const KernelFamilyInfo* forced = forced_family();
    std::string reasons;
    for (const KernelFamilyInfo& family : kKernelFamilies) {
        if (forced != nullptr && forced != &family) continue;
        const KernelEntry<Params>* entry = nullptr;
        const std::string reason = why_not(family, config, params, compute_capability, &entry);
        if (entry != nullptr) return *entry;
        reasons += message(reasons.empty() ? "" : "; ", family.name, ": ", reason);
    }
    const std::string override_text =
        forced == nullptr ? "" : message(" (", kFamilyOverrideVariable, "=", forced->name, ")");
    C10_THROW_ERROR(
        NotImplementedError,
        message("flash_varlen was built without a ", direction,
                " kernel for dtype=", dtype_name(config.element_type), ", head-dim bucket ",
                config.head_dim_bucket, " (head dim ", head_dim, "), local mask=", config.is_local,
                " that runs on this device (compute capability ",
                capability_text(compute_capability), ")", override_text, ": ", reasons,
                ". Rebuild with FLASH_VARLEN_DTYPES / FLASH_VARLEN_HEAD_DIMS / "
                "FLASH_VARLEN_ARCHS covering it (unset them for the full build)."));
}

template const KernelEntry<FlashFwdParams>& select_kernel<FlashFwdParams>(
    const KernelConfig&, const FlashFwdParams*, int, int, const char*);
template const KernelEntry<FlashBwdParams>& select_kernel<FlashBwdParams>(
    const KernelConfig&, const FlashBwdParams*, int, int, const char*);
template const KernelEntry<FlashDecodeParams>& select_kernel<FlashDecodeParams>(
    const KernelConfig&, const FlashDecodeParams*, int, int, const char*);

}  // namespace flash_varlen
