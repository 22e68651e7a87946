"""Input checking shared by every public entry point.

Each helper raises a ``ValueError`` / ``TypeError`` whose message names the
argument, so that bad input never reaches C++ (where it could crash) and never
gives a silently wrong answer.
"""
from __future__ import annotations

from typing import Any

import numpy as np

_FLOAT_NAMES = ("float32", "float16", "bfloat16", "float64")


def to_float32_matrix(x: Any, name: str, dim: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 numpy array of shape ``[n, dim]``.

    Accepts numpy arrays and torch tensors (any device; moved to CPU) of dtype
    float32, float16, bfloat16 (and float64, converted). Rejects other dtypes,
    wrong ranks, a wrong ``dim``, NaN/inf and (unless ``allow_empty``) zero rows.
    """
    arr = _as_numpy(x, name)
    check_matrix_shape(tuple(arr.shape), name, dim, allow_empty)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def check_matrix_shape(shape: tuple[int, ...], name: str, dim: int | None, allow_empty: bool) -> None:
    """Shape rules of :func:`to_float32_matrix`: ``[n, dim]``, ``dim > 0``, ``n > 0`` unless allowed."""
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {shape}")
    if dim is not None and shape[1] != dim:
        raise ValueError(f"{name} has dim {shape[1]}, expected {dim}")
    if shape[1] == 0:
        raise ValueError(f"{name} has dim 0")
    if shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (0 rows)")


def _as_numpy(x: Any, name: str) -> np.ndarray:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        if not (x.dtype.is_floating_point):
            raise TypeError(f"{name} must be a floating tensor (float32, float16 or bfloat16), got {x.dtype}")
        if x.is_complex():
            raise TypeError(f"{name} must be real, got {x.dtype}")
        return x.detach().to("cpu", torch.float32).numpy()
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f" and x.dtype.name not in _FLOAT_NAMES:
            raise TypeError(f"{name} must be a float array (float32, float16 or bfloat16), got {x.dtype}")
        return x
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def check_k(k: Any, ntotal: int, name: str = "k") -> int:
    """Validate a top-k count: a positive int. ``k > ntotal`` is allowed (faiss pads with -1)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    k = int(k)
    if k <= 0:
        raise ValueError(f"{name} must be >= 1, got {k}")
    if k > 1 << 20:
        raise ValueError(f"{name}={k} is too large (max {1 << 20})")
    return k


def check_positive_int(v: Any, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_trained(ntotal: int, what: str = "index") -> None:
    if ntotal == 0:
        raise RuntimeError(f"the {what} is empty: call build() (or add()) before search()")
