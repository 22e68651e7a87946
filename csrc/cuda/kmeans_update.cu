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
             float* __restrict__ means) {
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
            if (t < D) out[t] = static_cast<float>(acc[j] / cnt);  // a division, as the reference
        }
    }
}

}  // namespace

cudaError_t kmeans_means_launch(const void* x, DType dtype, const std::int64_t* order,
                                const std::int64_t* offsets, long long K, int D, const float* fallback, float* means,
                                cudaStream_t stream) {
    if (K < 0 || D <= 0) return cudaErrorInvalidValue;
    if (K == 0) return cudaSuccess;
    const long long blocks = (K + kWarps - 1) / kWarps;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(blocks));
    switch (dtype) {
        case DType::F32:
            means_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(x), order, offsets, K, D,
                                                               fallback, means);
            break;
        case DType::F16:
            means_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(x), order, offsets, K, D,
                                                                fallback, means);
            break;
        case DType::BF16:
            means_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), order,
                                                                       offsets, K, D, fallback, means);
            break;
        default:
            return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

}  // namespace cluster
}  // namespace kvstore
