// kvstore._cuda: the CUDA kernels of the GPU decode path (csrc/cuda/*.cu).
#include "registry.h"

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "kvstore CUDA kernels: cluster ranking, sparse decode attention, k-means, copies, the wave step";
    register_sparse_attention(m);
    register_cluster_ops(m);
    register_wave_step(m);
}
