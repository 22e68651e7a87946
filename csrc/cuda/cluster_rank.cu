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

#include <cooperative_groups.h>

#include <atomic>
#include <cmath>
#include <type_traits>

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
              int D, float scale, int tile, float* __restrict__ scores, float2* __restrict__ tile_stats,
              const RadiusArgs rad) {
    extern __shared__ float4 smem4[];
    float* qs = reinterpret_cast<float*>(smem4);          // [Hg, D]
    MaxSum* st = reinterpret_cast<MaxSum*>(qs + Hg * D);  // [groups, Hg]
    constexpr int kGroups = kThreads / kLpr;

    const int g = blockIdx.y;
    const int c0 = blockIdx.x * tile;
    const int c1 = min(C, c0 + tile);
    const T* qg = q + static_cast<long long>(g) * Hg * D;
    stage_queries<T, kVec>(qg, Hg * D, D, qs);
    for (int i = threadIdx.x; i < kGroups * Hg; i += kThreads) st[i] = MaxSum{-INFINITY, 0.0f};
    __syncthreads();

    const int gi = threadIdx.x / kLpr;
    const int li = threadIdx.x % kLpr;
    const T* cg = cen + static_cast<long long>(g) * C * D;
    const float* sg = sizes + static_cast<long long>(g) * C;
    const float* rg = rad.radii == nullptr ? nullptr : rad.radii + static_cast<long long>(g) * C;

    // The loop bound is uniform over the warp (the shuffles below need every lane):
    // the groups of one warp take consecutive kU-cluster slices of a warp step.
    constexpr int kWarpStep = (32 / kLpr) * kU;
    const int sub = (threadIdx.x % 32) / kLpr;
    for (int cw = c0 + (threadIdx.x / 32) * kWarpStep; cw < c1; cw += (kThreads / 32) * kWarpStep) {
        const int cb = cw + sub * kU;
        for (int h0 = 0; h0 < Hg; h0 += kHb) {
            float acc[kU][kHb];
            rows_dot_heads<T, kVec, kLpr, 1, kU, kHb>(acc, qs, D, h0, Hg, li, [&](int u) {
                return cb + u < c1 ? cg + static_cast<long long>(cb + u) * D : nullptr;
            });
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
                const float bq = rg == nullptr ? 0.0f : rad.bonus_scale * rad.q_bonus[static_cast<long long>(g) * Hg + hh];
#pragma unroll
                for (int u = 0; u < kU; ++u) {
                    const int c = cb + u;
                    if (c >= c1) break;
                    const float v = sg[c] > 0.0f ? acc[u][h] * scale : -INFINITY;
                    out[c] = v;
                    maxsum_push(s, rg == nullptr ? v : v + bq * rg[c]);
                }
                st[gi * Hg + hh] = s;
            }
        }
    }
    __syncthreads();
    for (int h = threadIdx.x; h < Hg; h += kThreads) {
        const MaxSum s = maxsum_merge_strided(st + h, kGroups, Hg);
        tile_stats[(static_cast<long long>(g) * gridDim.x + blockIdx.x) * Hg + h] = make_float2(s.m, s.l);
    }
}

__global__ void __launch_bounds__(kThreads)
probs_kernel(const float* __restrict__ scores, const float2* __restrict__ tile_stats, int Hg, int C, int ntiles,
             float* __restrict__ probs, const float* __restrict__ size_weights, float* __restrict__ lse_out,
             const RadiusArgs rad) {
    __shared__ float m_s[kRankMaxHg];
    __shared__ float inv_s[kRankMaxHg];
    __shared__ float bq_s[kRankMaxHg];
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
            bq_s[h] = rad.radii == nullptr ? 0.0f : rad.bonus_scale * rad.q_bonus[static_cast<long long>(g) * Hg + h];
            if (lse_out != nullptr && blockIdx.x == 0)
                lse_out[static_cast<long long>(g) * Hg + h] = l > 0.0f ? m + __logf(l) : -INFINITY;
        }
    }
    __syncthreads();
    const int c = blockIdx.x * kThreads + threadIdx.x;
    if (c >= C) return;
    const float rc = rad.radii == nullptr ? 0.0f : rad.radii[static_cast<long long>(g) * C + c];
    float p = 0.0f;
    for (int h = 0; h < Hg; ++h) {
        const float s = scores[(static_cast<long long>(g) * Hg + h) * C + c];
        if (s != -INFINITY) p += __expf(s + bq_s[h] * rc - m_s[h]) * inv_s[h];
    }
    if (size_weights != nullptr) p *= size_weights[static_cast<long long>(g) * C + c];
    probs[static_cast<long long>(g) * C + c] = p;
}

template <typename T, int kVec, int kLpr, int kHb>
cudaError_t launch_scores(const void* q, const void* cen, const float* sizes, int G, int Hg, int C, int D,
                          float scale, int tile, float* scores, float2* stats, cudaStream_t stream,
                          const RadiusArgs& rad) {
    const dim3 grid((C + tile - 1) / tile, G);
    const size_t smem = sizeof(float) * Hg * D + sizeof(MaxSum) * (kThreads / kLpr) * Hg;
    scores_kernel<T, kVec, kLpr, kHb><<<grid, kThreads, smem, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(cen), sizes, Hg, C, D, scale, tile, scores, stats, rad);
    return cudaGetLastError();
}

