// pybind11 bindings of the wave buffer's CPU side (csrc/wave_buffer.h) and of
// the thread pool it plans on (csrc/thread_pool.h).
//
// Every input is checked here, with the GIL held, before any planning state
// changes (std::invalid_argument -> ValueError, pybind11's type_error ->
// TypeError); the per-slot planning then runs on the pool with the GIL
// released.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "thread_pool.h"
#include "wave_buffer.h"

namespace py = pybind11;
using kvstore::ThreadPool;
using kvstore::WaveBufferPlanner;

namespace {

using I64 = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;
using I32 = py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>;

// An integer array of ndim dimensions converted to T (a copy only when the
// dtype or layout differ); floats, bools and objects are a TypeError.
template <class T>
py::array_t<T, py::array::c_style | py::array::forcecast> int_array(const py::handle& obj, int ndim,
                                                                    const char* name) {
    py::array a = py::array::ensure(obj);
    if (!a) throw py::type_error(std::string(name) + " must be an integer array");
    const char kind = a.dtype().kind();
    if (kind != 'i' && kind != 'u')
        throw py::type_error(std::string(name) + " must have an integer dtype, got " +
                             std::string(py::str(a.dtype())));
    if (a.ndim() != ndim)
        throw std::invalid_argument(std::string(name) + " must be " + std::to_string(ndim) + "-D, got " +
                                    std::to_string(a.ndim()) + "-D");
    return py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
}

std::unique_ptr<WaveBufferPlanner> make_planner(const py::object& cluster_rows, std::int64_t pages_per_slot,
                                                std::int64_t page_tokens, int num_threads) {
    I64 rows = int_array<std::int64_t>(cluster_rows, 2, "cluster_rows");
    if (rows.shape(1) < 1) throw std::invalid_argument("cluster_rows must be [G, C + 1] with at least 1 column");
    if (num_threads < 0) throw std::invalid_argument("num_threads must be >= 0 (0 = CPUs of the affinity mask)");
    return std::make_unique<WaveBufferPlanner>(rows.data(), rows.shape(0), rows.shape(1) - 1, pages_per_slot,
                                               page_tokens, num_threads);
}

py::dict plan(WaveBufferPlanner& p, const py::object& retrieval_ids, const py::object& steady_rows,
              const py::object& steady_len) {
    I64 ids = int_array<std::int64_t>(retrieval_ids, 2, "retrieval_ids");
    I64 srow = int_array<std::int64_t>(steady_rows, 1, "steady_rows");
    I32 slen = int_array<std::int32_t>(steady_len, 1, "steady_len");
    const std::int64_t G = p.num_slots();
    if (srow.shape(0) != G)
        throw std::invalid_argument("steady_rows has " + std::to_string(srow.shape(0)) + " entries, expected G=" +
                                    std::to_string(G));
    if (slen.shape(0) != G)
        throw std::invalid_argument("steady_len has " + std::to_string(slen.shape(0)) + " entries, expected G=" +
                                    std::to_string(G));
    WaveBufferPlanner::Exclusive excl(p);
    const std::int64_t r = ids.shape(1);
    p.validate(ids.data(), ids.shape(0), r, srow.data(), slen.data());
    kvstore::WavePlanTotals t;
    {
        py::gil_scoped_release nogil;
        t = p.plan(ids.data(), r, srow.data(), slen.data());
    }
    py::array_t<std::int32_t> run_src(t.runs), run_len(t.runs), run_offsets(G + 1), copy_len(t.copies);
    py::array_t<std::int64_t> run_row(t.runs), copy_src(t.copies), copy_dst(t.copies);
    p.write(run_src.mutable_data(), run_row.mutable_data(), run_len.mutable_data(), run_offsets.mutable_data(),
            copy_src.mutable_data(), copy_dst.mutable_data(), copy_len.mutable_data());
    py::dict d;
    d["run_src"] = run_src;
    d["run_row"] = run_row;
    d["run_len"] = run_len;
    d["run_offsets"] = run_offsets;
    d["copy_src_row"] = copy_src;
    d["copy_dst_row"] = copy_dst;
    d["copy_len"] = copy_len;
    d["hits"] = t.hits;
    d["misses"] = t.misses;
    d["hit_tokens"] = t.hit_tokens;
    d["miss_tokens"] = t.miss_tokens;
    return d;
}

// Runs a Python callable fn(i) for i in [0, n) on the pool: each call takes
// the GIL, so this is for tests and diagnostics, not for speed.
void pool_parallel_for(ThreadPool& pool, std::int64_t n, const py::function& fn) {
    if (n < 0) throw std::invalid_argument("n must be >= 0");
    std::function<void(std::int64_t)> body = [&fn](std::int64_t i) {
        py::gil_scoped_acquire gil;
        fn(i);
    };
    py::gil_scoped_release nogil;
    pool.parallel_for(n, body);
}

}  // namespace

