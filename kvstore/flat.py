"""``FlatIndex``: exact inner-product search over every stored key (faiss ``IndexFlatIP``).

The reference every approximate index is measured against: ``scanned`` is
``ntotal`` for each query.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._validate import check_positive_int, to_float32_matrix
from .exact import exact_topk
from .index_base import Index, register_index

__all__ = ["FlatIndex"]


@register_index
class FlatIndex(Index):
    """Brute-force maximum-inner-product index.

    Keys live in a growable float32 buffer (capacity doubles), so repeated
    :meth:`add` calls (e.g. one decode token at a time) cost amortised O(1)
    copies per key. Rows below ``ntotal`` are never written again (a removal
    makes a new buffer), so a search reads a stable view. Searches run
    through :func:`kvstore.exact.exact_topk` (torch; CUDA when available).
    """

    KIND = "flat"

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._buf = np.empty((0, self._dim), dtype=np.float32)
        self._n = 0

    def reset(self) -> None:
        """Remove every key."""
        with self._rw.write():
            self._buf = np.empty((0, self._dim), dtype=np.float32)
            self._n = 0

    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def keys(self) -> np.ndarray:
        """The stored keys, float32 ``[ntotal, dim]`` (a read-only view)."""
        view = self._buf[:self._n]
        view.flags.writeable = False
        return view

    def _add_impl(self, x: np.ndarray) -> int:
        first = self._n
        need = first + x.shape[0]
        if need > self._buf.shape[0]:
            grown = np.empty((max(need, 2 * self._buf.shape[0]), self._dim), dtype=np.float32)
            grown[:first] = self._buf[:first]
            self._buf = grown
        self._buf[first:need] = x
        self._n = need
        return first

    def build(self, keys: Any, train_queries: Any = None) -> "FlatIndex":
        """Replace the contents with ``keys`` ``[n, dim]``; returns ``self``. ``train_queries`` is ignored."""
        x = to_float32_matrix(keys, "keys", self._dim)  # validate before dropping the old contents
        with self._rw.write():
            self._buf = np.empty((0, self._dim), dtype=np.float32)
            self._n = 0
            self._add_impl(x)
        return self

    def _search_impl(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        D, I = exact_topk(q, self._buf[:self._n], k)  # writable view: torch.from_numpy warns on read-only
        return D, I, np.full(q.shape[0], self._n, dtype=np.int64)

    def _reconstruct_impl(self, ids: np.ndarray) -> np.ndarray:
        return self._buf[ids]

    def _remove_impl(self, keep: np.ndarray) -> None:
        kept = self._buf[:self._n][keep]
        self._buf, self._n = kept, kept.shape[0]

    # --- persistence -------------------------------------------------------
    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"dim": self._dim, "ntotal": self._n}, {"keys": self._buf[:self._n]}

    @classmethod
    def _from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "FlatIndex":
        ntotal, keys = check_positive_int(meta["ntotal"], "ntotal", 0), arrays["keys"]
        index = cls(meta["dim"])
        if keys.dtype != np.float32 or keys.shape != (ntotal, index.dim):
            raise ValueError(f"keys must be float32 of shape ({ntotal}, {index.dim}), "
                             f"got {keys.dtype} {keys.shape}")
        if ntotal:
            index.add(to_float32_matrix(keys, "keys", index.dim))  # rejects NaN / inf / overflowing keys
        return index
