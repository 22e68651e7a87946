// Weighted row sums (see weighted_rows.h). A warp takes one chunk of a slot's rows: its lanes form 32 / tpr row
// lanes of tpr lanes, each lane holding kJ chunks of kVec channels of a row (16-byte loads when the rows allow
// it). A row lane keeps kU rows in flight (their indices, weights and values loaded before any multiply), so a
// warp waits on several independent loads at once; the row lanes' sums meet by shuffles and the warp writes its
// chunk's partial sums (no atomics: the caller sums the chunks, so results do not depend on timing).
#include "weighted_rows.h"

#include <algorithm>

namespace kvstore {
namespace cluster {

namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kU = 4;  // rows in flight per row lane

struct WeightedArgs {
    const float* w;
    const std::int64_t* rows;
    const void* values;
    int G, Hg, Dv, tpr;
    long long t, R, chunk, chunks;  // chunk: rows a warp; chunks: warps a slot
    float* out;
};

template <typename T, int kVec>
__device__ __forceinline__ void load_chunk(const T* p, bool ok, float (&out)[kVec]) {
    if (ok) {
        load_float<T, kVec>(p, out);
    } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) out[e] = 0.f;
    }
}

template <typename T, int kVec, int kJ, int kHb>
__global__ void __launch_bounds__(kThreads) weighted_rows_kernel(const WeightedArgs a) {
    const long long warp = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
    if (warp >= static_cast<long long>(a.G) * a.chunks) return;  // no block-wide syncs below
    const int lane = threadIdx.x % 32, tpr = a.tpr, rpw = 32 / tpr;
    const int rl = lane / tpr, li = lane % tpr;
    const long long g = warp / a.chunks;
    const long long i0 = (warp % a.chunks) * a.chunk;
    const long long i1 = min(i0 + a.chunk, a.t);
    const float* wg = a.w + g * a.Hg * a.t;
    const std::int64_t* rg = a.rows + g * a.t;
    const T* vals = static_cast<const T*>(a.values);
    for (int h0 = 0; h0 < a.Hg; h0 += kHb) {
        float acc[kHb][kJ][kVec];
#pragma unroll
        for (int hh = 0; hh < kHb; ++hh)
#pragma unroll
            for (int j = 0; j < kJ; ++j)
#pragma unroll
                for (int e = 0; e < kVec; ++e) acc[hh][j][e] = 0.f;
        for (long long i = i0 + rl; i < i1; i += static_cast<long long>(rpw) * kU) {
            long long row[kU];
            bool ok[kU];
#pragma unroll
            for (int u = 0; u < kU; ++u) {
                const long long ii = i + static_cast<long long>(u) * rpw;
                row[u] = ii < i1 ? rg[ii] : -1;
                ok[u] = row[u] >= 0 && row[u] < a.R;
            }
            float wv[kU][kHb];
#pragma unroll
            for (int u = 0; u < kU; ++u) {
                const long long ii = i + static_cast<long long>(u) * rpw;
#pragma unroll
                for (int hh = 0; hh < kHb; ++hh) {
                    wv[u][hh] = ok[u] && h0 + hh < a.Hg ? wg[(h0 + hh) * a.t + ii] : 0.f;
                }
            }
            float v[kU][kJ][kVec];
#pragma unroll
            for (int u = 0; u < kU; ++u)
#pragma unroll
                for (int j = 0; j < kJ; ++j) {
                    const int c = (j * tpr + li) * kVec;
                    load_chunk<T, kVec>(vals + (ok[u] ? row[u] : 0) * a.Dv + c, ok[u] && c < a.Dv, v[u][j]);
                }
#pragma unroll
            for (int u = 0; u < kU; ++u)
#pragma unroll
                for (int hh = 0; hh < kHb; ++hh)
#pragma unroll
                    for (int j = 0; j < kJ; ++j)
#pragma unroll
                        for (int e = 0; e < kVec; ++e) acc[hh][j][e] += wv[u][hh] * v[u][j][e];
        }
        // the row lanes of the warp hold the same channels: sum them, then one atomic per head and channel
        for (int off = tpr; off < 32; off *= 2) {
#pragma unroll
            for (int hh = 0; hh < kHb; ++hh)
#pragma unroll
                for (int j = 0; j < kJ; ++j)
#pragma unroll
                    for (int e = 0; e < kVec; ++e) acc[hh][j][e] += __shfl_xor_sync(0xffffffffu, acc[hh][j][e], off);
        }
        if (rl == 0) {
#pragma unroll
            for (int hh = 0; hh < kHb; ++hh) {
                if (h0 + hh >= a.Hg) continue;
                float* o = a.out + ((g * a.chunks + warp % a.chunks) * a.Hg + h0 + hh) * a.Dv;
#pragma unroll
                for (int j = 0; j < kJ; ++j)
#pragma unroll
                    for (int e = 0; e < kVec; ++e) {
                        const int c = (j * tpr + li) * kVec + e;
                        if (c < a.Dv) o[c] = acc[hh][j][e];
                    }
            }
        }
    }
}