template <typename T, int kVec, int kLpr>
cudaError_t dispatch_hb(const void* q, const void* cen, const float* sizes, int G, int Hg, int C, int D,
                        float scale, int tile, float* scores, float2* stats, cudaStream_t stream,
                        const RadiusArgs& rad) {
    if (Hg == 1) return launch_scores<T, kVec, kLpr, 1>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream, rad);
    if (Hg == 2) return launch_scores<T, kVec, kLpr, 2>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream, rad);
    if (Hg <= 4) return launch_scores<T, kVec, kLpr, 4>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream, rad);
    return launch_scores<T, kVec, kLpr, 8>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream, rad);
}

template <typename T>
cudaError_t dispatch_layout(const void* q, const void* cen, const float* sizes, int G, int Hg, int C, int D,
                            float scale, int tile, float* scores, float2* stats, cudaStream_t stream,
                            const RadiusArgs& rad) {
    constexpr int kVec = Vec16<T>::kN;
    const bool vec = D % kVec == 0 && is_aligned(q, 16) && is_aligned(cen, 16);
    if (!vec) return dispatch_hb<T, 1, 32>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream, rad);
    const int nch = D / kVec;
    if (nch >= 32) return dispatch_hb<T, kVec, 32>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream, rad);
    if (nch >= 16) return dispatch_hb<T, kVec, 16>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream, rad);
    return dispatch_hb<T, kVec, 8>(q, cen, sizes, G, Hg, C, D, scale, tile, scores, stats, stream, rad);
}


// ---------------------------------------------------------------------------------------------------------
// Tensor-core variant of pass 1 for bf16 / fp16 with D % 32 == 0 and Hg <= 16 (sm_80+): one
// mma.m16n8k16 multiplies the group's queries (rows of A, heads >= Hg zero) by 8 centroids (columns of
// B). The k order inside an MMA is free as long as A and B agree, so lane (g, t) = (lane / 4, lane % 4)
// feeds both from one 16-byte chunk: chunk 4 j + t of centroid g of the 8 (B) and of query heads g and
// g + 8 (A); words 0, 1 go to MMA 2 j and words 2, 3 to MMA 2 j + 1. A warp step reads 8 centroids in
// 16-byte coalesced loads with no shuffles; lane (g, t) ends with the scores of head g (and g + 8) for
// centroids 2 t and 2 t + 1 of the 8 and keeps that head's online softmax statistics.
constexpr int kMmaU = 4;  // groups of 8 centroids per warp step (loads in flight)

// a^2 + b^2 of the two 16-bit floats packed in w (low half first).
template <typename T>
__device__ __forceinline__ float pair_sq(unsigned w) {
    float a, b;
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        a = __uint_as_float(w << 16);
        b = __uint_as_float(w & 0xffff0000u);
    } else {
        const __half2 h = *reinterpret_cast<const __half2*>(&w);
        a = __low2float(h);
        b = __high2float(h);
    }
    return a * a + b * b;
}

// g_n(sigma) of the finite-sample estimator, interpolated in its table (kvstore/gpu/estimation.py), which
// the block holds in shared memory: tab [nmax + 1, J], then slope [nmax + 1].
__device__ __forceinline__ float fs_g(const FsArgs& fs, const float* tab, float size, float sigma) {
    const int n = min(static_cast<int>(size + 0.5f), fs.nmax);
    const float x = fmaxf(sigma * fs.inv_step, 0.0f);
    const float x0 = fminf(floorf(x), static_cast<float>(fs.J - 2));
    const float* row = tab + n * fs.J + static_cast<int>(x0);
    const float g = row[0] + (row[1] - row[0]) * fminf(x - x0, 1.0f);
    return g + fmaxf(x - static_cast<float>(fs.J - 1), 0.0f) * fs.step * tab[(fs.nmax + 1) * fs.J + n];
}

// Bytes of shared memory the fs table takes in a block.
inline size_t fs_smem_bytes(const FsArgs& fs) {
    return fs.key_sd == nullptr ? 0 : sizeof(float) * static_cast<size_t>(fs.nmax + 1) * (fs.J + 1);
}

