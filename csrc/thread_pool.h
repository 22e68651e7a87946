// A fixed pool of worker threads for short, latency-bound parallel loops
// (the wave buffer's per-step planning), where starting an OpenMP team or new
// threads every call would cost more than the work.
//
// The workers are created once; parallel_for(n, fn) runs fn(0..n-1) on the
// workers and the calling thread and blocks until every index is done (not
// until every worker has woken: a worker that wakes after the indices are
// gone has nothing to do). After a job the workers poll for a few tens of
// microseconds before sleeping, so back-to-back calls (one per layer and
// decode step) do not pay a futex wake; the polling yields the CPU, so it
// does not starve the threads it waits for on an oversubscribed machine.
// An exception thrown by fn on any thread is caught there, the remaining
// indices are skipped, and the first exception is rethrown on the calling
// thread. Calls from several threads are serialised; a parallel_for issued
// from inside fn, or in a forked child (which has no workers), runs serially
// on the calling thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvstore {

// CPUs this process may run on (sched_getaffinity), at least 1.
int affinity_cpu_count();

class ThreadPool {
public:
    // num_threads: threads taking part in a loop, the caller included
    // (num_threads - 1 workers are started); 0 = affinity_cpu_count().
    // spin_us: how long idle workers poll for the next job before sleeping.
    explicit ThreadPool(int num_threads = 0, int spin_us = 50);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return static_cast<int>(workers_.size()) + 1; }

    // Runs fn(i) for every i in [0, n) and returns when all are done.
    void parallel_for(std::int64_t n, const std::function<void(std::int64_t)>& fn);

    // A process-wide pool of num_threads threads (0 = affinity count), shared by
    // every caller asking for that size while one is alive.
    static std::shared_ptr<ThreadPool> shared(int num_threads);

private:
    void worker_loop();
    // Claims and runs indices of job `gen` until none are left (or the job is over).
    void work(std::uint32_t gen) noexcept;
    void run_job(std::int64_t base, std::int64_t n, const std::function<void(std::int64_t)>& fn);

    std::vector<std::thread> workers_;
    const int spin_us_;
    const int owner_pid_;  // the process that started the workers

    std::mutex call_mu_;  // one job at a time
    std::mutex mu_;       // guards the sleep/wake conditions
    std::condition_variable cv_start_;
    std::condition_variable cv_done_;
    std::atomic<bool> stop_{false};

    // The current job: (generation << 32) | next unclaimed index, one word so
    // that a worker waking late can only claim an index of the job it saw; the
    // caller waits for the indices to be done, not for the workers to wake.
    std::atomic<std::uint64_t> job_{0};
    std::atomic<std::int64_t> done_{0};  // indices of the current job finished
    // Written before the job is published; stable while any index is claimed
    // (atomic only because a worker waking late may read them as they change).
    std::atomic<const std::function<void(std::int64_t)>*> fn_{nullptr};
    std::atomic<std::int64_t> base_{0};
    std::atomic<std::int64_t> n_{0};
    std::atomic<bool> failed_{false};
    std::mutex err_mu_;
    std::exception_ptr error_;
};

}  // namespace kvstore
