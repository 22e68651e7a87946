#include "graph_index.h"

#include <omp.h>

#include <algorithm>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <queue>
#include <random>
#include <stdexcept>

#include "distance.h"
#include "omp_guard.h"

namespace kvstore {

namespace {

// The first k results of a search into one output row, -inf / -1 padded.
void write_row(const std::vector<std::pair<float, std::int32_t>>& found, int k, float* scores, std::int64_t* ids) {
    for (int j = 0; j < k; ++j) {
        bool have = j < static_cast<int>(found.size());
        scores[j] = have ? found[j].first : -std::numeric_limits<float>::infinity();
        ids[j] = have ? found[j].second : -1;
    }
}

}  // namespace

GraphIndex::GraphIndex(int dim, int degree) : dim_(dim), degree_(degree) {
    if (dim <= 0) throw std::invalid_argument("dim must be positive");
    if (degree < 2 || degree > 1024) throw std::invalid_argument("degree must be in [2, 1024]");
}

int GraphIndex::out_degree(std::int64_t i) const {
    const std::int32_t* r = row(i);
    int d = 0;
    while (d < degree_ && r[d] >= 0) ++d;
    return d;
}

template <class Score>
std::vector<GraphIndex::Scored> GraphIndex::beam_search_by(Score score, int ef, VisitedSet& vis,
                                                           std::int64_t* scanned) const {
    using MinHeap = std::priority_queue<Scored, std::vector<Scored>, std::greater<Scored>>;
    MinHeap results;
    std::priority_queue<Scored> frontier;
    std::int64_t count = 0;
    auto consider = [&](std::int32_t id) {
        float s = score(id);
        ++count;
        if (static_cast<int>(results.size()) < ef || s > results.top().first) {
            frontier.emplace(s, id);
            results.emplace(s, id);
            if (static_cast<int>(results.size()) > ef) results.pop();
        }
    };
    for (std::int32_t e : entry_)
        if (!vis.test_and_set(e)) consider(e);
    while (!frontier.empty()) {
        Scored c = frontier.top();
        if (static_cast<int>(results.size()) >= ef && c.first < results.top().first) break;
        frontier.pop();
        const std::int32_t* r = row(c.second);
        for (int j = 0; j < degree_; ++j) {
            std::int32_t nb = r[j];
            if (nb < 0) break;
            if (j + 1 < degree_ && r[j + 1] >= 0) __builtin_prefetch(key(r[j + 1]));
            if (vis.test_and_set(nb)) continue;
            consider(nb);
        }
    }
    std::vector<Scored> out(results.size());
    for (std::size_t i = out.size(); i-- > 0;) {
        out[i] = results.top();
        results.pop();
    }
    if (scanned) *scanned += count;
    return out;
}

std::vector<GraphIndex::Scored> GraphIndex::beam_search(const float* q, int ef, VisitedSet& vis,
                                                        std::int64_t* scanned, Metric metric) const {
    if (metric == Metric::kL2)  // 2 q.k - |k|^2 ranks keys as -|q - k|^2 does
        return beam_search_by([&](std::int32_t id) { return 2.0f * dot(q, key(id), dim_) - sqnorm_[id]; },
                              ef, vis, scanned);
    return beam_search_by([&](std::int32_t id) { return dot(q, key(id), dim_); }, ef, vis, scanned);
}

void GraphIndex::search_group(const float* queries, std::int64_t ngroups, int group, int k, int ef,
                              float* out_scores, std::int64_t* out_ids, std::int64_t* out_scanned,
                              int num_threads) const {
    // One traversal per group of query heads sharing this KV head: a key is
    // read once and scored against every head, ranked by its best head score.
    if (k <= 0 || group <= 0) throw std::invalid_argument("k and group must be positive");
    std::shared_lock<std::shared_mutex> lock(rw_);
    ef = std::max(ef, k);
    OmpErrors errors;
#pragma omp parallel for schedule(dynamic, 1) num_threads(omp_threads(num_threads))
    for (std::int64_t g = 0; g < ngroups; ++g) {
        errors.run([&] {
            VisitedLease vis(pool_, n_);
            std::int64_t scanned = 0;
            const float* qs = queries + g * group * dim_;
            auto found = beam_search_by(
                [&](std::int32_t id) {
                    float best = -std::numeric_limits<float>::infinity();
                    for (int h = 0; h < group; ++h) best = std::max(best, dot(qs + h * dim_, key(id), dim_));
                    return best;
                },
                ef, *vis, &scanned);
            write_row(found, k, out_scores + g * k, out_ids + g * k);
            out_scanned[g] = scanned;
        });
    }
    errors.rethrow();
}

void GraphIndex::prune(std::int64_t pivot, std::vector<Scored>& cands, int max_out,
                       std::vector<std::int32_t>& out) const {
    // RoarGraph's occlusion rule in inner-product form: candidate c is skipped
    // when a kept neighbour r is closer to it than the pivot is (q.r > q.pivot).
    // Skipped candidates then fill the list up to the degree bound.
    out.clear();
    std::vector<std::int32_t> skipped;
    for (const Scored& c : cands) {
        if (c.second == pivot) continue;
        if (static_cast<int>(out.size()) >= max_out) break;
        bool occluded = false;
        for (std::int32_t r : out) {
            if (dot(key(r), key(c.second), dim_) > c.first) {
                occluded = true;
                break;
            }
        }
        (occluded ? skipped : out).push_back(c.second);
    }
    for (std::int32_t s : skipped) {
        if (static_cast<int>(out.size()) >= max_out) break;
        out.push_back(s);
    }
}

void GraphIndex::project(const std::int64_t* topk, std::int64_t nq, int kt, const BuildParams& p, BuildStats& st) {
    // Each training query's best `pivots_per_query` keys act as pivots: each
    // is linked to the query's other top keys. Queries are grouped by pivot
    // so that queries sharing one merge their candidates instead of
    // overwriting each other.
    const int pp = std::max(1, std::min(p.pivots_per_query, kt));
    std::vector<std::int64_t> start(n_ + 1, 0);
    for (std::int64_t q = 0; q < nq; ++q)
        for (int j = 0; j < pp && topk[q * kt + j] >= 0; ++j) ++start[topk[q * kt + j] + 1];
    for (std::int64_t i = 0; i < n_; ++i) start[i + 1] += start[i];
    std::vector<std::int64_t> by_pivot(start[n_]);
    {
        std::vector<std::int64_t> fill(start.begin(), start.end() - 1);
        for (std::int64_t q = 0; q < nq; ++q)
            for (int j = 0; j < pp && topk[q * kt + j] >= 0; ++j) by_pivot[fill[topk[q * kt + j]]++] = q;
    }
    std::vector<std::int32_t> pivots;
    for (std::int64_t i = 0; i < n_; ++i)
        if (start[i + 1] > start[i]) pivots.push_back(static_cast<std::int32_t>(i));
    st.pivots = static_cast<std::int64_t>(pivots.size());

    OmpErrors errors;
#pragma omp parallel for schedule(dynamic, 16) num_threads(omp_threads(p.num_threads))
    for (std::int64_t t = 0; t < static_cast<std::int64_t>(pivots.size()); ++t) {
        errors.run([&] {
            std::int32_t piv = pivots[t];
            std::vector<std::int32_t> ids;
            for (std::int64_t g = start[piv]; g < start[piv + 1]; ++g) {
                const std::int64_t* list = topk + by_pivot[g] * kt;
                for (int j = 0; j < kt && list[j] >= 0; ++j)
                    if (list[j] != piv) ids.push_back(static_cast<std::int32_t>(list[j]));
            }
            std::sort(ids.begin(), ids.end());
            ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
            std::vector<Scored> cands;
            cands.reserve(ids.size());
            for (std::int32_t c : ids) cands.emplace_back(dot(key(piv), key(c), dim_), c);
            std::sort(cands.begin(), cands.end(), std::greater<Scored>());
            if (static_cast<int>(cands.size()) > p.max_candidates) cands.resize(p.max_candidates);
            std::vector<std::int32_t> out;
            prune(piv, cands, content_degree(), out);
            std::copy(out.begin(), out.end(), row(piv));
        });
    }
    errors.rethrow();
}

void GraphIndex::add_reverse_edges(int num_threads) {
    // Collect every reverse edge first, then prune each node's merged list
    // once: no node's list is overwritten while another thread reads it.
    std::vector<std::int64_t> start(n_ + 1, 0);
    for (std::int64_t i = 0; i < n_; ++i) {
        const std::int32_t* r = row(i);
        for (int j = 0; j < degree_ && r[j] >= 0; ++j) ++start[r[j] + 1];
    }
    for (std::int64_t i = 0; i < n_; ++i) start[i + 1] += start[i];
    std::vector<std::int32_t> sources(start[n_]);
    {
        std::vector<std::int64_t> fill(start.begin(), start.end() - 1);
        for (std::int64_t i = 0; i < n_; ++i) {
            const std::int32_t* r = row(i);
            for (int j = 0; j < degree_ && r[j] >= 0; ++j) sources[fill[r[j]]++] = static_cast<std::int32_t>(i);
        }
    }
    std::vector<std::int32_t> fresh(nbrs_.size(), -1);
    OmpErrors errors;
#pragma omp parallel for schedule(dynamic, 64) num_threads(omp_threads(num_threads))
    for (std::int64_t i = 0; i < n_; ++i) {
        errors.run([&] {
            std::vector<std::int32_t> ids(row(i), row(i) + out_degree(i));
            ids.insert(ids.end(), sources.begin() + start[i], sources.begin() + start[i + 1]);
            std::sort(ids.begin(), ids.end());
            ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
            std::vector<Scored> cands;
            cands.reserve(ids.size());
            for (std::int32_t c : ids)
                if (c != i) cands.emplace_back(dot(key(i), key(c), dim_), c);
            std::sort(cands.begin(), cands.end(), std::greater<Scored>());
            std::vector<std::int32_t> out;
            prune(i, cands, content_degree(), out);
            std::copy(out.begin(), out.end(), fresh.begin() + i * degree_);
        });
    }
    errors.rethrow();
    nbrs_.swap(fresh);
}

void GraphIndex::choose_entry_points(const std::int64_t* topk, std::int64_t nq, int kt, const BuildParams& p) {
    // Entry points are keys that are the best key of many training queries
    // (attention sinks and other hubs): the overall most-hit one, then the
    // most-hit one of each equal slice of the ids. Keys arrive in sequence
    // order, so the slices spread the starts over the context (recent tokens
    // matter to decode queries as much as the sinks do).
    if (!p.entry_points.empty()) {
        std::vector<char> seen(n_, 0);
        entry_.clear();
        for (std::int32_t e : p.entry_points) {
            if (e < 0 || e >= n_) throw std::invalid_argument("entry point id out of range");
            if (!seen[e]) {
                seen[e] = 1;
                entry_.push_back(e);
            }
        }
        return;
    }
    std::vector<std::int64_t> hits(n_, 0);
    for (std::int64_t q = 0; q < nq; ++q)
        if (topk[q * kt] >= 0) ++hits[topk[q * kt]];
    const int want = static_cast<int>(std::min<std::int64_t>(std::max(1, p.num_entry_points), n_));
    std::vector<char> taken(n_, 0);
    entry_.clear();
    auto best_in = [&](std::int64_t lo, std::int64_t hi) {
        std::int64_t best = -1;
        for (std::int64_t i = lo; i < hi; ++i)
            if (!taken[i] && hits[i] > 0 && (best < 0 || hits[i] > hits[best])) best = i;
        if (best >= 0) {
            taken[best] = 1;
            entry_.push_back(static_cast<std::int32_t>(best));
        }
    };
    best_in(0, n_);
    const int slices = want - 1;
    for (int s = 0; s < slices; ++s) best_in(n_ * s / slices, n_ * (s + 1) / slices);
    std::mt19937_64 rng(p.seed);
    while (static_cast<int>(entry_.size()) < want) {
        std::int32_t c = static_cast<std::int32_t>(rng() % static_cast<std::uint64_t>(n_));
        if (!taken[c]) {
            taken[c] = 1;
            entry_.push_back(c);
        }
    }
}

std::vector<char> GraphIndex::reachable() const {
    std::vector<char> seen(n_, 0);
    std::vector<std::int32_t> stack;
    for (auto e : entry_)
        if (!seen[e]) {
            seen[e] = 1;
            stack.push_back(e);
        }
    while (!stack.empty()) {
        std::int32_t u = stack.back();
        stack.pop_back();
        const std::int32_t* r = row(u);
        for (int j = 0; j < degree_ && r[j] >= 0; ++j)
            if (!seen[r[j]]) {
                seen[r[j]] = 1;
                stack.push_back(r[j]);
            }
    }
    return seen;
}

std::int64_t GraphIndex::count_reachable() const {
    std::shared_lock<std::shared_mutex> lock(rw_);
    auto seen = reachable();
    return std::count(seen.begin(), seen.end(), 1);
}

void GraphIndex::link_into(std::int64_t target, const std::vector<Scored>& found, std::vector<std::int32_t>& indeg) {
    // Give `target` an in-edge from the best found (hence reachable) node with
    // a free slot. When every one is full, take over the weakest edge of the
    // first one whose weakest edge ends at a key with another in-edge, and
    // hand that key to `target` when it has room, so nothing is orphaned.
    std::int32_t t = static_cast<std::int32_t>(target);
    auto append = [&](std::int32_t from, std::int32_t to) {
        int d = out_degree(from);
        const std::int32_t* r = row(from);
        if (d >= degree_ || std::find(r, r + d, to) != r + d) return false;
        row(from)[d] = to;
        ++indeg[to];
        return true;
    };
    std::vector<std::int32_t> hosts;
    for (const Scored& s : found)
        if (s.second != t) hosts.push_back(s.second);
    for (std::int32_t e : entry_)
        if (e != t) hosts.push_back(e);
    for (std::int32_t v : hosts)
        if (append(v, t)) return;
    if (hosts.empty()) return;
    std::int32_t v = hosts.front();
    for (std::int32_t h : hosts)
        if (indeg[row(h)[degree_ - 1]] >= 2) {
            v = h;
            break;
        }
    std::int32_t dropped = row(v)[degree_ - 1];
    if (dropped == t) return;
    row(v)[degree_ - 1] = t;
    --indeg[dropped];
    ++indeg[t];
    append(t, dropped);
}

void GraphIndex::refresh_norms() {
    sqnorm_.resize(n_);
    for (std::int64_t i = 0; i < n_; ++i) sqnorm_[i] = dot(key(i), key(i), dim_);
}

void GraphIndex::add_geometric_edges(const BuildParams& p, const std::int64_t* geo, int kg) {
    // Query-projected edges alone serve queries like the training ones; decode
    // queries drift (new positions, new content), and short L2 hops between
    // keys keep the graph navigable for them.
    const int g = std::min(p.geometric_degree, content_degree() - 1);
    if (g <= 0) return;
    const int ef = std::max(p.ef_construction, 2 * g);
    std::vector<std::int32_t> fresh(nbrs_.size(), -1);
    OmpErrors errors;
#pragma omp parallel for schedule(dynamic, 32) num_threads(omp_threads(p.num_threads))
    for (std::int64_t i = 0; i < n_; ++i) {
        errors.run([&] {
            std::vector<Scored> found;
            if (kg > 0) {
                for (int j = 0; j < kg; ++j)
                    if (geo[i * kg + j] >= 0) found.emplace_back(0.0f, static_cast<std::int32_t>(geo[i * kg + j]));
            } else {
                VisitedLease vis(pool_, n_);
                found = beam_search(key(i), ef, *vis, nullptr, Metric::kL2);
            }
            std::vector<std::int32_t> out(row(i), row(i) + std::min(out_degree(i), content_degree() - g));
            int added = 0;
            for (const Scored& f : found) {
                if (added >= g) break;
                if (f.second == i || std::find(out.begin(), out.end(), f.second) != out.end()) continue;
                out.push_back(f.second);
                ++added;
            }
            for (int j = 0; j < out_degree(i) && static_cast<int>(out.size()) < content_degree(); ++j)
                if (std::find(out.begin(), out.end(), row(i)[j]) == out.end()) out.push_back(row(i)[j]);
            std::copy(out.begin(), out.end(), fresh.begin() + i * degree_);
        });
    }
    errors.rethrow();
    nbrs_.swap(fresh);
}

void GraphIndex::repair(const BuildParams& p, BuildStats& st) {
    int ef = std::max(p.ef_construction, degree_);
    int nt = omp_threads(p.num_threads);
    // 1. Keys no training query touched have no out-edges: search for them
    //    with their own vector and link them to what the search finds.
    std::vector<std::int32_t> lonely;
    for (std::int64_t i = 0; i < n_; ++i)
        if (out_degree(i) == 0) lonely.push_back(static_cast<std::int32_t>(i));
    st.repaired_out = static_cast<std::int64_t>(lonely.size());
    {
        std::vector<std::int32_t> fresh(lonely.size() * degree_, -1);
        OmpErrors errors;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nt)
        for (std::int64_t t = 0; t < static_cast<std::int64_t>(lonely.size()); ++t) {
            errors.run([&] {
                VisitedLease vis(pool_, n_);
                auto found = beam_search(key(lonely[t]), ef, *vis, nullptr);
                std::vector<std::int32_t> out;
                prune(lonely[t], found, content_degree(), out);
                std::copy(out.begin(), out.end(), fresh.begin() + t * degree_);
            });
        }
        errors.rethrow();
        for (std::size_t t = 0; t < lonely.size(); ++t)
            std::copy(fresh.begin() + t * degree_, fresh.begin() + (t + 1) * degree_, row(lonely[t]));
    }
    // 2. Until every key is reachable from the entry points: search for each
    //    unreachable key (in parallel, on a frozen graph), then link serially.
    for (int round = 0; round < 64; ++round) {
        auto seen = reachable();
        std::vector<std::int32_t> missing;
        for (std::int64_t i = 0; i < n_; ++i)
            if (!seen[i]) missing.push_back(static_cast<std::int32_t>(i));
        if (missing.empty()) break;
        st.repair_rounds = round + 1;
        st.repaired_reach += static_cast<std::int64_t>(missing.size());
        std::vector<std::int32_t> indeg(n_, 0);
        for (auto v : nbrs_)
            if (v >= 0) ++indeg[v];
        std::vector<std::vector<Scored>> found(missing.size());
        OmpErrors errors;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nt)
        for (std::int64_t t = 0; t < static_cast<std::int64_t>(missing.size()); ++t) {
            errors.run([&] {
                VisitedLease vis(pool_, n_);
                found[t] = beam_search(key(missing[t]), std::min(ef, 64), *vis, nullptr);
            });
        }
        errors.rethrow();
        for (std::size_t t = 0; t < missing.size(); ++t) link_into(missing[t], found[t], indeg);
    }
    auto seen = reachable();
    if (std::count(seen.begin(), seen.end(), 1) != n_) throw std::runtime_error("graph repair did not reach every key");
}

