"""AttentionGraphIndex against exact search, and its contract (determinism,
insert, persistence, bad input)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kvstore
from kvstore._fileformat import CorruptFileError
from kvstore.exact import exact_topk
from kvstore.metrics import recall_at_k


def ood_data(n=3000, nq_train=3000, nq_test=64, d=32, seed=None):
    """Keys around the origin, queries offset (out of distribution), fresh each call."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, d)).astype(np.float32)
    shift = rng.standard_normal(d).astype(np.float32)
    train = (rng.standard_normal((nq_train, d)) + 1.5 * shift).astype(np.float32)
    test = (rng.standard_normal((nq_test, d)) + 1.5 * shift).astype(np.float32)
    return keys, train, test


def float64_topk(q, keys, k):
    s = q.astype(np.float64) @ keys.astype(np.float64).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_full_ef_search_is_exact():
    keys, train, test = ood_data()
    idx = kvstore.AttentionGraphIndex(32, degree=16, num_threads=2).build(keys, train)
    assert idx.ntotal == len(keys) and idx.dim == 32
    D, I, scanned = idx.search_with_stats(test, 10, ef=len(keys))
    ref = float64_topk(test, keys, 10)
    assert recall_at_k(I, test, keys, 10).mean() == 1.0
    assert (np.sort(I, 1) == np.sort(ref, 1)).all()
    exact = np.einsum("qd,qkd->qk", test.astype(np.float64), keys[I].astype(np.float64))
    np.testing.assert_allclose(D, exact, rtol=1e-5, atol=1e-4)
    assert (np.diff(D, axis=1) <= 0).all()
    assert D.dtype == np.float32 and I.dtype == np.int64 and scanned.dtype == np.int64
    assert scanned.shape == (len(test),) and (scanned == len(keys)).all()


def test_every_key_reachable_and_degree_bounded():
    keys, train, _ = ood_data(n=2000, nq_train=100)  # most keys untouched by training queries
    idx = kvstore.AttentionGraphIndex(32, degree=8).build(keys, train)
    assert idx.reachable_count() == idx.ntotal
    nb = idx.neighbors()
    assert nb.shape == (2000, 8) and nb.max() < 2000 and nb.min() >= -1
    for row in nb[:200]:
        valid = row[row >= 0]
        assert len(set(valid.tolist())) == len(valid)  # no duplicate edges
        assert (row[len(valid):] == -1).all()          # padding only at the end


def test_small_ef_recall_and_scan_on_ood_queries():
    keys, train, test = ood_data(n=20000, nq_train=20000, nq_test=100, d=32, seed=1)
    idx = kvstore.AttentionGraphIndex(32).build(keys, train)
    _, I, scanned = idx.search_with_stats(test, 10, ef=64)
    assert recall_at_k(I, test, keys, 10).mean() >= 0.9
    assert scanned.mean() < 0.2 * len(keys)


def test_deterministic_for_a_seed():
    keys, train, test = ood_data(seed=3)
    a = kvstore.AttentionGraphIndex(32, seed=7, num_threads=2).build(keys, train)
    b = kvstore.AttentionGraphIndex(32, seed=7, num_threads=1).build(keys, train)
    assert (a.neighbors() == b.neighbors()).all()
    assert (a.search(test, 5)[1] == b.search(test, 5)[1]).all()


def test_subsampling_is_seeded():
    keys, train, _ = ood_data(seed=4)
    a = kvstore.AttentionGraphIndex(32, max_train_queries=500, seed=1).build(keys, train)
    b = kvstore.AttentionGraphIndex(32, max_train_queries=500, seed=1).build(keys, train)
    assert a.build_stats["train_queries"] == 500
    assert (a.neighbors() == b.neighbors()).all()


def test_insert_then_search_finds_new_keys():
    keys, train, test = ood_data(n=3000, seed=5)
    idx = kvstore.AttentionGraphIndex(32, degree=16).build(keys[:2000], train)
    ids = idx.add(keys[2000:])
    assert (ids == np.arange(2000, 3000)).all() and idx.ntotal == 3000
    assert idx.reachable_count() == 3000
    _, I = idx.search(test, 10, ef=3000)
    assert recall_at_k(I, test, keys, 10).mean() == 1.0
    # each new key is found by a search with its own (scaled up) vector
    probe = keys[2000:2100] * 10
    _, I = idx.search(probe, 1, ef=256)
    gt = float64_topk(probe, keys, 1)
    assert (I[:, 0] == gt[:, 0]).mean() >= 0.95


def test_accepts_torch_half_and_bfloat16():
    keys, train, test = ood_data(n=1000, nq_train=500)
    idx = kvstore.AttentionGraphIndex(32).build(torch.from_numpy(keys).bfloat16(), torch.from_numpy(train).half())
    D, I = idx.search(torch.from_numpy(test).bfloat16(), 4, ef=1000)
    ref_keys = torch.from_numpy(keys).bfloat16().float().numpy()
    ref_q = torch.from_numpy(test).bfloat16().float().numpy()
    assert recall_at_k(I, ref_q, ref_keys, 4).mean() == 1.0


