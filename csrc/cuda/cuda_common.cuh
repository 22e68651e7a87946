// Small helpers shared by every CUDA kernel of kvstore (namespace kvstore::gpu,
// visible in kvstore::attn and kvstore::cluster): the dtype enum of the
// launchers, raw vector loads converted to float, warp reductions.
// CUDA headers only (no torch). The device part is compiled only by nvcc, so
// host C++ (the torch bindings) may include this header for DType.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace kvstore {
namespace gpu {

// Element type of a floating input or output.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

inline bool is_aligned(const void* p, std::size_t bytes) {
    return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

#if defined(__CUDACC__)

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// The element type behind a DType.
template <DType DT>
struct ElemOf;
template <>
struct ElemOf<DType::F32> {
    using type = float;
};
template <>
struct ElemOf<DType::F16> {
    using type = __half;
};
template <>
struct ElemOf<DType::BF16> {
    using type = __nv_bfloat16;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(std::int8_t x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N elements of T held as raw 32-bit words, so that the loads of several rows
// can be issued before any of them is converted. N * sizeof(T) must be a
// multiple of 4 (always true here: D, Dv are multiples of 64).
template <typename T, int N>
struct Raw {
    static constexpr int kBytes = N * static_cast<int>(sizeof(T));
    static_assert(kBytes % 4 == 0, "raw vectors are whole 32-bit words");
    static constexpr int kWords = kBytes / 4;
    unsigned w[kWords];
};

// Loads N elements at p with the widest vector that the size allows (16, 8 or
// 4 bytes). p must be aligned to min(16, N * sizeof(T)) bytes.
template <typename T, int N>
__device__ __forceinline__ void load_raw(const T* p, Raw<T, N>& r) {
    constexpr int kW = Raw<T, N>::kWords;
    if constexpr (kW % 4 == 0) {
#pragma unroll
        for (int i = 0; i < kW / 4; ++i) {
            const uint4 x = reinterpret_cast<const uint4*>(p)[i];
            r.w[4 * i] = x.x;
            r.w[4 * i + 1] = x.y;
            r.w[4 * i + 2] = x.z;
            r.w[4 * i + 3] = x.w;
        }
    } else if constexpr (kW % 2 == 0) {
#pragma unroll
        for (int i = 0; i < kW / 2; ++i) {
            const uint2 x = reinterpret_cast<const uint2*>(p)[i];
            r.w[2 * i] = x.x;
            r.w[2 * i + 1] = x.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < kW; ++i) r.w[i] = reinterpret_cast<const unsigned*>(p)[i];
    }
}

template <typename T, int N>
__device__ __forceinline__ void zero_raw(Raw<T, N>& r) {
#pragma unroll
    for (int i = 0; i < Raw<T, N>::kWords; ++i) r.w[i] = 0u;
}

template <typename T, int N>
__device__ __forceinline__ void raw_to_float(const Raw<T, N>& r, float (&out)[N]) {
    if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = __uint_as_float(r.w[i]);
    } else if constexpr (std::is_same<T, __half>::value) {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) {
            __half2 h;
            memcpy(&h, &r.w[i], 4);
            const float2 f = __half22float2(h);
            out[2 * i] = f.x;
            out[2 * i + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) {
            __nv_bfloat162 h;
            memcpy(&h, &r.w[i], 4);
            const float2 f = __bfloat1622float2(h);
            out[2 * i] = f.x;
            out[2 * i + 1] = f.y;
        }
    }
}

// Sum / max over each aligned group of kWidth lanes (kWidth a power of two <= 32);
// every lane of the group gets the result.
template <int kWidth>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = kWidth / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return group_sum<32>(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
    return v;
}

// The stabiliser of an online softmax whose running max is m: 0 while nothing
// was seen (m = -inf), so that exp2(x - stabiliser) never computes -inf - -inf.
__device__ __forceinline__ float safe_max(float m) { return m == neg_inf() ? 0.0f : m; }

#endif  // __CUDACC__

}  // namespace gpu

namespace attn {
using namespace gpu;
}  // namespace attn
}  // namespace kvstore
