// Text for the values in error messages of the bindings. The messages are built from strings only: streaming
// integers, sizes or devices through c10::str crashed instead of raising with some torch builds.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace kvstore_bindings {

template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
std::string text(T x) {
    return std::to_string(x);
}

inline std::string text(const c10::Device& d) { return d.str(); }

inline std::string text(c10::ScalarType t) { return c10::toString(t); }

// "[a, b, ...]"
inline std::string text(c10::IntArrayRef shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

inline std::string text(const std::vector<int64_t>& shape) { return text(c10::IntArrayRef(shape)); }

}  // namespace kvstore_bindings
