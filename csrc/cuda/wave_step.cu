// The bookkeeping kernels of the wave decode step (see wave_step.h). The zone and mix kernels take one slot a
// team: a thread block cluster of up to 16 blocks (one block where the slots alone fill the GPU), each block a
// contiguous share of the slot's items, exchanging histograms, prefix sums and per-head statistics through
// distributed shared memory. Their cuts of an order are weighted radix selects (8-bit digits, four passes over the keys held in
// L2, a histogram per two warps) that find the key where the weights, taken in rank order, reach a budget; ties at that key are taken in
// ascending id order by a block-wide scan, so the result is the stable order's and does not depend on timing.
// Sums run in a fixed order (no float atomics).
#include "wave_step.h"

#include <cooperative_groups.h>

namespace kvstore {
namespace cluster {

namespace {

constexpr int kT = 1024;             // threads of the per-slot kernels
constexpr int kWarps = kT / 32;
constexpr int kPer = 8;              // consecutive ids a thread holds while marking
constexpr int kChunk = kT * kPer;
constexpr int kBins = 256;           // 8-bit digits
constexpr int kHistCopies = 16;      // a histogram per two warps: atomics to one bin from the whole block serialise
constexpr int kCombineThreads = 256;
constexpr int kMaxTeam = 16;         // blocks of a slot (thread block cluster, non-portable above 8)
constexpr int kTeamWords = 2 * kStepMaxHg;

// The blocks of one slot: ranks 0 .. size - 1 of a thread block cluster (size 1: a block alone).
struct Team {
    int rank, size;
};

__device__ __forceinline__ Team team_of(int size) {
    return Team{static_cast<int>(blockIdx.x % static_cast<unsigned>(size)), size};
}

// Barrier of the team (its blocks' shared-memory writes before it are visible to the team after it).
__device__ __forceinline__ void team_sync(const Team& t) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (t.size > 1) {
        cooperative_groups::this_cluster().sync();
        return;
    }
#else
    if (t.size > 1) __trap();  // the launcher makes teams only on sm_90 and later
#endif
    __syncthreads();
}

// team_sync that also publishes this block's global-memory writes to the team.
__device__ __forceinline__ void team_sync_global(const Team& t) {
    if (t.size > 1) __threadfence();
    team_sync(t);
}

// p (in this block's shared memory) in the shared memory of block `rank` of the team.
template <typename T>
__device__ __forceinline__ const T* team_peer(const Team& t, const T* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (t.size > 1) return cooperative_groups::this_cluster().map_shared_rank(const_cast<T*>(p), rank);
#endif
    return p;
}

// Words published by every block of a team, gathered by every block: a block writes pub[ph][0 .. n) then calls
// team_gather, after which all[rank * n + i] holds word i of each rank. pub is double-buffered (ph flips at each
// gather): a block rewrites a buffer only after the next gather's barrier, when every peer has read it. all lies
// in scratch shared with other stages (SelectScratch): it is read before the next __syncthreads only.
struct TeamIO {
    unsigned long long (*pub)[kTeamWords];  // [2][kTeamWords]
    unsigned long long* all;                // [kMaxTeam * kTeamWords]
};

__device__ void team_gather(const Team& t, const TeamIO& s, int& ph, int n) {
    team_sync(t);
    for (int i = threadIdx.x; i < t.size * n; i += blockDim.x) s.all[i] = *team_peer(t, &s.pub[ph][i % n], i / n);
    __syncthreads();
    ph ^= 1;
}

// Exclusive prefix over the team's ranks and total of N per-block values v (the same in every thread).
template <int N>
__device__ void team_scan(const Team& t, const TeamIO& s, int& ph, const unsigned long long (&v)[N],
                          unsigned long long (&before)[N], unsigned long long (&total)[N]) {
    if (threadIdx.x == 0)
        for (int i = 0; i < N; ++i) s.pub[ph][i] = v[i];
    team_gather(t, s, ph, N);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        before[i] = total[i] = 0ull;
        for (int r = 0; r < t.size; ++r) {
            const unsigned long long x = s.all[r * N + i];
            if (r < t.rank) before[i] += x;
            total[i] += x;
        }
    }
    __syncthreads();  // all is scratch: read by every thread before it is reused
}

__device__ __forceinline__ unsigned long long pack_maxsum(MaxSum m) {
    return static_cast<unsigned long long>(__float_as_uint(m.m)) |
           (static_cast<unsigned long long>(__float_as_uint(m.l)) << 32);
}

__device__ __forceinline__ MaxSum unpack_maxsum(unsigned long long w) {
    return MaxSum{__uint_as_float(static_cast<unsigned>(w & 0xffffffffull)), __uint_as_float(static_cast<unsigned>(w >> 32))};
}

// The share [lo, hi) of n items that rank t.rank takes.
__device__ __forceinline__ void team_range(const Team& t, long long n, long long& lo, long long& hi) {
    lo = n * t.rank / t.size;
    hi = n * (t.rank + 1) / t.size;
}

// Unsigned keys ordered like the floats (-0.0 ties with +0.0).
__device__ __forceinline__ unsigned rank_key(float f) {
    unsigned u = __float_as_uint(f);
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive block-wide prefix sum (every thread calls it); *total gets the sum.
__device__ unsigned long long scan_u64(unsigned long long v, unsigned long long* ws, unsigned long long* total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    unsigned long long incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long t = __shfl_up_sync(kFullMask, incl, o);
        if (lane >= o) incl += t;
    }
    if (lane == 31) ws[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        unsigned long long w = ws[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned long long t = __shfl_up_sync(kFullMask, w, o);
            if (lane >= o) w += t;
        }
        ws[lane] = w;
    }
    __syncthreads();
    const unsigned long long before = warp == 0 ? 0ull : ws[warp - 1];
    *total = ws[kWarps - 1];
    __syncthreads();  // ws is reused by the next call
    return before + incl - v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}

// Log-sum-exp statistics with accurate exp (the mixture weights are outputs).
__device__ __forceinline__ void push(MaxSum& s, float v) { maxsum_push<true>(s, v); }

__device__ __forceinline__ MaxSum warp_maxsum(MaxSum s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const MaxSum t{__shfl_xor_sync(kFullMask, s.m, o), __shfl_xor_sync(kFullMask, s.l, o)};
        s = maxsum_merge<true>(s, t);
    }
    return s;
}

__device__ __forceinline__ float lse_of(MaxSum s) {
    if (s.l != s.l) return s.l;
    return s.l > 0.0f ? s.m + logf(s.l) : -INFINITY;
}