def test_k_larger_than_ntotal_pads():
    keys, train, test = ood_data(n=20, nq_train=50)
    idx = kvstore.AttentionGraphIndex(32, degree=4).build(keys, train)
    D, I = idx.search(test, 30)
    assert (I[:, 20:] == -1).all() and np.isneginf(D[:, 20:]).all()
    assert (np.sort(I[:, :20], 1) == np.arange(20)).all()


def test_save_load_round_trip(tmp_path):
    keys, train, test = ood_data(seed=6)
    idx = kvstore.AttentionGraphIndex(32, degree=12, ef_search=40).build(keys, train)
    path = tmp_path / "g.kvs"
    idx.save(path)
    back = kvstore.load_index(path)
    assert isinstance(back, kvstore.AttentionGraphIndex)
    assert back.degree == 12 and back.ef_search == 40 and back.ntotal == idx.ntotal
    assert (back.neighbors() == idx.neighbors()).all()
    a, b = idx.search_with_stats(test, 8), back.search_with_stats(test, 8)
    for x, y in zip(a, b):
        assert (x == y).all()


def test_truncated_or_altered_file_rejected_and_old_copy_kept(tmp_path):
    keys, train, _ = ood_data(n=500, nq_train=200)
    idx = kvstore.AttentionGraphIndex(32).build(keys, train)
    path = tmp_path / "g.kvs"
    idx.save(path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptFileError, match="g.kvs"):
        kvstore.load_index(path)
    altered = bytearray(good)
    altered[len(altered) // 2] ^= 0x40
    path.write_bytes(bytes(altered))
    with pytest.raises(CorruptFileError, match="g.kvs"):
        kvstore.load_index(path)
    path.write_bytes(good)
    assert kvstore.load_index(path).ntotal == 500
    assert os.listdir(tmp_path) == ["g.kvs"]


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda i, q: i.search(q[:, :5], 3), ValueError, "queries"),
        (lambda i, q: i.search(q[0], 3), ValueError, "queries"),
        (lambda i, q: i.search(q.astype(np.int32), 3), TypeError, "queries"),
        (lambda i, q: i.search(np.full_like(q, np.nan), 3), ValueError, "NaN"),
        (lambda i, q: i.search(q, 0), ValueError, "k"),
        (lambda i, q: i.search(q, 2.5), TypeError, "k"),
        (lambda i, q: i.search(q, 3, ef=0), ValueError, "ef"),
        (lambda i, q: i.search(q.tolist(), 3), TypeError, "queries"),
        (lambda i, q: i.add(q[:, :3]), ValueError, "keys"),
        (lambda i, q: i.add(np.full_like(q, np.inf)), ValueError, "keys"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, word):
    keys, train, test = ood_data(n=300, nq_train=100)
    idx = kvstore.AttentionGraphIndex(32).build(keys, train)
    with pytest.raises(exc, match=word):
        call(idx, test)
    assert idx.ntotal == 300  # nothing stored was touched
    assert idx.search(test, 3)[1].shape == (len(test), 3)


def test_bad_build_input_keeps_previous_graph():
    keys, train, test = ood_data(n=300, nq_train=100)
    idx = kvstore.AttentionGraphIndex(32).build(keys, train)
    before = idx.search(test, 5)[1]
    with pytest.raises(ValueError, match="train_queries"):
        idx.build(keys, np.zeros((0, 32), np.float32))
    with pytest.raises(ValueError, match="keys"):
        idx.build(keys[:, :4], train)
    assert (idx.search(test, 5)[1] == before).all()


def test_search_or_add_before_build():
    idx = kvstore.AttentionGraphIndex(16)
    with pytest.raises(RuntimeError, match="build"):
        idx.search(np.ones((1, 16), np.float32), 1)
    with pytest.raises(RuntimeError, match="build"):
        idx.add(np.ones((1, 16), np.float32))
    with pytest.raises(ValueError, match="dim"):
        kvstore.AttentionGraphIndex(0)
    with pytest.raises(ValueError, match="degree"):
        kvstore.AttentionGraphIndex(16, degree=1)


def test_exact_topk_matches_float64():
    keys, _, test = ood_data(n=5000, nq_train=1)
    D, I = exact_topk(test, keys, 50, block_keys=1024)
    ref = float64_topk(test, keys, 50)
    assert recall_at_k(I, test, keys, 50).mean() == 1.0
    assert (I[:, 0] == ref[:, 0]).all()


def test_group_search_reads_each_key_once_and_is_exact_at_full_ef():
    keys, train, test = ood_data(n=2000, nq_train=2000, nq_test=12, seed=8)
    idx = kvstore.AttentionGraphIndex(32).build(keys, train)
    groups = test.reshape(4, 3, 32)
    D, I, scanned = idx.search_group(groups, 10, ef=2000)
    best = (groups.astype(np.float64) @ keys.T.astype(np.float64)).max(1)  # [4, N] best head score
    ref = np.argsort(-best, 1)[:, :10]
    assert (np.sort(I, 1) == np.sort(ref, 1)).all()
    assert (scanned == 2000).all()
    _, _, small = idx.search_group(groups, 10, ef=32)
    assert (small < 2000).all()
    with pytest.raises(ValueError, match="queries"):
        idx.search_group(test, 10)
