"""Micro-benchmarks: batch search latency of each index (pytest-benchmark).

Not part of the test suite (pytest's ``testpaths`` is ``tests/`` and its
``addopts`` pass ``--benchmark-disable``). Run them with::

    python -m pytest bench/test_search_latency.py --benchmark-enable

(add ``--benchmark-json=bench/results/search_latency.json`` to keep the numbers).

Setup: one generated OOD dataset (``kvstore.datasets.synthetic.ood_dataset``,
N = 50 000 keys, 50 000 training queries, 256 test queries, dim 128), built
once per module. Each benchmark times one ``search_with_stats`` call over all
256 test queries at k = 32; ``benchmark.extra_info`` records the mean
``scanned`` (dot products per query), its fraction of N and recall@32 of that
call. IVF / HNSW are skipped when faiss is not installed. Building the
indexes takes about a minute on 2 cores.
"""
from __future__ import annotations

import numpy as np
import pytest

import kvstore
from kvstore.datasets.synthetic import ood_dataset
from kvstore.exact import exact_topk
from kvstore.metrics import recall_at_k

N_KEYS = 50_000
N_TRAIN = 50_000
N_QUERIES = 256
DIM = 128
K = 32


@pytest.fixture(scope="module")
def data():
    keys, train, queries = ood_dataset(N_KEYS, N_TRAIN, N_QUERIES, dim=DIM, seed=0)
    gt_scores, _ = exact_topk(queries, keys, K)
    return keys, train, queries, gt_scores


@pytest.fixture(scope="module")
def graph_index(data):
    keys, train, _, _ = data
    return kvstore.AttentionGraphIndex(DIM, degree=32, progress=False).build(keys, train)


@pytest.fixture(scope="module")
def flat_index(data):
    index = kvstore.FlatIndex(DIM)
    index.build(data[0])
    return index


@pytest.fixture(scope="module")
def ivf_index(data):
    pytest.importorskip("faiss")
    index = kvstore.index_factory(DIM, "IVF256,Flat")  # ~sqrt(N) lists, as the recall benchmark picks
    index.build(data[0])
    return index


@pytest.fixture(scope="module")
def hnsw_index(data):
    pytest.importorskip("faiss")
    index = kvstore.index_factory(DIM, "HNSW32")
    index.build(data[0])
    return index


def _run(benchmark, index, data, **params):
    keys, _, queries, gt_scores = data
    D, I, scanned = benchmark(index.search_with_stats, queries, K, **params)
    assert I.shape == (N_QUERIES, K) and scanned.shape == (N_QUERIES,)
    recall = float(recall_at_k(I, queries, keys, K, gt_scores=gt_scores).mean())
    benchmark.extra_info.update(
        index=type(index).__name__, params=params, n_keys=N_KEYS, n_queries=N_QUERIES, k=K,
        scanned_mean=float(scanned.mean()), scanned_fraction=float(scanned.mean() / N_KEYS),
        recall_at_32=recall,
    )
    return recall


@pytest.mark.parametrize("ef", [32, 64, 128])
def test_graph_search(benchmark, graph_index, data, ef):
    benchmark.group = "search 256 queries, k=32"
    assert _run(benchmark, graph_index, data, ef=ef) > 0


def test_flat_search(benchmark, flat_index, data):
    benchmark.group = "search 256 queries, k=32"
    assert _run(benchmark, flat_index, data) == pytest.approx(1.0)


def test_ivf_search(benchmark, ivf_index, data):
    benchmark.group = "search 256 queries, k=32"
    assert _run(benchmark, ivf_index, data, nprobe=16) > 0


def test_hnsw_search(benchmark, hnsw_index, data):
    benchmark.group = "search 256 queries, k=32"
    assert _run(benchmark, hnsw_index, data, ef=64) > 0
