#include "kernels/common/kernel_registry.h"

namespace flash_varlen {

template <typename Params>
std::vector<KernelEntry<Params>>& kernel_table() {
    static std::vector<KernelEntry<Params>> table;
    return table;
}

template std::vector<KernelEntry<FlashFwdParams>>& kernel_table<FlashFwdParams>();
template std::vector<KernelEntry<FlashBwdParams>>& kernel_table<FlashBwdParams>();
template std::vector<KernelEntry<FlashDecodeParams>>& kernel_table<FlashDecodeParams>();

}  // namespace flash_varlen