// Adds w to hist[bin] for the lanes with ok (every lane of the warp calls it). A warp whose lanes all hold one
// bin (the common case in the first digits: probabilities share their exponent) adds once; otherwise each lane
// adds its own (shared-memory atomics; match_any aggregation costs more than the conflicts it saves).
__device__ __forceinline__ void hist_add(unsigned* hist, unsigned bin, unsigned w, bool ok) {
    const unsigned b = ok ? bin : 0xffffffffu;
    const unsigned b0 = __shfl_sync(kFullMask, b, 0);
    if (__all_sync(kFullMask, b == b0)) {
        if (b0 == 0xffffffffu) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        const unsigned sum = __reduce_add_sync(kFullMask, w);
#else
        unsigned sum = w;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
#endif
        if (threadIdx.x % 32 == 0) atomicAdd(&hist[b0], sum);
    } else if (ok) {
        atomicAdd(&hist[bin], w);
    }
}

// Warp 0 of the caller: the bin of hist (descending bins) where the weights reach k (1-based), and k less the
// weight of the bins above it.
__device__ void find_bin(const unsigned* hist, unsigned long long k, unsigned* bin, unsigned long long* k_in) {
    const int lane = threadIdx.x % 32;
    unsigned long long own = 0;  // lane owns bins [8 lane, 8 lane + 8), read skewed (fewer bank conflicts)
    for (int b = 0; b < 8; ++b) own += hist[lane * 8 + ((b + lane) & 7)];
    unsigned long long suffix = own;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long t = __shfl_down_sync(kFullMask, suffix, o);
        if (lane + o < 32) suffix += t;
    }
    const unsigned hit = __ballot_sync(kFullMask, suffix >= k);
    if (hit == 0u) {  // cannot happen: the keys under the prefix hold at least k
        if (lane == 0) {
            *bin = 0u;
            *k_in = k;
        }
        return;
    }
    const int top = 31 - __clz(hit);
    if (lane == top) {
        unsigned long long above = suffix - own;
        for (int b = 7; b >= 0; --b) {
            const unsigned h = hist[lane * 8 + b];
            if (above + h >= k) {
                *bin = static_cast<unsigned>(lane * 8 + b);
                *k_in = k - above;
                break;
            }
            above += h;
        }
    }
}

// A cut of an order at k units of weight: the items whose weights ranked ahead of them add up to less than k.
// mode 0: nothing; 2: every item of positive weight; 1: the items whose key is above `prefix`, and the ties at
// `prefix` (in id order) while the tie weight before them is below `k`.
struct Cut {
    unsigned prefix;
    unsigned long long k;
    int mode;
};

// Per-head statistics of a block in two steps: every warp stashes its sums of head h (stash_head), then, after
// a __syncthreads, warp h merges them (head_total, for warp < Hg).
__device__ __forceinline__ void stash_head(MaxSum (*red)[kWarps], int h, MaxSum s) {
    s = warp_maxsum(s);
    if (threadIdx.x % 32 == 0) red[h][threadIdx.x / 32] = s;
}

__device__ __forceinline__ MaxSum head_total(const MaxSum (*red)[kWarps]) {
    return warp_maxsum(red[threadIdx.x / 32][threadIdx.x % 32]);
}

struct SelectShared {
    unsigned tot[2][2][kBins];  // [phase][select][bin]: this block's histograms, published to the team
    unsigned gtot[2][kBins];    // the team's
    unsigned long long ws[kWarps];
    unsigned bin[2];
    unsigned long long k[2];
};

// Shared memory the selects use only while they run (the per-head reductions use it otherwise).
union SelectScratch {
    unsigned hist[2][kHistCopies][kBins];
    MaxSum red[2][kStepMaxHg][kWarps];
    unsigned long long all[kMaxTeam * kTeamWords];  // TeamIO::all
};

// S cuts of the slot's items whose (key, weight) kw(i, key, w) gives, at want[s] units; total: the weight of them
// all (in the whole team). This block takes the items [lo, hi); hph: the phase of sh.tot (flips every pass).
template <int S, typename KW>
__device__ void radix_cuts(Cut (&cut)[S], const long long (&want)[S], unsigned long long total, long long lo,
                           long long hi, KW kw, SelectShared& sh, SelectScratch& x, const Team& tm, int& hph) {
    bool any = false;
#pragma unroll
    for (int s = 0; s < S; ++s) {
        if (want[s] <= 0) {
            cut[s] = Cut{0u, 0ull, 0};
        } else if (static_cast<unsigned long long>(want[s]) >= total) {
            cut[s] = Cut{0u, 0ull, 2};
        } else {
            cut[s] = Cut{0u, static_cast<unsigned long long>(want[s]), 1};
            any = true;
        }
    }
    if (!any) return;  // the same in every thread of the team
    const int warp = threadIdx.x / 32, copy = warp % kHistCopies;
    unsigned mask = 0u;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < S * kHistCopies * kBins; i += kT)
            x.hist[i / (kHistCopies * kBins)][(i / kBins) % kHistCopies][i % kBins] = 0u;
        __syncthreads();
        for (long long c0 = lo; c0 < hi; c0 += kChunk) {  // uniform bounds: hist_add needs every lane
            unsigned key[kPer], w[kPer];  // every load of the chunk issued before the first atomic
#pragma unroll
            for (int i = 0; i < kPer; ++i) {
                const long long c = c0 + static_cast<long long>(i) * kT + threadIdx.x;
                key[i] = 0u;
                w[i] = 0u;
                if (c < hi) kw(c, key[i], w[i]);
            }
#pragma unroll
            for (int i = 0; i < kPer; ++i) {
#pragma unroll
                for (int s = 0; s < S; ++s) {
                    const bool ok = cut[s].mode == 1 && w[i] > 0u && (key[i] & mask) == cut[s].prefix;
                    hist_add(x.hist[s][copy], (key[i] >> shift) & 255u, w[i], ok);
                }
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < S * kBins; i += kT) {
            unsigned sum = 0u;
#pragma unroll
            for (int c = 0; c < kHistCopies; ++c) sum += x.hist[i / kBins][c][i % kBins];
            sh.tot[hph][i / kBins][i % kBins] = sum;
        }
        team_sync(tm);
        for (int i = threadIdx.x; i < S * kBins; i += kT) {  // the team's histogram, summed in rank order
            unsigned sum = 0u;
            for (int rk = 0; rk < tm.size; ++rk) sum += *team_peer(tm, &sh.tot[hph][i / kBins][i % kBins], rk);
            sh.gtot[i / kBins][i % kBins] = sum;
        }
        hph ^= 1;
        __syncthreads();
#pragma unroll
        for (int s = 0; s < S; ++s)
            if (warp == s && cut[s].mode == 1) find_bin(sh.gtot[s], cut[s].k, &sh.bin[s], &sh.k[s]);
        __syncthreads();
#pragma unroll
        for (int s = 0; s < S; ++s) {
            if (cut[s].mode == 1) {
                cut[s].prefix |= sh.bin[s] << shift;
                cut[s].k = sh.k[s];
            }
        }
        mask |= 255u << shift;
        __syncthreads();
    }
}

