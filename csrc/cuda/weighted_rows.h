// Weighted sums of gathered rows (kvstore/gpu/cluster_ops.py weighted_rows): the exact tokens' values and the
// clusters' mean values of a wave decode step, weighted by attention weights already computed from their scores.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cluster_common.cuh"

namespace kvstore {
namespace cluster {

// Limits of weighted_rows_launch (checked by it and by kvstore/gpu/cluster_ops.py).
constexpr int kWeightedMaxDv = 256;

// w f32 [G, Hg, t], rows int64 [G, t], values [R, Dv] of `dtype` (all contiguous). Adds
//   out[g, h, :] += sum_i w[g, h, i] * values[rows[g, i], :]
// to out f32 [G, Hg, Dv] (the caller zeroes it). Rows outside [0, R) are skipped. One launch on `stream`; the
// blocks of a slot split its t rows and add their sums with atomics (the order of the additions varies). Needs
// 1 <= Dv <= kWeightedMaxDv and G < 65536.
cudaError_t weighted_rows_launch(const float* w, const std::int64_t* rows, const void* values, DType dtype, int G,
                                 int Hg, long long t, long long R, int Dv, float* out, cudaStream_t stream);

}  // namespace cluster
}  // namespace kvstore
