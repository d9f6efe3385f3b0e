// The pybind11 module: forward and backward entry points (forward_api.cpp, backward_api.cpp) and
// what this build contains.
#include "flash_api.h"

#include <iterator>

#include "input_checks.h"
#include "kernels/kernel_registry.h"

namespace flash_varlen {
namespace {

// (dtype name, head-dim bucket) pairs for which this build has a kernel of the given direction.
template <typename Params>
std::vector<std::tuple<std::string, int>> configs_of() {
    std::vector<std::tuple<std::string, int>> configs;
    for (const KernelEntry<Params>& entry : kernel_table<Params>()) {
        std::tuple<std::string, int> config{dtype_name(entry.key.element_type),
                                            entry.key.head_dim_bucket};
        bool seen = false;
        for (const auto& c : configs) seen = seen || c == config;
        if (!seen) configs.push_back(config);
    }
    return configs;
}

std::vector<int> head_dim_buckets() {
    return std::vector<int>(std::begin(kHeadDimBuckets), std::end(kHeadDimBuckets));
}

}  // namespace
}  // namespace flash_varlen

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    using namespace flash_varlen;
    m.doc() = "flash_varlen CUDA kernels: exact attention over packed variable-length sequences";
    m.def("varlen_fwd", &varlen_fwd,
          "Forward attention over packed sequences: (out, softmax_lse, dropout pattern, "
          "rng_state)",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"),
          py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
          py::arg("softmax_scale"), py::arg("causal"), py::arg("window_left") = -1,
          py::arg("window_right") = -1, py::arg("softcap") = 0.0,
          py::arg("alibi_slopes") = py::none(), py::arg("seqused_q") = py::none(),
          py::arg("seqused_k") = py::none(), py::arg("causal_top_left") = false,
          py::arg("dropout_p") = 0.0, py::arg("return_dropout_mask") = false);
    m.def("fwd", &fwd,
          "Forward attention over fixed-length sequences: (out, softmax_lse, dropout pattern, "
          "rng_state)",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("softmax_scale"), py::arg("causal"),
          py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("softcap") = 0.0,
          py::arg("alibi_slopes") = py::none(), py::arg("causal_top_left") = false,
          py::arg("dropout_p") = 0.0, py::arg("return_dropout_mask") = false);
    m.def("varlen_bwd", &varlen_bwd, "Gradients of varlen_fwd: returns (dq, dk, dv)",
          py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
          py::arg("softmax_lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
          py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("softmax_scale"),
          py::arg("causal"), py::arg("deterministic"), py::arg("softmax_lse_grad") = py::none(),
          py::arg("dq") = py::none(), py::arg("dk") = py::none(), py::arg("dv") = py::none(),
          py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("softcap") = 0.0,
          py::arg("alibi_slopes") = py::none(), py::arg("seqused_q") = py::none(),
          py::arg("seqused_k") = py::none(), py::arg("causal_top_left") = false,
          py::arg("dropout_p") = 0.0, py::arg("rng_state") = py::none());
    m.def("bwd", &bwd, "Gradients of fwd: returns (dq, dk, dv)", py::arg("dout"), py::arg("q"),
          py::arg("k"), py::arg("v"), py::arg("out"), py::arg("softmax_lse"),
          py::arg("softmax_scale"), py::arg("causal"), py::arg("deterministic"),
          py::arg("softmax_lse_grad") = py::none(), py::arg("dq") = py::none(),
          py::arg("dk") = py::none(), py::arg("dv") = py::none(), py::arg("window_left") = -1,
          py::arg("window_right") = -1, py::arg("softcap") = 0.0,
          py::arg("alibi_slopes") = py::none(), py::arg("causal_top_left") = false,
          py::arg("dropout_p") = 0.0, py::arg("rng_state") = py::none());
    m.def("compiled_kernels", &configs_of<FlashFwdParams>,
          "(dtype name, head-dim bucket) pairs this build has forward kernels for");
    m.def("compiled_backward_kernels", &configs_of<FlashBwdParams>,
          "(dtype name, head-dim bucket) pairs this build has backward kernels for");
    m.def("head_dim_buckets", &head_dim_buckets,
          "head-dim buckets the kernels know; a head dim runs in the smallest bucket >= it");
}
