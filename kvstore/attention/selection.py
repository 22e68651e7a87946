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


def _logsumexp_where(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x.masked_fill(~keep, -math.inf), -1)


def _mixture(weights: torch.Tensor, values: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A partial from masses ``exp(ref) * weights`` (``[G, Hg, M]``, >= 0) over values ``[G, M, Dv]``."""
    tot = weights.sum(-1)
    o = torch.bmm(weights, values) / torch.where(tot > 0, tot, torch.ones_like(tot))[..., None]
    return o, torch.where(tot > 0, ref + torch.log(tot), torch.full_like(tot, -math.inf))


def wave_attend(q: torch.Tensor, slots: WaveSlots, steady: SteadyZone, budget: WaveBudget,
                capacity: list[int], scale: float | None = None,
                scores: tuple[torch.Tensor, torch.Tensor] | None = None, backend: str = "torch"
                ) -> tuple[torch.Tensor, torch.Tensor, WaveStep]:
    """One wave decode step for ``G`` slots (module docstring).

    q ``[G, Hg, D]``; ``capacity``: :func:`candidate_capacity` of ``slots.sizes``; ``scores``: the ranking
    ``(scores [G, Hg, C], probs [G, C])`` of :func:`kvstore.gpu.cluster_ops.cluster_scores` when already
    computed; ``backend``: the ops' backend (``"torch"``, ``"cuda"`` or ``"auto"``, see
    :mod:`kvstore.gpu.cluster_ops`). Returns ``o [G, Hg, Dv]`` and ``lse [G, Hg]`` (float32; float64 when q is
    float64 on the torch backend) and the :class:`WaveStep`. Makes no host synchronisation on CUDA.
    """
    from ..gpu.attention_ops import KVSource, RunTable, sparse_decode_attention
    from ..gpu.cluster_ops import candidate_scores, cluster_scores, select_clusters

    G, Hg, D = q.shape
    C = slots.sizes.shape[1]
    Dv = slots.values.shape[1]
    dev = q.device
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    s_cl, probs = scores if scores is not None else cluster_scores(q, slots.centroids.to(q.dtype), slots.sizes,
                                                                   scale, backend=backend)
    s_cl = s_cl.to(dt)
    r, e = budget.candidates, budget.estimation
    cand, est = select_clusters(probs, r, e, backend=backend)
    start = slots.offsets.gather(1, cand)
    run_len = slots.offsets.gather(1, cand + 1) - start
    run_end = torch.cumsum(run_len, 1)
    run_pos = run_end - run_len
    run_row = start + slots.slot_base[:, None]
    width = capacity[min(r, len(capacity) - 1)]
    s_tok, run_lse = candidate_scores(q, slots.keys, run_row, run_len, run_pos, width, scale, backend=backend)
    valid = torch.isfinite(s_tok[:, 0])                                       # [G, width]
    lse_all = torch.logsumexp(run_lse, -1, keepdim=True)                      # [G, Hg, 1] over every candidate
    ref = torch.where(torch.isfinite(lse_all), lse_all, torch.zeros_like(lse_all))
    # exact tokens: the t candidates of largest group weight
    t = min(budget.tokens, width)
    u = torch.where(valid, torch.exp(s_tok - ref).sum(1), torch.full_like(valid, -1.0, dtype=torch.float32))
    pick = select_clusters(u, t, 0, backend=backend)[0]                     # [G, t] positions, ascending
    picked = valid.gather(1, pick)
    run_of_pick = torch.searchsorted(run_end, pick, right=True).clamp(max=max(r - 1, 0))
    rows = run_row.gather(1, run_of_pick) + pick - run_pos.gather(1, run_of_pick) if r else pick
    # part 1: steady zone + exact tokens, one run table (the steady run, then one row per exact token)
    S = steady.k.shape[1]
    slen = steady.length if isinstance(steady.length, torch.Tensor) else torch.full((G,), int(steady.length),
                                                                                   dtype=torch.int64, device=dev)
    one = torch.ones(G, 1, dtype=torch.int32, device=dev)
    src = torch.cat([one, torch.zeros(G, t, dtype=torch.int32, device=dev)], 1)
    row = torch.cat([torch.arange(G, device=dev)[:, None] * S, torch.where(picked, rows, 0)], 1)
    length = torch.cat([slen.reshape(G, 1).to(device=dev, dtype=torch.int32), picked.to(torch.int32)], 1)
    runs = RunTable(src.reshape(-1), row.reshape(-1), length.reshape(-1),
                    torch.arange(G + 1, device=dev, dtype=torch.int32) * (t + 1))
    sources = [KVSource(slots.keys, slots.values), KVSource(steady.k.reshape(G * S, D), steady.v.reshape(G * S, Dv))]
    o_ex, lse_ex = sparse_decode_attention(q, sources, runs, None, scale, backend=backend)
    parts = [(o_ex.to(dt), lse_ex.to(dt))]
    mv = slots.mean_values.to(dt)
    if r:
        # part 2: candidates not attended: exact mass (all of the run's, less the exact tokens'), mean value
        w_run = torch.exp(run_lse - ref).to(dt)                               # [G, Hg, r]
        w_pick = torch.exp(s_tok.gather(2, pick[:, None, :].expand(G, Hg, t)) - ref).to(dt) * picked[:, None, :]
        w_sel = torch.zeros_like(w_run).scatter_add_(2, run_of_pick[:, None, :].expand(G, Hg, t), w_pick)
        w_un = w_run - w_sel
        w_un = torch.where(w_un > 1e-5 * w_run, w_un, torch.zeros_like(w_un))  # float rounding of a fully read run
        parts.append(_mixture(w_un, mv.gather(1, cand[..., None].expand(G, r, Dv)), ref[..., 0].to(dt)))
    est_logits = s_cl + torch.log(slots.sizes.to(dt))[:, None, :]            # [G, Hg, C] log estimated mass
    offset = torch.zeros(G, Hg, 1, dtype=dt, device=dev)
    if budget.calibrate and r:
        # exact over estimated mass of the calibration clusters: candidates at or below the median weight
        pc = probs.gather(1, cand)
        low = (pc <= pc.median(dim=1, keepdim=True).values)[:, None, :].expand(G, Hg, r)
        off = _logsumexp_where(run_lse.to(dt), low) - _logsumexp_where(est_logits.gather(2, cand[:, None, :].expand(
            G, Hg, r)), low)
        offset = torch.where(torch.isfinite(off), off, torch.zeros_like(off)).clamp(-8.0, 8.0)[..., None]
    if e:
        # part 3: estimation zone
        le = est_logits.gather(2, est[:, None, :].expand(G, Hg, e)) + offset
        m = torch.where(torch.isfinite(le.amax(-1, keepdim=True)), le.amax(-1, keepdim=True), torch.zeros_like(offset))
        parts.append(_mixture(torch.exp(le - m), mv.gather(1, est[..., None].expand(G, e, Dv)), m[..., 0]))
    if budget.rest and C > r + e:
        # part 4: every other cluster, with the slot's mean value
        zone = torch.zeros(G, C, dtype=torch.bool, device=dev)
        zone.scatter_(1, torch.cat([cand, est], 1), True)
        lr = _logsumexp_where(est_logits, ~zone[:, None, :]) + offset[..., 0]
        parts.append((slots.value_mean.to(dt)[:, None, :].expand(G, Hg, Dv), lr))
    o, lse = merge_partials(parts)
    return o, lse, WaveStep(cand, est, torch.where(picked, rows - slots.slot_base[:, None], -1), valid.sum(1))
