// Cluster ranking kernels (see cluster_rank.h).
//
// Pass 1 (scores): grid (tiles, G). A block stages its group's Hg queries in
// shared memory as float, then lane groups of kLpr lanes each take kU
// consecutive centroids at a time: lane i of the group reads the 16-byte
// chunks i, i + kLpr, ... of each centroid row (coalesced), multiplies them
// with the query chunks of kHb heads at once and the group reduces by
// shuffles. Each (group, head) keeps online softmax statistics (max, sum of
// exp) in shared memory; the block merges them into one (max, sum) per
// (tile, head) in the workspace. The centroids are read exactly once.
//
// Pass 2 (probs): grid (ceil(C / 256), G). A block merges its group's tile
// statistics into the softmax normaliser of each head, then each thread sums
// exp(s - M_h) / Z_h over the heads for one cluster (scores re-read, ~1/16 of
// the centroid bytes at D = 128 in bf16, mostly from L2).
#include "cluster_rank.h"

#include <atomic>
#include <cmath>

namespace kvstore {
namespace cluster {

namespace {

constexpr int kThreads = 256;
constexpr int kU = 4;  // centroids per lane group in flight

int tile_clusters(int G, int C) {
    // Enough blocks to fill the GPU (~1K) without making a tile shorter than 32 clusters.
    int tile = 256;
    while (tile > 32 && static_cast<long long>(G) * ((C + tile - 1) / tile) < 1024) tile /= 2;
    return tile;
}

template <typename T, int kVec, int kLpr, int kHb>
__global__ void __launch_bounds__(kThreads, 2)
scores_kernel(const T* __restrict__ q, const T* __restrict__ cen, const float* __restrict__ sizes, int Hg, int C,
              int D, float scale, int tile, float* __restrict__ scores, float2* __restrict__ tile_stats) {
    extern __shared__ float4 smem4[];
    float* qs = reinterpret_cast<float*>(smem4);          // [Hg, D]
    MaxSum* st = reinterpret_cast<MaxSum*>(qs + Hg * D);  // [groups, Hg]
    constexpr int kGroups = kThreads / kLpr;

    const int g = blockIdx.y;
    const int c0 = blockIdx.x * tile;
    const int c1 = min(C, c0 + tile);
    const T* qg = q + static_cast<long long>(g) * Hg * D;
    for (int i = threadIdx.x; i < Hg * D; i += kThreads) qs[i] = to_float(qg[i]);
    for (int i = threadIdx.x; i < kGroups * Hg; i += kThreads) st[i] = MaxSum{-INFINITY, 0.0f};
    __syncthreads();

    const int gi = threadIdx.x / kLpr;
    const int li = threadIdx.x % kLpr;
    const int nch = D / kVec;
    const T* cg = cen + static_cast<long long>(g) * C * D;
    const float* sg = sizes + static_cast<long long>(g) * C;

    // The loop bound is uniform over the warp (the shuffles below need every lane):
    // the groups of one warp take consecutive kU-cluster slices of a warp step.
    constexpr int kWarpStep = (32 / kLpr) * kU;
    const int sub = (threadIdx.x % 32) / kLpr;
    for (int cw = c0 + (threadIdx.x / 32) * kWarpStep; cw < c1; cw += (kThreads / 32) * kWarpStep) {
        const int cb = cw + sub * kU;
        for (int h0 = 0; h0 < Hg; h0 += kHb) {
            float acc[kU][kHb];
#pragma unroll
            for (int u = 0; u < kU; ++u)
#pragma unroll
                for (int h = 0; h < kHb; ++h) acc[u][h] = 0.0f;
            for (int ch = li; ch < nch; ch += kLpr) {
                float x[kU][kVec];
#pragma unroll
                for (int u = 0; u < kU; ++u) {
                    if (cb + u < c1) {
                        load_float<T, kVec>(cg + static_cast<long long>(cb + u) * D + ch * kVec, x[u]);
                    } else {
#pragma unroll
                        for (int e = 0; e < kVec; ++e) x[u][e] = 0.0f;
                    }
                }
#pragma unroll
                for (int h = 0; h < kHb; ++h) {
                    if (h0 + h >= Hg) break;
                    const float* qh = qs + (h0 + h) * D + ch * kVec;
                    float qv[kVec];
                    if constexpr (kVec % 4 == 0) {
#pragma unroll
                        for (int e = 0; e < kVec; e += 4) {
                            const float4 t = *reinterpret_cast<const float4*>(qh + e);
                            qv[e] = t.x;
                            qv[e + 1] = t.y;
                            qv[e + 2] = t.z;
                            qv[e + 3] = t.w;
                        }
                    } else {
#pragma unroll
                        for (int e = 0; e < kVec; ++e) qv[e] = qh[e];
                    }
#pragma unroll
                    for (int u = 0; u < kU; ++u)
#pragma unroll
                        for (int e = 0; e < kVec; ++e) acc[u][h] = fmaf(x[u][e], qv[e], acc[u][h]);
                }
            }
#pragma unroll
            for (int u = 0; u < kU; ++u)
#pragma unroll
                for (int h = 0; h < kHb; ++h) acc[u][h] = group_sum<kLpr>(acc[u][h]);
            // Lane h of the group (kHb <= kLpr) writes head h0 + h and owns its statistics.
#pragma unroll
            for (int h = 0; h < kHb; ++h) {
                const int hh = h0 + h;
                if (li != h || hh >= Hg) continue;
                MaxSum s = st[gi * Hg + hh];
                float* out = scores + (static_cast<long long>(g) * Hg + hh) * C;
#pragma unroll
                for (int u = 0; u < kU; ++u) {
                    const int c = cb + u;
                    if (c >= c1) break;
                    const float v = sg[c] > 0.0f ? acc[u][h] * scale : -INFINITY;
                    out[c] = v;
                    if (v == -INFINITY) continue;
                    if (v > s.m) {
                        s.l = s.l * __expf(s.m - v) + 1.0f;
                        s.m = v;
                    } else {
                        s.l += __expf(v - s.m);
                    }
                }
                st[gi * Hg + hh] = s;
            }
        }
    }
    __syncthreads();
    for (int h = threadIdx.x; h < Hg; h += kThreads) {
        MaxSum s{-INFINITY, 0.0f};
        for (int i = 0; i < kGroups; ++i) s = maxsum_merge(s, st[i * Hg + h]);
        tile_stats[(static_cast<long long>(g) * gridDim.x + blockIdx.x) * Hg + h] = make_float2(s.m, s.l);
    }
}

__global__ void __launch_bounds__(kThreads)
probs_kernel(const float* __restrict__ scores, const float2* __restrict__ tile_stats, int Hg, int C, int ntiles,
             float* __restrict__ probs) {
    __shared__ float m_s[kRankMaxHg];
    __shared__ float inv_s[kRankMaxHg];
    const int g = blockIdx.y;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const float2* ts = tile_stats + static_cast<long long>(g) * ntiles * Hg;
    for (int h = warp; h < Hg; h += kThreads / 32) {
        MaxSum s{-INFINITY, 0.0f};
        for (int t = lane; t < ntiles; t += 32) {
            const float2 v = ts[t * Hg + h];
            s = maxsum_merge(s, MaxSum{v.x, v.y});
        }
        const float m = warp_max(s.m);
        const float l = warp_sum(m == -INFINITY ? 0.0f : s.l * __expf(s.m - m));
        if (lane == 0) {
            m_s[h] = m;
            inv_s[h] = l > 0.0f ? 1.0f / l : 0.0f;
        }
    }
    __syncthreads();
    const int c = blockIdx.x * kThreads + threadIdx.x;
    if (c >= C) return;
    float p = 0.0f;
    for (int h = 0; h < Hg; ++h) {
        const float s = scores[(static_cast<long long>(g) * Hg + h) * C + c];
        if (s != -INFINITY) p += __expf(s - m_s[h]) * inv_s[h];
    }
    probs[static_cast<long long>(g) * C + c] = p;
}

template <typename T, int kVec, int kLpr, int kHb>
cudaError_t launch_scores(const void* q, const void* cen, const float* sizes, int G, int Hg, int C, int D,
                          float scale, int tile, float* scores, float2* stats, cudaStream_t stream) {
    const dim3 grid((C + tile - 1) / tile, G);
    const size_t smem = sizeof(float) * Hg * D + sizeof(MaxSum) * (kThreads / kLpr) * Hg;
    scores_kernel<T, kVec, kLpr, kHb><<<grid, kThreads, smem, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(cen), sizes, Hg, C, D, scale, tile, scores, stats);
    return cudaGetLastError();
}

template <typename T, int kVec, int kLpr>
cudaError_t dispatch_hb(const void* q, const void* cen, const float* sizes, int G, int Hg, int C, int D,
                        float scale, int tile, float* scores, float2* stats, cudaStream_t stream) {
    if (Hg == 1) return launch_scores<T, kVec, kLpr, 1>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream);
    if (Hg == 2) return launch_scores<T, kVec, kLpr, 2>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream);
    if (Hg <= 4) return launch_scores<T, kVec, kLpr, 4>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream);
    return launch_scores<T, kVec, kLpr, 8>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream);
}

