"""Whole decode flows against exact attention: prefill, hundreds of appends across several re-indexings (chunks
smaller than a cluster or a page, so clusters and pages of every size), attend, for every method; through the
store and through transformers generation."""
from __future__ import annotations

import copy

import pytest
import torch

from kvstore import KVStore, StoreConfig
from kvstore.attention import full_attention

FULL = {
    "full": {},
    "wave": {"candidates": 1.0, "retrieval": 1.0, "estimation": 0, "candidate_dtype": "kv"},
    "graph": {"top_k": 4096, "ef": 4096},
    "quest": {"pages": 1.0},
    "streaming": {"window": 4096},
}
# re-indexing chunks of 1, 5 and 24 tokens; 24-token clusters and 16-token pages do not divide them
INTERVALS = (1, 5, 24)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _query(k: torch.Tensor, t: int, g: torch.Generator, Hq: int) -> torch.Tensor:
    """Decode queries [B, Hq, 1, d] that attend mostly to a few of the first t keys (as trained heads do)."""
    B, Hkv, _, d = k.shape
    pos = torch.randint(0, t, (B, Hq, 3), generator=g)
    kk = k.repeat_interleave(Hq // Hkv, 1)[:, :, :t]
    target = torch.gather(kk, 2, pos[..., None].expand(B, Hq, 3, d)).sum(2)
    return (2.0 * target + 0.3 * torch.randn(B, Hq, d, generator=g))[:, :, None]


def _flow(cfg: StoreConfig, steps: int, seed: int = 0, N: int = 200):
    g = torch.Generator().manual_seed(seed)
    B, Hkv, Hq, d = 2, 2, 4, 16
    k = torch.randn(B, Hkv, N + steps, d, generator=g)
    v = torch.randn(B, Hkv, N + steps, d, generator=g)
    qp = torch.randn(B, Hq, N, d, generator=g)
    store = KVStore(1, Hkv, d, cfg)
    store.prefill(0, k[:, :, :N], v[:, :, :N], q=qp)
    errs = []
    for t in range(N, N + steps):
        store.append(0, k[:, :, t:t + 1], v[:, :, t:t + 1])
        if (t - N) % 25 == 24:
            q = _query(k, t + 1, g, Hq)
            ref, _ = full_attention(q, k[:, :, :t + 1], v[:, :, :t + 1])
            errs.append(_rel(store.attend(0, q), ref))
    return store, errs


@pytest.mark.parametrize("interval", INTERVALS)
@pytest.mark.parametrize("method", list(FULL))
def test_full_budgets_stay_exact_across_reindexing(method, interval):
    cfg = StoreConfig(**{**dict(method=method, sink=4, window=8, update_interval=interval, tokens_per_cluster=24,
                                page_size=16, segment_len=64), **FULL[method]})
    store, errs = _flow(cfg, steps=200)
    assert store.seq_lengths() == [400, 400]
    assert max(errs) < 1e-5, errs


@pytest.mark.parametrize("interval", INTERVALS)
def test_full_wave_budgets_with_int8_keys_stay_within_their_rounding(interval):
    """The default int8 copies of the candidates' keys: a covering budget attends every token, its scores off by
    the keys' int8 rounding only."""
    cfg = StoreConfig(method="wave", sink=4, window=8, update_interval=interval, tokens_per_cluster=24,
                      segment_len=64, **{**FULL["wave"], "candidate_dtype": "int8"})
    store, errs = _flow(cfg, steps=200)
    _, _, access = store.attend_with_lse(0, torch.randn(2, 4, 1, 16))
    assert all(a.exact_positions.numel() == 400 for row in access for a in row)
    assert max(errs) < 0.03, errs


@pytest.mark.parametrize("interval", (5, 64))
@pytest.mark.parametrize("method", ["wave", "graph", "quest"])
def test_default_budgets_do_not_degrade_across_reindexing(method, interval):
    """Default budgets on attention-like data (kvstore.datasets.attention_like): after prefill, appends and
    re-indexing, a step is as accurate as a store prefilled with the whole context at once."""
    from kvstore.datasets.attention_like import AttentionLikeSpec, decode_queries, generate_kv

    spec = AttentionLikeSpec(num_kv_heads=2, num_q_heads=4, head_dim=32)
    N, steps = 3000, 200
    k, v = generate_kv(1, N + steps, spec, dtype=torch.float32, seed=3)

    def train_q(t):
        return decode_queries(k[:, :, :t], spec, num_sets=1, seed=3, query_seed=11)[0][:, :, None].expand(
            1, 4, t, 32).contiguous()

    cfg = StoreConfig(method=method, update_interval=interval)
    store = KVStore(1, 2, 32, cfg)
    store.prefill(0, k[:, :, :N], v[:, :, :N], q=train_q(N))
    grown, fresh = [], []
    for t in range(N, N + steps):
        store.append(0, k[:, :, t:t + 1], v[:, :, t:t + 1])
        if (t - N) % 100 == 99:
            once = KVStore(1, 2, 32, cfg)
            once.prefill(0, k[:, :, :t + 1], v[:, :, :t + 1], q=train_q(t + 1))
            for qs in decode_queries(k[:, :, :t + 1], spec, num_sets=8, seed=3, query_seed=t):
                ref, _ = full_attention(qs[:, :, None], k[:, :, :t + 1], v[:, :, :t + 1])
                grown.append(_rel(store.attend(0, qs[:, :, None]), ref))
                fresh.append(_rel(once.attend(0, qs[:, :, None]), ref))
    med, med_fresh = torch.tensor(grown).median(), torch.tensor(fresh).median()
    assert med < 1.5 * med_fresh + 0.02, (med, med_fresh)


@pytest.mark.parametrize("candidate_dtype", ["int8", "kv"])
def test_wave_reads_what_its_budget_says_after_small_reindexing(candidate_dtype):
    """Budgets count real tokens: with 1-token re-indexing chunks the wave step still scores its candidate budget
    (read as int8 key copies, counted as index metadata, or as stored keys)."""
    from kvstore.attention.heads import vector_elems

    cfg = StoreConfig(method="wave", window=8, update_interval=1, candidates=120, candidates_floor=0,
                      retrieval=40, retrieval_floor=0, segment_len=64, candidate_dtype=candidate_dtype)
    store, _ = _flow(cfg, steps=150, N=300)
    q = torch.randn(2, 4, 1, 16)
    _, _, access = store.attend_with_lse(0, q)
    for row in access:
        for a in row:
            exact = a.exact_positions.numel()
            assert exact >= 40 + 8 + 4 - 1           # retrieval + window + sink
            if candidate_dtype == "kv":
                assert a.key_vectors >= 120 + 8 + 4 - 1  # candidates + steady zone
            else:
                assert a.key_vectors == 8 + 4            # the steady zone
                assert a.meta_elems >= 120 * vector_elems(16, "int8")


@pytest.mark.parametrize("interval", (1, 8))
def test_generation_with_full_budgets_equals_full_attention(interval):
    transformers = pytest.importorskip("transformers")
    from kvstore.integrations.transformers import KVStoreCache

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ours = transformers.LlamaForCausalLM(copy.deepcopy(cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    ref.config._attn_implementation = "sdpa"
    ours.config._attn_implementation = "kvstore"
    ids = torch.randint(0, 128, (1, 150))
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=60, do_sample=False)
        cache = KVStoreCache(cfg, StoreConfig(method="wave", window=16, update_interval=interval, tokens_per_cluster=16,
                                              **FULL["wave"]))
        got = ours.generate(ids, max_new_tokens=60, do_sample=False, cache=cache)
    assert torch.equal(got, expected)


def test_radius_ranking_finds_the_one_far_key_a_centroid_hides():
    """A cluster whose mean is near zero along q but which holds one key far out along q: ranked by the centroid it
    comes last and its key is dropped; ranked with the radius term it is read and attended exactly."""
    from kvstore.attention.selection import ClusterBounds, SteadyZone, WaveBudget, WaveSlots, wave_attend
    from kvstore.wave import cluster_radii

    gen = torch.Generator().manual_seed(5)
    D, C, m = 16, 12, 4
    u = torch.zeros(D, dtype=torch.float64)
    u[0] = 1.0
    keys = u * 1.0 + 0.05 * torch.randn(C * m, D, generator=gen, dtype=torch.float64)    # clusters near u ...
    keys[:m] = -3.0 * u + 0.05 * torch.randn(m, D, generator=gen, dtype=torch.float64)  # ... but cluster 0
    keys[0] = 9.0 * u                                                                     # with one far key
    values = torch.randn(C * m, D, generator=gen, dtype=torch.float64)
    cluster = torch.arange(C * m) // m
    centroids = keys.view(C, m, D).mean(1)
    radii = cluster_radii(keys, centroids, cluster).double()
    sizes = torch.full((1, C), float(m))
    vs = values.view(C, m, D)
    f = torch.float32
    slots = WaveSlots(centroids[None].to(f), sizes, vs.mean(1)[None].to(f), values.mean(0)[None].to(f),
                      torch.arange(0, C * m + 1, m)[None], keys.to(f), values.to(f), torch.zeros(1, dtype=torch.long),
                      radii[None].to(f))
    sk, sv = torch.zeros(1, 1, D, dtype=torch.float64), torch.zeros(1, 1, D, dtype=torch.float64)
    steady = SteadyZone(sk.to(f), sv.to(f), 1)
    q = (4.0 * u)[None, None]                                                          # [G=1, Hg=1, D]
    ref = full_attention(q[:, :, None], torch.cat([sk, keys[None]], 1)[:, None],
                         torch.cat([sv, values[None]], 1)[:, None], scale=1.0)[0][0, 0, 0]
    err = {}
    for lam in (0.0, 0.25):
        o, _, step = wave_attend(q.to(f), slots, steady, WaveBudget(m, 1, 0, rank_radius=lam), ClusterBounds(sizes),
                                 scale=1.0)
        err[lam] = float((o[0, 0].double() - ref).norm() / ref.norm())
        assert (0 in step.candidates[0].tolist()) == (lam > 0)
    assert err[0.25] < 1e-3 < 0.1 < err[0.0]
