// Segmented mean (see kmeans_update.h): one warp per cluster, lane j owns the
// dims j, j + 32, ...; the warp walks the cluster's members in list order and
// reads each member row coalesced. Sums in double: the member order then does
// not change the float result, which matches the float64 torch reference.
#include "kmeans_update.h"

namespace kvstore {
namespace cluster {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kDimsPerLane = 4;  // dims a lane accumulates per pass over the members

template <typename T>
__global__ void __launch_bounds__(kThreads)
means_kernel(const T* __restrict__ x, const std::int64_t* __restrict__ order,
             const std::int64_t* __restrict__ offsets, long long K, int D, const float* __restrict__ fallback,
             const float* __restrict__ shift, long long shift_every, float* __restrict__ means) {
    const long long k = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (k >= K) return;
    const int lane = threadIdx.x % 32;
    const long long m0 = offsets[k];
    const long long m1 = offsets[k + 1];
    float* out = means + k * D;
    if (m1 <= m0) {
        for (int t = lane; t < D; t += 32) out[t] = fallback != nullptr ? fallback[k * D + t] : 0.0f;
        return;
    }
    const double cnt = static_cast<double>(m1 - m0);
    const float* sh = shift != nullptr ? shift + (k / shift_every) * D : nullptr;
    for (int t0 = 0; t0 < D; t0 += 32 * kDimsPerLane) {
        double acc[kDimsPerLane];
#pragma unroll
        for (int j = 0; j < kDimsPerLane; ++j) acc[j] = 0.0;
        for (long long m = m0; m < m1; ++m) {
            const T* row = x + order[m] * D;
#pragma unroll
            for (int j = 0; j < kDimsPerLane; ++j) {
                const int t = t0 + lane + 32 * j;
                if (t < D) acc[j] += static_cast<double>(to_float(row[t]));
            }
        }
#pragma unroll
        for (int j = 0; j < kDimsPerLane; ++j) {
            const int t = t0 + lane + 32 * j;
            if (t < D) {  // a division, as the reference; the shift subtracted in double too
                const double mean = acc[j] / cnt;
                out[t] = static_cast<float>(sh != nullptr ? mean - static_cast<double>(sh[t]) : mean);
            }
        }
    }
}


// A warp a cluster: lane j owns dims j, j + 32, ... of the key and value rows it moves.
template <typename T>
__global__ void __launch_bounds__(kThreads)
store_kernel(const T* __restrict__ k, const T* __restrict__ v, long long k_slot, long long v_slot, long long S,
             long long m, int C, int D, int Dv,
             const std::int64_t* __restrict__ order, const std::int64_t* __restrict__ offsets,
             const float* __restrict__ cen, T* __restrict__ out_k, T* __restrict__ out_v, long long out_rows,
             float* __restrict__ vsum, float* __restrict__ radii) {
    const long long sc = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (sc >= S * C) return;
    const int lane = threadIdx.x % 32;
    const long long s = sc / C, c = sc % C;
    const std::int64_t* off = offsets + s * (C + 1);
    const long long m0 = off[c], m1 = off[c + 1];
    const float* cc = cen + sc * D;
    const T* ks = k + s * k_slot;
    const T* vs = v + s * v_slot;
    T* ok = out_k + s * out_rows * D;
    T* ov = out_v + s * out_rows * Dv;
    float rad2 = 0.0f;
    for (long long i = m0; i < m1; ++i) {
        const long long r = order[s * m + i];
        float d2 = 0.0f;
        for (int t = lane; t < D; t += 32) {
            const T x = ks[r * D + t];
            ok[i * D + t] = x;
            const float dx = to_float(x) - cc[t];
            d2 += dx * dx;
        }
        for (int o = 16; o > 0; o >>= 1) d2 += __shfl_xor_sync(0xffffffffu, d2, o);
        rad2 = fmaxf(rad2, d2);
        for (int t = lane; t < Dv; t += 32) ov[i * Dv + t] = vs[r * Dv + t];
    }
    for (int t0 = 0; t0 < Dv; t0 += 32 * kDimsPerLane) {  // value sums: a second walk, dims in registers
        double acc[kDimsPerLane] = {};
        for (long long i = m0; i < m1; ++i) {
#pragma unroll
            for (int j = 0; j < kDimsPerLane; ++j) {
                const int t = t0 + lane + 32 * j;
                if (t < Dv) acc[j] += static_cast<double>(to_float(ov[i * Dv + t]));
            }
        }
#pragma unroll
        for (int j = 0; j < kDimsPerLane; ++j) {
            const int t = t0 + lane + 32 * j;
            if (t < Dv) vsum[sc * Dv + t] = static_cast<float>(acc[j]);
        }
    }
    if (lane == 0) radii[sc] = sqrtf(rad2);
}

}  // namespace

cudaError_t kmeans_means_launch(const void* x, DType dtype, const std::int64_t* order,
                                const std::int64_t* offsets, long long K, int D, const float* fallback,
                                const float* shift, long long shift_every, float* means, cudaStream_t stream) {
    if (K < 0 || D <= 0 || (shift != nullptr && shift_every <= 0)) return cudaErrorInvalidValue;
    if (K == 0) return cudaSuccess;
    const long long blocks = (K + kWarps - 1) / kWarps;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(blocks));
    switch (dtype) {
        case DType::F32:
            means_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(x), order, offsets, K, D,
                                                               fallback, shift, shift_every, means);
            break;
        case DType::F16:
            means_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(x), order, offsets, K, D,
                                                                fallback, shift, shift_every, means);
            break;
        case DType::BF16:
            means_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), order,
                                                                       offsets, K, D, fallback, shift, shift_every, means);
            break;
        default:
            return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

cudaError_t cluster_store_launch(const void* k, const void* v, long long k_slot, long long v_slot, DType dtype,
                                 long long S, long long m, int C, int D, int Dv, const std::int64_t* order, const std::int64_t* offsets, const float* cen,
                                 void* out_k, void* out_v, long long out_rows, float* vsum, float* radii,
                                 cudaStream_t stream) {
    if (S < 0 || m < 0 || C < 0 || D <= 0 || Dv <= 0 || out_rows < m || k_slot < m * D ||
        v_slot < m * Dv)
        return cudaErrorInvalidValue;
    if (S == 0 || C == 0) return cudaSuccess;
    const long long blocks = (S * C + kWarps - 1) / kWarps;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(blocks));
    switch (dtype) {
        case DType::F32:
            store_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(k), static_cast<const float*>(v),
                k_slot, v_slot, S, m, C, D, Dv, order, offsets, cen, static_cast<float*>(out_k),
                static_cast<float*>(out_v), out_rows, vsum, radii);
            break;
        case DType::F16:
            store_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(k),
                static_cast<const __half*>(v), k_slot, v_slot, S, m, C, D, Dv, order, offsets, cen,
                static_cast<__half*>(out_k), static_cast<__half*>(out_v), out_rows, vsum, radii);
            break;
        case DType::BF16:
            store_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(k),
                static_cast<const __nv_bfloat16*>(v), k_slot, v_slot, S, m, C, D, Dv, order, offsets, cen,
                static_cast<__nv_bfloat16*>(out_k), static_cast<__nv_bfloat16*>(out_v), out_rows, vsum, radii);
            break;
        default:
            return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

}  // namespace cluster
}  // namespace kvstore
