"""Retrieval quality and cost measures, as defined in docs/design.md ("Measurement definitions").

- :func:`recall_at_k`: ``|returned top-k ∩ exact top-k| / k`` by inner product,
  exact ties counted;
- :func:`scanned_fraction`: mean ``scanned / ntotal`` over the queries.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ._validate import check_k, check_positive_int, to_float32_matrix

__all__ = ["recall_at_k", "scanned_fraction"]

# Work-size bound (elements of a float64 temporary) for the blocked loops below.
_BLOCK_ELEMS = 1 << 22


def recall_at_k(
    found_ids: np.ndarray,
    queries: Any,
    keys: Any,
    k: int,
    gt_scores: np.ndarray | None = None,
    rtol: float = 1e-5,
) -> np.ndarray:
    """Per-query recall@k of a search result, with exact ties counted.

    found_ids: int ``[nq, k']``, the ids a method returned, best first (only
        the first ``k`` columns count; ``-1`` is padding and never counts,
        neither do repeated ids).
    queries: ``[nq, d]``, keys: ``[N, d]`` (numpy or torch, float dtypes).
    gt_scores: optional ``[nq, >=min(k, N)]`` exact top scores of each query,
        sorted descending (the ``D`` of :func:`kvstore.exact.exact_topk`); when
        omitted they are computed here in float64.
    rtol: tie tolerance, relative to ``||q|| * max_j ||k_j||`` (the largest
        possible score magnitude).

    Ties: let ``t`` be the exact ``k``-th best score. Keys scoring above
    ``t + tol`` belong to every exact top-k; keys within ``tol`` of ``t`` are
    tied, and any of them may fill the remaining places. So the hits are the
    returned keys above ``t + tol``, plus the returned tied keys up to the
    number of places left: the result is the best overlap with *any* exact
    top-k (ties broken in the returned ids' favour). Returned scores are
    float64 dot products of the float32 vectors. The denominator is
    ``min(k, N)``: a perfect answer scores 1.0 even when the index holds fewer
    than ``k`` keys.

    Returns float64 ``[nq]`` in ``[0, 1]``.
    """
    k = check_k(k, 0)
    q = to_float32_matrix(queries, "queries", allow_empty=True).astype(np.float64)
    x = to_float32_matrix(keys, "keys", q.shape[1])
    ids = _check_ids(found_ids, q.shape[0], x.shape[0])[:, :k]
    kk = min(k, x.shape[0])
    tol = rtol * np.linalg.norm(q, axis=1) * np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64).max())
    kth, n_above = _exact_threshold(q, x, kk, tol, gt_scores)

    hits = np.zeros(q.shape[0], dtype=np.int64)
    rows = max(1, _BLOCK_ELEMS // max(1, ids.shape[1] * q.shape[1]))
    for r0 in range(0, q.shape[0], rows):
        sl = slice(r0, r0 + rows)
        blk = ids[sl]
        valid = (blk >= 0) & _first_occurrence(blk)
        scores = np.einsum("qd,qkd->qk", q[sl], x[np.where(valid, blk, 0)].astype(np.float64))
        above = (valid & (scores > (kth[sl] + tol[sl])[:, None])).sum(axis=1)
        tied = (valid & (scores >= (kth[sl] - tol[sl])[:, None])).sum(axis=1) - above
        hits[sl] = above + np.minimum(tied, np.maximum(kk - n_above[sl], 0))
    return np.minimum(hits, kk) / kk


def scanned_fraction(scanned: np.ndarray, ntotal: int) -> float:
    """Mean over queries of ``scanned / ntotal``.

    scanned: int ``[nq]`` dot products per query (``search_with_stats``'s third
    output). Centroid comparisons are included, so an index that probes all its
    lists reports slightly more than 1.0.
    """
    ntotal = check_positive_int(ntotal, "ntotal")
    s = np.asarray(scanned)
    if s.ndim != 1 or s.shape[0] == 0:
        raise ValueError(f"scanned must be a non-empty 1-D array [nq], got shape {s.shape}")
    if s.dtype.kind not in "iu" or (s < 0).any():
        raise ValueError(f"scanned must hold non-negative ints, got dtype {s.dtype}")
    return float(s.mean(dtype=np.float64) / ntotal)


def _check_ids(found_ids: Any, nq: int, n: int) -> np.ndarray:
    ids = np.asarray(found_ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"found_ids must be an integer array, got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.shape[0] != nq:
        raise ValueError(f"found_ids must have shape [nq={nq}, k'], got {ids.shape}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (ids.min() < -1 or ids.max() >= n):
        raise ValueError(f"found_ids must lie in [-1, {n}), got values in [{ids.min()}, {ids.max()}]")
    return ids


def _first_occurrence(ids: np.ndarray) -> np.ndarray:
    """Boolean mask, True where ``ids[i, j]`` does not already appear in ``ids[i, :j]``."""
    order = np.argsort(ids, axis=1, kind="stable")
    s = np.take_along_axis(ids, order, axis=1)
    first_sorted = np.ones_like(s, dtype=bool)
    first_sorted[:, 1:] = s[:, 1:] != s[:, :-1]
    mask = np.empty_like(first_sorted)
    np.put_along_axis(mask, order, first_sorted, axis=1)
    return mask


def _exact_threshold(
    q: np.ndarray, x: np.ndarray, kk: int, tol: np.ndarray, gt_scores: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the exact ``kk``-th best score (float64 ``[nq]``) and how many keys beat it by more than ``tol``.

    Every key beating the ``kk``-th score is in the exact top-``kk``, so both
    come from ``gt_scores[:, :kk]`` when given, else from float64 scores of all keys.
    """
    if gt_scores is not None:
        g = np.asarray(gt_scores, dtype=np.float64)
        if g.ndim != 2 or g.shape[0] != q.shape[0] or g.shape[1] < kk:
            raise ValueError(f"gt_scores must have shape [nq={q.shape[0]}, >={kk}], got {g.shape}")
        top = g[:, :kk]
        if not np.isfinite(top).all():
            raise ValueError(f"gt_scores[:, :{kk}] (the exact top scores) must be finite")
        kth = top[:, -1]
        return kth, (top > (kth + tol)[:, None]).sum(axis=1)
    kth = np.empty(q.shape[0], dtype=np.float64)
    n_above = np.empty(q.shape[0], dtype=np.int64)
    x = x.astype(np.float64)
    rows = max(1, _BLOCK_ELEMS // x.shape[0])
    for r0 in range(0, q.shape[0], rows):
        s = q[r0:r0 + rows] @ x.T
        kth[r0:r0 + rows] = np.partition(s, s.shape[1] - kk, axis=1)[:, s.shape[1] - kk]
        n_above[r0:r0 + rows] = (s > (kth[r0:r0 + rows] + tol[r0:r0 + rows])[:, None]).sum(axis=1)
    return kth, n_above


# --------------------------------------------------------------------------- decode attention


def output_error(o: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||o - ref|| / ||ref||`` over the last dim (float64), e.g. per query head."""
    o, ref = o.double(), ref.double()
    return (o - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)


def oracle_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fraction: torch.Tensor | float,
                     shared: bool, scale: float | None = None) -> torch.Tensor:
    """The oracle at equal bytes: exact attention over the ``m = fraction * N`` keys with the highest true score,
    the rest dropped.

    q ``[G, Hg, d]`` (the query heads of each KV head), k ``[G, N, d]``, v ``[G, N, dv]``; ``fraction``: a float
    or float ``[G]`` (the share of the KV bytes the compared method read for that KV head). ``shared=False``: each
    query head takes its own ``m`` keys (reads per query head); ``shared=True``: the group reads one set of ``m``
    keys, the union of the heads' top keys grown head by head in rank order until it holds ``m`` (reads shared by
    the GQA group, as the wave and graph methods share theirs). Returns ``o [G, Hg, dv]`` (float64).
    """
    q, k, v = q.double(), k.double(), v.double()
    G, Hg, d = q.shape
    N = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("ghd,gnd->ghn", q, k) * scale
    m = (torch.as_tensor(fraction, dtype=torch.float64).expand(G) * N).round().clamp(1, N).long()   # [G]
    p = torch.softmax(s.masked_fill(~oracle_keep(s, m, shared), -math.inf), dim=-1)
    return p @ v


def oracle_keep(s: torch.Tensor, m: torch.Tensor, shared: bool) -> torch.Tensor:
    """The keys the oracle attends: s ``[G, Hg, N]`` true scores, m int64 ``[G]`` keys a KV head may read (1..N).
    ``shared=False``: each query head's own ``m`` best; ``shared=True``: one set of ``m`` keys for the group, the
    union of the heads' best keys grown head by head in rank order. Returns bool ``[G, Hg, N]``."""
    G, Hg, N = s.shape
    order = torch.argsort(s, dim=-1, descending=True)                           # [G, Hg, N]
    if not shared:
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(N, device=s.device).expand_as(order).contiguous())
        return rank < m[:, None, None]
    keep = torch.zeros(G, Hg, N, dtype=torch.bool, device=s.device)
    for g in range(G):
        # interleave the heads' rankings; the first m distinct keys are the union the group reads
        seq = order[g].T.reshape(-1)
        keep[g, :, seq[_first_seen(seq, N)][: int(m[g])]] = True
    return keep


def _first_seen(seq: torch.Tensor, n: int) -> torch.Tensor:
    """Positions in ``seq`` (values in [0, n)) where a value appears for the first time, in order."""
    first = torch.full((n,), seq.numel(), dtype=torch.long, device=seq.device)
    first.scatter_reduce_(0, seq, torch.arange(seq.numel(), device=seq.device), "amin")
    return torch.sort(first[first < seq.numel()]).values


def mass_recall(q: torch.Tensor, k: torch.Tensor, positions: list[torch.Tensor], scale: float | None = None
                ) -> torch.Tensor:
    """Attention-mass recall: the exact softmax mass of the positions attended exactly. q ``[G, Hg, d]``,
    k ``[G, N, d]``, positions: per KV head an int64 tensor of positions. Returns float64 ``[G, Hg]``."""
    q, k = q.double(), k.double()
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    p = torch.softmax(torch.einsum("ghd,gnd->ghn", q, k) * scale, dim=-1)
    return torch.stack([p[g][:, positions[g]].sum(-1) for g in range(q.shape[0])])
