"""Recall against keys scanned, for every index, on real and generated data.

For each dataset (the heads of real SmolLM2 traces, or one generated OOD set), each index is built once per
head, then its search knob is swept (``ef`` for the graph and HNSW, ``nprobe`` for IVF, ``n_probe`` for the wave
index); each point records recall@k and the mean fraction of the keys scanned. Writes into the output folder:

- ``recall_<dataset>.json``: every point of every sweep, build times, the machine;
- ``recall_<dataset>.md``: the scanned fraction each index needs for recall 0.9 and 0.95 (median over heads);
- ``recall_<dataset>.png``: recall against scanned fraction (log x), one panel per k.

Real traces are captured once with the SmolLM2 model and cached (``~/.cache/kvstore/traces`` or
``$KVSTORE_CACHE``); test queries are the last positions' queries and never train an index.
"""
from __future__ import annotations

import pathlib
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .._args import Parser, positive_int
from ..exact import exact_topk
from ..factory import index_factory
from ..metrics import recall_at_k
from ._output import Results, add_out_argument, pyplot, save_plot

KS = (10, 32, 100)
TARGETS = (0.9, 0.95)


@dataclass
class Method:
    """An index description for ``index_factory`` plus its knob and sweep.

    ``uses_train_queries``: build with ``(keys, train_queries)``; False builds
    with the keys alone (e.g. the wave index, whose second argument is values).
    """

    name: str
    factory: str
    knob: str
    values: Sequence[int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    uses_train_queries: bool = True


def default_methods(n_keys: int) -> list[Method]:
    # IVF lists ~ sqrt(N) up to faiss' usual 4*sqrt(N), at least 39 points per list.
    nlist = int(min(max(16, 2 * np.sqrt(n_keys)), n_keys // 39, 8192))
    nlist = max(1, 1 << int(np.log2(max(nlist, 1))))
    ivf_probes = [p for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256) if p <= nlist]
    n_clusters = max(1, round(n_keys / 16))  # the wave index's cluster count (about)
    wave_probes = sorted({min(p, n_clusters) for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)})
    return [
        Method("Graph32", "Graph32", "ef", (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024),
               {"progress": False}),
        Method(f"IVF{nlist}", f"IVF{nlist},Flat", "nprobe", ivf_probes),
        Method("HNSW32", "HNSW32", "ef", (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)),
        Method("Wave16", "Wave16", "n_probe", wave_probes, uses_train_queries=False),
    ]


@dataclass
class Head:
    """One search problem: keys ``[N, d]``, training and held-out test queries."""

    name: str
    keys: np.ndarray
    train: np.ndarray
    test: np.ndarray


def real_heads(num_tokens: int, layers: Sequence[int] | None, max_test: int, cache_dir: str | None) -> Iterator[Head]:
    """Heads of real SmolLM2 traces (captured once, cached outside git)."""
    from ..datasets.traces import capture_traces, head_split, load_traces

    kw = {} if layers is None else {"layers": tuple(layers)}
    trace = load_traces(capture_traces(num_tokens=num_tokens, cache_dir=cache_dir, **kw))
    for layer in trace.layers:
        for h in range(trace.num_kv_heads):
            keys, train, test = head_split(trace, layer, h, max_test=max_test)
            yield Head(f"L{layer}H{h}", keys, train, test)


def generated_heads(n_keys: int, n_train: int, n_test: int, dim: int, seed: int) -> Iterator[Head]:
    from ..datasets.synthetic import ood_dataset

    keys, train, test = ood_dataset(n_keys, n_train, n_test, dim=dim, seed=seed)
    yield Head(f"ood{n_keys}", keys, train, test)


def sweep_head(head: Head, methods: Sequence[Method], ks: Sequence[int], log: Callable[[str], None],
               steps: "Steps | None" = None) -> dict:
    """Build each index over one head and sweep its knob for every k (``steps`` shows each build and sweep)."""
    n = head.keys.shape[0]
    gt_d, _ = exact_topk(head.test, head.keys, max(ks))
    out: dict[str, Any] = {"n_keys": n, "n_train": int(head.train.shape[0]), "n_test": int(head.test.shape[0]),
                           "methods": {}}
    for m in methods:
        if steps is not None:
            steps.begin(f"{head.name} {m.name}: build")
        t0 = time.perf_counter()
        index = index_factory(head.keys.shape[1], m.factory, **m.kwargs)
        if m.uses_train_queries:
            index.build(head.keys, head.train)
        else:
            index.build(head.keys)
        build_s = time.perf_counter() - t0
        if steps is not None:
            steps.begin(f"{head.name} {m.name}: search")
        curves: dict[str, list[dict]] = {}
        for k in ks:
            points = []
            for v in m.values:
                t1 = time.perf_counter()
                _, I, scanned = index.search_with_stats(head.test, k, **{m.knob: v})
                dt = time.perf_counter() - t1
                rec = recall_at_k(I, head.test, head.keys, k, gt_scores=gt_d)
                points.append({m.knob: v, "recall": float(rec.mean()), "scanned": float(scanned.mean() / n),
                               "search_ms_per_query": 1e3 * dt / head.test.shape[0]})
            curves[str(k)] = points
        out["methods"][m.name] = {"build_seconds": build_s, "keys_per_second": n / build_s, "curves": curves}
        log(f"  {head.name} {m.name}: built in {build_s:.1f}s; "
            + ", ".join(f"recall@{k} max {max(p['recall'] for p in curves[str(k)]):.3f}" for k in ks))
        if steps is not None:
            steps.end()
    return out


class Steps:
    """A progress bar over (head, index) steps whose label names the step running now (tqdm when installed,
    else one printed line a step)."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True) -> None:
        self.enabled = enabled
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with the bench extra
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=desc, unit="index", disable=not enabled)

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def begin(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label)
        elif self.enabled:
            print(f"{label} ...", flush=True)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def scan_needed(points: Sequence[dict], target: float) -> float | None:
    """Smallest scanned fraction reaching ``target`` recall, interpolated
    linearly between sweep points (None when the sweep never reaches it)."""
    pts = sorted(points, key=lambda p: p["scanned"])
    prev = None
    for p in pts:
        if p["recall"] >= target:
            if prev is None or prev["recall"] >= p["recall"]:
                return p["scanned"]
            t = (target - prev["recall"]) / (p["recall"] - prev["recall"])
            return prev["scanned"] + t * (p["scanned"] - prev["scanned"])
        prev = p
    return None


def summarize(heads: dict[str, dict], ks: Sequence[int]) -> dict:
    """Median over heads of the scan needed per (method, k, target) and of curve points."""
    methods = list(next(iter(heads.values()))["methods"])
    summary: dict[str, Any] = {}
    for m in methods:
        per_k = {}
        for k in ks:
            entry = {}
            for target in TARGETS:
                need = [scan_needed(h["methods"][m]["curves"][str(k)], target) for h in heads.values()]
                reached = [x for x in need if x is not None]
                # A head that never reaches the target counts as needing everything.
                full = sorted(x if x is not None else float("inf") for x in need)
                med = float(np.median(full)) if full else None
                entry[str(target)] = {"median": med if med is not None and np.isfinite(med) else None,
                                      "heads_reaching": len(reached), "heads": len(need)}
            curves = [h["methods"][m]["curves"][str(k)] for h in heads.values()]
            entry["curve"] = [{"recall": float(np.median([c[i]["recall"] for c in curves])),
                               "scanned": float(np.median([c[i]["scanned"] for c in curves]))}
                              for i in range(len(curves[0]))]
            per_k[str(k)] = entry
        builds = [h["methods"][m]["keys_per_second"] for h in heads.values()]
        summary[m] = {"by_k": per_k, "median_keys_per_second": float(np.median(builds)),
                      "median_build_seconds": float(np.median([h["methods"][m]["build_seconds"]
                                                               for h in heads.values()]))}
    return summary


def table(summary: dict, ks: Sequence[int], title: str) -> str:
    lines = [f"### {title}", "",
             "Scanned fraction of the keys needed for a recall (median over heads; — = not reached in the sweep)",
             "", "| index | " + " | ".join(f"recall@{k} ≥ {t}" for k in ks for t in TARGETS) + " | build keys/s |",
             "|---" * (1 + len(ks) * len(TARGETS) + 1) + "|"]
    for m, s in summary.items():
        cells = []
        for k in ks:
            for t in TARGETS:
                v = s["by_k"][str(k)][str(t)]["median"]
                cells.append("—" if v is None else f"{100 * v:.2f}%")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {s['median_keys_per_second']:,.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, ks: Sequence[int], title: str, path: pathlib.Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), sharey=True)
    for ax, k in zip(np.atleast_1d(axes), ks):
        for m, s in summary.items():
            c = s["by_k"][str(k)]["curve"]
            ax.plot([p["scanned"] for p in c], [p["recall"] for p in c], marker="o", ms=3, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("scanned fraction of keys (log)")
        ax.set_title(f"recall@{k}")
        ax.grid(True, which="both", alpha=0.3)
        for t in TARGETS:
            ax.axhline(t, color="grey", lw=0.6, ls="--")
    np.atleast_1d(axes)[0].set_ylabel("recall (median over heads)")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle(title)
    save_plot(fig, path)


def run(dataset: str, heads: Iterator[Head], n_heads: int, results: Results, ks: Sequence[int],
        methods: Callable[[int], list[Method]], title: str, progress: bool = True) -> dict:
    """Sweep every head; write ``recall_<dataset>.{json,md,png}`` into ``results``; return the JSON document."""
    steps: Steps | None = None
    results_by_head: dict[str, dict] = {}
    t0 = time.perf_counter()
    for head in heads:
        ms = methods(head.keys.shape[0])
        if steps is None:
            steps = Steps(n_heads * len(ms), f"recall {dataset}", progress)
        results_by_head[head.name] = sweep_head(head, ms, ks, steps.log, steps)
    if steps is not None:
        steps.close()
    summary = summarize(results_by_head, ks)
    doc = {"dataset": dataset, "title": title, "ks": list(ks), "targets": list(TARGETS),
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpu_threads": _threads()},
           "seconds": time.perf_counter() - t0, "summary": summary, "heads": results_by_head}
    results.write_json(f"recall_{dataset}.json", doc)
    md = table(summary, ks, title)
    results.write_text(f"recall_{dataset}.md", md)
    results.plot(f"recall_{dataset}.png", lambda path: plot(summary, ks, title, path))
    print(md)
    return doc


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _selects(word: str, name: str) -> bool:
    """``--indexes`` word ``word`` picks index ``name``: a prefix of it, or any IVF for a word starting with IVF
    (the IVF list count follows the data size)."""
    return name.lower().startswith(word.lower()) or (name.startswith("IVF") and word.upper().startswith("IVF"))


def index_names() -> list[str]:
    """The names ``--indexes`` accepts (IVF without its list count)."""
    return [m.name.rstrip("0123456789") if m.name.startswith("IVF") else m.name for m in default_methods(1 << 16)]


def build_parser() -> Parser:
    p = Parser(prog="kvstore bench recall", description=__doc__)
    p.add_argument("--data", choices=("real", "generated"), default="real",
                   help="real SmolLM2 traces or the generated OOD set (default: real)")
    p.add_argument("--tokens", type=positive_int, default=8192, help="real: context length captured (default 8192)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="real: layers (default: the trace's)")
    p.add_argument("--max-test", type=positive_int, default=256, help="test queries per head (default 256)")
    p.add_argument("--n-keys", type=positive_int, default=1_000_000, help="generated: keys (default 1M)")
    p.add_argument("--n-train", type=positive_int, default=200_000, help="generated: training queries")
    p.add_argument("--dim", type=positive_int, default=128, help="generated: dimension (default 128)")
    p.add_argument("--k", type=positive_int, nargs="+", default=list(KS), help="recall@k values (default 10 32 100)")
    p.add_argument("--indexes", nargs="+", default=None, metavar="NAME",
                   help=f"indexes to run: {' '.join(index_names())} (default: all; IVF is the IVF index whatever "
                        "its list count)")
    add_out_argument(p, "recall")
    p.add_argument("--cache-dir", default=None, help="real: trace cache folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    names = index_names()
    unknown = [w for w in a.indexes or () if not any(_selects(w, n) for n in names)]
    if unknown:
        p.error(f"unknown index {', '.join(map(repr, unknown))} (choose from {', '.join(names)})")

    def methods(n: int) -> list[Method]:
        ms = default_methods(n)
        if a.indexes:
            ms = [m for m in ms if any(_selects(w, m.name) for w in a.indexes)]
        for m in ms:
            if "progress" in m.kwargs:  # the graph's own bar for large builds
                m.kwargs["progress"] = not a.no_progress
        return ms

    results = Results("recall", a.out)
    if a.data == "real":
        heads = list(real_heads(a.tokens, a.layers, a.max_test, a.cache_dir))
        title = f"SmolLM2-135M real Q/K traces, {a.tokens} tokens, {len(heads)} heads"
        run("real", iter(heads), len(heads), results, a.k, methods, title, not a.no_progress)
    else:
        name = f"generated_{a.n_keys}"
        title = f"generated OOD keys/queries, N={a.n_keys:,}, d={a.dim}"
        run(name, generated_heads(a.n_keys, a.n_train, a.max_test, a.dim, a.seed), 1, results,
            a.k, methods, title, not a.no_progress)
    results.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