// cen: centroids of T, or with kI8 int8 centroids whose row c scores (q . c_int8) * cscale[c].
template <typename T, int D, bool kTwoRows, bool kI8>
__global__ void __launch_bounds__(kThreads, 2)  // two blocks an SM: 16 warps of centroid loads in flight
scores_mma_kernel(const T* __restrict__ q, const void* __restrict__ cen, const float* __restrict__ sizes, int Hg,
                  int C, float scale, int tile, float* __restrict__ scores, float2* __restrict__ tile_stats,
                  const FsArgs fs, const RadiusArgs rad, const float* __restrict__ cscale) {
    constexpr int NJ = D / 32;  // chunk steps: 4 lanes x 8 elements each
    __shared__ MaxSum st[kThreads / 32][16];
    extern __shared__ float fs_tab[];  // fs only: table [nmax + 1, J], slope [nmax + 1]
    if (fs.key_sd != nullptr) {
        const int nt = (fs.nmax + 1) * fs.J;
        for (int i = threadIdx.x; i < nt; i += kThreads) fs_tab[i] = fs.table[i];
        for (int i = threadIdx.x; i <= fs.nmax; i += kThreads) fs_tab[nt + i] = fs.slope[i];
        __syncthreads();
    }
    const int g = blockIdx.y;
    const int c0 = blockIdx.x * tile;
    const int c1 = min(C, c0 + tile);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int gr = lane / 4, t = lane % 4;

    // A fragments: chunk 4 j + t of heads gr and gr + 8 (zero past Hg).
    uint4 qa[NJ], qb[NJ];
    load_query_fragments<T, NJ, kTwoRows>(q + static_cast<long long>(g) * Hg * D, Hg, D, gr, t, qa, qb);
    // fs: |q| of heads gr and gr + 8 (each lane holds a quarter of the row: sum over the quad)
    float qn_a = 0.0f, qn_b = 0.0f;
    if (fs.key_sd != nullptr) {
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            qn_a += pair_sq<T>(qa[j].x) + pair_sq<T>(qa[j].y) + pair_sq<T>(qa[j].z) + pair_sq<T>(qa[j].w);
            qn_b += pair_sq<T>(qb[j].x) + pair_sq<T>(qb[j].y) + pair_sq<T>(qb[j].z) + pair_sq<T>(qb[j].w);
        }
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            qn_a += __shfl_xor_sync(0xffffffffu, qn_a, o);
            qn_b += __shfl_xor_sync(0xffffffffu, qn_b, o);
        }
        qn_a = sqrtf(qn_a) * scale;
        qn_b = sqrtf(qn_b) * scale;
    }
    const float* sd = fs.key_sd == nullptr ? nullptr : fs.key_sd + static_cast<long long>(g) * C;
    const float* rg = rad.radii == nullptr ? nullptr : rad.radii + static_cast<long long>(g) * C;
    const float bq_a = (rg != nullptr && gr < Hg) ? rad.bonus_scale * rad.q_bonus[static_cast<long long>(g) * Hg + gr] : 0.0f;
    const float bq_b = (rg != nullptr && gr + 8 < Hg) ? rad.bonus_scale * rad.q_bonus[static_cast<long long>(g) * Hg + gr + 8] : 0.0f;
    const T* cg = static_cast<const T*>(cen) + static_cast<long long>(g) * C * D;
    const signed char* cg8 = static_cast<const signed char*>(cen) + static_cast<long long>(g) * C * D;
    const float* csg = kI8 ? cscale + static_cast<long long>(g) * C : nullptr;
    const float* sg = sizes + static_cast<long long>(g) * C;
    float* out_a = scores + (static_cast<long long>(g) * Hg + gr) * C;
    float* out_b = scores + (static_cast<long long>(g) * Hg + gr + 8) * C;
    MaxSum sa{-INFINITY, 0.0f}, sb{-INFINITY, 0.0f};

    constexpr int kStep = 8 * kMmaU;
    for (int cw = c0 + warp * kStep; cw < c1; cw += (kThreads / 32) * kStep) {
        // int8: the raw 8-byte chunks are held until their MMA (converted there), so that every load of the
        // step is in flight at once within the register budget
        using Raw = typename std::conditional<kI8, uint2, uint4>::type;
        Raw x[kMmaU][NJ];
#pragma unroll
        for (int u = 0; u < kMmaU; ++u) {
            const int c = cw + 8 * u + gr;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                if constexpr (kI8)
                    x[u][j] = c < c1 ? __ldg(reinterpret_cast<const uint2*>(cg8 + static_cast<long long>(c) * D +
                                                                           (4 * j + t) * 8))
                                     : make_uint2(0u, 0u);
                else
                    x[u][j] = c < c1 ? __ldg(reinterpret_cast<const uint4*>(cg + static_cast<long long>(c) * D +
                                                                           (4 * j + t) * 8))
                                     : make_uint4(0u, 0u, 0u, 0u);
            }
        }
        // Sizes (and fs key spreads) of this lane's output clusters, loaded beside the centroids so that the
        // epilogue does not wait for a second round trip.
        float szv[kMmaU][2], sdv[kMmaU][2], rdv[kMmaU][2], csv[kMmaU][2];
#pragma unroll
        for (int u = 0; u < kMmaU; ++u) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int c = cw + 8 * u + 2 * t + i;
                szv[u][i] = c < c1 ? sg[c] : 0.0f;
                csv[u][i] = (kI8 && c < c1) ? csg[c] : 1.0f;
                sdv[u][i] = (sd != nullptr && c < c1) ? sd[c] : 0.0f;
                rdv[u][i] = (rg != nullptr && c < c1) ? rg[c] : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < kMmaU; ++u) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                uint4 b;
                if constexpr (kI8)
                    b = i8x8_to_pairs<T>(x[u][j]);
                else
                    b = x[u][j];
                mma_chunk<T>(acc, qa[j], qb[j], b);
            }
            const int c = cw + 8 * u + 2 * t;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                if (c + i >= c1) break;
                const float sz = szv[u][i];
                const bool live = sz > 0.0f;
                // fs: the score gets the finite-sample correction, the statistics rank by log of the mass
                const float s_d = live ? sdv[u][i] : 0.0f;
                const float logsz = (sd != nullptr && live) ? __logf(sz) : 0.0f;
                const float sc = kI8 ? scale * csv[u][i] : scale;
                if (gr < Hg) {
                    float v = live ? acc[i] * sc : -INFINITY;
                    if (sd != nullptr && live) v += fs_g(fs, fs_tab, sz, qn_a * s_d);
                    out_a[c + i] = v;
                    maxsum_push(sa, v + logsz + bq_a * rdv[u][i]);
                }
                if (kTwoRows && gr + 8 < Hg) {
                    float v = live ? acc[2 + i] * sc : -INFINITY;
                    if (sd != nullptr && live) v += fs_g(fs, fs_tab, sz, qn_b * s_d);
                    out_b[c + i] = v;
                    maxsum_push(sb, v + logsz + bq_b * rdv[u][i]);
                }
            }
        }
    }
    // Merge the 4 lanes of each row, then the warps.
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        sa = maxsum_merge(sa, MaxSum{__shfl_xor_sync(0xffffffffu, sa.m, o), __shfl_xor_sync(0xffffffffu, sa.l, o)});
        if (kTwoRows)
            sb = maxsum_merge(sb, MaxSum{__shfl_xor_sync(0xffffffffu, sb.m, o), __shfl_xor_sync(0xffffffffu, sb.l, o)});
    }
    if (t == 0) {
        st[warp][gr] = sa;
        st[warp][gr + 8] = sb;
    }
    __syncthreads();
    for (int h = threadIdx.x; h < Hg; h += kThreads) {
        MaxSum s{-INFINITY, 0.0f};
#pragma unroll
        for (int w = 0; w < kThreads / 32; ++w) s = maxsum_merge(s, st[w][h]);
        tile_stats[(static_cast<long long>(g) * gridDim.x + blockIdx.x) * Hg + h] = make_float2(s.m, s.l);
    }
}

