"""Build script: compiles the C++ core into ``kvstore._C`` (always) and the
CUDA kernels into ``kvstore._cuda`` when torch has CUDA and nvcc is found.

``kvstore._cuda`` is built for the GPU present, or for ``TORCH_CUDA_ARCH_LIST``
when set (e.g. ``TORCH_CUDA_ARCH_LIST=9.0``); ``KVSTORE_NO_CUDA=1`` skips it.
CPU-only machines (a CPU torch, or no nvcc) build the core alone.
"""
import os
import sys

from setuptools import setup
from pybind11.setup_helpers import Pybind11Extension, build_ext

here = os.path.dirname(os.path.abspath(__file__))

cxx_flags = ["-O3", "-fopenmp", "-fvisibility=hidden"]
link_flags = ["-fopenmp"]
if sys.platform == "darwin":  # pragma: no cover - CI and users are on Linux
    cxx_flags = ["-O3", "-Xpreprocessor", "-fopenmp"]
    link_flags = ["-lomp"]

# Every source is named here (a test checks that the sdist carries each of them and the headers they include).
CORE_SOURCES = [
    "csrc/distance.cpp",
    "csrc/graph_attention.cpp",
    "csrc/graph_index.cpp",
    "csrc/kmeans.cpp",
    "csrc/thread_pool.cpp",
    "csrc/wave_buffer.cpp",
    "python/bindings.cpp",
    "python/graph_attention_bindings.cpp",
    "python/kmeans_bindings.cpp",
    "python/wave_buffer_bindings.cpp",
]
CUDA_SOURCES = [
    "python/cuda/attention_bindings.cpp",
    "python/cuda/cluster_bindings.cpp",
    "python/cuda/module.cpp",
    "python/cuda/wave_step_bindings.cpp",
    "csrc/cuda/candidate_scores.cu",
    "csrc/cuda/cluster_rank.cu",
    "csrc/cuda/cluster_runs.cu",
    "csrc/cuda/copy_rows.cu",
    "csrc/cuda/kmeans_update.cu",
    "csrc/cuda/kmeans_assign.cu",
    "csrc/cuda/sparse_attention.cu",
    "csrc/cuda/wave_step.cu",
    "csrc/cuda/weighted_rows.cu",
]
CORE_INCLUDE_DIRS = ["csrc"]
CUDA_INCLUDE_DIRS = ["csrc/cuda", "python/cuda"]

ext_modules = [
    Pybind11Extension(
        "kvstore._C",
        sources=CORE_SOURCES,
        include_dirs=[os.path.join(here, d) for d in CORE_INCLUDE_DIRS],
        cxx_std=17,
        extra_compile_args=cxx_flags,
        extra_link_args=link_flags,
    )
]


def cuda_extension():
    """The ``kvstore._cuda`` extension, or None (with the reason printed) when it cannot be built."""
    if os.environ.get("KVSTORE_NO_CUDA") == "1":
        print("kvstore: KVSTORE_NO_CUDA=1, skipping kvstore._cuda")
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        print("kvstore: torch is not importable at build time, skipping kvstore._cuda")
        return None
    if torch.version.cuda is None or CUDA_HOME is None:
        print("kvstore: torch has no CUDA or nvcc was not found, skipping kvstore._cuda")
        return None
    return CUDAExtension(
        "kvstore._cuda",
        sources=CUDA_SOURCES,
        include_dirs=[os.path.join(here, d) for d in CUDA_INCLUDE_DIRS],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                                     "--expt-relaxed-constexpr"]},
    )


cuda_ext = cuda_extension()
if cuda_ext is not None:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules.append(cuda_ext)
    build_ext = BuildExtension.with_options(no_python_abi_suffix=False)  # noqa: F811 - builds both

# Metadata, dependencies and extras: pyproject.toml. This file adds only the compiled extensions.
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