// The tie weight (items keyed exactly at a cut's prefix) of the items of the ranks before this block's [lo, hi),
// per cut: mark_chunk's starting carry.
template <int S, typename KW>
__device__ void team_tie_carry(const Cut (&cut)[S], long long lo, long long hi, KW kw,
                               unsigned long long (&carry)[S], SelectShared& sh, const TeamIO& ts, const Team& tm,
                               int& ph) {
#pragma unroll
    for (int s = 0; s < S; ++s) carry[s] = 0ull;
    bool any = false;
#pragma unroll
    for (int s = 0; s < S; ++s) any |= cut[s].mode == 1;
    if (tm.size == 1 || !any) return;  // the same in every thread of the team
    unsigned long long tie[S], tot[S], before[S];
#pragma unroll
    for (int s = 0; s < S; ++s) tie[s] = 0ull;
    for (long long c = lo + threadIdx.x; c < hi; c += kT) {
        unsigned key, w;
        kw(c, key, w);
#pragma unroll
        for (int s = 0; s < S; ++s)
            if (cut[s].mode == 1 && w > 0u && key == cut[s].prefix) tie[s] += w;
    }
#pragma unroll
    for (int s = 0; s < S; ++s) scan_u64(tie[s], sh.ws, &tot[s]);
    team_scan<S>(tm, ts, ph, tot, before, tie);
#pragma unroll
    for (int s = 0; s < S; ++s) carry[s] = before[s];
}

// Marks which of this thread's kPer consecutive ids of the chunk at c0 each cut takes (bit i of take[s]);
// carry[s]: the tie weight of the earlier chunks (updated). Every thread calls it.
template <int S, typename KW>
__device__ void mark_chunk(long long c0, long long n, KW kw, const Cut (&cut)[S], unsigned long long (&carry)[S],
                           unsigned (&take)[S], SelectShared& sh) {
    const long long cb = c0 + static_cast<long long>(threadIdx.x) * kPer;
    unsigned key[kPer], w[kPer];
    unsigned long long tie[S];
#pragma unroll
    for (int s = 0; s < S; ++s) tie[s] = 0ull;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
        key[i] = 0u;
        w[i] = 0u;
        if (cb + i < n) kw(cb + i, key[i], w[i]);
#pragma unroll
        for (int s = 0; s < S; ++s)
            if (cut[s].mode == 1 && key[i] == cut[s].prefix) tie[s] += w[i];
    }
    // both selects' tie weights in one scan (each below 2^32: they are token counts of one slot)
    const unsigned long long packed = S == 1 ? tie[0] : (tie[0] | (tie[S - 1] << 32));
    unsigned long long total;
    const unsigned long long before = scan_u64(packed, sh.ws, &total);
    unsigned long long tb[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
        const unsigned long long b = S == 1 ? before : (s == 0 ? (before & 0xffffffffull) : (before >> 32));
        const unsigned long long t = S == 1 ? total : (s == 0 ? (total & 0xffffffffull) : (total >> 32));
        tb[s] = carry[s] + b;
        carry[s] += t;
        take[s] = 0u;
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
#pragma unroll
        for (int s = 0; s < S; ++s) {
            bool t = false;
            if (w[i] > 0u) {
                if (cut[s].mode == 2) {
                    t = true;
                } else if (cut[s].mode == 1) {
                    t = key[i] > cut[s].prefix || (key[i] == cut[s].prefix && tb[s] < cut[s].k);
                }
            }
            if (cut[s].mode == 1 && key[i] == cut[s].prefix) tb[s] += w[i];
            take[s] |= static_cast<unsigned>(t) << i;
        }
    }
}

struct ZoneShared {
    SelectShared sel;
    SelectScratch x;
    unsigned long long pub[2][kTeamWords];  // TeamIO::pub
};

