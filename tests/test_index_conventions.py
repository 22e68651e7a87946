"""The faiss conventions every index follows: ``.d``, ``is_trained`` / ``train``,
``add`` returning ids, ``reconstruct`` / ``reconstruct_n``, ``remove_ids``,
save / load, copies and pickles through the file format, numpy or torch results
following the input. Exact references on fresh random data."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

import kvstore
from kvstore.index_base import deserialize_index

pytest.importorskip("faiss")

DIM = 16
KINDS = ["Flat", "Graph8", "Wave4", "IVF4,Flat", "HNSW8"]
# search knobs that make each index score every key (exact answers)
EXHAUSTIVE = {"Flat": {}, "Graph8": {"ef": 4096}, "Wave4": {"n_probe": 4096}, "IVF4,Flat": {"nprobe": 4096},
              "HNSW8": {"ef": 4096}}


def fresh(kind: str, n: int = 300, seed: int = 0) -> tuple[kvstore.Index, np.ndarray]:
    keys = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    index = kvstore.index_factory(DIM, kind)
    index.build(keys, keys) if kind.startswith("Graph") else index.build(keys)
    return index, keys


def exact(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    s = queries.astype(np.float64) @ keys.astype(np.float64).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def assert_exact(index: kvstore.Index, kind: str, keys: np.ndarray, seed: int = 1) -> None:
    q = np.random.default_rng(seed).standard_normal((20, DIM)).astype(np.float32)
    _, I = index.search(q, 5, **EXHAUSTIVE[kind])
    ref = exact(q, keys, 5)
    if kind.startswith("HNSW"):  # a graph walk: exact in practice at this size, not by construction
        assert (I == ref).mean() > 0.97
    else:
        np.testing.assert_array_equal(I, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_d_trained_add_ids_reconstruct(kind):
    index, keys = fresh(kind)
    assert index.d == index.dim == DIM and index.is_trained
    more = np.random.default_rng(5).standard_normal((7, DIM)).astype(np.float32)
    ids = index.add(more)
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, np.arange(300, 307))
    all_keys = np.vstack([keys, more])
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), all_keys)
    np.testing.assert_array_equal(index.reconstruct(302), all_keys[302])
    np.testing.assert_array_equal(index.reconstruct_n(298), all_keys[298:])
    assert index.reconstruct_n(5, 0).shape == (0, DIM)
    with pytest.raises(ValueError, match="key ids"):
        index.reconstruct(307)
    with pytest.raises(ValueError):
        index.reconstruct_n(300, 8)
    with pytest.raises(TypeError, match="key_id"):
        index.reconstruct(1.0)
    assert_exact(index, kind, all_keys)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_in_torch_out(kind):
    index, keys = fresh(kind)
    q = torch.randn(3, DIM)
    D, I, scanned = index.search_with_stats(q, 4)
    assert all(isinstance(t, torch.Tensor) for t in (D, I, scanned))
    assert D.dtype == torch.float32 and I.dtype == torch.int64 and D.shape == I.shape == (3, 4)
    Dn, In = index.search(q.numpy(), 4)
    assert isinstance(Dn, np.ndarray) and np.array_equal(In, I.numpy()) and np.array_equal(Dn, D.numpy())
    ids = index.add(torch.randn(2, DIM))
    assert isinstance(ids, torch.Tensor) and ids.tolist() == [300, 301]


@pytest.mark.parametrize("kind", KINDS)
def test_remove_ids_renumbers_and_stays_exact(kind):
    index, keys = fresh(kind)
    drop = np.random.default_rng(3).choice(300, 40, replace=False)
    assert index.remove_ids(np.concatenate([drop, [10_000, -5]])) == 40  # ids not stored are ignored
    kept = np.delete(keys, drop, axis=0)
    assert index.ntotal == 260
    np.testing.assert_array_equal(index.reconstruct_n(0, 260), kept)
    assert_exact(index, kind, kept)
    assert index.remove_ids(torch.tensor([0])) == 1 and index.remove_ids([]) == 0
    kept = kept[1:]
    np.testing.assert_array_equal(index.reconstruct_n(), kept)
    ids = index.add(keys[:3])
    np.testing.assert_array_equal(ids, np.arange(259, 262))
    assert_exact(index, kind, np.vstack([kept, keys[:3]]))
    with pytest.raises(TypeError, match="ids"):
        index.remove_ids(np.array([1.5]))


@pytest.mark.parametrize("kind", KINDS)
def test_remove_every_key(kind):
    index, keys = fresh(kind, n=60)
    assert index.remove_ids(np.arange(60)) == 60 and index.ntotal == 0
    with pytest.raises(RuntimeError, match="empty"):
        index.search(keys[:2], 3)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_copy_pickle_round_trips(tmp_path, kind):
    index, keys = fresh(kind)
    q = np.random.default_rng(9).standard_normal((10, DIM)).astype(np.float32)
    want = index.search_with_stats(q, 6)
    index.save(tmp_path / "i.kvs")
    copies = [kvstore.load_index(tmp_path / "i.kvs"), copy.copy(index), copy.deepcopy(index),
              pickle.loads(pickle.dumps(index)), deserialize_index(index.serialize())]
    for c in copies:
        assert type(c) is type(index) and c.ntotal == index.ntotal
        for a, b in zip(c.search_with_stats(q, 6), want):
            np.testing.assert_array_equal(a, b)
    # copies are independent: adding to the original changes none of them, and the reverse
    index.add(keys[:5] * 3)
    for c in copies:
        assert c.ntotal == 300
        np.testing.assert_array_equal(c.reconstruct_n(0, 300), keys)
    copies[1].add(keys[:1])
    assert index.ntotal == 305


def test_ivf_train_then_add():
    keys = np.random.default_rng(0).standard_normal((400, DIM)).astype(np.float32)
    index = kvstore.IVFIndex(DIM, nlist=8)
    assert not index.is_trained
    index.train(keys)
    assert index.is_trained and index.ntotal == 0 and index.nlist == 8
    np.testing.assert_array_equal(index.add(keys), np.arange(400))
    assert_exact(index, "IVF4,Flat", keys)
    empty = kvstore.IVFIndex(DIM, nlist=8)
    np.testing.assert_array_equal(empty.add(keys[:100]), np.arange(100))  # add before train trains on them
    assert empty.is_trained


def test_untrained_and_empty_indexes_round_trip(tmp_path):
    for index in (kvstore.IVFIndex(DIM), kvstore.HNSWIndex(DIM), kvstore.FlatIndex(DIM), kvstore.WaveIndex(DIM),
                  kvstore.IVFIndex(DIM).train(np.ones((50, DIM), np.float32))):
        back = pickle.loads(pickle.dumps(index))
        assert type(back) is type(index) and back.ntotal == 0 and back.is_trained == index.is_trained


def test_graph_add_before_build_says_what_to_call():
    index = kvstore.AttentionGraphIndex(DIM)
    assert not index.is_trained
    with pytest.raises(RuntimeError, match=r"build\(keys, train_queries\)"):
        index.add(np.ones((3, DIM), np.float32))
    assert index.add(np.ones((0, DIM), np.float32)).shape == (0,)


def test_graph_remove_keeps_every_key_reachable():
    index, keys = fresh("Graph8", n=2000)
    drop = np.random.default_rng(4).choice(2000, 900, replace=False)
    index.remove_ids(drop)
    assert index.ntotal == 1100 and index.reachable_count() == 1100
    assert ((index.neighbors() >= -1) & (index.neighbors() < 1100)).all()


def test_wave_remove_keeps_centroids_means_and_values():
    rng = np.random.default_rng(0)
    keys, values = rng.standard_normal((400, DIM)).astype(np.float32), rng.standard_normal((400, 3)).astype(np.float32)
    index = kvstore.WaveIndex(DIM, tokens_per_cluster=8).build(keys, values)
    drop = rng.choice(400, 150, replace=False)
    index.remove_ids(drop)
    kept_k, kept_v = np.delete(keys, drop, 0), np.delete(values, drop, 0)
    order = index.order.numpy()
    np.testing.assert_array_equal(index.keys_sorted.numpy(), kept_k[order])
    np.testing.assert_array_equal(index.values_sorted.numpy(), kept_v[order])
    off = index.offsets.numpy()
    for c in range(index.num_clusters):
        members = order[off[c]:off[c + 1]]
        assert len(members) == index.sizes[c]
        np.testing.assert_allclose(index.centroids[c].numpy(), kept_k[members].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(index.value_sums[c].numpy(), kept_v[members].sum(0), rtol=1e-5, atol=1e-5)
    back = pickle.loads(pickle.dumps(index))
    np.testing.assert_array_equal(back.keys_sorted.numpy(), index.keys_sorted.numpy())
