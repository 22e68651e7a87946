"""Fuzzing every public entry point: random shapes, dtypes, NaN/inf, huge
finite values, empty inputs, huge k, extreme constructor arguments, wrong
layers, damaged files and crafted files (valid checksum, hostile contents)
for every file kind. Every case ends in a correct result or a clear exception
(ValueError, TypeError, IndexError, RuntimeError, NotImplementedError; for
files, ``CorruptFileError`` naming the file), and what was stored is
unchanged by a failed call.

``KVSTORE_FUZZ_EXAMPLES`` sets the cases per test (CI: the default, 150;
the long run: ``KVSTORE_FUZZ_EXAMPLES=1700``, 10 200 cases in all).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kvstore
from kvstore import KVStore, StoreConfig
from kvstore._fileformat import CorruptFileError, serialize
from kvstore.index_base import deserialize_index

CLEAR = (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError)
EXAMPLES = int(os.environ.get("KVSTORE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
FACTORIES = ["Flat", "Graph8", "Wave4", "IVF4,Flat", "HNSW8"]
faiss = pytest.importorskip("faiss")


def make_array(draw, rows, cols):
    """A float array in a random container, dtype, scale, with optional NaN/inf."""
    kind = draw(st.sampled_from(["np32"] * 4 + ["np16", "np64", "npint", "t32", "t16", "tbf16", "list"]))
    a = np.random.default_rng(draw(st.integers(0, 2**31))).standard_normal((rows, cols)).astype(np.float32)
    a *= np.float32(10.0 ** draw(st.sampled_from([0] * 8 + [4, 17, 18, 19, 20, 30, 37])))
    poison = draw(st.sampled_from([None] * 9 + [np.nan, np.inf, -np.inf]))
    if poison is not None and a.size:
        a.flat[draw(st.integers(0, a.size - 1))] = poison
    if kind == "np16":
        return a.astype(np.float16)
    if kind == "np64":
        return a.astype(np.float64)
    if kind == "npint":
        return (a * 10).astype(np.int32) if np.isfinite(a).all() and np.abs(a).max(initial=0) < 1e8 \
            else a.astype(np.float16)
    if kind.startswith("t"):
        t = torch.from_numpy(a)
        return {"t32": t, "t16": t.half(), "tbf16": t.bfloat16()}[kind]
    if kind == "list":
        return a.tolist()
    return a


def as_numpy(x):
    if isinstance(x, torch.Tensor):
        return (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    return np.asarray(x)


def check_search_result(index, queries, k, D, I):
    """Shapes, dtypes, padding, and exact scores: each returned id's score is its true inner product."""
    D, I = as_numpy(D), as_numpy(I)
    nq = len(queries)
    assert D.shape == I.shape == (nq, k) and D.dtype == np.float32 and I.dtype == np.int64
    assert ((I >= -1) & (I < index.ntotal)).all()
    valid = I >= 0
    assert np.isfinite(D[valid]).all() and np.isneginf(D[~valid]).all()
    assert (D[:, :-1] >= D[:, 1:]).all()
    if valid.any():
        q = as_numpy(queries).astype(np.float32).astype(np.float64)
        keys = index.reconstruct_n().astype(np.float64)
        true = np.einsum("qd,qkd->qk", q, keys[np.where(valid, I, 0)])
        err = np.abs(D[valid] - true[valid]) / (1 + np.abs(true[valid]))
        assert err.max() < 1e-3, f"returned scores are not the ids' inner products (relative error {err.max()})"


@st.composite
def index_case(draw):
    dim = draw(st.integers(1, 12))
    n = draw(st.integers(0, 60))
    keys = make_array(draw, n, draw(st.sampled_from([dim] * 9 + [dim + 1])))
    queries = make_array(draw, draw(st.integers(0, 8)), draw(st.sampled_from([dim] * 9 + [max(1, dim - 1)])))
    k = draw(st.one_of(st.integers(1, 200), st.integers(1, 200), st.integers(-3, 0), st.just(10**9),
                       st.floats(0, 5), st.just(None)))
    return dim, draw(st.sampled_from(FACTORIES)), keys, queries, k


