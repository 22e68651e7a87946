#include "wave_buffer.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace kvstore {

namespace {

constexpr std::int64_t kInt32Max = std::numeric_limits<std::int32_t>::max();

std::string slot_str(std::int64_t g) { return "slot " + std::to_string(g); }

}  // namespace

WaveBufferPlanner::WaveBufferPlanner(const std::int64_t* cluster_rows, std::int64_t num_slots,
                                     std::int64_t num_clusters, std::int64_t pages_per_slot,
                                     std::int64_t page_tokens, int num_threads)
    : G_(num_slots), C_(num_clusters), pages_per_slot_(pages_per_slot), P_(page_tokens) {
    if (G_ < 1) throw std::invalid_argument("cluster_rows must have at least one slot (row)");
    if (C_ < 0) throw std::invalid_argument("cluster_rows must have C + 1 >= 1 columns");
    if (C_ >= kInt32Max) throw std::invalid_argument("too many clusters per slot (>= 2^31 - 1)");
    if (page_tokens < 1) throw std::invalid_argument("page_tokens must be >= 1");
    if (pages_per_slot < 0) throw std::invalid_argument("pages_per_slot must be >= 0");
    if (pages_per_slot >= kInt32Max) throw std::invalid_argument("pages_per_slot must be < 2^31 - 1");
    if (G_ * pages_per_slot > std::numeric_limits<std::int64_t>::max() / page_tokens)
        throw std::invalid_argument("G * pages_per_slot * page_tokens overflows int64");
    for (std::int64_t g = 0; g < G_; ++g) {
        const std::int64_t* r = cluster_rows + g * (C_ + 1);
        if (r[0] < 0)
            throw std::invalid_argument("cluster_rows[" + std::to_string(g) + "][0] is negative (" +
                                        std::to_string(r[0]) + ")");
        for (std::int64_t c = 0; c < C_; ++c) {
            if (r[c + 1] < r[c])
                throw std::invalid_argument("cluster_rows must be non-decreasing per slot: cluster_rows[" +
                                            std::to_string(g) + "][" + std::to_string(c + 1) + "] = " +
                                            std::to_string(r[c + 1]) + " < " + std::to_string(r[c]));
            if (r[c + 1] - r[c] > kInt32Max)
                throw std::invalid_argument("cluster " + std::to_string(c) + " of " + slot_str(g) +
                                            " has more than 2^31 - 1 rows");
        }
    }
    pool_ = ThreadPool::shared(num_threads);
    slots_.resize(static_cast<std::size_t>(G_));
    for (std::int64_t g = 0; g < G_; ++g) {
        Slot& s = slots_[static_cast<std::size_t>(g)];
        const std::int64_t* r = cluster_rows + g * (C_ + 1);
        s.entry.resize(static_cast<std::size_t>(C_));
        for (std::int64_t c = 0; c < C_; ++c) {
            Entry& e = s.entry[static_cast<std::size_t>(c)];
            e.start = r[c];
            e.size = static_cast<std::int32_t>(r[c + 1] - r[c]);
            e.pages = static_cast<std::int32_t>((e.size + P_ - 1) / P_);
        }
        s.page_next.assign(static_cast<std::size_t>(pages_per_slot_), -1);
        s.free_pages.reserve(static_cast<std::size_t>(pages_per_slot_));
        reset_slot(s);
    }
    check_mark_.assign(static_cast<std::size_t>(C_), 0);
}

void WaveBufferPlanner::reset_slot(Slot& s) {
    for (Entry& e : s.entry) e.first_page = -1;
    std::fill(s.page_next.begin(), s.page_next.end(), -1);
    s.queue.clear();
    s.qfront = 0;
    s.clock = 0;
    s.cached = 0;
    s.free_pages.clear();
    for (std::int64_t p = pages_per_slot_ - 1; p >= 0; --p) s.free_pages.push_back(static_cast<std::int32_t>(p));
    s.n_runs = s.n_copies = 0;
}

WaveBufferPlanner::Exclusive::Exclusive(WaveBufferPlanner& p) : p_(p) {
    if (p_.busy_.exchange(true, std::memory_order_acquire))
        throw std::runtime_error("the WaveBufferPlanner is in use on another thread (use one planner per thread)");
}

WaveBufferPlanner::Exclusive::~Exclusive() { p_.busy_.store(false, std::memory_order_release); }

