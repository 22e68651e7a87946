// OpenMP helpers. OmpErrors keeps exceptions inside OpenMP regions: each
// iteration runs through `run`, the first exception is stored, and `rethrow`
// raises it after the region has ended (an exception escaping a region would
// terminate Python). omp_threads bounds the team size of every region.
#pragma once

#include <omp.h>

#include <algorithm>
#include <exception>
#include <mutex>

#include "thread_pool.h"

namespace kvstore {

// The team size for a requested thread count (0: OpenMP's default). Never more
// than the CPUs this process may run on: more threads only compete for them,
// and libgomp aborts the process (it cannot throw) when it fails to create the
// threads of a large team.
inline int omp_threads(int requested) {
    const int n = requested > 0 ? requested : omp_get_max_threads();
    return std::max(1, std::min(n, affinity_cpu_count()));
}

class OmpErrors {
public:
    template <class F>
    void run(F&& f) noexcept {
        if (failed_) return;  // skip remaining work once something failed
        try {
            f();
        } catch (...) {
            std::lock_guard<std::mutex> lock(mu_);
            if (!error_) error_ = std::current_exception();
            failed_ = true;
        }
    }
    void rethrow() const {
        if (error_) std::rethrow_exception(error_);
    }

private:
    std::mutex mu_;
    std::exception_ptr error_;
    volatile bool failed_ = false;
};

}  // namespace kvstore
