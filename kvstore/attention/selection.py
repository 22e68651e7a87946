"""The wave method's decode step: which tokens a query reads, and how the rest is estimated.

One algorithm for every device. The per-head CPU cache runs it with one slot, the batched GPU layer with
``G = batch * KV heads`` slots; both call :func:`wave_attend`, whose ``backend`` picks torch ops (the
reference, any device) or the CUDA kernels.

A slot holds its middle tokens as clusters (centroid = mean key, size, mean value; the KV in cluster order) and
its sink + recent tokens as the steady zone. For the ``Hg`` query heads of a slot, one step:

1. **Rank** every cluster by its centroid and radius: ``s_hj = q_h . c_j * scale`` and the rank score
   ``s_hj + rank_radius * |q_h| * radius_j * scale`` (``radius_j``: the largest distance of a member key from
   ``c_j``, so that a cluster holding one key far out along ``q`` is not ranked by its mean alone); the weight of
   cluster ``j`` is ``sum_h softmax_j`` of the rank scores (shared by the group: the clusters read serve every
   head of the slot). The estimates below use ``s_hj``.
2. **Candidates**: the best clusters, in rank order, until they hold the candidate budget in tokens. Their keys
   are read and scored exactly (keys only).
3. **Exact tokens**: among the candidates' tokens, the ``t`` with the largest group weight
   ``sum_h exp(s_hi - L_h)`` (``L_h``: log-sum-exp of head h over the candidates) are attended exactly with the
   steady zone (their values are read).
4. **Candidates not attended**: their exact score is known, so their mass is exact; their value is their
   cluster's mean value.
5. **Calibration**: the centroid estimate ``size * exp(q . c)`` is biased (Jensen: it under-counts a cluster's
   mass). On the candidate clusters whose rank weight is at most the median of the candidates' (the ones most
   like the clusters left out) both the exact and the estimated mass are known; their log ratio, per head, is
   added to every estimate below.
6. **Estimation zone**: the next clusters by rank, until they hold the estimation budget in tokens: calibrated
   estimated mass, mean value.
7. **Rest**: every other cluster: calibrated estimated mass (from the scores already computed), with the slot's
   mean value.

All parts merge by log-sum-exp (:func:`kvstore.attention.core.merge_partials`). Budgets are real tokens
(:func:`step_budget`): clusters are taken until their sizes add up to the budget, so a budget that covers the
context reads every token whatever the cluster sizes. Shapes stay fixed from step to step (for CUDA graphs): the
step pads to bounds that :class:`ClusterBounds` computes from the sizes when the index changes.

Reads per step (what ``Read`` reports): the centroids (int8 with a scale each by default), sizes (and radii) of
every cluster, the keys of the
candidates, the values of the exact tokens, the mean values of the candidate and estimation clusters, the steady
zone's keys and values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .core import compute_dtype, merge_partials

__all__ = ["WaveBudget", "SlotBudgets", "WaveSlots", "SteadyZone", "WaveStep", "ClusterBounds", "step_budget",
           "slot_budgets", "wave_attend"]


@dataclass(frozen=True)
class WaveBudget:
    """Budgets of one decode step in tokens (per slot): ``candidates`` tokens of the best clusters scored exactly,
    ``tokens`` of them attended exactly, ``estimation`` tokens of the next clusters estimated; ``calibrate`` /
    ``rest``: steps 5 and 7 of the module docstring on or off (off: the published RetroInfer step, where the rest
    is dropped); ``rank_radius``: the radius weight of step 1 (0: rank by the centroid alone)."""

    candidates: int
    tokens: int
    estimation: int
    calibrate: bool = True
    rest: bool = True
    rank_radius: float = 0.0

    def clusters(self, indexed: int, clusters: int) -> tuple[int, int]:
        """(candidate, estimation) cluster counts at the mean cluster size (for steps that select by count)."""
        if indexed <= 0 or clusters <= 0:
            return 0, 0
        r = min(clusters, -(-self.candidates * clusters // indexed))
        return r, min(clusters - r, -(-self.estimation * clusters // indexed))


class SlotBudgets(NamedTuple):
    """Budgets that differ from slot to slot (sequences of different lengths): int64 ``[G, 1]`` device tensors,
    and ``bound``: their maxima and the flags (the step's shapes)."""

    candidates: torch.Tensor
    tokens: torch.Tensor
    estimation: torch.Tensor
    bound: WaveBudget


def slot_budgets(budgets: list[WaveBudget], device: torch.device) -> SlotBudgets:
    """Per-slot budgets as device tensors (made when they change, not per step: the copy waits for the GPU)."""
    t = torch.tensor([[b.candidates, b.tokens, b.estimation] for b in budgets], dtype=torch.int64).to(device)
    bound = WaveBudget(max(b.candidates for b in budgets), max(b.tokens for b in budgets),
                       max(b.estimation for b in budgets), budgets[0].calibrate, budgets[0].rest,
                       budgets[0].rank_radius)
    return SlotBudgets(t[:, 0:1], t[:, 1:2], t[:, 2:3], bound)


class WaveSlots(NamedTuple):
    """The clustered middle tokens of ``G`` slots (``C`` clusters each, ``n`` rows each).

    centroids ``[G, C, D]`` (mean keys); sizes float32 ``[G, C]`` (0: an empty cluster, never read); mean_values
    ``[G, C, Dv]`` (float32 or the KV dtype); value_mean float32 ``[G, Dv]`` (mean value of the slot's clustered
    tokens); offsets int64 ``[G, C + 1]`` (cluster ``c`` of slot ``g`` is rows ``offsets[g, c]:offsets[g, c + 1]``
    of the slot);
    keys ``[rows, D]`` / values ``[rows, Dv]`` (the sorted KV of every slot, slot ``g`` from row
    ``slot_base[g]``); slot_base int64 ``[G]``; radii float32 ``[G, C]`` (each cluster's largest member distance
    from its centroid, :func:`kvstore.wave.cluster_radii`; None: not ranked by radius); centroid_scale float32
    ``[G, C]`` when the centroids are int8 (:func:`kvstore.gpu.cluster_ops.quantize_rows`; None: centroids in
    a float dtype); key_scale float32 ``[rows]`` when ``keys`` are int8 copies of the stored keys (the
    candidates' scores then come from ``keys * key_scale``; None: keys in q's dtype)."""

    centroids: torch.Tensor
    sizes: torch.Tensor
    mean_values: torch.Tensor
    value_mean: torch.Tensor
    offsets: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    slot_base: torch.Tensor
    radii: torch.Tensor | None = None
    centroid_scale: torch.Tensor | None = None
    key_scale: torch.Tensor | None = None


class SteadyZone(NamedTuple):
    """Sink + recent tokens of each slot: k ``[G, S, D]``, v ``[G, S, Dv]``, the first ``length`` of them used
    (an int, the same for every slot, or int64 ``[G]``)."""

    k: torch.Tensor
    v: torch.Tensor
    length: int | torch.Tensor


class WaveStep(NamedTuple):
    """What a step chose (for accounting): candidate cluster ids int64 ``[G, r]`` and estimation ids
    ``[G, e]`` in rank order (ascending ids on the kernel path; ``-1`` pads), exact rows int64 ``[G, t]`` (slot-local rows of the sorted KV, ascending; ``-1``
    pads a slot whose candidates hold fewer than ``t`` tokens), candidate rows read per slot int64 ``[G]``."""

    candidates: torch.Tensor
    estimation: torch.Tensor
    exact_rows: torch.Tensor
    candidate_rows: torch.Tensor


def step_budget(candidates: float | int, tokens: float | int, estimation: float | int, context: int,
                indexed: int, *, calibrate: bool = True, rest: bool = True, rank_radius: float = 0.0) -> WaveBudget:
    """A step's budgets from a float (a fraction of ``context``, the tokens seen) or an int (tokens) each, capped
    at the ``indexed`` tokens the clusters hold."""
    def tok(b: float | int) -> int:
        return min(indexed, int(math.ceil(b * context)) if isinstance(b, float) else int(b))

    return WaveBudget(tok(candidates), tok(tokens), tok(estimation), calibrate, rest, rank_radius)


class ClusterBounds:
    """Host-side bounds of a layer's clusters, for fixed step shapes: from sizes ``[G, C]`` (made when the index
    changes, never per step)."""

    def __init__(self, sizes: torch.Tensor) -> None:
        sz = sizes.detach().float().round().long()   # sorted where the sizes are (the GPU for a GPU layer)
        self.C = int(sz.shape[1])
        if not sz.numel():
            self._least, self._most, self.max_size = [], [], 0
            return
        srt = torch.sort(sz, dim=1).values
        asc = torch.cumsum(srt, 1)
        desc = torch.cumsum(srt.flip(1), 1)
        # fewest tokens any r clusters of a slot hold, and the most; one copy to the host
        both = torch.stack([asc.amin(0), desc.amax(0)]).cpu()
        self._least, self._most = both[0].tolist(), both[1].tolist()
        self.max_size = int(both[1, 0]) if self.C else 0

    def clusters_for(self, tokens: int) -> int:
        """An upper bound of the clusters a cut at ``tokens`` takes in any slot (taking clusters until their sizes
        reach ``tokens`` never takes more than the fewest clusters that always hold that many)."""
        if tokens <= 0:
            return 0
        import bisect

        return min(self.C, bisect.bisect_left(self._least, tokens) + 1)

    def rows_for(self, tokens: int, clusters: int) -> int:
        """An upper bound of the rows a cut at ``tokens`` holds: the most ``clusters`` clusters hold, and never
        more than ``tokens`` plus one cluster."""
        if clusters <= 0:
            return 0
        return int(min(self._most[clusters - 1], tokens + self.max_size - 1))


def _rank_order(probs: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    """The ``k`` best clusters of each slot in rank order (weight descending, lower id first on ties)."""
    from ..gpu.cluster_ops import select_clusters

    ids = select_clusters(probs, k, 0, backend=backend)[0]                   # the best k, ascending ids
    p = probs.gather(1, ids).float() + 0.0                                   # -0.0 -> +0.0
    return ids.gather(1, torch.sort(p, dim=1, descending=True, stable=True).indices)   # stable: ties by id


def _kernel_path(backend: str, q: torch.Tensor) -> bool:
    """Whether this step runs the CUDA kernels (else torch ops)."""
    from ..gpu.cluster_ops import use_cuda_kernel

    return use_cuda_kernel(backend, q)


def _logsumexp_where(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x.masked_fill(~keep, -math.inf), -1)


def _masked_part(logits: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A partial over entries of log-mass ``logits [G, Hg, M]`` (``-inf``: absent) and values ``[G, M, Dv]``:
    ``(o [G, Hg, Dv], lse [G, Hg])``; an empty part has ``lse = -inf`` and ``o = 0``."""
    lse = torch.logsumexp(logits, -1)
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.bmm(torch.exp(logits - ref[..., None]), values), lse


def _steady_part(q: torch.Tensor, steady: SteadyZone, scale: float, backend: str, dt: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the steady zone: ``(o [G, Hg, Dv], lse [G, Hg])`` (o in q's dtype on the kernel
    path, else ``dt``)."""
    from ..gpu.attention_ops import KVSource, RunTable, kernel_misfit, sparse_decode_attention

    G, Hg, D = q.shape
    S, Dv = steady.k.shape[1], steady.v.shape[2]
    dev = q.device
    slen = steady.length if isinstance(steady.length, torch.Tensor) else torch.full((G,), int(steady.length),
                                                                                   dtype=torch.int64, device=dev)
    if _kernel_path(backend, q):
        src = [KVSource(steady.k.reshape(G * S, D), steady.v.reshape(G * S, Dv))]
        runs = RunTable(torch.zeros(G, dtype=torch.int32, device=dev), torch.arange(G, device=dev) * S,
                        slen.to(device=dev, dtype=torch.int32).reshape(G),
                        torch.arange(G + 1, device=dev, dtype=torch.int32))
        if kernel_misfit(q, src, runs, None, D, Dv, Hg) is None:
            return sparse_decode_attention(q, src, runs, None, scale, backend=backend)
    # torch ops (also on CUDA where the kernel lacks the head size: its checked fallback would sync)
    ok = torch.arange(S, device=dev)[None, :] < slen.to(dev)[:, None]
    s_st = (torch.bmm(q.to(dt), steady.k.to(dt).transpose(1, 2)) * scale).masked_fill(~ok[:, None, :], -math.inf)
    return _masked_part(s_st, steady.v.to(dt))


def _fused_ready(q: torch.Tensor, slots: WaveSlots, steady: SteadyZone) -> bool:
    """Whether the step's bookkeeping kernels (``wave_zones`` / ``wave_mix`` / ``wave_combine``) take this step (for
    any slot count: they split a slot over a team of blocks when the slots are too few to fill the GPU)."""
    from ..gpu._ext import cuda_ext

    ext = cuda_ext()
    Hg, D, Dv = q.shape[1], q.shape[2], slots.values.shape[1]
    return (hasattr(ext, "wave_zones") and q.dtype != torch.float64 and 1 <= Hg <= 32 and 1 <= Dv <= 256
            and 1 <= D <= 256 and q.shape[0] < 65536 and slots.sizes.dtype == torch.float32
            and steady.k.dtype == steady.v.dtype != torch.float64)


def _wave_attend_fused(q: torch.Tensor, slots: WaveSlots, steady: SteadyZone, budget: WaveBudget | SlotBudgets,
                       bounds: ClusterBounds, scale: float, s_cl: torch.Tensor, probs: torch.Tensor, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor, WaveStep]:
    """:func:`wave_attend` on the CUDA kernels: the same step, its bookkeeping in three kernels (zones in
    ascending cluster id, the exact tokens and mixture weights, the merge with the steady zone attended exactly)
    around the kernels that read the KV."""
    from ..gpu._ext import cuda_ext
    from ..gpu.cluster_ops import candidate_scores

    ext = cuda_ext()
    G, Hg, _ = q.shape
    C = slots.sizes.shape[1]
    Dv = slots.values.shape[1]
    per_slot = isinstance(budget, SlotBudgets)
    bound = budget.bound if per_slot else budget
    r = bounds.clusters_for(bound.candidates)
    e = bounds.clusters_for(bound.candidates + bound.estimation) if bound.estimation else 0
    slot_budget = torch.cat([budget.candidates, budget.estimation], 1).contiguous() if per_slot else None
    f32 = torch.float32
    sizes = slots.sizes.contiguous()
    s_cl = s_cl.to(f32).contiguous()
    cand, run_row, run_len, run_pos, cand_low, est, rest_lse, low_lse = ext.wave_zones(
        probs.to(f32).contiguous(), sizes, s_cl, slots.offsets.contiguous(), slots.slot_base.contiguous(),
        slot_budget, bound.candidates, bound.estimation, r, e)
    width = bounds.rows_for(bound.candidates, r)
    s_tok, run_lse = candidate_scores(q, slots.keys, run_row, run_len, run_pos, width, scale, backend=backend,
                                      key_scale=slots.key_scale)
    t = min(bound.tokens, width)
    tokens = budget.tokens.reshape(G).contiguous() if per_slot else None
    (pick_rows, pick_local, pick_w, pick_d, pick_ref, n_valid, mix_rows, mix_w, rest_w, mix_lse) = ext.wave_mix(
        s_tok, run_lse, run_row, run_len, run_pos, cand_low, cand, est, s_cl, sizes, rest_lse, low_lse,
        slots.slot_base.contiguous(), tokens, bound.tokens, t, bound.calibrate, bound.rest)
    means = slots.mean_values.reshape(G * C, Dv).contiguous()
    values = slots.values.contiguous()
    if means.dtype == values.dtype:  # one launch: the exact tokens' values and the mixture's mean values
        pick_part, mix_part = ext.weighted_rows_jobs([pick_w, mix_w], [pick_rows, mix_rows], [values, means])
    else:
        pick_part = ext.weighted_rows_partial(pick_w, pick_rows, values)
        mix_part = ext.weighted_rows_partial(mix_w, mix_rows, means)
    slen = steady.length
    slen = (slen.to(device=q.device, dtype=torch.int64).reshape(G) if isinstance(slen, torch.Tensor)
            else torch.full((G,), int(slen), dtype=torch.int64, device=q.device))
    o, lse = ext.wave_combine(pick_part, mix_part, pick_d, pick_ref, mix_lse, rest_w,
                              slots.value_mean.to(f32).contiguous(), q.contiguous(), steady.k.contiguous(),
                              steady.v.contiguous(), slen.contiguous(), scale)
    return o, lse, WaveStep(cand, est, pick_local, n_valid)


def wave_attend(q: torch.Tensor, slots: WaveSlots, steady: SteadyZone, budget: WaveBudget | SlotBudgets,
                bounds: ClusterBounds, scale: float | None = None,
                scores: tuple[torch.Tensor, torch.Tensor] | None = None, backend: str = "torch"
                ) -> tuple[torch.Tensor, torch.Tensor, WaveStep]:
    """One wave decode step for ``G`` slots (module docstring).

    q ``[G, Hg, D]``; ``budget``: one for every slot, or :class:`SlotBudgets`; ``bounds``: :class:`ClusterBounds`
    of ``slots.sizes``; ``scores``: the ranking
    ``(scores [G, Hg, C], probs [G, C])`` of :func:`kvstore.gpu.cluster_ops.cluster_scores` when already
    computed (otherwise computed here, ranked with ``slots.radii`` when the budget's ``rank_radius`` is set);
    ``backend``: the ops' backend (``"torch"``, ``"cuda"`` or ``"auto"``, see :mod:`kvstore.gpu.cluster_ops`). Returns
    ``o [G, Hg, Dv]`` and ``lse [G, Hg]`` (float32; float64 when q is float64 on the torch backend) and the
    :class:`WaveStep`. Makes no host synchronisation on CUDA.
    """
    from ..gpu.cluster_ops import candidate_scores, cluster_scores, select_clusters, weighted_rows

    G, Hg, D = q.shape
    C = slots.sizes.shape[1]
    Dv = slots.values.shape[1]
    dev = q.device
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    per_slot = isinstance(budget, SlotBudgets)
    bound = budget.bound if per_slot else budget
    if scores is None:
        int8 = slots.centroid_scale is not None
        scores = cluster_scores(q, slots.centroids if int8 else slots.centroids.to(q.dtype), slots.sizes, scale,
                                backend=backend, radii=slots.radii if bound.rank_radius else None,
                                rank_radius=bound.rank_radius, centroid_scale=slots.centroid_scale)
    s_cl, probs = scores
    s_cl = s_cl.to(dt)
    if _kernel_path(backend, q) and _fused_ready(q, slots, steady):
        return _wave_attend_fused(q, slots, steady, budget, bounds, scale, s_cl, probs, backend)
    # candidates and estimation zone: cuts of the rank order at the budgets' tokens
    B, E, T = (budget.candidates, budget.estimation, budget.tokens) if per_slot else (
        bound.candidates, bound.estimation, bound.tokens)
    k = bounds.clusters_for(bound.candidates + bound.estimation)
    r = bounds.clusters_for(bound.candidates)
    order = _rank_order(probs, k, backend)                                   # [G, k]
    sz = slots.sizes.gather(1, order)
    before = torch.cumsum(sz, 1) - sz                                        # tokens ranked ahead of each
    is_cand = (before < B) & (sz > 0)
    is_est = (before >= B) & (before < B + E) & (sz > 0)
    cand = order[:, :r]
    is_cand = is_cand[:, :r]
    start = slots.offsets.gather(1, cand)
    run_len = torch.where(is_cand, slots.offsets.gather(1, cand + 1) - start, 0)
    run_end = torch.cumsum(run_len, 1)
    run_pos = run_end - run_len
    run_row = start + slots.slot_base[:, None]
    width = bounds.rows_for(bound.candidates, r)
    s_tok, run_lse = candidate_scores(q, slots.keys, run_row, run_len, run_pos, width, scale, backend=backend,
                                      key_scale=slots.key_scale)
    valid = torch.isfinite(s_tok[:, 0])                                       # [G, width]
    lse_all = torch.logsumexp(run_lse, -1, keepdim=True)                      # [G, Hg, 1] over every candidate
    ref = torch.where(torch.isfinite(lse_all), lse_all, torch.zeros_like(lse_all))   # a reference point of exp
    # exact tokens: the t candidates of largest group weight
    t = min(bound.tokens, width)
    u = torch.where(valid, torch.exp(s_tok - ref).sum(1), torch.full_like(valid, -1.0, dtype=torch.float32))
    pick = select_clusters(u, t, 0, backend=backend)[0]                     # [G, t] positions, ascending
    picked = valid.gather(1, pick)
    if per_slot and t:
        # a slot with a smaller budget keeps its best T of the t picked
        up = u.gather(1, pick)
        rank = torch.argsort(torch.argsort(up, dim=1, descending=True, stable=True), dim=1)
        picked = picked & (rank < T)
    run_of_pick = torch.searchsorted(run_end, pick, right=True).clamp(max=max(r - 1, 0))
    rows = run_row.gather(1, run_of_pick) + pick - run_pos.gather(1, run_of_pick) if r else pick
    # part 1: the steady zone, attended exactly
    o_st, lse_st = _steady_part(q, steady, scale, backend, dt)
    # part 2: the exact tokens; their scores are known from stage 2, so only their values are read
    ref = ref.to(dt)
    w_pick = torch.exp(s_tok.gather(2, pick[:, None, :].expand(G, Hg, t)).to(dt) - ref) * picked[:, None, :]
    d_pick = w_pick.sum(-1)                                                   # [G, Hg]
    n_pick = weighted_rows(w_pick, torch.where(picked, rows, -1), slots.values, backend=backend)
    has_pick = d_pick > 0
    d_safe = torch.where(has_pick, d_pick, torch.ones_like(d_pick))
    o_pick = n_pick / d_safe[..., None]
    lse_pick = torch.where(has_pick, ref[..., 0] + torch.log(d_safe), torch.full_like(d_pick, -math.inf))
    # parts 3-5 (everything not attended exactly) as one mixture over the k ranked clusters and the rest:
    # entry j < r a candidate's unattended tokens (exact mass, mean value), an estimation-zone cluster's
    # calibrated mass, or nothing; entry k the rest (calibrated mass, the slot's mean value)
    est_logits = s_cl + torch.log(slots.sizes.to(dt))[:, None, :]            # [G, Hg, C] log estimated mass
    ke = est_logits.gather(2, order[:, None, :].expand(G, Hg, k))             # [G, Hg, k]
    offset = torch.zeros(G, Hg, 1, dtype=dt, device=dev)
    logits = torch.full((G, Hg, k + 1), -math.inf, dtype=dt, device=dev)
    in_zone = is_est.clone()
    in_zone[:, :r] |= is_cand
    if r:
        # the candidates' mass less their exact tokens' (all exact: the scores are known)
        w_run = torch.exp(run_lse.to(dt) - ref)                               # [G, Hg, r]
        w_un = w_run - torch.zeros_like(w_run).scatter_add_(2, run_of_pick[:, None, :].expand(G, Hg, t), w_pick)
        w_un = torch.where(w_un > 1e-5 * w_run, w_un, torch.zeros_like(w_un))  # float rounding of a fully read run
        logits[..., :r] = torch.log(w_un) + ref
        if bound.calibrate:
            # exact over estimated mass of the calibration clusters: the lower half of the candidates by rank
            n_cand = is_cand.sum(1, keepdim=True)
            cand_rank = torch.cumsum(is_cand.long(), 1) - 1                   # rank among the candidates
            low = (is_cand & (cand_rank >= n_cand // 2))[:, None, :].expand(G, Hg, r)
            off = _logsumexp_where(run_lse.to(dt), low) - _logsumexp_where(ke[..., :r], low)
            offset = torch.where(torch.isfinite(off), off, torch.zeros_like(off)).clamp(-8.0, 8.0)[..., None]
    if bound.estimation:
        logits[..., :k] = torch.where(is_est[:, None, :], ke + offset, logits[..., :k])
    if bound.rest and C:
        zone = torch.zeros(G, C, dtype=torch.bool, device=dev).scatter_(1, order, in_zone)
        logits[..., k] = _logsumexp_where(est_logits, ~zone[:, None, :]) + offset[..., 0]
    lse_mix = torch.logsumexp(logits, -1)                                    # [G, Hg]
    w_mix = torch.exp(logits - torch.where(torch.isfinite(lse_mix), lse_mix, torch.zeros_like(lse_mix))[..., None])
    mean_rows = torch.where(in_zone, order + torch.arange(G, device=dev)[:, None] * C, -1)
    o_mix = (weighted_rows(w_mix[..., :k], mean_rows, slots.mean_values.reshape(G * C, Dv),
                           backend=backend)
             + w_mix[..., k:] * slots.value_mean.to(dt)[:, None, :])
    o, lse = merge_partials([(o_st.to(dt), lse_st.to(dt)), (o_pick, lse_pick), (o_mix, lse_mix)])
    est_ids = torch.where(is_est, order, -1)
    cand_ids = torch.where(is_cand, cand, -1)
    return o, lse, WaveStep(cand_ids, est_ids, torch.where(picked, rows - slots.slot_base[:, None], -1), valid.sum(1))
