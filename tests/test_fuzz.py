"""Fuzzing every public entry point: random shapes, dtypes, NaN/inf, empty
inputs, huge k, wrong layers. Every case ends in a result or a clear exception
(ValueError, TypeError, IndexError, RuntimeError, NotImplementedError), and
what was stored is unchanged by a failed call."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kvstore
from kvstore import KVStore, StoreConfig
from kvstore._fileformat import CorruptFileError

CLEAR = (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def make_array(draw, rows, cols):
    """A float array in a random container, dtype and with optional NaN/inf."""
    kind = draw(st.sampled_from(["np32"] * 4 + ["np16", "np64", "npint", "t32", "t16", "tbf16", "list"]))
    a = np.random.default_rng(draw(st.integers(0, 2**31))).standard_normal((rows, cols)).astype(np.float32)
    poison = draw(st.sampled_from([None] * 9 + [np.nan, np.inf, -np.inf]))
    if poison is not None and a.size:
        a.flat[draw(st.integers(0, a.size - 1))] = poison
    if kind == "np16":
        return a.astype(np.float16)
    if kind == "np64":
        return a.astype(np.float64)
    if kind == "npint":
        return (a * 10).astype(np.int32) if np.isfinite(a).all() else a.astype(np.float16)
    if kind.startswith("t"):
        t = torch.from_numpy(a)
        return {"t32": t, "t16": t.half(), "tbf16": t.bfloat16()}[kind]
    if kind == "list":
        return a.tolist()
    return a


@st.composite
def index_case(draw):
    dim = draw(st.integers(1, 12))
    n = draw(st.integers(0, 60))
    keys = make_array(draw, n, draw(st.sampled_from([dim] * 9 + [dim + 1])))
    queries = make_array(draw, draw(st.integers(0, 8)), draw(st.sampled_from([dim] * 9 + [max(1, dim - 1)])))
    k = draw(st.one_of(st.integers(1, 200), st.integers(1, 200), st.integers(-3, 0), st.just(10**9),
                       st.floats(0, 5), st.just(None)))
    factory = draw(st.sampled_from(["Flat", "Graph8", "Wave4", "IVF4,Flat", "HNSW8"]))
    return dim, factory, keys, queries, k


@FUZZ
@given(index_case())
def test_index_entry_points(case):
    dim, factory, keys, queries, k = case
    try:
        index = kvstore.index_factory(dim, factory)
    except ImportError:
        pytest.skip("faiss not installed")
    try:
        if factory.startswith("Graph"):
            index.build(keys, keys)
        else:
            index.build(keys)
    except CLEAR as e:
        event(f"build refused: {type(e).__name__}: {str(e)[:60]}")
        assert index.ntotal == 0
        return
    before = index.ntotal
    try:
        D, I = index.search(queries, k)
    except CLEAR as e:
        event(f"search refused: {type(e).__name__}: {str(e)[:50]}")
        assert index.ntotal == before
        return
    event("searched")
    nq = len(queries)
    assert D.shape == I.shape == (nq, k) and D.dtype == np.float32 and I.dtype == np.int64
    assert ((I >= -1) & (I < index.ntotal)).all()
    valid = I >= 0
    assert np.isfinite(D[valid]).all() and np.isneginf(D[~valid]).all()


@st.composite
def store_case(draw):
    method = draw(st.sampled_from(["wave", "graph", "quest", "streaming", "full"]))
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    G = draw(st.integers(1, 3))
    D = draw(st.sampled_from([8, 16]))
    N = draw(st.integers(0, 90))
    dtype = draw(st.sampled_from([torch.float32] * 3 + [torch.float16, torch.bfloat16, torch.int32]))
    return method, B, Hkv, G, D, N, dtype, draw(st.integers(0, 2**31)), draw(st.data())


@FUZZ
@given(store_case())
def test_store_entry_points(case):
    method, B, Hkv, G, D, N, dtype, seed, data = case
    gen = torch.Generator().manual_seed(seed)
    cfg = StoreConfig(method=method, window=data.draw(st.integers(0, 20)), sink=data.draw(st.integers(0, 4)),
                      update_interval=data.draw(st.integers(1, 16)), tokens_per_cluster=4, top_k=8)
    store = KVStore(2, Hkv, D, cfg)

    def rand(*shape):
        x = torch.randn(*shape, generator=gen)
        return x.to(dtype) if dtype != torch.int32 else (x * 10).to(dtype)

    k, v, q = rand(B, Hkv, N, D), rand(B, Hkv, N, D), rand(B, Hkv * G, N, D)
    if data.draw(st.integers(0, 9)) == 0 and N:
        k.view(-1)[0] = math.nan if dtype.is_floating_point else 0
    layer = data.draw(st.sampled_from([0, 1] * 4 + [2, -1]))
    try:
        store.prefill(layer, k, v, q=q)
    except CLEAR as e:
        event(f"prefill refused: {type(e).__name__}")
        return
    qd = rand(B, Hkv * G, 1, D)
    try:
        ref = store.attend(layer, qd)
    except CLEAR as e:
        event(f"attend refused: {type(e).__name__}")
        return
    event("attended")
    assert ref.shape == (B, Hkv * G, 1, D) and torch.isfinite(ref.float()).all() or N == 0
    # a bad append changes nothing
    bad = data.draw(st.sampled_from(["nan", "shape", "batch", "layer", "dtype"]))
    kt, vt = rand(B, Hkv, 1, D), rand(B, Hkv, 1, D)
    args = {"nan": (layer, torch.full_like(kt.float(), math.nan), vt),
            "shape": (layer, kt[..., :-1], vt), "batch": (layer, rand(B + 1, Hkv, 1, D), rand(B + 1, Hkv, 1, D)),
            "layer": (5, kt, vt), "dtype": (layer, kt.long(), vt)}[bad]
    with pytest.raises(CLEAR):
        store.append(*args)
    assert torch.equal(store.attend(layer, qd), ref)
    store.append(layer, kt, vt)  # still usable
    assert store.seq_lengths(layer) == [N + 1] * B


@FUZZ
@given(st.integers(0, 10**6), st.sampled_from(["truncate", "flip", "append", "zero"]))
def test_saved_store_damage_is_always_refused(tmp_path_factory, where, how):
    tmp = tmp_path_factory.mktemp("fz")
    store = KVStore(1, 1, 8, StoreConfig(method="quest", window=4))
    store.prefill(0, torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8))
    path = tmp / "s.kvstore"
    store.save(path)
    raw = bytearray(path.read_bytes())
    pos = where % len(raw)
    if how == "truncate":
        raw = raw[:pos]
    elif how == "flip":
        raw[pos] ^= 1 << (where % 8)
    elif how == "append":
        raw += b"x"
    else:
        raw[pos:pos + 16] = bytes(len(raw[pos:pos + 16]))
        if bytes(raw) == path.read_bytes():
            return
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="s.kvstore"):
        KVStore.load(path)
