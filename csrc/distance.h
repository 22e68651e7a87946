// Inner products between d-dimensional float32 vectors.
//
// One portable source: the loop is written for the compiler's vectoriser
// (`omp simd` allows the reassociation a float reduction needs), and GCC/Clang
// build an AVX2+FMA clone next to the baseline one, picked at load time from the
// CPU's features. No intrinsics, so non-x86 machines build the same file.
#pragma once

#include <cstddef>

namespace kvstore {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define KVSTORE_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#else
#define KVSTORE_MULTIVERSION
#endif

KVSTORE_MULTIVERSION
float dot(const float* a, const float* b, std::size_t d);

}  // namespace kvstore
