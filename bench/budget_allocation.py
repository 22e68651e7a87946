"""Could per-KV-head budgets lower the wave step's tail error at the same mean bytes read?

On the SmolLM2 traces (all 30 layers x 3 KV heads, the first ``--queries`` of the accuracy benchmark's decode
positions, 7168 tokens of context), the wave defaults run with their three budgets (candidates, retrieval,
estimation) scaled by each of ``--scales``; every (layer, decode query, KV head) "slot" records its KV read and the
output error of its query heads at every scale. Then, at the mean read of the unscaled defaults:

* uniform: every slot at one scale (the defaults are scale 1);
* best allocation: each slot at the smallest scale whose worst query-head error is below a threshold, the
  threshold set so that the mean read equals the defaults' (it knows the errors: an upper bound on what any
  per-slot allocation among these scales reaches);
* allocation by a predictor x: scale proportional to (x / median x) ** alpha, rounded to the nearest scale, times
  one factor set so that the mean read equals the defaults'. Predictors: ``centroid entropy`` (the largest
  entropy over the group's query heads of the cluster distribution the step estimates from centroids and sizes:
  known to the step before it reads any key), ``exact entropy`` and ``exact top-3% miss`` (1 - the attention mass
  of each head's best 3% of keys, mean over the group; they need every key's score, so no step could use them).

    python bench/budget_allocation.py --queries 16

Writes budget_allocation.json (every slot) into --out and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import numpy as np


def _predictors(q, k, heads, G: int) -> dict[str, np.ndarray]:
    """Per KV head: the predictors of the module docstring for one decode query q [Hq, d] over k [Hkv, N, d]."""
    import torch

    Hkv, N, d = k.shape
    qh = q.double().reshape(Hkv, G, d)
    pr = torch.softmax(torch.einsum("hgd,hnd->hgn", qh, k.double()) / math.sqrt(d), -1)
    top = torch.topk(pr, max(1, int(0.03 * N)), dim=-1).values.sum(-1)           # [Hkv, G]
    ent = -(pr * torch.log(pr.clamp_min(1e-300))).sum(-1)
    cen_ent = []
    for h in range(Hkv):
        ix = heads[h].index
        lg = qh[h] @ ix.centroids.double().T / math.sqrt(d) + torch.log(ix.sizes.double().clamp_min(1e-30))
        pc = torch.softmax(lg, -1)
        cen_ent.append(float((-(pc * torch.log(pc.clamp_min(1e-300))).sum(-1)).max()))
    return {"centroid entropy": np.array(cen_ent), "exact entropy": ent.max(-1).values.numpy(),
            "exact top-3% miss": (1 - top).mean(-1).numpy()}


def run(queries: int, scales: list[float], progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm

    from kvstore import KVStore, StoreConfig
    from kvstore.attention.core import full_attention
    from kvstore.datasets.traces import capture_traces, load_traces
    from kvstore.metrics import output_error

    trace = load_traces(capture_traces(num_tokens=8192, layers=tuple(range(30))))
    n_ctx = trace.num_tokens - 1024
    rng = np.random.default_rng(0)   # the accuracy benchmark's draws: its first `queries` positions of each layer
    base = StoreConfig()
    slots: list[dict] = []
    for layer in tqdm(range(30), desc="layers", unit="layer", disable=not progress):
        q = torch.from_numpy(trace.q[layer].astype(np.float32))
        k = torch.from_numpy(trace.k[layer].astype(np.float32))[:, :n_ctx]
        v = torch.from_numpy(trace.v[layer].astype(np.float32))[:, :n_ctx]
        pos = np.sort(rng.choice(np.arange(n_ctx, trace.num_tokens), 32, replace=False))[:queries]
        Hkv, N, d = k.shape
        G = q.shape[0] // Hkv
        qt = q[:, pos].permute(1, 0, 2)                                                 # [T, Hq, d]
        ref = full_attention(qt[None].permute(0, 2, 1, 3), k[None], v[None])[0][0]
        ref = ref.permute(1, 0, 2).reshape(len(pos), Hkv, G, -1)
        rows = [[{"layer": layer, "query": t, "kv_head": h, "read": {}, "errors": {}} for h in range(Hkv)]
                for t in range(len(pos))]
        for s in scales:
            cfg = StoreConfig(candidates=base.candidates * s, retrieval=base.retrieval * s,
                              estimation=base.estimation * s)
            store = KVStore(1, Hkv, d, cfg)
            store.prefill(0, k[None], v[None], q=q[:, :n_ctx][None])
            for t in range(len(pos)):
                o, _, access = store.attend_with_lse(0, qt[t][None, :, None, :])
                err = output_error(o[0, :, 0].reshape(Hkv, G, -1), ref[t])
                for h in range(Hkv):
                    rows[t][h]["read"][str(s)] = access[0][h].elems(d, d) / (N * 2 * d)
                    rows[t][h]["errors"][str(s)] = err[h].tolist()
            if s == 1.0:
                heads = store.layer_cache(0).heads[0]
                for t in range(len(pos)):
                    for name, x in _predictors(qt[t], k, heads, G).items():
                        for h in range(Hkv):
                            rows[t][h].setdefault("predictors", {})[name] = float(x[h])
        slots += [r for row in rows for r in row]
    return {"queries": queries, "scales": scales, "context_tokens": n_ctx, "slots": slots}


def _stats(R: np.ndarray, E: np.ndarray, choice: np.ndarray) -> tuple[float, float, float]:
    idx = np.arange(R.shape[0])
    e = E[idx, choice].ravel()
    return float(R[idx, choice].mean()), float(np.median(e)), float(np.percentile(e, 99))


def analyse(doc: dict) -> list[tuple[str, float, float, float]]:
    """Rows (allocation, mean read, error median, error p99) at the defaults' mean read."""
    scales = doc["scales"]
    sv = np.array(scales, dtype=np.float64)
    keys = [str(s) for s in scales]
    R = np.array([[sl["read"][c] for c in keys] for sl in doc["slots"]])
    E = np.array([[sl["errors"][c] for c in keys] for sl in doc["slots"]])
    i1 = scales.index(1.0)
    target = R[:, i1].mean()
    out = [(f"uniform x{s:g}", *_stats(R, E, np.full(len(R), i))) for i, s in enumerate(scales)]
    worst = E.max(2)

    def by_threshold(tau: float) -> np.ndarray:
        ok = worst <= tau
        return np.where(ok.any(1), ok.argmax(1), worst.argmin(1))

    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _stats(R, E, by_threshold(mid))[0] > target else (lo, mid)
    out.append(("best allocation (knows the errors)", *_stats(R, E, by_threshold(hi))))
    for name in doc["slots"][0]["predictors"]:
        x = np.array([sl["predictors"][name] for sl in doc["slots"]])
        for alpha in (0.5, 1.0, 2.0):
            rel = (x / np.median(x)) ** alpha

            def nearest(f: float) -> np.ndarray:
                return np.abs(np.log(np.clip(rel * f, sv[0], sv[-1]))[:, None] - np.log(sv)[None]).argmin(1)

            lo, hi = 0.01, 100.0
            for _ in range(50):
                mid = math.sqrt(lo * hi)
                lo, hi = (lo, mid) if _stats(R, E, nearest(mid))[0] > target else (mid, hi)
            out.append((f"by {name}, alpha {alpha:g}", *_stats(R, E, nearest(lo))))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=16, help="decode queries a layer (at most 32)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0],
                   help="factors of the three budgets (must include 1)")
    p.add_argument("--out", default="kvstore-results/budget_allocation")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if 1.0 not in a.scales:
        p.error("--scales must include 1")
    if not 1 <= a.queries <= 32:
        p.error("--queries must be in 1..32")
    t0 = time.time()
    doc = run(a.queries, sorted(a.scales), progress=not a.no_progress)
    doc["seconds"] = time.time() - t0
    doc["table"] = analyse(doc)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for sl in doc["slots"]:  # five significant digits: the file stays small
        sl["read"] = {c: float(f"{x:.5g}") for c, x in sl["read"].items()}
        sl["errors"] = {c: [float(f"{e:.5g}") for e in x] for c, x in sl["errors"].items()}
        sl["predictors"] = {c: float(f"{x:.5g}") for c, x in sl["predictors"].items()}
    (out / "budget_allocation.json").write_text(json.dumps(doc, separators=(",", ":")))
    print("| allocation | KV read | error median | error p99 |\n|---|---|---|---|")
    for name, r, m, p99 in doc["table"]:
        print(f"| {name} | {r:.2%} | {m:.4f} | {p99:.4f} |")
    print(f"wrote {out / 'budget_allocation.json'} ({doc['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