template <typename T>
cudaError_t dispatch_layout(const void* q, const void* cen, const float* sizes, int G, int Hg, int C, int D,
                            float scale, int tile, float* scores, float2* stats, cudaStream_t stream) {
    constexpr int kVec = Vec16<T>::kN;
    const bool vec = D % kVec == 0 && aligned_to(q, 16) && aligned_to(cen, 16);
    if (!vec) return dispatch_hb<T, 1, 32>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream);
    const int nch = D / kVec;
    if (nch >= 32) return dispatch_hb<T, kVec, 32>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream);
    if (nch >= 16) return dispatch_hb<T, kVec, 16>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream);
    return dispatch_hb<T, kVec, 8>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream);
}

}  // namespace

long long cluster_scores_workspace_floats(int G, int Hg, int C) {
    if (G <= 0 || Hg <= 0 || C <= 0) return 0;
    const int tile = tile_clusters(G, C);
    return 2LL * G * ((C + tile - 1) / tile) * Hg;
}

cudaError_t cluster_scores_launch(const void* q, const void* centroids, const float* sizes, ScalarType dtype,
                                  int G, int Hg, int C, int D, float scale, float* scores, float* probs,
                                  float* workspace, cudaStream_t stream) {
    if (G < 0 || Hg <= 0 || C < 0 || D <= 0 || Hg > kRankMaxHg || Hg * D > kRankMaxHgTimesD || G > 65535)
        return cudaErrorInvalidValue;
    if (G == 0 || C == 0) return cudaSuccess;
    if (!aligned_to(workspace, 8)) return cudaErrorInvalidValue;
    const int tile = tile_clusters(G, C);
    const int ntiles = (C + tile - 1) / tile;
    float2* stats = reinterpret_cast<float2*>(workspace);
    cudaError_t err;
    switch (dtype) {
        case ScalarType::kFloat32:
            err = dispatch_layout<float>(q, centroids, sizes, G, Hg, C, D, scale, tile, scores, stats, stream);
            break;
        case ScalarType::kFloat16:
            err = dispatch_layout<__half>(q, centroids, sizes, G, Hg, C, D, scale, tile, scores, stats, stream);
            break;
        case ScalarType::kBFloat16:
            err = dispatch_layout<__nv_bfloat16>(q, centroids, sizes, G, Hg, C, D, scale, tile, scores, stats,
                                                 stream);
            break;
        default:
            return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
    const dim3 grid((C + kThreads - 1) / kThreads, G);
    probs_kernel<<<grid, kThreads, 0, stream>>>(scores, stats, Hg, C, ntiles, probs);
    return cudaGetLastError();
}

}  // namespace cluster
}  // namespace kvstore

