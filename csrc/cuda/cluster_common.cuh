// Device helpers of the cluster kernels (cluster_rank.cu, candidate_scores.cu,
// copy_rows.cu, kmeans_update.cu) on top of cuda_common.cuh (dtype enum,
// conversions, warp reductions): 16-byte vector loads converted to float,
// queries in shared memory and their dot products with rows read by lane
// groups, online softmax statistics. CUDA headers only (no torch); the device
// part is hidden from host compilers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_common.cuh"

namespace kvstore {
namespace cluster {

using namespace gpu;  // DType, dtype_size, is_aligned, to_float, warp reductions

#ifdef __CUDACC__  // device code: the headers of the launchers are also read by the host compiler (bindings)

// c += a b for one mma.m16n8k16 (sm_80+; bf16 or fp16 inputs, f32 accumulators): a holds the A fragment of
// rows (g, g + 8) and b0, b1 the B fragment of column g, lane (g, t) = (lane / 4, lane % 4), in PTX's layout.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
}

// The A fragments of the group's query rows for mma_16816 over D = 32 NJ channels: qa[j] (qb[j]) is chunk
// 4 j + t (8 elements) of head gr (gr + 8) of qg [Hg, D], zero past Hg (qb only when kTwoRows), lane (gr, t).
template <typename T, int NJ, bool kTwoRows>
__device__ __forceinline__ void load_query_fragments(const T* qg, int Hg, int D, int gr, int t, uint4 (&qa)[NJ],
                                                     uint4 (&qb)[NJ]) {
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        qa[j] = gr < Hg ? __ldg(reinterpret_cast<const uint4*>(qg + gr * D + (4 * j + t) * 8))
                        : make_uint4(0u, 0u, 0u, 0u);
        qb[j] = (kTwoRows && gr + 8 < Hg) ? __ldg(reinterpret_cast<const uint4*>(qg + (gr + 8) * D + (4 * j + t) * 8))
                                          : make_uint4(0u, 0u, 0u, 0u);
    }
}

// acc += the query fragments (qa, qb) of one 16-byte chunk times the 8 16-bit values b of the same chunk of a row:
// two mma_16816 (words 0, 1 and words 2, 3).
template <typename T>
__device__ __forceinline__ void mma_chunk(float (&acc)[4], const uint4& qa, const uint4& qb, const uint4& b) {
    const unsigned a0[4] = {qa.x, qb.x, qa.y, qb.y};
    mma_16816<T>(acc, a0, b.x, b.y);
    const unsigned a1[4] = {qa.z, qb.z, qa.w, qb.w};
    mma_16816<T>(acc, a1, b.z, b.w);
}

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
        if constexpr (sizeof(T) == 1) {
            // int8 bytes biased to unsigned, placed in the mantissa of 2^23 (no integer-to-float instructions)
            const unsigned w[4] = {raw.x ^ 0x80808080u, raw.y ^ 0x80808080u, raw.z ^ 0x80808080u,
                                   raw.w ^ 0x80808080u};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int b = 0; b < 4; ++b)
                    out[4 * i + b] = __uint_as_float(__byte_perm(w[i], 0x4B000000u, 0x7540u + b)) - 8388736.0f;
        } else if constexpr (sizeof(T) == 4) {
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

// Query heads staged in shared memory as float for rows read in chunks of kVec elements (D = nch * kVec). With
// 16-byte chunks the k-th float4 of every chunk lies in plane k of its head, so that the lanes of a group, reading
// consecutive chunks, read consecutive float4s (no bank conflicts). n = heads * D elements of q; the caller syncs.
template <typename T, int kVec>
__device__ __forceinline__ void stage_queries(const T* __restrict__ q, int n, int D, float* qs) {
    const int nch = D / kVec;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int d = i % D, ch = d / kVec, e = d % kVec;
        const int at = kVec % 4 == 0 ? ((e / 4) * nch + ch) * 4 + e % 4 : d;
        qs[i - d + at] = to_float(q[i]);
    }
}

