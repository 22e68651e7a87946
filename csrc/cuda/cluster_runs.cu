// See cluster_runs.h.
#include "cluster_runs.h"

namespace kvstore {
namespace cluster {

namespace {

constexpr int kRunThreads = 256;

__global__ void __launch_bounds__(kRunThreads)
cluster_runs_kernel(const std::int64_t* __restrict__ ids, long long total, int r, const std::int64_t* __restrict__ offsets,
                    long long C, const std::int64_t* __restrict__ base, const std::int64_t* __restrict__ head_row,
                    const std::int32_t* __restrict__ head_len, std::int64_t* __restrict__ row,
                    std::int32_t* __restrict__ len) {
    const long long i = static_cast<long long>(blockIdx.x) * kRunThreads + threadIdx.x;  // over G * (r + 1)
    if (i >= total) return;
    const long long g = i / (r + 1), j = i % (r + 1);
    if (j == 0) {
        row[i] = head_row[g];
        len[i] = head_len[g];
        return;
    }
    const std::int64_t c = ids[g * r + j - 1];
    if (c < 0 || c >= C) {
        row[i] = 0;
        len[i] = 0;
        return;
    }
    const std::int64_t* o = offsets + g * (C + 1);
    const std::int64_t s = o[c];
    row[i] = base[g] + s;
    len[i] = static_cast<std::int32_t>(o[c + 1] - s);
}

}  // namespace

cudaError_t cluster_runs_launch(const std::int64_t* ids, int G, int r, const std::int64_t* offsets, long long C,
                                const std::int64_t* base, const std::int64_t* head_row, const std::int32_t* head_len,
                                std::int64_t* row, std::int32_t* len, cudaStream_t stream) {
    if (G < 0 || r < 0 || C < 0) return cudaErrorInvalidValue;
    const long long total = static_cast<long long>(G) * (r + 1);
    if (total == 0) return cudaSuccess;
    const long long blocks = (total + kRunThreads - 1) / kRunThreads;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    cluster_runs_kernel<<<static_cast<unsigned>(blocks), kRunThreads, 0, stream>>>(ids, total, r, offsets, C, base,
                                                                                  head_row, head_len, row, len);
    return cudaGetLastError();
}

}  // namespace cluster
}  // namespace kvstore