__global__ void __launch_bounds__(kT, 1) zones_kernel(const ZoneArgs a) {
    __shared__ ZoneShared sh;
    const Team tm = team_of(a.team);
    const TeamIO io{sh.pub, sh.x.all};
    const int g = blockIdx.x / a.team, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int ph = 0, hph = 0;
    const long long C = a.C;
    long long lo, hi;  // this block's clusters
    team_range(tm, C, lo, hi);
    const float* probs = a.probs + g * C;
    const float* sizes = a.sizes + g * C;
    std::uint8_t* zone = a.zone + g * C;
    const std::int64_t* off = a.offsets + g * (C + 1);
    const long long B = a.budget ? a.budget[2 * g] : a.cand_tokens;
    const long long E = a.budget ? a.budget[2 * g + 1] : a.est_tokens;
    auto by_size = [&](long long c, unsigned& key, unsigned& w) {
        key = rank_key(__ldg(probs + c));
        const float s = __ldg(sizes + c);
        w = s > 0.0f ? __float2uint_rn(s) : 0u;
    };

    unsigned long long mine = 0ull, total;
    for (long long c = lo + threadIdx.x; c < hi; c += kT) {
        unsigned k, w;
        by_size(c, k, w);
        mine += w;
    }
    scan_u64(mine, sh.sel.ws, &total);
    {
        const unsigned long long v[1] = {total};
        unsigned long long before[1], tot[1];
        team_scan<1>(tm, io, ph, v, before, tot);
        total = tot[0];
    }

    // 1. the cuts at B (candidates) and B + E (estimation zone); this block's counts of each and candidate rows
    Cut cut[2];
    const long long want[2] = {B, B + E};
    radix_cuts<2>(cut, want, total, lo, hi, by_size, sh.sel, sh.x, tm, hph);
    unsigned long long carry[2];
    team_tie_carry<2>(cut, lo, hi, by_size, carry, sh.sel, io, tm, ph);
    unsigned long long counts_mine = 0ull, rows_mine = 0ull;  // counts: candidates (low 32 bits), estimation (high)
    for (long long c0 = lo; c0 < hi; c0 += kChunk) {
        unsigned take[2];
        mark_chunk<2>(c0, hi, by_size, cut, carry, take, sh.sel);
        const long long cb = c0 + static_cast<long long>(threadIdx.x) * kPer;
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
            if (cb + i >= hi) break;
            const bool in_b = (take[0] >> i) & 1u, in_be = (take[1] >> i) & 1u;
            zone[cb + i] = in_b ? 1 : (in_be ? 2 : 0);
            if (in_b) {
                counts_mine += 1ull;
                rows_mine += static_cast<unsigned long long>(off[cb + i + 1] - off[cb + i]);
            } else if (in_be) {
                counts_mine += 1ull << 32;
            }
        }
    }
    unsigned long long cbase[2], ctot[2];  // [counts, rows] before this block and in the whole team
    {
        unsigned long long v[2];
        scan_u64(counts_mine, sh.sel.ws, &v[0]);  // its syncs also publish the zone bytes to the block
        scan_u64(rows_mine, sh.sel.ws, &v[1]);
        team_scan<2>(tm, io, ph, v, cbase, ctot);
    }
    const unsigned long long n_cand = ctot[0] & 0xffffffffull;

    // 2. the calibration clusters: the candidates after the best n_cand / 2
    auto by_cand = [&](long long c, unsigned& key, unsigned& w) {
        key = rank_key(__ldg(probs + c));
        w = zone[c] == 1 ? 1u : 0u;
    };
    Cut top[1];
    const long long want_top[1] = {static_cast<long long>(n_cand / 2)};
    radix_cuts<1>(top, want_top, n_cand, lo, hi, by_cand, sh.sel, sh.x, tm, hph);

    // 3. compaction in id order: candidates (with their runs) and the estimation zone
    std::int64_t* cand = a.cand + static_cast<long long>(g) * a.r;
    std::int64_t* run_row = a.run_row + static_cast<long long>(g) * a.r;
    std::int64_t* run_len = a.run_len + static_cast<long long>(g) * a.r;
    std::int64_t* run_pos = a.run_pos + static_cast<long long>(g) * a.r;
    std::uint8_t* low = a.cand_low + static_cast<long long>(g) * a.r;
    std::int64_t* est = a.est + static_cast<long long>(g) * a.e;
    const std::int64_t base = a.slot_base[g];
    unsigned long long carry_top[1];
    team_tie_carry<1>(top, lo, hi, by_cand, carry_top, sh.sel, io, tm, ph);
    unsigned long long counts_before = cbase[0], rows_before = cbase[1];
    for (long long c0 = lo; c0 < hi; c0 += kChunk) {
        unsigned take[1];
        mark_chunk<1>(c0, hi, by_cand, top, carry_top, take, sh.sel);
        const long long cb = c0 + static_cast<long long>(threadIdx.x) * kPer;
        unsigned z[kPer];
        long long len[kPer];
        unsigned long long counts = 0ull, rows = 0ull;
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
            z[i] = cb + i < hi ? zone[cb + i] : 0u;
            len[i] = 0;
            if (z[i] == 1u) {
                len[i] = off[cb + i + 1] - off[cb + i];
                counts += 1ull;
                rows += static_cast<unsigned long long>(len[i]);
                if (!((take[0] >> i) & 1u)) z[i] = 3u;
            } else if (z[i] == 2u) {
                counts += 1ull << 32;
            }
        }
        unsigned long long cchunk, rchunk;
        const unsigned long long cpre = scan_u64(counts, sh.sel.ws, &cchunk) + counts_before;
        const unsigned long long rpre = scan_u64(rows, sh.sel.ws, &rchunk) + rows_before;
        long long jc = static_cast<long long>(cpre & 0xffffffffull), je = static_cast<long long>(cpre >> 32);
        long long pos = static_cast<long long>(rpre);
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
            const long long c = cb + i;
            if (z[i] == 1u || z[i] == 3u) {
                if (jc < a.r) {
                    cand[jc] = c;
                    run_row[jc] = off[c] + base;
                    run_len[jc] = len[i];
                    run_pos[jc] = pos;
                    low[jc] = z[i] == 3u;
                }
                ++jc;
                pos += len[i];
                if (z[i] == 3u) zone[c] = 3;
            } else if (z[i] == 2u) {
                if (je < a.e) est[je] = c;
                ++je;
            }
        }
        counts_before += cchunk;
        rows_before += rchunk;
    }
    const long long nc = static_cast<long long>(ctot[0] & 0xffffffffull);
    const long long ne = static_cast<long long>(ctot[0] >> 32);
    const long long stride = static_cast<long long>(kT) * tm.size, first = static_cast<long long>(tm.rank) * kT;
    for (long long j = nc + first + threadIdx.x; j < a.r; j += stride) {
        cand[j] = -1;
        run_row[j] = 0;
        run_len[j] = 0;
        run_pos[j] = static_cast<long long>(ctot[1]);
        low[j] = 0;
    }
    for (long long j = ne + first + threadIdx.x; j < a.e; j += stride) est[j] = -1;
    __syncthreads();  // the calibration marks (zone 3) are visible to the block

    // 4. per head: the rest's and the calibration clusters' estimated mass
    for (int h = 0; h < a.Hg; ++h) {
        MaxSum rest{-INFINITY, 0.0f}, lo_s{-INFINITY, 0.0f};
        const float* sc = a.scores + (static_cast<long long>(g) * a.Hg + h) * C;
        for (long long c0 = lo; c0 < hi; c0 += kChunk) {
            unsigned z[kPer];
            float s[kPer], x[kPer];
#pragma unroll
            for (int i = 0; i < kPer; ++i) {  // the loads first
                const long long c = c0 + static_cast<long long>(i) * kT + threadIdx.x;
                z[i] = c < hi ? zone[c] : 1u;
                s[i] = c < hi ? __ldg(sizes + c) : 0.0f;
                x[i] = c < hi ? __ldg(sc + c) : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < kPer; ++i) {
                if (s[i] > 0.0f && (z[i] == 0u || z[i] == 3u)) {
                    const float v = x[i] + logf(s[i]);
                    if (z[i] == 0u)
                        push(rest, v);
                    else
                        push(lo_s, v);
                }
            }
        }
        stash_head(sh.x.red[0], h, rest);
        stash_head(sh.x.red[1], h, lo_s);
    }
    __syncthreads();
    const int Hg = a.Hg;
    if (warp < Hg) {
        const MaxSum rest = head_total(sh.x.red[0]);
        const MaxSum lo_s = head_total(sh.x.red[1]);
        if (lane == 0) {
            sh.pub[ph][warp] = pack_maxsum(rest);
            sh.pub[ph][Hg + warp] = pack_maxsum(lo_s);
        }
    }
    team_gather(tm, io, ph, 2 * Hg);
    if (tm.rank == 0 && threadIdx.x < Hg) {
        const int h = threadIdx.x;
        MaxSum rest{-INFINITY, 0.0f}, lo_s{-INFINITY, 0.0f};
        for (int rk = 0; rk < tm.size; ++rk) {
            rest = maxsum_merge<true>(rest, unpack_maxsum(io.all[rk * 2 * Hg + h]));
            lo_s = maxsum_merge<true>(lo_s, unpack_maxsum(io.all[rk * 2 * Hg + Hg + h]));
        }
        a.rest_lse[static_cast<long long>(g) * Hg + h] = lse_of(rest);
        a.low_lse[static_cast<long long>(g) * Hg + h] = lse_of(lo_s);
    }
    if (tm.size > 1) team_sync(tm);  // peers may still read this block's shared memory
}