void register_wave_buffer(py::module_& m) {
    m.def("affinity_cpu_count", &kvstore::affinity_cpu_count, "CPUs this process may run on (sched_getaffinity)");

    py::class_<ThreadPool, std::shared_ptr<ThreadPool>>(m, "ThreadPool",
                                                        "Fixed pool of worker threads (csrc/thread_pool.h).")
        .def(py::init([](int num_threads) { return std::make_shared<ThreadPool>(num_threads); }),
             py::arg("num_threads") = 0,
             "num_threads: threads taking part in a loop, the caller included (0 = the affinity count)")
        .def_property_readonly("size", &ThreadPool::size)
        .def("parallel_for", &pool_parallel_for, py::arg("n"), py::arg("fn"),
             "Calls fn(i) for i in range(n) on the pool's threads and returns when all are done; the first "
             "exception raised by any call is re-raised here (remaining calls are skipped).");

    py::class_<WaveBufferPlanner>(m, "WaveBufferPlanner",
                                  "LRU planner of the wave buffer's GPU cache (csrc/wave_buffer.h).")
        .def(py::init(&make_planner), py::arg("cluster_rows"), py::arg("pages_per_slot"), py::arg("page_tokens"),
             py::arg("num_threads") = 0,
             "cluster_rows: int64 [G, C + 1], host row bounds of every cluster of every slot (non-decreasing); "
             "pages_per_slot: cache pages owned by each slot; page_tokens: rows a page; num_threads: 0 = the "
             "affinity count")
        .def("plan", &plan, py::arg("retrieval_ids"), py::arg("steady_rows"), py::arg("steady_len"),
             "retrieval_ids int [G, r] (distinct per row, in [0, C)), steady_rows int64 [G], steady_len int32 [G] "
             "-> dict: run_src int32 [R], run_row int64 [R], run_len int32 [R], run_offsets int32 [G + 1], "
             "copy_src_row int64 [M], copy_dst_row int64 [M], copy_len int32 [M], hits, misses, hit_tokens, "
             "miss_tokens (ints). Updates the cache mapping. Releases the GIL while planning.")
        .def("reset", [](WaveBufferPlanner& p) {
            WaveBufferPlanner::Exclusive excl(p);
            p.reset();
        }, "Empties every slot's cache.")
        .def("cached_clusters", [](WaveBufferPlanner& p, std::int64_t g) {
            WaveBufferPlanner::Exclusive excl(p);
            return p.cached_clusters(g);
        }, py::arg("g"), "Cluster ids cached for slot g, least recently used first.")
        .def("cluster_pages", [](WaveBufferPlanner& p, std::int64_t g, std::int64_t c) {
            WaveBufferPlanner::Exclusive excl(p);
            return p.cluster_pages(g, c);
        }, py::arg("g"), py::arg("c"), "Global cache pages of cluster c of slot g, in row order ([] when not cached).")
        .def_property_readonly("num_slots", &WaveBufferPlanner::num_slots)
        .def_property_readonly("num_clusters", &WaveBufferPlanner::num_clusters)
        .def_property_readonly("pages_per_slot", &WaveBufferPlanner::pages_per_slot)
        .def_property_readonly("page_tokens", &WaveBufferPlanner::page_tokens)
        .def_property_readonly("num_threads", &WaveBufferPlanner::num_threads);
}