BuildStats GraphIndex::build(const float* keys, std::int64_t n, const std::int64_t* topk, std::int64_t nq, int kt,
                             const std::int64_t* geo, int kg, const BuildParams& p,
                             const std::function<void(double)>& progress) {
    if (n <= 0) throw std::invalid_argument("keys must not be empty");
    if (n > std::numeric_limits<std::int32_t>::max()) throw std::invalid_argument("too many keys (max 2^31-1)");
    if (kt <= 0) throw std::invalid_argument("train_topk must have at least one column");
    for (std::int64_t i = 0; i < nq * kt; ++i)
        if (topk[i] < -1 || topk[i] >= n) throw std::invalid_argument("train_topk holds an id out of range");
    for (std::int64_t i = 0; i < n * kg; ++i)
        if (geo[i] < -1 || geo[i] >= n) throw std::invalid_argument("geometric neighbours hold an id out of range");
    std::unique_lock<std::shared_mutex> lock(rw_);
    BuildStats st;
    n_ = n;
    keys_.assign(keys, keys + n * dim_);
    nbrs_.assign(n * degree_, -1);
    refresh_norms();
    choose_entry_points(topk, nq, kt, p);
    project(topk, nq, kt, p, st);
    if (progress) progress(0.2);
    add_reverse_edges(p.num_threads);
    repair(p, st);
    if (progress) progress(0.4);
    const int passes = kg > 0 ? 1 : p.geometric_passes;
    for (int pass = 0; pass < passes; ++pass) {
        add_geometric_edges(p, geo, kg);
        if (progress) progress(0.4 + 0.5 * (pass + 1) / std::max(1, passes));
    }
    repair(p, st);
    if (progress) progress(1.0);
    return st;
}

