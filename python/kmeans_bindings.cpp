// pybind11 binding of the wave index's segmented k-means (csrc/kmeans.h).
//
// Arrays arrive validated by kvstore/wave.py; the checks here are a second
// line so that no call can read out of bounds. The GIL is released while
// clustering.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "kmeans.h"

namespace py = pybind11;

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

py::tuple segmented_kmeans(F32 keys, int tokens_per_cluster, std::int64_t segment_len, int iters, std::uint64_t seed,
                           int num_threads) {
    if (keys.ndim() != 2) throw std::invalid_argument("keys must be a 2-D array [n, dim]");
    const std::int64_t n = keys.shape(0);
    const std::int64_t d = keys.shape(1);
    if (n == 0) throw std::invalid_argument("keys is empty (0 rows)");
    if (d <= 0 || d > (1 << 20)) throw std::invalid_argument("keys has an invalid dim");
    if (tokens_per_cluster < 1) throw std::invalid_argument("tokens_per_cluster must be >= 1");
    if (segment_len < 1) throw std::invalid_argument("segment_len must be >= 1");
    if (iters < 0) throw std::invalid_argument("kmeans_iters must be >= 0");
    kvstore::KMeansParams p;
    p.tokens_per_cluster = tokens_per_cluster;
    p.segment_len = segment_len;
    p.iters = iters;
    p.seed = seed;
    p.num_threads = num_threads;
    kvstore::KMeansResult r;
    {
        py::gil_scoped_release nogil;
        r = kvstore::segmented_kmeans(keys.data(), n, static_cast<int>(d), p);
    }
    const py::ssize_t C = static_cast<py::ssize_t>(r.num_clusters());
    py::array_t<std::int32_t> assign(static_cast<py::ssize_t>(n));
    py::array_t<float> centroids({C, static_cast<py::ssize_t>(d)});
    py::array_t<float> sizes(C);
    std::copy(r.assign.begin(), r.assign.end(), assign.mutable_data());
    std::copy(r.centroids.begin(), r.centroids.end(), centroids.mutable_data());
    std::copy(r.sizes.begin(), r.sizes.end(), sizes.mutable_data());
    return py::make_tuple(assign, centroids, sizes);
}

}  // namespace

void register_kmeans(py::module_& m) {
    m.def("segmented_kmeans", &segmented_kmeans, py::arg("keys"), py::arg("tokens_per_cluster"),
          py::arg("segment_len"), py::arg("iters"), py::arg("seed"), py::arg("num_threads"),
          "Segmented spherical k-means of the wave index: keys [n, d] float32 -> "
          "(assign int32 [n], centroids float32 [C, d] (plain means), sizes float32 [C]). "
          "Releases the GIL.");
}
