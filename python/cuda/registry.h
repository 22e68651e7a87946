// The pieces of the torch CUDA extension kvstore._cuda: each binding source
// registers its functions on the module defined in module.cpp.
#pragma once
#include <torch/extension.h>

#include "cuda_common.cuh"

// The kernels' element type of a float32 / float16 / bfloat16 tensor dtype; other dtypes raise a TORCH_CHECK
// error naming the argument.
inline kvstore::gpu::DType kernel_dtype(at::ScalarType t, const char* name) {
    switch (t) {
        case at::kFloat:
            return kvstore::gpu::DType::F32;
        case at::kHalf:
            return kvstore::gpu::DType::F16;
        case at::kBFloat16:
            return kvstore::gpu::DType::BF16;
        default:
            TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t);
    }
    return kvstore::gpu::DType::F32;  // unreachable
}

void register_sparse_attention(pybind11::module_& m);  // attention_bindings.cpp
void register_cluster_ops(pybind11::module_& m);       // cluster_bindings.cpp
void register_wave_step(pybind11::module_& m);         // wave_step_bindings.cpp
