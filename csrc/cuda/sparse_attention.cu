// Sparse decode attention (split-K "flash decoding" over row runs) plus the
// wave index's estimation zone, merged by log-sum-exp. See sparse_attention.h.
//
// Partial kernel, exact part (block (g, s), s < num_splits): the lanes of a
// warp are cut into row groups of LANES lanes; a group reads one K row and
// one V row per step with vector loads (EK key elements per lane), scores it
// against every query head of the slot (GQA: a row is read once for the whole
// group) and keeps its own online softmax (m, l, acc) per head in log2 units.
// The rows of the chunk are dealt to the row groups of the block in turn, U
// rows per group per step (loads of the U rows are issued before any is
// used). The runs are located by a block-wide prefix scan of the slot's run
// lengths, one tile of 128 runs at a time, so shared memory stays bounded
// however many runs a slot has.
// Estimation part (block (g, num_splits + e)): a warp takes 32 clusters at a
// time (ids, sizes, scores loaded lane-parallel), then reads their f32 value
// sums with the whole warp, several rows in flight.
// Both end with the warps' states in shared memory, combined into one
// normalised partial per head; the last block of a slot to finish (a counter
// per slot) merges the slot's partials.
#include "sparse_attention.h"

namespace kvstore {
namespace attn {
namespace {

constexpr int kWarps = kAttnThreads / 32;

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: exp2(-inf) = +0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float fast_log2(float x) {  // lg2.approx: log2(0) = -inf
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Lane layout of the exact part for keys of D elements of T and values of DV.
template <typename T, int D, int DV, int HG>
struct KvLayout {
    // 8-byte vectors for large groups halve the registers holding q and acc.
    static constexpr int kVecBytes = HG >= 8 ? 8 : 16;
    static constexpr int kVecElems = kVecBytes / static_cast<int>(sizeof(T));
    static constexpr int EK = kVecElems > D / 32 ? kVecElems : D / 32;  // key elements per lane
    static constexpr int LANES = D / EK;                                 // lanes per row
    static constexpr int RPW = 32 / LANES;                               // rows per warp per step
    static constexpr int NSLOT = kWarps * RPW;                           // row groups per block
    static constexpr int VPL = DV / LANES;                               // value elements per lane
    static constexpr int U = HG >= 16 ? 2 : 4;                           // rows per group per step
    static_assert(LANES * EK == D && LANES <= 32 && 32 % LANES == 0, "bad key layout");
    static_assert(VPL * LANES == DV, "bad value layout");
};

template <int DV, int HG>
struct Smem {
    float acc[kWarps][HG][DV];  // per-warp softmax states
    float m[kWarps][HG];
    float l[kWarps][HG];
    long long start[kAttnThreads + 1];  // tile of runs: first position of each run in the slot
    long long row[kAttnThreads];
    int src[kAttnThreads];
    long long red[kWarps];
    const void* k[kMaxSources];
    const void* v[kMaxSources];
    long long rows[kMaxSources];
};

// Block-wide sum; every thread gets it.
__device__ __forceinline__ long long block_sum(long long x, long long* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
    __syncthreads();
    long long t = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += red[w];
    __syncthreads();
    return t;
}

// Block-wide inclusive scan; `total` gets the block's sum.
__device__ __forceinline__ long long block_scan(long long x, long long* red, long long& total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const long long y = __shfl_up_sync(kFullMask, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) red[warp] = x;
    __syncthreads();
    long long before = 0, t = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
        if (w < warp) before += red[w];
        t += red[w];
    }
    total = t;
    __syncthreads();
    return x + before;
}

// Exact attention of slot g's query heads over the split-th chunk of its rows.
// Leaves each warp's state in sm; returns true when the slot's run table is invalid.
template <typename T, int D, int DV, int HG>
__device__ __forceinline__ bool kv_partial(const SparseAttentionArgs& a, int g, int split, Smem<DV, HG>& sm) {
    using L = KvLayout<T, D, DV, HG>;
    constexpr int EK = L::EK, VPL = L::VPL, U = L::U, LANES = L::LANES;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int sub = lane % LANES;                    // lane within its row group
    const int slot = warp * L::RPW + lane / LANES;  // row group within the block

    if (tid == 0) {
#pragma unroll
        for (int i = 0; i < kMaxSources; ++i) {
            sm.k[i] = a.k[i];
            sm.v[i] = a.v[i];
            sm.rows[i] = a.rows[i];
        }
    }

    // This lane's slice of every query head, in log2 units (heads >= Hg are 0).
    float qr[HG][EK];
    {
        const T* qg = static_cast<const T*>(a.q) + static_cast<long long>(g) * a.Hg * D + sub * EK;
        const float qs = a.scale * kLog2e;
#pragma unroll
        for (int h = 0; h < HG; ++h) {
            float f[EK];
            if (h < a.Hg) {
                Raw<T, EK> r;
                load_raw(qg + static_cast<long long>(h) * D, r);
                raw_to_float(r, f);
            } else {
#pragma unroll
                for (int e = 0; e < EK; ++e) f[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < EK; ++e) qr[h][e] = f[e] * qs;
        }
    }

    long long r0 = a.run_offsets[g], r1 = a.run_offsets[g + 1];
    int bad = !(0 <= r0 && r0 <= r1 && r1 <= a.num_runs);
    if (bad) r1 = r0;
    __syncthreads();  // sm.k / v / rows

    // Pass 1: the slot's row count, and the validity of every run.
    long long tot = 0;
    for (long long r = r0 + tid; r < r1; r += kAttnThreads) {
        const int src = a.run_src[r];
        const int len = a.run_len[r];
        const long long row = a.run_row[r];
        if (src < 0 || src >= a.num_sources || len < 0 || row < 0 || row + len > sm.rows[src])
            bad = 1;
        else
            tot += len;
    }
    if (__syncthreads_or(bad)) return true;
    tot = block_sum(tot, sm.red);

    float m[HG], l[HG], acc[HG][VPL];
#pragma unroll
    for (int h = 0; h < HG; ++h) {
        m[h] = neg_inf();
        l[h] = 0.0f;
#pragma unroll
        for (int e = 0; e < VPL; ++e) acc[h][e] = 0.0f;
    }

    const long long chunk = (tot + a.num_splits - 1) / a.num_splits;
    const long long c0 = min(tot, split * chunk), c1 = min(tot, c0 + chunk);
    long long tile_base = 0;  // position in the slot of the tile's first row
    for (long long t0 = r0; c0 < c1 && t0 < r1 && tile_base < c1; t0 += kAttnThreads) {
        const long long r = t0 + tid;
        int len = 0, src = 0;
        long long row = 0;
        if (r < r1) {
            len = a.run_len[r];
            src = a.run_src[r];
            row = a.run_row[r];
        }
        long long total;
        const long long incl = block_scan(len, sm.red, total);
        sm.start[tid] = tile_base + incl - len;
        sm.src[tid] = src;
        sm.row[tid] = row;
        if (tid == 0) sm.start[kAttnThreads] = tile_base + total;
        __syncthreads();
        const long long tile_end = tile_base + total;
        const long long lo = max(c0, tile_base), hi = min(c1, tile_end);
        int ri = 0;  // this group's run cursor: positions only grow
        for (long long base = lo; base < hi; base += L::NSLOT * U) {
            Raw<T, EK> kr[U];
            Raw<T, VPL> vr[U];
            bool ok[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const long long p = base + u * L::NSLOT + slot;
                ok[u] = p < hi;
                if (ok[u]) {
                    while (sm.start[ri + 1] <= p) ++ri;
                    const int s = sm.src[ri];
                    const long long rr = sm.row[ri] + (p - sm.start[ri]);
                    load_raw(static_cast<const T*>(sm.k[s]) + rr * D + sub * EK, kr[u]);
                    load_raw(static_cast<const T*>(sm.v[s]) + rr * DV + sub * VPL, vr[u]);
                } else {
                    zero_raw(kr[u]);
                    zero_raw(vr[u]);
                }
            }
            float sc[U][HG];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float kf[EK];
                raw_to_float(kr[u], kf);
#pragma unroll
                for (int h = 0; h < HG; ++h) {
                    float d = 0.0f;
#pragma unroll
                    for (int e = 0; e < EK; ++e) d = fmaf(qr[h][e], kf[e], d);
                    d = group_sum<LANES>(d);
                    sc[u][h] = ok[u] ? d : neg_inf();
                }
            }
#pragma unroll
            for (int h = 0; h < HG; ++h) {
                float mx = m[h];
#pragma unroll
                for (int u = 0; u < U; ++u) mx = fmaxf(mx, sc[u][h]);
                const float corr = fast_exp2(m[h] - safe_max(mx));
                l[h] *= corr;
#pragma unroll
                for (int e = 0; e < VPL; ++e) acc[h][e] *= corr;
                m[h] = mx;
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float vf[VPL];
                raw_to_float(vr[u], vf);
#pragma unroll
                for (int h = 0; h < HG; ++h) {
                    const float p = fast_exp2(sc[u][h] - safe_max(m[h]));
                    l[h] += p;
#pragma unroll
                    for (int e = 0; e < VPL; ++e) acc[h][e] = fmaf(p, vf[e], acc[h][e]);
                }
            }
        }
        tile_base = tile_end;
        __syncthreads();  // the next tile overwrites sm.start / src / row
    }

    // Fold the warp's row groups (lanes LANES, 2 * LANES, ... apart) into group 0.
#pragma unroll
    for (int o = LANES; o < 32; o <<= 1) {
#pragma unroll
        for (int h = 0; h < HG; ++h) {
            const float mo = __shfl_xor_sync(kFullMask, m[h], o);
            const float lo = __shfl_xor_sync(kFullMask, l[h], o);
            const float mx = fmaxf(m[h], mo);
            const float w0 = fast_exp2(m[h] - safe_max(mx)), w1 = fast_exp2(mo - safe_max(mx));
            l[h] = l[h] * w0 + lo * w1;
#pragma unroll
            for (int e = 0; e < VPL; ++e) {
                const float ao = __shfl_xor_sync(kFullMask, acc[h][e], o);
                acc[h][e] = acc[h][e] * w0 + ao * w1;
            }
            m[h] = mx;
        }
    }
    if (lane < LANES) {
#pragma unroll
        for (int h = 0; h < HG; ++h) {
#pragma unroll
            for (int e = 0; e < VPL; ++e) sm.acc[warp][h][sub * VPL + e] = acc[h][e];
            if (lane == 0) {
                sm.m[warp][h] = m[h];
                sm.l[warp][h] = l[h];
            }
        }
    }
    return false;
}

// Estimation clusters of slot g, the es-th of est_splits chunks of its E ids.
// A warp takes 32 clusters at a time, one per lane for the id, size and scores (all loaded in parallel, the
// next 32 while the current ones are summed), then walks them reading each cluster's f32 value sum with the
// whole warp (Dv / 32 floats a lane, kUE rows in flight) while the weights come by shuffle. Leaves each
// warp's state in sm; returns true when an id is outside [0, C).
template <int DV, int HG>
__device__ __forceinline__ bool est_partial(const SparseAttentionArgs& a, int g, int es, Smem<DV, HG>& sm) {
    constexpr int VPE = DV / 32;  // value-sum floats per lane
    constexpr int kUE = 16;       // value-sum rows in flight per lane
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long E = a.E, C = a.C;
    const long long chunk = (E + a.est_splits - 1) / a.est_splits;
    const long long e0 = min(E, es * chunk), e1 = min(E, e0 + chunk);
    const long long* ids = reinterpret_cast<const long long*>(a.est_ids) + g * E;
    const float* sizes = a.est_sizes + g * C;
    const float* scores = a.est_scores + static_cast<long long>(g) * a.Hg * C;
    const float* vsum = a.est_value_sums + g * C * DV;

    float m[HG], l[HG], acc[HG][VPE];
#pragma unroll
    for (int h = 0; h < HG; ++h) {
        m[h] = neg_inf();
        l[h] = 0.0f;
#pragma unroll
        for (int e = 0; e < VPE; ++e) acc[h][e] = 0.0f;
    }
    int bad = 0;
    // Lane i's cluster of the batch at `base`: its id (ok = in the chunk and in range), then size and scores.
    auto load_id = [&](long long base, long long& id, bool& ok) {
        const long long e = base + lane;
        ok = e < e1;
        id = ok ? ids[e] : 0;
    };
    auto load_meta = [&](long long& id, bool& ok, float& sz, float (&s)[HG]) {
        if (ok && (id < 0 || id >= C)) {
            bad = 1;
            ok = false;
        }
        if (!ok) id = 0;
        sz = ok ? sizes[id] : 0.0f;
#pragma unroll
        for (int h = 0; h < HG; ++h) s[h] = (ok && h < a.Hg) ? scores[h * C + id] * kLog2e : neg_inf();
    };
    const long long stride = 32LL * kWarps;
    long long id;
    bool ok;
    float sz, s[HG];
    load_id(e0 + 32LL * warp, id, ok);
    load_meta(id, ok, sz, s);
    for (long long base = e0 + 32LL * warp; base < e1; base += stride) {
        long long id_n;
        bool ok_n;
        float sz_n, s_n[HG];
        load_id(base + stride, id_n, ok_n);  // the next batch, in flight during this one
        ok = ok && sz > 0.0f;
        float w[HG];  // this lane's cluster weight per head, against the updated running max
#pragma unroll
        for (int h = 0; h < HG; ++h) {
            if (!ok) s[h] = neg_inf();
            const float mx = fmaxf(m[h], warp_max(s[h]));
            const float mu = safe_max(mx);
            const float corr = fast_exp2(m[h] - mu);
            w[h] = fast_exp2(s[h] - mu);
            l[h] = l[h] * corr + warp_sum(w[h] * sz);
#pragma unroll
            for (int x = 0; x < VPE; ++x) acc[h][x] *= corr;
            m[h] = mx;
        }
        const unsigned live = __ballot_sync(kFullMask, ok);
        const int n = 32 - __clz(live);  // clusters up to the last live one
        for (int j0 = 0; j0 < n; j0 += kUE) {
            Raw<float, VPE> vr[kUE];
#pragma unroll
            for (int u = 0; u < kUE; ++u) {
                const int j = j0 + u;
                const long long idj = __shfl_sync(kFullMask, id, j & 31);
                if (j < n && ((live >> j) & 1u))
                    load_raw(vsum + idj * DV + lane * VPE, vr[u]);
                else
                    zero_raw(vr[u]);
            }
            if (j0 == 0) load_meta(id_n, ok_n, sz_n, s_n);  // behind the first value sums
#pragma unroll
            for (int u = 0; u < kUE; ++u) {
                float vf[VPE];
                raw_to_float(vr[u], vf);
#pragma unroll
                for (int h = 0; h < HG; ++h) {
                    const float p = __shfl_sync(kFullMask, w[h], (j0 + u) & 31);
#pragma unroll
                    for (int x = 0; x < VPE; ++x) acc[h][x] = fmaf(p, vf[x], acc[h][x]);
                }
            }
        }
        if (n == 0) load_meta(id_n, ok_n, sz_n, s_n);
        id = id_n;
        ok = ok_n;
        sz = sz_n;
#pragma unroll
        for (int h = 0; h < HG; ++h) s[h] = s_n[h];
    }
    if (__syncthreads_or(bad)) return true;
#pragma unroll
    for (int h = 0; h < HG; ++h) {
#pragma unroll
        for (int x = 0; x < VPE; ++x) sm.acc[warp][h][lane * VPE + x] = acc[h][x];
        if (lane == 0) {
            sm.m[warp][h] = m[h];
            sm.l[warp][h] = l[h];
        }
    }
    return false;
}

// Log-sum-exp merge of row n's P partials by one warp (see merge_partials_launch). The parts' weights are
// computed 32 at a time, one a lane, and passed by shuffle, so the loads of o do not wait on the loads of
// lse; reads go to L2 (__ldcg): in the fused path the parts were written by other blocks of the same launch.
template <typename TO>
__device__ __forceinline__ void merge_row(const float* o_parts, const float* lse_parts, long long n, int P, int Dv,
                                          long long o_sn, long long o_sp, long long l_sn, long long l_sp,
                                          float lse_to_log2, TO* out_o, float* out_lse) {
    const int lane = threadIdx.x % 32;
    const float* lp = lse_parts + n * l_sn;
    const float* op = o_parts + n * o_sn;
    float mx = neg_inf();
    int nan = 0;
    for (int p = lane; p < P; p += 32) {
        const float x = __ldcg(lp + p * l_sp) * lse_to_log2;
        nan |= isnan(x);
        mx = fmaxf(mx, x);
    }
    mx = warp_max(mx);
    nan = __any_sync(kFullMask, nan);
    const float mu = safe_max(mx);
    float den = 0.0f;
    for (int p = lane; p < P; p += 32) den += fast_exp2(__ldcg(lp + p * l_sp) * lse_to_log2 - mu);
    den = warp_sum(den);
    const float inv = den > 0.0f ? 1.0f / den : 0.0f;
    for (int d0 = 0; d0 < Dv; d0 += 128) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int p0 = 0; p0 < P; p0 += 32) {
            const int pl = p0 + lane;
            const float wl = pl < P ? fast_exp2(__ldcg(lp + pl * l_sp) * lse_to_log2 - mu) : 0.0f;
            const int np = min(32, P - p0);
#pragma unroll 8  // independent loads in flight
            for (int i = 0; i < np; ++i) {
                const float w = __shfl_sync(kFullMask, wl, i);
                const float* o = op + (p0 + i) * o_sp;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int d = d0 + 32 * j + lane;
                    const float x = d < Dv ? __ldcg(o + d) : 0.0f;
                    acc[j] = fmaf(w, w == 0.0f ? 0.0f : x, acc[j]);  // an empty part's o is ignored
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int d = d0 + 32 * j + lane;
            if (d < Dv) out_o[n * Dv + d] = from_float<TO>(nan ? quiet_nan() : acc[j] * inv);
        }
    }
    if (lane == 0) out_lse[n] = nan ? quiet_nan() : (den > 0.0f ? (mu + fast_log2(den)) * kLn2 : neg_inf());
}

// Resident blocks per SM the partial kernel is compiled for: 4 (registers capped at 128, no spills) where the
// per-lane query and accumulator slices are small, else 2.
template <typename T, int D, int DV, int HG>
constexpr int partial_min_blocks() {
    return HG <= 4 && KvLayout<T, D, DV, HG>::VPL <= 8 ? 4 : 2;
}

template <typename T, int D, int DV, int HG>
__global__ void __launch_bounds__(kAttnThreads, (partial_min_blocks<T, D, DV, HG>()))
    partial_kernel(const SparseAttentionArgs a) {
    __shared__ Smem<DV, HG> sm;
    const int g = blockIdx.x, split = blockIdx.y;
    const bool bad = split < a.num_splits ? kv_partial<T, D, DV, HG>(a, g, split, sm)
                                          : est_partial<DV, HG>(a, g, split - a.num_splits, sm);
    __syncthreads();
    const int S = a.num_splits + a.est_splits;
    for (int idx = threadIdx.x; idx < a.Hg * DV; idx += kAttnThreads) {
        const int h = idx / DV, d = idx % DV;
        float o = quiet_nan(), lse = quiet_nan();
        if (!bad) {
            float mx = neg_inf();
#pragma unroll
            for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm.m[w][h]);
            const float mu = safe_max(mx);
            float den = 0.0f, num = 0.0f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float f = fast_exp2(sm.m[w][h] - mu);
                den = fmaf(sm.l[w][h], f, den);
                num = fmaf(sm.acc[w][h][d], f, num);
            }
            o = den > 0.0f ? num / den : 0.0f;
            lse = den > 0.0f ? mu + fast_log2(den) : neg_inf();
        }
        const long long part = (static_cast<long long>(g) * a.Hg + h) * S + split;
        a.ws_o[part * DV + d] = o;
        if (d == 0) a.ws_lse[part] = lse;
    }
    // The slot's last block to finish merges its S partials (no merge launch).
    __shared__ int last;
    __threadfence();  // this block's partial is visible before it is counted
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&a.counters[g], 1) == S - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int h = threadIdx.x / 32; h < a.Hg; h += kWarps) {
        const long long n = static_cast<long long>(g) * a.Hg + h;
        merge_row<T>(a.ws_o, a.ws_lse, n, S, DV, static_cast<long long>(S) * DV, DV, S, 1, 1.0f,
                     static_cast<T*>(a.out_o), a.out_lse);
    }
    if (threadIdx.x == 0) a.counters[g] = 0;  // ready for the next launch (and graph replay)
}

