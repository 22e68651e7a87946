// Candidate scores (see candidate_scores.h). T is q's type, TK the keys' (T, or int8 copies with a scale a row).
// Int8 keys with 16-bit queries take the tensor-core kernel further down; the others this one.
// A block takes kRunsPerBlock consecutive runs of one slot (the
// blocks of a slot are consecutive: they share its queries in L2) and stages the slot's Hg queries in shared
// memory as float; then each warp takes a run at a time (the next run's table entry loaded ahead). The lane groups
// of kLpr lanes of a warp take kU rows of the run at a time (kU = 2 when the runs average 8 rows or fewer, so that
// short runs, the best clusters being the small ones, leave fewer lanes idle; else 4) (group i: rows i, i + kGroups, ...); lane l of a group
// reads the 16-byte chunks l, l + kLpr, ... of a row (8 lanes: a 128-byte line per row and load) and multiplies
// them with the query chunks of kHb heads at once (the short-run variant keeps 6 blocks an SM: its 80 registers
// leave no spills; the other needs more). The group's sums are scattered over its lanes
// (group_reduce_scatter): each lane writes the scores of a few rows of one head and keeps that head's online
// softmax statistics in shared memory, merged into the run's log-sum-exp when the run ends. Every key row is read
// once.
#include "candidate_scores.h"

#include <atomic>
#include <type_traits>

