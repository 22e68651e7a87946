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

// w f32 [G, Hg, t], rows int64 [G, t], values [R, Dv] of `dtype` (all contiguous). Writes the partial sums
//   partial[g, c, h, :] = sum over the rows i of chunk c of w[g, h, i] * values[rows[g, i], :]
// into partial f32 [G, chunks, Hg, Dv], chunks = weighted_rows_chunks(...) (the caller sums over c: out[g, h] =
// sum_i w[g, h, i] values[rows[g, i]]). Rows outside [0, R) are skipped. One launch on `stream`. Needs
// 1 <= Dv <= kWeightedMaxDv and G < 65536.
long long weighted_rows_chunks(int G, long long t, int Dv, DType dtype, const void* values);
cudaError_t weighted_rows_launch(const float* w, const std::int64_t* rows, const void* values, DType dtype, int G,
                                 int Hg, long long t, long long R, int Dv, float* partial, cudaStream_t stream);

}  // namespace cluster
}  // namespace kvstore