// One warp per row n: merge its P partials.
template <typename TO>
__global__ void __launch_bounds__(kAttnThreads)
    merge_kernel(const float* __restrict__ o_parts, const float* __restrict__ lse_parts, long long N, int P, int Dv,
                 long long o_sn, long long o_sp, long long l_sn, long long l_sp, float lse_to_log2,
                 TO* __restrict__ out_o, float* __restrict__ out_lse) {
    const long long n = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (n >= N) return;  // whole warps
    merge_row<TO>(o_parts, lse_parts, n, P, Dv, o_sn, o_sp, l_sn, l_sp, lse_to_log2, out_o, out_lse);
}

// f(partial_kernel<T, D, DV, HG>) for the instantiation serving (dtype, D, Dv, Hg), which the caller has checked
// with valid_dtype and sparse_attention_supported: the one dispatch of the launch and the occupancy query.
template <typename T, int D, int DV, typename F>
auto with_group(int Hg, F&& f) {
    if (Hg <= 1) return f(partial_kernel<T, D, DV, 1>);
    if (Hg <= 2) return f(partial_kernel<T, D, DV, 2>);
    if (Hg <= 4) return f(partial_kernel<T, D, DV, 4>);
    if (Hg <= 8) return f(partial_kernel<T, D, DV, 8>);
    return f(partial_kernel<T, D, DV, 16>);
}

