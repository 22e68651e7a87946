// Keeps exceptions inside OpenMP regions: each iteration runs through
// `run`, the first exception is stored, and `rethrow` raises it after the
// region has ended (an exception escaping a region would terminate Python).
#pragma once

#include <exception>
#include <mutex>

namespace kvstore {

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
