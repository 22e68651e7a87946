// The wave buffer's CPU side (RetroInfer, offload mode): plans, per decode
// step, which retrieval clusters are read from the GPU cache and which from
// pinned host memory, and which misses are copied into the cache afterwards.
//
// Layout. The host KV holds the clusters of head slot g (g in [0, G)) at rows
// cluster_rows[g][c] .. cluster_rows[g][c + 1]. The GPU cache is made of pages
// of P = page_tokens rows (cache row = page * P + i); slot g owns pages
// [g * pages_per_slot, (g + 1) * pages_per_slot) and keeps its own LRU order
// at cluster granularity, so slots plan in parallel without locks.
//
// One step of slot g, for its retrieval ids (distinct, in [0, C)):
//   * empty clusters (size 0) are skipped: no run, neither hit nor miss;
//   * runs, in order: the steady run (src STEADY, row steady_row,
//     len steady_len) when steady_len > 0; then per retrieval cluster in the
//     given order: a hit gives one run per page (src CACHE,
//     row page * P, len min(P, tokens left)), a miss one run (src HOST,
//     row cluster_rows[g][c], len size);
//   * every hit is touched (made most recent), in the given order, before any
//     admission;
//   * then the misses, in the given order, are admitted when they fit: a
//     cluster needs ceil(size / P) pages; it is admitted iff it needs at most
//     free pages + pages held by cached clusters NOT selected this step (so a
//     cluster larger than the slot's cache never is); least recently used
//     clusters are evicted until enough pages are free (an evicted cluster's
//     pages go back on the free stack in reverse order), then the pages are
//     popped from the free stack (initially ascending: page 0 first) and the
//     cluster becomes most recent. Each admitted page gives one copy
//     (host row cluster_rows[g][c] + j * P -> cache row page * P,
//     len min(P, tokens left)).
// The mapping is updated at plan time: the caller copies after the step's
// attention on the same stream, so the next step's hits are valid.
//
// Not thread-safe per planner (one planner per layer, planned from one
// thread): callers hold a WaveBufferPlanner::Exclusive around every use
// (validate + plan + write, reset, inspection); a second Exclusive taken while
// one is alive throws std::runtime_error instead of racing.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "thread_pool.h"

namespace kvstore {

enum RunSource : std::int32_t { kRunHost = 0, kRunCache = 1, kRunSteady = 2 };

struct WavePlanTotals {
    std::int64_t runs = 0;
    std::int64_t copies = 0;
    std::int64_t hits = 0;         // clusters
    std::int64_t misses = 0;       // clusters
    std::int64_t hit_tokens = 0;
    std::int64_t miss_tokens = 0;
};

class WaveBufferPlanner {
public:
    // cluster_rows: [G, C + 1] row-major, non-decreasing per slot, >= 0.
    // num_threads: 0 = CPUs of the affinity mask. Throws std::invalid_argument.
    WaveBufferPlanner(const std::int64_t* cluster_rows, std::int64_t num_slots, std::int64_t num_clusters,
                      std::int64_t pages_per_slot, std::int64_t page_tokens, int num_threads);

    // Throws std::invalid_argument unless ids [G, r] are in [0, C) and distinct
    // per row, steady_rows >= 0, steady_len >= 0. Touches no planning state.
    void validate(const std::int64_t* ids, std::int64_t num_slots, std::int64_t r, const std::int64_t* steady_rows,
                  const std::int32_t* steady_len);

    // Guards one use of the planner; throws std::runtime_error when another
    // thread holds one.
    class Exclusive {
    public:
        explicit Exclusive(WaveBufferPlanner& p);
        ~Exclusive();
        Exclusive(const Exclusive&) = delete;
        Exclusive& operator=(const Exclusive&) = delete;

    private:
        WaveBufferPlanner& p_;
    };

    // Plans one step (inputs must have passed validate) in parallel over the
    // slots; the results stay inside until write(). An exception on a worker
    // (none is expected after validate but out of memory) empties the cache
    // (reset()) and is rethrown here.
    WavePlanTotals plan(const std::int64_t* ids, std::int64_t r, const std::int64_t* steady_rows,
                        const std::int32_t* steady_len);

