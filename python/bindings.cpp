// pybind11 bindings of the C++ core: the one place where csrc/ meets Python.
//
// Arrays arrive already validated by the Python layer (kvstore/_validate.py);
// the shape checks here are a second line so that no call can read out of
// bounds. Long-running calls release the GIL.
#include <omp.h>
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "graph_index.h"

namespace py = pybind11;

void register_kmeans(pybind11::module_& m);  // python/kmeans_bindings.cpp
void register_wave_buffer(pybind11::module_& m);  // python/wave_buffer_bindings.cpp
void register_graph_attention(pybind11::module_& m);  // python/graph_attention_bindings.cpp
using kvstore::BuildParams;
using kvstore::GraphIndex;

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I64 = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;
using I32 = py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>;

void check_matrix(const py::array& a, py::ssize_t cols, const char* name) {
    if (a.ndim() != 2) throw std::invalid_argument(std::string(name) + " must be 2-D");
    if (cols >= 0 && a.shape(1) != cols)
        throw std::invalid_argument(std::string(name) + " has " + std::to_string(a.shape(1)) + " columns, expected " +
                                    std::to_string(cols));
}

py::dict build(GraphIndex& g, F32 keys, I64 topk, I64 geo, int geometric_degree, int ef_construction, int num_entry_points, int max_candidates,
               int pivots_per_query, std::uint64_t seed, int num_threads, I64 entry_points, py::object progress) {
    check_matrix(keys, g.dim(), "keys");
    check_matrix(topk, -1, "train_topk");
    check_matrix(geo, -1, "geometric");
    if (geo.shape(1) > 0 && geo.shape(0) != keys.shape(0)) throw std::invalid_argument("geometric has wrong rows");
    BuildParams p;
    p.geometric_degree = geometric_degree;
    p.ef_construction = ef_construction;
    p.num_entry_points = num_entry_points;
    p.max_candidates = max_candidates;
    p.pivots_per_query = pivots_per_query;
    if (entry_points.ndim() != 1) throw std::invalid_argument("entry_points must be 1-D");
    for (py::ssize_t i = 0; i < entry_points.shape(0); ++i)
        p.entry_points.push_back(static_cast<std::int32_t>(entry_points.data()[i]));
    p.seed = seed;
    p.num_threads = num_threads;
    std::function<void(double)> cb;
    if (!progress.is_none()) {
        cb = [progress](double f) {
            py::gil_scoped_acquire gil;
            progress(f);
        };
    }
    kvstore::BuildStats st;
    {
        py::gil_scoped_release nogil;
        st = g.build(keys.data(), keys.shape(0), topk.data(), topk.shape(0), static_cast<int>(topk.shape(1)),
                     geo.data(), static_cast<int>(geo.shape(1)), p, cb);
    }
    py::dict d;
    d["pivots"] = st.pivots;
    d["repaired_out"] = st.repaired_out;
    d["repaired_reach"] = st.repaired_reach;
    d["repair_rounds"] = st.repair_rounds;
    return d;
}

py::tuple search(const GraphIndex& g, F32 queries, int k, int ef, int num_threads) {
    check_matrix(queries, g.dim(), "queries");
    if (k <= 0) throw std::invalid_argument("k must be positive");
    const py::ssize_t nq = queries.shape(0);
    py::array_t<float> D({nq, static_cast<py::ssize_t>(k)});
    py::array_t<std::int64_t> I({nq, static_cast<py::ssize_t>(k)});
    py::array_t<std::int64_t> S(nq);
    {
        py::gil_scoped_release nogil;
        g.search(queries.data(), nq, k, ef, D.mutable_data(), I.mutable_data(), S.mutable_data(), num_threads);
    }
    return py::make_tuple(D, I, S);
}

py::tuple search_group(const GraphIndex& g, F32 queries, int k, int ef, int num_threads) {
    if (queries.ndim() != 3 || queries.shape(2) != g.dim())
        throw std::invalid_argument("queries must be [ngroups, group, dim]");
    if (k <= 0) throw std::invalid_argument("k must be positive");
    const py::ssize_t ng = queries.shape(0);
    py::array_t<float> D({ng, static_cast<py::ssize_t>(k)});
    py::array_t<std::int64_t> I({ng, static_cast<py::ssize_t>(k)});
    py::array_t<std::int64_t> S(ng);
    {
        py::gil_scoped_release nogil;
        g.search_group(queries.data(), ng, static_cast<int>(queries.shape(1)), k, ef, D.mutable_data(),
                       I.mutable_data(), S.mutable_data(), num_threads);
    }
    return py::make_tuple(D, I, S);
}

