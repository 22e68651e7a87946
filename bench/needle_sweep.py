"""Greedy agreement with full attention of several wave configurations on multi-key needle prompts.

Every prompt is prefilled exactly once (kvstore.generation.answer_methods); full attention and each
configuration then decode greedily, and a run agrees when its output tokens equal full attention's; it agrees
on the answer when the first lines of the two outputs are equal (the answer ends at the line break: what follows is
the model going on past it, or stopping). Beside each configuration NAME, the row ``oracle@NAME`` is the oracle at
the same bytes: the query heads of each KV head attend exactly one set of the keys of highest true score, as many
as NAME read of the context on that prompt (``--no-oracle``: left out).

    python bench/needle_sweep.py --contexts 3500 7000 \\
        --config defaults= --config tpc16=tokens_per_cluster=16 --config c12=candidates=0.12,retrieval=0.015

A configuration is NAME=FIELD=VALUE,FIELD=VALUE,... of StoreConfig fields (NAME= alone: the defaults). Writes
needle_sweep.json (every run) into --out and prints agreement, task score and KV read per configuration.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time


def parse_config(text: str):
    from kvstore import StoreConfig

    name, _, fields = text.partition("=")
    kw = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        kw[key] = _value(value)
    return name, StoreConfig(**kw)


def _value(text: str):
    """'16' -> 16, '0.06' -> 0.06 (a fraction), 'true'/'false' -> bool, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def answer_line(text: str) -> str:
    """The answer of an output: its first line, stripped."""
    return text.strip().partition("\n")[0].rstrip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[3500, 7000])
    p.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--haystack", default="text", choices=["text", "filler"])
    p.add_argument("--config", action="append", default=None, help="NAME=FIELD=VALUE,... (repeatable)")
    p.add_argument("--no-oracle", action="store_true", help="leave out the oracle at each configuration's bytes")
    p.add_argument("--out", default="kvstore-results/needle_sweep")
    a = p.parse_args(argv)
    import torch
    from tqdm import tqdm

    from kvstore.evaluation.tasks import make_task, score
    from kvstore.generation import answer_methods, chat_ids, load_model

    from kvstore import StoreConfig

    configs = [parse_config(c) for c in (a.config or ["defaults="])]
    names = ["full"] + [n for n, _ in configs] + ([] if a.no_oracle else [f"oracle@{n}" for n, _ in configs])
    model, tok = load_model(None, "cpu")
    rows = []
    jobs = [(c, d, s) for c in a.contexts for d in a.depths for s in range(a.samples)]
    t0 = time.time()
    for c, depth, seed in tqdm(jobs, desc="needles", unit="prompt"):
        task = make_task("multikey", c, depth, a.haystack, tok, seed)
        ids = chat_ids(tok, task.prompt)
        if task.answer_prefix:
            pre = tok(task.answer_prefix, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = torch.cat([ids, pre], dim=1)
        new = min(64, len(tok(", ".join(task.answers), add_special_tokens=False)["input_ids"]) + 12)
        answers = answer_methods(model, tok, ids, [None] + [cfg for _, cfg in configs], max_new_tokens=new)
        if not a.no_oracle:  # the same prompt again: the oracles' budgets are the reads just measured
            oracles = [StoreConfig(method="oracle", retrieval=min(1.0, ans.read_fraction or 1.0))
                       for ans in answers[1:]]
            answers += answer_methods(model, tok, ids, oracles, max_new_tokens=new)
        for name, ans in zip(names, answers):
            rows.append(dict(context=c, depth=depth, seed=seed, config=name, output=ans.text,
                             agree=ans.text == answers[0].text,
                             agree_answer=answer_line(ans.text) == answer_line(answers[0].text),
                             score=score(task, ans.text), read=ans.read_fraction))
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "needle_sweep.json").write_text(json.dumps({"seconds": time.time() - t0, "rows": rows}, indent=1))
    for c in a.contexts:
        for name in names:
            rs = [r for r in rows if r["context"] == c and r["config"] == name]
            print(f"{c:6d} {name:14s} agreement {sum(r['agree'] for r in rs)}/{len(rs)}  "
                  f"on the answer {sum(r['agree_answer'] for r in rs)}/{len(rs)}  "
                  f"score {sum(r['score'] for r in rs) / len(rs):.3f}  KV read {sum(r['read'] for r in rs) / len(rs):.2%}")
    print(f"wrote {out / 'needle_sweep.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