void GraphIndex::search(const float* queries, std::int64_t nq, int k, int ef, float* out_scores,
                        std::int64_t* out_ids, std::int64_t* out_scanned, int num_threads) const {
    // A single query is a group of one: the same traversal, scored by its dot product.
    search_group(queries, nq, 1, k, ef, out_scores, out_ids, out_scanned, num_threads);
}

std::int64_t GraphIndex::add(const float* keys, std::int64_t m, int ef_construction, int num_threads) {
    std::unique_lock<std::shared_mutex> lock(rw_);
    const std::int64_t before = n_;
    try {
        return add_unchecked(keys, m, ef_construction, num_threads);
    } catch (...) {
        // Roll back to the keys stored before this call: a failed add never
        // leaves half-linked keys behind (edges into them are removed too).
        n_ = before;
        keys_.resize(before * dim_);
        sqnorm_.resize(before);
        nbrs_.resize(before * degree_);
        for (auto& v : nbrs_)
            if (v >= before) v = -1;
        compact_rows();
        throw;
    }
}

void GraphIndex::compact_rows() {
    for (std::int64_t i = 0; i < n_; ++i) {
        std::int32_t* r = row(i);
        std::int32_t* end = std::remove(r, r + degree_, -1);
        std::fill(end, r + degree_, -1);
    }
}