// --------------------------------------------------------------------------- selection
//
// Keys: key(c) = (ordered(prob_c) << 32) | (0xFFFFFFFF - c), unique, whose
// descending order is probs descending with lower ids first on ties. The
// kernel finds the 32-bit ordered value P of the K-th largest prob (radix
// select, 8 bits a pass), takes every cluster above P and the lowest-id ones
// at P (an ordered block scan), then sorts the K keys in shared memory.

namespace kvstore {
namespace cluster {

namespace {

constexpr int kSelThreads = 1024;
constexpr int kSelStaticSmem = 2048;  // bytes of static shared memory of select_kernel (rounded up)

__device__ __forceinline__ unsigned ordered_bits(float f) {
    unsigned u = __float_as_uint(f);
    if (u == 0x80000000u) u = 0u;  // -0.0 ties with +0.0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive block-wide prefix sum of v (every thread of the block calls it); *total gets the sum.
__device__ int block_exclusive_scan(int v, int* warp_sums, int* total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    constexpr int kWarps = kSelThreads / 32;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int t = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += t;
        }
        if (lane < kWarps) warp_sums[lane] = w;
    }
    __syncthreads();
    const int before = warp == 0 ? 0 : warp_sums[warp - 1];
    *total = warp_sums[kWarps - 1];
    __syncthreads();  // warp_sums is reused by the next call
    return before + incl - v;
}

__global__ void __launch_bounds__(kSelThreads)
select_kernel(const float* __restrict__ probs, int C, int r, int K, int Kpad, std::int64_t* __restrict__ ret,
              std::int64_t* __restrict__ est) {
    extern __shared__ unsigned long long keys[];  // [Kpad]
    __shared__ unsigned hist[256];
    __shared__ int warp_sums[32];
    __shared__ unsigned sel_bin;
    __shared__ int sel_k;
    __shared__ int n_out;
    const int g = blockIdx.x;
    const float* p = probs + static_cast<long long>(g) * C;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

    // 1. radix select: prefix = ordered value of the K-th largest; k = how many taken at that value
    unsigned prefix = 0u, mask = 0u;
    int k = K;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += kSelThreads) hist[i] = 0u;
        __syncthreads();
        for (int c = threadIdx.x; c < C; c += kSelThreads) {
            const unsigned u = ordered_bits(p[c]);
            if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (warp == 0) {
            // lane owns bins [8 lane, 8 lane + 8); the counts above a lane's bins are the suffix sum of the lanes above
            unsigned own = 0u;
#pragma unroll
            for (int b = 0; b < 8; ++b) own += hist[lane * 8 + b];
            unsigned suffix = own;  // own + every lane above
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned t = __shfl_down_sync(0xffffffffu, suffix, o);
                if (lane + o < 32) suffix += t;
            }
            const unsigned hit = __ballot_sync(0xffffffffu, suffix >= static_cast<unsigned>(k));
            const int top = 31 - __clz(hit);  // the highest lane whose bins reach rank k
            if (lane == top) {
                unsigned above = suffix - own;
                for (int b = 7; b >= 0; --b) {
                    const unsigned h = hist[lane * 8 + b];
                    if (above + h >= static_cast<unsigned>(k)) {
                        sel_bin = static_cast<unsigned>(lane * 8 + b);
                        sel_k = k - static_cast<int>(above);
                        break;
                    }
                    above += h;
                }
            }
        }
        __syncthreads();
        prefix |= sel_bin << shift;
        mask |= 255u << shift;
        k = sel_k;
        __syncthreads();  // sel_bin / sel_k are rewritten by the next pass
    }