// qv = chunk ch of the head staged at qh (16-byte aligned when kVec % 4 == 0).
template <int kVec>
__device__ __forceinline__ void load_q_chunk(const float* qh, int ch, int nch, float (&qv)[kVec]) {
    if constexpr (kVec % 4 == 0) {
#pragma unroll
        for (int k = 0; k < kVec / 4; ++k) {
            const float4 t = reinterpret_cast<const float4*>(qh)[k * nch + ch];
            qv[4 * k] = t.x;
            qv[4 * k + 1] = t.y;
            qv[4 * k + 2] = t.z;
            qv[4 * k + 3] = t.w;
        }
    } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) qv[e] = qh[ch * kVec + e];
    }
}

// Dot products of kU rows with kHb heads h0.. of the queries staged at qs, each row read by the kLpr lanes of a
// lane group, kChunks chunks a lane in flight (lane li takes chunks li, li + kLpr, ...): acc[u][h] = this lane's
// part of row u . head h0 + h (0 for heads >= Hg); the sum over the group (group_sum, group_reduce_scatter) is the
// dot product. row(u) is row u's first element, nullptr for no row.
template <typename T, int kVec, int kLpr, int kChunks, int kU, int kHb, typename RowPtr>
__device__ __forceinline__ void rows_dot_heads(float (&acc)[kU][kHb], const float* qs, int D, int h0, int Hg, int li,
                                               RowPtr row) {
    const int nch = D / kVec;
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int h = 0; h < kHb; ++h) acc[u][h] = 0.0f;
    for (int c0 = li; c0 < nch; c0 += kChunks * kLpr) {
        float x[kU][kChunks][kVec];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const T* p = row(u);
#pragma unroll
            for (int c = 0; c < kChunks; ++c) {
                const int ch = c0 + c * kLpr;
                if (p != nullptr && ch < nch) {
                    load_float<T, kVec>(p + ch * kVec, x[u][c]);
                } else {
#pragma unroll
                    for (int e = 0; e < kVec; ++e) x[u][c][e] = 0.0f;
                }
            }
        }
#pragma unroll
        for (int h = 0; h < kHb; ++h) {
            if (h0 + h >= Hg) break;
#pragma unroll
            for (int c = 0; c < kChunks; ++c) {
                const int ch = c0 + c * kLpr;
                if (ch >= nch) break;
                float qv[kVec];
                load_q_chunk<kVec>(qs + (h0 + h) * D, ch, nch, qv);
#pragma unroll
                for (int u = 0; u < kU; ++u)
#pragma unroll
                    for (int e = 0; e < kVec; ++e) acc[u][h] = fmaf(x[u][c][e], qv[e], acc[u][h]);
            }
        }
    }
}

// Sums over each aligned group of kLpr lanes of the N values v of every lane (N, kLpr powers of two), scattered
// over the group: lane li ends with the sums of values [v0, v0 + M) in v[0, M), M = max(N / kLpr, 1), where
// v0 = li * M when N >= kLpr, else v0 = li / (kLpr / N) (kLpr / N lanes then hold each sum). log2(kLpr) steps that
// halve the values a lane holds: about N shuffles instead of the N log2(kLpr) of N group_sums.
template <int kLpr, int kN = 0, int N>
__device__ __forceinline__ void group_reduce_scatter(float (&v)[N], int li) {
    constexpr int n = kN == 0 ? N : kN;  // values still held
    if constexpr (kLpr > 1) {
        constexpr int o = kLpr / 2;
        if constexpr (n == 1) {
            v[0] += __shfl_xor_sync(kFullMask, v[0], o);
        } else {
            const bool upper = (li & o) != 0;  // keep the upper half, send the lower one
#pragma unroll
            for (int i = 0; i < n / 2; ++i) {
                const float send = upper ? v[i] : v[i + n / 2];
                const float keep = upper ? v[i + n / 2] : v[i];
                v[i] = keep + __shfl_xor_sync(kFullMask, send, o);
            }
        }
        group_reduce_scatter<o, n == 1 ? 1 : n / 2>(v, li);
    }
}

// Online softmax statistics: (m, l) with l = sum exp(s - m); m = -inf, l = 0 for an empty set.
struct MaxSum {
    float m;
    float l;
};

// exp as the statistics take it: the fast intrinsic, or (kAccurate) expf where the weights are outputs.
template <bool kAccurate>
__device__ __forceinline__ float maxsum_exp(float x) {
    if constexpr (kAccurate) {
        return expf(x);
    } else {
        return __expf(x);
    }
}