namespace kvstore {
namespace cluster {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRunsPerBlock = 16;  // the default (4 runs a warp): fewer query stagings than 8, a smaller tail than 32

struct CandArgs {
    const void* q;
    const void* keys;
    long long rows;
    const std::int64_t* run_row;
    const std::int64_t* run_len;
    const std::int64_t* run_pos;
    int G, Hg, D, r;
    long long width;
    float scale;
    float* scores;
    float* run_lse;
    int runs_per_block;
    const float* key_scale;  // int8 keys: row i scores (q . keys[i]) * key_scale[i]
};

template <typename T, typename TK, int kVec, int kLpr, int kChunks, int kHb, int kU>
__global__ void __launch_bounds__(kThreads, kU == 2 ? (sizeof(TK) == 1 ? 8 : 6) : 4)
    candidate_kernel(const CandArgs a) {
    static_assert(kLpr % kHb == 0, "the lanes of a group split evenly over the heads");
    constexpr bool kInt8 = sizeof(TK) == 1;
    constexpr int kGroups = 32 / kLpr;          // lane groups of a warp
    constexpr int kLanesPerHead = kLpr / kHb;   // lanes of a group that end with one head's sums
    constexpr int kN = kU * kHb;                // sums of a lane group per step (group_reduce_scatter)
    constexpr int kM = kN >= kLpr ? kN / kLpr : 1;      // sums a lane ends with
    constexpr int kShare = kN >= kLpr ? 1 : kLpr / kN;  // lanes that end with each sum
    extern __shared__ float4 smem4[];
    const int Hg = a.Hg, D = a.D, r = a.r;
    const int passes = (Hg + kHb - 1) / kHb;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gi = lane / kLpr, li = lane % kLpr;
    // the first of this lane's kM rows of a step; the first lane of the kShare holding a sum (owner) writes it
    const int u0 = li / kShare * kM % kU;
    const bool owner = li % kShare == 0;
    float* qs = reinterpret_cast<float*>(smem4);                                 // [Hg, D] (stage_queries)
    MaxSum* st = reinterpret_cast<MaxSum*>(qs + Hg * D) + warp * passes * 32;  // this warp's [passes, 32 lanes]

    const int rpb = a.runs_per_block;
    const int blocks_per_slot = (r + rpb - 1) / rpb;
    const long long g = blockIdx.x / blocks_per_slot;
    const int j0 = static_cast<int>(blockIdx.x % blocks_per_slot) * rpb;
    const int j1 = min(j0 + rpb, r);
    stage_queries<T, kVec>(static_cast<const T*>(a.q) + g * Hg * D, Hg * D, D, qs);
    __syncthreads();

    const std::int64_t *run_row = a.run_row + g * r, *run_len = a.run_len + g * r, *run_pos = a.run_pos + g * r;
    long long next_row = 0, next_len = 0, next_pos = 0;
    if (j0 + warp < j1) {
        next_row = run_row[j0 + warp];
        next_len = run_len[j0 + warp];
        next_pos = run_pos[j0 + warp];
    }
    for (int j = j0 + warp; j < j1; j += kWarps) {  // uniform over the warp: the shuffles need every lane
        const long long row0 = next_row, len = next_len, pos0 = next_pos;
        if (j + kWarps < j1) {
            next_row = run_row[j + kWarps];
            next_len = run_len[j + kWarps];
            next_pos = run_pos[j + kWarps];
        }
        float* lse = a.run_lse + g * Hg * r + j;  // head h at lse[h * r]
        if (len <= 0 || row0 < 0 || pos0 < 0 || row0 > a.rows - len || pos0 > a.width - len) {
            const float v = len == 0 ? neg_inf() : quiet_nan();  // empty, or outside keys / the width: skipped
            for (int h = lane; h < Hg; h += 32) lse[static_cast<long long>(h) * r] = v;
            continue;
        }
        for (int p = 0; p < passes; ++p) st[p * 32 + lane] = MaxSum{-INFINITY, 0.0f};
        const TK* kr = static_cast<const TK*>(a.keys) + row0 * D;
        const float* ks = kInt8 ? a.key_scale + row0 : nullptr;
        float* out = a.scores + g * Hg * a.width + pos0;  // head h at out[h * width]
        for (long long base = 0; base < len; base += kGroups * kU) {
            // int8 keys: the scales of the rows this lane ends with, loaded before the rows so that their
            // latency overlaps the rows' instead of following the reduction
            float ksv[kM];
#pragma unroll
            for (int m = 0; m < kM; ++m) {
                const long long i = base + (u0 + m) * kGroups + gi;
                ksv[m] = kInt8 && i < len ? __ldg(ks + i) * a.scale : a.scale;
            }
            for (int h0 = 0; h0 < Hg; h0 += kHb) {
                float acc[kU][kHb];
                rows_dot_heads<TK, kVec, kLpr, kChunks, kU, kHb>(acc, qs, D, h0, Hg, li, [&](int u) {
                    const long long i = base + u * kGroups + gi;
                    return i < len ? kr + i * D : nullptr;
                });
                // The group's sums scattered over its lanes: lane li gets rows u0 .. u0 + kM - 1 of head
                // h0 + li / kLanesPerHead, writes their scores and keeps that head's statistics.
                float part[kN];
#pragma unroll
                for (int h = 0; h < kHb; ++h)
#pragma unroll
                    for (int u = 0; u < kU; ++u) part[h * kU + u] = acc[u][h];
                group_reduce_scatter<kLpr, kN>(part, li);
                const int hh = h0 + li / kLanesPerHead;
                if (owner && hh < Hg) {
                    MaxSum s = st[(h0 / kHb) * 32 + lane];
#pragma unroll
                    for (int m = 0; m < kM; ++m) {
                        const long long i = base + (u0 + m) * kGroups + gi;
                        if (i >= len) break;
                        const float v = part[m] * ksv[m];
                        out[hh * a.width + i] = v;
                        maxsum_push(s, v);
                    }
                    st[(h0 / kHb) * 32 + lane] = s;
                }
            }
        }
        __syncwarp();
        for (int h = lane; h < Hg; h += 32) {  // head h's statistics: kLanesPerHead lanes of each group
            const MaxSum* sh = st + (h / kHb) * 32 + (h % kHb) * kLanesPerHead;
            MaxSum s{-INFINITY, 0.0f};
            for (int i = 0; i < kGroups; ++i)
                s = maxsum_merge(s, maxsum_merge_strided(sh + i * kLpr, kLanesPerHead, 1));
            lse[static_cast<long long>(h) * r] = s.l > 0.0f ? s.m + __logf(s.l) : -INFINITY;
        }
        __syncwarp();  // st is reset by the warp's next run
    }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core variant for int8 keys and bf16 / fp16 queries, D in {64, 128, 256}, Hg <= 16 (sm_80+). A block
// takes kFlatRuns consecutive runs of a slot and lays their rows end to end ("local rows", in run order), so that
// short runs (the best clusters are the small ones) leave no lanes idle. Each warp step scores kU groups of 8
// local rows with one mma.m16n8k16 per 16 channels as the centroid-score kernel does (A: the group's queries, heads
// >= Hg zero; B: 8 rows converted from int8 without integer-to-float instructions), held raw until their MMA so
// that every load of the step is in flight at once. Lane (g, t) loads local row 8 u + g (its run found by a binary
// search of the block's run prefix in shared memory) and ends with the scores of head g (and g + 8) for local rows
// 8 u + 2 t and 8 u + 2 t + 1, whose scale and position it takes from the lanes that loaded them. Scores go to
// their positions and, a tile of kTile local rows at a time, to shared memory, from which each (run, head)
// pair's online softmax statistics are updated. Every key row is read once.
constexpr int kFlatThreads = 256;
constexpr int kFlatMaxRuns = 128;  // runs a block at most (a thread each for the prefix)
constexpr int kFlatRuns = 64;      // runs a block (the fastest of 16 to 128 on the H200)

template <typename T, int D, bool kTwoRows>
__global__ void __launch_bounds__(kFlatThreads, 2) candidate_mma_kernel(const CandArgs a) {
    constexpr int NJ = D / 32;                 // chunk steps: 4 lanes x 8 elements each
    constexpr int kU = D >= 256 ? 2 : 4;       // groups of 8 local rows a warp step
    constexpr int kWarpRows = 8 * kU;
    constexpr int kTile = (kFlatThreads / 32) * kWarpRows;
    constexpr int kPad = kTile + 8;            // row pitch of the tile scores (heads g and g + 4 share banks only)
    __shared__ long long s_row[kFlatMaxRuns], s_pos[kFlatMaxRuns];
    __shared__ long long s_lp[kFlatMaxRuns + 1];  // local rows of the valid runs before run j
    __shared__ long long s_wsum[kFlatMaxRuns / 32];
    __shared__ MaxSum s_st[kFlatMaxRuns][16];
    __shared__ float s_sc[16][kPad];
    const int Hg = a.Hg, r = a.r, R = a.runs_per_block;  // R: runs a block, 1 .. kFlatMaxRuns
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gr = lane / 4, t = lane % 4;
    const int blocks_per_slot = (r + R - 1) / R;
    const long long g = blockIdx.x / blocks_per_slot;
    const int j0 = static_cast<int>(blockIdx.x % blocks_per_slot) * R;
    const int nr = min(R, r - j0);
    float* lse = a.run_lse + g * Hg * r + j0;  // head h, run j at lse[h * r + j]

    // 1. the block's runs (thread j: run j0 + j): valid ones get their rows in local order, the others their
    // log-sum-exp now
    long long incl = 0;
    if (threadIdx.x < kFlatMaxRuns) {
        const int j = threadIdx.x;
        long long row0 = 0, len = 0, pos0 = 0;
        if (j < nr) {
            row0 = a.run_row[g * r + j0 + j];
            len = a.run_len[g * r + j0 + j];
            pos0 = a.run_pos[g * r + j0 + j];
            if (len <= 0 || row0 < 0 || pos0 < 0 || row0 > a.rows - len || pos0 > a.width - len) {
                const float v = len == 0 ? neg_inf() : quiet_nan();  // empty, or outside keys / the width
                for (int h = 0; h < Hg; ++h) lse[static_cast<long long>(h) * r + j] = v;
                len = 0;
            }
        }
        s_row[j] = row0;
        s_pos[j] = pos0;
        incl = len;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const long long x = __shfl_up_sync(kFullMask, incl, o);
            if (lane >= o) incl += x;
        }
        if (lane == 31) s_wsum[warp] = incl;
    }
    for (int i = threadIdx.x; i < kFlatMaxRuns * 16; i += kFlatThreads)
        s_st[i / 16][i % 16] = MaxSum{-INFINITY, 0.0f};
    __syncthreads();
    if (threadIdx.x < kFlatMaxRuns) {
        for (int w = 0; w < warp; ++w) incl += s_wsum[w];
        s_lp[threadIdx.x + 1] = incl;
        if (threadIdx.x == 0) s_lp[0] = 0;
    }
    // A fragments: chunk 4 j + t of heads gr and gr + 8 (zero past Hg)
    uint4 qa[NJ], qb[NJ];
    load_query_fragments<T, NJ, kTwoRows>(static_cast<const T*>(a.q) + g * Hg * D, Hg, D, gr, t, qa, qb);
    __syncthreads();
    const long long total = s_lp[kFlatMaxRuns];
    const signed char* keys = static_cast<const signed char*>(a.keys);
    float* out_a = a.scores + (g * Hg + gr) * a.width;
    float* out_b = a.scores + (g * Hg + gr + 8) * a.width;

    // 2. tiles of local rows: scores, then the statistics of the runs that meet the tile
    for (long long T0 = 0; T0 < total; T0 += kTile) {
        const long long wb = T0 + warp * kWarpRows;
        uint2 x[kU][NJ];
        float ks[kU];
        long long op[kU];  // output position of the loaded row, -1: none
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const long long L = wb + 8 * u + gr;
            ks[u] = 0.0f;
            op[u] = -1;
            long long row = -1;
            if (L < total) {
                int lo = 0, hi = kFlatMaxRuns - 1;  // the last run whose prefix is <= L (it holds L: length > 0)
                while (lo < hi) {
                    const int mid = (lo + hi + 1) / 2;
                    if (s_lp[mid] <= L) lo = mid; else hi = mid - 1;
                }
                row = s_row[lo] + (L - s_lp[lo]);
                op[u] = s_pos[lo] + (L - s_lp[lo]);
                ks[u] = __ldg(a.key_scale + row) * a.scale;
            }
#pragma unroll
            for (int j = 0; j < NJ; ++j)
                x[u][j] = row >= 0 ? __ldg(reinterpret_cast<const uint2*>(keys + row * D + (4 * j + t) * 8))
                                   : make_uint2(0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const uint4 b = i8x8_to_pairs<T>(x[u][j]);
                mma_chunk<T>(acc, qa[j], qb[j], b);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {  // local row 8 u + 2 t + i was loaded by lane 4 (2 t + i)
                const float sc = __shfl_sync(kFullMask, ks[u], 4 * (2 * t + i));
                const long long pos = __shfl_sync(kFullMask, op[u], 4 * (2 * t + i));
                const int c = 8 * u + 2 * t + i + warp * kWarpRows;
                if (pos < 0) continue;
                if (gr < Hg) {
                    const float v = acc[i] * sc;
                    out_a[pos] = v;
                    s_sc[gr][c] = v;
                }
                if (kTwoRows && gr + 8 < Hg) {
                    const float v = acc[2 + i] * sc;
                    out_b[pos] = v;
                    s_sc[gr + 8][c] = v;
                }
            }
        }
        __syncthreads();
        for (int p = threadIdx.x; p < nr * Hg; p += kFlatThreads) {
            const int j = p / Hg, h = p % Hg;
            const long long lo = max(s_lp[j], T0), hi = min(s_lp[j + 1], T0 + kTile);
            if (lo >= hi) continue;
            MaxSum st = s_st[j][h];
            for (long long L = lo; L < hi; ++L) maxsum_push(st, s_sc[h][L - T0]);
            s_st[j][h] = st;
        }
        __syncthreads();
    }
    // 3. the valid runs' log-sum-exp
    for (int p = threadIdx.x; p < nr * Hg; p += kFlatThreads) {
        const int j = p / Hg, h = p % Hg;
        if (s_lp[j + 1] == s_lp[j]) continue;  // empty or skipped: written in step 1
        const MaxSum st = s_st[j][h];
        lse[static_cast<long long>(h) * r + j] = st.l > 0.0f ? st.m + __logf(st.l) : -INFINITY;
    }
}

// Whether the tensor-core variant takes these arguments on the current device (and launches it).
template <typename T>
bool try_candidate_mma(const CandArgs& a, cudaStream_t stream) {
    static std::atomic<int> cache[64] = {};
    if ((a.D != 64 && a.D != 128 && a.D != 256) || a.Hg > 16 || a.key_scale == nullptr ||
        !is_aligned(a.keys, 8) || !is_aligned(a.q, 16) ||
        device_attribute<cudaDevAttrComputeCapabilityMajor>() < 8 ||
        ptx_version(candidate_mma_kernel<T, 128, false>, cache) < 80)
        return false;
    CandArgs b = a;
    b.runs_per_block = kFlatRuns;
    const unsigned blocks =
        static_cast<unsigned>(static_cast<long long>(a.G) * ((a.r + b.runs_per_block - 1) / b.runs_per_block));
    const bool two = a.Hg > 8;
    if (a.D == 64)
        two ? candidate_mma_kernel<T, 64, true><<<blocks, kFlatThreads, 0, stream>>>(b)
            : candidate_mma_kernel<T, 64, false><<<blocks, kFlatThreads, 0, stream>>>(b);
    else if (a.D == 128)
        two ? candidate_mma_kernel<T, 128, true><<<blocks, kFlatThreads, 0, stream>>>(b)
            : candidate_mma_kernel<T, 128, false><<<blocks, kFlatThreads, 0, stream>>>(b);
    else
        two ? candidate_mma_kernel<T, 256, true><<<blocks, kFlatThreads, 0, stream>>>(b)
            : candidate_mma_kernel<T, 256, false><<<blocks, kFlatThreads, 0, stream>>>(b);
    return true;
}

template <typename T, typename TK, int kVec, int kLpr, int kChunks, int kHb>
cudaError_t launch(const CandArgs& a, cudaStream_t stream) {
    const size_t smem = sizeof(float) * a.Hg * a.D + sizeof(MaxSum) * kThreads * ((a.Hg + kHb - 1) / kHb);
    const long long blocks = static_cast<long long>(a.G) * ((a.r + a.runs_per_block - 1) / a.runs_per_block);
    if (a.width <= 8LL * a.r)  // runs of 8 rows or fewer on average
        candidate_kernel<T, TK, kVec, kLpr, kChunks, kHb, 2>
            <<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a);
    else
        candidate_kernel<T, TK, kVec, kLpr, kChunks, kHb, 4>
            <<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a);
    return cudaGetLastError();
}

