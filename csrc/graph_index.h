// Attention-aware proximity graph over the keys of one KV head
// (RetrievalAttention / RoarGraph projection), maximum-inner-product search.
//
// Storage: keys row-major [N, d] float32; out-edges as fixed-stride CSR
// [N, degree] int32 padded with -1 (a hard degree bound); a few entry points.
// Thread-safe: searches run concurrently, mutations exclusively.
// All methods that take OpenMP threads catch exceptions inside the parallel
// region and rethrow after it, so none escapes an OpenMP region.
#pragma once

#include <cstdint>
#include <algorithm>
#include <functional>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

#include "visited.h"

namespace kvstore {

struct BuildParams {
    int ef_construction = 128;  // beam width of the searches made while building
    int num_entry_points = 8;
    int pivots_per_query = 1;   // a query's best keys that get linked to its other top keys
    int geometric_degree = 12;  // edges per key to its nearest keys in L2 (0: none)
    int geometric_passes = 2;
    std::vector<std::int32_t> entry_points;  // given by the caller; empty: most-hit pivots
    int max_candidates = 256;   // candidate cap per node before pruning
    std::uint64_t seed = 0;
    int num_threads = 0;        // 0: OpenMP default
};

struct BuildStats {
    std::int64_t pivots = 0;              // keys that are some training query's top-1
    std::int64_t repaired_out = 0;        // keys that got out-edges from a self-search
    std::int64_t repaired_reach = 0;      // keys linked because BFS missed them
    int repair_rounds = 0;
};

struct GraphState {
    std::vector<float> keys;             // [N, dim]
    std::vector<std::int32_t> neighbors; // [N, degree], -1 padded
    std::vector<std::int32_t> entry_points;
};

class GraphIndex {
public:
    GraphIndex(int dim, int degree);

    int dim() const { return dim_; }
    int degree() const { return degree_; }
    std::int64_t size() const { return n_; }

    // keys [n, d]; train_topk [nq, kt] ids of each training query's exact
    // top-kt keys in descending score order (-1 padding allowed).
    // geo [n, kg] (optional, kg may be 0): each key's nearest keys in L2,
    // computed exactly by the caller; without it they are found by searching.
    BuildStats build(const float* keys, std::int64_t n, const std::int64_t* train_topk, std::int64_t nq,
                     int kt, const std::int64_t* geo, int kg, const BuildParams& p,
                     const std::function<void(double)>& progress);

    // queries [nq, d] -> scores/ids [nq, k] (desc, -inf/-1 padding) and scanned [nq].
    void search(const float* queries, std::int64_t nq, int k, int ef, float* out_scores, std::int64_t* out_ids,
                std::int64_t* out_scanned, int num_threads) const;

    // Groups of query heads [ngroups, group, d]: one search per group, keys
    // ranked by their best score over the group; scanned = keys read.
    void search_group(const float* queries, std::int64_t ngroups, int group, int k, int ef, float* out_scores,
                      std::int64_t* out_ids, std::int64_t* out_scanned, int num_threads) const;

    // Inserts keys [m, d] produced later; returns the id of the first one.
    std::int64_t add(const float* keys, std::int64_t m, int ef_construction, int num_threads);

    // Copies the keys ids[0..m) into out [m, d]; throws std::out_of_range for an id outside [0, size).
    void reconstruct(const std::int64_t* ids, std::int64_t m, float* out) const;

    // Keeps the keys with keep[i] != 0 (keep has size() entries), renumbered in
    // order; edges into removed keys are dropped, then the graph is repaired
    // (as after a build) so that every kept key is reachable again. On failure
    // the graph is left as it was.
    void remove(const std::vector<char>& keep, int ef_construction, int num_threads);

    // Raw state for persistence (a consistent copy).
    GraphState state() const;
    void set_state(std::vector<float> keys, std::vector<std::int32_t> nbrs, std::vector<std::int32_t> entry);

    // Number of keys reachable from the entry points (a test hook: must be N).
    std::int64_t count_reachable() const;

private:
    using Scored = std::pair<float, std::int32_t>;

    const float* key(std::int64_t i) const { return keys_.data() + i * dim_; }
    std::int32_t* row(std::int64_t i) { return nbrs_.data() + i * degree_; }
    const std::int32_t* row(std::int64_t i) const { return nbrs_.data() + i * degree_; }
    int out_degree(std::int64_t i) const;

    // Beam search from the entry points; results sorted by score descending.
    enum class Metric { kInnerProduct, kL2 };
    template <class Score>
    std::vector<Scored> beam_search_by(Score score, int ef, VisitedSet& vis, std::int64_t* scanned) const;
    std::vector<Scored> beam_search(const float* q, int ef, VisitedSet& vis, std::int64_t* scanned,
                                    Metric metric = Metric::kInnerProduct) const;
    // Replaces the weakest projection edges of every key by its nearest keys
    // in L2 (found by searching the graph with the key itself).
    void add_geometric_edges(const BuildParams& p, const std::int64_t* geo, int kg);
    void refresh_norms();
    // Occlusion pruning around `pivot`; cands sorted by score with the pivot, descending.
    void prune(std::int64_t pivot, std::vector<Scored>& cands, int max_out, std::vector<std::int32_t>& out) const;

    void project(const std::int64_t* topk, std::int64_t nq, int kt, const BuildParams& p, BuildStats& st);
    void add_reverse_edges(int num_threads);
    void repair(const BuildParams& p, BuildStats& st);
    void choose_entry_points(const std::int64_t* topk, std::int64_t nq, int kt, const BuildParams& p);
    std::vector<char> reachable() const;
    std::int64_t add_unchecked(const float* keys, std::int64_t m, int ef_construction, int num_threads);
    void compact_rows();
    void link_into(std::int64_t target, const std::vector<Scored>& found, std::vector<std::int32_t>& indeg);
    // Edges a build gives each key before repair; the slots above it are kept
    // free so that connectivity repair rarely has to drop an edge.
    int content_degree() const { return degree_ - std::max(1, degree_ / 16); }

    int dim_;
    int degree_;
    std::int64_t n_ = 0;
    std::vector<float> keys_;
    std::vector<float> sqnorm_;  // |k|^2 per key, for L2 searches
    std::vector<std::int32_t> nbrs_;
    std::vector<std::int32_t> entry_;
    mutable VisitedPool pool_;
    // Searches share the graph; add/build/set_state take it alone.
    mutable std::shared_mutex rw_;
};

}  // namespace kvstore
