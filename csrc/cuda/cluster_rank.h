// Cluster ranking of the wave index's decode step (RetroInfer;
// docs/design.md "Selection"): every query head of a KV head's group scores every
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

// The finite-sample estimator (kvstore/gpu/estimation.py), fused into the scores: with key_sd set, the scores
// become q.c * scale + g_n(sigma), sigma = scale * |q_h| * key_sd[g, c], n = round(size), g_n interpolated in
// table [nmax + 1, J] (grid step `step`, inv_step = 1 / step; past the grid along slope[n]), and probs rank by
// the estimated mass: sum_h size * exp(score) / sum_c size * exp(score). Only the tensor-core path takes it
// (bf16 / fp16, D in {64, 128}, Hg <= 16, sm_80+, table + slope within 48 KB of shared memory); otherwise the
// launch returns cudaErrorInvalidValue.
struct FsArgs {
    const float* key_sd = nullptr;  // [G, C]; null: the plain centroid scores
    const float* table = nullptr;
    const float* slope = nullptr;
    int nmax = 0;
    int J = 0;
    float step = 0.0f;
    float inv_step = 0.0f;
};

// The radius term of the ranking (kvstore/attention/selection.py, step 1): with radii set, probs (and lse) are
// of the rank scores scores[g, h, c] + bonus_scale * q_bonus[g, h] * radii[g, c] (q_bonus = |q_h|, bonus_scale
// = rank_radius * scale); the scores written stay q.c * scale.
struct RadiusArgs {
    const float* q_bonus = nullptr;  // [G, Hg]
    const float* radii = nullptr;    // [G, C]; null: rank by the scores
    float bonus_scale = 1.0f;
};

// Floats of the workspace cluster_scores_launch needs: the per-tile softmax
// statistics, 2 * G * tiles * Hg.
long long cluster_scores_workspace_floats(int G, int Hg, int C);

// q [G, Hg, D] and centroids [G, C, D] of `dtype` (contiguous), sizes f32 [G, C]
// (0 = empty or padding cluster). Writes
//   scores f32 [G, Hg, C] = (q . c) * scale, -inf where size == 0, and
//   probs  f32 [G, C]     = sum_h softmax_c(scores[g, h, :])  (0 where every cluster of g is empty),
//   lse    f32 [G, Hg]    = log sum_c exp(scores[g, h, c]) (with fs: of size * exp), when lse is not null.
// The centroids are read once (16-byte loads when D * sizeof(dtype) % 16 == 0 and
// the pointers are 16-byte aligned; on sm_80+ bf16/fp16 with D in {64, 128}
// and Hg <= 16 multiply on the tensor cores). Two launches on `stream`.
// With centroid_scale f32 [G, C] the centroids are int8 and cluster c scores (q . c_int8) * centroid_scale[g, c]
// * scale; only the tensor-core path takes them (as fs above), otherwise cudaErrorInvalidValue.
cudaError_t cluster_scores_launch(const void* q, const void* centroids, const float* sizes, DType dtype,
                                  int G, int Hg, int C, int D, float scale, float* scores, float* probs,
                                  float* workspace, cudaStream_t stream, const FsArgs* fs = nullptr,
                                  float* lse = nullptr, const RadiusArgs* radius = nullptr,
                                  const float* centroid_scale = nullptr);

// probs f32 [G, C] -> ret int64 [G, r], est int64 [G, e]: the r + e largest
// probs of each row under the order "prob descending, lower id first on ties"
// (the set a stable descending argsort puts first); ret gets the first r of
// that order, est the next e, each zone in ascending id order. One block per
// row: two radix selects (the r-th and the (r + e)-th key) and a compaction
// in id order, no sort. Needs 1 <= r + e <= C. One launch on `stream`.
cudaError_t cluster_select_launch(const float* probs, int G, int C, int r, int e, std::int64_t* ret,
                                  std::int64_t* est, cudaStream_t stream);

}  // namespace cluster
}  // namespace kvstore