// Whether the current device runs the tensor-core kernels (sm_80+, compiled for it).
bool device_has_mma() {
    static std::atomic<int> cache[64] = {};
    return device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 8 &&
           ptx_version(scores_mma_kernel<__nv_bfloat16, 128, false, false>, cache) >= 80;
}

// Clusters per block of the tensor-core kernel: about two waves of two resident blocks an SM, whole block steps
// (256 clusters), never fewer than `tile` (so the workspace sized from tile_clusters() suffices). Long-lived
// blocks: a block of one 32-cluster step per warp spends most of its life starting and finishing.
int mma_tile(int G, int C, int tile) {
    const int sms = device_attribute<cudaDevAttrMultiProcessorCount>();
    const long long blocks = 4LL * (sms > 0 ? sms : 132);
    const long long per_slot = blocks / G > 1 ? blocks / G : 1;
    long long t = (C + per_slot - 1) / per_slot;
    constexpr int kBlockStep = (kThreads / 32) * 8 * kMmaU;
    t = (t + kBlockStep - 1) / kBlockStep * kBlockStep;
    return static_cast<int>(t > tile ? t : tile);
}

// Launches the tensor-core kernel when it fits (true), with its own tile, written to *tile. cscale: int8
// centroids with one scale a cluster (null: centroids of T).
template <typename T, bool kI8>
void launch_scores_mma(dim3 grid, size_t smem, cudaStream_t stream, const T* qt, const void* cen, const float* sizes,
                       int Hg, int D, int C, float scale, int tile, float* scores, float2* stats, const FsArgs& fs,
                       const RadiusArgs& rad, const float* cscale) {
    if (D == 128 && Hg > 8)
        scores_mma_kernel<T, 128, true, kI8><<<grid, kThreads, smem, stream>>>(qt, cen, sizes, Hg, C, scale, tile, scores, stats, fs, rad, cscale);
    else if (D == 128)
        scores_mma_kernel<T, 128, false, kI8><<<grid, kThreads, smem, stream>>>(qt, cen, sizes, Hg, C, scale, tile, scores, stats, fs, rad, cscale);
    else if (Hg > 8)
        scores_mma_kernel<T, 64, true, kI8><<<grid, kThreads, smem, stream>>>(qt, cen, sizes, Hg, C, scale, tile, scores, stats, fs, rad, cscale);
    else
        scores_mma_kernel<T, 64, false, kI8><<<grid, kThreads, smem, stream>>>(qt, cen, sizes, Hg, C, scale, tile, scores, stats, fs, rad, cscale);
}

template <typename T>
bool try_scores_mma(const void* q, const void* cen, const float* sizes, int G, int Hg, int C, int D, float scale,
                    int* tile_io, float* scores, float2* stats, cudaStream_t stream, cudaError_t* err,
                    const FsArgs& fs, const RadiusArgs& rad, const float* cscale) {
    if ((D != 64 && D != 128) || Hg > 16 || !is_aligned(q, 16) || !is_aligned(cen, cscale != nullptr ? 8 : 16) ||
        !device_has_mma())
        return false;
    const size_t smem = fs_smem_bytes(fs);
    if (smem > 48 * 1024) return false;  // the caller reports an fs request it cannot serve
    const int tile = mma_tile(G, C, *tile_io);
    *tile_io = tile;
    const dim3 grid((C + tile - 1) / tile, G);
    const T* qt = static_cast<const T*>(q);
    if (cscale != nullptr)
        launch_scores_mma<T, true>(grid, smem, stream, qt, cen, sizes, Hg, D, C, scale, tile, scores, stats, fs, rad, cscale);
    else
        launch_scores_mma<T, false>(grid, smem, stream, qt, cen, sizes, Hg, D, C, scale, tile, scores, stats, fs, rad, cscale);
    *err = cudaGetLastError();
    return true;
}

}  // namespace

long long cluster_scores_workspace_floats(int G, int Hg, int C) {
    if (G <= 0 || Hg <= 0 || C <= 0) return 0;
    const int tile = tile_clusters(G, C);
    return 2LL * G * ((C + tile - 1) / tile) * Hg;
}

