// pybind11 binding of the graph split's CPU partial (csrc/graph_attention.h).
//
// Nothing big is copied: keys, values and outputs must already be C-contiguous
// arrays of the right dtype (the Python layer, kvstore/gpu/graph_split.py,
// keeps them so; outputs may be views of pinned tensors). Everything is
// checked before the GIL is released; the arrays and graphs stay referenced by
// the caller's sequences for the duration of the call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "graph_attention.h"

namespace py = pybind11;
using kvstore::GraphIndex;

namespace {

// An array of dtype T, C-contiguous, of exactly `shape` (-1: any extent); no conversion.
template <class T>
py::array_t<T> strict(const py::handle& obj, const std::vector<py::ssize_t>& shape, const std::string& name,
                      bool writable) {
    if (!py::isinstance<py::array>(obj)) throw py::type_error(name + " must be a numpy array");
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (!py::isinstance<py::array_t<T>>(a) || a.dtype().kind() != py::dtype::of<T>().kind() ||
        a.itemsize() != static_cast<py::ssize_t>(sizeof(T)))
        throw py::type_error(name + " must have dtype " + std::string(py::str(py::dtype::of<T>())) + ", got " +
                             std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(name + " must be C-contiguous");
    if (writable && !a.writeable()) throw std::invalid_argument(name + " must be writable");
    bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
    for (std::size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
    if (!ok) {
        std::string want = "[";
        for (std::size_t i = 0; i < shape.size(); ++i)
            want += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
        std::string got = "[";
        for (py::ssize_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
        throw std::invalid_argument(name + " must have shape " + want + "], got " + got + "]");
    }
    return py::reinterpret_borrow<py::array_t<T>>(a);
}

template <class T>
py::array_t<T> out_or_new(const py::object& given, const std::vector<py::ssize_t>& shape, const std::string& name) {
    if (given.is_none()) return py::array_t<T>(shape);
    return strict<T>(given, shape, name, true);
}

py::tuple graph_attention(const py::sequence& indexes, const py::sequence& keys, const py::sequence& values,
                          const py::object& queries, int top_k, int group_k, int ef, float scale, int num_threads,
                          const py::object& out_o, const py::object& out_lse, const py::object& out_scanned,
                          const py::object& out_ids) {
    const auto H = static_cast<py::ssize_t>(py::len(indexes));
    if (static_cast<py::ssize_t>(py::len(keys)) != H || static_cast<py::ssize_t>(py::len(values)) != H)
        throw std::invalid_argument("indexes, keys and values must have one entry per slot (" + std::to_string(H) +
                                    ")");
    auto q = strict<float>(queries, {H, -1, -1}, "queries", false);
    const int group = static_cast<int>(q.shape(1));
    const int dim = static_cast<int>(q.shape(2));
    if (H == 0 || group == 0 || dim == 0) throw std::invalid_argument("queries must not be empty");

    std::vector<kvstore::GraphSlot> slots(H);
    std::vector<py::object> held;  // keeps every graph and array alive while the GIL is released
    held.reserve(3 * H);
    py::ssize_t dv = -1;
    for (py::ssize_t h = 0; h < H; ++h) {
        const std::string at = "[" + std::to_string(h) + "]";
        auto k = strict<float>(keys[h], {-1, dim}, "keys" + at, false);
        auto v = strict<float>(values[h], {k.shape(0), dv}, "values" + at, false);
        if (dv < 0) dv = v.shape(1);
        if (dv == 0) throw std::invalid_argument("values must have at least one column");
        py::object g = indexes[h];
        held.insert(held.end(), {g, k, v});
        slots[h].n = k.shape(0);
        slots[h].keys = k.data();
        slots[h].values = v.data();
        slots[h].index = slots[h].n > 0 ? &g.cast<const GraphIndex&>() : nullptr;
        if (slots[h].index && slots[h].index->size() > slots[h].n)
            throw std::invalid_argument("indexes" + at + " holds " + std::to_string(slots[h].index->size()) +
                                        " keys but keys" + at + " has " + std::to_string(slots[h].n) + " rows");
    }
    auto o = out_or_new<float>(out_o, {H, group, dv}, "out_o");
    auto lse = out_or_new<float>(out_lse, {H, group}, "out_lse");
    auto scanned = out_or_new<std::int64_t>(out_scanned, {H}, "out_scanned");
    auto ids = out_or_new<std::int64_t>(out_ids, {H, group, top_k > 0 ? top_k : 0}, "out_ids");

    kvstore::GraphAttentionParams p;
    p.top_k = top_k;
    p.group_k = group_k;
    p.ef = ef;
    p.scale = scale;
    p.num_threads = num_threads;
    float* po = o.mutable_data();
    float* pl = lse.mutable_data();
    std::int64_t* ps = scanned.mutable_data();
    std::int64_t* pi = ids.mutable_data();
    {
        py::gil_scoped_release nogil;
        kvstore::graph_attention(slots, q.data(), group, dim, static_cast<int>(dv), p, po, pl, ps, pi);
    }
    return py::make_tuple(o, lse, scanned, ids);
}

}  // namespace

void register_graph_attention(py::module_& m) {
    m.def("graph_attention", &graph_attention, py::arg("indexes"), py::arg("keys"), py::arg("values"),
          py::arg("queries"), py::arg("top_k"), py::arg("group_k"), py::arg("ef"), py::arg("scale"),
          py::arg("num_threads"), py::arg("out_o") = py::none(), py::arg("out_lse") = py::none(),
          py::arg("out_scanned") = py::none(), py::arg("out_ids") = py::none(),
          "The graph split's CPU partial for a layer: per slot one group search, then each query head's exact "
          "attention over its own top_k keys.\n\n"
          "indexes: H GraphIndex; keys[h] [n_h, D] / values[h] [n_h, Dv] float32 C-contiguous (row i = graph id i); "
          "queries [H, G, D] float32. Returns (o [H, G, Dv] f32, lse [H, G] f32, scanned [H] i64 keys read, "
          "ids [H, G, top_k] i64 -1 padded); out_* (optional) are written in place and returned.");
}
