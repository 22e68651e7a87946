"""KVStore against exact attention: full budgets are exact, GQA, mixed lengths,
the update path, bad input."""
from __future__ import annotations

import math

import pytest
import torch

import kvstore
from kvstore import KVStore, StoreConfig
from kvstore.attention import full_attention

FULL_BUDGET = {
    "full": {},
    "wave": {"retrieval": 1.0, "estimation": 0},
    "graph": {"top_k": 4096, "ef": 4096},
    "quest": {"pages": 1.0},
    "streaming": {"window": 4096},
}


def full_budget(method, **base):
    return StoreConfig(**{**base, "method": method, **FULL_BUDGET[method]})


def make(B=2, Hq=6, Hkv=2, N=300, d=32, dtype=torch.float32):
    q_prompt = torch.randn(B, Hq, N, d, dtype=dtype)
    k = torch.randn(B, Hkv, N, d, dtype=dtype)
    v = torch.randn(B, Hkv, N, d, dtype=dtype)
    return q_prompt, k, v


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("method", list(FULL_BUDGET))
def test_full_budget_equals_full_attention(method):
    cfg = full_budget(method, sink=4, window=16, tokens_per_cluster=8)
    qp, k, v = make()
    store = KVStore(1, 2, 32, cfg)
    store.prefill(0, k, v, q=qp)
    q = torch.randn(2, 6, 1, 32)
    out = store.attend(0, q)
    ref, _ = full_attention(q, k, v)
    assert out.shape == (2, 6, 1, 32) and out.dtype == q.dtype
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("method", list(FULL_BUDGET))
def test_update_path_keeps_every_token(method):
    """Decode 150 tokens one at a time with a small window: every token stays
    attended (full budgets) and is accounted for exactly once."""
    cfg = full_budget(method, sink=2, window=8, update_interval=32, tokens_per_cluster=4)
    qp, k, v = make(B=1, N=40)
    store = KVStore(1, 2, 32, cfg)
    store.prefill(0, k, v, q=qp)
    ks, vs = [k], [v]
    for _ in range(150):
        kt, vt = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
        store.append(0, kt, vt)
        ks.append(kt)
        vs.append(vt)
    q = torch.randn(1, 6, 1, 32)
    out, _, access = store.attend_with_lse(0, q)
    K, V = torch.cat(ks, 2), torch.cat(vs, 2)
    ref, _ = full_attention(q, K, V)
    assert store.seq_lengths(0) == [190]
    assert rel_err(out, ref) < 1e-5
    for acc in access[0]:
        pos = acc.exact_positions.sort().values
        assert torch.equal(pos, torch.arange(190))  # every token once
    st = store.stats()["layers"][0]
    if method not in ("full", "streaming"):
        assert st["tokens_indexed"] > 0


def test_streaming_evicts_beyond_sink_and_window():
    qp, k, v = make(B=1, N=40)
    store = KVStore(1, 2, 32, StoreConfig(method="streaming", sink=2, window=8))
    store.prefill(0, k, v)
    for _ in range(20):
        store.append(0, torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    _, _, access = store.attend_with_lse(0, torch.randn(1, 6, 1, 32))
    pos = access[0][0].exact_positions.sort().values
    assert torch.equal(pos, torch.tensor([0, 1, *range(52, 60)]))
    assert store.stats()["layers"][0]["tokens_stored"] == 2 * 10


@pytest.mark.parametrize("method", ["wave", "graph", "quest", "full"])
def test_mixed_lengths_with_padding(method):
    cfg = full_budget(method, sink=4, window=16, tokens_per_cluster=8)
    B, N = 3, 120
    qp, k, v = make(B=B, N=N)
    lengths = [120, 70, 30]
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, N - n:] = True  # left padding, as transformers pads for generation
    store = KVStore(1, 2, 32, cfg)
    store.prefill(0, k, v, q=qp, mask=mask)
    q = torch.randn(B, 6, 1, 32)
    out = store.attend(0, q)
    for b, n in enumerate(lengths):
        ref, _ = full_attention(q[b:b + 1], k[b:b + 1, :, N - n:], v[b:b + 1, :, N - n:])
        assert rel_err(out[b:b + 1], ref) < 1e-5
    assert store.seq_lengths(0) == lengths


def test_gqa_group_sizes_and_dtypes():
    for hq, hkv, dtype in [(4, 4, torch.float16), (8, 1, torch.bfloat16), (9, 3, torch.float32)]:
        cfg = StoreConfig(method="wave", retrieval=1.0, estimation=0, window=8)
        qp, k, v = make(B=1, Hq=hq, Hkv=hkv, N=200, d=64, dtype=dtype)
        store = KVStore(1, hkv, 64, cfg)
        store.prefill(0, k, v)
        q = torch.randn(1, hq, 1, 64, dtype=dtype)
        out = store.attend(0, q)
        ref, _ = full_attention(q.float(), k.float(), v.float())
        assert out.dtype == dtype
        assert rel_err(out.float(), ref) < 1e-2