template <typename T, int kVec, int kJ, int kHb>
cudaError_t launch_typed(const WeightedArgs& a, cudaStream_t stream) {
    const long long warps = static_cast<long long>(a.G) * a.chunks;
    const long long blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
    if (blocks > 2147483647LL) return cudaErrorInvalidValue;
    weighted_rows_kernel<T, kVec, kJ, kHb><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
}

template <typename T, int kVec, int kJ>
cudaError_t launch_heads(const WeightedArgs& a, cudaStream_t stream) {
    if (a.Hg <= 1) return launch_typed<T, kVec, kJ, 1>(a, stream);
    if (a.Hg <= 4) return launch_typed<T, kVec, kJ, 4>(a, stream);
    return launch_typed<T, kVec, kJ, 8>(a, stream);
}

int pow2_at_least(int x) {
    int p = 1;
    while (p < x) p *= 2;
    return p;
}

// The warp layout: threads per row, kJ (0: element loads) and rows a warp.
struct Layout {
    int tpr, kj;
    long long chunk, chunks;
};

Layout layout_for(int G, long long t, int Dv, int elem_bytes, bool aligned) {
    const int kv = 16 / elem_bytes;
    const bool vec = Dv % kv == 0 && aligned;
    const int chunks16 = vec ? Dv / kv : 0;  // 16-byte chunks of a row
    Layout l{32, 0, 1, 1};
    if (vec && chunks16 <= 32) {
        l.tpr = pow2_at_least(chunks16);
        l.kj = 1;
    } else if (vec && chunks16 <= 64) {
        l.kj = 2;
    }
    // rows a warp: enough warps to fill the GPU (~4K), never fewer rows than one pass of the row lanes
    const long long per_pass = static_cast<long long>(32 / l.tpr) * kU;
    const long long want = (static_cast<long long>(G) * t + 4095) / 4096;
    l.chunk = (std::max(want, per_pass) + per_pass - 1) / per_pass * per_pass;
    l.chunks = std::max(1LL, (t + l.chunk - 1) / l.chunk);
    return l;
}

template <typename T>
cudaError_t launch_layout(WeightedArgs a, const Layout& l, cudaStream_t stream) {
    constexpr int kV = 16 / static_cast<int>(sizeof(T));
    a.tpr = l.tpr;
    a.chunk = l.chunk;
    a.chunks = l.chunks;
    if (l.kj == 1) return launch_heads<T, kV, 1>(a, stream);
    if (l.kj == 2) return launch_heads<T, kV, 2>(a, stream);
    return launch_heads<T, 1, 8>(a, stream);  // element loads: lane l holds channels l, l + 32, ... (Dv <= 256)
}

}  // namespace

long long weighted_rows_chunks(int G, long long t, int Dv, DType dtype, const void* values) {
    if (G <= 0 || t <= 0 || Dv < 1) return 1;
    return layout_for(G, t, Dv, dtype_size(dtype), is_aligned(values, 16)).chunks;
}

cudaError_t weighted_rows_launch(const float* w, const std::int64_t* rows, const void* values, DType dtype, int G,
                                 int Hg, long long t, long long R, int Dv, float* partial, cudaStream_t stream) {
    if (G < 0 || G >= 65536 || Hg < 0 || t < 0 || R < 0 || Dv < 1 || Dv > kWeightedMaxDv) {
        return cudaErrorInvalidValue;
    }
    if (G == 0 || Hg == 0) return cudaSuccess;
    const Layout l = layout_for(G, t, Dv, dtype_size(dtype), is_aligned(values, 16));
    if (t == 0 || R == 0) {  // nothing to add: zero partials
        return cudaMemsetAsync(partial, 0, static_cast<size_t>(G) * l.chunks * Hg * Dv * sizeof(float), stream);
    }
    WeightedArgs a{w, rows, values, G, Hg, Dv, 32, t, R, 1, 1, partial};
    switch (dtype) {
        case DType::F32:
            return launch_layout<float>(a, l, stream);
        case DType::F16:
            return launch_layout<__half>(a, l, stream);
        case DType::BF16:
            return launch_layout<__nv_bfloat16>(a, l, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace cluster
}  // namespace kvstore