void WaveBufferPlanner::reset() {
    for (auto& s : slots_) reset_slot(s);
}

void WaveBufferPlanner::validate(const std::int64_t* ids, std::int64_t num_slots, std::int64_t r,
                                 const std::int64_t* steady_rows, const std::int32_t* steady_len) {
    if (num_slots != G_)
        throw std::invalid_argument("retrieval_ids has " + std::to_string(num_slots) + " rows, the planner " +
                                    std::to_string(G_) + " slots");
    if (r < 0) throw std::invalid_argument("retrieval_ids has a negative number of columns");
    if (r > C_)
        throw std::invalid_argument("retrieval_ids has " + std::to_string(r) + " columns but a slot has only " +
                                    std::to_string(C_) + " clusters (ids must be distinct)");
    if (G_ * (1 + r + pages_per_slot_) > kInt32Max)  // the bound on the runs of one plan
        throw std::invalid_argument("G * (1 + r + pages_per_slot) must be < 2^31 (run_offsets are int32)");
    for (std::int64_t g = 0; g < G_; ++g) {
        if (steady_rows[g] < 0)
            throw std::invalid_argument("steady_rows[" + std::to_string(g) + "] is negative");
        if (steady_len[g] < 0) throw std::invalid_argument("steady_len[" + std::to_string(g) + "] is negative");
        if (++check_stamp_ == 0) {  // wrapped: clear the marks once every 2^32 rows
            std::fill(check_mark_.begin(), check_mark_.end(), 0);
            check_stamp_ = 1;
        }
        const std::int64_t* row = ids + g * r;
        for (std::int64_t i = 0; i < r; ++i) {
            const std::int64_t c = row[i];
            if (c < 0 || c >= C_)
                throw std::invalid_argument("retrieval_ids[" + std::to_string(g) + ", " + std::to_string(i) +
                                            "] = " + std::to_string(c) + " is out of range [0, " +
                                            std::to_string(C_) + ")");
            if (check_mark_[c] == check_stamp_)
                throw std::invalid_argument("retrieval_ids row " + std::to_string(g) + " repeats cluster " +
                                            std::to_string(c));
            check_mark_[c] = check_stamp_;
        }
    }
}

void WaveBufferPlanner::touch(Slot& s, std::int32_t c) {
    s.entry[static_cast<std::size_t>(c)].touch = ++s.clock;
    s.queue.push_back({c, s.clock});
}

// Drops the consumed and stale items and renumbers the live ones 1..k (so
// the 32-bit clock never wraps: it restarts at every compaction, which comes
// after at most O(cached + r) uses).
void WaveBufferPlanner::compact(Slot& s) {
    constexpr std::size_t kAhead = 16;
    std::size_t k = 0;
    const std::size_t n = s.queue.size();
    for (std::size_t i = s.qfront; i < n; ++i) {
        if (i + kAhead < n) __builtin_prefetch(&s.entry[static_cast<std::size_t>(s.queue[i + kAhead].c)], 1);
        const QItem q = s.queue[i];
        if (!live(s, q)) continue;
        const auto t = static_cast<std::uint32_t>(k + 1);
        s.entry[static_cast<std::size_t>(q.c)].touch = t;
        s.queue[k++] = {q.c, t};
    }
    s.queue.resize(k);
    s.qfront = 0;
    s.clock = static_cast<std::uint32_t>(k);
}

void WaveBufferPlanner::evict(Slot& s, std::int32_t c) {
    Entry& x = s.entry[static_cast<std::size_t>(c)];
    // The pages go back in reverse so that popping them again yields the same order.
    const std::size_t base = s.free_pages.size();
    for (std::int32_t p = x.first_page; p >= 0;) {
        const std::int32_t n = s.page_next[p];
        s.page_next[p] = -1;
        s.free_pages.push_back(p);
        p = n;
    }
    std::reverse(s.free_pages.begin() + static_cast<std::ptrdiff_t>(base), s.free_pages.end());
    x.first_page = -1;
    --s.cached;
}

