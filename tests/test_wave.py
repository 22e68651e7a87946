"""WaveIndex (RetroInfer segmented k-means) against float64 references, and its
contract: k-means invariants, determinism, the torch twin of the C++ clustering,
exact search at full probe, scanned counts, add, persistence, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kvstore
from kvstore import _C
from kvstore._fileformat import CorruptFileError, read_container, write_container
from kvstore.benchmarks.recall import Head, default_methods, sweep_head
from kvstore.metrics import recall_at_k
from kvstore.wave import WaveIndex, _kmeans_torch, clusters_for, segment_bounds


def data(n=3000, d=32, dv=16, nq=40, seed=None):
    """Keys with a common offset (like real keys), values of another dim, queries; fresh each call."""
    rng = np.random.default_rng(seed)
    keys = (rng.standard_normal((n, d)) + 2.0 * rng.standard_normal(d)).astype(np.float32)
    values = rng.standard_normal((n, dv)).astype(np.float32)
    queries = (rng.standard_normal((nq, d)) * 2).astype(np.float32)
    return keys, values, queries


def blobs(n_blobs=40, per=16, d=32, noise=0.3, shuffle=True, seed=None):
    """Well-separated clusters (centres of norm 10, far apart), shuffled or blob after blob."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, d))
    centres = 10 * centres / np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, per, axis=0) + noise * rng.standard_normal((n_blobs * per, d))
    return (x[rng.permutation(len(x))] if shuffle else x).astype(np.float32)


def float64_topk(q, keys, k):
    s = q.astype(np.float64) @ keys.astype(np.float64).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def check_invariants(idx: WaveIndex, keys: np.ndarray, values: np.ndarray | None):
    """Every token in exactly one cluster; CSR, sizes, sums, centroids and sorted KV match the members."""
    n, C = idx.ntotal, idx.num_clusters
    order, offsets = idx.order.numpy(), idx.offsets.numpy()
    assert order.dtype == np.int64 and offsets.dtype == np.int64
    assert offsets.shape == (C + 1,) and offsets[0] == 0 and offsets[-1] == n
    assert (np.diff(offsets) >= 1).all()                      # no empty cluster
    assert (np.sort(order) == np.arange(n)).all()             # a permutation: each token exactly once
    sizes = idx.sizes.numpy()
    assert sizes.dtype == np.float32 and (sizes == np.diff(offsets)).all()
    assert np.array_equal(idx.keys_sorted.numpy(), keys[order])
    cen = idx.centroids.numpy()
    assert cen.dtype == np.float32 and cen.shape == (C, idx.dim)
    k64 = keys.astype(np.float64)
    for c in range(C):
        members = order[offsets[c]:offsets[c + 1]]
        assert (np.diff(members) > 0).all()                   # input order inside a cluster
        np.testing.assert_allclose(cen[c], k64[members].mean(0), rtol=1e-5, atol=1e-5)
    if values is None:
        assert idx.values_sorted is None and idx.value_sums is None
    else:
        assert np.array_equal(idx.values_sorted.numpy(), values[order])
        sums = np.add.reduceat(values.astype(np.float64)[order], offsets[:-1], axis=0)
        np.testing.assert_allclose(idx.value_sums.numpy(), sums, rtol=1e-6, atol=1e-5)
    seg = idx.segment_of_cluster.numpy()
    assert seg.shape == (C,) and (np.diff(seg) >= 0).all()


# ----------------------------------------------------------------------------- clustering

def test_kmeans_invariants_and_segments():
    keys, values, _ = data(n=5000)
    idx = WaveIndex(32, tokens_per_cluster=16, segment_len=2048).build(keys, values)
    check_invariants(idx, keys, values)
    bounds = segment_bounds(5000, 16, 2048)
    assert bounds == [0, 2048, 4096, 5000] and idx.num_segments == 3
    seg_of_token = np.searchsorted(bounds, np.arange(5000), side="right") - 1
    order, offsets, seg = idx.order.numpy(), idx.offsets.numpy(), idx.segment_of_cluster.numpy()
    for c in range(idx.num_clusters):  # a cluster never spans segments
        assert (seg_of_token[order[offsets[c]:offsets[c + 1]]] == seg[c]).all()
    for s in range(3):
        assert 1 <= (seg == s).sum() <= clusters_for(bounds[s + 1] - bounds[s], 16)
    assert abs(idx.num_clusters - 5000 / 16) <= 0.1 * 5000 / 16
    assert idx.members(7).tolist() == order[offsets[7]:offsets[8]].tolist()


