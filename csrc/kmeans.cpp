#include "kmeans.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "distance.h"
#include "omp_guard.h"

namespace kvstore {

namespace {

std::uint64_t splitmix64(std::uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

constexpr std::int64_t kPhaseSteps = 1024;  // resolution of the init stride phase

// cn[j] = c[j] / ||c[j]|| (norm in double; a zero centroid stays zero).
void normalise(const std::vector<float>& c, std::int64_t C, int d, std::vector<float>& cn) {
    for (std::int64_t j = 0; j < C; ++j) {
        const float* src = c.data() + j * d;
        float* dst = cn.data() + j * d;
        double s = 0.0;
        for (int t = 0; t < d; ++t) s += static_cast<double>(src[t]) * src[t];
        const double nrm = std::sqrt(s);
        for (int t = 0; t < d; ++t) dst[t] = nrm > 0.0 ? static_cast<float>(src[t] / nrm) : 0.0f;
    }
}

// Four inner products x_t . c at once: each centroid element is loaded once
// for four tokens (the assignment pass is bound by these loads).
KVSTORE_MULTIVERSION
void dot4(const float* __restrict x0, const float* __restrict x1, const float* __restrict x2,
          const float* __restrict x3, const float* __restrict c, int d, float* out) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int t = 0; t < d; ++t) {
        const float ct = c[t];
        s0 += x0[t] * ct;
        s1 += x1[t] * ct;
        s2 += x2[t] * ct;
        s3 += x3[t] * ct;
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

// a[i] = argmax_j x_i . cn_j (first maximum wins), best[i] = that score.
// Tokens go in fixed blocks of four (the last ones one by one), so a token's
// scores do not depend on the number of threads.
void assign_pass(const float* x, std::int64_t ns, int d, const float* cn, std::int64_t C, std::int32_t* a,
                 float* best, int nt) {
    const std::int64_t nblocks = (ns + 3) / 4;
    OmpErrors errs;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (std::int64_t blk = 0; blk < nblocks; ++blk) {
        errs.run([&] {
            const std::int64_t i0 = blk * 4;
            if (i0 + 4 <= ns) {
                const float* xi = x + i0 * d;
                float bs[4], s[4];
                std::int32_t bj[4] = {0, 0, 0, 0};
                dot4(xi, xi + d, xi + 2 * d, xi + 3 * d, cn, d, bs);
                for (std::int64_t j = 1; j < C; ++j) {
                    dot4(xi, xi + d, xi + 2 * d, xi + 3 * d, cn + j * d, d, s);
                    for (int u = 0; u < 4; ++u) {
                        if (s[u] > bs[u]) {
                            bs[u] = s[u];
                            bj[u] = static_cast<std::int32_t>(j);
                        }
                    }
                }
                for (int u = 0; u < 4; ++u) {
                    a[i0 + u] = bj[u];
                    best[i0 + u] = bs[u];
                }
                return;
            }
            for (std::int64_t i = i0; i < ns; ++i) {
                const float* xi = x + i * d;
                float bsc = dot(xi, cn, static_cast<std::size_t>(d));
                std::int32_t bjc = 0;
                for (std::int64_t j = 1; j < C; ++j) {
                    const float sc = dot(xi, cn + j * d, static_cast<std::size_t>(d));
                    if (sc > bsc) {
                        bsc = sc;
                        bjc = static_cast<std::int32_t>(j);
                    }
                }
                a[i] = bjc;
                best[i] = bsc;
            }
        });
    }
    errs.rethrow();
}

// Clusters the centred keys x [ns, d] of one segment into C clusters; writes
// the local assignment of the final pass to a [ns].
void cluster_segment(const float* x, std::int64_t ns, int d, std::int64_t C, int iters, std::uint64_t seed,
                     int nt, std::int32_t* a) {
    std::vector<float> c(static_cast<std::size_t>(C) * d), cn(c.size()), best(static_cast<std::size_t>(ns));
    const std::int64_t phase = static_cast<std::int64_t>(splitmix64(seed) % kPhaseSteps);
    for (std::int64_t j = 0; j < C; ++j) {
        // floor((j + phase / 1024) * ns / C), exact in 128-bit integers
        const unsigned __int128 num = static_cast<unsigned __int128>(j * kPhaseSteps + phase) * ns;
        const std::int64_t row = static_cast<std::int64_t>(num / static_cast<unsigned __int128>(C * kPhaseSteps));
        std::copy(x + row * d, x + (row + 1) * d, c.begin() + j * d);
    }
    std::vector<double> sums(c.size());
    std::vector<std::int64_t> cnt(static_cast<std::size_t>(C));
    std::vector<double> norm2;  // ||x_i||^2, computed when first needed
    std::vector<std::int64_t> empty, pick;
    for (int it = 0; it < iters; ++it) {
        normalise(c, C, d, cn);
        assign_pass(x, ns, d, cn.data(), C, a, best.data(), nt);
        std::fill(sums.begin(), sums.end(), 0.0);
        std::fill(cnt.begin(), cnt.end(), 0);
        for (std::int64_t i = 0; i < ns; ++i) {
            const std::int64_t j = a[i];
            ++cnt[j];
            double* s = sums.data() + j * d;
            const float* xi = x + i * d;
            for (int t = 0; t < d; ++t) s[t] += xi[t];
        }
        empty.clear();
        for (std::int64_t j = 0; j < C; ++j) {
            if (cnt[j] == 0) {
                empty.push_back(j);
                continue;
            }
            const double inv = 1.0 / static_cast<double>(cnt[j]);
            for (int t = 0; t < d; ++t) c[j * d + t] = static_cast<float>(sums[j * d + t] * inv);
        }
        if (empty.empty()) continue;
        // Re-seed each empty cluster with a distinct token, farthest from its centroid's ray first.
        if (norm2.empty()) {
            norm2.resize(static_cast<std::size_t>(ns));
            for (std::int64_t i = 0; i < ns; ++i) {
                double s = 0.0;
                for (int t = 0; t < d; ++t) s += static_cast<double>(x[i * d + t]) * x[i * d + t];
                norm2[i] = s;
            }
        }
        std::vector<double> resid(static_cast<std::size_t>(ns));
        for (std::int64_t i = 0; i < ns; ++i) {
            const double b = best[i] > 0.0f ? static_cast<double>(best[i]) : 0.0;
            resid[i] = norm2[i] - b * b;
        }
        pick.resize(static_cast<std::size_t>(ns));
        std::iota(pick.begin(), pick.end(), 0);
        const auto E = static_cast<std::ptrdiff_t>(empty.size());  // < C <= ns
        std::partial_sort(pick.begin(), pick.begin() + E, pick.end(), [&](std::int64_t u, std::int64_t v) {
            return resid[u] > resid[v] || (resid[u] == resid[v] && u < v);
        });
        for (std::ptrdiff_t e = 0; e < E; ++e)
            std::copy(x + pick[e] * d, x + (pick[e] + 1) * d, c.begin() + empty[e] * d);
    }
    normalise(c, C, d, cn);
    assign_pass(x, ns, d, cn.data(), C, a, best.data(), nt);
}

}  // namespace

std::vector<std::int64_t> kmeans_segment_bounds(std::int64_t n, int tokens_per_cluster, std::int64_t segment_len) {
    if (n < 0) throw std::invalid_argument("n must be >= 0");
    if (tokens_per_cluster < 1) throw std::invalid_argument("tokens_per_cluster must be >= 1");
    if (segment_len < 1) throw std::invalid_argument("segment_len must be >= 1");
    std::vector<std::int64_t> b;
    for (std::int64_t s = 0; s < n; s += segment_len) b.push_back(s);
    b.push_back(n);
    if (b.size() > 2 && b[b.size() - 1] - b[b.size() - 2] < 2 * static_cast<std::int64_t>(tokens_per_cluster))
        b.erase(b.end() - 2);  // a tiny last segment joins the previous one
    return b;
}

std::int64_t kmeans_clusters_for(std::int64_t n_s, int tokens_per_cluster) {
    const std::int64_t t = tokens_per_cluster;
    return std::max<std::int64_t>(1, (2 * n_s + t) / (2 * t));
}

KMeansResult segmented_kmeans(const float* keys, std::int64_t n, int d, const KMeansParams& p) {
    if (n <= 0) throw std::invalid_argument("keys is empty (0 rows)");
    if (d <= 0) throw std::invalid_argument("keys has dim 0");
    if (p.iters < 0) throw std::invalid_argument("kmeans_iters must be >= 0");
    const std::vector<std::int64_t> bounds = kmeans_segment_bounds(n, p.tokens_per_cluster, p.segment_len);
    const std::int64_t S = static_cast<std::int64_t>(bounds.size()) - 1;
    std::vector<std::int64_t> cbase(static_cast<std::size_t>(S) + 1, 0);  // provisional cluster numbering
    for (std::int64_t s = 0; s < S; ++s)
        cbase[s + 1] = cbase[s] + kmeans_clusters_for(bounds[s + 1] - bounds[s], p.tokens_per_cluster);
    if (cbase[S] > std::numeric_limits<std::int32_t>::max())
        throw std::invalid_argument("too many clusters (" + std::to_string(cbase[S]) + ") for int32 ids");
    const int nt = omp_threads(p.num_threads);

    // Centre by the mean of every key of this call.
    std::vector<double> mean_d(static_cast<std::size_t>(d), 0.0);
    for (std::int64_t i = 0; i < n; ++i)
        for (int t = 0; t < d; ++t) mean_d[t] += keys[i * d + t];
    std::vector<float> mean(static_cast<std::size_t>(d));
    for (int t = 0; t < d; ++t) mean[t] = static_cast<float>(mean_d[t] / static_cast<double>(n));
    std::vector<float> x(static_cast<std::size_t>(n) * d);
    for (std::int64_t i = 0; i < n; ++i)
        for (int t = 0; t < d; ++t) x[i * d + t] = keys[i * d + t] - mean[t];

    std::vector<std::int32_t> local(static_cast<std::size_t>(n));
    auto run_segment = [&](std::int64_t s, int inner) {
        const std::int64_t b = bounds[s];
        cluster_segment(x.data() + b * d, bounds[s + 1] - b, d, cbase[s + 1] - cbase[s],
                        p.iters, p.seed + static_cast<std::uint64_t>(s), inner, local.data() + b);
    };
    if (nt > 1 && S >= 2 * nt) {  // many segments: one thread per segment
        OmpErrors errs;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (std::int64_t s = 0; s < S; ++s) errs.run([&] { run_segment(s, 1); });
        errs.rethrow();
    } else {  // few segments: threads share each segment's tokens
        for (std::int64_t s = 0; s < S; ++s) run_segment(s, nt);
    }

    // Final centroids: plain means of the original keys; drop empty clusters.
    const std::int64_t Cp = cbase[S];
    std::vector<std::int64_t> cnt(static_cast<std::size_t>(Cp), 0);
    std::vector<double> sums(static_cast<std::size_t>(Cp) * d, 0.0);
    for (std::int64_t s = 0; s < S; ++s) {
        for (std::int64_t i = bounds[s]; i < bounds[s + 1]; ++i) {
            const std::int64_t g = cbase[s] + local[i];
            ++cnt[g];
            double* acc = sums.data() + g * d;
            const float* ki = keys + i * d;
            for (int t = 0; t < d; ++t) acc[t] += ki[t];
        }
    }
    std::vector<std::int32_t> remap(static_cast<std::size_t>(Cp), -1);
    KMeansResult r;
    for (std::int64_t s = 0; s < S; ++s) {
        for (std::int64_t g = cbase[s]; g < cbase[s + 1]; ++g) {
            if (cnt[g] == 0) continue;
            remap[g] = static_cast<std::int32_t>(r.sizes.size());
            r.sizes.push_back(static_cast<float>(cnt[g]));
            r.segment_of_cluster.push_back(s);
            const double inv = 1.0 / static_cast<double>(cnt[g]);
            for (int t = 0; t < d; ++t) r.centroids.push_back(static_cast<float>(sums[g * d + t] * inv));
        }
    }
    r.assign.resize(static_cast<std::size_t>(n));
    for (std::int64_t s = 0; s < S; ++s)
        for (std::int64_t i = bounds[s]; i < bounds[s + 1]; ++i) r.assign[i] = remap[cbase[s] + local[i]];
    return r;
}

}  // namespace kvstore
