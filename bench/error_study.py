"""Where does the wave index's decode error come from? A CPU study of GpuWaveLayer's approximation.

Builds :class:`kvstore.gpu.wave_layer.GpuWaveLayer` (torch backend, on the CPU) over generated attention-like KV
(:mod:`kvstore.datasets.attention_like`, Llama-3-8B layout: 32 query heads, 8 KV heads, d = 128, bf16, batch 1)
and measures the output error ``||o - o_full|| / ||o_full||`` per query head (``o_full``: fp32 exact attention
over the same bf16 KV, as ``kvstore bench decode``) and the KV read fraction (the formula of
``GpuWaveLayer.stats()``) for variants of the method.

How: for every (query set, KV head) the script computes, from the layer's own state (cluster-sorted KV, offsets,
bf16 centroids, sizes, fp32 value sums, steady zone), the exact per-cluster partial attention (normaliser
``Z_c`` and numerator ``sum exp(s) v``) and the estimated one (``size * exp(q.c)`` and ``exp(q.c) * value_sum``).
A variant is then a choice of

* ranking: which score ranks the clusters (group-summed softmax over clusters, as the library):
  ``bf16`` (library: q . bf16 plain-mean centroid), ``f32`` (fp32 plain mean), ``normalised`` (spherical
  centroid: q . (head mean + rho * unit(mean - head mean)), rho = the head's mean centred key norm), ``size``
  (bf16 score + log size: the estimated cluster mass), ``varcorr`` (log size + q.mean + 1/2 scale^2
  q^T diag(var) q: log-normal mass estimate), ``oracle`` (true attention mass of the cluster, summed over the
  group's heads after per-head normalisation: separates ranking error from estimation error);
* estimation: ``none`` (e = 0), ``bf16`` (library: ``size * exp(q.c)``, a Jensen lower bound), ``f32``,
  ``normalised``, ``iso`` / ``diag`` (log-normal correction ``exp(1/2 sigma^2)``, ``sigma^2 = scale^2 q^T Sigma
  q`` with Sigma the cluster's isotropic / diagonal key variance), ``fs_iso`` / ``fs_diag`` (finite-sample
  correction ``g_n(sigma) = log mean_i exp(sigma z_i)`` over the n expected normal order statistics z of a
  cluster of n members: the log-normal term is the limit for infinitely many members and overshoots for wide
  clusters), and the oracles ``fs_true`` (g_n of the members' true score variance), ``oracle_mass`` (the
  cluster's true normaliser with its mean value) and ``exact`` (the estimation zone attended exactly);
* rest: optionally, the clusters past r + e also enter the normaliser (estimated like the zone) with the head's
  mean value (no value sums read);
* budgets (retrieval / estimation fractions, cluster counts by ``WaveGpuConfig.budgets``) and the build
  (tokens_per_cluster, kmeans_iters).

"FS" in the variant names is the proposed set: rank by ``fs_iso`` (log size + q.c + g_n of the isotropic
variance: 4 B more per cluster), estimate with ``fs_diag`` (a bf16 diagonal variance, D x 2 B, read for the
estimated clusters only), rest term with ``fs_iso``. Read fractions charge these extra bytes.

A calibration table compares, on the library's estimation-zone clusters, the measured log gap
``log(mean exp s) - mean s`` with the log-normal and finite-sample predictions.

The ``library`` row (defaults) is checked against ``GpuWaveLayer.decode`` itself (max |error difference| is
printed in the report). Errors are also split by how peaked a head's attention is (mass of its top 1% tokens:
flat < 0.5 <= mid < 0.9 <= peaked).

Example (about 6 minutes on 2 cores)::

    python bench/error_study.py --contexts 16K 32K 64K --query-sets 8 --seeds 0 1 \
        --out bench/results/error_study.md

Only imports from kvstore; changes nothing in it.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

from kvstore.benchmarks.decode import fmt_size, parse_size, reference_attention, relative_errors
from kvstore.datasets.attention_like import AttentionLikeSpec, decode_queries, generate_kv
from kvstore.gpu.wave_layer import GpuWaveLayer, WaveGpuConfig

RANKS = ("bf16", "f32", "normalised", "size", "varcorr", "iso", "fs_iso", "fs_diag", "oracle")
ESTS = ("none", "bf16", "f32", "normalised", "iso", "diag", "fs_iso", "fs_diag", "fs_true", "oracle_mass", "exact")
BINS = (("flat", 0.0, 0.5), ("mid", 0.5, 0.9), ("peaked", 0.9, 1.01))


@dataclass(frozen=True)
class Variant:
    name: str
    tpc: int = 16
    iters: int = 10
    retrieval: float = 0.018
    estimation: float = 0.232
    rank: str = "bf16"
    est: str = "bf16"
    rest: str | None = None     # estimate the dropped clusters too (normaliser + one mean value), this estimator
    rest_value: str = "head"    # that value: "head" (the head's mean value) or "dropped" (the dropped tokens' mean)
    note: str = ""

    @property
    def build(self) -> tuple[int, int]:
        return (self.tpc, self.iters)

    @property
    def oracle(self) -> bool:
        return self.rank == "oracle" or self.est in ("exact", "fs_true", "oracle_mass")


FS = dict(rank="fs_iso", est="fs_diag", rest="fs_iso")   # the proposed estimator set (see the docstring)
SUMMARY_ROWS = {"library", "no estimation (e=0)", "E exact", "E oracle mass", "oracle ranking", "r 3%", "r 5%",
                "e 50%", "tpc 8", "tpc 32", "kmeans 20 iters", "f32 centroids (rank+est)", "normalised rank, mean est",
                "normalised rank+est", "est log-normal iso", "est log-normal diag", "est fs-diag", "rank fs-iso",
                "rest term (plain)", "FS = rank fs-iso, est fs-diag, rest fs-iso", "FS, rest = dropped mean",
                "FS, tpc 8", "tpc 16, r 6%", "tpc 16, r 8%", "FS, tpc 16, r 4%, e 11.6%", "FS, tpc 16, r 5%, e 11.6%",
                "FS, tpc 24, r 4%, e 11.6%", "FS, tpc 24, r 5%, e 11.6%", "FS, tpc 24, r 6%, e 11.6%",
                "rank fs-iso + est fs-diag, tpc 24, r 5%, e 11.6%",
                "rank fs-iso + est log-normal iso + rest, tpc 24, r 5%, e 11.6%", "FS, tpc 32, r 6%, e 11.6%"}


def default_variants() -> list[Variant]:
    V = Variant
    out = [
        V("library", note="defaults: r 1.8%, e 23.2%, tpc 16, 10 iters, bf16 mean centroids"),
        # A. where the error comes from
        V("no estimation (e=0)", est="none"),
        V("E exact", est="exact", note="oracle: estimation zone attended exactly; only dropped clusters err"),
        V("E oracle mass", est="oracle_mass", note="oracle: true cluster normaliser with the cluster's mean value"),
        V("E fs-true-var", est="fs_true", note="oracle: finite-sample correction from the true score variance"),
        V("oracle ranking", rank="oracle", note="oracle: clusters picked by true mass"),
        V("oracle ranking, e=0", rank="oracle", est="none"),
        V("oracle ranking, E exact", rank="oracle", est="exact"),
        # B. defaults the brief asks about
        V("r 3%", retrieval=0.03),
        V("r 5%", retrieval=0.05),
        V("r 3%, e=0", retrieval=0.03, est="none"),
        V("r 5%, e=0", retrieval=0.05, est="none"),
        V("e 50%", estimation=0.5),
        V("tpc 8", tpc=8),
        V("tpc 32", tpc=32),
        V("kmeans 20 iters", iters=20),
        V("f32 centroids (rank+est)", rank="f32", est="f32"),
        V("normalised rank, mean est", rank="normalised", est="bf16"),
        V("normalised rank+est", rank="normalised", est="normalised"),
        # C. method changes, one at a time (defaults otherwise)
        V("est log-normal iso", est="iso"),
        V("est log-normal diag", est="diag"),
        V("est fs-iso", est="fs_iso"),
        V("est fs-diag", est="fs_diag"),
        V("rank size*exp", rank="size"),
        V("rank fs-iso", rank="fs_iso"),
        V("rest term (plain)", rest="bf16"),
        V("rank fs-iso, est fs-diag", rank="fs_iso", est="fs_diag"),
        V("FS = rank fs-iso, est fs-diag, rest fs-iso", **FS),
        V("FS, E exact", rank="fs_iso", est="exact", note="oracle"),
        V("FS, E oracle mass", rank="fs_iso", est="oracle_mass", rest="fs_iso", note="oracle"),
        V("FS, rest = dropped mean", rest_value="dropped", **FS),
        V("FS, tpc 8", tpc=8, **FS),
    ]
    # D. budget sweep: library estimator vs FS, tokens per cluster 16 / 24 / 32
    for tpc in (16, 24, 32):
        for r in (0.03, 0.04, 0.05, 0.06, 0.08):
            out.append(V(f"tpc {tpc}, r {100 * r:g}%", tpc=tpc, retrieval=r))
            for e in (0.116, 0.232):
                out.append(V(f"FS, tpc {tpc}, r {100 * r:g}%, e {100 * e:g}%", tpc=tpc, retrieval=r, estimation=e,
                             **FS))
    # E. ablation of FS at the budgets that meet the target: which part of it matters
    for tpc, r in ((16, 0.04), (24, 0.04), (24, 0.05)):
        b = dict(tpc=tpc, retrieval=r, estimation=0.116)
        tag = f"tpc {tpc}, r {100 * r:g}%, e 11.6%"
        out += [V(f"est fs-diag only, {tag}", est="fs_diag", **b),
                V(f"rank fs-iso + est fs-diag, {tag}", rank="fs_iso", est="fs_diag", **b),
                V(f"est log-normal iso only, {tag}", est="iso", **b),
                V(f"rank fs-iso + est log-normal iso + rest, {tag}", rank="fs_iso", est="iso", rest="fs_iso", **b)]
    # F. FS with the isotropic correction everywhere (one scalar variance a cluster: no per-dimension table)
    iso = dict(rank="fs_iso", est="fs_iso", rest="fs_iso")
    for tpc, r, e in ((16, 0.018, 0.232), (16, 0.04, 0.116), (16, 0.05, 0.116), (24, 0.05, 0.116),
                      (24, 0.06, 0.116), (16, 0.06, 0.116)):
        out.append(V(f"FS-iso, tpc {tpc}, r {100 * r:g}%, e {100 * e:g}%", tpc=tpc, retrieval=r, estimation=e, **iso))
    seen, uniq = set(), []
    for vv in out:
        key = (vv.tpc, vv.iters, vv.retrieval, vv.estimation, vv.rank, vv.est, vv.rest, vv.rest_value)
        if key not in seen:
            seen.add(key)
            uniq.append(vv)
    return uniq


# ----------------------------------------------------------------------------------------------- per-slot state
@dataclass
class Slot:
    """One KV head's index, in fp32 (from the layer's state)."""

    K: torch.Tensor          # [n, D] cluster-sorted keys
    V: torch.Tensor          # [n, Dv]
    cid: torch.Tensor        # [n] cluster of each sorted row
    Kst: torch.Tensor        # [S, D] steady zone
    Vst: torch.Tensor
    sizes: torch.Tensor      # [C]
    vsum: torch.Tensor       # [C, Dv]
    cen: dict = field(default_factory=dict)   # kind -> [C, D] ranking / estimation centroid
    var_diag: torch.Tensor | None = None      # [C, D]
    var_iso: torch.Tensor | None = None       # [C]


def slot_state(layer: GpuWaveLayer, g: int) -> Slot:
    n, C, D = layer.n, layer.C, layer.D
    K = layer.kv_k[g * n:(g + 1) * n].float()
    V = layer.kv_v[g * n:(g + 1) * n].float()
    off = layer.offsets[g]
    cnt = (off[1:] - off[:-1])
    cid = torch.repeat_interleave(torch.arange(C), cnt)
    sizes = layer.sizes[g].clone()
    ks = torch.zeros(C, D, dtype=torch.float64).index_add_(0, cid, K.double())
    k2 = torch.zeros(C, D, dtype=torch.float64).index_add_(0, cid, K.double() ** 2)
    sz = cnt.clamp_min(1).double()[:, None]
    mean = ks / sz
    var = (k2 / sz - mean ** 2).clamp_min(0)
    head_mean = K.double().mean(0)
    rho = (K.double() - head_mean).norm(dim=1).mean()
    u = mean - head_mean
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
    spherical = head_mean + rho * u
    cen = {"bf16": layer.centroid_values()[g], "f32": mean.float(), "normalised": spherical.float()}
    S = max(layer.steady_len)
    # the diagonal variance as a bf16 table (what the read fraction charges), the isotropic one in fp32
    return Slot(K, V, cid, layer.steady_k[g, :S].float(), layer.steady_v[g, :S].float(), sizes,
                layer.value_sums[g].clone(), cen, var.to(torch.bfloat16).float(), var.mean(1).float())


# ----------------------------------------------------------------------------------------------- evaluation
def _blom(n: int) -> torch.Tensor:
    """Expected standard-normal order statistics of a sample of n (Blom), re-standardised to mean 0 and
    population std 1 (n = 1: [0])."""
    if n <= 1:
        return torch.zeros(max(n, 1), dtype=torch.float64)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    b = torch.distributions.Normal(0.0, 1.0).icdf((i - 0.375) / (n + 0.25))
    b = b - b.mean()
    return b / b.pow(2).mean().sqrt()


class FiniteSampleCorrection:
    """g_n(sigma) = log mean_i exp(sigma z_i) for the n expected normal order statistics z (unit sample std):
    the log of a cluster's mean exp(score) over exp(mean score) when its n member scores are Gaussian with
    population std sigma. Replaces the log-normal sigma^2 / 2, which overshoots for wide clusters (it is the
    expectation over infinitely many members; a cluster's sum is dominated by its few largest members)."""

    def __init__(self, sizes: torch.Tensor):
        n = sizes.round().long().clamp_min(1)
        self.nmax = int(n.max())
        tab = torch.full((self.nmax + 1, self.nmax), -math.inf, dtype=torch.float64)
        for k in torch.unique(n).tolist():
            tab[k, :k] = _blom(k)
        self.z = tab[n].float()                                # [C, nmax], -inf pads
        self.logn = torch.log(n.float())

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:   # sigma [Hg, C] -> [Hg, C]
        x = sigma[..., None] * self.z[None]
        x = torch.where(torch.isfinite(self.z)[None], x, torch.full_like(x, -math.inf))
        return torch.logsumexp(x, -1) - self.logn[None]


def evaluate_slot(slot: Slot, qg: torch.Tensor, scale: float, variants: list[Variant], N: int,
                  check_o: torch.Tensor | None = None) -> dict:
    """All variants (of one build) on one KV head's query group qg [Hg, D] (fp32)."""
    Hg = qg.shape[0]
    C = slot.sizes.shape[0]
    live = slot.sizes > 0
    logsize = torch.log(slot.sizes.clamp_min(1e-30))[None]
    s_tok = (qg @ slot.K.T) * scale                          # [Hg, n]
    s_st = (qg @ slot.Kst.T) * scale                         # [Hg, S]
    m = torch.maximum(s_tok.amax(1), s_st.amax(1))           # [Hg]
    P = torch.exp(s_tok - m[:, None])
    Pst = torch.exp(s_st - m[:, None])
    Zc = torch.zeros(Hg, C).index_add_(1, slot.cid, P)       # [Hg, C]
    Nvc = torch.stack([torch.zeros(C, slot.V.shape[1]).index_add_(0, slot.cid, P[h, :, None] * slot.V)
                       for h in range(Hg)])                  # [Hg, C, Dv]
    Zst, Nvst = Pst.sum(1), Pst @ slot.Vst
    Zfull = Zst + Zc.sum(1)
    o_full = (Nvst + Nvc.sum(1)) / Zfull[:, None]
    probs_tok = torch.cat([P, Pst], 1) / Zfull[:, None]
    ntop = max(1, math.ceil(0.01 * N))
    top1 = probs_tok.topk(ntop, dim=1).values.sum(1)         # [Hg] top-1% mass
    mass_c = Zc / Zfull[:, None]                             # [Hg, C] true cluster mass
    vmean = slot.vsum.sum(0) / slot.sizes.sum()              # [Dv] the head's mean value (for "rest")

    cache: dict = {}

    def shat(kind: str) -> torch.Tensor:                     # [Hg, C] centroid scores
        if ("s", kind) not in cache:
            cache[("s", kind)] = (qg @ slot.cen[kind].T) * scale
        return cache[("s", kind)]

    def half_var(kind: str) -> torch.Tensor:                 # [Hg, C] 1/2 var of the member scores (model)
        if ("v", kind) not in cache:
            if kind == "true":                               # oracle: the members' actual score variance
                cnt = slot.sizes.clamp_min(1)[None]
                mu = torch.zeros(Hg, C).index_add_(1, slot.cid, s_tok) / cnt
                sq = torch.zeros(Hg, C).index_add_(1, slot.cid, s_tok ** 2) / cnt
                cache[("v", kind)] = 0.5 * (sq - mu ** 2).clamp_min(0)
            elif kind == "iso":
                cache[("v", kind)] = 0.5 * scale ** 2 * (qg ** 2).sum(1, keepdim=True) * slot.var_iso[None]
            else:
                cache[("v", kind)] = 0.5 * scale ** 2 * ((qg ** 2) @ slot.var_diag.T)
        return cache[("v", kind)]

    def corr(kind: str) -> torch.Tensor:                     # [Hg, C] log correction of size * exp(q.c)
        if kind in ("bf16", "f32", "normalised"):
            return torch.zeros(1, 1)
        if kind in ("iso", "diag"):
            return half_var(kind)
        if ("g", kind) not in cache:
            if "fsc" not in cache:
                cache["fsc"] = FiniteSampleCorrection(slot.sizes)
            cache[("g", kind)] = cache["fsc"]((2 * half_var(kind[3:])).sqrt())
        return cache[("g", kind)]

    def est_logw(kind: str) -> torch.Tensor:                 # [Hg, C] log of exp(score) per member, minus m
        if kind == "oracle_mass":                            # oracle: the cluster's true mean exp(score)
            return torch.log(Zc.clamp_min(1e-38) / slot.sizes.clamp_min(1)[None])
        base = kind if kind in ("f32", "normalised") else "bf16"
        return shat(base) + corr(kind) - m[:, None]

    def rank_probs(kind: str) -> torch.Tensor:               # [C]
        if kind == "oracle":
            return mass_c.sum(0)
        if kind in ("bf16", "f32", "normalised"):
            s = shat(kind)
        elif kind == "size":
            s = shat("bf16") + logsize
        elif kind == "varcorr":
            s = shat("f32") + logsize + corr("diag")
        elif kind in ("fs_iso", "fs_diag", "iso"):
            s = shat("bf16") + logsize + corr(kind)
        else:
            raise ValueError(kind)
        s = s.masked_fill(~live[None], -math.inf)
        return torch.softmax(s, dim=1).sum(0)

    out = {}
    for var in variants:
        cfg = WaveGpuConfig(retrieval=var.retrieval, estimation=var.estimation, tokens_per_cluster=var.tpc,
                            kmeans_iters=var.iters, backend="torch", cuda_graph=False)
        r, e = cfg.budgets(N, C)
        if var.est == "none":
            e = 0
        p = rank_probs(var.rank)
        order = torch.argsort(p, descending=True, stable=True)
        mR = torch.zeros(C)
        mR[order[:r]] = 1
        mE = torch.zeros(C)
        mE[order[r:r + e]] = 1
        num = Nvst + torch.einsum("c,hcd->hd", mR, Nvc)
        den = Zst + Zc @ mR
        est_mass = torch.zeros(Hg)
        if e:
            if var.est == "exact":
                num = num + torch.einsum("c,hcd->hd", mE, Nvc)
                den = den + Zc @ mE
                est_mass = Zc @ mE
            else:
                w = torch.exp(est_logw(var.est)) * (mE * live)[None]        # [Hg, C]
                num = num + w @ slot.vsum
                est_mass = w @ slot.sizes
                den = den + est_mass
        if var.rest:
            mD = (1 - mR - mE) * live
            w = torch.exp(est_logw(var.rest)) * mD[None]
            wm = w @ slot.sizes
            if var.rest_value == "dropped":
                # mean value of the dropped tokens = (all value sums - those of R and E) / their count: one stored
                # vector per head plus the value sums of R and E
                vdrop = (slot.vsum.sum(0) - (mR + mE) @ slot.vsum) / (mD @ slot.sizes).clamp_min(1)
            else:
                vdrop = vmean
            num = num + wm[:, None] * vdrop[None]
            den = den + wm
        o = num / den[:, None]
        err = (o - o_full).norm(dim=1) / o_full.norm(dim=1)
        tok_exact = float(slot.Kst.shape[0] + (slot.sizes * mR).sum())
        if var.est == "exact":
            tok_exact += float((slot.sizes * mE).sum())
        true_E = Zc @ mE
        out[var.name] = {
            "err": err, "top1": top1,
            "cover_exact": ((Zst + Zc @ mR) / Zfull),                       # true mass attended exactly
            "mass_E": true_E / Zfull,
            "est_ratio": torch.where(true_E > 0, est_mass / true_E.clamp_min(1e-38),
                                     torch.full_like(true_E, math.nan)),
            "tok_exact": tok_exact, "r": r, "e": e, "C": C,
        }
        if check_o is not None and var.name == "library":
            out[var.name]["check"] = float(((check_o - o_full).norm(dim=1) / o_full.norm(dim=1) - err).abs().max())
            # calibration of the estimators on the library's estimation-zone clusters (>= 2 members):
            # measured gap log(mean exp s) - mean s against 1/2 var (log-normal) and g_n (finite sample)
            cnt = slot.sizes.clamp_min(1)[None]
            mu_s = torch.zeros(Hg, C).index_add_(1, slot.cid, s_tok) / cnt
            gap = torch.log(Zc.clamp_min(1e-38) / cnt) + m[:, None] - mu_s
            sel = ((mE > 0) & (slot.sizes >= 2))[None].expand(Hg, C)
            cols = [half_var("true"), gap, corr("fs_true"), half_var("diag"), corr("fs_diag"), mass_c]
            out[var.name]["calib"] = torch.stack([c.expand(Hg, C)[sel] for c in cols], 1)
    return out


def read_fraction(v: Variant, tok_exact: float, C: int, r: int, e: int, N: int, D: int = 128, Dv: int = 128
                  ) -> float:
    """GpuWaveLayer.stats() formula per slot (exact tokens' K and V, every centroid + size, the estimated
    clusters' fp32 value sums) plus the variant's extra reads: fp32 centroids; a 4 B isotropic variance per
    estimated cluster (per cluster when ranking or the rest term use it); a bf16 diagonal variance (D x 2 B) per
    estimated cluster (per cluster when ranking uses it)."""
    uses = {v.rank, v.est, v.rest}
    cb = 4 if ("f32" in uses or "varcorr" in uses) else 2
    read = tok_exact * (D + Dv) * 2 + C * (D * cb + 4)
    if v.est not in ("none", "exact"):
        read += e * Dv * 4
    if v.rank in ("varcorr", "fs_diag"):
        read += C * D * 2
    elif v.est in ("diag", "fs_diag"):
        read += e * D * 2
    if v.rest and v.rest_value == "dropped":
        read += r * Dv * 4         # the retrieved clusters' value sums (E's are read anyway)
    if v.rank in ("iso", "fs_iso") or v.rest in ("iso", "fs_iso"):
        read += C * 4
    elif v.est in ("iso", "fs_iso"):
        read += e * 4
    return read / (N * (D + Dv) * 2)


# ----------------------------------------------------------------------------------------------- driver
def q(x: torch.Tensor, p: float) -> float:
    x = x[torch.isfinite(x)]
    return float(torch.quantile(x.double(), p)) if x.numel() else math.nan


def run_context(N: int, variants: list[Variant], sets: int, seeds: list[int], log) -> dict:
    spec = AttentionLikeSpec()
    Hkv, Hq, D = spec.num_kv_heads, spec.num_q_heads, spec.head_dim
    Hg, scale = Hq // Hkv, 1.0 / math.sqrt(D)
    res: dict = {vv.name: {"err": [], "top1": [], "cover_exact": [], "mass_E": [], "est_ratio": [], "tok": [],
                           "grp": [], "r": None, "e": None, "C": None} for vv in variants}
    res["_meta"] = {"build_s": {}, "check": []}
    builds = sorted({vv.build for vv in variants})
    t0 = time.perf_counter()
    for si, seed in enumerate(seeds):
        k, v = generate_kv(1, N, spec, seed=seed)
        qs = decode_queries(k, spec, num_sets=sets, seed=seed)            # [S, 1, Hq, D]
        for tpc, iters in builds:
            vs = [vv for vv in variants if vv.build == (tpc, iters)]
            cfg = WaveGpuConfig(tokens_per_cluster=tpc, kmeans_iters=iters, backend="torch", cuda_graph=False)
            t1 = time.perf_counter()
            layer = GpuWaveLayer.build(k, v, cfg, device="cpu")
            bkey = f"tpc{tpc}/it{iters}"
            res["_meta"]["build_s"][bkey] = res["_meta"]["build_s"].get(bkey, 0.0) + \
                (time.perf_counter() - t1) / len(seeds)
            slots = [slot_state(layer, g) for g in range(Hkv)]
            # the library's own decode output, to check the engine's "library" row against
            lib_o = [layer.decode(qs[s]).float()[0] if (tpc, iters) == (16, 10) else None for s in range(sets)]
            for s in range(sets):
                for g in range(Hkv):
                    qg = qs[s, 0, g * Hg:(g + 1) * Hg].float()
                    chk = None if lib_o[s] is None else lib_o[s][g * Hg:(g + 1) * Hg]
                    out = evaluate_slot(slots[g], qg, scale, vs, N, chk)
                    for name, o in out.items():
                        R = res[name]
                        for key in ("err", "top1", "cover_exact", "mass_E", "est_ratio"):
                            R[key].append(o[key])
                        R["tok"].append(o["tok_exact"])
                        R["grp"].append(torch.full((Hg,), si * sets + s))     # bootstrap unit: a query set
                        R["r"], R["e"], R["C"] = o["r"], o["e"], o["C"]
                        if "check" in o:
                            res["_meta"]["check"].append(o["check"])
                        if "calib" in o:
                            res["_meta"].setdefault("calib", []).append(o["calib"])
            if (tpc, iters) == (16, 10):
                # the engine's o_full is exact attention: compare the library output with decode.py's reference
                ref = reference_attention(qs[:1], k, v)
                res["_meta"].setdefault("lib_vs_reference_median", []).append(
                    float(relative_errors(lib_o[0][None], ref[0, 0][None]).median()))
            log(f"  {fmt_size(N)} seed {seed} tpc {tpc} iters {iters}: build {time.perf_counter() - t1:.1f}s "
                f"(with eval), {time.perf_counter() - t0:.0f}s so far")
            del layer, slots
    summary = {}
    for vv in variants:
        R = res[vv.name]
        err = torch.cat(R["err"])
        top1 = torch.cat(R["top1"])
        lo, hi = bootstrap_median_ci(err, torch.cat(R["grp"]))
        row = {"median": q(err, 0.5), "p90": q(err, 0.9), "p99": q(err, 0.99), "ci": (lo, hi),
               "read": read_fraction(vv, sum(R["tok"]) / len(R["tok"]), R["C"], R["r"], R["e"], N),
               "tok": sum(R["tok"]) / len(R["tok"]) / N,
               "cover": q(torch.cat(R["cover_exact"]), 0.5), "massE": q(torch.cat(R["mass_E"]), 0.5),
               "est_ratio": q(torch.cat(R["est_ratio"]), 0.5), "heads": int(err.numel()),
               "re": f"{R['r']} / {R['e']} ({R['C']})"}
        for bname, lo, hi in BINS:
            sel = (top1 >= lo) & (top1 < hi)
            row[f"med_{bname}"] = q(err[sel], 0.5) if bool(sel.any()) else math.nan
            row[f"n_{bname}"] = int(sel.sum())
        summary[vv.name] = row
    summary["_meta"] = res["_meta"]
    return summary


def bootstrap_median_ci(err: torch.Tensor, grp: torch.Tensor, reps: int = 1000, level: float = 0.9
                        ) -> tuple[float, float]:
    """Percentile bootstrap interval of the median error, resampling whole query sets (32 heads each, which
    share the KV and are correlated) with replacement; fixed generator seed."""
    ids = torch.unique(grp)
    if ids.numel() < 2:
        return math.nan, math.nan
    g = torch.Generator().manual_seed(1234)
    rows = [err[grp == i] for i in ids.tolist()]
    meds = []
    for _ in range(reps):
        pick = torch.randint(0, len(rows), (len(rows),), generator=g).tolist()
        meds.append(float(torch.cat([rows[j] for j in pick]).median()))
    m = torch.tensor(meds, dtype=torch.float64)
    return float(torch.quantile(m, (1 - level) / 2)), float(torch.quantile(m, (1 + level) / 2))


def fmt(x: float, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def report(results: dict, variants: list[Variant], args, cmd: str, seconds: float) -> str:
    lines = ["# Wave index decode error: where it comes from (CPU study)", "",
             f"Command: `{cmd}`", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
             f"python {platform.python_version()}; run time {seconds / 60:.1f} min.", "",
             "Data: `generate_kv` / `decode_queries` (Llama-3-8B layout, bf16, batch 1, seeds "
             f"{' '.join(map(str, args.seeds))}), {args.query_sets} query sets x 32 query heads per context and "
             "seed, pooled. "
             "Error = ||o - o_full|| / ||o_full|| per query head, o_full = fp32 exact attention over the same bf16 "
             "KV. read = KV bytes read per step over the full KV (GpuWaveLayer.stats() formula + the variant's extra "
             "reads); tok = exactly attended tokens / context; cover = median true attention mass attended exactly "
             "(steady + retrieval); mass E = median true mass in the estimation zone; est/true = median of "
             "(estimated mass of the estimation zone / its true mass); flat/mid/peaked = median error of heads whose "
             "top-1% tokens hold < 0.5 / 0.5-0.9 / >= 0.9 of the attention (head counts in the header). "
             "Rows marked *oracle* use the true attention and cannot be implemented; they split the error.", ""]
    Ns = list(results)
    head = "| variant | " + " | ".join(f"{fmt_size(N)} median [90% CI] / p99 / read" for N in Ns) + " |"
    lines += ["## Summary", "",
              "Key rows of the per-context tables below: median error [90% bootstrap interval, resampling query "
              "sets] / p99 error / read fraction.", "",
              head, "|---|" + "---|" * len(Ns)]
    for vv in variants:
        if vv.name not in SUMMARY_ROWS:
            continue
        cells = [f"{fmt(results[N][vv.name]['median'])} [{fmt(results[N][vv.name]['ci'][0])}, "
                 f"{fmt(results[N][vv.name]['ci'][1])}] / {fmt(results[N][vv.name]['p99'])} / "
                 f"{100 * results[N][vv.name]['read']:.2f}%" for N in Ns]
        lines.append(f"| {vv.name}{' *oracle*' if vv.oracle else ''} | " + " | ".join(cells) + " |")
    ok = []
    for vv in variants:
        if vv.oracle:
            continue
        meds = [results[N][vv.name]["median"] for N in Ns]
        if all(m <= args.target for m in meds):
            ok.append((max(results[N][vv.name]["read"] for N in Ns), vv.name, meds))
    ok.sort()
    lines += ["", f"Implementable variants with median <= {args.target} at every context, by worst-case read "
              "fraction (cheapest first):", "",
              "| variant | worst read | " + " | ".join(f"{fmt_size(N)} median" for N in Ns) + " |",
              "|---|---|" + "---|" * len(Ns)]
    for rd, name, meds in ok[:8]:
        lines.append(f"| {name} | {100 * rd:.2f}% | " + " | ".join(fmt(m) for m in meds) + " |")
    if not ok:
        lines.append("| (none) | | " + " | ".join("" for _ in Ns) + " |")
    lines.append("")
    calib = [torch.cat(r["_meta"]["calib"]) for r in results.values() if r["_meta"].get("calib")]
    if calib:
        X = torch.cat(calib)
        hv, gap, g_true, hv_diag, g_diag, mass = X.T
        lines += ["### Why the estimation zone is underestimated: calibration", "",
                  "Estimation-zone clusters (>= 2 members) of the library ranking, all contexts, seeds and query heads "
                  f"pooled ({X.shape[0]} cluster x head pairs), binned by half the true variance of the members' "
                  "scores s = q.k / sqrt(d). gap = log(mean exp s) - mean s: the log factor by which "
                  "size * exp(q.centroid) underestimates the cluster's normaliser (Jensen). Predictions of the gap: "
                  "log-normal 1/2 var; finite-sample g_n(sigma) with the true sigma; the same two with the variance "
                  "from the stored bf16 diagonal key variance (1/2 scale^2 q^T diag(var) q). Medians per bin; "
                  "mass = share of the pairs' true attention mass in the bin.", "",
                  "| 1/2 var(s) | pairs | mass | measured gap | log-normal 1/2 var | g_n(true sigma) | "
                  "1/2 var from diag | g_n(diag sigma) |", "|---|---|---|---|---|---|---|---|"]
        edges = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
        tot = float(mass.sum())
        for lo, hi in zip(edges[:-1], edges[1:]):
            b = (hv >= lo) & (hv < hi)
            if not bool(b.any()):
                continue
            lines.append(f"| [{lo:g}, {hi:g}) | {int(b.sum())} | {float(mass[b].sum()) / tot:.3f} | "
                         f"{fmt(q(gap[b], 0.5), 2)} | {fmt(q(hv[b], 0.5), 2)} | {fmt(q(g_true[b], 0.5), 2)} | "
                         f"{fmt(q(hv_diag[b], 0.5), 2)} | {fmt(q(g_diag[b], 0.5), 2)} |")
        lines.append("")
    for N, summ in results.items():
        meta = summ["_meta"]
        first = summ[variants[0].name]
        lines += [f"## {fmt_size(N)} tokens", "",
                  f"Builds (s): {', '.join(f'{k} {v:.1f}' for k, v in meta['build_s'].items())}. "
                  f"Engine vs `GpuWaveLayer.decode` (library row): max |error difference| "
                  f"{max(meta['check']) if meta['check'] else float('nan'):.2e} over {first['heads']} heads "
                  "(the library rounds o to bf16). "
                  f"`GpuWaveLayer.decode` vs `kvstore.benchmarks.decode.reference_attention`, median error of the "
                  f"first query set per seed: {', '.join(f'{x:.3f}' for x in meta.get('lib_vs_reference_median', []))}.",
                  "",
                  f"| variant | read | tok | r / e clusters (C) | median | p90 | p99 | flat ({first['n_flat']}) | "
                  f"mid ({first['n_mid']}) | peaked ({first['n_peaked']}) | cover | mass E | est/true |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for vv in variants:
            r = summ[vv.name]
            name = vv.name + (" *oracle*" if vv.oracle else "")
            lines.append(f"| {name} | {100 * r['read']:.2f}% | {100 * r['tok']:.2f}% | {r['re']} | "
                         f"{fmt(r['median'])} | {fmt(r['p90'])} | {fmt(r['p99'])} | {fmt(r['med_flat'])} | "
                         f"{fmt(r['med_mid'])} | {fmt(r['med_peaked'])} | {fmt(r['cover'])} | {fmt(r['massE'])} | "
                         f"{fmt(r['est_ratio'], 2)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--contexts", nargs="+", type=parse_size, default=[16384, 32768, 65536],
                    help="context lengths (e.g. 16K 32K 64K)")
    ap.add_argument("--query-sets", type=int, default=8, help="query sets per context (32 query heads each)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="data seeds (generate_kv / decode_queries); heads of all seeds are pooled")
    ap.add_argument("--target", type=float, default=0.05, help="median error target for the summary")
    ap.add_argument("--variants", nargs="*", default=None, help="only these variant names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="write the markdown report here (default: print only)")
    args = ap.parse_args(argv)
    variants = default_variants()
    if args.list:
        for vv in variants:
            print(f"{vv.name}: {vv}")
        return 0
    if args.variants:
        keep = set(args.variants)
        variants = [vv for vv in variants if vv.name in keep or vv.name == "library"]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = {}
    with torch.no_grad():
        for N in args.contexts:
            results[N] = run_context(N, variants, args.query_sets, args.seeds, log)
    seconds = time.perf_counter() - t0
    cmd = "python bench/error_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(results, variants, args, cmd, seconds)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
