#include "distance.h"

namespace kvstore {

KVSTORE_MULTIVERSION
float dot(const float* __restrict a, const float* __restrict b, std::size_t d) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (std::size_t i = 0; i < d; ++i) s += a[i] * b[i];
    return s;
}

}  // namespace kvstore