struct MixShared {
    SelectShared sel;
    SelectScratch x;
    unsigned long long pub[2][kTeamWords];  // TeamIO::pub
    float dsum[kStepMaxHg][kWarps];
    float ref[kStepMaxHg];
    float off[kStepMaxHg];
    float rest_x[kStepMaxHg];
    float lse[kStepMaxHg];
};

__global__ void __launch_bounds__(kT, 1) mix_kernel(const MixArgs a) {
    __shared__ MixShared sh;
    const Team tm = team_of(a.team);
    const TeamIO io{sh.pub, sh.x.all};
    const int g = blockIdx.x / a.team, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int Hg = a.Hg, r = a.r, e = a.e, t = a.t, M = a.r + a.e;
    int ph = 0, hph = 0;
    const long long W = a.W, gl = g;
    long long jlo, jhi, plo, phi, mlo, mhi, qlo, qhi;  // this block's runs, positions, mixture entries, picks
    team_range(tm, r, jlo, jhi);
    team_range(tm, W, plo, phi);
    team_range(tm, M, mlo, mhi);
    team_range(tm, t, qlo, qhi);
    const float* ts = a.tok_scores + gl * Hg * W;
    const float* rl = a.run_lse + gl * Hg * r;
    const std::uint8_t* low = a.cand_low + gl * r;
    const std::int64_t* rpos = a.run_pos + gl * r;
    const std::int64_t* rrow = a.run_row + gl * r;
    const std::int64_t* rlen = a.run_len + gl * r;

    // 1. ref_h over every candidate; the calibration clusters' exact mass
    for (int h = 0; h < Hg; ++h) {
        MaxSum all{-INFINITY, 0.0f}, lo{-INFINITY, 0.0f};
#pragma unroll 8
        for (long long j = jlo + threadIdx.x; j < jhi; j += kT) {
            const float x = __ldg(rl + static_cast<long long>(h) * r + j);
            push(all, x);
            if (__ldg(low + j)) push(lo, x);
        }
        stash_head(sh.x.red[0], h, all);
        stash_head(sh.x.red[1], h, lo);
    }
    __syncthreads();
    if (warp < Hg) {
        const MaxSum all = head_total(sh.x.red[0]);
        const MaxSum lo = head_total(sh.x.red[1]);
        if (lane == 0) {
            sh.pub[ph][warp] = pack_maxsum(all);
            sh.pub[ph][Hg + warp] = pack_maxsum(lo);
        }
    }
    team_gather(tm, io, ph, 2 * Hg);
    if (threadIdx.x < Hg) {
        const int h = threadIdx.x;
        MaxSum all{-INFINITY, 0.0f}, lo{-INFINITY, 0.0f};
        for (int rk = 0; rk < tm.size; ++rk) {
            all = maxsum_merge<true>(all, unpack_maxsum(io.all[rk * 2 * Hg + h]));
            lo = maxsum_merge<true>(lo, unpack_maxsum(io.all[rk * 2 * Hg + Hg + h]));
        }
        const float L = lse_of(all);
        sh.ref[h] = isfinite(L) ? L : 0.0f;
        float o = 0.0f;
        if (a.calibrate && r > 0) {
            const float d = lse_of(lo) - a.low_lse[gl * Hg + h];
            o = isfinite(d) ? fminf(fmaxf(d, -8.0f), 8.0f) : 0.0f;
        }
        sh.off[h] = o;
        sh.rest_x[h] = a.rest && a.C > 0 ? a.rest_lse[gl * Hg + h] + o : -INFINITY;
    }
    __syncthreads();

    // 2. the group weight of every candidate position (-1: not a candidate)
    float* u = a.u + gl * W;
    std::uint8_t* flag = a.flag + gl * W;
    unsigned long long nv_mine = 0ull, nv;
    for (long long i0 = plo; i0 < phi; i0 += kChunk) {
        float v[kPer];
        bool ok[kPer];
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
            const long long i = i0 + static_cast<long long>(k) * kT + threadIdx.x;
            const float s0 = i < phi ? __ldg(ts + i) : -INFINITY;
            ok[k] = isfinite(s0);
            v[k] = ok[k] ? expf(s0 - sh.ref[0]) : -1.0f;
        }
        for (int h = 1; h < Hg; ++h) {
            float x[kPer];
#pragma unroll
            for (int k = 0; k < kPer; ++k) {
                const long long i = i0 + static_cast<long long>(k) * kT + threadIdx.x;
                x[k] = ok[k] ? __ldg(ts + static_cast<long long>(h) * W + i) : 0.0f;
            }
#pragma unroll
            for (int k = 0; k < kPer; ++k)
                if (ok[k]) v[k] += expf(x[k] - sh.ref[h]);
        }
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
            const long long i = i0 + static_cast<long long>(k) * kT + threadIdx.x;
            if (i < phi) u[i] = v[k];
            nv_mine += ok[k];
        }
    }
    {
        unsigned long long v[1], before[1], tot[1];
        scan_u64(nv_mine, sh.sel.ws, &v[0]);  // its syncs publish u to the block
        team_scan<1>(tm, io, ph, v, before, tot);
        nv = tot[0];
    }

    // 3. the T largest, lower position first on ties
    long long T = a.tokens ? a.tokens[g] : a.tokens_all;
    T = T < t ? T : t;
    auto by_u = [&](long long i, unsigned& key, unsigned& w) {
        const float v = u[i];
        key = rank_key(v);
        w = v >= 0.0f ? 1u : 0u;
    };
    Cut cut[1];
    const long long want[1] = {T};
    radix_cuts<1>(cut, want, nv, plo, phi, by_u, sh.sel, sh.x, tm, hph);

    // 4. the exact tokens in position order: rows (from each position's row, written a run a thread) and weights
    std::int64_t* rowof = a.rowof + gl * W;
    for (long long j = jlo + threadIdx.x; j < jhi; j += kT) {
        const long long len = rlen[j], p0 = rpos[j];
        if (len <= 0 || p0 < 0 || p0 > W - len) continue;
        for (long long i = 0; i < len; ++i) rowof[p0 + i] = rrow[j] + i;
    }
    unsigned long long carry[1];
    team_tie_carry<1>(cut, plo, phi, by_u, carry, sh.sel, io, tm, ph);
    unsigned long long picks_before = 0ull;
    auto pad_picks = [&](long long from) {  // the pads after the exact tokens, and the candidate count
        for (long long p = from + threadIdx.x; p < t; p += kT) {
            a.pick_rows[gl * t + p] = -1;
            a.pick_local[gl * t + p] = -1;
            for (int h = 0; h < Hg; ++h) a.pick_w[(gl * Hg + h) * t + p] = 0.0f;
        }
        if (threadIdx.x == 0) a.n_valid[g] = static_cast<std::int64_t>(nv);
    };
    if (tm.size > 1) {  // this block's first exact token: the counts of the ranks before it
        unsigned long long c2[1] = {carry[0]}, n_mine = 0ull, v[1], before[1], tot[1];
        for (long long c0 = plo; c0 < phi; c0 += kChunk) {
            unsigned take[1];
            mark_chunk<1>(c0, phi, by_u, cut, c2, take, sh.sel);
            n_mine += __popc(take[0]);
        }
        scan_u64(n_mine, sh.sel.ws, &v[0]);
        __threadfence();  // the scan's barrier also publishes rowof to the team
        team_scan<1>(tm, io, ph, v, before, tot);
        picks_before = before[0];
        if (tm.rank == 0) pad_picks(static_cast<long long>(tot[0]));
    } else {
        __syncthreads();  // rowof
    }
    const std::int64_t base = a.slot_base[g];
    for (long long c0 = plo; c0 < phi; c0 += kChunk) {
        unsigned take[1];
        mark_chunk<1>(c0, phi, by_u, cut, carry, take, sh.sel);
        unsigned long long tot;
        long long p = static_cast<long long>(scan_u64(__popc(take[0]), sh.sel.ws, &tot) + picks_before);
        const long long cb = c0 + static_cast<long long>(threadIdx.x) * kPer;
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
            const long long pos = cb + i;
            if (pos >= phi) break;
            const bool tk = (take[0] >> i) & 1u;
            flag[pos] = tk;
            if (!tk) continue;
            if (p < t) {
                const std::int64_t row = rowof[pos];
                a.pick_rows[gl * t + p] = row;
                a.pick_local[gl * t + p] = row - base;
                for (int h = 0; h < Hg; ++h)
                    a.pick_w[(gl * Hg + h) * t + p] = expf(ts[static_cast<long long>(h) * W + pos] - sh.ref[h]);
            }
            ++p;
        }
        picks_before += tot;
    }
    if (tm.size == 1) pad_picks(static_cast<long long>(picks_before));
    team_sync_global(tm);  // flags and pick weights visible to the team

    // 5. the exact tokens' mass per head (this block's share); each candidate's mass that they leave out
    for (int h = 0; h < Hg; ++h) {
        float s = 0.0f;
        for (long long p = qlo + threadIdx.x; p < qhi; p += kT) s += a.pick_w[(gl * Hg + h) * t + p];
        s = warp_sum(s);
        if (lane == 0) sh.dsum[h][warp] = s;
    }
    float* mw = a.mix_w + gl * Hg * M;
    for (long long j = mlo + threadIdx.x; j < mhi && j < r; j += kT) {  // a run a thread: runs are short
        const long long len = rlen[j], p0 = rpos[j];
        const bool ok = len > 0 && p0 >= 0 && p0 <= W - len;
        for (int h = 0; h < Hg; ++h) {
            float s = 0.0f;
            if (ok) {
                const float* th = ts + static_cast<long long>(h) * W;
                for (long long i = p0; i < p0 + len; ++i)
                    if (flag[i]) s += expf(th[i] - sh.ref[h]);
            }
            const float wr = expf(rl[static_cast<long long>(h) * r + j] - sh.ref[h]);
            const float un = wr - s;
            mw[static_cast<long long>(h) * M + j] = un > 1e-5f * wr ? logf(un) + sh.ref[h] : -INFINITY;
        }
        const std::int64_t c = a.cand[gl * r + j];
        a.mix_rows[gl * M + j] = c >= 0 ? gl * a.C + c : -1;
    }
    for (long long m = (mlo > r ? mlo : r) + threadIdx.x; m < mhi; m += kT) {
        const long long j = m - r;
        const std::int64_t c = __ldg(a.est + gl * e + j);
        a.mix_rows[gl * M + m] = c >= 0 ? gl * a.C + c : -1;
        const float ls = c >= 0 ? logf(__ldg(a.sizes + gl * a.C + c)) : 0.0f;
        float x[kStepMaxHg];
#pragma unroll
        for (int h = 0; h < kStepMaxHg; ++h)  // the loads first
            if (h < Hg) x[h] = c >= 0 ? __ldg(a.scores + (gl * Hg + h) * a.C + c) : 0.0f;
#pragma unroll
        for (int h = 0; h < kStepMaxHg; ++h)
            if (h < Hg) mw[static_cast<long long>(h) * M + m] = c >= 0 ? x[h] + ls + sh.off[h] : -INFINITY;
    }
    __syncthreads();

    // 6. the mixture's log-sum-exp (this block's share, then the team's), then its weights
    for (int h = 0; h < Hg; ++h) {
        MaxSum s{-INFINITY, 0.0f};
#pragma unroll 8
        for (long long j = mlo + threadIdx.x; j < mhi; j += kT) push(s, mw[static_cast<long long>(h) * M + j]);
        stash_head(sh.x.red[0], h, s);
    }
    __syncthreads();
    if (warp < Hg) {
        const MaxSum s = head_total(sh.x.red[0]);
        const float d = warp_sum(sh.dsum[warp][lane]);
        if (lane == 0) {
            sh.pub[ph][warp] = pack_maxsum(s);
            sh.pub[ph][Hg + warp] = __float_as_uint(d);
        }
    }
    team_gather(tm, io, ph, 2 * Hg);
    if (threadIdx.x < Hg) {
        const int h = threadIdx.x;
        MaxSum s{-INFINITY, 0.0f};
        float d = 0.0f;
        for (int rk = 0; rk < tm.size; ++rk) {
            s = maxsum_merge<true>(s, unpack_maxsum(io.all[rk * 2 * Hg + h]));
            d += __uint_as_float(static_cast<unsigned>(io.all[rk * 2 * Hg + Hg + h]));
        }
        push(s, sh.rest_x[h]);
        const float L = lse_of(s);
        sh.lse[h] = L;
        if (tm.rank == 0) {
            a.mix_lse[gl * Hg + h] = L;
            a.pick_d[gl * Hg + h] = d;
            a.pick_ref[gl * Hg + h] = sh.ref[h];
            const float Ls = isfinite(L) ? L : 0.0f;
            a.rest_w[gl * Hg + h] = expf(sh.rest_x[h] - Ls);
        }
    }
    __syncthreads();
    for (int h = 0; h < Hg; ++h) {
        const float L = isfinite(sh.lse[h]) ? sh.lse[h] : 0.0f;
        for (long long j0 = mlo; j0 < mhi; j0 += kChunk) {
            float x[kPer];
#pragma unroll
            for (int k = 0; k < kPer; ++k) {  // the loads first
                const long long j = j0 + static_cast<long long>(k) * kT + threadIdx.x;
                x[k] = j < mhi ? mw[static_cast<long long>(h) * M + j] : 0.0f;
            }
#pragma unroll
            for (int k = 0; k < kPer; ++k) {
                const long long j = j0 + static_cast<long long>(k) * kT + threadIdx.x;
                if (j < mhi) mw[static_cast<long long>(h) * M + j] = expf(x[k] - L);
            }
        }
    }
    if (tm.size > 1) team_sync(tm);  // peers may still read this block's shared memory
}

