"""Which cluster ranking keeps the keys a copying head needs? Cluster rankings compared on real decode queries.

For each prompt (a RULER-style task of kvstore.evaluation.tasks), full attention answers greedily; one forward pass
over prompt + answer records every layer's post-RoPE queries and keys. Per KV head, the middle tokens (after the
sink, before the window) are clustered as the wave index does (kvstore.wave.WaveIndex), and for every decode query
(the answer's positions) each ranking orders the clusters by its group weight (softmax per head of the rank score,
summed over the group's heads); clusters are taken in that order until they hold the candidate budget in tokens.
Reported per ranking, over all layers, query heads and decode queries:

* coverage: share of a head's attention mass on the middle tokens that the candidates hold (median, 10th pct);
* missed mass: attention mass (of the whole context) on middle tokens outside the candidates (mean, p99);
* peaked heads missing their top token: among (head, query) pairs whose largest single weight on a middle token
  is > 0.3 (a copying head), how many leave that token out of the candidates.

Rankings: ``centroid`` (q.c, the mean key), ``centroid+log size`` (estimated mass), ``radius L`` (q.c + L |q|
radius, radius = the largest member distance from the centroid), ``rms L`` (the root-mean-square distance in
place of the largest), ``diagonal variance`` (log size + q.c + q^T diag(var) q / 2: the log-normal mass), and
``max member`` (the best member's exact score: what a ranking could reach, reading every key).

    python bench/rank_study.py --contexts 4096 8192 --kind niah_number --haystack text

Prints a table; writes nothing.
"""
from __future__ import annotations

import argparse
import math

import torch

from kvstore.config import StoreConfig


def rankings(q, cent, sizes, keys_sorted, cid, scale):
    """q [G, D], cent [C, D], sizes [C], keys_sorted [n, D] (cluster order), cid [n] -> name: weight [C]."""
    C, D = cent.shape
    s = (q @ cent.T) * scale
    dev = keys_sorted - cent[cid]
    dist = dev.norm(dim=1)
    radius = torch.zeros(C).scatter_reduce_(0, cid, dist, "amax")
    rms = (torch.zeros(C).index_add_(0, cid, dist ** 2) / sizes).sqrt()
    var = torch.zeros(C, D).index_add_(0, cid, dev ** 2) / sizes[:, None]
    qn = q.norm(dim=1, keepdim=True)
    best = torch.full((q.shape[0], C), -math.inf).scatter_reduce_(
        1, cid.expand(q.shape[0], -1), (q @ keys_sorted.T) * scale, "amax")
    scores = {"centroid": s, "centroid+log size": s + sizes.log()}
    for lam in (0.1, 0.25, 0.5):
        scores[f"radius {lam}"] = s + lam * qn * radius * scale
    scores["rms 0.5"] = s + 0.5 * qn * rms * scale
    scores["diagonal variance"] = s + sizes.log() + 0.5 * ((q ** 2) @ var.T) * scale ** 2
    scores["max member"] = best
    return {k: torch.softmax(v, dim=1).sum(0) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192], help="prompt lengths in tokens")
    p.add_argument("--kind", default="niah_number", help="task kind (kvstore.evaluation.tasks.KINDS)")
    p.add_argument("--haystack", default="text", choices=["text", "filler"])
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates", type=float, default=StoreConfig.candidates, help="candidate budget, a fraction of the tokens")
    p.add_argument("--candidates-floor", type=int, default=256)
    p.add_argument("--tokens-per-cluster", type=int, default=16)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=12)
    a = p.parse_args(argv)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from tqdm import tqdm

    from kvstore.evaluation.tasks import make_task
    from kvstore.generation import PromptRecorder, chat_ids, exact_attention, load_model
    from kvstore.wave import WaveIndex

    torch.set_grad_enabled(False)
    model, tok = load_model(None, "cpu")
    for ctx in a.contexts:
        task = make_task(a.kind, ctx, a.depth, a.haystack, tok, a.seed)
        ids = chat_ids(tok, task.prompt)
        if task.answer_prefix:
            pre = tok(task.answer_prefix, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = torch.cat([ids, pre], 1)
        with exact_attention(model):
            full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=a.max_new_tokens, do_sample=False)
        N, T = ids.shape[1], full.shape[1]
        rec = PromptRecorder()
        AttentionInterface.register(rec.name, rec)
        AttentionMaskInterface.register(rec.name, sdpa_mask)
        with exact_attention(model):
            model.set_attn_implementation(rec.name)
            model(full, use_cache=False)
        stats: dict[str, dict] = {}
        lo, hi = a.sink, N - a.window
        for layer, (q, k, _) in tqdm(sorted(rec.qkv.items()), desc=f"{ctx} tokens", unit="layer"):
            q, k = q[0].float(), k[0].float()
            Hq, Hkv, D = q.shape[0], k.shape[0], q.shape[2]
            G, scale = Hq // Hkv, 1 / math.sqrt(D)
            budget = max(a.candidates_floor, int(a.candidates * (hi - lo)))
            for g in range(Hkv):
                ix = WaveIndex(D, tokens_per_cluster=a.tokens_per_cluster).build(k[g, lo:hi])
                sizes, off = ix.sizes.float(), ix.offsets
                cid = torch.repeat_interleave(torch.arange(ix.num_clusters), off[1:] - off[:-1])
                for t in range(N, T):
                    qg = q[g * G:(g + 1) * G, t]
                    attn = torch.softmax((qg @ k[g, :t + 1].T) * scale, 1)
                    mid = attn[:, lo:hi][:, ix.order]
                    for name, w in rankings(qg, ix.centroids, sizes, ix.keys_sorted, cid, scale).items():
                        order = torch.argsort(-w, stable=True)
                        n_cl = int((torch.cumsum(sizes[order], 0) < budget).sum()) + 1
                        chosen = torch.zeros(ix.num_clusters, dtype=torch.bool)
                        chosen[order[:n_cl]] = True
                        inside = chosen[cid]
                        st = stats.setdefault(name, dict(cover=[], missed=[], peaked=0, lost=0))
                        st["cover"] += ((mid * inside).sum(1) / mid.sum(1).clamp_min(1e-30)).tolist()
                        st["missed"] += (mid * ~inside).sum(1).tolist()
                        peaked = mid.max(1).values > 0.3
                        st["peaked"] += int(peaked.sum())
                        st["lost"] += int((peaked & ((mid * ~inside).max(1).values > 0.3)).sum())
        print(f"\n{a.kind}/{a.haystack}, {N} prompt tokens, answer {tok.decode(full[0, N:])!r} (expected "
              f"{task.answers}), {T - N} decode queries x {len(rec.qkv)} layers x {Hq} query heads")
        print("| ranking | coverage median | coverage p10 | missed mass mean | missed mass p99 | peaked heads "
              "missing their top token |\n|---|---|---|---|---|---|")
        for name, st in stats.items():
            c, m = torch.tensor(st["cover"]), torch.tensor(st["missed"])
            print(f"| {name} | {c.median():.3f} | {c.quantile(0.1):.3f} | {m.mean():.4f} | {m.quantile(0.99):.3f} "
                  f"| {st['lost']}/{st['peaked']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