@FUZZ
@given(index_case())
def test_index_entry_points(case):
    dim, factory, keys, queries, k = case
    index = kvstore.index_factory(dim, factory)
    try:
        index.build(keys, keys) if factory.startswith("Graph") else index.build(keys)
    except CLEAR as e:
        event(f"build refused: {type(e).__name__}")
        assert index.ntotal == 0
        return
    before = index.reconstruct_n()
    try:
        D, I = index.search(queries, k)
    except CLEAR as e:
        event(f"search refused: {type(e).__name__}")
        np.testing.assert_array_equal(index.reconstruct_n(), before)
        return
    event("searched")
    check_search_result(index, queries, k, D, I)


# --------------------------------------------------------------------------- parameter extremes

EXTREME_INTS = [0, 1, 2, 3, -1, 2**31 - 1, 2**31, 2**32, 2**63, 2**64 - 1, 2**64, -(2**64), 10**30]
EXTREME = st.one_of(st.sampled_from(EXTREME_INTS), st.integers(-5, 70), st.sampled_from(
    [2.7, float("nan"), float("inf"), True, False, None, "x", "8", [3], np.int64(4), np.uint64(2**63)]))
PARAMS = {
    "Flat": (kvstore.FlatIndex, []),
    "Graph": (kvstore.AttentionGraphIndex, ["degree", "train_topk", "max_train_queries", "ef_construction",
                                            "ef_search", "num_entry_points", "pivots_per_query",
                                            "geometric_degree", "exact_geometric_limit", "seed", "num_threads"]),
    "Wave": (kvstore.WaveIndex, ["tokens_per_cluster", "segment_len", "kmeans_iters", "seed", "n_probe",
                                 "num_threads"]),
    "IVF": (kvstore.IVFIndex, ["nlist", "nprobe", "seed"]),
    "HNSW": (kvstore.HNSWIndex, ["M", "ef_construction", "ef_search"]),
}
KNOBS = {"Graph": "ef", "Wave": "n_probe", "IVF": "nprobe", "HNSW": "ef"}


@FUZZ
@given(st.sampled_from(sorted(PARAMS)), st.data())
def test_parameter_extremes(name, data):
    cls, names = PARAMS[name]
    kw = {p: data.draw(EXTREME, label=p) for p in data.draw(st.sets(st.sampled_from(names or ["-"])))
          if p != "-"}
    dim = data.draw(st.sampled_from([1, 4, 2**16, 2**16 + 1, 0, -3, 2**40, 2.0]), label="dim")
    try:
        index = cls(dim, **kw)
    except (ValueError, TypeError) as e:
        named = [p for p in [*kw, "dim"] if p in str(e)]
        assert named, f"the message must name the argument: {e}"
        event("refused")
        return
    event("constructed")
    if index.dim > 64:
        return
    keys = np.random.default_rng(0).standard_normal((80, index.dim)).astype(np.float32)
    try:
        index.build(keys, keys) if name == "Graph" else index.build(keys)
    except CLEAR as e:  # e.g. geometric_degree >= degree is caught at construction; others may refuse here
        event(f"build refused: {type(e).__name__}")
        return
    knob = KNOBS.get(name)
    params = {}
    if knob is not None:
        params[knob] = data.draw(EXTREME, label=knob)
    try:
        D, I = index.search(keys[:3], data.draw(st.sampled_from([1, 5, 80, 200, 2**20, 2**20 + 1])), **params)
    except (ValueError, TypeError) as e:
        assert any(p in str(e) for p in ("k", knob or "k")), e
        return
    check_search_result(index, keys[:3], D.shape[1], D, I)


# --------------------------------------------------------------------------- crafted files

def small_index(kind: str, seed: int) -> kvstore.Index:
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((int(rng.integers(30, 90)), 6)).astype(np.float32)
    index = kvstore.index_factory(6, kind)
    if kind.startswith("Graph"):
        return index.build(keys, keys)
    if kind.startswith("Wave") and seed % 2:
        return index.build(keys, rng.standard_normal((len(keys), 3)).astype(np.float32))
    return index.build(keys)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.sampled_from(EXTREME_INTS), st.integers(-3, 100),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)


