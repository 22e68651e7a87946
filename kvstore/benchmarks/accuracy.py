"""Decode-attention accuracy of every method on real SmolLM2 traces, beside the oracle at equal bytes.

For each traced layer, a KVStore (one sequence, all KV heads) is prefilled
with the keys/values of the first ``N - test_tokens`` positions (and their
queries, which train the graph); decode queries of later positions then
attend to that context with each method and budget. Per configuration:

* output error ``||o - o_full|| / ||o_full||`` per query head (median, p99);
* the fraction of the KV bytes of full attention the step read (keys, values
  and index metadata read, against all keys and values), per KV head;
* the **oracle at equal bytes**: exact attention over the ``f * N`` keys with
  the highest true score, ``f`` the fraction that method read for that KV
  head at that step, the rest dropped. Two oracles: one set of keys shared by
  the GQA group (the union of its heads' best keys; the wave and graph
  methods share their reads the same way) and one per query head. The table
  gives each oracle's median error and the method's median over it;
* attention-mass recall: the exact softmax mass of the tokens attended exactly.

The plot shows error against bytes read for every method with the two
oracle curves. Writes ``accuracy_real.json``, ``.md`` and ``.png`` into the
output folder.
"""
from __future__ import annotations

import pathlib
import time
from typing import Any, Sequence

import numpy as np
import torch

from .._args import Parser
from ..attention.core import full_attention
from ..config import StoreConfig
from ..metrics import mass_recall, oracle_attention, output_error
from ..store import KVStore
from ._output import Results, add_out_argument, pyplot, save_plot

ORACLE_CURVE = (0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.2)   # fractions for the plot's oracle curves


def default_configs() -> list[tuple[str, StoreConfig]]:
    """(label, StoreConfig): the defaults of each method, the published RetroInfer budgets, and sweeps."""
    d = StoreConfig()
    out: list[tuple[str, StoreConfig]] = [("wave (defaults)", StoreConfig(method="wave")),
                                          ("wave candidate_dtype=kv", StoreConfig(method="wave", candidate_dtype="kv")),
                                          ("wave candidates=0.07 retrieval=0.02 candidate_dtype=kv",
                                           StoreConfig(method="wave", candidates=0.07, retrieval=0.02,
                                                       candidate_dtype="kv")),
                                          ("wave candidates=0.06 retrieval=0.02 estimation=0.1 centroid_dtype=kv "
                                           "candidate_dtype=kv",
                                           StoreConfig(method="wave", candidates=0.06, retrieval=0.02, estimation=0.1,
                                                       centroid_dtype="kv", candidate_dtype="kv")),
                                          ("wave RetroInfer budgets", StoreConfig.retroinfer())]
    for rr in (0.0, 0.1, 0.5):
        out.append((f"wave rank_radius={rr}", StoreConfig(method="wave", rank_radius=rr)))
    for c, r, e in ((0.05, 0.015, 0.1), (0.14, 0.04, 0.3), (0.2, 0.05, 0.4)):
        out.append((f"wave candidates={c} retrieval={r} estimation={e}",
                    StoreConfig(method="wave", candidates=c, retrieval=r, estimation=e)))
    out.append(("wave RetroInfer retrieval=0.05", StoreConfig.retroinfer(candidates=0.05)))
    full = dict(method="wave", candidates=1.0, retrieval=1.0, estimation=0)
    out.append(("wave full budgets (int8 key copies)", StoreConfig(**full)))
    out.append(("wave full budgets candidate_dtype=kv", StoreConfig(**full, candidate_dtype="kv")))
    out.append(("graph (defaults)", StoreConfig(method="graph")))
    for k in (50, 200):
        out.append((f"graph top_k={k}", StoreConfig(method="graph", top_k=k, ef=max(d.ef, k))))
    for p in (0.05, 0.1):
        out.append((f"quest pages={p}", StoreConfig(method="quest", pages=p)))
    for w in (512, 1024):
        out.append((f"streaming window={w}", StoreConfig(method="streaming", window=w)))
    return out


