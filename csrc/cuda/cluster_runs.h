// The run table of a gpu_only wave decode step, built on the device in one
// launch from the selected clusters (docs/design.md "Wave index"): each slot reads
// its steady zone, then its retrieved clusters as runs of the sorted KV.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvstore {
namespace cluster {

// For every slot g < G (device arrays):
//   row[g, 0] = head_row[g], len[g, 0] = head_len[g]   (the steady run)
//   for j < r, with c = ids[g, j]:
//     row[g, 1 + j] = base[g] + offsets[g, c], len[g, 1 + j] = offsets[g, c + 1] - offsets[g, c]
// row int64 [G, r + 1], len int32 [G, r + 1]; offsets int64 [G, C + 1]. An id outside
// [0, C) gives an empty run (row 0, length 0). One launch on `stream`.
cudaError_t cluster_runs_launch(const std::int64_t* ids, int G, int r, const std::int64_t* offsets, long long C,
                                const std::int64_t* base, const std::int64_t* head_row, const std::int32_t* head_len,
                                std::int64_t* row, std::int32_t* len, cudaStream_t stream);

}  // namespace cluster
}  // namespace kvstore