std::int64_t GraphIndex::add_unchecked(const float* keys, std::int64_t m, int ef_construction, int num_threads) {
    if (n_ == 0) throw std::logic_error("the graph is empty: build it before adding keys");
    if (n_ + m > std::numeric_limits<std::int32_t>::max()) throw std::invalid_argument("too many keys (max 2^31-1)");
    const std::int64_t first = n_;
    const int ef = std::max(ef_construction, degree_);
    const int nt = omp_threads(num_threads);
    // Reserve first so a failed allocation leaves the index as it was.
    keys_.reserve((n_ + m) * dim_);
    nbrs_.reserve((n_ + m) * degree_);
    sqnorm_.reserve(n_ + m);
    keys_.insert(keys_.end(), keys, keys + m * dim_);
    nbrs_.resize((n_ + m) * degree_, -1);
    for (std::int64_t i = n_; i < n_ + m; ++i) sqnorm_.push_back(dot(key(i), key(i), dim_));
    const std::int64_t chunk = 1024;
    for (std::int64_t c0 = first; c0 < first + m; c0 += chunk) {
        const std::int64_t c1 = std::min(first + m, c0 + chunk);
        std::vector<std::vector<std::int32_t>> outs(c1 - c0);
        const std::int64_t visible = c0;  // keys of this chunk are not linked yet
        OmpErrors errors;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt)
        for (std::int64_t x = c0; x < c1; ++x) {
            errors.run([&] {
                VisitedLease vis(pool_, visible);
                // No query has seen the new key yet: link it to its nearest
                // keys in L2. One slot stays free for link_into's hand-over.
                auto found = beam_search(key(x), ef, *vis, nullptr, Metric::kL2);
                auto& out = outs[x - c0];
                for (const Scored& f : found)
                    if (static_cast<int>(out.size()) < degree_ - 1) out.push_back(f.second);
            });
        }
        errors.rethrow();
        n_ = c1;
        for (std::int64_t x = c0; x < c1; ++x) {
            const auto& out = outs[x - c0];
            std::copy(out.begin(), out.end(), row(x));
            bool linked = false;
            for (std::int32_t v : out) {
                int d = out_degree(v);
                if (d < degree_) {
                    row(v)[d] = static_cast<std::int32_t>(x);
                    linked = true;
                }
            }
            if (!linked) {
                std::vector<Scored> found;
                for (std::int32_t v : out) found.emplace_back(0.0f, v);
                std::vector<std::int32_t> indeg(n_, 0);
                for (auto v : nbrs_)
                    if (v >= 0) ++indeg[v];
                link_into(x, found, indeg);
            }
        }
    }
    return first;
}

