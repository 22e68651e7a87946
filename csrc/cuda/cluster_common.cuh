// Device helpers of the cluster kernels (cluster_rank.cu, copy_rows.cu,
// kmeans_update.cu) on top of cuda_common.cuh (dtype enum, conversions, warp
// reductions): 16-byte vector loads converted to float, online softmax
// statistics. CUDA headers only (no torch); the device part is hidden from
// host compilers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_common.cuh"

namespace kvstore {
namespace cluster {

using namespace gpu;  // DType, dtype_size, is_aligned, to_float, warp reductions

#ifdef __CUDACC__  // device code: the headers of the launchers are also read by the host compiler (bindings)

// Elements of T in one 16-byte vector.
template <typename T>
struct Vec16 {
    static constexpr int kN = 16 / static_cast<int>(sizeof(T));
};

// out[0..N) = float(p[0..N)), N elements of T read as one load when N * sizeof(T) == 16
// (p must then be 16-byte aligned) or element by element otherwise.
template <typename T, int N>
__device__ __forceinline__ void load_float(const T* __restrict__ p, float (&out)[N]) {
    if constexpr (N * sizeof(T) == 16) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
        if constexpr (sizeof(T) == 4) {
            out[0] = __uint_as_float(raw.x);
            out[1] = __uint_as_float(raw.y);
            out[2] = __uint_as_float(raw.z);
            out[3] = __uint_as_float(raw.w);
        } else {
            const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                T lo, hi;
                const unsigned short blo = static_cast<unsigned short>(w[i] & 0xffffu);
                const unsigned short bhi = static_cast<unsigned short>(w[i] >> 16);
                memcpy(&lo, &blo, 2);
                memcpy(&hi, &bhi, 2);
                out[2 * i] = to_float(lo);
                out[2 * i + 1] = to_float(hi);
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_float(p[i]);
    }
}

// Online softmax statistics: (m, l) with l = sum exp(s - m); m = -inf, l = 0 for an empty set.
struct MaxSum {
    float m;
    float l;
};

// Adds one value v to the statistics (-inf: nothing).
__device__ __forceinline__ void maxsum_push(MaxSum& s, float v) {
    if (v == -INFINITY) return;
    if (v > s.m) {
        s.l = s.l * __expf(s.m - v) + 1.0f;
        s.m = v;
    } else {
        s.l += __expf(v - s.m);
    }
}

__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, 0.0f};
    return {m, a.l * __expf(a.m - m) + b.l * __expf(b.m - m)};
}

#endif  // __CUDACC__

}  // namespace cluster
}  // namespace kvstore
