"""FlatIndex against a float64 reference; the faiss IVF / HNSW wrappers; input validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.faiss_indexes import HNSWIndex, IVFIndex  # importable without faiss (imported lazily)
from kvstore.flat import FlatIndex
from kvstore.index_base import load_index
from kvstore.metrics import recall_at_k

try:
    import faiss
except ImportError:  # pragma: no cover
    faiss = None
needs_faiss = pytest.mark.skipif(faiss is None, reason="faiss not installed")

DIM = 32


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((3000, DIM)).astype(np.float32)
    queries = rng.standard_normal((40, DIM)).astype(np.float32)
    return keys, queries


def reference_topk(queries, keys, k):
    s = queries.astype(np.float64) @ keys.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def check_result_format(D, I, scanned, nq, k):
    assert D.shape == (nq, k) and D.dtype == np.float32
    assert I.shape == (nq, k) and I.dtype == np.int64
    assert scanned.shape == (nq,) and scanned.dtype == np.int64
    assert (D[:, :-1] >= D[:, 1:]).all(), "scores must be descending"
    assert ((I == -1) == np.isneginf(D)).all(), "padding must be id -1 with score -inf"


# --- FlatIndex -----------------------------------------------------------------
def test_flat_matches_float64_reference(data):
    keys, queries = data
    index = FlatIndex(DIM)
    index.build(keys)
    assert index.ntotal == len(keys) and index.dim == DIM
    D, I, scanned = index.search_with_stats(queries, 10)
    check_result_format(D, I, scanned, len(queries), 10)
    Dref, Iref = reference_topk(queries, keys, 10)
    np.testing.assert_allclose(D, Dref, rtol=1e-5, atol=1e-4)
    assert (I == Iref).mean() > 0.99  # ids may swap only at float32-level near-ties
    np.testing.assert_array_equal(recall_at_k(I, queries, keys, 10), 1.0)
    np.testing.assert_array_equal(scanned, len(keys))


def test_flat_incremental_add_equals_build(data):
    keys, queries = data
    a, b = FlatIndex(DIM), FlatIndex(DIM)
    a.build(keys)
    for chunk in np.array_split(keys, 7):
        b.add(chunk)
    for i in range(5):  # single-row adds, as in decoding
        b.add(keys[i:i + 1])
    assert b.ntotal == len(keys) + 5
    np.testing.assert_array_equal(b.keys[:len(keys)], a.keys)
    Da, Ia = a.search(queries, 5)
    Db, Ib = b.search(queries, 5)
    np.testing.assert_array_equal(Da, Db)
    assert (np.where(Ib >= len(keys), Ib - len(keys), Ib) == Ia).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flat_low_precision_torch_input(data, dtype):
    keys, queries = data
    kt, qt = torch.from_numpy(keys).to(dtype), torch.from_numpy(queries).to(dtype)
    index = FlatIndex(DIM)
    index.build(kt)
    D, I = index.search(qt, 8)
    k32, q32 = kt.float().numpy(), qt.float().numpy()  # exactly what the index sees
    Dref, _ = reference_topk(q32, k32, 8)
    np.testing.assert_allclose(D, Dref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(recall_at_k(I, q32, k32, 8), 1.0)


def test_flat_k_larger_than_ntotal(data):
    keys, queries = data
    index = FlatIndex(DIM)
    index.build(keys[:3])
    D, I, scanned = index.search_with_stats(queries[:4], 7)
    check_result_format(D, I, scanned, 4, 7)
    assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
    assert (np.sort(I[:, :3], axis=1) == [0, 1, 2]).all()


def test_flat_empty_queries(data):
    keys, _ = data
    index = FlatIndex(DIM)
    index.build(keys)
    D, I, s = index.search_with_stats(np.zeros((0, DIM), np.float32), 4)
    assert D.shape == I.shape == (0, 4) and s.shape == (0,)


def test_flat_save_load(tmp_path, data):
    keys, queries = data
    index = FlatIndex(DIM)
    index.build(keys[:500])
    index.save(tmp_path / "flat.kvs")
    loaded = load_index(tmp_path / "flat.kvs")
    assert isinstance(loaded, FlatIndex) and loaded.ntotal == 500
    np.testing.assert_array_equal(loaded.keys, index.keys)
    for a, b in zip(loaded.search(queries, 5), index.search(queries, 5)):
        np.testing.assert_array_equal(a, b)
    loaded.add(keys[500:510])  # a loaded index keeps growing
    assert loaded.ntotal == 510


@pytest.mark.parametrize("meta, arrays", [
    ({"dim": 4, "ntotal": 2}, {"keys": np.zeros((3, 4), np.float32)}),
    ({"dim": 4, "ntotal": 2}, {"keys": np.zeros((2, 5), np.float32)}),
    ({"dim": 4, "ntotal": 2}, {"keys": np.zeros((2, 4), np.float64)}),
    ({"dim": 4, "ntotal": 2}, {"keys": np.full((2, 4), np.nan, np.float32)}),
    ({"dim": 0, "ntotal": 0}, {"keys": np.zeros((0, 0), np.float32)}),
    ({"dim": 4, "ntotal": -1}, {"keys": np.zeros((0, 4), np.float32)}),
    ({"dim": 4, "ntotal": 2}, {}),
    ({"ntotal": 2}, {"keys": np.zeros((2, 4), np.float32)}),
])
def test_flat_from_state_rejects_inconsistent(tmp_path, meta, arrays):
    from kvstore._fileformat import write_container
    path = tmp_path / "bad.kvs"
    write_container(path, "flat", meta, arrays)
    with pytest.raises(ValueError, match="bad.kvs"):
        load_index(path)


# --- input validation (shared by every index) -----------------------------------
@pytest.fixture(params=[
    pytest.param(FlatIndex, id="flat"),
    pytest.param(lambda d: IVFIndex(d, nlist=8), id="ivf", marks=needs_faiss),
    pytest.param(lambda d: HNSWIndex(d, M=8), id="hnsw", marks=needs_faiss),
])
def make_index(request):
    return request.param


def test_search_before_build(make_index, data):
    _, queries = data
    with pytest.raises(RuntimeError, match="build"):
        make_index(DIM).search(queries, 3)


@pytest.mark.parametrize("bad, exc, word", [
    (np.zeros((5, DIM + 1), np.float32), ValueError, "keys"),
    (np.zeros(DIM, np.float32), ValueError, "keys"),
    (np.full((5, DIM), np.nan, np.float32), ValueError, "keys"),
    (np.zeros((5, DIM), np.int32), TypeError, "keys"),
    (np.zeros((0, DIM), np.float32), ValueError, "keys"),
    ([[0.0] * DIM] * 5, TypeError, "keys"),
])
def test_bad_keys(make_index, bad, exc, word):
    with pytest.raises(exc, match=word):
        make_index(DIM).build(bad)
    if bad.__len__() == 0:  # adding nothing is allowed everywhere and returns no ids
        assert make_index(DIM).add(bad).shape == (0,)
        return
    with pytest.raises(exc, match=word):
        make_index(DIM).add(bad)


@pytest.mark.parametrize("bad, exc", [
    (np.zeros((5, DIM + 1), np.float32), ValueError),
    (np.zeros(DIM, np.float32), ValueError),
    (np.full((2, DIM), np.inf, np.float32), ValueError),
    (np.zeros((2, DIM), np.int64), TypeError),
    (torch.zeros(2, DIM, dtype=torch.int32), TypeError),
    ([[0.0] * DIM], TypeError),
])
def test_bad_queries(make_index, data, bad, exc):
    keys, _ = data
    index = make_index(DIM)
    index.build(keys[:500])
    with pytest.raises(exc, match="queries"):
        index.search(bad, 3)


@pytest.mark.parametrize("k, exc", [(0, ValueError), (-2, ValueError), (2.0, TypeError), ("3", TypeError),
                                    (True, TypeError), (None, TypeError)])
def test_bad_k(make_index, data, k, exc):
    keys, queries = data
    index = make_index(DIM)
    index.build(keys[:500])
    with pytest.raises(exc, match="k"):
        index.search(queries, k)


@pytest.mark.parametrize("dim", [0, -3, 2.5, "8", True])
def test_bad_dim(make_index, dim):
    with pytest.raises(ValueError, match="dim"):
        make_index(dim)


# --- faiss wrappers ----------------------------------------------------------------
@needs_faiss
def test_ivf_full_probe_is_exact(data):
    keys, queries = data
    index = IVFIndex(DIM, nlist=16, nprobe=2)
    index.build(keys)
    assert index.nlist == 16
    D, I, scanned = index.search_with_stats(queries, 10, nprobe=16)
    check_result_format(D, I, scanned, len(queries), 10)
    np.testing.assert_array_equal(recall_at_k(I, queries, keys, 10), 1.0)
    np.testing.assert_array_equal(scanned, 16 + len(keys))


@needs_faiss
def test_ivf_scanned_matches_faiss_counter(data):
    keys, queries = data
    index = IVFIndex(DIM, nlist=32, nprobe=3)
    index.build(keys)
    faiss.cvar.indexIVF_stats.reset()
    D, I, scanned = index.search_with_stats(queries, 10)
    check_result_format(D, I, scanned, len(queries), 10)
    assert faiss.cvar.indexIVF_stats.ndis == (scanned - 32).sum()
    assert (scanned > 32).all() and (scanned < 32 + len(keys)).all()
    # default nprobe of the wrapper is used, and an explicit one overrides it
    _, _, s1 = index.search_with_stats(queries, 10, nprobe=1)
    assert (s1 < scanned).all()


@needs_faiss
def test_ivf_nlist_clamped_and_deterministic(data):
    keys, queries = data
    a = IVFIndex(DIM, nlist=1024, seed=3)
    a.build(keys[:400])
    assert a.nlist == 400 // 39
    b = IVFIndex(DIM, nlist=1024, seed=3)
    b.build(keys[:400])
    for x, y in zip(a.search_with_stats(queries, 5), b.search_with_stats(queries, 5)):
        np.testing.assert_array_equal(x, y)
    tiny = IVFIndex(DIM)
    tiny.build(keys[:3])
    assert tiny.nlist == 1


@needs_faiss
def test_ivf_add_after_build(data):
    keys, queries = data
    index = IVFIndex(DIM, nlist=8)
    index.build(keys[:1000])
    index.add(keys[1000:])
    assert index.ntotal == len(keys)
    _, I, scanned = index.search_with_stats(queries, 5, nprobe=8)
    np.testing.assert_array_equal(recall_at_k(I, queries, keys, 5), 1.0)
    np.testing.assert_array_equal(scanned, 8 + len(keys))


@needs_faiss
def test_hnsw_large_ef_is_near_exact(data):
    keys, queries = data
    index = HNSWIndex(DIM, M=16, ef_construction=100)
    index.build(keys)
    D, I, scanned = index.search_with_stats(queries, 10, ef=400)
    check_result_format(D, I, scanned, len(queries), 10)
    assert recall_at_k(I, queries, keys, 10).mean() >= 0.99
    assert (scanned > 0).all()
    _, _, small = index.search_with_stats(queries, 10, ef=16)
    assert small.mean() < scanned.mean()


@needs_faiss
@pytest.mark.parametrize("make", [lambda: IVFIndex(DIM, nlist=4), lambda: HNSWIndex(DIM, M=4)],
                         ids=["ivf", "hnsw"])
def test_faiss_padding(data, make):
    keys, queries = data
    index = make()
    index.build(keys[:3])
    D, I, scanned = index.search_with_stats(queries[:5], 6)
    check_result_format(D, I, scanned, 5, 6)
    assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
    assert (np.sort(I[:, :3], axis=1) == [0, 1, 2]).all()


@needs_faiss
def test_faiss_bad_params(data):
    keys, queries = data
    ivf, hnsw = IVFIndex(DIM, nlist=4), HNSWIndex(DIM, M=4)
    ivf.build(keys[:500])
    hnsw.build(keys[:500])
    with pytest.raises(ValueError, match="nprobe"):
        ivf.search(queries, 3, nprobe=0)
    with pytest.raises(ValueError, match="ef"):
        hnsw.search(queries, 3, ef=0)
    with pytest.raises(ValueError, match="nlist"):
        IVFIndex(DIM, nlist=0)
    with pytest.raises(ValueError, match="M"):
        HNSWIndex(DIM, M=1)


def test_missing_faiss_message(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"faiss is needed for IVFIndex: pip install 'kvstore\[faiss\]'"):
        IVFIndex(DIM)
    with pytest.raises(ImportError, match="HNSWIndex"):
        HNSWIndex(DIM)


@needs_faiss
def test_factory(data):
    from kvstore.factory import index_factory
    assert isinstance(index_factory(DIM, "Flat"), FlatIndex)
    ivf = index_factory(DIM, "IVF64,Flat", nprobe=5)
    assert isinstance(ivf, IVFIndex) and ivf.nlist == 64 and ivf.nprobe == 5
    hnsw = index_factory(DIM, " HNSW12 ", ef_search=99)
    assert isinstance(hnsw, HNSWIndex) and hnsw.M == 12 and hnsw.ef_search == 99
    for bad in ["", "flat", "IVF,Flat", "IVF64", "HNSW", "Graph", "PQ8", "Wave16x"]:
        with pytest.raises(ValueError, match="accepted forms.*IVF<nlist>,Flat"):
            index_factory(DIM, bad)
    with pytest.raises(TypeError):
        index_factory(DIM, 5)


def test_factory_graph_passes_degree_and_kwargs(monkeypatch):
    """``Graph<degree>`` builds kvstore.graph.AttentionGraphIndex (faked here: written elsewhere)."""
    import sys
    import types

    from kvstore.factory import index_factory
    from kvstore.index_base import Index

    class FakeGraph(Index):
        def __init__(self, dim, degree=32, **kw):
            super().__init__(dim)
            self.degree, self.kw = degree, kw

    fake = types.ModuleType("kvstore.graph")
    fake.AttentionGraphIndex = FakeGraph
    monkeypatch.setitem(sys.modules, "kvstore.graph", fake)
    g = index_factory(DIM, "Graph24", ef_search=50)
    assert isinstance(g, FakeGraph) and g.degree == 24 and g.kw == {"ef_search": 50} and g.dim == DIM
