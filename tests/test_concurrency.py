"""Several threads searching one index, and several stores used from several
threads, give the same results as serial use."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import kvstore
from kvstore import KVStore, StoreConfig


@pytest.mark.parametrize("factory", ["Graph16", "Wave8", "Flat", "IVF16,Flat"])
def test_threads_searching_one_index(factory):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = (rng.standard_normal((64, 32)) + 1).astype(np.float32)
    try:
        index = kvstore.index_factory(32, factory)
    except ImportError:
        pytest.skip("faiss not installed")
    index.build(keys, queries) if factory.startswith("Graph") else index.build(keys)
    serial = [index.search_with_stats(queries[i:i + 8], 10) for i in range(0, 64, 8)]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            parallel = list(pool.map(lambda i: index.search_with_stats(queries[i:i + 8], 10), range(0, 64, 8)))
            for a, b in zip(serial, parallel):
                for x, y in zip(a, b):
                    assert np.array_equal(x, y)


def test_graph_search_while_adding_is_safe():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((4000, 16)).astype(np.float32)
    index = kvstore.AttentionGraphIndex(16).build(keys[:2000], keys[:2000])
    q = rng.standard_normal((32, 16)).astype(np.float32)

    def search(_):
        D, I = index.search(q, 5)
        assert ((I >= 0) & (I < 4000)).all()

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(search, i) for i in range(40)]
        for c in range(2000, 4000, 250):
            index.add(keys[c:c + 250])
        for f in futures:
            f.result()
    assert index.ntotal == 4000 and index.reachable_count() == 4000


@pytest.mark.parametrize("method", ["wave", "graph", "quest"])
def test_stores_in_threads_match_serial(method):
    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        store = KVStore(2, 2, 32, StoreConfig(method=method, window=16, update_interval=16, tokens_per_cluster=8))
        k, v = torch.randn(1, 2, 300, 32, generator=g), torch.randn(1, 2, 300, 32, generator=g)
        q = torch.randn(1, 4, 300, 32, generator=g)
        outs = []
        for layer in range(2):
            store.prefill(layer, k, v, q=q)
            for _ in range(20):
                store.append(layer, torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g))
                outs.append(store.attend(layer, torch.randn(1, 4, 1, 32, generator=g)))
        return torch.cat(outs)

    serial = [run(s) for s in range(4)]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(run, range(4)))
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)


CONCURRENT_KINDS = ["Flat", "Graph8", "Wave4", "IVF8,Flat", "HNSW8"]


@pytest.mark.parametrize("kind", CONCURRENT_KINDS)
def test_concurrent_add_search_save_loses_nothing(tmp_path, kind):
    """Two threads adding, two searching and one saving / reloading, on one index: no
    crash, no lost or duplicated key, every search sees a consistent index and every
    saved file is a prefix of the final index (adds only append)."""
    pytest.importorskip("faiss")
    dim = 8
    rng = np.random.default_rng(7)
    base = rng.standard_normal((400, dim)).astype(np.float32)
    index = kvstore.index_factory(dim, kind)
    index.build(base, base) if kind.startswith("Graph") else index.build(base)
    batches = [[rng.standard_normal((int(rng.integers(1, 6)), dim)).astype(np.float32) for _ in range(60)]
               for _ in range(2)]
    queries = rng.standard_normal((4, dim)).astype(np.float32)
    returned: list[np.ndarray] = []
    snapshots: list = []
    done = False

    def adder(t: int) -> None:
        for b in batches[t]:
            returned.append(index.add(b))

    def searcher(_: int) -> None:
        while not done:
            D, I, scanned = index.search_with_stats(queries, 5)
            assert ((I >= 0) & (I < index.ntotal)).all() and np.isfinite(D).all()

    def saver(_: int) -> None:
        for i in range(4):
            path = tmp_path / f"s{i}.kvs"
            index.save(path)
            snapshots.append(kvstore.load_index(path))

    with ThreadPoolExecutor(5) as pool:
        searches = [pool.submit(searcher, i) for i in range(2)]
        writers = [pool.submit(adder, 0), pool.submit(adder, 1), pool.submit(saver, 0)]
        for f in writers:
            f.result()
        done = True
        for f in searches:
            f.result()
    added = sum(len(b) for bs in batches for b in bs)
    assert index.ntotal == 400 + added
    ids = np.sort(np.concatenate(returned))
    np.testing.assert_array_equal(ids, np.arange(400, 400 + added))  # each id handed out once
    final = index.reconstruct_n()
    expected = np.vstack([base] + [b for bs in batches for b in bs])
    got_rows = {r.tobytes() for r in final}
    assert len(got_rows) == len(expected) and got_rows == {r.tobytes() for r in expected}
    for snap in snapshots:
        np.testing.assert_array_equal(snap.reconstruct_n(), final[:snap.ntotal])


def test_flat_two_add_loops_keep_every_key():
    index = kvstore.FlatIndex(4)
    rows = [np.full((1, 4), i, np.float32) for i in range(4000)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda part: [index.add(r) for r in part], (rows[0::2], rows[1::2])))
    assert index.ntotal == 4000
    assert sorted(index.reconstruct_n()[:, 0].tolist()) == list(range(4000))


def test_rwlock_writer_reentry_and_reader_upgrade():
    from kvstore.index_base import RWLock

    lock = RWLock()
    with lock.write(), lock.write(), lock.read():
        pass
    with lock.read(), lock.read():
        with pytest.raises(RuntimeError, match="inside one of its own searches"):
            with lock.write():
                pass
    with lock.write():  # released cleanly after all of that
        pass


@pytest.mark.parametrize("n", [100_000, 5000, -1])
def test_thread_counts_are_bounded(n):
    for make in (lambda: kvstore.AttentionGraphIndex(8, num_threads=n), lambda: kvstore.WaveIndex(8, num_threads=n)):
        with pytest.raises(ValueError, match=r"num_threads must be in \[0, 1024\]"):
            make()


def test_largest_thread_count_runs_on_the_cpus_there_are():
    keys = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    graph = kvstore.AttentionGraphIndex(8, degree=8, num_threads=1024).build(keys, keys)
    wave = kvstore.WaveIndex(8, tokens_per_cluster=4, num_threads=1024).build(keys)
    ref = kvstore.FlatIndex(8).build(keys).search(keys[:3], 4)[1]
    assert np.array_equal(graph.search(keys[:3], 4, ef=300)[1], ref)
    assert np.array_equal(wave.search(keys[:3], 4, n_probe=300)[1], ref)
    with pytest.raises(ValueError, match="num_threads"):
        kvstore._C.ThreadPool(5000)