void WaveBufferPlanner::plan_slot(std::int64_t g, const std::int64_t* ids, std::int64_t r, std::int64_t steady_row,
                                  std::int32_t steady_len) {
    constexpr std::size_t kAhead = 16;  // prefetch distance along the eviction queue
    Slot& s = slots_[static_cast<std::size_t>(g)];
    Entry* e = s.entry.data();
    const std::int64_t page_base = g * pages_per_slot_;
    const auto max_runs = static_cast<std::size_t>(1 + r + pages_per_slot_);
    if (s.run_src.size() < max_runs) {  // grows once for a given r
        s.run_src.resize(max_runs);
        s.run_len.resize(max_runs);
        s.run_row.resize(max_runs);
    }
    if (s.copy_src.size() < static_cast<std::size_t>(pages_per_slot_)) {
        s.copy_src.resize(static_cast<std::size_t>(pages_per_slot_));
        s.copy_dst.resize(static_cast<std::size_t>(pages_per_slot_));
        s.copy_len.resize(static_cast<std::size_t>(pages_per_slot_));
    }
    if (s.queue.size() - s.qfront > static_cast<std::size_t>(2 * s.cached + 2 * r + 64)) compact(s);
    std::int32_t* run_src = s.run_src.data();
    std::int32_t* run_len = s.run_len.data();
    std::int64_t* run_row = s.run_row.data();
    std::int64_t nr = 0, nc = 0;
    WavePlanTotals t;
    if (++s.stamp == 0) {
        for (Entry& x : s.entry) x.mark = 0;
        s.stamp = 1;
    }
    // The records are scattered: start every fetch before using any.
    for (std::int64_t i = 0; i < r; ++i) __builtin_prefetch(e + ids[i], 1);
    std::int32_t* page_next = s.page_next.data();
    for (std::int64_t i = 0; i < r; ++i) {
        Entry& x = e[ids[i]];
        x.mark = s.stamp;
        if (x.first_page >= 0) __builtin_prefetch(page_next + x.first_page);
    }

    if (steady_len > 0) {
        run_src[nr] = kRunSteady;
        run_row[nr] = steady_row;
        run_len[nr++] = steady_len;
    }
    // Pass 1: runs in the given order; hits become most recent.
    std::int64_t selected_pages = 0;  // pages held by clusters selected in this step
    for (std::int64_t i = 0; i < r; ++i) {
        const auto c = static_cast<std::int32_t>(ids[i]);
        const Entry& x = e[c];
        if (x.size == 0) continue;
        if (x.first_page >= 0) {
            ++t.hits;
            t.hit_tokens += x.size;
            std::int64_t left = x.size;
            for (std::int32_t p = x.first_page; p >= 0; p = page_next[p]) {
                run_src[nr] = kRunCache;
                run_row[nr] = (page_base + p) * P_;
                run_len[nr++] = static_cast<std::int32_t>(std::min(P_, left));
                left -= P_;
            }
            selected_pages += x.pages;
            touch(s, c);
        } else {
            ++t.misses;
            t.miss_tokens += x.size;
            run_src[nr] = kRunHost;
            run_row[nr] = x.start;
            run_len[nr++] = x.size;
        }
    }

    // Pass 2: admissions. Every cluster selected in this step was used after
    // every unselected one, so the live items in front of the first selected
    // one are exactly the evictable clusters, least recent first.
    if (pages_per_slot_ > 0 && t.misses > 0) {
        for (std::size_t k = s.qfront; k < s.qfront + kAhead && k < s.queue.size(); ++k)
            __builtin_prefetch(e + s.queue[k].c, 1);
        for (std::int64_t i = 0; i < r; ++i) {
            const auto c = static_cast<std::int32_t>(ids[i]);
            Entry& x = e[c];
            if (x.size == 0 || x.first_page >= 0) continue;
            const std::int64_t need = x.pages;
            if (need > pages_per_slot_ - selected_pages) continue;  // > free + pages of unselected clusters
            while (static_cast<std::int64_t>(s.free_pages.size()) < need) {
                if (s.qfront + kAhead < s.queue.size()) __builtin_prefetch(e + s.queue[s.qfront + kAhead].c, 1);
                if (s.qfront >= s.queue.size())  // cannot happen: see the comment above
                    throw std::logic_error("WaveBufferPlanner: LRU queue exhausted in " + slot_str(g));
                const QItem q = s.queue[s.qfront++];
                if (!live(s, q)) continue;
                if (e[q.c].mark == s.stamp)
                    throw std::logic_error("WaveBufferPlanner: LRU order broken in " + slot_str(g));
                evict(s, q.c);
            }
            std::int32_t last = -1;
            for (std::int64_t j = 0; j < need; ++j) {
                const std::int32_t p = s.free_pages.back();
                s.free_pages.pop_back();
                if (last >= 0) s.page_next[last] = p; else x.first_page = p;
                s.page_next[p] = -1;
                last = p;
                s.copy_src[nc] = x.start + j * P_;
                s.copy_dst[nc] = (page_base + p) * P_;
                s.copy_len[nc++] = static_cast<std::int32_t>(std::min(P_, x.size - j * P_));
            }
            ++s.cached;
            touch(s, c);
            selected_pages += need;
        }
    }
    s.n_runs = nr;
    s.n_copies = nc;
    t.runs = nr;
    t.copies = nc;
    s.totals = t;
}