    // Copies the last plan out: runs [totals.runs], run_offsets [G + 1],
    // copies [totals.copies].
    void write(std::int32_t* run_src, std::int64_t* run_row, std::int32_t* run_len, std::int32_t* run_offsets,
               std::int64_t* copy_src_row, std::int64_t* copy_dst_row, std::int32_t* copy_len) const;

    void reset();                                                   // empties every slot's cache
    std::vector<std::int64_t> cached_clusters(std::int64_t g) const;  // least recent first
    std::vector<std::int64_t> cluster_pages(std::int64_t g, std::int64_t c) const;  // global page ids, in order

    std::int64_t num_slots() const { return G_; }
    std::int64_t num_clusters() const { return C_; }
    std::int64_t pages_per_slot() const { return pages_per_slot_; }
    std::int64_t page_tokens() const { return P_; }
    int num_threads() const { return pool_->size(); }

private:
    // Everything a step reads about one cluster, in one 32-byte record: the
    // records are visited in random order and a slot's do not stay in cache
    // between steps, so a cluster should cost one line fetch.
    struct Entry {
        std::int64_t start = 0;        // first host row
        std::int32_t size = 0;         // rows
        std::int32_t pages = 0;        // ceil(size / P)
        std::int32_t first_page = -1;  // local page holding rows 0..P-1; -1 when not cached
        std::uint32_t mark = 0;        // == Slot::stamp: selected in this step
        std::uint32_t touch = 0;       // time of the last use (Slot::clock), valid while cached
        std::uint32_t pad = 0;
    };
    static_assert(sizeof(Entry) == 32, "Entry should fill half a cache line");

    // The LRU order is a queue of (cluster, touch time) in touch order; a use
    // appends a new item, and the older items of that cluster become stale
    // (their time no longer matches the record). Evictions pop from the front,
    // skipping stale items. Unlike a linked list this keeps the eviction order
    // in sequential memory, so the victims' records can be prefetched instead
    // of chased one cold miss after another.
    struct QItem {
        std::int32_t c;
        std::uint32_t t;
    };

    struct alignas(64) Slot {
        std::vector<Entry> entry;              // [C]
        std::vector<QItem> queue;              // items [qfront, size) are live or stale
        std::size_t qfront = 0;
        std::uint32_t clock = 0;
        std::int64_t cached = 0;               // clusters in the cache
        std::vector<std::int32_t> page_next;   // next local page of the same cluster, -1 at the end
        std::vector<std::int32_t> free_pages;  // stack: back() is taken first
        std::uint32_t stamp = 0;
        // Output of the last plan: arrays sized to their bounds (runs <= 1 + r + pages, copies <= pages),
        // filled up to n_runs / n_copies.
        std::vector<std::int32_t> run_src, run_len;
        std::vector<std::int64_t> run_row;
        std::vector<std::int64_t> copy_src, copy_dst;
        std::vector<std::int32_t> copy_len;
        std::int64_t n_runs = 0, n_copies = 0;
        WavePlanTotals totals;
    };

    void reset_slot(Slot& s);
    void plan_slot(std::int64_t g, const std::int64_t* ids, std::int64_t r, std::int64_t steady_row,
                   std::int32_t steady_len);
    static bool live(const Slot& s, const QItem& q) {
        const Entry& x = s.entry[static_cast<std::size_t>(q.c)];
        return x.first_page >= 0 && x.touch == q.t;
    }
    static void touch(Slot& s, std::int32_t c);
    static void compact(Slot& s);
    void evict(Slot& s, std::int32_t c);

    std::int64_t G_, C_, pages_per_slot_, P_;
    std::vector<Slot> slots_;
    std::vector<std::uint32_t> check_mark_;  // validate()'s duplicate detection
    std::uint32_t check_stamp_ = 0;
    std::shared_ptr<ThreadPool> pool_;
    std::atomic<bool> busy_{false};
};

}  // namespace kvstore
