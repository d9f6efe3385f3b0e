// TMA descriptor extents shared by the sm90 family's launchers.
#pragma once

#include <algorithm>
#include <cstdint>

namespace flash_varlen {
namespace sm90 {

// TMA descriptors take 32-bit extents of at least 1: an empty buffer (every key sequence empty)
// still gets a valid descriptor, which no load then uses (every row block sees no key block).
inline int32_t tma_extent(int64_t extent) {
    return int32_t(std::max<int64_t>(extent, 1));
}

}  // namespace sm90
}  // namespace flash_varlen
