"""Loads the CUDA extension ``kvstore._cuda`` (built by setup.py when torch has CUDA and nvcc is found)."""
from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str]:
    try:
        from .. import _cuda
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return _cuda, ""


def has_cuda_ext() -> bool:
    """True when ``kvstore._cuda`` is importable and a CUDA device is visible."""
    import torch

    return _load()[0] is not None and torch.cuda.is_available()


def cuda_ext() -> ModuleType:
    """The loaded ``kvstore._cuda`` module; RuntimeError saying why when it is unavailable."""
    mod, why = _load()
    if mod is None:
        raise RuntimeError(
            "kvstore's CUDA kernels (kvstore._cuda) are not built: they need a CUDA build of torch and nvcc at "
            "install time (`pip install --no-build-isolation -e .` on the GPU machine); use backend='torch' "
            f"meanwhile. Import error: {why}")
    return mod
