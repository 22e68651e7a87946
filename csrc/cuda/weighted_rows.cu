// Weighted row sums (see weighted_rows.h). A warp takes one chunk of a slot's rows: its lanes form 32 / tpr row
// lanes of tpr lanes, each lane holding kJ chunks of kVec channels of a row (16-byte loads when the rows allow
// it). A row lane keeps kU rows in flight (their indices, weights and values loaded before any multiply), so a
// warp waits on several independent loads at once; the row lanes' sums meet by shuffles and the warp adds them
// to the output with one atomic per head and channel.
#include "weighted_rows.h"

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
                float* o = a.out + (g * a.Hg + h0 + hh) * a.Dv;
#pragma unroll
                for (int j = 0; j < kJ; ++j)
#pragma unroll
                    for (int e = 0; e < kVec; ++e) {
                        const int c = (j * tpr + li) * kVec + e;
                        if (c < a.Dv) atomicAdd(o + c, acc[hh][j][e]);
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

template <typename T>
cudaError_t launch_layout(WeightedArgs a, cudaStream_t stream) {
    constexpr int kV = 16 / static_cast<int>(sizeof(T));
    const bool vec = a.Dv % kV == 0 && is_aligned(a.values, 16);
    const int chunks16 = vec ? a.Dv / kV : 0;  // 16-byte chunks of a row
    // rows a warp: enough warps to fill the GPU (~4K), never fewer rows than one pass of the row lanes
    auto plan = [&](int tpr) {
        a.tpr = tpr;
        const long long per_pass = static_cast<long long>(32 / tpr) * kU;
        const long long want = (static_cast<long long>(a.G) * a.t + 4095) / 4096;
        a.chunk = (std::max(want, per_pass) + per_pass - 1) / per_pass * per_pass;
        a.chunks = (a.t + a.chunk - 1) / a.chunk;
    };
    if (vec && chunks16 <= 32) {
        plan(pow2_at_least(chunks16));
        return launch_heads<T, kV, 1>(a, stream);
    }
    if (vec && chunks16 <= 64) {
        plan(32);
        return launch_heads<T, kV, 2>(a, stream);
    }
    plan(32);  // element loads: lane l holds channels l, l + 32, ... (Dv <= 256)
    return launch_heads<T, 1, 8>(a, stream);
}

}  // namespace

cudaError_t weighted_rows_launch(const float* w, const std::int64_t* rows, const void* values, DType dtype, int G,
                                 int Hg, long long t, long long R, int Dv, float* out, cudaStream_t stream) {
    if (G < 0 || G >= 65536 || Hg < 0 || t < 0 || R < 0 || Dv < 1 || Dv > kWeightedMaxDv) {
        return cudaErrorInvalidValue;
    }
    if (G == 0 || Hg == 0 || t == 0 || R == 0) return cudaSuccess;
    WeightedArgs a{w, rows, values, G, Hg, Dv, 32, t, R, 1, 1, out};
    switch (dtype) {
        case DType::F32:
            return launch_layout<float>(a, stream);
        case DType::F16:
            return launch_layout<__half>(a, stream);
        case DType::BF16:
            return launch_layout<__nv_bfloat16>(a, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace cluster
}  // namespace kvstore
