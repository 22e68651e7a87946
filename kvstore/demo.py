"""``kvstore demo``: a real model finds a pass key in a long prompt, with full
attention and with kvstore (wave and graph), and a table shows what each read.

The prompt hides ``The pass key is NNNNN`` at a chosen depth in a haystack of
filler sentences and asks for it back. The model is the embedded
SmolLM2-135M-Instruct unless ``--model`` names a local transformers model
directory (Llama or Qwen2 family).
"""
from __future__ import annotations

import argparse
import os
import random
from typing import Sequence

from ._args import Parser
from .config import StoreConfig

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def passkey_prompt(tok, n_tokens: int, key: str, depth: float) -> str:
    """A haystack of about ``n_tokens`` tokens with the key sentence at ``depth`` (0 = start, 1 = end)."""
    per = len(tok(FILLER)["input_ids"])
    reps = max(1, (n_tokens - 60) // per)
    at = int(round(depth * reps))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    hay = FILLER * at + needle + FILLER * (reps - at)
    return ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
            + hay + "\n\nWhat is the pass key? Answer with the number only.")


def method_configs(a: argparse.Namespace) -> list[tuple[str, StoreConfig | None]]:
    """(label, config) per method: the StoreConfig defaults, with the budgets given on the command line."""
    out: list[tuple[str, StoreConfig | None]] = []
    for m in a.methods:
        if m == "full":
            out.append(("full attention", None))
            continue
        kw: dict = {"method": m}
        for name in ("sink", "window", "candidates", "retrieval", "estimation", "top_k", "ef"):
            if getattr(a, name) is not None:
                kw[name] = getattr(a, name)
        cfg = StoreConfig(**kw)
        if m == "wave":
            label = (f"kvstore wave (candidates {cfg.candidates:g}, retrieval {cfg.retrieval:g}, "
                     f"estimation {cfg.estimation:g})")
        elif m == "graph":
            label = f"kvstore graph (top_k {cfg.top_k})"
        else:
            label = m
        out.append((label, cfg))
    return out


def _fraction(s: str) -> float | int:
    v = float(s)
    return int(v) if v >= 1 and v.is_integer() and "." not in s else v


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="kvstore demo", description=__doc__)
    p.add_argument("--tokens", type=int, default=3000, help="prompt length in tokens (default 3000)")
    p.add_argument("--depth", type=float, default=0.5, help="where the key sits, 0..1 (default 0.5)")
    p.add_argument("--methods", nargs="+", default=["full", "wave", "graph"],
                   choices=["full", "wave", "graph", "streaming", "quest"], help="(default: full wave graph)")
    p.add_argument("--sink", type=int, default=None, help="tokens at the start kept exact (default: StoreConfig's)")
    p.add_argument("--window", type=int, default=None, help="recent tokens kept exact (default: StoreConfig's)")
    p.add_argument("--candidates", type=_fraction, default=None,
                   help="wave: tokens whose keys are scored, fraction of context or tokens (default: StoreConfig's)")
    p.add_argument("--retrieval", type=_fraction, default=None,
                   help="wave: tokens attended exactly, fraction of context or tokens (default: StoreConfig's)")
    p.add_argument("--estimation", type=_fraction, default=None,
                   help="wave: tokens' worth of clusters estimated (default: StoreConfig's)")
    p.add_argument("--top-k", type=int, default=None, help="graph: keys per query head (default: StoreConfig's)")
    p.add_argument("--ef", type=int, default=None, help="graph: search beam width (default: StoreConfig's)")
    p.add_argument("--model", default=None, help="a local transformers model directory (default: SmolLM2-135M)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="picks the pass key")
    a = p.parse_args(argv)
    if not 0 <= a.depth <= 1:
        p.error("--depth must be in [0, 1]")
    if a.tokens < 1:
        p.error("--tokens must be >= 1")
    if a.model is not None and not os.path.isdir(a.model):
        p.error(f"--model {a.model}: no such directory")
    try:
        method_configs(a)  # budgets checked (StoreConfig) before the model loads
    except ValueError as e:
        p.error(str(e))

    from .generation import answer, chat_ids, load_model

    model, tok = load_model(a.model, a.device)
    key = str(random.Random(a.seed).randint(10000, 99999))
    ids = chat_ids(tok, passkey_prompt(tok, a.tokens, key, a.depth))
    print(f"prompt: {ids.shape[1]} tokens, pass key {key} at depth {a.depth}")
    rows = []
    for label, cfg in method_configs(a):
        print(f"  {label}: generating ...", flush=True)
        ans = answer(model, tok, ids, cfg, max_new_tokens=12)
        rows.append((label, ans, key in ans.text))
        print(f"  {label}: {ans.text!r} ({ans.seconds:.1f}s)", flush=True)
    print()
    print("| method | answer | correct | KV read per decode step | KV bytes held | time |")
    print("|---|---|---|---|---|---|")
    for label, ans, ok in rows:
        read = "—" if ans.read_fraction is None else f"{100 * ans.read_fraction:.1f}%"
        print(f"| {label} | {ans.text[:24]!r} | {'yes' if ok else 'no'} | {read} | "
              f"{ans.fast_device_bytes / 2**20:.1f} MiB | {ans.seconds:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
