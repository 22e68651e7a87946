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
    if arr.size:
        check_magnitude(max(float(arr.max()), -float(arr.min())), name, arr.shape[1])
    return arr


# Entries up to this (times sqrt(dim)) keep every inner product, squared norm
# and their sums (2 q.k - |k|^2 in L2 searches) below float32's max (3.4e38).
_MAX_NORM = 1e19


def max_entry(dim: int) -> float:
    """The largest entry magnitude accepted in vectors of ``dim`` components."""
    return _MAX_NORM / float(np.sqrt(dim))


def check_magnitude(max_abs: float, name: str, dim: int) -> None:
    """Refuse NaN / inf, and entries so large that float32 inner products could overflow."""
    if not np.isfinite(max_abs):
        raise ValueError(f"{name} contains NaN or inf")
    if max_abs > max_entry(dim):
        raise ValueError(f"{name} has an entry of magnitude {max_abs:.3g}; entries above {max_entry(dim):.3g} "
                         f"(1e19 / sqrt(dim={dim})) could make float32 inner products overflow")


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
    if not 1 <= k <= MAX_COUNT:
        raise ValueError(f"{name} must be in [1, {MAX_COUNT}], got {k}")
    return k


INT32_MAX = (1 << 31) - 1
# Search beams, top-k and similar counts: far beyond any useful value, well inside C++'s int.
MAX_COUNT = 1 << 20
# OpenMP / pool threads: 0 means "all CPUs"; more than this is refused (the C++
# side also never starts more threads than the CPUs it may run on).
MAX_THREADS = 1024
SEED_RANGE = (0, (1 << 64) - 1)


def check_positive_int(v: Any, name: str, minimum: int = 1, maximum: int = INT32_MAX) -> int:
    """``v`` as an int in ``[minimum, maximum]``; ``TypeError`` / ``ValueError`` naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if not minimum <= v <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {v}")
    return v


def check_num_threads(v: Any, name: str = "num_threads") -> int:
    """A thread count: 0 (all CPUs) .. ``MAX_THREADS``."""
    return check_positive_int(v, name, 0, MAX_THREADS)


def check_seed(v: Any, name: str = "seed") -> int:
    """A seed: an int in ``[0, 2**64)`` (the C++ side takes uint64)."""
    return check_positive_int(v, name, *SEED_RANGE)


def check_trained(ntotal: int, what: str = "index") -> None:
    if ntotal == 0:
        raise RuntimeError(f"the {what} is empty: call build() (or add()) before search()")


def as_input_type(like: Any, arr: np.ndarray) -> Any:
    """``arr`` as a torch tensor on ``like``'s device when ``like`` is a tensor, else unchanged."""
    import torch

    if isinstance(like, torch.Tensor):
        return torch.from_numpy(arr).to(like.device)
    return arr


def to_id_array(ids: Any, name: str) -> np.ndarray:
    """A 1-D collection of integer ids (numpy, torch, list) as int64 ``[m]``."""
    import torch

    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds ids beyond int64")
    return arr.astype(np.int64, copy=False)