template <typename T, typename F>
auto with_dims(int D, int Dv, int Hg, F&& f) {
    if (D == 64 && Dv == 64) return with_group<T, 64, 64>(Hg, f);
    if (D == 64 && Dv == 128) return with_group<T, 64, 128>(Hg, f);
    if (D == 128 && Dv == 64) return with_group<T, 128, 64>(Hg, f);
    return with_group<T, 128, 128>(Hg, f);
}

template <typename F>
auto with_partial_kernel(DType dtype, int D, int Dv, int Hg, F&& f) {
    switch (dtype) {
        case DType::F32:
            return with_dims<float>(D, Dv, Hg, f);
        case DType::F16:
            return with_dims<__half>(D, Dv, Hg, f);
        default:
            return with_dims<__nv_bfloat16>(D, Dv, Hg, f);
    }
}

template <typename TO>
cudaError_t launch_merge(const float* o_parts, const float* lse_parts, long long N, int P, int Dv, long long o_sn,
                         long long o_sp, long long l_sn, long long l_sp, float lse_to_log2, void* out_o,
                         float* out_lse, cudaStream_t stream) {
    const long long blocks = (N + kWarps - 1) / kWarps;
    merge_kernel<TO><<<static_cast<unsigned>(blocks), kAttnThreads, 0, stream>>>(
        o_parts, lse_parts, N, P, Dv, o_sn, o_sp, l_sn, l_sp, lse_to_log2, static_cast<TO*>(out_o), out_lse);
    return cudaGetLastError();
}