def mutate_meta(data, meta: dict) -> None:
    """Replace, drop or add one (possibly nested) meta value."""
    target = meta
    while True:
        key = data.draw(st.sampled_from(sorted(target) + ["<new>"]), label="meta key")
        if key != "<new>" and isinstance(target[key], dict) and data.draw(st.booleans()):
            target = target[key]
            continue
        break
    how = data.draw(st.sampled_from(["replace", "replace", "drop", "add"]), label="meta op")
    if how == "drop" and key != "<new>":
        del target[key]
    else:
        target[key] = data.draw(JSON_VALUES, label="meta value")


def mutate_arrays(data, arrays: dict) -> None:
    """Change one array: an element (to NaN, inf, huge, an id out of range), its shape,
    its dtype, drop it, or add a stray one."""
    if not arrays:
        arrays["stray"] = np.zeros(3, np.float32)
        return
    name = data.draw(st.sampled_from(sorted(arrays)), label="array")
    a = np.array(arrays[name])
    how = data.draw(st.sampled_from(["element"] * 4 + ["shape", "dtype", "drop", "stray", "permute"]),
                    label="array op")
    if how == "element" and a.size:
        i = data.draw(st.integers(0, a.size - 1))
        v = data.draw(st.sampled_from([-1, -2, 0, 1, 2**31 - 1, 2**31, 10**6, 3.0e38, 1e30, 1e20, float("nan"),
                                       float("inf")]), label="value")
        if a.dtype.kind in "iu":
            v = int(v) if isinstance(v, int) or math.isfinite(v) and abs(v) < 2**62 else -1
            v = int(np.clip(v, np.iinfo(a.dtype).min, np.iinfo(a.dtype).max))
        a.flat[i] = v
        arrays[name] = a
    elif how == "shape":
        shape = data.draw(st.lists(st.integers(0, 8), min_size=0, max_size=3), label="shape")
        arrays[name] = np.zeros(shape, a.dtype)
    elif how == "dtype":
        arrays[name] = a.astype(data.draw(st.sampled_from([np.float64, np.float16, np.int32, np.int64, np.uint8,
                                                           np.bool_, np.complex64])))
    elif how == "drop":
        del arrays[name]
    elif how == "permute" and a.size > 1:
        arrays[name] = np.random.default_rng(data.draw(st.integers(0, 99))).permutation(a.reshape(-1)) \
            .reshape(a.shape)
    else:
        arrays[f"{name}_"] = a


def check_usable(index: kvstore.Index) -> None:
    """A loaded index answers, reconstructs, grows and saves consistently."""
    q = np.random.default_rng(1).standard_normal((3, index.dim)).astype(np.float32)
    if index.ntotal:
        D, I = index.search(q, 4)
        check_search_result(index, q, 4, D, I)
        assert index.reconstruct_n().shape == (index.ntotal, index.dim)
    back = deserialize_index(index.serialize())
    assert back.ntotal == index.ntotal


@FUZZ
@given(st.sampled_from(FACTORIES), st.integers(0, 10**6), st.data())
def test_crafted_index_files(kind, seed, data):
    """Hostile contents under a valid checksum: a CorruptFileError at load, or an index that works."""
    index = small_index(kind, seed)
    meta, arrays = index._state()
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        if data.draw(st.booleans(), label="meta?"):
            mutate_meta(data, meta)
        else:
            mutate_arrays(data, arrays)
    try:
        blob = serialize(index.KIND, meta, arrays)
    except TypeError:  # e.g. a complex or NaN value the writer itself refuses
        event("unwritable")
        return
    try:
        loaded = deserialize_index(blob)
    except CorruptFileError as e:
        assert e.path == "<serialized index>"
        event(f"refused: {e.reason[:40]}")
        return
    event("loaded")
    check_usable(loaded)