    // 2. compaction of the K selected keys (positions arbitrary, sorted next)
    if (threadIdx.x == 0) n_out = 0;
    for (int i = K + threadIdx.x; i < Kpad; i += kSelThreads) keys[i] = 0ull;  // padding sorts last
    __syncthreads();
    int ties_before = 0;  // ties (value == prefix) at lower ids, over the previous chunks
    for (int c0 = 0; c0 < C; c0 += kSelThreads) {
        const int c = c0 + threadIdx.x;
        const unsigned u = c < C ? ordered_bits(p[c]) : 0u;
        const bool tie = c < C && u == prefix;
        int chunk_ties;
        const int rank = ties_before + block_exclusive_scan(tie ? 1 : 0, warp_sums, &chunk_ties);
        ties_before += chunk_ties;
        if (c < C && (u > prefix || (tie && rank < k))) {
            const int pos = atomicAdd(&n_out, 1);
            keys[pos] = (static_cast<unsigned long long>(u) << 32) | (0xFFFFFFFFull - static_cast<unsigned>(c));
        }
    }
    __syncthreads();

    // 3. bitonic sort, descending
    for (int size = 2; size <= Kpad; size <<= 1) {
        for (int stride = size / 2; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < Kpad / 2; i += kSelThreads) {
                const int lo = 2 * i - (i & (stride - 1));
                const int hi = lo + stride;
                const unsigned long long a = keys[lo], b = keys[hi];
                const bool desc = (lo & size) == 0;
                if ((a < b) == desc) {
                    keys[lo] = b;
                    keys[hi] = a;
                }
            }
            __syncthreads();
        }
    }

    // 4. ids out
    const int e = K - r;
    for (int i = threadIdx.x; i < K; i += kSelThreads) {
        const std::int64_t id = static_cast<std::int64_t>(0xFFFFFFFFull - (keys[i] & 0xFFFFFFFFull));
        if (i < r)
            ret[static_cast<long long>(g) * r + i] = id;
        else
            est[static_cast<long long>(g) * e + (i - r)] = id;
    }
}