template <int N>
using Int = std::integral_constant<int, N>;

template <typename T, typename TK>
cudaError_t dispatch(const CandArgs& a, cudaStream_t stream) {
    auto heads = [&](auto vec, auto lpr, auto chunks) {
        constexpr int kVec = decltype(vec)::value, kLpr = decltype(lpr)::value, kCh = decltype(chunks)::value;
        if (a.Hg == 1) return launch<T, TK, kVec, kLpr, kCh, 1>(a, stream);
        if (a.Hg == 2) return launch<T, TK, kVec, kLpr, kCh, 2>(a, stream);
        if (a.Hg <= 4) return launch<T, TK, kVec, kLpr, kCh, 4>(a, stream);
        return launch<T, TK, kVec, kLpr, kCh, 8>(a, stream);
    };
    // 16-byte chunks read by 8 lanes a row, two chunks a lane in flight when the row has them; otherwise element
    // by element, 32 lanes a row.
    constexpr int kVec = Vec16<TK>::kN;
    if (a.D % kVec != 0 || !is_aligned(a.keys, 16)) return heads(Int<1>{}, Int<32>{}, Int<1>{});
    if (a.D / kVec >= 16) return heads(Int<kVec>{}, Int<8>{}, Int<2>{});
    return heads(Int<kVec>{}, Int<8>{}, Int<1>{});
}

}  // namespace