cudaError_t cluster_scores_launch(const void* q, const void* centroids, const float* sizes, DType dtype,
                                  int G, int Hg, int C, int D, float scale, float* scores, float* probs,
                                  float* workspace, cudaStream_t stream, const FsArgs* fs, float* lse,
                                  const RadiusArgs* radius, const float* centroid_scale) {
    const FsArgs no_fs{};
    const FsArgs& f = fs == nullptr ? no_fs : *fs;
    const RadiusArgs no_radius{};
    const RadiusArgs& rad = radius == nullptr ? no_radius : *radius;
    if (rad.radii != nullptr && rad.q_bonus == nullptr) return cudaErrorInvalidValue;
    if (f.key_sd != nullptr && (f.table == nullptr || f.slope == nullptr || f.nmax < 1 || f.J < 2 ||
                                dtype == DType::F32))
        return cudaErrorInvalidValue;
    if (G < 0 || Hg <= 0 || C < 0 || D <= 0 || Hg > kRankMaxHg || Hg * D > kRankMaxHgTimesD || G > 65535)
        return cudaErrorInvalidValue;
    if (centroid_scale != nullptr && dtype == DType::F32) return cudaErrorInvalidValue;
    if (G == 0 || C == 0) return cudaSuccess;
    if (!is_aligned(workspace, 8)) return cudaErrorInvalidValue;
    int tile = tile_clusters(G, C);
    float2* stats = reinterpret_cast<float2*>(workspace);
    cudaError_t err;
    switch (dtype) {
        case DType::F32:
            err = dispatch_layout<float>(q, centroids, sizes, G, Hg, C, D, scale, tile, scores, stats, stream, rad);
            break;
        case DType::F16:
            if (!try_scores_mma<__half>(q, centroids, sizes, G, Hg, C, D, scale, &tile, scores, stats, stream, &err,
                                        f, rad, centroid_scale)) {
                // the estimator and int8 centroids ride the tensor-core kernel
                if (f.key_sd != nullptr || centroid_scale != nullptr) return cudaErrorInvalidValue;
                err = dispatch_layout<__half>(q, centroids, sizes, G, Hg, C, D, scale, tile, scores, stats, stream,
                                              rad);
            }
            break;
        case DType::BF16:
            if (!try_scores_mma<__nv_bfloat16>(q, centroids, sizes, G, Hg, C, D, scale, &tile, scores, stats, stream,
                                               &err, f, rad, centroid_scale)) {
                if (f.key_sd != nullptr || centroid_scale != nullptr) return cudaErrorInvalidValue;
                err = dispatch_layout<__nv_bfloat16>(q, centroids, sizes, G, Hg, C, D, scale, tile, scores, stats,
                                                     stream, rad);
            }
            break;
        default:
            return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
    const int ntiles = (C + tile - 1) / tile;
    const dim3 grid((C + kThreads - 1) / kThreads, G);
    probs_kernel<<<grid, kThreads, 0, stream>>>(scores, stats, Hg, C, ntiles, probs,
                                                f.key_sd != nullptr ? sizes : nullptr, lse, rad);
    return cudaGetLastError();
}

}  // namespace cluster
}  // namespace kvstore

// --------------------------------------------------------------------------- selection
//
// Keys: the total order "prob descending, lower id first on ties". One block
// per row (or, on sm_90, a thread-block cluster per row: select_cluster_kernel)
// finds, by two radix selects run side by side (8 bits a pass, warp-
// aggregated shared-memory histograms), the 32-bit ordered value P_K of the
// K-th key (K = r + e) and P_r of the r-th, with how many ties at each value
// are taken. A compaction in id order then writes the ids above the r-th key
// to ret and the others above the K-th to est: both zones come out in
// ascending id order (no sort; ascending ids are also ascending rows).

namespace kvstore {
namespace cluster {

namespace {

constexpr int kSelThreads = 1024;
// ids per thread per chunk (independent loads in flight): 8, or 16 for rows over 8192 clusters

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

// The histogram counts of one thread's kSelPer keys (the first n valid) matching prefix under mask. Probs
// crowd into few bins, so equal bins in a row are counted locally; the last run of every lane is added with
// one atomic per warp when the warp's lanes agree on its bin (the common case of the first passes), else one
// per lane. Every lane of the warp calls it. (Aggregation with __match_any_sync on every key measured slower
// on the H200: 21 -> 43 us at 64 x 8192; one atomic per thread, 15 us, was bound by the hot bin.)
template <int kSelPer>
__device__ __forceinline__ void hist_add_keys(unsigned* hist, const unsigned (&u)[kSelPer], int n, unsigned mask,
                                              unsigned prefix, int shift) {
    unsigned run_bin = 0u, run_cnt = 0u;
#pragma unroll
    for (int i = 0; i < kSelPer; ++i) {
        if (i < n && (u[i] & mask) == prefix) {
            const unsigned bin = (u[i] >> shift) & 255u;
            if (run_cnt > 0u && bin != run_bin) {
                atomicAdd(&hist[run_bin], run_cnt);
                run_cnt = 0u;
            }
            run_bin = bin;
            ++run_cnt;
        }
    }
    const unsigned bin0 = __shfl_sync(0xffffffffu, run_bin, 0);
    if (__all_sync(0xffffffffu, run_cnt == 0u || run_bin == bin0)) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        const unsigned total = __reduce_add_sync(0xffffffffu, run_cnt);
#else
        unsigned total = run_cnt;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
#endif
        if (threadIdx.x % 32 == 0 && total > 0u) atomicAdd(&hist[bin0], total);
    } else if (run_cnt > 0u) {
        atomicAdd(&hist[run_bin], run_cnt);
    }
}

// Valid keys of a thread whose ids start at cb.
__device__ __forceinline__ int keys_left(long long cb, int C, int per) {
    const long long left = C - cb;
    return left < per ? (left > 0 ? static_cast<int>(left) : 0) : per;
}

// Ordered keys of ids [cb, cb + kSelPer) of row p (0 past C); returns how many are valid.
template <int kSelPer>
__device__ __forceinline__ int load_keys(const float* __restrict__ p, long long cb, int C, unsigned (&u)[kSelPer]) {
    const int n = keys_left(cb, C, kSelPer);
    if (n == kSelPer && reinterpret_cast<std::uintptr_t>(p + cb) % 16 == 0) {
#pragma unroll
        for (int i = 0; i < kSelPer; i += 4) {
            const float4 f = __ldg(reinterpret_cast<const float4*>(p + cb + i));
            u[i] = ordered_bits(f.x);
            u[i + 1] = ordered_bits(f.y);
            u[i + 2] = ordered_bits(f.z);
            u[i + 3] = ordered_bits(f.w);
        }
    } else {
#pragma unroll
        for (int i = 0; i < kSelPer; ++i) u[i] = i < n ? ordered_bits(p[cb + i]) : 0u;
    }
    return n;
}

// Warp 0: the bin of hist (256 counts, descending bins) holding rank k (1-based) and the rank inside it.
__device__ __forceinline__ void find_bin(const unsigned* hist, int k, unsigned* sel_bin, int* sel_k) {
    const int lane = threadIdx.x % 32;
    unsigned own = 0u;  // lane owns bins [8 lane, 8 lane + 8)
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
                *sel_bin = static_cast<unsigned>(lane * 8 + b);
                *sel_k = k - static_cast<int>(above);
                break;
            }
            above += h;
        }
    }
}