// Adds one value v to the statistics (-inf: nothing; NaN makes l NaN).
template <bool kAccurate = false>
__device__ __forceinline__ void maxsum_push(MaxSum& s, float v) {
    if (v == -INFINITY) return;
    if (v > s.m) {
        s.l = s.l * maxsum_exp<kAccurate>(s.m - v) + 1.0f;
        s.m = v;
    } else {
        s.l += maxsum_exp<kAccurate>(v - s.m);
    }
}

// Merged statistics; two empty sets give an empty one (kAccurate: a NaN l of either is kept).
template <bool kAccurate = false>
__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, kAccurate ? a.l + b.l : 0.0f};
    return {m, a.l * maxsum_exp<kAccurate>(a.m - m) + b.l * maxsum_exp<kAccurate>(b.m - m)};
}

// The statistics st[0], st[stride], ..., st[(n - 1) * stride] merged into one.
__device__ __forceinline__ MaxSum maxsum_merge_strided(const MaxSum* st, int n, int stride) {
    MaxSum s{-INFINITY, 0.0f};
    for (int i = 0; i < n; ++i) s = maxsum_merge(s, st[i * stride]);
    return s;
}

// Eight int8 elements of a centroid or key row (one 8-byte chunk, element 0 in the low byte) as the four words of
// 16-bit pairs the MMA takes. No integer-to-float conversions (a quarter-rate instruction): each byte, offset by 128,
// becomes the mantissa of a float of a fixed exponent, and the offset is subtracted (exact for |x| <= 255).
template <typename T>
__device__ __forceinline__ uint4 i8x8_to_pairs(uint2 w) {
    const unsigned u[2] = {w.x ^ 0x80808080u, w.y ^ 0x80808080u};  // x + 128 in every byte
    unsigned out[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const unsigned word = u[p / 2];
        const unsigned b0 = 2 * (p % 2), b1 = b0 + 1;                    // the pair's bytes in the word
        if constexpr (std::is_same<T, __nv_bfloat16>::value) {
            // 2^23 + (x + 128) as float, minus 2^23 + 128: x; small integers are exact in bf16, which is
            // the top half of the float
            const float a = __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7540u + b0)) - 8388736.0f;
            const float b = __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7540u + b1)) - 8388736.0f;
            out[p] = __byte_perm(__float_as_uint(a), __float_as_uint(b), 0x7632u);
        } else {
            // halves 1024 + (x + 128) (exponent 10, the byte in the low mantissa bits), minus 1152
            const unsigned h = __byte_perm(word, 0x64646464u, 0x5040u + b0 + (b1 << 8));
            const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&h), __float2half2_rn(1152.0f));
            out[p] = *reinterpret_cast<const unsigned*>(&v);
        }
    }
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// A device attribute of the current device, cached per device (0 on error).
template <cudaDeviceAttr kAttr>
int device_attribute() {
    constexpr int kMaxDevices = 64;
    static std::atomic<int> cached[kMaxDevices] = {};  // 0: not known yet
    int dev = 0, value = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    if (dev >= 0 && dev < kMaxDevices && cached[dev].load() != 0) return cached[dev].load();
    if (cudaDeviceGetAttribute(&value, kAttr, dev) != cudaSuccess) return 0;
    if (dev >= 0 && dev < kMaxDevices) cached[dev].store(value);
    return value;
}

// The PTX architecture (e.g. 90) that `kernel` runs from on the current device, cached per device in `cache`
// (0 on error). A body guarded by __CUDA_ARCH__ is empty when the device runs the kernel from older PTX (an
// extension built for 8.0+PTX on an H100), so the launchers check this, not only the compute capability.
template <typename Kernel>
int ptx_version(Kernel kernel, std::atomic<int>* cache) {
    constexpr int kMaxDevices = 64;
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    if (dev >= 0 && dev < kMaxDevices && cache[dev].load() != 0) return cache[dev].load();
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return 0;
    if (dev >= 0 && dev < kMaxDevices) cache[dev].store(attr.ptxVersion);
    return attr.ptxVersion;
}

#endif  // __CUDACC__

}  // namespace cluster
}  // namespace kvstore