bool valid_dtype(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

}  // namespace

int sparse_attention_blocks_per_sm(DType dtype, int D, int Dv, int Hg) {
    if (!valid_dtype(dtype) || !sparse_attention_supported(D, Dv, Hg)) return 0;
    return with_partial_kernel(dtype, D, Dv, Hg, [](auto kernel) {
        int n = 0;
        return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kAttnThreads, 0) == cudaSuccess ? n : 0;
    });
}

bool sparse_attention_supported(int D, int Dv, int Hg) {
    return (D == 64 || D == 128) && (Dv == 64 || Dv == 128) && Hg >= 1 && Hg <= kMaxGroup;
}

int64_t sparse_attention_workspace_o(const SparseAttentionArgs& a) {
    return static_cast<int64_t>(a.G) * a.Hg * (a.num_splits + a.est_splits) * a.Dv;
}

int64_t sparse_attention_workspace_lse(const SparseAttentionArgs& a) {
    return static_cast<int64_t>(a.G) * a.Hg * (a.num_splits + a.est_splits);
}

cudaError_t merge_partials_launch(const float* o_parts, const float* lse_parts, int64_t N, int P, int Dv,
                                  int64_t o_sn, int64_t o_sp, int64_t l_sn, int64_t l_sp, float lse_to_log2,
                                  DType out_dtype, void* out_o, float* out_lse, cudaStream_t stream) {
    if (N < 0 || P < 0 || Dv < 0 || !valid_dtype(out_dtype)) return cudaErrorInvalidValue;
    if (N == 0) return cudaSuccess;
    if ((N + kWarps - 1) / kWarps > 0x7fffffffLL) return cudaErrorInvalidValue;
    if (out_o == nullptr || out_lse == nullptr || (P > 0 && lse_parts == nullptr) ||
        (P > 0 && Dv > 0 && o_parts == nullptr))
        return cudaErrorInvalidValue;
    switch (out_dtype) {
        case DType::F32:
            return launch_merge<float>(o_parts, lse_parts, N, P, Dv, o_sn, o_sp, l_sn, l_sp, lse_to_log2, out_o,
                                       out_lse, stream);
        case DType::F16:
            return launch_merge<__half>(o_parts, lse_parts, N, P, Dv, o_sn, o_sp, l_sn, l_sp, lse_to_log2, out_o,
                                        out_lse, stream);
        default:
            return launch_merge<__nv_bfloat16>(o_parts, lse_parts, N, P, Dv, o_sn, o_sp, l_sn, l_sp, lse_to_log2,
                                               out_o, out_lse, stream);
    }
}

