"""The wave method's decode step: which tokens a query reads, and how the rest is estimated.

One algorithm for every device. The per-head CPU cache runs it with one slot, the batched GPU layer with
``G = batch * KV heads`` slots; both call :func:`wave_attend`, whose ``backend`` picks torch ops (the
reference, any device) or the CUDA kernels.

A slot holds its middle tokens as clusters (centroid = mean key, size, mean value; the KV in cluster order) and
its sink + recent tokens as the steady zone. For the ``Hg`` query heads of a slot, one step:

1. **Rank** every cluster by its centroid: ``s_hj = q_h . c_j * scale``; the weight of cluster ``j`` is
   ``sum_h softmax_j(s_hj)`` (shared by the group: the clusters read serve every head of the slot).
2. **Candidates**: the ``r`` best clusters. Their keys are read and scored exactly (keys only).
3. **Exact tokens**: among the candidates' tokens, the ``t`` with the largest group weight
   ``sum_h exp(s_hi - L_h)`` (``L_h``: log-sum-exp of head h over the candidates) are attended exactly with the
   steady zone (their values are read).
4. **Candidates not attended**: their exact score is known, so their mass is exact; their value is their
   cluster's mean value.
5. **Calibration**: the centroid estimate ``size * exp(q . c)`` is biased (Jensen: it under-counts a cluster's
   mass). On the candidate clusters whose rank weight is at most the median of the candidates' (the ones most
   like the clusters left out) both the exact and the estimated mass are known; their log ratio, per head, is
   added to every estimate below.
6. **Estimation zone**: the next ``e`` clusters by rank: calibrated estimated mass, mean value.
7. **Rest**: every other cluster: calibrated estimated mass (from the scores already computed), with the slot's
   mean value.

All parts merge by log-sum-exp (:func:`kvstore.attention.core.merge_partials`). Counts come from
:func:`step_budget`, which converts the token budgets with the real mean cluster size, so a budget that covers
the context reads every token.

Reads per step (what ``Read`` reports): the centroids and sizes of every cluster, the keys of the candidates,
the values of the exact tokens, the mean values of the candidate and estimation clusters, the steady zone's
keys and values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .core import compute_dtype, merge_partials

__all__ = ["WaveBudget", "WaveSlots", "SteadyZone", "WaveStep", "step_budget", "wave_attend",
           "candidate_capacity"]


@dataclass(frozen=True)
class WaveBudget:
    """Counts of one decode step (per slot): ``candidates`` clusters scored exactly, ``tokens`` of them attended
    exactly, ``estimation`` more clusters estimated; ``calibrate`` / ``rest``: steps 5 and 7 of the module
    docstring on or off (off: the published RetroInfer step, where the rest is dropped)."""

    candidates: int
    tokens: int
    estimation: int
    calibrate: bool = True
    rest: bool = True


class WaveSlots(NamedTuple):
    """The clustered middle tokens of ``G`` slots (``C`` clusters each, ``n`` rows each).

    centroids ``[G, C, D]`` (mean keys); sizes float32 ``[G, C]`` (0: an empty cluster, never read); mean_values
    float32 ``[G, C, Dv]``; value_mean float32 ``[G, Dv]`` (mean value of the slot's clustered tokens); offsets
    int64 ``[G, C + 1]`` (cluster ``c`` of slot ``g`` is rows ``offsets[g, c]:offsets[g, c + 1]`` of the slot);
    keys ``[rows, D]`` / values ``[rows, Dv]`` (the sorted KV of every slot, slot ``g`` from row
    ``slot_base[g]``); slot_base int64 ``[G]``."""

    centroids: torch.Tensor
    sizes: torch.Tensor
    mean_values: torch.Tensor
    value_mean: torch.Tensor
    offsets: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    slot_base: torch.Tensor


class SteadyZone(NamedTuple):
    """Sink + recent tokens of each slot: k ``[G, S, D]``, v ``[G, S, Dv]``, the first ``length`` of them used
    (an int, the same for every slot, or int64 ``[G]``)."""

    k: torch.Tensor
    v: torch.Tensor
    length: int | torch.Tensor


class WaveStep(NamedTuple):
    """What a step chose (for accounting): candidate cluster ids int64 ``[G, r]`` and estimation ids
    ``[G, e]`` (ascending), exact rows int64 ``[G, t]`` (slot-local rows of the sorted KV, ascending; ``-1``
    pads a slot whose candidates hold fewer than ``t`` tokens), candidate rows read per slot int64 ``[G]``."""

    candidates: torch.Tensor
    estimation: torch.Tensor
    exact_rows: torch.Tensor
    candidate_rows: torch.Tensor


def step_budget(candidates: float | int, tokens: float | int, estimation: float | int, context: int,
                indexed: int, clusters: int, *, calibrate: bool = True, rest: bool = True) -> WaveBudget:
    """Counts for a step from budgets in tokens: a float is a fraction of ``context`` (tokens seen), an int a
    count of tokens. ``indexed`` tokens are held in ``clusters`` clusters; token budgets become cluster counts
    with the real mean cluster size ``indexed / clusters``, so ``candidates >= indexed`` reads every cluster."""
    if clusters <= 0 or indexed <= 0:
        return WaveBudget(0, 0, 0, calibrate, rest)

    def tok(b: float | int) -> int:
        return int(math.ceil(b * context)) if isinstance(b, float) else int(b)

    def to_clusters(n_tokens: int) -> int:
        return min(clusters, int(math.ceil(n_tokens * clusters / indexed)))

    r = to_clusters(tok(candidates))
    e = min(clusters - r, to_clusters(tok(estimation)))
    t = min(indexed, tok(tokens))
    return WaveBudget(r, t, e, calibrate, rest)


def candidate_capacity(sizes: torch.Tensor) -> list[int]:
    """``cap[r]``: the most rows ``r`` clusters of any slot can hold (``[C + 1]`` host ints, from sizes
    ``[G, C]``). A step with ``r`` candidates pads their rows to ``cap[r]``, a bound known without reading the
    device."""
    if sizes.numel() == 0:
        return [0] * (sizes.shape[-1] + 1)
    top = torch.sort(sizes.detach().float().cpu(), dim=1, descending=True).values
    cum = torch.cumsum(top.double(), 1).amax(0)
    return [0] + [int(round(float(x))) for x in cum.tolist()]


def _ids_from_order(probs: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest of each row, "larger first, lower index first on ties", in ascending index order."""
    from ..gpu.cluster_ops import select_clusters

    return select_clusters(probs, k, 0, backend="torch")[0]


def _candidate_rows(cand: torch.Tensor, offsets: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the candidate clusters, padded: row int64 ``[G, cap]`` (slot-local, ``-1`` past the slot's
    candidate rows) and, for each, the index of its cluster in ``cand`` (int64 ``[G, cap]``, ``-1`` padding)."""
    G, r = cand.shape
    dev = cand.device
    if r == 0 or cap == 0:
        z = torch.full((G, cap), -1, dtype=torch.int64, device=dev)
        return z, z.clone()
    start = offsets.gather(1, cand)
    length = offsets.gather(1, cand + 1) - start
    end = torch.cumsum(length, 1)
    first = end - length
    pos = torch.arange(cap, device=dev).expand(G, cap).contiguous()
    which = torch.searchsorted(end, pos, right=True)                       # [G, cap] candidate holding pos
    valid = which < r
    w = which.clamp(max=r - 1)
    row = start.gather(1, w) + pos - first.gather(1, w)
    return torch.where(valid, row, -1), torch.where(valid, w, -1)


def _masked_part(logits: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A partial over entries with log-mass ``logits [G, Hg, M]`` (``-inf``: absent) and values
    ``[G, M, Dv]``: ``(o [G, Hg, Dv], lse [G, Hg])``; an empty part has ``lse = -inf`` and ``o = 0``."""
    lse = torch.logsumexp(logits, -1)
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.exp(logits - ref[..., None])
    return torch.bmm(w, values), lse


def wave_attend(q: torch.Tensor, slots: WaveSlots, steady: SteadyZone, budget: WaveBudget,
                capacity: list[int], scale: float | None = None, scores: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, WaveStep]:
    """One wave decode step for ``G`` slots (module docstring).

    q ``[G, Hg, D]``; ``capacity``: :func:`candidate_capacity` of ``slots.sizes``; ``scores``: the ranking
    ``(scores [G, Hg, C], probs [G, C])`` of :func:`kvstore.gpu.cluster_ops.cluster_scores` when already
    computed (e.g. by the kernel). Returns ``o [G, Hg, Dv]`` and ``lse [G, Hg]`` in the compute dtype (float32,
    float64 for float64 inputs) and the :class:`WaveStep`.
    """
    from ..gpu.cluster_ops import cluster_scores

    G, Hg, D = q.shape
    C = slots.sizes.shape[1]
    dt = compute_dtype(q, slots.keys)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = q.device
    qf = q.to(dt)
    if scores is None:
        s_cl, probs = cluster_scores(qf, slots.centroids.to(dt), slots.sizes, scale, backend="torch")
    else:
        s_cl, probs = scores
    s_cl = s_cl.to(dt)
    r, e, t = budget.candidates, budget.estimation, budget.tokens
    from ..gpu.cluster_ops import select_clusters

    cand, est = select_clusters(probs, r, e, backend="torch") if r + e else (
        torch.zeros(G, 0, dtype=torch.int64, device=dev), torch.zeros(G, 0, dtype=torch.int64, device=dev))
    cap = capacity[r] if r < len(capacity) else capacity[-1]
    rows, which = _candidate_rows(cand, slots.offsets, cap)                  # [G, M]
    valid = rows >= 0
    grow = torch.where(valid, rows + slots.slot_base[:, None], 0)
    kc = slots.keys[grow.reshape(-1)].reshape(G, cap, D).to(dt)
    s_tok = torch.bmm(qf, kc.transpose(1, 2)) * scale                       # [G, Hg, M] exact scores
    s_tok = s_tok.masked_fill(~valid[:, None, :], -math.inf)
    # exact tokens: group weight over the candidates, top t
    t = min(t, cap)
    if t:
        lse_c = torch.logsumexp(s_tok, -1, keepdim=True)
        u = torch.exp(s_tok - torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))).sum(1)
        u = torch.where(valid, u.float(), torch.full_like(u.float(), -1.0))
        pick = _ids_from_order(u, t)                                         # [G, t] positions in the padded list
        picked_valid = valid.gather(1, pick)
        exact_rows = torch.where(picked_valid, rows.gather(1, pick), -1)
    else:
        pick = torch.zeros(G, 0, dtype=torch.int64, device=dev)
        picked_valid = torch.zeros(G, 0, dtype=torch.bool, device=dev)
        exact_rows = pick.clone()
    selected = torch.zeros(G, cap, dtype=torch.bool, device=dev)
    selected.scatter_(1, pick, picked_valid)
    # part 1: steady zone + exact tokens
    S = steady.k.shape[1]
    slen = steady.length if isinstance(steady.length, torch.Tensor) else torch.full((G,), int(steady.length),
                                                                                   device=dev)
    st_ok = torch.arange(S, device=dev)[None, :] < slen.to(dev)[:, None]      # [G, S]
    xr = torch.where(picked_valid, exact_rows + slots.slot_base[:, None], 0)
    ke = torch.cat([steady.k.to(dt), slots.keys[xr.reshape(-1)].reshape(G, -1, D).to(dt)], 1)
    ve = torch.cat([steady.v.to(dt), slots.values[xr.reshape(-1)].reshape(G, -1, slots.values.shape[1]).to(dt)], 1)
    ok = torch.cat([st_ok, picked_valid], 1)
    s_ex = (torch.bmm(qf, ke.transpose(1, 2)) * scale).masked_fill(~ok[:, None, :], -math.inf)
    parts = [_masked_part(s_ex, ve)]
    mv = slots.mean_values.to(dt)
    w = which.clamp_min(0)
    if cap:
        # part 2: candidates not attended: exact mass, their cluster's mean value
        cl_of_row = cand.gather(1, w) if r else w
        v_un = mv.gather(1, cl_of_row[..., None].expand(G, cap, mv.shape[2]))
        parts.append(_masked_part(s_tok.masked_fill(selected[:, None, :], -math.inf), v_un))
    est_logits = s_cl + torch.log(slots.sizes.to(dt))[:, None, :]           # [G, Hg, C] log estimated mass
    offset = torch.zeros(G, Hg, 1, dtype=dt, device=dev)
    if budget.calibrate and r and cap:
        # exact and estimated mass of the calibration clusters (candidates at or below the median weight)
        pc = probs.gather(1, cand).float()
        med = pc.median(dim=1, keepdim=True).values
        low = pc <= med                                                       # [G, r]
        row_low = torch.where(valid, low.gather(1, w), False)
        exact_low = torch.logsumexp(s_tok.masked_fill(~row_low[:, None, :], -math.inf), -1)
        est_c = est_logits.gather(2, cand[:, None, :].expand(G, Hg, r))
        est_low = torch.logsumexp(est_c.masked_fill(~low[:, None, :], -math.inf), -1)
        off = exact_low - est_low
        offset = torch.where(torch.isfinite(off), off, torch.zeros_like(off)).clamp(-8.0, 8.0)[..., None]
    if e:
        # part 3: estimation zone
        le = est_logits.gather(2, est[:, None, :].expand(G, Hg, e)) + offset
        parts.append(_masked_part(le, mv.gather(1, est[..., None].expand(G, e, mv.shape[2]))))
    if budget.rest and C > r + e:
        # part 4: every other cluster, with the slot's mean value
        zone = torch.zeros(G, C, dtype=torch.bool, device=dev)
        if r:
            zone.scatter_(1, cand, True)
        if e:
            zone.scatter_(1, est, True)
        lr = torch.logsumexp(est_logits.masked_fill(zone[:, None, :], -math.inf), -1) + offset[..., 0]
        parts.append((slots.value_mean.to(dt)[:, None, :].expand(G, Hg, -1), lr))
    o, lse = merge_partials(parts)
    return o, lse, WaveStep(cand, est, exact_rows, valid.sum(1))
