// The pybind11 module: the four entry points (generated/entry_points.cpp, implemented in
// forward.cpp and backward.cpp) and what this build contains.
#include <torch/csrc/utils/pybind.h>  // pybind11 and its casters of torch types

#include <iterator>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/dispatch.h"
#include "bindings/input_checks.h"
#include "generated/contract.h"
#include "generated/kernel_families.h"
#include "kernels/common/kernel_registry.h"

namespace flash_varlen {

void define_entry_points(py::module_& m);

namespace {

constexpr int kArchPerCapability = 10;  // __CUDA_ARCH__ 900 is compute capability 90

const KernelFamilyInfo& family_info(KernelFamily family) {
    for (const KernelFamilyInfo& info : kKernelFamilies) {
        if (info.family == family) return info;
    }
    C10_THROW_ERROR(ValueError, "unknown kernel family");
}

// (family, dtype name, head-dim bucket) triples for which this build has a kernel of the given
// direction, in registration order.
template <typename Params>
std::vector<std::tuple<std::string, std::string, int>> configs_of() {
    std::vector<std::tuple<std::string, std::string, int>> configs;
    for (const KernelEntry<Params>& entry : kernel_table<Params>()) {
        std::tuple<std::string, std::string, int> config{family_info(entry.key.family).name,
                                                         dtype_name(entry.key.config.element_type),
                                                         entry.key.config.head_dim_bucket};
        bool seen = false;
        for (const auto& c : configs) seen = seen || c == config;
        if (!seen) configs.push_back(config);
    }
    return configs;
}

// Adds the compute capabilities the kernels of one direction and family were compiled for.
template <typename Params>
void add_built_capabilities(KernelFamily family, std::set<int>& built) {
    for (const KernelEntry<Params>& entry : kernel_table<Params>()) {
        if (entry.key.family != family) continue;
        for (const int arch : entry.archs) built.insert(arch / kArchPerCapability);
    }
}

// The families, best first: name, summary, the compute capabilities each serves, and the
// compute capabilities this build compiled its kernels for (empty: none of its kernels built).
py::list kernel_families() {
    py::list families;
    for (const KernelFamilyInfo& info : kKernelFamilies) {
        std::set<int> built;
        add_built_capabilities<FlashFwdParams>(info.family, built);
        add_built_capabilities<FlashBwdParams>(info.family, built);
        add_built_capabilities<FlashDecodeParams>(info.family, built);
        py::dict family;
        family["name"] = info.name;
        family["summary"] = info.summary;
        family["compute_capabilities"] =
            py::make_tuple(info.min_compute_capability, info.max_compute_capability);
        family["built_for"] = std::vector<int>(built.begin(), built.end());
        families.append(family);
    }
    return families;
}

ElementType element_type_named(const std::string& name) {
    if (name == "float16") return ElementType::kFloat16;
    if (name == "bfloat16") return ElementType::kBFloat16;
    C10_THROW_ERROR(ValueError, message("dtype must be 'float16' or 'bfloat16', got '", name, "'"));
}

// The name of the family dispatch picks for one direction's params.
template <typename Params>
std::string family_of(const KernelConfig& config, int compute_capability, int head_dim,
                      const char* direction) {
    return family_info(
               select_kernel<Params>(config, nullptr, compute_capability, head_dim, direction)
                   .key.family)
        .name;
}

// The family that would run a call of `direction` ("forward", "backward" or "decode") with this
// dtype, head dim and mask on a device of `compute_capability` (major * 10 + minor), honouring
// FLASH_VARLEN_KERNEL_FAMILY; the same errors as the call itself.
std::string select_kernel_family(const std::string& direction, const std::string& dtype,
                                 int head_dim, bool local, int compute_capability) {
    const KernelConfig config{element_type_named(dtype), head_dim_bucket(head_dim), local};
    if (direction == "forward") {
        return family_of<FlashFwdParams>(config, compute_capability, head_dim, "forward");
    }
    if (direction == "backward") {
        return family_of<FlashBwdParams>(config, compute_capability, head_dim, "backward");
    }
    TORCH_CHECK_VALUE(
        direction == "decode",
        message("direction must be 'forward', 'backward' or 'decode', got '", direction, "'"));
    return family_of<FlashDecodeParams>(config, compute_capability, head_dim, "decode");
}

std::vector<int> head_dim_buckets() {
    return std::vector<int>(std::begin(kHeadDimBuckets), std::end(kHeadDimBuckets));
}

}  // namespace
}  // namespace flash_varlen

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    using namespace flash_varlen;
    m.doc() = "flash_varlen CUDA kernels: exact attention over packed variable-length sequences";
    define_entry_points(m);
    m.def("compiled_kernels", &configs_of<FlashFwdParams>,
          "(kernel family, dtype name, head-dim bucket) triples this build has forward kernels "
          "for");
    m.def("compiled_backward_kernels", &configs_of<FlashBwdParams>,
          "(kernel family, dtype name, head-dim bucket) triples this build has backward kernels "
          "for");
    m.def("compiled_decode_kernels", &configs_of<FlashDecodeParams>,
          "(kernel family, dtype name, head-dim bucket) triples this build has decode (KV-cache) "
          "kernels for");
    m.def("kernel_families", &kernel_families,
          "The kernel families, best first: name, summary, compute_capabilities served (lowest, "
          "highest, as major * 10 + minor) and built_for (the compute capabilities this build "
          "compiled the family for; empty when none of its kernels is built)");
    m.def("select_kernel_family", &select_kernel_family,
          "The family that would run a call on a device of the given compute capability "
          "(major * 10 + minor), honouring FLASH_VARLEN_KERNEL_FAMILY; raises as the call would",
          py::arg("direction"), py::arg("dtype"), py::arg("head_dim"), py::arg("local"),
          py::arg("compute_capability"));
    m.def("head_dim_buckets", &head_dim_buckets,
          "head-dim buckets the kernels know; a head dim runs in the smallest bucket >= it");
}