__device__ __forceinline__ float load_as_float(const void* p, DType dt, long long i) {
    if (dt == DType::F32) return static_cast<const float*>(p)[i];
    if (dt == DType::F16) return __half2float(static_cast<const __half*>(p)[i]);
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// Exact attention of head h of slot g over the slot's steady zone (rows [0, len) of steady_k / steady_v), for
// the combine kernel's block: returns the zone's log-sum-exp; the threads c < Dv write the zone's normalised
// output for channel c to out (0 when the zone is empty, NaN with the log-sum-exp when a score is NaN). Warp w
// takes rows w, w + kCW, ..., kR at a time with both their keys and values loaded before any use (lane l holds
// channels l, l + 32, ... < 32 kCh) and keeps an online softmax; the warps' states merge in shared memory
// (red [kCW][kStepMaxDv], wst [kCW][2]).
template <typename T, int kCh>
__device__ float steady_attention(const CombineArgs& a, long long g, long long gh, float* qs, float* red,
                                  float (*wst)[2], float* out) {
    constexpr int kCW = kCombineThreads / 32, kR = kCh <= 4 ? 8 : 4;
    const T* sk = static_cast<const T*>(a.steady_k);
    const T* sv = static_cast<const T*>(a.steady_v);
    const int D = a.D, Dv = a.Dv, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long S = a.steady_cap;
    const long long len = a.steady_len[g];
    for (int c = threadIdx.x; c < D; c += kCombineThreads) qs[c] = load_as_float(a.q, a.q_dtype, gh * D + c);
    __syncthreads();
    if (len < 0 || len > S) {  // the same in every thread
        for (int c = threadIdx.x; c < Dv; c += kCombineThreads) out[c] = quiet_nan();
        return quiet_nan();
    }
    const long long row0 = g * S;
    float qr[kCh];
#pragma unroll
    for (int j = 0; j < kCh; ++j) qr[j] = lane + 32 * j < D ? qs[lane + 32 * j] : 0.0f;
    float m = -INFINITY, l = 0.0f, acc[kCh];
    bool bad = false;
#pragma unroll
    for (int j = 0; j < kCh; ++j) acc[j] = 0.0f;
    for (long long i0 = warp; i0 < len; i0 += static_cast<long long>(kCW) * kR) {
        float kx[kR][kCh], vx[kR][kCh];
#pragma unroll
        for (int u = 0; u < kR; ++u) {
            const long long i = i0 + static_cast<long long>(u) * kCW;
            const bool ok = i < len;
            const long long rk = (row0 + (ok ? i : 0)) * D, rv = (row0 + (ok ? i : 0)) * Dv;
#pragma unroll
            for (int j = 0; j < kCh; ++j) {
                const int c = lane + 32 * j;
                kx[u][j] = ok && c < D ? to_float(sk[rk + c]) : 0.0f;
                vx[u][j] = ok && c < Dv ? to_float(sv[rv + c]) : 0.0f;
            }
        }
        float sc[kR], rm = -INFINITY;
#pragma unroll
        for (int u = 0; u < kR; ++u) {
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < kCh; ++j) dot += qr[j] * kx[u][j];
            dot = warp_sum(dot);
            sc[u] = i0 + static_cast<long long>(u) * kCW < len ? dot * a.scale : -INFINITY;
            bad |= sc[u] != sc[u];
            rm = fmaxf(rm, sc[u]);
        }
        const float nm = fmaxf(m, rm);
        if (nm > -INFINITY) {
            const float f = m > -INFINITY ? expf(m - nm) : 0.0f;
            l *= f;
#pragma unroll
            for (int j = 0; j < kCh; ++j) acc[j] *= f;
#pragma unroll
            for (int u = 0; u < kR; ++u) {
                const float p = sc[u] > -INFINITY ? expf(sc[u] - nm) : 0.0f;
                l += p;
#pragma unroll
                for (int j = 0; j < kCh; ++j) acc[j] += p * vx[u][j];
            }
            m = nm;
        }
    }
    if (lane == 0) {
        wst[warp][0] = bad ? quiet_nan() : m;
        wst[warp][1] = l;
    }
#pragma unroll
    for (int j = 0; j < kCh; ++j)
        if (lane + 32 * j < Dv) red[warp * kStepMaxDv + lane + 32 * j] = acc[j];
    __syncthreads();
    float M = -INFINITY;
    bool nan = false;
#pragma unroll
    for (int w = 0; w < kCW; ++w) {
        nan |= wst[w][0] != wst[w][0];
        M = fmaxf(M, wst[w][0]);
    }
    if (nan) {
        for (int c = threadIdx.x; c < Dv; c += kCombineThreads) out[c] = quiet_nan();
        return quiet_nan();
    }
    if (!(M > -INFINITY)) return -INFINITY;  // out stays 0
    float L = 0.0f, f[kCW];
#pragma unroll
    for (int w = 0; w < kCW; ++w) {
        f[w] = wst[w][0] > -INFINITY ? expf(wst[w][0] - M) : 0.0f;
        L += f[w] * wst[w][1];
    }
    for (int c = threadIdx.x; c < Dv; c += kCombineThreads) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kCW; ++w) sum += f[w] * red[w * kStepMaxDv + c];
        out[c] = sum / L;
    }
    return M + logf(L);
}

