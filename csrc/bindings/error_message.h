// Error messages for the host-side checks, assembled without streaming numbers through
// std::ostream. Why: when the host compiler's libstdc++ headers are newer than the libstdc++ the
// process loads, and the link uses -Bsymbolic-functions (Python's default link flags on several
// distributions), `ostream << int` is instantiated inside this extension and bound to that copy,
// which then calls the older runtime's locale facets with a different layout and crashes. This
// was seen on the GPU build machine (/opt/gcc g++ with the system libstdc++): a narrowed build's
// "kernel not built" error segfaulted instead of raising. std::to_string and string appends
// need no locale facet.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <string>
#include <type_traits>

namespace flash_varlen {
namespace detail {

inline void append(std::string& out, const char* text) { out += text; }
inline void append(std::string& out, const std::string& text) { out += text; }
inline void append(std::string& out, bool value) { out += value ? "true" : "false"; }
inline void append(std::string& out, double value) { out += std::to_string(value); }
inline void append(std::string& out, c10::ScalarType type) { out += c10::toString(type); }
inline void append(std::string& out, const c10::Device& device) { out += device.str(); }
// A shape, written like torch.Size: [2, 3, 4].
inline void append(std::string& out, c10::IntArrayRef sizes) {
    out += "[";
    for (size_t i = 0; i < sizes.size(); ++i) {
        if (i > 0) out += ", ";
        out += std::to_string(sizes[i]);
    }
    out += "]";
}

template <typename Int,
          std::enable_if_t<std::is_integral_v<Int> && !std::is_same_v<Int, bool>, int> = 0>
void append(std::string& out, Int value) {
    out += std::to_string(value);
}

}  // namespace detail

// message("q must have ", 3, " dimensions, got ", 2) == "q must have 3 dimensions, got 2"
template <typename... Parts>
std::string message(const Parts&... parts) {
    std::string out;
    (detail::append(out, parts), ...);
    return out;
}

}  // namespace flash_varlen
