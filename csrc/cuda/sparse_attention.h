// Sparse decode attention over lists of row runs, merged with the wave
// index's estimation zone (docs/design.md "Wave index", "Merging partial
// attentions"). Plain C++ interface (raw pointers, cudaStream_t), so the torch
// bindings compile it with the host compiler.
//
// One launch on the stream:
//     partials, grid (G, num_splits + est_splits), 128 threads: block (g, s)
//     with s < num_splits attends exactly over the s-th of num_splits equal
//     chunks of slot g's rows (its runs, concatenated in order); block
//     (g, num_splits + e) attends over the e-th chunk of slot g's estimation
//     clusters. Each writes a normalised partial (o, log2-sum-exp) per query
//     head to the workspace.
//     The last block of slot g to finish (counted in counters[g]) merges the
//     slot's partials by log-sum-exp into o (output dtype) and lse (natural
//     log), one warp a head, and resets counters[g] to zero.
//
// Guards instead of host checks (the run table lives on the device): a run
// whose source, row or length is out of range, offsets that are not a valid
// CSR, or an estimation id outside [0, C) is never dereferenced; it turns its
// slot's o and lse into NaN. Values are not checked for NaN.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"

namespace kvstore {
namespace attn {

constexpr int kMaxSources = 4;     // (k, v) tables a run table can point into
constexpr int kMaxGroup = 16;      // query heads per slot (Hg)
constexpr int kMaxSplits = 1024;   // num_splits + est_splits
constexpr int kAttnThreads = 128;  // threads of a partial block

struct SparseAttentionArgs {
    DType dtype = DType::BF16;  // of q, every k, v and the output o
    int G = 0;                  // head slots (batch * KV heads)
    int Hg = 0;                 // query heads per slot, 1..kMaxGroup
    int D = 0;                  // key dim, 64 or 128
    int Dv = 0;                 // value dim, 64 or 128
    float scale = 0.0f;         // softmax scale of q.k

    const void* q = nullptr;  // [G, Hg, D]

    // Sources: k [rows, D], v [rows, Dv], row-major, 16-byte aligned; device
    // pointers (pinned host memory through its device pointer = zero-copy).
    int num_sources = 0;
    const void* k[kMaxSources] = {};
    const void* v[kMaxSources] = {};
    int64_t rows[kMaxSources] = {};

    // CSR run table: runs of slot g are run_offsets[g] .. run_offsets[g + 1].
    int64_t num_runs = 0;
    const int32_t* run_src = nullptr;      // [num_runs] source of the run
    const int64_t* run_row = nullptr;      // [num_runs] first row
    const int32_t* run_len = nullptr;      // [num_runs] rows (0 allowed)
    const int32_t* run_offsets = nullptr;  // [G + 1]
    int num_splits = 1;                    // exact-attention blocks per slot, >= 1

    // Estimation zone (est_splits = 0 or E = 0: none). Scores are q.c * scale
    // in natural units; a cluster i with size_i > 0 adds size_i * exp(s_i) to
    // the normaliser and exp(s_i) * value_sum_i to the numerator.
    int64_t C = 0;                          // clusters per slot
    int64_t E = 0;                          // estimation clusters per slot
    int est_splits = 0;                     // estimation blocks per slot
    const float* est_scores = nullptr;      // [G, Hg, C]
    const float* est_sizes = nullptr;       // [G, C]
    const float* est_value_sums = nullptr;  // [G, C, Dv], 16-byte aligned
    const int64_t* est_ids = nullptr;       // [G, E]

    // Workspace, S = num_splits + est_splits (see sparse_attention_workspace).
    float* ws_o = nullptr;    // [G, Hg, S, Dv]
    float* ws_lse = nullptr;  // [G, Hg, S], log2 units
    int* counters = nullptr;  // [G], zero before the launch; the kernel leaves them zero

    void* out_o = nullptr;     // [G, Hg, Dv] of dtype
    float* out_lse = nullptr;  // [G, Hg], natural log; -inf (and o = 0) for a head that saw nothing
};

// Whether the kernels are instantiated for these sizes.
bool sparse_attention_supported(int D, int Dv, int Hg);

// Partial-kernel blocks one SM holds at once for these sizes on the current device (0 if unsupported or on
// error): the callers size the grid to one wave.
int sparse_attention_blocks_per_sm(DType dtype, int D, int Dv, int Hg);

// Floats of ws_o and of ws_lse for these arguments.
int64_t sparse_attention_workspace_o(const SparseAttentionArgs& a);
int64_t sparse_attention_workspace_lse(const SparseAttentionArgs& a);

// Launches the kernel on `stream`; cudaErrorInvalidValue for unsupported or
// inconsistent arguments (nothing launched). G = 0 launches nothing.
cudaError_t sparse_decode_attention_launch(const SparseAttentionArgs& a, cudaStream_t stream);

// Log-sum-exp merge of P partial attentions for each of N rows:
//   o_parts[n * o_sn + p * o_sp + d] (f32, d < Dv contiguous),
//   lse_parts[n * l_sn + p * l_sp] (f32; multiplied by lse_to_log2 to get log2
//   units: 1 for log2 inputs, log2(e) for natural-log inputs).
// Writes out_o [N, Dv] of out_dtype and out_lse [N] (natural log). Parts with
// lse = -inf contribute nothing (their o is ignored); all empty gives o = 0,
// lse = -inf; a NaN lse gives NaN.
cudaError_t merge_partials_launch(const float* o_parts, const float* lse_parts, int64_t N, int P, int Dv,
                                  int64_t o_sn, int64_t o_sp, int64_t l_sn, int64_t l_sp, float lse_to_log2,
                                  DType out_dtype, void* out_o, float* out_lse, cudaStream_t stream);

}  // namespace attn
}  // namespace kvstore
