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
    "wave": {"candidates": 1.0, "retrieval": 1.0, "estimation": 0, "candidate_dtype": "kv"},
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


def test_budgets_follow_context_in_real_tokens():
    from kvstore.config import budget_context

    cfg = StoreConfig(candidates=0.08, retrieval=0.02, estimation=0.1, candidates_floor=0, retrieval_floor=0)
    b = cfg.wave_budget(8192, 8000)
    assert (b.candidates, b.tokens, b.estimation) == (math.ceil(0.08 * 8192), math.ceil(0.02 * 8192),
                                                      math.ceil(0.1 * 8192))
    # fractions apply to the context rounded up by less than 1/16
    assert 8192 < budget_context(8200) < 8200 * (1 + 1 / 16)
    assert cfg.wave_budget(8200, 8000).candidates == math.ceil(0.08 * budget_context(8200))
    # ints are tokens; floors hold at short contexts; budgets never exceed the indexed tokens
    assert StoreConfig(candidates=160, candidates_floor=0).wave_budget(10_000, 3200).candidates == 160
    assert StoreConfig().wave_budget(600, 532).candidates == 256
    full = StoreConfig(candidates=1.0, retrieval=1.0).wave_budget(5000, 4900)
    assert (full.candidates, full.tokens, full.estimation) == (4900, 4900, math.ceil(StoreConfig.estimation * 5120))
    ri = StoreConfig.retroinfer()
    assert (ri.tokens_per_cluster, ri.candidates, ri.estimation, ri.calibrate, ri.estimate_rest) == \
        (16, 0.018, 0.232, False, False)
    # the published step selects by count, at the mean cluster size
    assert ri.wave_budget(8192, 8000).clusters(8000, 500) == (math.ceil(math.ceil(0.018 * 8192) * 500 / 8000),
                                                              math.ceil(math.ceil(0.232 * 8192) * 500 / 8000))


@pytest.mark.parametrize("kwargs, word", [
    ({"method": "nope"}, "method"), ({"retrieval": 1.5}, "retrieval"), ({"window": -1}, "window"),
    ({"top_k": 0}, "top_k"), ({"estimation": float("nan")}, "estimation"), ({"pages": True}, "pages"),
    ({"check_finite": 1}, "check_finite"), ({"check_finite": "no"}, "check_finite"),
    ({"check_finite": None}, "check_finite"), ({"gpu_estimator": "magic"}, "gpu_estimator"),
    ({"candidates": -0.1}, "candidates"), ({"candidates_floor": -1}, "candidates_floor"),
    ({"calibrate": 1}, "calibrate"), ({"estimate_rest": "yes"}, "estimate_rest"),
    ({"rank_radius": -0.1}, "rank_radius"), ({"rank_radius": float("nan")}, "rank_radius"),
    ({"rank_radius": True}, "rank_radius"), ({"seed": -1}, "seed"),
    ({"seed": "x"}, "seed"), ({"seed": 2 ** 64}, "seed"), ({"num_threads": 100_000}, "num_threads"),
    ({"ef": 2 ** 31}, "ef"), ({"tokens_per_cluster": 2 ** 40}, "tokens_per_cluster"), ({"top_k": 2 ** 31}, "top_k"),
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


# --- check_finite: the per-step NaN/inf check (a GPU sync) can be switched off --------------------------------------
def _filled(method="wave", **kw):
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 200, 32, generator=g), torch.randn(2, 2, 200, 32, generator=g)
    store = KVStore(2, 2, 32, StoreConfig(method=method, window=16, update_interval=8, tokens_per_cluster=8, **kw))
    for layer in (0, 1):
        store.prefill(layer, k, v, q=torch.randn(2, 6, 200, 32, generator=g))
    return store


@pytest.mark.parametrize("method", ["wave", "quest"])
def test_non_finite_step_input_raises_naming_the_argument_and_changes_nothing(method):
    store = _filled(method)
    q = torch.randn(2, 6, 1, 32)
    before_out, before_lse, _ = store.attend_with_lse(0, q)
    before_stats = store.stats()
    k1, v1 = torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32)
    for bad, name in ((math.nan, "k"), (math.inf, "v")):
        kb, vb = k1.clone(), v1.clone()
        (kb if name == "k" else vb)[1, 0, 0, 3] = bad
        with pytest.raises(ValueError, match=f"append: {name} contains NaN or inf"):
            store.append(0, kb, vb)
    qb = q.clone()
    qb[0, 5, 0, 0] = math.nan
    with pytest.raises(ValueError, match="attend: q contains NaN or inf"):
        store.attend(0, qb)
    with pytest.raises(ValueError, match="attend: q contains NaN or inf"):
        store.attend_with_lse(0, qb)
    assert store.seq_lengths(0) == [200, 200]
    after_out, after_lse, _ = store.attend_with_lse(0, q)
    assert torch.equal(after_out, before_out) and torch.equal(after_lse, before_lse)
    assert store.stats()["layers"][0]["tokens"] == before_stats["layers"][0]["tokens"]
    assert store.stats()["layers"][0]["tokens_stored"] == before_stats["layers"][0]["tokens_stored"]