def evaluate_layer(k: torch.Tensor, v: torch.Tensor, q_prompt: torch.Tensor, q_test: torch.Tensor,
                   configs: Sequence[tuple[str, StoreConfig]]) -> dict[str, Any]:
    """k, v ``[Hkv, N, d]``; q_prompt ``[Hq, N, d]``; q_test ``[T, Hq, d]``.

    Returns per config label the per-(query, query head) errors, oracle errors (shared and per head) and mass
    recalls, and the per-(query, KV head) read fractions; under ``"oracle curve"`` the oracle errors at
    :data:`ORACLE_CURVE`.
    """
    Hkv, N, d = k.shape
    T, Hq, _ = q_test.shape
    G = Hq // Hkv
    kb, vb = k[None].float(), v[None].float()
    ref = full_attention(q_test.float()[None].permute(0, 2, 1, 3), kb, vb)[0][0]      # [Hq, T, dv]
    ref = ref.permute(1, 0, 2).reshape(T, Hkv, G, -1)
    qg = q_test.reshape(T, Hkv, G, d)
    res: dict[str, Any] = {}
    for label, cfg in configs:
        store = KVStore(1, Hkv, d, cfg)
        store.prefill(0, kb, vb, q=q_prompt.float()[None])
        out = {"errors": [], "oracle_shared": [], "oracle_per_head": [], "mass_recall": [], "read_fraction": [],
               "method": cfg.method}
        for t in range(T):
            o, _, access = store.attend_with_lse(0, q_test[t].float()[None, :, None, :])
            o = o[0, :, 0].reshape(Hkv, G, -1)
            frac = torch.tensor([a.elems(d, d) / (N * 2 * d) for a in access[0]], dtype=torch.float64)
            out["errors"] += output_error(o, ref[t]).flatten().tolist()
            for key, shared in (("oracle_shared", True), ("oracle_per_head", False)):
                oo = oracle_attention(qg[t], k, v, frac, shared=shared)
                out[key] += output_error(oo, ref[t]).flatten().tolist()
            out["mass_recall"] += mass_recall(qg[t], k, [a.exact_positions for a in access[0]]).flatten().tolist()
            out["read_fraction"] += frac.tolist()
        res[label] = out
    curve: dict[str, dict[str, list[float]]] = {}
    for f in ORACLE_CURVE:
        c = curve.setdefault(str(f), {"oracle_shared": [], "oracle_per_head": []})
        for t in range(T):
            for key, shared in (("oracle_shared", True), ("oracle_per_head", False)):
                c[key] += output_error(oracle_attention(qg[t], k, v, f, shared=shared), ref[t]).flatten().tolist()
    res["oracle curve"] = curve
    return res


def summarize(per_layer: dict[str, dict], labels: Sequence[str]) -> dict[str, dict]:
    """Medians and p99s per configuration over every layer, plus the oracle curves."""
    def cat(lab: str, key: str) -> np.ndarray:
        return np.concatenate([np.asarray(per_layer[L][lab][key], dtype=np.float64) for L in per_layer])

    out: dict[str, dict] = {}
    for lab in labels:
        err, osh, oph = cat(lab, "errors"), cat(lab, "oracle_shared"), cat(lab, "oracle_per_head")
        out[lab] = {"method": next(iter(per_layer.values()))[lab]["method"],
                    "error_median": float(np.median(err)), "error_p99": float(np.percentile(err, 99)),
                    "oracle_shared_median": float(np.median(osh)), "oracle_shared_p99": float(np.percentile(osh, 99)),
                    "oracle_per_head_median": float(np.median(oph)),
                    "oracle_per_head_p99": float(np.percentile(oph, 99)),
                    "ratio_to_oracle_shared": float(np.median(err) / max(np.median(osh), 1e-12)),
                    "ratio_to_oracle_per_head": float(np.median(err) / max(np.median(oph), 1e-12)),
                    "mass_recall_mean": float(cat(lab, "mass_recall").mean()),
                    "read_fraction_mean": float(cat(lab, "read_fraction").mean()),
                    "read_fraction_max": float(cat(lab, "read_fraction").max()),
                    "samples": int(err.size)}
    curve = {}
    for f in ORACLE_CURVE:
        vals = {key: np.concatenate([per_layer[L]["oracle curve"][str(f)][key] for L in per_layer])
                for key in ("oracle_shared", "oracle_per_head")}
        curve[str(f)] = {f"{key}_{stat}": float(fn(x)) for key, x in vals.items()
                         for stat, fn in (("median", np.median), ("p99", lambda y: np.percentile(y, 99)))}
    out["oracle curve"] = curve
    return out


