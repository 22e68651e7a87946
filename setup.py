"""Build script: compiles the C++ core into ``kvstore._C`` (always) and the
CUDA kernels into ``kvstore._cuda`` when torch has CUDA and nvcc is found.

``kvstore._cuda`` is built for the GPU present, or for ``TORCH_CUDA_ARCH_LIST``
when set (e.g. ``TORCH_CUDA_ARCH_LIST=9.0``); ``KVSTORE_NO_CUDA=1`` skips it.
CPU-only machines (a CPU torch, or no nvcc) build the core alone.
"""
import os
import sys

from setuptools import find_packages, setup
from pybind11.setup_helpers import Pybind11Extension, build_ext

here = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    ns: dict = {}
    with open(os.path.join(here, "kvstore", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


cxx_flags = ["-O3", "-fopenmp", "-fvisibility=hidden"]
link_flags = ["-fopenmp"]
if sys.platform == "darwin":  # pragma: no cover - CI and users are on Linux
    cxx_flags = ["-O3", "-Xpreprocessor", "-fopenmp"]
    link_flags = ["-lomp"]

ext_modules = [
    Pybind11Extension(
        "kvstore._C",
        sources=sorted(
            [os.path.join("python", f) for f in os.listdir(os.path.join(here, "python")) if f.endswith(".cpp")]
            + [os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc")) if f.endswith(".cpp")]
        ),
        include_dirs=[os.path.join(here, "csrc")],
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
    cu = sorted(os.path.join("csrc", "cuda", f) for f in os.listdir(os.path.join(here, "csrc", "cuda"))
                if f.endswith(".cu"))
    binds = sorted(os.path.join("python", "cuda", f) for f in os.listdir(os.path.join(here, "python", "cuda"))
                   if f.endswith(".cpp"))
    return CUDAExtension(
        "kvstore._cuda",
        sources=binds + cu,
        include_dirs=[os.path.join(here, "csrc", "cuda"), os.path.join(here, "python", "cuda")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                                     "--expt-relaxed-constexpr"]},
    )


cuda_ext = cuda_extension()
if cuda_ext is not None:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules.append(cuda_ext)
    build_ext = BuildExtension.with_options(no_python_abi_suffix=False)  # noqa: F811 - builds both

setup(
    name="kvstore",
    version=read_version(),
    description="A vector-database-style storage engine for LLM KV caches",
    packages=find_packages(include=["kvstore", "kvstore.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy>=1.24"],
    extras_require={
        "faiss": ["faiss-cpu>=1.8"],
        "faiss-gpu": ["faiss-gpu>=1.8"],
        "hf": ["transformers>=5.17,<6", "gguf>=0.10", "accelerate>=1.0"],
        "demo": ["transformers>=5.17,<6", "gguf>=0.10", "accelerate>=1.0"],
        "bench": ["matplotlib>=3.7", "tqdm>=4.60", "faiss-cpu>=1.8"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "faiss-cpu>=1.8"],
    },
    entry_points={"console_scripts": ["kvstore=kvstore.cli:main"]},
    zip_safe=False,
)