// A block per (slot, head): warp w sums the chunks w, w + 8, ... of both parts (lane l holds channels l, l + 32,
// ...); the block attends the steady zone; then the parts merge.
template <typename T, int kCh>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const CombineArgs a) {
    constexpr int kCW = kCombineThreads / 32, kPerLane = kStepMaxDv / 32;
    __shared__ float part[2][kCW][kStepMaxDv];
    __shared__ float qs[kStepMaxD];
    __shared__ float wst[kCombineThreads / 32][2];
    __shared__ float st[kStepMaxDv];
    const long long gh = blockIdx.x, g = gh / a.Hg;
    const int h = static_cast<int>(gh % a.Hg), Hg = a.Hg, Dv = a.Dv;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float np[kPerLane], nm[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) np[i] = nm[i] = 0.0f;
    for (long long k = warp; k < a.pick_chunks; k += kCW) {
        const float* src = a.pick_part + ((g * a.pick_chunks + k) * Hg + h) * Dv;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
            if (lane + 32 * i < Dv) np[i] += src[lane + 32 * i];
    }
    for (long long k = warp; k < a.mix_chunks; k += kCW) {
        const float* src = a.mix_part + ((g * a.mix_chunks + k) * Hg + h) * Dv;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
            if (lane + 32 * i < Dv) nm[i] += src[lane + 32 * i];
    }
    for (int c = threadIdx.x; c < Dv; c += kCombineThreads) st[c] = 0.0f;
    // part[0] is free until the chunk sums below: the steady zone's row groups use it
    const float ls = steady_attention<T, kCh>(a, g, gh, qs, &part[0][0][0], wst, st);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        if (lane + 32 * i < Dv) {
            part[0][warp][lane + 32 * i] = np[i];
            part[1][warp][lane + 32 * i] = nm[i];
        }
    }
    __syncthreads();
    const float d = a.pick_d[gh];
    const float lp = d > 0.0f ? a.pick_ref[gh] + logf(d) : -INFINITY;
    const float lm = a.mix_lse[gh];
    const float m = fmaxf(fmaxf(lp, lm), ls);
    const float ms = isfinite(m) ? m : 0.0f;
    const float ep = expf(lp - ms), em = expf(lm - ms), es = expf(ls - ms);
    const float den = ep + em + es;
    const float rw = a.rest_w[gh];
    for (int c = threadIdx.x; c < Dv; c += kCombineThreads) {
        float sp = 0.0f, sm = rw * a.value_mean[g * Dv + c];
#pragma unroll
        for (int w = 0; w < kCW; ++w) {
            sp += part[0][w][c];
            sm += part[1][w][c];
        }
        const float op = d > 0.0f ? sp / d : 0.0f;
        const float num = (ep > 0.0f ? ep * op : 0.0f) + (em > 0.0f ? em * sm : 0.0f) + (es > 0.0f ? es * st[c] : 0.0f);
        a.o[gh * Dv + c] = den > 0.0f ? num / den : (den == den ? num : den);
    }
    if (threadIdx.x == 0) a.lse[gh] = den > 0.0f ? ms + logf(den) : (den == den ? -INFINITY : den);
}

}  // namespace