cudaError_t candidate_scores_launch(const void* q, const void* keys, DType dtype, int G, int Hg, int D, int r,
                                    long long rows, const std::int64_t* run_row, const std::int64_t* run_len,
                                    const std::int64_t* run_pos, long long width, float scale, float* scores,
                                    float* run_lse, cudaStream_t stream, int runs_per_block, const float* key_scale) {
    if (G < 0 || Hg < 0 || Hg > kCandMaxHg || D < 1 || static_cast<long long>(Hg) * D > kCandMaxHgTimesD || r < 0 ||
        rows < 0 || width < 0 || static_cast<long long>(G) * r > 0x7fffffffLL || runs_per_block < 0 ||
        runs_per_block > 4096)
        return cudaErrorInvalidValue;
    if (static_cast<long long>(G) * r == 0 || Hg == 0) return cudaSuccess;
    const CandArgs a{q, keys, rows, run_row, run_len, run_pos, G, Hg, D, r, width, scale, scores, run_lse,
                     runs_per_block > 0 ? runs_per_block : kRunsPerBlock, key_scale};
    switch (dtype) {
        case DType::F32:
            return key_scale ? dispatch<float, std::int8_t>(a, stream) : dispatch<float, float>(a, stream);
        case DType::F16:
            if (key_scale && try_candidate_mma<__half>(a, stream)) return cudaGetLastError();
            return key_scale ? dispatch<__half, std::int8_t>(a, stream) : dispatch<__half, __half>(a, stream);
        case DType::BF16:
            if (key_scale && try_candidate_mma<__nv_bfloat16>(a, stream)) return cudaGetLastError();
            return key_scale ? dispatch<__nv_bfloat16, std::int8_t>(a, stream)
                             : dispatch<__nv_bfloat16, __nv_bfloat16>(a, stream);
        default:
            return cudaErrorInvalidValue;
    }
}

}  // namespace cluster
}  // namespace kvstore