WavePlanTotals WaveBufferPlanner::plan(const std::int64_t* ids, std::int64_t r, const std::int64_t* steady_rows,
                                       const std::int32_t* steady_len) {
    try {
        pool_->parallel_for(G_, [&](std::int64_t g) { plan_slot(g, ids + g * r, r, steady_rows[g], steady_len[g]); });
    } catch (...) {  // some slots may be half planned (e.g. out of memory): start over from an empty cache
        reset();
        throw;
    }
    WavePlanTotals t;
    for (const auto& s : slots_) {
        t.runs += s.totals.runs;
        t.copies += s.totals.copies;
        t.hits += s.totals.hits;
        t.misses += s.totals.misses;
        t.hit_tokens += s.totals.hit_tokens;
        t.miss_tokens += s.totals.miss_tokens;
    }
    return t;
}

void WaveBufferPlanner::write(std::int32_t* run_src, std::int64_t* run_row, std::int32_t* run_len,
                              std::int32_t* run_offsets, std::int64_t* copy_src_row, std::int64_t* copy_dst_row,
                              std::int32_t* copy_len) const {
    std::int64_t nr = 0, nc = 0;
    run_offsets[0] = 0;
    for (std::int64_t g = 0; g < G_; ++g) {
        const Slot& s = slots_[static_cast<std::size_t>(g)];
        const auto k = static_cast<std::size_t>(s.n_runs), m = static_cast<std::size_t>(s.n_copies);
        if (k) {
            std::memcpy(run_src + nr, s.run_src.data(), k * sizeof(std::int32_t));
            std::memcpy(run_row + nr, s.run_row.data(), k * sizeof(std::int64_t));
            std::memcpy(run_len + nr, s.run_len.data(), k * sizeof(std::int32_t));
        }
        if (m) {
            std::memcpy(copy_src_row + nc, s.copy_src.data(), m * sizeof(std::int64_t));
            std::memcpy(copy_dst_row + nc, s.copy_dst.data(), m * sizeof(std::int64_t));
            std::memcpy(copy_len + nc, s.copy_len.data(), m * sizeof(std::int32_t));
        }
        nr += static_cast<std::int64_t>(k);
        nc += static_cast<std::int64_t>(m);
        run_offsets[g + 1] = static_cast<std::int32_t>(nr);
    }
}

std::vector<std::int64_t> WaveBufferPlanner::cached_clusters(std::int64_t g) const {
    if (g < 0 || g >= G_)
        throw std::out_of_range("slot " + std::to_string(g) + " is out of range [0, " + std::to_string(G_) + ")");
    const Slot& s = slots_[static_cast<std::size_t>(g)];
    std::vector<std::int64_t> out;
    for (std::size_t i = s.qfront; i < s.queue.size(); ++i)
        if (live(s, s.queue[i])) out.push_back(s.queue[i].c);
    return out;
}

std::vector<std::int64_t> WaveBufferPlanner::cluster_pages(std::int64_t g, std::int64_t c) const {
    if (g < 0 || g >= G_)
        throw std::out_of_range("slot " + std::to_string(g) + " is out of range [0, " + std::to_string(G_) + ")");
    if (c < 0 || c >= C_)
        throw std::out_of_range("cluster " + std::to_string(c) + " is out of range [0, " + std::to_string(C_) + ")");
    const Slot& s = slots_[static_cast<std::size_t>(g)];
    std::vector<std::int64_t> out;
    for (std::int32_t p = s.entry[c].first_page; p >= 0; p = s.page_next[p]) out.push_back(g * pages_per_slot_ + p);
    return out;
}

}  // namespace kvstore
