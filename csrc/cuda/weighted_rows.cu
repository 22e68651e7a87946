// Weighted row sums (see weighted_rows.h). A block of 8 warps takes 8 consecutive chunks of one slot's rows of
// one job: its warps' lanes form 32 / tpr row lanes of tpr lanes, each lane holding kJ chunks of kVec channels of
// a row (16-byte loads when the rows allow it). A row lane keeps kU rows in flight (their indices, weights and
// values loaded before any multiply), so a warp waits on several independent loads at once; the row lanes' sums
// meet by shuffles, the warps' in shared memory, and the block writes one partial sum (no atomics: the caller
// sums the partials, so results do not depend on timing). The jobs of one launch share the kernel's shape.
#include "weighted_rows.h"

#include <algorithm>

namespace kvstore {
namespace cluster {

namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kWaves = 2;  // warps a launch aims at: twice what the GPU holds at once
constexpr int kStage = 64;  // rows whose indices and weights a warp stages in shared memory at a time

// The light variants (one 16-byte chunk a lane, up to 4 heads a pass) keep 8 rows a row lane in flight within 128
// registers (2 blocks an SM); the others 4 rows, 1 block an SM (their accumulators need the registers).
__host__ __device__ constexpr bool light_variant(bool raw_words, int kj, int heads_a_pass) { return raw_words && kj == 1 && heads_a_pass <= 4; }
__host__ __device__ constexpr int rows_in_flight(bool light) { return light ? 8 : 4; }
__host__ __device__ constexpr int blocks_per_sm(bool light) { return light ? 2 : 1; }

struct WeightedArgs {
    WeightedJob job[kWeightedMaxJobs];
    long long bps[kWeightedMaxJobs];  // blocks (partials) a slot, per job
    long long first[kWeightedMaxJobs + 1];  // the first block of each job
    long long chunk;  // rows a warp
    int jobs, G, Hg, Dv, tpr;
};

// A lane's kVec elements of a row between their load and their use: raw words when they are one 16-byte vector
// (half the registers of floats for 16-bit types, so more rows stay in flight), else floats.
template <typename T, int kVec, bool kRawWords = kVec * sizeof(T) == 16>
struct Held {
    Raw<T, kVec> r;
    __device__ __forceinline__ void load(const T* p, bool ok) {
        if (ok) {
            load_raw<T, kVec>(p, r);
        } else {
            zero_raw<T, kVec>(r);
        }
    }
    __device__ __forceinline__ void get(float (&out)[kVec]) const { raw_to_float<T, kVec>(r, out); }
};

template <typename T, int kVec>
struct Held<T, kVec, false> {
    float f[kVec];
    __device__ __forceinline__ void load(const T* p, bool ok) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) f[e] = ok ? to_float(p[e]) : 0.f;
    }
    __device__ __forceinline__ void get(float (&out)[kVec]) const {
#pragma unroll
        for (int e = 0; e < kVec; ++e) out[e] = f[e];
    }
};

template <typename T, int kVec, int kJ, int kHb,
          bool kLight = light_variant(kVec * sizeof(T) == 16, kJ, kHb)>