def table(summary: dict[str, dict], title: str) -> str:
    lines = [f"### {title}", "",
             "| method, budget | KV read | error median | error p99 | oracle (group) median | x oracle (group) "
             "| oracle (per head) median | x oracle (per head) | attention-mass recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lab, s in summary.items():
        if lab == "oracle curve":
            continue
        lines.append(f"| {lab} | {100 * s['read_fraction_mean']:.2f}% | {s['error_median']:.4f} | "
                     f"{s['error_p99']:.4f} | {s['oracle_shared_median']:.4f} | {s['ratio_to_oracle_shared']:.2f} | "
                     f"{s['oracle_per_head_median']:.4f} | {s['ratio_to_oracle_per_head']:.2f} | "
                     f"{s['mass_recall_mean']:.3f} |")
    lines += ["", "Oracle at a fixed fraction of the KV read (median / p99):", "",
              "| KV read | oracle (group) | oracle (per head) |", "|---|---|---|"]
    for f, c in summary["oracle curve"].items():
        lines.append(f"| {100 * float(f):.0f}% | {c['oracle_shared_median']:.4f} / {c['oracle_shared_p99']:.4f} | "
                     f"{c['oracle_per_head_median']:.4f} / {c['oracle_per_head_p99']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict], title: str, path: pathlib.Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = {k: v for k, v in summary.items() if k != "oracle curve"}
    curve = summary["oracle curve"]
    fr = [100 * float(f) for f in curve]
    for key, style in (("oracle_shared", "k--"), ("oracle_per_head", "k:")):
        axes[0].plot(fr, [c[f"{key}_median"] for c in curve.values()], style, label=key.replace("_", " "))
        axes[1].plot(fr, [c[f"{key}_p99"] for c in curve.values()], style, label=key.replace("_", " "))
    for method in dict.fromkeys(s["method"] for s in rows.values()):
        pts = sorted((s["read_fraction_mean"], s["error_median"], s["error_p99"])
                     for s in rows.values() if s["method"] == method)
        x = [100 * p[0] for p in pts]
        axes[0].plot(x, [p[1] for p in pts], marker="o", label=method)
        axes[1].plot(x, [p[2] for p in pts], marker="o", label=method)
    for ax, name in zip(axes, ("median", "p99")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("KV bytes read per step (% of full attention)")
        ax.set_ylabel(f"output error ({name})")
        ax.axvline(10, color="grey", lw=0.6, ls="--")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    save_plot(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="kvstore bench accuracy", description=__doc__)
    p.add_argument("--tokens", type=int, default=8192, help="context captured (default 8192)")
    p.add_argument("--test-tokens", type=int, default=1024, help="last positions whose queries decode")
    p.add_argument("--queries", type=int, default=32, help="decode positions sampled per layer (default 32)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layers (default: all 30)")
    p.add_argument("--methods", nargs="+", default=None, choices=sorted({c[1].method for c in default_configs()}),
                   help="subset of methods (default: all)")
    add_out_argument(p, "accuracy")
    p.add_argument("--cache-dir", default=None, help="trace cache folder")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from ..datasets.traces import capture_traces, load_traces

    layers = list(range(30)) if a.layers is None else a.layers
    trace = load_traces(capture_traces(num_tokens=a.tokens, cache_dir=a.cache_dir, layers=tuple(layers)))
    configs = [c for c in default_configs() if a.methods is None or c[1].method in a.methods]
    n_ctx = trace.num_tokens - a.test_tokens
    rng = np.random.default_rng(a.seed)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    t0 = time.perf_counter()
    per_layer = {}
    for layer in tqdm(layers, desc="accuracy", unit="layer"):
        q = torch.from_numpy(trace.q[layer].astype(np.float32))  # [Hq, N, d]
        k = torch.from_numpy(trace.k[layer].astype(np.float32))
        v = torch.from_numpy(trace.v[layer].astype(np.float32))
        pos = np.sort(rng.choice(np.arange(n_ctx, trace.num_tokens), a.queries, replace=False))
        per_layer[f"L{layer}"] = evaluate_layer(k[:, :n_ctx], v[:, :n_ctx], q[:, :n_ctx],
                                                q[:, pos].permute(1, 0, 2), configs)
    summary = summarize(per_layer, [c[0] for c in configs])
    title = (f"SmolLM2-135M decode attention, {n_ctx} tokens of context, {len(layers)} layers x "
             f"{trace.num_kv_heads} KV heads, {a.queries} decode queries per layer")
    results = Results("accuracy", a.out)
    doc = {"title": title, "seconds": time.perf_counter() - t0, "context_tokens": n_ctx,
           "configs": {lab: cfg.to_dict() for lab, cfg in configs}, "summary": summary}
    results.write_json("accuracy_real.json", doc)
    md = table(summary, title)
    results.write_text("accuracy_real.md", md)
    results.plot("accuracy_real.png", lambda path: plot(summary, title, path))
    print(md)
    results.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