def test_wave_default_budgets_are_close_and_read_little():
    """Keys with cluster structure: the published budgets give a small error."""
    torch.manual_seed(0)
    N, d = 4096, 64
    centres = torch.randn(64, d) * 2
    k = (centres[torch.randint(0, 64, (N,))] + 0.3 * torch.randn(N, d))[None, None]
    v = torch.randn(1, 1, N, d)
    store = KVStore(1, 1, d, StoreConfig(method="wave"))
    store.prefill(0, k, v)
    # the query heads of one GQA group look for the same topic
    q = (centres[3] * 0.5 + 0.1 * torch.randn(4, d))[None, :, None, :]
    out = store.attend(0, q)
    ref, _ = full_attention(q, k, v)
    assert rel_err(out, ref) < 0.05
    assert store.stats()["layers"][0]["read_fraction"] < 0.15
    no_estimate = KVStore(1, 1, d, StoreConfig(method="wave", estimation=0))
    no_estimate.prefill(0, k, v)
    assert rel_err(no_estimate.attend(0, q), ref) > rel_err(out, ref)  # the estimation zone helps


def test_decode_attention_function_and_stats():
    qp, k, v = make(B=1)
    store = KVStore(2, 2, 32, StoreConfig(method="quest", pages=0.25, window=16))
    store.prefill(1, k, v)
    q = torch.randn(1, 6, 1, 32)
    assert torch.equal(kvstore.decode_attention(q, store, 1), store.attend(1, q))
    st = store.stats()
    assert st["layers"][0] is None and 0 < st["layers"][1]["read_fraction"] < 1


def test_budgets_follow_context():
    cfg = StoreConfig(retrieval=0.018, estimation=0.232, tokens_per_cluster=16)
    assert cfg.retrieval_clusters(8192) == math.ceil(0.018 * 8192 / 16)
    assert cfg.estimation_clusters(8192) == math.ceil(0.232 * 8192 / 16)
    assert StoreConfig(retrieval=160, estimation=10).retrieval_clusters(10_000) == 10
    assert StoreConfig(estimation=10).estimation_clusters(10_000) == 10


@pytest.mark.parametrize("kwargs, word", [
    ({"method": "nope"}, "method"), ({"retrieval": 1.5}, "retrieval"), ({"window": -1}, "window"),
    ({"top_k": 0}, "top_k"), ({"estimation": float("nan")}, "estimation"), ({"pages": True}, "pages"),
])
def test_bad_config(kwargs, word):
    with pytest.raises(ValueError, match=word):
        StoreConfig(**kwargs)


def test_bad_inputs_leave_store_usable():
    qp, k, v = make(B=1)
    store = KVStore(2, 2, 32, StoreConfig(method="wave", window=16))
    with pytest.raises(RuntimeError, match="prefill"):
        store.attend(0, torch.randn(1, 6, 1, 32))
    store.prefill(0, k, v)
    q = torch.randn(1, 6, 1, 32)
    before = store.attend(0, q)
    bad = [
        (lambda: store.prefill(0, k[:, :1], v[:, :1]), ValueError, "k must be"),
        (lambda: store.prefill(0, k, v[..., :8]), ValueError, "v must be"),
        (lambda: store.prefill(0, k.int(), v), TypeError, "k must be float"),
        (lambda: store.prefill(0, k.numpy(), v), TypeError, "torch tensor"),
        (lambda: store.append(0, torch.full((1, 2, 1, 32), math.nan), torch.randn(1, 2, 1, 32)), ValueError, "NaN"),
        (lambda: store.append(0, torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32)), ValueError, "batch"),
        (lambda: store.attend(0, torch.randn(1, 5, 1, 32)), ValueError, "multiple"),
        (lambda: store.attend(0, torch.randn(1, 6, 2, 32)), ValueError, "attend"),
        (lambda: store.attend(0, torch.full((1, 6, 1, 32), math.inf)), ValueError, "NaN"),
        (lambda: store.attend(2, q), IndexError, "layer 2"),
        (lambda: store.attend(-1, q), IndexError, "layer"),
        (lambda: store.attend("0", q), TypeError, "layer"),
        (lambda: store.prefill(0, k, v, mask=torch.ones(3, 3)), ValueError, "mask"),
        (lambda: KVStore(1, 2, 32, StoreConfig(method="graph")).prefill(0, k, v), ValueError, "needs q"),
        (lambda: KVStore(0, 2, 32), ValueError, "num_layers"),
    ]
    for call, exc, word in bad:
        with pytest.raises(exc, match=word):
            call()
    assert torch.equal(store.attend(0, q), before)
    assert store.seq_lengths(0) == [300]
