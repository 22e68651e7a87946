#include "thread_pool.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <stdexcept>
#include <string>

namespace kvstore {

namespace {

thread_local bool tls_in_job = false;  // set while this thread runs fn of some pool

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Polls pred for about spin_us microseconds; true as soon as it holds. After
// the first couple of microseconds it yields between polls, so that a thread
// it waits for can run when the two share a core (an oversubscribed machine).
template <class Pred>
bool spin_until(Pred pred, int spin_us) {
    if (spin_us <= 0) return pred();
    const auto start = std::chrono::steady_clock::now();
    const auto yield_after = start + std::chrono::microseconds(2);
    const auto deadline = start + std::chrono::microseconds(spin_us);
    for (;;) {
        for (int i = 0; i < 32; ++i) {
            if (pred()) return true;
            cpu_relax();
        }
        const auto now = std::chrono::steady_clock::now();
        if (now >= deadline) return pred();
        if (now >= yield_after) sched_yield();
    }
}

}  // namespace

int affinity_cpu_count() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    const unsigned hc = std::thread::hardware_concurrency();
    return hc > 0 ? static_cast<int>(hc) : 1;
}

ThreadPool::ThreadPool(int num_threads, int spin_us) : spin_us_(spin_us), owner_pid_(getpid()) {
    if (num_threads < 0) throw std::invalid_argument("num_threads must be >= 0 (0 = CPUs of the affinity mask)");
    if (num_threads > 4096) throw std::invalid_argument("num_threads must be <= 4096");
    const int n = num_threads == 0 ? affinity_cpu_count() : num_threads;
    workers_.reserve(static_cast<std::size_t>(n - 1));
    try {
        for (int i = 1; i < n; ++i) workers_.emplace_back([this] { worker_loop(); });
    } catch (...) {  // thread creation failed: stop the ones started, then report
        stop_.store(true);
        {
            std::lock_guard<std::mutex> lk(mu_);
        }
        cv_start_.notify_all();
        for (auto& t : workers_) t.join();
        throw;
    }
}

ThreadPool::~ThreadPool() {
    if (getpid() != owner_pid_) {  // a forked child: the workers live only in the parent
        for (auto& t : workers_) t.detach();
        return;
    }
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_.store(true);
    }
    cv_start_.notify_all();
    for (auto& t : workers_) t.join();
}

void ThreadPool::work(std::uint32_t gen) noexcept {
    const bool outer = tls_in_job;
    tls_in_job = true;
    std::uint64_t w = job_.load(std::memory_order_acquire);
    for (;;) {
        if (static_cast<std::uint32_t>(w >> 32) != gen) break;  // that job is over
        const std::int64_t i = static_cast<std::int64_t>(w & 0xffffffffu);
        // n_ may already belong to a newer job here: the caller closes job_ before writing n_ (see
        // run_job), and this acquire orders the CAS after the close, so the CAS then fails.
        if (i >= n_.load(std::memory_order_acquire)) break;
        if (!job_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
        // Index i is claimed: the job cannot end before it is counted done, so these are its own.
        const std::int64_t n = n_.load(std::memory_order_relaxed);
        if (!failed_.load(std::memory_order_relaxed)) {
            try {
                (*fn_.load(std::memory_order_relaxed))(base_.load(std::memory_order_relaxed) + i);
            } catch (...) {
                std::lock_guard<std::mutex> lk(err_mu_);
                if (!error_) error_ = std::current_exception();
                failed_.store(true, std::memory_order_relaxed);
            }
        }
        if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
            std::lock_guard<std::mutex> lk(mu_);  // pairs with the caller's predicate check
            cv_done_.notify_one();
        }
        w = job_.load(std::memory_order_acquire);
    }
    tls_in_job = outer;
}

void ThreadPool::worker_loop() {
    std::uint32_t seen = 0;
    for (;;) {
        auto ready = [&] {
            return stop_.load(std::memory_order_acquire) ||
                   static_cast<std::uint32_t>(job_.load(std::memory_order_acquire) >> 32) != seen;
        };
        if (!spin_until(ready, spin_us_)) {
            std::unique_lock<std::mutex> lk(mu_);
            cv_start_.wait(lk, ready);
        }
        if (stop_.load(std::memory_order_acquire)) return;
        seen = static_cast<std::uint32_t>(job_.load(std::memory_order_acquire) >> 32);
        work(seen);
    }
}

void ThreadPool::run_job(std::int64_t base, std::int64_t n, const std::function<void(std::int64_t)>& fn) {
    // Close the previous job first: a worker that still holds a word of it and
    // reads the new n_ must not be able to claim "index i < new n" of the old
    // generation. The closed word has a generation of its own, whose index
    // (0xffffffff) is past every n, and the new job gets the next one.
    const auto closed = static_cast<std::uint32_t>((job_.load(std::memory_order_relaxed) >> 32) + 1);
    const auto gen = closed + 1;
    job_.store((static_cast<std::uint64_t>(closed) << 32) | 0xffffffffu, std::memory_order_relaxed);
    fn_.store(&fn, std::memory_order_relaxed);
    base_.store(base, std::memory_order_relaxed);
    n_.store(n, std::memory_order_release);  // pairs with the acquire in work()
    done_.store(0, std::memory_order_relaxed);
    failed_.store(false, std::memory_order_relaxed);
    error_ = nullptr;
    {
        std::lock_guard<std::mutex> lk(mu_);
        job_.store(static_cast<std::uint64_t>(gen) << 32, std::memory_order_release);
    }
    cv_start_.notify_all();
    work(gen);
    auto done = [&] { return done_.load(std::memory_order_acquire) == n; };
    if (!spin_until(done, spin_us_)) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_done_.wait(lk, done);
    }
    std::exception_ptr e = std::move(error_);
    error_ = nullptr;
    if (e) std::rethrow_exception(e);
}

void ThreadPool::parallel_for(std::int64_t n, const std::function<void(std::int64_t)>& fn) {
    if (n <= 0) return;
    // In a forked child the workers do not exist: run serially there.
    if (workers_.empty() || n == 1 || tls_in_job || getpid() != owner_pid_) {
        for (std::int64_t i = 0; i < n; ++i) fn(i);
        return;
    }
    std::lock_guard<std::mutex> call(call_mu_);
    constexpr std::int64_t kChunk = std::int64_t{1} << 31;  // indices must fit the low half of job_
    for (std::int64_t base = 0; base < n; base += kChunk) run_job(base, std::min(kChunk, n - base), fn);
}

std::shared_ptr<ThreadPool> ThreadPool::shared(int num_threads) {
    if (num_threads < 0) throw std::invalid_argument("num_threads must be >= 0 (0 = CPUs of the affinity mask)");
    const int n = num_threads == 0 ? affinity_cpu_count() : num_threads;
    static std::mutex mu;
    static std::map<int, std::weak_ptr<ThreadPool>> pools;
    std::lock_guard<std::mutex> lk(mu);
    auto& slot = pools[n];
    if (auto p = slot.lock()) return p;
    auto p = std::make_shared<ThreadPool>(n);
    slot = p;
    return p;
}

}  // namespace kvstore