__global__ void __launch_bounds__(kThreads, blocks_per_sm(kLight)) weighted_rows_kernel(const WeightedArgs a) {
    constexpr int kU = rows_in_flight(kLight);  // rows in flight per row lane
    __shared__ float red[kWarpsPerBlock][kWeightedMaxDv];
    __shared__ std::int64_t rs[kWarpsPerBlock][kStage];
    __shared__ float ws[kWarpsPerBlock][kHb][kStage];
    const long long blk = blockIdx.x;
    int jb = 0;
    while (jb + 1 < a.jobs && blk >= a.first[jb + 1]) ++jb;
    const WeightedJob& job = a.job[jb];
    const long long bps = a.bps[jb], t = job.t, R = job.R;
    const long long g = (blk - a.first[jb]) / bps, b = (blk - a.first[jb]) % bps;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tpr = a.tpr, rpw = 32 / tpr;
    const int rl = lane / tpr, li = lane % tpr;
    const long long i0 = (b * kWarpsPerBlock + warp) * a.chunk;
    const long long i1 = min(i0 + a.chunk, t);
    const float* wg = job.w + g * a.Hg * t;
    const std::int64_t* rg = job.rows + g * t;
    const T* vals = static_cast<const T*>(job.values);
    float* out_g = job.partial + (g * bps + b) * a.Hg * a.Dv;
    for (int h0 = 0; h0 < a.Hg; h0 += kHb) {  // uniform over the block: the reductions below sync it
        float acc[kHb][kJ][kVec];
#pragma unroll
        for (int hh = 0; hh < kHb; ++hh)
#pragma unroll
            for (int j = 0; j < kJ; ++j)
#pragma unroll
                for (int e = 0; e < kVec; ++e) acc[hh][j][e] = 0.f;
        for (long long s0 = i0; s0 < i1; s0 += kStage) {
            // the stage's row indices and weights, read by the warp at once (coalesced), before any value
            const int ns = static_cast<int>(min(static_cast<long long>(kStage), i1 - s0));
            __syncwarp();
            for (int k = lane; k < ns; k += 32) {
                rs[warp][k] = rg[s0 + k];
#pragma unroll
                for (int hh = 0; hh < kHb; ++hh) ws[warp][hh][k] = h0 + hh < a.Hg ? wg[(h0 + hh) * t + s0 + k] : 0.f;
            }
            __syncwarp();
            for (int i = rl; i < ns; i += rpw * kU) {
                long long row[kU];
                bool ok[kU];
#pragma unroll
                for (int u = 0; u < kU; ++u) {
                    const int ii = i + u * rpw;
                    row[u] = ii < ns ? rs[warp][ii] : -1;
                    ok[u] = row[u] >= 0 && row[u] < R;
                }
                float wv[kU][kHb];
#pragma unroll
                for (int u = 0; u < kU; ++u) {
                    const int ii = i + u * rpw;
#pragma unroll
                    for (int hh = 0; hh < kHb; ++hh) wv[u][hh] = ok[u] ? ws[warp][hh][ii] : 0.f;
                }
                Held<T, kVec> held[kU][kJ];
#pragma unroll
                for (int u = 0; u < kU; ++u)
#pragma unroll
                    for (int j = 0; j < kJ; ++j) {
                        const int c = (j * tpr + li) * kVec;
                        held[u][j].load(vals + (ok[u] ? row[u] : 0) * a.Dv + c, ok[u] && c < a.Dv);
                    }
#pragma unroll
                for (int u = 0; u < kU; ++u)
#pragma unroll
                    for (int j = 0; j < kJ; ++j) {
                        float v[kVec];
                        held[u][j].get(v);
#pragma unroll
                        for (int hh = 0; hh < kHb; ++hh)
#pragma unroll
                            for (int e = 0; e < kVec; ++e) acc[hh][j][e] += wv[u][hh] * v[e];
                    }
            }
        }
        // the row lanes of the warp hold the same channels: sum them, then the warps' sums, head by head
        for (int off = tpr; off < 32; off *= 2) {
#pragma unroll
            for (int hh = 0; hh < kHb; ++hh)
#pragma unroll
                for (int j = 0; j < kJ; ++j)
#pragma unroll
                    for (int e = 0; e < kVec; ++e) acc[hh][j][e] += __shfl_xor_sync(0xffffffffu, acc[hh][j][e], off);
        }
#pragma unroll
        for (int hh = 0; hh < kHb; ++hh) {
            if (h0 + hh >= a.Hg) break;  // uniform
            if (rl == 0) {
#pragma unroll
                for (int j = 0; j < kJ; ++j)
#pragma unroll
                    for (int e = 0; e < kVec; ++e) {
                        const int c = (j * tpr + li) * kVec + e;
                        if (c < a.Dv) red[warp][c] = acc[hh][j][e];
                    }
            }
            __syncthreads();
            for (int c = threadIdx.x; c < a.Dv; c += kThreads) {
                float sum = 0.f;
#pragma unroll
                for (int w = 0; w < kWarpsPerBlock; ++w) sum += red[w][c];
                out_g[(h0 + hh) * a.Dv + c] = sum;
            }
            __syncthreads();
        }
    }
}

template <typename T, int kVec, int kJ, int kHb>
cudaError_t launch_typed(const WeightedArgs& a, cudaStream_t stream) {
    const long long blocks = a.first[a.jobs];
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

// Warps of a variant the current device holds at once (its launch bounds' blocks an SM).
long long resident_warps(bool light) {
    static int sms_of[64] = {};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
    if (sms_of[dev] == 0) {
        int sms = 0;
        if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) sms = 132;
        cudaGetLastError();
        sms_of[dev] = sms;
    }
    return static_cast<long long>(sms_of[dev]) * blocks_per_sm(light) * kWarpsPerBlock;
}