cudaError_t sparse_decode_attention_launch(const SparseAttentionArgs& a, cudaStream_t stream) {
    if (!valid_dtype(a.dtype) || a.G < 0) return cudaErrorInvalidValue;
    if (a.G == 0) return cudaSuccess;
    if (!sparse_attention_supported(a.D, a.Dv, a.Hg)) return cudaErrorInvalidValue;
    if (a.num_splits < 1 || a.est_splits < 0 || a.num_splits + a.est_splits > kMaxSplits) return cudaErrorInvalidValue;
    if (a.num_sources < 1 || a.num_sources > kMaxSources || a.num_runs < 0) return cudaErrorInvalidValue;
    if (a.q == nullptr || !is_aligned(a.q, 16) || a.run_offsets == nullptr) return cudaErrorInvalidValue;
    if (a.num_runs > 0 && (a.run_src == nullptr || a.run_row == nullptr || a.run_len == nullptr))
        return cudaErrorInvalidValue;
    for (int i = 0; i < a.num_sources; ++i) {
        if (a.rows[i] < 0) return cudaErrorInvalidValue;
        if (a.rows[i] > 0 && (a.k[i] == nullptr || a.v[i] == nullptr || !is_aligned(a.k[i], 16) ||
                              !is_aligned(a.v[i], 16)))
            return cudaErrorInvalidValue;
    }
    if (a.est_splits > 0 && a.E > 0) {
        if (a.C < 1 || a.est_scores == nullptr || a.est_sizes == nullptr || a.est_ids == nullptr ||
            a.est_value_sums == nullptr || !is_aligned(a.est_value_sums, 16))
            return cudaErrorInvalidValue;
    }
    if (a.ws_o == nullptr || a.ws_lse == nullptr || a.counters == nullptr || a.out_o == nullptr ||
        a.out_lse == nullptr)
        return cudaErrorInvalidValue;

    const dim3 grid(static_cast<unsigned>(a.G), static_cast<unsigned>(a.num_splits + a.est_splits));
    return with_partial_kernel(a.dtype, a.D, a.Dv, a.Hg, [&](auto kernel) {
        kernel<<<grid, kAttnThreads, 0, stream>>>(a);
        return cudaGetLastError();
    });
}

}  // namespace attn
}  // namespace kvstore