def test_tiny_last_segment_joins_the_previous_one():
    assert segment_bounds(2 * 100 + 7, 4, 100) == [0, 100, 207]
    assert segment_bounds(2 * 100 + 8, 4, 100) == [0, 100, 200, 208]
    assert segment_bounds(5, 16, 100) == [0, 5]
    assert clusters_for(5, 16) == 1 and clusters_for(24, 16) == 2 and clusters_for(23, 16) == 1
    keys, _, _ = data(n=207)
    idx = WaveIndex(32, tokens_per_cluster=4, segment_len=100).build(keys)
    assert idx.num_segments == 2
    check_invariants(idx, keys, None)


def test_core_kmeans_outputs():
    keys, _, _ = data(n=1000)
    a, c, s = _C.segmented_kmeans(keys, 8, 400, 5, 3, 2)
    assert a.dtype == np.int32 and c.dtype == np.float32 and s.dtype == np.float32
    C = c.shape[0]
    assert a.min() == 0 and a.max() == C - 1 and s.shape == (C,)
    assert (np.bincount(a, minlength=C) == s).all() and s.sum() == 1000
    for j in range(C):
        np.testing.assert_allclose(c[j], keys[a == j].astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keys"):
        _C.segmented_kmeans(np.zeros((0, 4), np.float32), 8, 400, 5, 0, 1)
    with pytest.raises(ValueError, match="tokens_per_cluster"):
        _C.segmented_kmeans(keys, 0, 400, 5, 0, 1)


def test_final_assignment_is_by_inner_product_with_normalised_centroids():
    """Each token's cluster is the argmax of its centred key against the
    normalised (centred) centroids of the final pass, whose plain means are the
    stored centroids; so re-assigning with the stored centroids changes little."""
    keys, _, _ = data(n=2000)
    idx = WaveIndex(32, kmeans_iters=10).build(keys)
    mean = keys.astype(np.float64).mean(0)
    cen = idx.centroids.numpy().astype(np.float64) - mean
    cen /= np.linalg.norm(cen, axis=1, keepdims=True)
    own = np.empty(2000, np.int64)
    own[idx.order.numpy()] = np.repeat(np.arange(idx.num_clusters), np.diff(idx.offsets.numpy()))
    best = np.argmax((keys - mean) @ cen.T, axis=1)
    assert (best == own).mean() > 0.9  # converged k-means: a mean step moves few tokens


def test_deterministic_for_a_seed_whatever_the_threads():
    keys, values, queries = data(n=4000)
    a = WaveIndex(32, segment_len=1000, seed=5, num_threads=1).build(keys, values)
    b = WaveIndex(32, segment_len=1000, seed=5, num_threads=2).build(keys, values)
    for f in ("centroids", "sizes", "value_sums", "offsets", "order", "keys_sorted", "segment_of_cluster"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert all((x == y).all() for x, y in zip(a.search_with_stats(queries, 8), b.search_with_stats(queries, 8)))
    c = WaveIndex(32, segment_len=1000, seed=6).build(keys, values)
    assert not torch.equal(a.order, c.order)  # another seed, another init


def test_torch_path_matches_cpp():
    # well separated, blob after blob (the strided init takes one token of each
    # blob): identical assignments, sizes and (up to rounding) centroids
    for segment_len in (8192, 320):
        x = blobs(shuffle=False)
        a_c, c_c, s_c = _C.segmented_kmeans(x, 16, segment_len, 10, 0, 2)
        a_t, c_t, s_t = _kmeans_torch(torch.from_numpy(x), 16, segment_len, 10, 0)
        assert a_t.dtype == torch.int64 and c_t.dtype == torch.float32 and s_t.dtype == torch.float32
        assert np.array_equal(a_t.numpy(), a_c) and np.array_equal(s_t.numpy(), s_c)
        np.testing.assert_allclose(c_t.numpy(), c_c, rtol=1e-6, atol=1e-6)
    # shuffled: init takes several tokens of some blobs, whose centroids then
    # split them; equal but for float near-ties between the two implementations
    for segment_len in (8192, 320):
        x = blobs()
        a_c, c_c, s_c = _C.segmented_kmeans(x, 16, segment_len, 10, 0, 2)
        a_t, c_t, s_t = _kmeans_torch(torch.from_numpy(x), 16, segment_len, 10, 0)
        assert c_t.shape == c_c.shape and (a_t.numpy() == a_c).mean() >= 0.99
    # random data: the same invariants
    keys, _, _ = data(n=1500)
    a, c, s = _kmeans_torch(torch.from_numpy(keys), 16, 500, 10, 1)
    C = c.shape[0]
    assert (torch.bincount(a, minlength=C).float() == s).all() and (s >= 1).all()
    for j in range(C):
        np.testing.assert_allclose(c[j].numpy(), keys[a.numpy() == j].astype(np.float64).mean(0),
                                   rtol=1e-5, atol=1e-5)
    a2, _, _ = _C.segmented_kmeans(keys, 16, 500, 10, 1, 2)
    assert (a.numpy() == a2).mean() > 0.95  # same algorithm; only near-ties may differ


def test_empty_clusters_are_reseeded_or_removed():
    # many duplicate keys: strided init hits equal tokens, whose clusters go empty
    rng = np.random.default_rng()
    base = rng.standard_normal((5, 16)).astype(np.float32)
    keys = base[rng.integers(0, 5, 800)]
    idx = WaveIndex(16, tokens_per_cluster=8).build(keys)
    check_invariants(idx, keys, None)
    assert idx.num_clusters <= 100
    a, c, s = _kmeans_torch(torch.from_numpy(keys), 8, 8192, 10, 0)
    assert (s >= 1).all() and s.sum() == 800


# ----------------------------------------------------------------------------- search

def test_full_probe_is_exact_search():
    keys, values, queries = data()
    idx = WaveIndex(32).build(keys, values)
    C = idx.num_clusters
    D, I, scanned = idx.search_with_stats(queries, 10, n_probe=C)
    ref = float64_topk(queries, keys, 10)
    assert recall_at_k(I, queries, keys, 10).mean() == 1.0
    assert (np.sort(I, 1) == np.sort(ref, 1)).all()
    exact = np.einsum("qd,qkd->qk", queries.astype(np.float64), keys[I].astype(np.float64))
    np.testing.assert_allclose(D, exact, rtol=1e-5, atol=1e-4)
    assert (np.diff(D, axis=1) <= 0).all()
    assert D.dtype == np.float32 and I.dtype == np.int64 and scanned.dtype == np.int64
    assert (scanned == C + len(keys)).all()
    # n_probe beyond C is clamped
    assert (idx.search(queries, 10, n_probe=10 * C)[1] == I).all()


def test_scanned_counts_centroids_plus_probed_members():
    keys, _, queries = data(n=4000)
    idx = WaveIndex(32, n_probe=6).build(keys)
    C = idx.num_clusters
    sizes, offsets, order = idx.sizes.numpy(), idx.offsets.numpy(), idx.order.numpy()
    cs = queries.astype(np.float64) @ idx.centroids.numpy().astype(np.float64).T
    for p in (1, 6, 25):
        D, I, scanned = idx.search_with_stats(queries, 12, n_probe=p) if p != 6 else idx.search_with_stats(queries, 12)
        probed = np.argsort(-cs, axis=1, kind="stable")[:, :p]
        assert (scanned == C + sizes[probed].sum(1)).all()
        for qi in range(len(queries)):
            members = np.concatenate([order[offsets[c]:offsets[c + 1]] for c in probed[qi]])
            assert set(I[qi][I[qi] >= 0]) <= set(members)
            # the best probed members, exactly
            want = members[np.argsort(-(keys[members].astype(np.float64) @ queries[qi]), kind="stable")[:12]]
            assert set(I[qi][I[qi] >= 0]) == set(want)


def test_recall_grows_with_n_probe():
    keys, _, queries = data(n=8000, nq=64)
    idx = WaveIndex(32).build(keys)
    rec = [recall_at_k(idx.search(queries, 10, n_probe=p)[1], queries, keys, 10).mean() for p in (4, 32, 128)]
    assert rec[0] <= rec[1] <= rec[2] and rec[2] > 0.9


def test_k_larger_than_probed_members_pads():
    keys, _, queries = data(n=40)
    idx = WaveIndex(32, tokens_per_cluster=4).build(keys)
    D, I = idx.search(queries, 60, n_probe=idx.num_clusters)
    assert (I[:, 40:] == -1).all() and np.isneginf(D[:, 40:]).all()
    assert (np.sort(I[:, :40], 1) == np.arange(40)).all()
    D, I, scanned = idx.search_with_stats(queries, 60, n_probe=1)
    for qi in range(len(queries)):
        got = int((I[qi] >= 0).sum())
        assert got == scanned[qi] - idx.num_clusters and (I[qi, got:] == -1).all()


def test_accepts_torch_half_and_bfloat16():
    keys, values, queries = data(n=1000)
    kb = torch.from_numpy(keys).bfloat16()
    idx = WaveIndex(32).build(kb, torch.from_numpy(values).half())
    assert idx.values_sorted.dtype == torch.float32 and idx.keys_sorted.device.type == "cpu"
    qb = torch.from_numpy(queries).bfloat16()
    _, I = idx.search(qb, 4, n_probe=idx.num_clusters)
    assert recall_at_k(I, qb.float().numpy(), kb.float().numpy(), 4).mean() == 1.0


# ----------------------------------------------------------------------------- add

def test_add_then_search_finds_new_keys():
    keys, values, queries = data(n=3000)
    idx = WaveIndex(32, segment_len=1024).build(keys[:2000], values[:2000])
    C0, S0 = idx.num_clusters, idx.num_segments
    ids = idx.add(keys[2000:], values[2000:])
    assert (ids == np.arange(2000, 3000)).all() and idx.ntotal == 3000
    assert idx.num_segments == S0 + 1  # 1000 tokens < segment_len: one new segment
    check_invariants(idx, keys, values)
    order, offsets = idx.order.numpy(), idx.offsets.numpy()
    assert (order[offsets[C0]:] >= 2000).all() and (order[:offsets[C0]] < 2000).all()
    assert (idx.segment_of_cluster.numpy()[C0:] == S0).all()
    _, I = idx.search(queries, 10, n_probe=idx.num_clusters)
    assert recall_at_k(I, queries, keys, 10).mean() == 1.0
    # a group of new keys in a direction of its own is found by partial probes
    rng = np.random.default_rng()
    v = rng.standard_normal(32)
    v /= np.linalg.norm(v)
    group = (rng.standard_normal((1000, 32)) + 6 * v).astype(np.float32)
    aimed = (rng.standard_normal((40, 32)) + 4 * v).astype(np.float32)
    assert (idx.add(group, values[:1000]) == np.arange(3000, 4000)).all()
    keys, values = np.vstack([keys, group]), np.vstack([values, values[:1000]])
    _, I = idx.search(aimed, 10, n_probe=32)
    assert recall_at_k(I, aimed, keys, 10).mean() >= 0.75
    assert (I >= 3000).mean() >= 0.7 * (float64_topk(aimed, keys, 10) >= 3000).mean() > 0
    # many small adds keep everything consistent (buffers grow by doubling)
    more, more_v, _ = data(n=300)
    for i in range(0, 300, 50):
        idx.add(more[i:i + 50], more_v[i:i + 50])
    all_k, all_v = np.vstack([keys, more]), np.vstack([values, more_v])
    check_invariants(idx, all_k, all_v)
    assert idx.add(np.zeros((0, 32), np.float32), np.zeros((0, 16), np.float32)).shape == (0,)


def test_add_on_empty_index_builds():
    keys, _, queries = data(n=500)
    idx = WaveIndex(32)
    assert (idx.add(keys) == np.arange(500)).all()
    check_invariants(idx, keys, None)


def test_snapshot_taken_before_add_stays_valid():
    keys, values, _ = data(n=1200)
    idx = WaveIndex(32).build(keys[:1000], values[:1000])
    before = {f: getattr(idx, f).clone() for f in ("centroids", "offsets", "order", "keys_sorted")}
    views = {f: getattr(idx, f) for f in before}
    idx.add(keys[1000:], values[1000:])
    for f in before:
        assert torch.equal(views[f], before[f]), f


# ----------------------------------------------------------------------------- persistence

def _radii_float64(idx: WaveIndex) -> torch.Tensor:
    return torch.tensor([float((idx.keys_sorted[int(idx.offsets[c]):int(idx.offsets[c + 1])].double()
                               - idx.centroids[c].double()).norm(dim=1).max()) for c in range(idx.num_clusters)],
                        dtype=torch.float64)


def test_radii_follow_build_add_remove_and_load(tmp_path):
    gen = torch.Generator().manual_seed(21)
    idx = WaveIndex(24, tokens_per_cluster=8, segment_len=256).build(torch.randn(900, 24, generator=gen))
    torch.testing.assert_close(idx.radii.double(), _radii_float64(idx), rtol=1e-6, atol=1e-6)
    idx.add(torch.randn(300, 24, generator=gen) * 3)
    assert idx.radii.shape == (idx.num_clusters,)
    torch.testing.assert_close(idx.radii.double(), _radii_float64(idx), rtol=1e-6, atol=1e-6)
    idx.remove_ids(np.arange(0, 1200, 3))
    torch.testing.assert_close(idx.radii.double(), _radii_float64(idx), rtol=1e-6, atol=1e-6)
    idx.save(tmp_path / "w.kvs")
    back = kvstore.load_index(tmp_path / "w.kvs")
    assert torch.equal(back.radii, idx.radii)


@pytest.mark.parametrize("with_values", [True, False])
def test_save_load_round_trip(tmp_path, with_values):
    keys, values, queries = data(n=2500)
    idx = WaveIndex(32, tokens_per_cluster=8, segment_len=1000, kmeans_iters=4, seed=3, n_probe=5)
    idx.build(keys[:2000], values[:2000] if with_values else None)
    idx.add(keys[2000:], values[2000:] if with_values else None)
    path = tmp_path / "w.kvs"
    idx.save(path)
    back = kvstore.load_index(path)
    assert isinstance(back, WaveIndex)
    for p in WaveIndex._PARAMS:
        assert getattr(back, p) == getattr(idx, p)
    assert back.ntotal == idx.ntotal and back.num_segments == idx.num_segments
    for f in ("centroids", "sizes", "value_sums", "offsets", "order", "keys_sorted", "values_sorted",
              "segment_of_cluster"):
        a, b = getattr(idx, f), getattr(back, f)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f
    for x, y in zip(idx.search_with_stats(queries, 8), back.search_with_stats(queries, 8)):
        assert (x == y).all()
    back.add(keys[:10], values[:10] if with_values else None)  # a loaded index keeps growing
    assert back.ntotal == 2510


def test_corrupt_or_inconsistent_file_rejected(tmp_path):
    keys, values, _ = data(n=600)
    path = tmp_path / "w.kvs"
    WaveIndex(32).build(keys, values).save(path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptFileError, match="w.kvs"):
        kvstore.load_index(path)
    altered = bytearray(good)
    altered[len(altered) // 2] ^= 0x40
    path.write_bytes(bytes(altered))
    with pytest.raises(CorruptFileError, match="w.kvs"):
        kvstore.load_index(path)
    path.write_bytes(good)
    kind, meta, arrays = read_container(path)

    def tampered(**changes):
        a = dict(arrays)
        m = dict(meta)
        for name, v in changes.items():
            (m if name in meta else a)[name] = v
        write_container(path, kind, m, a)

    bad_offsets = arrays["offsets"].copy()
    bad_offsets[[1, 2]] = bad_offsets[[2, 1]]
    bad_order = arrays["order"].copy()
    bad_order[0] = bad_order[1]
    for changes in ({"offsets": bad_offsets}, {"order": bad_order}, {"sizes": arrays["sizes"] + 1},
                    {"keys_sorted": arrays["keys_sorted"][:-1]}, {"ntotal": 601},
                    {"centroids": arrays["centroids"].astype(np.float64)}):
        tampered(**changes)
        with pytest.raises(ValueError, match="inconsistent"):
            kvstore.load_index(path)
    path.write_bytes(good)
    assert kvstore.load_index(path).ntotal == 600


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda i, q: i.search(q[:, :5], 3), ValueError, "queries"),
        (lambda i, q: i.search(q[0], 3), ValueError, "queries"),
        (lambda i, q: i.search(q.astype(np.int32), 3), TypeError, "queries"),
        (lambda i, q: i.search(np.full_like(q, np.nan), 3), ValueError, "NaN"),
        (lambda i, q: i.search(q, 0), ValueError, "k"),
        (lambda i, q: i.search(q, 2.5), TypeError, "k"),
        (lambda i, q: i.search(q, 3, n_probe=0), ValueError, "n_probe"),
        (lambda i, q: i.search(q, 3, n_probe=1.5), TypeError, "n_probe"),
        (lambda i, q: i.search(q.tolist(), 3), TypeError, "queries"),
        (lambda i, q: i.add(q[:, :3], np.zeros((len(q), 16), np.float32)), ValueError, "keys"),
        (lambda i, q: i.add(np.full_like(q, np.inf), np.zeros((len(q), 16), np.float32)), ValueError, "keys"),
        (lambda i, q: i.add(q), ValueError, "values"),
        (lambda i, q: i.add(q, np.zeros((len(q), 15), np.float32)), ValueError, "values"),
        (lambda i, q: i.add(q, np.zeros((len(q) + 1, 16), np.float32)), ValueError, "values"),
        (lambda i, q: i.add(q, np.zeros((len(q), 16), np.int64)), TypeError, "values"),
        (lambda i, q: i.build(q, np.zeros((len(q) - 1, 16), np.float32)), ValueError, "values"),
        (lambda i, q: i.build(q, np.full((len(q), 16), np.nan, np.float32)), ValueError, "values"),
        (lambda i, q: i.build(q[:0]), ValueError, "keys"),
        (lambda i, q: i.build(q[:, :4]), ValueError, "keys"),
        (lambda i, q: i.members(10 ** 6), ValueError, "c"),
    ],
)
def test_bad_input_raises_clear_errors_and_leaves_index_unchanged(call, exc, word):
    keys, values, queries = data(n=300)
    idx = WaveIndex(32).build(keys, values)
    before = idx.search_with_stats(queries, 5, n_probe=4)
    order = idx.order.clone()
    with pytest.raises(exc, match=word):
        call(idx, queries)
    assert idx.ntotal == 300 and torch.equal(idx.order, order)
    assert all((x == y).all() for x, y in zip(idx.search_with_stats(queries, 5, n_probe=4), before))