// The warp layout: threads per row, kJ (0: element loads) and rows a warp.
struct Layout {
    int tpr, kj;
    long long chunk;
};

// t_all: the rows a slot of every job of the launch (the warps are shared out over them).
Layout layout_for(int G, int Hg, long long t_all, int Dv, int elem_bytes, bool aligned) {
    const int kv = 16 / elem_bytes;
    const bool vec = Dv % kv == 0 && aligned;
    const int chunks16 = vec ? Dv / kv : 0;  // 16-byte chunks of a row
    Layout l{32, 0, 1};
    if (vec && chunks16 <= 32) {
        l.tpr = pow2_at_least(chunks16);
        l.kj = 1;
    } else if (vec && chunks16 <= 64) {
        l.kj = 2;
    }
    // rows a warp: kWaves times the warps the GPU holds, never fewer rows than one pass of the row lanes
    const bool light = light_variant(vec && kv * elem_bytes == 16, l.kj, Hg <= 1 ? 1 : (Hg <= 4 ? 4 : 8));
    const long long per_pass = static_cast<long long>(32 / l.tpr) * rows_in_flight(light);
    const long long target = static_cast<long long>(kWaves) * resident_warps(light);
    const long long want = (static_cast<long long>(G) * std::max(t_all, 1LL) + target - 1) / target;
    l.chunk = (std::max(want, per_pass) + per_pass - 1) / per_pass * per_pass;
    return l;
}

long long blocks_a_slot(long long t, long long chunk) {
    return std::max(1LL, (t + chunk * kWarpsPerBlock - 1) / (chunk * kWarpsPerBlock));
}

template <typename T>
cudaError_t launch_layout(WeightedArgs a, const Layout& l, cudaStream_t stream) {
    constexpr int kV = 16 / static_cast<int>(sizeof(T));
    a.tpr = l.tpr;
    if (l.kj == 1) return launch_heads<T, kV, 1>(a, stream);
    if (l.kj == 2) return launch_heads<T, kV, 2>(a, stream);
    return launch_heads<T, 1, 8>(a, stream);  // element loads: lane l holds channels l, l + 32, ... (Dv <= 256)
}

}  // namespace

long long weighted_rows_chunks(int G, int Hg, long long t, long long t_all, int Dv, DType dtype, bool aligned) {
    if (G <= 0 || Hg <= 0 || t <= 0 || Dv < 1) return 1;
    return blocks_a_slot(t, layout_for(G, Hg, std::max(t, t_all), Dv, dtype_size(dtype), aligned).chunk);
}

cudaError_t weighted_rows_launch(const WeightedJob* jobs, int n_jobs, DType dtype, int G, int Hg, int Dv,
                                 cudaStream_t stream) {
    if (n_jobs < 1 || n_jobs > kWeightedMaxJobs || G < 0 || G >= 65536 || Hg < 0 || Dv < 1 ||
        Dv > kWeightedMaxDv) {
        return cudaErrorInvalidValue;
    }
    if (G == 0 || Hg == 0) return cudaSuccess;
    long long t_all = 0;
    bool aligned = true;
    for (int k = 0; k < n_jobs; ++k) {
        if (jobs[k].t < 0 || jobs[k].R < 0) return cudaErrorInvalidValue;
        t_all += jobs[k].t;
        aligned = aligned && is_aligned(jobs[k].values, 16);
    }
    const Layout l = layout_for(G, Hg, t_all, Dv, dtype_size(dtype), aligned);
    WeightedArgs a{};
    a.jobs = 0;
    a.G = G;
    a.Hg = Hg;
    a.Dv = Dv;
    a.chunk = l.chunk;
    for (int k = 0; k < n_jobs; ++k) {
        const long long bps = blocks_a_slot(jobs[k].t, l.chunk);
        if (jobs[k].t == 0 || jobs[k].R == 0) {  // nothing to add: zero partials
            const cudaError_t err = cudaMemsetAsync(
                jobs[k].partial, 0, static_cast<size_t>(G) * bps * Hg * Dv * sizeof(float), stream);
            if (err != cudaSuccess) return err;
            continue;
        }
        a.job[a.jobs] = jobs[k];
        a.bps[a.jobs] = bps;
        a.first[a.jobs + 1] = a.first[a.jobs] + static_cast<long long>(G) * bps;
        ++a.jobs;
    }
    if (a.jobs == 0) return cudaSuccess;
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
