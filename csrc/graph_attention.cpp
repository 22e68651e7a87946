#include "graph_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "distance.h"
#include "omp_guard.h"

namespace kvstore {

namespace {

// Scratch of one slot, reused by the heads of its group.
struct Scratch {
    std::vector<float> pool_scores;
    std::vector<std::int64_t> pool_ids;
    std::vector<float> scores;
    std::vector<int> order;
};

void empty_slot(int group, int dv, int top_k, float* o, float* lse, std::int64_t* ids) {
    std::fill(o, o + static_cast<std::int64_t>(group) * dv, 0.0f);
    std::fill(lse, lse + group, -std::numeric_limits<float>::infinity());
    if (ids) std::fill(ids, ids + static_cast<std::int64_t>(group) * top_k, std::int64_t{-1});
}

// One query head over the m keys found: its own top_k by score, then the
// softmax over them (max-shifted, normaliser in double).
void head_attention(const float* q, const GraphSlot& s, int dim, int dv, int top_k, float scale,
                    const std::int64_t* found, int m, Scratch& w, float* o, float* lse, std::int64_t* ids) {
    w.scores.resize(m);
    w.order.resize(m);
    for (int i = 0; i < m; ++i) {
        w.scores[i] = scale * dot(q, s.keys + found[i] * dim, static_cast<std::size_t>(dim));
        w.order[i] = i;
    }
    const int kk = std::min(top_k, m);
    auto better = [&](int a, int b) {
        return w.scores[a] > w.scores[b] || (w.scores[a] == w.scores[b] && found[a] < found[b]);
    };
    std::partial_sort(w.order.begin(), w.order.begin() + kk, w.order.end(), better);
    const float mx = w.scores[w.order[0]];
    double denom = 0.0;
    for (int r = 0; r < kk; ++r) denom += std::exp(static_cast<double>(w.scores[w.order[r]]) - mx);
    std::fill(o, o + dv, 0.0f);
    for (int r = 0; r < kk; ++r) {
        const int i = w.order[r];
        const float p = static_cast<float>(std::exp(static_cast<double>(w.scores[i]) - mx) / denom);
        const float* v = s.values + found[i] * dv;
#pragma omp simd
        for (int c = 0; c < dv; ++c) o[c] += p * v[c];
    }
    *lse = static_cast<float>(mx + std::log(denom));
    if (ids) {
        for (int r = 0; r < kk; ++r) ids[r] = found[w.order[r]];
        std::fill(ids + kk, ids + top_k, std::int64_t{-1});
    }
}

void run_slot(const GraphSlot& s, std::int64_t h, const float* queries, int group, int dim, int dv,
              const GraphAttentionParams& p, int group_k, float* out_o, float* out_lse, std::int64_t* out_scanned,
              std::int64_t* out_ids, Scratch& w) {
    const float* qs = queries + h * group * dim;
    float* o = out_o + h * group * dv;
    float* lse = out_lse + h * group;
    std::int64_t* ids = out_ids ? out_ids + h * group * p.top_k : nullptr;
    out_scanned[h] = 0;
    empty_slot(group, dv, p.top_k, o, lse, ids);
    if (s.n == 0) return;
    const int pool = static_cast<int>(std::min<std::int64_t>(group_k, s.n));
    w.pool_scores.resize(pool);
    w.pool_ids.resize(pool);
    // One thread: slots are the parallel dimension; search_group takes the index's read lock.
    s.index->search_group(qs, 1, group, pool, std::max(p.ef, pool), w.pool_scores.data(), w.pool_ids.data(),
                          out_scanned + h, 1);
    int m = 0;
    while (m < pool && w.pool_ids[m] >= 0) {
        if (w.pool_ids[m] >= s.n)
            throw std::out_of_range("slot " + std::to_string(h) + ": the graph returned id " +
                                    std::to_string(w.pool_ids[m]) + " but only " + std::to_string(s.n) +
                                    " key/value rows were given (keys added to the graph after the arrays?)");
        ++m;
    }
    if (m == 0) return;
    for (int j = 0; j < group; ++j)
        head_attention(qs + static_cast<std::int64_t>(j) * dim, s, dim, dv, p.top_k, p.scale, w.pool_ids.data(),
                       m, w, o + static_cast<std::int64_t>(j) * dv, lse + j,
                       ids ? ids + static_cast<std::int64_t>(j) * p.top_k : nullptr);
}

}  // namespace

void graph_attention(const std::vector<GraphSlot>& slots, const float* queries, int group, int dim, int dv,
                     const GraphAttentionParams& p, float* out_o, float* out_lse, std::int64_t* out_scanned,
                     std::int64_t* out_ids) {
    if (group <= 0 || dim <= 0 || dv <= 0) throw std::invalid_argument("group, dim and dv must be positive");
    if (p.top_k <= 0) throw std::invalid_argument("top_k must be positive");
    if (p.group_k < 0) throw std::invalid_argument("group_k must be >= 0");
    if (p.ef <= 0) throw std::invalid_argument("ef must be positive");
    if (!std::isfinite(p.scale)) throw std::invalid_argument("scale must be finite");
    const std::int64_t group_k64 = p.group_k > 0 ? p.group_k : static_cast<std::int64_t>(p.top_k) * group;
    if (group_k64 < p.top_k || group_k64 > std::numeric_limits<int>::max())
        throw std::invalid_argument("group_k must be in [top_k, 2^31)");
    const int group_k = static_cast<int>(group_k64);
    const std::int64_t H = static_cast<std::int64_t>(slots.size());
    for (std::int64_t h = 0; h < H; ++h) {
        const GraphSlot& s = slots[h];
        if (s.n < 0) throw std::invalid_argument("slot " + std::to_string(h) + ": negative row count");
        if (s.n > 0 && (!s.index || !s.keys || !s.values))
            throw std::invalid_argument("slot " + std::to_string(h) + ": missing index, keys or values");
        if (s.index && s.index->dim() != dim)
            throw std::invalid_argument("slot " + std::to_string(h) + ": graph dim " + std::to_string(s.index->dim()) +
                                        " != query dim " + std::to_string(dim));
    }
    // Non-finite queries would make the score order undefined (NaN compares false both ways).
    for (std::int64_t i = 0; i < H * group * dim; ++i)
        if (!std::isfinite(queries[i])) throw std::invalid_argument("queries contain NaN or inf");

    const int nt = omp_threads(p.num_threads);
    OmpErrors errors;
#pragma omp parallel num_threads(static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(nt, H))))
    {
        Scratch w;
#pragma omp for schedule(dynamic, 1)
        for (std::int64_t h = 0; h < H; ++h)
            errors.run([&] {
                run_slot(slots[h], h, queries, group, dim, dv, p, group_k, out_o, out_lse, out_scanned, out_ids, w);
            });
    }
    errors.rethrow();
}

}  // namespace kvstore
