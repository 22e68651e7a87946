// The pieces of the torch CUDA extension kvstore._cuda: each binding source
// registers its functions on the module defined in module.cpp.
#pragma once
#include <torch/extension.h>

void register_sparse_attention(pybind11::module_& m);  // attention_bindings.cpp
void register_cluster_ops(pybind11::module_& m);       // cluster_bindings.cpp
