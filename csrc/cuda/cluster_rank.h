// Cluster ranking of the wave index's decode step (RetroInfer step 4,
// DESIGN.md "Wave index"): every query head of a KV head's group scores every
// centroid; the softmax over the clusters, summed over the group's heads,
// ranks the clusters.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cluster_common.cuh"

namespace kvstore {
namespace cluster {

// Limits of cluster_scores_launch (checked by it and by kvstore/gpu/cluster_ops.py).
constexpr int kRankMaxHg = 32;          // query heads per group
constexpr int kRankMaxHgTimesD = 8192;  // Hg * D (the queries live in shared memory as float)

// Floats of the workspace cluster_scores_launch needs: the per-tile softmax
// statistics, 2 * G * tiles * Hg.
long long cluster_scores_workspace_floats(int G, int Hg, int C);

// q [G, Hg, D] and centroids [G, C, D] of `dtype` (contiguous), sizes f32 [G, C]
// (0 = empty or padding cluster). Writes
//   scores f32 [G, Hg, C] = (q . c) * scale, -inf where size == 0, and
//   probs  f32 [G, C]     = sum_h softmax_c(scores[g, h, :])  (0 where every cluster of g is empty).
// The centroids are read once (16-byte loads when D * sizeof(dtype) % 16 == 0 and
// the pointers are 16-byte aligned). Two launches on `stream`.
cudaError_t cluster_scores_launch(const void* q, const void* centroids, const float* sizes, ScalarType dtype,
                                  int G, int Hg, int C, int D, float scale, float* scores, float* probs,
                                  float* workspace, cudaStream_t stream);

// The most clusters (r + e) cluster_select_launch can return on the current
// device (its shared memory holds them, padded to a power of two); 0 on error.
int cluster_select_max_k();

// probs f32 [G, C] -> ret int64 [G, r], est int64 [G, e]: the r + e largest
// probs of each row in descending order, ties by lower id (exactly the order
// of a stable descending argsort); ret gets the first r, est the next e.
// One block per row: a radix select of the (r + e)-th largest value, the
// selected keys compacted into shared memory and bitonic-sorted there.
// Needs 1 <= r + e <= min(C, cluster_select_max_k()). One launch on `stream`.
cudaError_t cluster_select_launch(const float* probs, int G, int C, int r, int e, std::int64_t* ret,
                                  std::int64_t* est, cudaStream_t stream);

}  // namespace cluster
}  // namespace kvstore
