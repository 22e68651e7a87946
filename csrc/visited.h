// Visited-set pool for graph searches.
//
// A visited set is an epoch-stamped array: clearing is O(1) (bump the epoch),
// so one allocation serves many searches. The pool hands sets to concurrent
// searches (OpenMP threads of one call, or several Python threads searching
// the same index) and takes them back, so they are reused across calls.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace kvstore {

class VisitedSet {
public:
    explicit VisitedSet(std::size_t n) : stamp_(n, 0) {}
    void reset(std::size_t n) {
        if (stamp_.size() < n) stamp_.resize(n, 0);
        if (++epoch_ == 0) {  // wrapped: clear for real once every 2^16 uses
            std::fill(stamp_.begin(), stamp_.end(), 0);
            epoch_ = 1;
        }
    }
    bool test_and_set(std::int64_t i) {
        if (stamp_[i] == epoch_) return true;
        stamp_[i] = epoch_;
        return false;
    }
    bool test(std::int64_t i) const { return stamp_[i] == epoch_; }

private:
    std::vector<std::uint16_t> stamp_;
    std::uint16_t epoch_ = 0;
};

class VisitedPool {
public:
    std::unique_ptr<VisitedSet> acquire(std::size_t n) {
        std::unique_ptr<VisitedSet> v;
        {
            std::lock_guard<std::mutex> lock(mu_);
            if (!free_.empty()) {
                v = std::move(free_.back());
                free_.pop_back();
            }
        }
        if (!v) v = std::make_unique<VisitedSet>(n);
        v->reset(n);
        return v;
    }
    void release(std::unique_ptr<VisitedSet> v) {
        std::lock_guard<std::mutex> lock(mu_);
        free_.push_back(std::move(v));
    }

private:
    std::mutex mu_;
    std::vector<std::unique_ptr<VisitedSet>> free_;
};

// Returns a set to its pool when it goes out of scope.
class VisitedLease {
public:
    VisitedLease(VisitedPool& pool, std::size_t n) : pool_(pool), set_(pool.acquire(n)) {}
    ~VisitedLease() { pool_.release(std::move(set_)); }
    VisitedSet& operator*() { return *set_; }
    VisitedSet* operator->() { return set_.get(); }

private:
    VisitedPool& pool_;
    std::unique_ptr<VisitedSet> set_;
};

}  // namespace kvstore