// The two radix selects run side by side: select 0 finds the K-th key, select 1 (nsel = 2, r > 0) the r-th.
// prefix[s]: the ordered value of select s's key, known down to the digits in mask; k[s]: its rank (1-based)
// among the keys that match that prefix, i.e. how many ties at the final value are taken.
struct RadixTargets {
    unsigned prefix[2] = {0u, 0u};
    unsigned mask = 0u;
    int k[2];
    int nsel;
    __device__ RadixTargets(int K, int r) : k{K, r}, nsel(r > 0 ? 2 : 1) {}
};

// One digit of both selects from the row's histograms hist[s] (complete, visible to the block): warps 0 and 1
// find the bins, every thread moves its targets down to the next digit.
__device__ __forceinline__ void radix_step(const unsigned (*hist)[256], int shift, RadixTargets& t,
                                           unsigned* sel_bin, int* sel_k) {
    const int warp = threadIdx.x / 32;
    if (warp == 0) find_bin(hist[0], t.k[0], &sel_bin[0], &sel_k[0]);
    if (warp == 1 && t.nsel == 2) find_bin(hist[1], t.k[1], &sel_bin[1], &sel_k[1]);
    __syncthreads();
#pragma unroll
    for (int s = 0; s < 2; ++s) {  // constant indices: the targets stay in registers
        if (s < t.nsel) {
            t.prefix[s] |= sel_bin[s] << shift;
            t.k[s] = sel_k[s];
        }
    }
    t.mask |= 255u << shift;
    __syncthreads();  // sel_bin / sel_k are rewritten by the next digit
}

// Keys of this thread (the first n valid) at the final value of each select, packed (low: select 0, high:
// select 1) so that one block scan serves both.
template <int kSelPer>
__device__ __forceinline__ int count_ties(const unsigned (&u)[kSelPer], int n, const RadixTargets& t) {
    int tk = 0, tr = 0;
#pragma unroll
    for (int i = 0; i < kSelPer; ++i) {
        if (i < n) {
            tk += u[i] == t.prefix[0];
            tr += t.nsel == 2 && u[i] == t.prefix[1];
        }
    }
    return tk | (tr << 16);
}

// Which of this thread's first n keys are in the retrieval zone (above the r-th key) and which in the
// estimation zone (the others above the K-th), as bit masks; rk / rr: ties at each final value taken before
// this thread's keys. Returns the counts packed (low: retrieval, high: estimation).
template <int kSelPer>
__device__ __forceinline__ int mark_zones(const unsigned (&u)[kSelPer], int n, const RadixTargets& t, int rk,
                                          int rr, unsigned& is_ret, unsigned& is_est) {
    int nr = 0, ne = 0;
    is_ret = 0u;
    is_est = 0u;
#pragma unroll
    for (int i = 0; i < kSelPer; ++i) {
        if (i >= n) break;
        bool in_k = u[i] > t.prefix[0];
        if (u[i] == t.prefix[0]) in_k = rk++ < t.k[0];
        bool in_r = false;
        if (t.nsel == 2) {
            in_r = u[i] > t.prefix[1];
            if (u[i] == t.prefix[1]) in_r = rr++ < t.k[1];
        }
        if (in_r) {
            is_ret |= 1u << i;
            ++nr;
        } else if (in_k) {
            is_est |= 1u << i;
            ++ne;
        }
    }
    return nr | (ne << 16);
}