namespace {

// The most blocks a team of `kernel` may have on this device (clusters need sm_90; above 8 they are
// non-portable), and how many teams of each size are resident at once (0: that size does not launch).
struct TeamLimits {
    int sms = 0;
    int resident[kMaxTeam + 1] = {};
};

template <typename Args>
const TeamLimits& team_limits(void (*kernel)(Args)) {
    static TeamLimits cache[64];
    static bool ready[64] = {};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
    TeamLimits& t = cache[dev];
    if (!ready[dev]) {
        int major = 0;
        cudaDeviceGetAttribute(&t.sms, cudaDevAttrMultiProcessorCount, dev);
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        t.resident[1] = t.sms;
        if (major >= 9) {
            cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
            for (int size = 2; size <= kMaxTeam; size *= 2) {
                cudaLaunchConfig_t cfg = {};
                cudaLaunchAttribute attr[1];
                attr[0].id = cudaLaunchAttributeClusterDimension;
                attr[0].val.clusterDim.x = size;
                attr[0].val.clusterDim.y = 1;
                attr[0].val.clusterDim.z = 1;
                cfg.gridDim = dim3(size * 64);
                cfg.blockDim = dim3(kT);
                cfg.attrs = attr;
                cfg.numAttrs = 1;
                int n = 0;
                if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) n = 0;
                t.resident[size] = n;
            }
            cudaGetLastError();  // a size the device refuses leaves no error behind
        }
        ready[dev] = true;
    }
    return t;
}

template <typename Args>
int choose_team(void (*kernel)(Args), int G, int requested) {
    const TeamLimits& lim = team_limits(kernel);
    if (requested > 0) return requested <= kMaxTeam && lim.resident[requested] > 0 ? requested : -1;
    int team = 1;
    for (int size = 2; size <= kMaxTeam; size *= 2)
        if (static_cast<long long>(G) * size <= lim.sms && lim.resident[size] >= G) team = size;
    // a team's exchanges cost more than halving a slot's work saves (H200, 64 slots: teams of 2 were slower)
    return team >= 4 ? team : 1;
}

template <typename Args>
cudaError_t launch_teams(void (*kernel)(Args), Args a, cudaStream_t stream) {
    a.team = choose_team(kernel, a.G, a.team);
    if (a.team < 1) return cudaErrorInvalidValue;
    if (a.team == 1) {
        kernel<<<a.G, kT, 0, stream>>>(a);
        return cudaGetLastError();
    }
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = a.team;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(a.G) * a.team);
    cfg.blockDim = dim3(kT);
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, a);
}

}  // namespace

int wave_team_size(int G, int requested) { return choose_team(zones_kernel, G, requested); }

cudaError_t wave_zones_launch(const ZoneArgs& a, cudaStream_t stream) {
    if (a.G < 0 || a.Hg < 1 || a.Hg > kStepMaxHg || a.C < 0 || a.r < 0 || a.e < 0 || a.team < 0) return cudaErrorInvalidValue;
    if (a.G == 0) return cudaSuccess;
    if (static_cast<long long>(a.G) * kMaxTeam > 2147483647LL) return cudaErrorInvalidValue;
    return launch_teams(zones_kernel, a, stream);
}

cudaError_t wave_mix_launch(const MixArgs& a, cudaStream_t stream) {
    if (a.G < 0 || a.Hg < 1 || a.Hg > kStepMaxHg || a.C < 0 || a.r < 0 || a.e < 0 || a.t < 0 || a.W < 0 ||
        a.team < 0)
        return cudaErrorInvalidValue;
    if (a.G == 0) return cudaSuccess;
    if (static_cast<long long>(a.G) * kMaxTeam > 2147483647LL) return cudaErrorInvalidValue;
    return launch_teams(mix_kernel, a, stream);
}

cudaError_t wave_combine_launch(const CombineArgs& a, cudaStream_t stream) {
    if (a.G < 0 || a.Hg < 1 || a.Dv < 1 || a.Dv > kStepMaxDv || a.D < 1 || a.D > kStepMaxD || a.steady_cap < 0 ||
        a.pick_chunks < 1 || a.mix_chunks < 1)
        return cudaErrorInvalidValue;
    if (a.G == 0) return cudaSuccess;
    const long long blocks = static_cast<long long>(a.G) * a.Hg;
    if (blocks > 2147483647LL) return cudaErrorInvalidValue;
    const int widest = a.D > a.Dv ? a.D : a.Dv;
    auto launch = [&](auto tag) -> cudaError_t {
        using T = decltype(tag);
        if (widest <= 64) {
            combine_kernel<T, 2><<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(a);
        } else if (widest <= 128) {
            combine_kernel<T, 4><<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(a);
        } else {
            combine_kernel<T, 8><<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(a);
        }
        return cudaSuccess;
    };
    switch (a.kv_dtype) {
        case DType::F32:
            launch(float{});
            break;
        case DType::F16:
            launch(__half{});
            break;
        case DType::BF16:
            launch(__nv_bfloat16{});
            break;
        default:
            return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

}  // namespace cluster
}  // namespace kvstore
