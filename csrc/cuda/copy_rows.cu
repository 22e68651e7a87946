// Copy kernel (see copy_rows.h): grid (M, blocks_per_run), one block (column)
// per run; each thread moves kUnroll words of W bytes per step, all loads
// issued before the stores so that many requests are in flight (zero-copy
// reads from host memory have microseconds of latency).
#include "copy_rows.h"

#include "cluster_common.cuh"

namespace kvstore {
namespace cluster {

namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 4;

template <int W>
struct Word;
template <>
struct Word<16> {
    using type = uint4;
};
template <>
struct Word<8> {
    using type = uint2;
};
template <>
struct Word<4> {
    using type = unsigned int;
};
template <>
struct Word<2> {
    using type = unsigned short;
};
template <>
struct Word<1> {
    using type = unsigned char;
};

template <typename V>
__device__ __forceinline__ void copy_range(V* __restrict__ dst, const V* __restrict__ src, long long n,
                                           long long first, long long stride) {
    long long i = first;
    for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
        V t[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) t[u] = src[i + u * stride];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) dst[i + u * stride] = t[u];
    }
    for (; i < n; i += stride) dst[i] = src[i];
}

template <int W>
__global__ void __launch_bounds__(kThreads)
copy_rows_kernel(char* __restrict__ dst_k, char* __restrict__ dst_v, const char* __restrict__ src_k,
                 const char* __restrict__ src_v, long long kb, long long vb, long long rows_dst, long long rows_src,
                 const std::int64_t* __restrict__ src_row, const std::int64_t* __restrict__ dst_row,
                 const std::int32_t* __restrict__ length) {
    using V = typename Word<W>::type;
    const int run = blockIdx.x;
    const long long s = src_row[run];
    const long long d = dst_row[run];
    const long long len = length[run];
    if (len <= 0 || s < 0 || d < 0 || s > rows_src - len || d > rows_dst - len) return;
    const long long first = static_cast<long long>(blockIdx.y) * kThreads + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.y) * kThreads;
    copy_range(reinterpret_cast<V*>(dst_k + d * kb), reinterpret_cast<const V*>(src_k + s * kb), len * kb / W, first,
               stride);
    if (vb > 0)
        copy_range(reinterpret_cast<V*>(dst_v + d * vb), reinterpret_cast<const V*>(src_v + s * vb), len * vb / W,
                   first, stride);
}

// Largest W in {16, 8, 4, 2, 1} dividing every address and row size.
int word_bytes(const void* a, const void* b, const void* c, const void* e, long long kb, long long vb) {
    const auto bits = reinterpret_cast<std::uintptr_t>(a) | reinterpret_cast<std::uintptr_t>(b) |
                      reinterpret_cast<std::uintptr_t>(c) | reinterpret_cast<std::uintptr_t>(e) |
                      static_cast<std::uintptr_t>(kb) | static_cast<std::uintptr_t>(vb);
    int w = 16;
    while (w > 1 && (bits % w) != 0) w /= 2;
    return w;
}

}  // namespace

cudaError_t copy_rows_launch(void* dst_k, void* dst_v, const void* src_k, const void* src_v, long long k_row_bytes,
                             long long v_row_bytes, long long rows_dst, long long rows_src,
                             const std::int64_t* src_row, const std::int64_t* dst_row, const std::int32_t* length,
                             int M, int blocks_per_run, cudaStream_t stream) {
    if (M < 0 || k_row_bytes <= 0 || v_row_bytes < 0 || rows_dst < 0 || rows_src < 0 || blocks_per_run < 1 ||
        blocks_per_run > 65535 || (v_row_bytes > 0 && (dst_v == nullptr || src_v == nullptr)))
        return cudaErrorInvalidValue;
    if (M == 0) return cudaSuccess;
    const void* dv = v_row_bytes > 0 ? dst_v : dst_k;
    const void* sv = v_row_bytes > 0 ? src_v : src_k;
    const int w = word_bytes(dst_k, dv, src_k, sv, k_row_bytes, v_row_bytes);
    const dim3 grid(M, blocks_per_run);
    auto* dk = static_cast<char*>(dst_k);
    auto* dvp = static_cast<char*>(dst_v);
    const auto* sk = static_cast<const char*>(src_k);
    const auto* svp = static_cast<const char*>(src_v);
#define KVSTORE_COPY_ROWS(W)                                                                                \
    copy_rows_kernel<W><<<grid, kThreads, 0, stream>>>(dk, dvp, sk, svp, k_row_bytes, v_row_bytes, rows_dst, \
                                                       rows_src, src_row, dst_row, length)
    switch (w) {
        case 16: KVSTORE_COPY_ROWS(16); break;
        case 8: KVSTORE_COPY_ROWS(8); break;
        case 4: KVSTORE_COPY_ROWS(4); break;
        case 2: KVSTORE_COPY_ROWS(2); break;
        default: KVSTORE_COPY_ROWS(1); break;
    }
#undef KVSTORE_COPY_ROWS
    return cudaGetLastError();
}

}  // namespace cluster
}  // namespace kvstore
