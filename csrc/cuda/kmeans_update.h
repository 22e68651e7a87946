// The centroid update of the GPU segmented k-means (kvstore/gpu/kmeans.py):
// the mean of each cluster's member rows, summed in double in a fixed order,
// so that the result is deterministic (no atomics) and equals the torch
// reference (index_add_ in float64) after rounding to float.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cluster_common.cuh"

namespace kvstore {
namespace cluster {

// x: rows [R, D] of `dtype` (contiguous). The K clusters' members are listed
// cluster after cluster: cluster k is x rows order[offsets[k] .. offsets[k+1]),
// order int64 [offsets[K]], offsets int64 [K + 1] non-decreasing (device arrays).
// Writes means f32 [K, D]: float(sum_members double(x) / count); an empty
// cluster gets row k of `fallback` f32 [K, D] when it is not null, else zeros.
// One launch on `stream` (a warp per cluster).
cudaError_t kmeans_means_launch(const void* x, DType dtype, const std::int64_t* order,
                                const std::int64_t* offsets, long long K, int D, const float* fallback, float* means,
                                cudaStream_t stream);

}  // namespace cluster
}  // namespace kvstore
