// The copy kernel of the wave buffer: admits clusters (runs of consecutive
// rows) into the GPU cache, from device memory or from pinned host memory
// read zero-copy over the bus (docs/design.md "Wave buffer").
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvstore {
namespace cluster {

// For each run i < M with len = length[i] > 0:
//   dst_k rows [dst_row[i], dst_row[i] + len) = src_k rows [src_row[i], src_row[i] + len)
// and the same for v. Rows are contiguous and row-major, k_row_bytes (v_row_bytes)
// bytes each, so a run is one contiguous byte range; any element type. src_* may
// be pinned host memory (a device-accessible pointer: UVA). dst_v / src_v may be
// null when v_row_bytes == 0. A run outside [0, rows_src) or [0, rows_dst), or with
// a negative start, is skipped (never read or written out of bounds); runs whose
// destinations overlap give an unspecified mix. src_row, dst_row, length are
// device arrays. blocks_per_run >= 1 splits long runs over several blocks.
// One launch on `stream`.
cudaError_t copy_rows_launch(void* dst_k, void* dst_v, const void* src_k, const void* src_v, long long k_row_bytes,
                             long long v_row_bytes, long long rows_dst, long long rows_src,
                             const std::int64_t* src_row, const std::int64_t* dst_row, const std::int32_t* length,
                             int M, int blocks_per_run, cudaStream_t stream);

}  // namespace cluster
}  // namespace kvstore