def small_store(method: str, seed: int) -> tuple[KVStore, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    store = KVStore(1, 1, 8, StoreConfig(method=method, window=4, sink=2, update_interval=8, tokens_per_cluster=4,
                                         top_k=4))
    store.prefill(0, torch.randn(1, 1, 40, 8, generator=g), torch.randn(1, 1, 40, 8, generator=g),
                  q=torch.randn(1, 2, 40, 8, generator=g))
    return store, torch.randn(1, 2, 1, 8, generator=g)


def head_parts(meta: dict) -> list[dict]:
    rows = [e["state"]["rows"] for e in meta["layers"] if isinstance(e, dict) and e.get("kind") == "heads"]
    return [m for r in rows for row in r for m in row if isinstance(m, dict)]


@FUZZ
@given(st.sampled_from(["wave", "graph", "quest", "streaming", "full"]), st.integers(0, 10**6), st.data())
def test_crafted_store_files_index_parts(tmp_path_factory, method, seed, data):
    """Crafted head indexes and arrays inside a store (valid checksum): refused at load, or attendable.

    (Crafted store-level metadata is fuzzed by ``test_crafted_store_metadata``.)
    """
    from kvstore._fileformat import read_container, write_container

    store, q = small_store(method, seed)
    path = tmp_path_factory.mktemp("crafted") / "s.kvstore"
    store.save(path)
    kind, meta, arrays = read_container(path)
    index_meta = [m["index"] for m in head_parts(meta) if isinstance(m.get("index"), dict)]
    index_arrays = {k[len("L0.B0.H0.index."):]: v for k, v in arrays.items() if k.startswith("L0.B0.H0.index.")}
    if not index_meta:
        event("no index in this store")
        return
    if data.draw(st.booleans(), label="meta?"):
        mutate_meta(data, index_meta[0])
    else:
        mutate_arrays(data, index_arrays)
        arrays = {k: v for k, v in arrays.items() if not k.startswith("L0.B0.H0.index.")}
        arrays.update({f"L0.B0.H0.index.{k}": v for k, v in index_arrays.items()})
    try:
        write_container(path, kind, meta, arrays)
    except TypeError:
        return
    try:
        back = KVStore.load(path)
    except CorruptFileError as e:
        assert e.path == str(path)
        event("refused")
        return
    event("loaded")
    out = back.attend(0, q)
    assert out.shape == q.shape and torch.isfinite(out).all()


def _mutations() -> st.SearchStrategy:
    """A JSON value a crafted file might put anywhere: wrong types, huge or negative ints, nesting."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
                     st.text(max_size=4), st.sampled_from([0, 1, -1, 10 ** 9, 2 ** 31, 2 ** 64]))
    return st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=3), c,
                                                                                          max_size=3)), max_leaves=6)


def _paths(x, prefix=()):
    """Every (path, value) inside a JSON value."""
    yield prefix, x
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(st.sampled_from(["wave", "graph", "quest", "streaming", "full", "oracle"]), st.integers(0, 10**6), st.data())
def test_crafted_store_metadata(tmp_path_factory, method, seed, data):
    """Any field of a store's metadata replaced by a crafted value (valid checksum): ``CorruptFileError`` at
    load, or a store that attends."""
    import time

    from kvstore._fileformat import read_container, write_container

    store, q = small_store(method, seed)
    path = tmp_path_factory.mktemp("crafted") / "s.kvstore"
    store.save(path)
    kind, meta, arrays = read_container(path)
    paths = [p for p, _ in _paths(meta) if p]
    where = data.draw(st.sampled_from(paths), label="field")
    node = meta
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = data.draw(_mutations(), label="value")
    try:
        write_container(path, kind, meta, arrays)
    except (TypeError, ValueError):
        return
    t0 = time.perf_counter()
    try:
        back = KVStore.load(path)
    except CorruptFileError as e:
        assert e.path == str(path)
        assert time.perf_counter() - t0 < 10, "a crafted file must be refused before any large allocation"
        event("refused")
        return
    if back.layer_cache(0) is None:                 # a store whose layer is empty: valid, prefill comes first
        with pytest.raises(RuntimeError, match="prefill"):
            back.attend(0, q)
        event("loaded an empty layer")
        return
    event("loaded")
    out = back.attend(0, q)
    assert out.shape == q.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------- stores

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
@given(st.integers(0, 10**6), st.sampled_from(["truncate", "flip", "append", "zero"]),
       st.sampled_from(["store"] + FACTORIES))
def test_damaged_files_are_always_refused(tmp_path_factory, where, how, kind):
    tmp = tmp_path_factory.mktemp("fz")
    path = tmp / "s.kvstore"
    if kind == "store":
        store = KVStore(1, 1, 8, StoreConfig(method="quest", window=4))
        store.prefill(0, torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8))
        store.save(path)
        load = KVStore.load
    else:
        small_index(kind, where).save(path)
        load = kvstore.load_index
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
        load(path)