// Writes ids cb + i of the marked keys: retrieval ones from ret_row[pr], estimation ones from est_row[pe].
template <int kSelPer>
__device__ __forceinline__ void write_zones(unsigned is_ret, unsigned is_est, long long cb, int pr, int pe,
                                            std::int64_t* ret_row, std::int64_t* est_row) {
#pragma unroll
    for (int i = 0; i < kSelPer; ++i) {
        if (is_ret & (1u << i)) ret_row[pr++] = cb + i;
        if (is_est & (1u << i)) est_row[pe++] = cb + i;
    }
}

// kCached: the row fits one chunk (C <= kSelThreads * kSelPer), its keys stay in registers for every pass.
template <int kSelPer, bool kCached>
__global__ void __launch_bounds__(kSelThreads, 1)
select_kernel(const float* __restrict__ probs, int C, int r, int K, std::int64_t* __restrict__ ret,
              std::int64_t* __restrict__ est) {
    __shared__ unsigned hist[2][256];
    __shared__ int warp_sums[32];
    __shared__ unsigned sel_bin[2];
    __shared__ int sel_k[2];
    const int g = blockIdx.x;
    const float* p = probs + static_cast<long long>(g) * C;
    constexpr int kChunk = kSelThreads * kSelPer;
    unsigned uc[kSelPer];
    int nc = 0;
    if (kCached) nc = load_keys(p, threadIdx.x * kSelPer, C, uc);

    // 1. radix selects, 8 bits a pass
    RadixTargets t(K, r);
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 512; i += kSelThreads) hist[i / 256][i % 256] = 0u;
        __syncthreads();
        if (kCached) {
            hist_add_keys(hist[0], uc, nc, t.mask, t.prefix[0], shift);
            if (t.nsel == 2) hist_add_keys(hist[1], uc, nc, t.mask, t.prefix[1], shift);
        } else {
            for (int c0 = 0; c0 < C; c0 += kChunk) {  // uniform bound: hist_add_keys needs every lane
                unsigned u[kSelPer];
                const int n = load_keys(p, static_cast<long long>(c0) + threadIdx.x * kSelPer, C, u);
                hist_add_keys(hist[0], u, n, t.mask, t.prefix[0], shift);
                if (t.nsel == 2) hist_add_keys(hist[1], u, n, t.mask, t.prefix[1], shift);
            }
        }
        __syncthreads();
        radix_step(hist, shift, t, sel_bin, sel_k);
    }

    // 2. compaction in id order: thread i of a chunk owns ids [c0 + kSelPer i, c0 + kSelPer (i + 1)). Counts are
    //    packed two to an int (a chunk holds at most 16384 ids) so that one scan serves both.
    int ties_k_before = 0, ties_r_before = 0, ret_before = 0, est_before = 0;
    std::int64_t* ret_row = ret + static_cast<long long>(g) * r;
    std::int64_t* est_row = est + static_cast<long long>(g) * (K - r);
    for (int c0 = 0; c0 < C; c0 += kChunk) {
        const int cb = c0 + threadIdx.x * kSelPer;
        const int n = keys_left(cb, C, kSelPer);
        unsigned u[kSelPer];
        if (kCached) {
#pragma unroll
            for (int i = 0; i < kSelPer; ++i) u[i] = uc[i];
        } else {
            load_keys(p, cb, C, u);
        }
        int total;
        const int tie_base = block_exclusive_scan(count_ties(u, n, t), warp_sums, &total);
        const int rk = ties_k_before + (tie_base & 0xffff), rr = ties_r_before + (tie_base >> 16);
        ties_k_before += total & 0xffff;
        ties_r_before += total >> 16;
        unsigned is_ret, is_est;
        const int out_base = block_exclusive_scan(mark_zones(u, n, t, rk, rr, is_ret, is_est), warp_sums, &total);
        write_zones<kSelPer>(is_ret, is_est, cb, ret_before + (out_base & 0xffff), est_before + (out_base >> 16),
                             ret_row, est_row);
        ret_before += total & 0xffff;
        est_before += total >> 16;
    }
}