def test_values_given_to_an_index_without_values():
    keys, values, _ = data(n=300)
    idx = WaveIndex(32).build(keys)
    with pytest.raises(ValueError, match="values"):
        idx.add(keys[:10], values[:10])
    assert idx.ntotal == 300


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"dim": 0}, ValueError, "dim"),
        ({"tokens_per_cluster": 0}, ValueError, "tokens_per_cluster"),
        ({"tokens_per_cluster": 2.0}, TypeError, "tokens_per_cluster"),
        ({"segment_len": 0}, ValueError, "segment_len"),
        ({"kmeans_iters": -1}, ValueError, "kmeans_iters"),
        ({"seed": -1}, ValueError, "seed"),
        ({"n_probe": 0}, ValueError, "n_probe"),
        ({"num_threads": -2}, ValueError, "num_threads"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, word):
    kw = {"dim": 16, **kwargs}
    with pytest.raises(exc, match=word):
        WaveIndex(**kw)


def test_search_before_build():
    idx = WaveIndex(16)
    assert idx.ntotal == 0 and idx.num_clusters == 0
    with pytest.raises(RuntimeError, match="build"):
        idx.search(np.ones((1, 16), np.float32), 1)


# ----------------------------------------------------------------------------- integration

def test_factory_and_recall_benchmark():
    idx = kvstore.index_factory(32, "Wave8", n_probe=3)
    assert isinstance(idx, kvstore.WaveIndex) and idx.tokens_per_cluster == 8 and idx.n_probe == 3
    with pytest.raises(ValueError, match="tokens_per_cluster"):
        kvstore.index_factory(32, "Wave0")
    keys, _, queries = data(n=1000, nq=20)
    (wave,) = [m for m in default_methods(len(keys)) if m.name == "Wave16"]
    assert not wave.uses_train_queries and max(wave.values) <= 63
    out = sweep_head(Head("h", keys, queries, queries), [wave], (10,), lambda s: None)
    pts = out["methods"]["Wave16"]["curves"]["10"]
    assert pts[-1]["recall"] == 1.0 and pts[0]["scanned"] < pts[-1]["scanned"]