void GraphIndex::reconstruct(const std::int64_t* ids, std::int64_t m, float* out) const {
    std::shared_lock<std::shared_mutex> lock(rw_);
    for (std::int64_t i = 0; i < m; ++i) {
        if (ids[i] < 0 || ids[i] >= n_) throw std::out_of_range("key id out of range");
        std::copy(key(ids[i]), key(ids[i]) + dim_, out + i * dim_);
    }
}

void GraphIndex::remove(const std::vector<char>& keep, int ef_construction, int num_threads) {
    std::unique_lock<std::shared_mutex> lock(rw_);
    if (static_cast<std::int64_t>(keep.size()) != n_) throw std::invalid_argument("keep must have one entry per key");
    std::vector<std::int32_t> remap(n_, -1);
    std::int64_t m = 0;
    for (std::int64_t i = 0; i < n_; ++i)
        if (keep[i]) remap[i] = static_cast<std::int32_t>(m++);
    std::vector<float> keys(m * dim_);
    std::vector<std::int32_t> nbrs(m * degree_, -1);
    for (std::int64_t i = 0; i < n_; ++i) {
        if (remap[i] < 0) continue;
        std::copy(key(i), key(i) + dim_, keys.begin() + remap[i] * dim_);
        std::int32_t* out = nbrs.data() + remap[i] * degree_;
        const std::int32_t* r = row(i);
        for (int j = 0; j < degree_ && r[j] >= 0; ++j)
            if (remap[r[j]] >= 0) *out++ = remap[r[j]];
    }
    std::vector<std::int32_t> entry;
    for (std::int32_t e : entry_)
        if (remap[e] >= 0) entry.push_back(remap[e]);
    if (entry.empty() && m > 0) entry.push_back(0);
    // Swap the new graph in; the old one is restored if the repair fails.
    const std::int64_t old_n = n_;
    keys_.swap(keys);
    nbrs_.swap(nbrs);
    entry_.swap(entry);
    n_ = m;
    try {
        refresh_norms();
        if (m > 0) {
            BuildParams p;
            p.ef_construction = ef_construction;
            p.num_threads = num_threads;
            BuildStats st;
            repair(p, st);
        }
    } catch (...) {
        keys_.swap(keys);
        nbrs_.swap(nbrs);
        entry_.swap(entry);
        n_ = old_n;
        refresh_norms();
        throw;
    }
}

GraphState GraphIndex::state() const {
    std::shared_lock<std::shared_mutex> lock(rw_);
    return GraphState{keys_, nbrs_, entry_};
}

void GraphIndex::set_state(std::vector<float> keys, std::vector<std::int32_t> nbrs, std::vector<std::int32_t> entry) {
    if (keys.size() % dim_ != 0) throw std::invalid_argument("keys size is not a multiple of dim");
    std::int64_t n = static_cast<std::int64_t>(keys.size() / dim_);
    if (static_cast<std::int64_t>(nbrs.size()) != n * degree_)
        throw std::invalid_argument("neighbors size does not match keys and degree");
    for (auto v : nbrs)
        if (v < -1 || v >= n) throw std::invalid_argument("neighbors hold an id out of range");
    if (n > 0 && entry.empty()) throw std::invalid_argument("entry points are missing");
    for (auto e : entry)
        if (e < 0 || e >= n) throw std::invalid_argument("entry points hold an id out of range");
    std::unique_lock<std::shared_mutex> lock(rw_);
    keys_ = std::move(keys);
    nbrs_ = std::move(nbrs);
    entry_ = std::move(entry);
    n_ = n;
    refresh_norms();
}

}  // namespace kvstore
