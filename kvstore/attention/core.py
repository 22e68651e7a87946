"""Exact attention pieces shared by every decode method.

A *partial* attention over a set of tokens is ``(o, lse)``: the normalised
output over that set and ``log sum exp(q.k * scale)``. Partials over disjoint
sets merge exactly by the log-sum-exp rule (:func:`merge_partials`); an empty
set has ``lse = -inf``. Estimated parts (clusters summarised by centroid, size
and value sum) enter the same merge. All maths in float32, or float64 when the
inputs are float64 (the test references).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of queries over one token set.

    q ``[..., G, d]``, k ``[..., n, d]``, v ``[..., n, dv]`` (leading dims
    broadcast). Returns ``o [..., G, dv]`` and ``lse [..., G]`` in the compute
    dtype; ``n = 0`` gives ``o = 0`` and ``lse = -inf``.
    """
    dt = compute_dtype(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if k.shape[-2] == 0:
        shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        o = torch.zeros(*shape, q.shape[-2], v.shape[-1], dtype=dt, device=q.device)
        return o, torch.full((*shape, q.shape[-2]), -math.inf, dtype=dt, device=q.device)
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    o = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.to(dt))
    return o, lse


def estimate_clusters(q: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor, value_sums: torch.Tensor,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over clusters summarised by centroid, size and value sum.

    Each cluster i stands for ``size_i`` tokens that all score ``q.c_i``: it
    adds ``size_i * exp(q.c_i * scale)`` to the normaliser and
    ``exp(q.c_i * scale) * value_sum_i`` to the numerator. (By Jensen, with
    ``c_i`` the mean key, the normaliser term is a lower bound of the cluster's
    true sum of exps.)

    q ``[G, d]``, centroids ``[E, d]``, sizes ``[E]``, value_sums ``[E, dv]``.
    Returns ``o [G, dv]``, ``lse [G]``.
    """
    dt = compute_dtype(q, centroids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if centroids.shape[0] == 0:
        return (torch.zeros(q.shape[0], value_sums.shape[-1], dtype=dt, device=q.device),
                torch.full((q.shape[0],), -math.inf, dtype=dt, device=q.device))
    s = (q.to(dt) @ centroids.to(dt).T) * scale                      # [G, E]
    lse = torch.logsumexp(s + torch.log(sizes.to(dt)), dim=-1)       # [G]
    o = torch.exp(s - lse.unsqueeze(-1)) @ value_sums.to(dt)          # [G, dv]
    return o, lse


def merge_partials(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attentions over disjoint token sets.

    Each part is ``(o [..., G, dv], lse [..., G])``. Returns the merged
    ``(o, lse)``: ``o = sum_P exp(L_P - M) o_P / sum_P exp(L_P - M)``,
    ``M = max_P L_P``. Parts with ``lse = -inf`` contribute nothing; if every
    part is empty the output is 0 with ``lse = -inf``.
    """
    if not parts:
        raise ValueError("parts must not be empty")
    dt = compute_dtype(*(p[0] for p in parts))
    os_ = torch.stack([p[0].to(dt) for p in parts])          # [P, ..., G, dv]
    ls = torch.stack([p[1].to(dt) for p in parts])           # [P, ..., G]
    m = ls.max(dim=0).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(ls - m_safe)                                # exp(-inf) = 0 for empty parts
    denom = w.sum(dim=0)
    o = (w.unsqueeze(-1) * os_).sum(dim=0) / torch.where(denom > 0, denom, torch.ones_like(denom)).unsqueeze(-1)
    lse = torch.where(denom > 0, m_safe + torch.log(denom), torch.full_like(m, -math.inf))
    return o, lse


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None,
                   scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact decode attention, the reference every method is measured against.

    q ``[B, Hq, T, d]``, k ``[B, Hkv, N, d]``, v ``[B, Hkv, N, dv]`` with
    ``Hq`` a multiple of ``Hkv`` (GQA: query head h reads KV head
    ``h // (Hq // Hkv)``). ``lengths [B]``: tokens ``>= lengths[b]`` of
    sequence b are padding and are not attended. All T queries see all N
    keys (decode, not causal prefill). Returns ``o [B, Hq, T, dv]`` and
    ``lse [B, Hq, T]`` in the compute dtype.
    """
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of the {Hkv} KV heads")
    G = Hq // Hkv
    dt = compute_dtype(q, k, v)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.to(dt).reshape(B, Hkv, G * T, d)
    s = torch.matmul(qg, k.to(dt).transpose(-1, -2)) * scale          # [B, Hkv, G*T, N]
    if lengths is not None:
        pad = torch.arange(k.shape[2], device=k.device)[None, :] >= lengths.to(k.device)[:, None]  # [B, N]
        s = s.masked_fill(pad[:, None, None, :], -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    o = torch.matmul(p, v.to(dt))
    return o.reshape(B, Hq, T, -1), lse.reshape(B, Hq, T)
