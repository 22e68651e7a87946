// Exact scores of the candidate runs of a wave decode step (kvstore/gpu/cluster_ops.py candidate_scores): every
// query head of a slot's group scores every key row of the slot's runs, and each run's log-sum-exp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cluster_common.cuh"

namespace kvstore {
namespace cluster {

// Limits of candidate_scores_launch (checked by it and by kvstore/gpu/cluster_ops.py).
constexpr int kCandMaxHg = 32;          // query heads per group
constexpr int kCandMaxHgTimesD = 8192;  // Hg * D (the queries live in shared memory as float)

// q [G, Hg, D] and keys [rows, D] of `dtype` (contiguous); run_row, run_len, run_pos int64 [G, r] (device
// arrays): run j of slot g is keys rows [run_row, run_row + run_len), placed at positions
// [run_pos, run_pos + run_len) of the slot's list of `width` positions. Writes, for every run,
//   scores  f32 [G, Hg, width]: scores[g, h, run_pos + i] = (q[g, h] . keys[run_row + i]) * scale, and
//   run_lse f32 [G, Hg, r]:     log sum_i exp(those scores), -inf for an empty run.
// A run with run_len < 0, run_row < 0, run_pos < 0, run_row + run_len > rows or run_pos + run_len > width is
// skipped (nothing read or written for it) and gets run_lse NaN. Positions no run writes are left as they are:
// the caller fills scores with -inf first. One launch on `stream`: for int8 keys with bf16 / fp16 queries, D in
// {64, 128, 256} and Hg <= 16 on sm_80+, a tensor-core kernel over the rows of 64 runs a block; otherwise a warp per
// run, runs_per_block consecutive runs of a slot a block (0: the default, at most 4096), with 16-byte loads when
// D * sizeof(dtype) % 16 == 0 and keys is 16-byte aligned. Needs Hg <= kCandMaxHg, Hg * D <= kCandMaxHgTimesD,
// G * r < 2**31. With key_scale (f32 [rows], device), keys are int8 and row i scores
// (q . keys[i]) * key_scale[i] * scale.
cudaError_t candidate_scores_launch(const void* q, const void* keys, DType dtype, int G, int Hg, int D, int r,
                                    long long rows, const std::int64_t* run_row, const std::int64_t* run_len,
                                    const std::int64_t* run_pos, long long width, float scale, float* scores,
                                    float* run_lse, cudaStream_t stream, int runs_per_block = 0,
                                    const float* key_scale = nullptr);

}  // namespace cluster
}  // namespace kvstore