@pytest.mark.parametrize("method", ["wave", "graph", "quest", "streaming", "full"])
def test_check_finite_off_gives_identical_results(method):
    checked, unchecked = _filled(method), _filled(method, check_finite=False)
    assert checked.config.check_finite is True and unchecked.config.check_finite is False
    g = torch.Generator().manual_seed(2)
    for _ in range(20):  # past update_interval: tokens move into the index on both
        k1, v1, q = torch.randn(2, 2, 1, 32, generator=g), torch.randn(2, 2, 1, 32, generator=g), \
            torch.randn(2, 6, 1, 32, generator=g)
        for layer in (0, 1):
            checked.append(layer, k1, v1)
            unchecked.append(layer, k1, v1)
            a, b = checked.attend_with_lse(layer, q), unchecked.attend_with_lse(layer, q)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert torch.equal(checked.attend(layer, q), unchecked.attend(layer, q))
            assert torch.equal(unchecked.attend(layer, q), b[0])  # attend skips only the lse copy
    assert checked.seq_lengths(1) == unchecked.seq_lengths(1) == [220, 220]
    assert checked.stats() == unchecked.stats()


def test_check_finite_off_skips_only_the_finiteness_check():
    store = _filled(check_finite=False)
    nan = torch.full((2, 2, 1, 32), math.nan)
    store.append(0, nan, torch.randn(2, 2, 1, 32))  # no check: accepted (the output is then undefined)
    store.attend(0, torch.full((2, 6, 1, 32), math.nan))
    assert store.seq_lengths(0) == [201, 201]
    # shape, dtype and device checks still run
    with pytest.raises(ValueError, match="append: k must be"):
        store.append(0, torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32))
    with pytest.raises(TypeError, match="append: k must be float"):
        store.append(0, torch.ones(2, 2, 1, 32, dtype=torch.int32), torch.randn(2, 2, 1, 32))
    with pytest.raises(ValueError, match="multiple"):
        store.attend(0, torch.randn(2, 5, 1, 32))
    with pytest.raises(TypeError, match="attend: q"):
        store.attend(0, torch.ones(2, 6, 1, 32, dtype=torch.int64))
    # the prefill check stays (once per sequence)
    with pytest.raises(ValueError, match="prefill: k contains NaN"):
        store.prefill(1, torch.full((2, 2, 8, 32), math.nan), torch.randn(2, 2, 8, 32))
    with pytest.raises(ValueError, match="prefill: q contains NaN"):
        store.prefill(1, torch.randn(2, 2, 8, 32), torch.randn(2, 2, 8, 32), q=torch.full((2, 6, 8, 32), math.nan))
    assert store.seq_lengths(1) == [200, 200]


@pytest.mark.parametrize("method", ["wave", "quest", "full"])
def test_append_without_mask_equals_all_true_mask(method):
    """mask=None takes every token without building a row index; the same as an all-True mask."""
    a, b = _filled(method), _filled(method)
    g = torch.Generator().manual_seed(3)
    for _ in range(12):
        k, v = torch.randn(2, 2, 2, 32, generator=g), torch.randn(2, 2, 2, 32, generator=g)
        a.append(0, k, v)
        b.append(0, k, v, mask=torch.ones(2, 2, dtype=torch.bool))
    k[0, 1, 0] += 1  # the store copied what it took: changing the caller's tensor changes nothing
    q = torch.randn(2, 6, 1, 32, generator=g)
    assert torch.equal(a.attend(0, q), b.attend(0, q))
    assert a.seq_lengths(0) == b.seq_lengths(0) == [224, 224]


def _cuda_wave_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from kvstore.gpu import has_cuda_ext

    return has_cuda_ext()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_wave_ready(), reason="needs a CUDA device and kvstore._cuda")
@pytest.mark.parametrize("mode", ["gpu_only", "offload"])
def test_cuda_store_check_finite_off_makes_no_sync_per_step(mode):
    """A CUDA wave store: same results with and without the check; without it append/attend never sync
    (gpu_only; offload keeps its one planned copy of the selected clusters, inside the GPU layer)."""
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 2, 4096, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    stores = []
    for check in (True, False):
        s = KVStore(2, 2, 64, StoreConfig(method="wave", gpu_mode=mode, check_finite=check), device="cuda")
        assert s.device == torch.device("cuda", torch.cuda.current_device())
        s.prefill(0, k, v)
        stores.append(s)
    steps = [tuple(torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)
                   for shape in ((2, 2, 1, 64), (2, 2, 1, 64), (2, 8, 1, 64))) for _ in range(4)]
    for k1, v1, q in steps[:2]:  # warm-up (CUDA graph capture of the decode step)
        outs = []
        for s in stores:
            s.append(0, k1, v1)
            outs.append(s.attend(0, q))
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    bad = torch.full((2, 8, 1, 64), math.nan, dtype=torch.bfloat16, device="cuda")
    stores[0].attend(0, bad)           # the check is deferred on CUDA (no host wait): raised at the next read
    with pytest.raises(ValueError, match="layer 0: .*NaN or inf"):
        stores[0].check_finite_flags()
    stores[0].check_finite_flags()     # read and cleared
    torch.cuda.synchronize()
    for k1, v1, q in steps[2:]:
        ref = (stores[0].append(0, k1, v1), stores[0].attend(0, q))[1]
        if mode == "gpu_only":
            torch.cuda.set_sync_debug_mode("error")
        try:
            stores[1].append(0, k1, v1)
            out = stores[1].attend(0, q)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert stores[0].seq_lengths(0) == stores[1].seq_lengths(0) == [4100, 4100]