int next_pow2(int v) {
    int p = 1;
    while (p < v) p <<= 1;
    return p;
}

}  // namespace

int cluster_select_max_k() {
    constexpr int kMaxDevices = 64;
    static std::atomic<int> cached[kMaxDevices] = {};  // 0: not known yet
    int dev = 0, optin = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    if (dev >= 0 && dev < kMaxDevices && cached[dev].load() > 0) return cached[dev].load();
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
    int k = 1;
    while (static_cast<long long>(2 * k) * 8 + kSelStaticSmem <= optin) k *= 2;
    if (dev >= 0 && dev < kMaxDevices) cached[dev].store(k);
    return k;
}

cudaError_t cluster_select_launch(const float* probs, int G, int C, int r, int e, std::int64_t* ret,
                                  std::int64_t* est, cudaStream_t stream) {
    const int K = r + e;
    if (G < 0 || C <= 0 || r < 0 || e < 0 || K < 1 || K > C || K > cluster_select_max_k())
        return cudaErrorInvalidValue;
    if (G == 0) return cudaSuccess;
    const int Kpad = next_pow2(K);
    const size_t smem = sizeof(unsigned long long) * Kpad;
    if (smem > 48 * 1024) {
        // Raised once per size and device (not on every call: a decode step may be captured in a CUDA graph).
        static std::atomic<unsigned long long> raised[64] = {};
        int dev = 0;
        const cudaError_t gerr = cudaGetDevice(&dev);
        if (gerr != cudaSuccess) return gerr;
        if (dev < 0 || dev >= 64 || raised[dev].load() < smem) {
            const cudaError_t err = cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         static_cast<int>(smem));
            if (err != cudaSuccess) return err;
            if (dev >= 0 && dev < 64) raised[dev].store(smem);
        }
    }
    select_kernel<<<G, kSelThreads, smem, stream>>>(probs, C, r, K, Kpad, ret, est);
    return cudaGetLastError();
}

}  // namespace cluster
}  // namespace kvstore
