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
constexpr int kWeightedMaxJobs = 2;

// One weighted sum: w f32 [G, Hg, t], rows int64 [G, t], values [R, Dv] (all contiguous); writes the partial sums
//   partial[g, c, h, :] = sum over the rows i of chunk c of w[g, h, i] * values[rows[g, i], :]
// into partial f32 [G, chunks, Hg, Dv] (the caller sums over c: out[g, h] = sum_i w[g, h, i] values[rows[g, i]]).
// Rows outside [0, R) are skipped.
struct WeightedJob {
    const float* w;
    const std::int64_t* rows;
    const void* values;
    long long t, R;
    float* partial;
};

// The chunks of a job of t rows a slot launched with jobs of t_all rows a slot in all (its own included);
// aligned: every job's values are 16-byte aligned.
long long weighted_rows_chunks(int G, int Hg, long long t, long long t_all, int Dv, DType dtype, bool aligned);
// 1 to kWeightedMaxJobs jobs of one G, Hg, Dv and values dtype in one launch on `stream` (their blocks run side
// by side). Needs 1 <= Dv <= kWeightedMaxDv and G < 65536.
cudaError_t weighted_rows_launch(const WeightedJob* jobs, int n_jobs, DType dtype, int G, int Hg, int Dv,
                                 cudaStream_t stream);

}  // namespace cluster
}  // namespace kvstore
