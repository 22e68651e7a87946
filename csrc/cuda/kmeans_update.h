// The two steps of the GPU segmented k-means (kvstore/gpu/kmeans.py).
// Update: the mean of each cluster's member rows, summed in double in a fixed
// order, so that the result is deterministic (no atomics) and equals the torch
// reference (index_add_ in float64) after rounding to float.
// Assignment: each row's best centroid on tensor cores, the scores kept in
// registers (never written to memory).
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
// shift f32 [K / shift_every, D] or null: a non-empty cluster's mean is
// float(sum / count - double(shift[k / shift_every])) (the mean of rows
// centred by their batch's shift, from the rows as stored).
// One launch on `stream` (a warp per cluster).
cudaError_t kmeans_means_launch(const void* x, DType dtype, const std::int64_t* order,
                                const std::int64_t* offsets, long long K, int D, const float* fallback,
                                const float* shift, long long shift_every, float* means, cudaStream_t stream);

// The index of clustered rows of S slots, in one pass over them: slot s has m rows k [m, D], v [m, Dv] (of
// `dtype`, rows contiguous, slot s at k + s * k_slot and v + s * v_slot elements) and C clusters, cluster c
// holding rows order[s, offsets[s, c] .. offsets[s, c + 1]) (int64, offsets [S, C + 1]), with centroid cen f32
// [S, C, D]. Writes the rows in cluster order, out_k[s * out_rows + i] = k[s, order[s, i]] (and out_v), each
// cluster's value sum vsum f32 [S, C, Dv]
// (summed in double in member order) and radius f32 [S, C] (the largest f32 distance of a member key from the
// centroid; 0 if empty). A warp a cluster; one launch.
cudaError_t cluster_store_launch(const void* k, const void* v, long long k_slot, long long v_slot, DType dtype,
                                 long long S, long long m, int C, int D, int Dv, const std::int64_t* order,
                                 const std::int64_t* offsets, const float* cen, void* out_k, void* out_v, long long out_rows, float* vsum, float* radii,
                                 cudaStream_t stream);

// Whether kmeans_assign_launch takes rows of `dtype` (bf16 or fp16) and D columns (64, 128 or 256) on the current
// device (sm_80 and later).
bool kmeans_assign_supported(DType dtype, int D);

// For each of the B batches: x [L, D] rows of `dtype`, centroids cen f32 [C, D], mu f32 [D]. With u_c the unit
// direction of centroid c (f64, rounded to f32) split into hi + lo of `dtype` (the split keeps f32 precision of
// u on 16-bit tensor cores), row l's score is x_l . (hi_c + lo_c) - mu . u_c (the score of the row centred by mu;
// products summed in f32). Writes best f32 [B, L] (the largest score) and arg int64 [B, L] (its centroid, the
// lowest id among equal scores). ncent int32 [B] or null: batch b has only centroids 0 .. ncent[b] - 1 (the
// others are never chosen). nterms 1: the score takes hi_c only (the direction rounded to `dtype`, half the
// tensor-core work). x contiguous and 16-byte aligned, cen and mu contiguous; C >= 1. Work space:
// terms [B, 2, C, D] of `dtype` (16-byte aligned) and bias f32 [B, C]. Two launches on `stream`.
cudaError_t kmeans_assign_launch(const void* x, const float* cen, const float* mu, const int* ncent, DType dtype,
                                 long long B, long long L, int C, int D, int nterms, void* terms, float* bias,
                                 float* best, std::int64_t* arg, cudaStream_t stream);

}  // namespace cluster
}  // namespace kvstore