// Long rows on a thread-block cluster (sm_90): the nb blocks of row g's cluster each hold kSelThreads * kSelPer
// ids in registers, build their own histograms, and read each other's through distributed shared memory, so a
// row is spread over nb SMs instead of walking 4 passes of L2 loads on one. The same selection as
// select_kernel: every block sums the nb histograms itself (the same result, no broadcast); the compaction
// offsets of a block are the totals of the lower ranks.
template <int kSelPer>
__global__ void __launch_bounds__(kSelThreads, 1)
select_cluster_kernel(const float* __restrict__ probs, int C, int r, int K, std::int64_t* __restrict__ ret,
                      std::int64_t* __restrict__ est) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    __shared__ unsigned hist[2][2][256];  // [pass parity][select][bin]: a pass never clears what others read
    __shared__ unsigned tot[2][256];
    __shared__ int warp_sums[32];
    __shared__ unsigned sel_bin[2];
    __shared__ int sel_k[2];
    __shared__ int blk_total[2];  // packed (low, high 16 bits): 0 ties at the cuts, 1 ids written
    const int nb = static_cast<int>(cluster.num_blocks());
    const int rank = static_cast<int>(cluster.block_rank());
    const int g = blockIdx.x / nb;
    const float* p = probs + static_cast<long long>(g) * C;
    const long long cb = static_cast<long long>(rank) * kSelThreads * kSelPer + threadIdx.x * kSelPer;
    unsigned u[kSelPer];
    const int n = load_keys(p, cb, C, u);

    RadixTargets t(K, r);
    int par = 0;
    for (int shift = 24; shift >= 0; shift -= 8, par ^= 1) {
        for (int i = threadIdx.x; i < 512; i += kSelThreads) hist[par][i / 256][i % 256] = 0u;
        __syncthreads();
        hist_add_keys(hist[par][0], u, n, t.mask, t.prefix[0], shift);
        if (t.nsel == 2) hist_add_keys(hist[par][1], u, n, t.mask, t.prefix[1], shift);
        cluster.sync();  // every block's histograms are complete
        for (int i = threadIdx.x; i < 512; i += kSelThreads) {
            unsigned sum = 0u;
            for (int b = 0; b < nb; ++b) sum += cluster.map_shared_rank(&hist[par][0][0], b)[i];
            tot[i / 256][i % 256] = sum;
        }
        __syncthreads();
        radix_step(tot, shift, t, sel_bin, sel_k);
    }

    // Compaction in id order; a block's counts fit 16 bits (at most 16384 ids), the sums over ranks do not.
    auto lower_ranks = [&](int which, int& lo, int& hi) {
        lo = 0;
        hi = 0;
        for (int b = 0; b < rank; ++b) {
            const int v = *cluster.map_shared_rank(&blk_total[which], b);
            lo += v & 0xffff;
            hi += v >> 16;
        }
    };
    int total;
    const int tie_base = block_exclusive_scan(count_ties(u, n, t), warp_sums, &total);
    if (threadIdx.x == 0) blk_total[0] = total;
    cluster.sync();
    int ties_k_before, ties_r_before;
    lower_ranks(0, ties_k_before, ties_r_before);
    unsigned is_ret, is_est;
    const int zones = mark_zones(u, n, t, ties_k_before + (tie_base & 0xffff), ties_r_before + (tie_base >> 16),
                                 is_ret, is_est);
    const int out_base = block_exclusive_scan(zones, warp_sums, &total);
    if (threadIdx.x == 0) blk_total[1] = total;
    cluster.sync();
    int ret_before, est_before;
    lower_ranks(1, ret_before, est_before);
    write_zones<kSelPer>(is_ret, is_est, cb, ret_before + (out_base & 0xffff), est_before + (out_base >> 16),
                         ret + static_cast<long long>(g) * r, est + static_cast<long long>(g) * (K - r));
    cluster.sync();  // no block leaves while another may still read its shared memory
#endif
}

// Launches select_cluster_kernel with a cluster of nb blocks a row (sm_90).
template <int kSelPer>
cudaError_t launch_select_cluster(const float* probs, int G, int C, int r, int K, std::int64_t* ret,
                                  std::int64_t* est, int nb, cudaStream_t stream) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(G) * nb);
    cfg.blockDim = dim3(kSelThreads);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = nb;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, select_cluster_kernel<kSelPer>, probs, C, r, K, ret, est);
}

}  // namespace

cudaError_t cluster_select_launch(const float* probs, int G, int C, int r, int e, std::int64_t* ret,
                                  std::int64_t* est, cudaStream_t stream) {
    const int K = r + e;
    if (G < 0 || C <= 0 || r < 0 || e < 0 || K < 1 || K > C) return cudaErrorInvalidValue;
    if (G == 0) return cudaSuccess;
    // Rows that one block would walk alone while SMs idle go to a cluster of up to 8 blocks (the portable
    // cluster size): long rows always (up to 8 x 16384 ids, keys in registers), short ones when G is small.
    static std::atomic<int> cluster_ptx[64] = {};
    if (device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9 && C > 2048 && C <= 8 * kSelThreads * 16 &&
        ptx_version(select_cluster_kernel<2>, cluster_ptx) >= 90) {
        const long long sms = device_attribute<cudaDevAttrMultiProcessorCount>();
        auto blocks = [&](int per) { return (C + kSelThreads * per - 1) / (kSelThreads * per); };
        // short rows: the most blocks a row that the SMs hold in one wave (at least 2), else one block a row
        int per = C <= kSelThreads * 8 ? (G * blocks(2) <= sms ? 2 : (G * blocks(4) <= sms ? 4 : 0))
                                       : (C <= 8 * kSelThreads * 8 ? 8 : 16);
        if (per != 0 && blocks(per) < 2) per = 0;
        cudaError_t err = cudaErrorNotSupported;
        if (per == 2) err = launch_select_cluster<2>(probs, G, C, r, K, ret, est, blocks(2), stream);
        if (per == 4) err = launch_select_cluster<4>(probs, G, C, r, K, ret, est, blocks(4), stream);
        if (per == 8) err = launch_select_cluster<8>(probs, G, C, r, K, ret, est, blocks(8), stream);
        if (per == 16) err = launch_select_cluster<16>(probs, G, C, r, K, ret, est, blocks(16), stream);
        if (err == cudaSuccess) return err;
        if (per != 0) cudaGetLastError();  // a cluster the device cannot schedule: the one-block kernel below
    }
    // 16 keys a thread past 8192 clusters: half the L2 round trips of a 1M-token row (64K clusters); 32 spill
    if (C <= kSelThreads * 8)
        select_kernel<8, true><<<G, kSelThreads, 0, stream>>>(probs, C, r, K, ret, est);
    else if (C <= kSelThreads * 16)
        select_kernel<16, true><<<G, kSelThreads, 0, stream>>>(probs, C, r, K, ret, est);
    else
        select_kernel<16, false><<<G, kSelThreads, 0, stream>>>(probs, C, r, K, ret, est);
    return cudaGetLastError();
}

}  // namespace cluster
}  // namespace kvstore
