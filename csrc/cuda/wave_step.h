// The bookkeeping kernels of the wave decode step (kvstore/attention/selection.py wave_attend, kernel path):
// the zones a step reads (cuts of the rank order at token budgets), the exact tokens and the mixture weights
// once the candidates are scored, and the merge of the step's parts. Between them run the kernels that read the
// KV (cluster_scores, candidate_scores, weighted_rows); the merge attends the steady zone itself.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cluster_common.cuh"

namespace kvstore {
namespace cluster {

// Limits of the launchers below (checked by them and by the bindings).
constexpr int kStepMaxHg = 32;
constexpr int kStepMaxDv = 256;
constexpr int kStepMaxD = 256;

// The zone and mix kernels take each slot with a team of blocks (a thread block cluster on sm_90 and later) so
// that few slots still fill the GPU: `team` in their arguments is the team size, 0 for the launcher's choice (the
// largest power of two up to 16 with G * team blocks resident at once, 1 when that is below 4).
// The results do not depend on the team size except for float rounding of sums.
int wave_team_size(int G, int requested);

// For slot g: the clusters in rank order (probs descending, lower id first on ties) are cut
// where their sizes reach the candidate budget B (a cluster is a candidate when the sizes ranked ahead of it add
// up to less than B) and B + E (estimation zone: the next ones, up to B + E); empty clusters are never taken.
// The candidates ranked in the lower half (all but the best n_cand / 2) are the calibration clusters.
// Writes, in ascending cluster id:
//   cand int64 [G, r] (-1 pads), run_row / run_len / run_pos int64 [G, r] (rows of the candidates in keys, their
//   lengths and their exclusive prefix sum; pads: 0, 0 and the total), cand_low uint8 [G, r] (calibration
//   flag), est int64 [G, e] (-1 pads);
// and per head, with the log estimated mass x_hc = scores[g, h, c] + log(sizes[g, c]):
//   rest_lse f32 [G, Hg]: log-sum-exp of x over the non-empty clusters in neither zone,
//   low_lse f32 [G, Hg]: log-sum-exp of x over the calibration clusters.
// zone uint8 [G, C] is scratch. Budgets: budget int64 [G, 2] (B, E per slot) or nullptr for cand_tokens /
// est_tokens. Zones larger than r or e are cut to them (the caller sizes r and e from ClusterBounds).
struct ZoneArgs {
    const float* probs;
    const float* sizes;
    const float* scores;
    const std::int64_t* offsets;    // [G, C + 1]
    const std::int64_t* slot_base;  // [G]
    const std::int64_t* budget;     // [G, 2] or nullptr
    long long cand_tokens, est_tokens;
    int G, Hg, C, r, e;
    int team;  // blocks a slot (0: the launcher's choice)
    std::uint8_t* zone;
    std::int64_t* cand;
    std::int64_t* run_row;
    std::int64_t* run_len;
    std::int64_t* run_pos;
    std::uint8_t* cand_low;
    std::int64_t* est;
    float* rest_lse;
    float* low_lse;
};
cudaError_t wave_zones_launch(const ZoneArgs& a, cudaStream_t stream);

// After candidate_scores. With ref_h = the log-sum-exp of head h over every candidate
// (run_lse), the group weight of candidate position i is u_i = sum_h exp(tok_scores[g, h, i] - ref_h) (positions
// whose first head's score is not finite are not candidates). The T (tokens[g], or tokens_all; at most t) of
// largest u, lower position first on ties, are the exact tokens:
//   pick_rows int64 [G, t] (rows of keys/values, ascending; -1 pads), pick_local [G, t] (rows less slot_base),
//   pick_w f32 [G, Hg, t] = exp(score - ref_h), pick_d f32 [G, Hg] (their sum), pick_ref f32 [G, Hg] (ref_h, 0
//   where not finite), n_valid int64 [G] (candidate positions).
// The mixture of everything not attended exactly, one entry per candidate (its unattended exact mass), per
// estimation cluster (calibrated estimated mass) and the rest (calibrated rest_lse): with L_h its log-sum-exp,
//   mix_rows int64 [G, r + e] (g * C + cluster id, -1 pads), mix_w f32 [G, Hg, r + e] = exp(entry - L_h),
//   rest_w f32 [G, Hg], mix_lse f32 [G, Hg] = L_h.
// Calibration (calibrate != 0): offset_h = clamp(lse over the calibration candidates of run_lse - low_lse, +-8)
// (0 when not finite) added to the estimation and rest entries; rest == 0 drops the rest entry. u f32 [G, W],
// flag uint8 [G, W] and rowof int64 [G, W] are scratch.
struct MixArgs {
    const float* tok_scores;  // [G, Hg, W]
    const float* run_lse;     // [G, Hg, r]
    const std::int64_t* run_row;
    const std::int64_t* run_len;
    const std::int64_t* run_pos;
    const std::uint8_t* cand_low;
    const std::int64_t* cand;
    const std::int64_t* est;  // [G, e]
    const float* scores;      // [G, Hg, C]
    const float* sizes;       // [G, C]
    const float* rest_lse;
    const float* low_lse;
    const std::int64_t* slot_base;
    const std::int64_t* tokens;  // [G] or nullptr
    long long tokens_all;
    long long W;
    int G, Hg, C, r, e, t;
    int calibrate, rest;
    int team;  // blocks a slot (0: the launcher's choice)
    float* u;
    std::uint8_t* flag;
    std::int64_t* rowof;
    std::int64_t* pick_rows;
    std::int64_t* pick_local;
    float* pick_w;
    float* pick_d;
    float* pick_ref;
    std::int64_t* n_valid;
    std::int64_t* mix_rows;
    float* mix_w;
    float* rest_w;
    float* mix_lse;
};
cudaError_t wave_mix_launch(const MixArgs& a, cudaStream_t stream);

// The step's output from its parts: the exact tokens (pick_part f32 [G, pick_chunks, Hg, Dv]: weighted_rows
// partial sums, with pick_d, pick_ref), the mixture (mix_part f32 [G, mix_chunks, Hg, Dv] with rest_w x
// value_mean f32 [G, Dv], mix_lse) and the steady zone, attended here exactly: q [G, Hg, D] of q_dtype over rows
// [0, steady_len[g]) of steady_k [G, steady_cap, D] / steady_v [G, steady_cap, Dv] of kv_dtype (a length outside
// [0, steady_cap] makes the slot's output NaN); merged by log-sum-exp into o f32 [G, Hg, Dv] and lse f32 [G, Hg]
// (-inf and 0 when every part is empty). D <= kStepMaxD.
struct CombineArgs {
    const float* pick_part;
    long long pick_chunks;
    const float* mix_part;
    long long mix_chunks;
    const float* pick_d;
    const float* pick_ref;
    const float* mix_lse;
    const float* rest_w;
    const float* value_mean;
    const void* q;
    DType q_dtype;
    const void* steady_k;
    const void* steady_v;
    DType kv_dtype;
    const std::int64_t* steady_len;  // [G]
    long long steady_cap;
    int G, Hg, D, Dv;
    float scale;
    float* o;
    float* lse;
};
cudaError_t wave_combine_launch(const CombineArgs& a, cudaStream_t stream);

}  // namespace cluster
}  // namespace kvstore
