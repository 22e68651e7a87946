"""Exact maximum-inner-product top-k: blocked matmul + top-k in torch.

Used for the graph build's training labels, by ``FlatIndex`` and as the ground
truth of the benchmarks. Runs on CUDA when available (or when ``device`` says
so), otherwise on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def exact_topk(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    device: str | torch.device | None = None,
    block_queries: int = 1024,
    block_keys: int = 1 << 18,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` keys of each query by inner product.

    queries ``[nq, d]``, keys ``[N, d]`` float32 numpy. Returns ``(D, I)``,
    float32 / int64 ``[nq, k]``, scores descending, ties broken by lower id;
    when ``k > N`` the tail is padded with ``-inf`` / ``-1``.
    """
    dev = torch.device(device) if device is not None else default_device()
    nq, n = queries.shape[0], keys.shape[0]
    kk = min(k, n)
    D = np.full((nq, k), -np.inf, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    if nq == 0 or kk == 0:
        return D, I

    kt = torch.from_numpy(np.ascontiguousarray(keys, np.float32)).to(dev)
    for q0 in range(0, nq, block_queries):
        qt = torch.from_numpy(np.ascontiguousarray(queries[q0:q0 + block_queries], np.float32)).to(dev)
        best_s = None
        best_i = None
        for k0 in range(0, n, block_keys):
            s = qt @ kt[k0:k0 + block_keys].T
            kb = min(kk, s.shape[1])
            vs, ids = torch.topk(s, kb, dim=1)
            ids = ids + k0
            if best_s is None:
                best_s, best_i = vs, ids
            else:
                cs = torch.cat([best_s, vs], 1)
                ci = torch.cat([best_i, ids], 1)
                best_s, order = torch.topk(cs, kk, dim=1)
                best_i = ci.gather(1, order)
        best_s, best_i = _order_ties_by_id(best_s, best_i)
        D[q0:q0 + qt.shape[0], :kk] = best_s.float().cpu().numpy()
        I[q0:q0 + qt.shape[0], :kk] = best_i.cpu().numpy()
    return D, I


def _order_ties_by_id(s: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows by score descending, equal scores by ascending id (deterministic output)."""
    by_id = torch.argsort(i, dim=1)
    s, i = s.gather(1, by_id), i.gather(1, by_id)
    by_score = torch.sort(s, dim=1, descending=True, stable=True).indices
    return s.gather(1, by_score), i.gather(1, by_score)
