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