std::int64_t add(GraphIndex& g, F32 keys, int ef_construction, int num_threads) {
    check_matrix(keys, g.dim(), "keys");
    py::gil_scoped_release nogil;
    return g.add(keys.data(), keys.shape(0), ef_construction, num_threads);
}

py::array_t<float> reconstruct(const GraphIndex& g, I64 ids) {
    if (ids.ndim() != 1) throw std::invalid_argument("ids must be 1-D");
    const py::ssize_t m = ids.shape(0);
    py::array_t<float> out({m, static_cast<py::ssize_t>(g.dim())});
    g.reconstruct(ids.data(), m, out.mutable_data());
    return out;
}

void remove_keys(GraphIndex& g, py::array_t<bool, py::array::c_style | py::array::forcecast> keep, int ef_construction,
            int num_threads) {
    if (keep.ndim() != 1 || keep.shape(0) != g.size())
        throw std::invalid_argument("keep must be 1-D with one entry per key");
    std::vector<char> k(keep.data(), keep.data() + keep.shape(0));
    py::gil_scoped_release nogil;
    g.remove(k, ef_construction, num_threads);
}

py::tuple get_state(const GraphIndex& g) {
    kvstore::GraphState st = g.state();
    const py::ssize_t n = static_cast<py::ssize_t>(st.keys.size() / g.dim());
    py::array_t<float> keys({n, static_cast<py::ssize_t>(g.dim())});
    py::array_t<std::int32_t> nbrs({n, static_cast<py::ssize_t>(g.degree())});
    py::array_t<std::int32_t> entry(static_cast<py::ssize_t>(st.entry_points.size()));
    std::copy(st.keys.begin(), st.keys.end(), keys.mutable_data());
    std::copy(st.neighbors.begin(), st.neighbors.end(), nbrs.mutable_data());
    std::copy(st.entry_points.begin(), st.entry_points.end(), entry.mutable_data());
    return py::make_tuple(keys, nbrs, entry);
}

void set_state(GraphIndex& g, F32 keys, I32 nbrs, I32 entry) {
    check_matrix(keys, g.dim(), "keys");
    check_matrix(nbrs, g.degree(), "neighbors");
    if (nbrs.shape(0) != keys.shape(0)) throw std::invalid_argument("neighbors and keys differ in rows");
    if (entry.ndim() != 1) throw std::invalid_argument("entry points must be 1-D");
    g.set_state(std::vector<float>(keys.data(), keys.data() + keys.size()),
                std::vector<std::int32_t>(nbrs.data(), nbrs.data() + nbrs.size()),
                std::vector<std::int32_t>(entry.data(), entry.data() + entry.size()));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "kvstore C++ core (graph index; OpenMP)";
    m.def("omp_max_threads", &omp_get_max_threads, "OpenMP threads a parallel region uses by default");

    py::class_<GraphIndex>(m, "GraphIndex")
        .def(py::init<int, int>(), py::arg("dim"), py::arg("degree"))
        .def_property_readonly("dim", &GraphIndex::dim)
        .def_property_readonly("degree", &GraphIndex::degree)
        .def_property_readonly("size", &GraphIndex::size)
        .def("build", &build, py::arg("keys"), py::arg("train_topk"), py::arg("geometric"),
             py::arg("geometric_degree"), py::arg("ef_construction"),
             py::arg("num_entry_points"), py::arg("max_candidates"), py::arg("pivots_per_query"), py::arg("seed"), py::arg("num_threads"), py::arg("entry_points"),
             py::arg("progress") = py::none())
        .def("search", &search, py::arg("queries"), py::arg("k"), py::arg("ef"), py::arg("num_threads"))
        .def("search_group", &search_group, py::arg("queries"), py::arg("k"), py::arg("ef"), py::arg("num_threads"))
        .def("add", &add, py::arg("keys"), py::arg("ef_construction"), py::arg("num_threads"))
        .def("reconstruct", &reconstruct, py::arg("ids"))
        .def("remove", &remove_keys, py::arg("keep"), py::arg("ef_construction"), py::arg("num_threads"))
        .def("get_state", &get_state)
        .def("set_state", &set_state, py::arg("keys"), py::arg("neighbors"), py::arg("entry_points"))
        .def("count_reachable", &GraphIndex::count_reachable);
    register_kmeans(m);
    register_wave_buffer(m);
    register_graph_attention(m);
}
