"""Synthetic out-of-distribution (OOD) query/key sets shaped like attention.

Real attention queries and keys come from different projections of the same
hidden states: queries sit far away from the keys in L2 (an OOD gap, which is
what breaks plain ANN indexes built on keys alone), yet a query's inner-product
top-k is concentrated on a few keys about "its" content. :func:`ood_dataset`
reproduces both properties at any size.

Generator (``d = dim``; every random draw comes from ``seed``)
---------------------------------------------------------------
1. A unit *query-bias direction* ``u`` and the projector ``P = I - u u^T``.
2. ``T`` topic centres ``c_t = P g_t`` with ``g_t ~ N(0, I_d)`` (norm ~ sqrt(d)),
   and topic probabilities ``p_t ∝ (t + 1) ** -topic_skew`` (a few large
   topics, many small ones). ``T`` defaults to ``round(sqrt(n_keys))``.
3. Keys: ``k = b_k + c_t + key_noise * P e`` with topic ``t ~ p``,
   ``e ~ N(0, I_d)`` and a common *key bias* ``b_k`` (random direction, norm
   ``key_bias * sqrt(d)``).
4. Queries: ``q = b_q + W (c_t + query_noise * e')`` with ``t ~ p``, the same
   topic centres, a fixed random symmetric positive-definite map
   ``W = R diag(lambda) R^T`` (``R`` random orthogonal, ``lambda``
   log-uniform in ``[1/query_spread, query_spread]``) and a large common *query
   bias* ``b_q = query_bias * sqrt(d) * u``.

Why it behaves like attention: ``q . k = const(q) + (c_t + e')^T W (c_s + e)``
because keys do not vary along ``u`` (so ``b_q`` shifts all scores of a query
equally) and ``q . b_k`` is the same for all keys. ``W`` is positive definite,
so ``c_t^T W c_t ≈ d * mean(lambda)`` is large for a key of the query's own
topic and zero-mean for other topics: the top-k concentrates on the query's
topic (about 4-5 standard deviations at the defaults, so a few other-topic keys
still leak in at 1 M keys). Meanwhile ``b_q`` and the anisotropic ``W`` put the
queries far from every key.

Measured at the defaults (``dim=128``, 128 test queries; ``gap`` is
:func:`ood_gap`, the mean L2 distance from a query to its nearest key divided
by the mean distance from a key to its nearest other key, about 1 for
in-distribution queries; ``peak`` is the mean of a query's top-100 scores minus
its median score, in standard deviations of its scores; ``mass`` is the
softmax(q.k / sqrt(d)) mass on the top-100 keys)::

    n_keys      gap   peak   top-100 keys of the query's topic   mass
    10 K        3.0   3.9    0.83 (topics hold ~100 keys)        0.99
    100 K       3.1   5.2    0.98                                0.92
    1 M         3.3   5.7    0.99                                0.80

For comparison, SmolLM2-135M traces (:mod:`kvstore.datasets.traces`, 7 168
keys per KV head, layers 0-29) have gap 1.0-2.6 (median ~1.8), peak 2.0-3.0
and top-100 softmax mass 0.73-0.99 (0.14-0.32 in layer 0): the generator is a
somewhat harder OOD case than this small model, with similar sparsity.
``query_bias=1`` gives gap ~2.0; ``query_bias=0, query_spread=1`` gives ~1.3.

Keys are generated in fixed chunks of 65 536 rows, so 1 M keys at ``dim=128``
need about 0.5 GB for the output plus ~50 MB of work space and take a few
seconds. The result depends only on the arguments (not on the chunking), the
key set does not depend on ``n_train``/``n_test``, and train and test queries
are independent draws.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = ["ood_dataset", "ood_topics", "ood_gap"]

_CHUNK = 1 << 16
# Independent random streams, spawned from one SeedSequence in this order.
_STREAMS = ("params", "key_topics", "key_noise", "train_topics", "train_noise", "test_topics", "test_noise")


@dataclass(frozen=True)
class _Params:
    """The fixed parts of the generator (shared by keys and queries)."""

    u: np.ndarray  # [d] unit query-bias direction
    centres: np.ndarray  # [T, d] topic centres, orthogonal to u
    probs: np.ndarray  # [T] topic probabilities
    key_bias: np.ndarray  # [d]
    query_bias: np.ndarray  # [d]
    query_map: np.ndarray  # [d, d] symmetric positive definite W


def _streams(seed: int) -> dict[str, np.random.SeedSequence]:
    """One independent seed sequence per named stream."""
    return dict(zip(_STREAMS, np.random.SeedSequence(seed).spawn(len(_STREAMS))))


def _project_out(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Remove the component along unit vector ``u`` from rows of ``x`` ``[n, d]`` (in place)."""
    x -= np.outer(x @ u, u).astype(x.dtype, copy=False)
    return x


def _topic_probs(n_topics: int, topic_skew: float) -> np.ndarray:
    """``[T]`` topic probabilities ``∝ (t + 1) ** -topic_skew``."""
    probs = np.arange(1, n_topics + 1, dtype=np.float64) ** -topic_skew
    return probs / probs.sum()


def _make_params(
    rng: np.random.Generator,
    dim: int,
    probs: np.ndarray,
    key_bias: float,
    query_bias: float,
    query_spread: float,
) -> _Params:
    """Draw ``u``, the topic centres, ``b_k``, ``b_q`` and ``W`` (see the module docstring)."""
    u = rng.standard_normal(dim)
    u /= np.linalg.norm(u)
    centres = _project_out(rng.standard_normal((len(probs), dim)), u)
    kb = rng.standard_normal(dim)
    kb *= key_bias * np.sqrt(dim) / np.linalg.norm(kb)
    rot, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    lam = np.exp(rng.uniform(-np.log(query_spread), np.log(query_spread), size=dim))
    w = (rot * lam) @ rot.T
    f32 = np.float32
    return _Params(
        u=u.astype(f32),
        centres=centres.astype(f32),
        probs=probs,
        key_bias=kb.astype(f32),
        query_bias=(query_bias * np.sqrt(dim) * u).astype(f32),
        query_map=w.astype(f32),
    )


def _draw_topics(rng: np.random.Generator, n: int, probs: np.ndarray) -> np.ndarray:
    """``[n]`` int32 topic labels drawn from ``probs``."""
    return rng.choice(len(probs), size=n, p=probs).astype(np.int32)


_Fill = Callable[[np.ndarray, slice, np.random.Generator], None]


def _chunked(out: np.ndarray, seed: np.random.SeedSequence, fill: _Fill) -> None:
    """Call ``fill(out, rows, rng)`` for every chunk of ``_CHUNK`` rows, in parallel threads.

    Chunk ``i`` gets its own generator from ``seed.spawn``, so the result does
    not depend on the number of threads (numpy releases the GIL in its
    random fills and matmuls).
    """
    bounds = [(lo, min(lo + _CHUNK, out.shape[0])) for lo in range(0, out.shape[0], _CHUNK)]
    rngs = [np.random.default_rng(child) for child in seed.spawn(len(bounds))]

    def run(i: int) -> None:
        fill(out, slice(*bounds[i]), rngs[i])

    workers = min(len(bounds), os.cpu_count() or 1)
    if workers <= 1:
        for i in range(len(bounds)):
            run(i)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, range(len(bounds))))


def _fill_keys(
    out: np.ndarray, topics: np.ndarray, seed: np.random.SeedSequence, prm: _Params, noise: float
) -> None:
    """Write keys ``b_k + c_t + noise * P e`` into ``out`` ``[n, d]``."""
    proj = (np.eye(out.shape[1], dtype=np.float32) - np.outer(prm.u, prm.u)) * np.float32(noise)  # noise * P

    def fill(arr: np.ndarray, rows: slice, rng: np.random.Generator) -> None:
        e = rng.standard_normal((rows.stop - rows.start, arr.shape[1]), dtype=np.float32)
        block = arr[rows]
        np.matmul(e, proj, out=block)  # P is symmetric
        block += prm.centres[topics[rows]]
        block += prm.key_bias

    _chunked(out, seed, fill)


def _fill_queries(
    out: np.ndarray, topics: np.ndarray, seed: np.random.SeedSequence, prm: _Params, noise: float
) -> None:
    """Write queries ``b_q + W (c_t + noise * e)`` into ``out`` ``[n, d]``."""

    def fill(arr: np.ndarray, rows: slice, rng: np.random.Generator) -> None:
        z = rng.standard_normal((rows.stop - rows.start, arr.shape[1]), dtype=np.float32)
        z *= np.float32(noise)
        z += prm.centres[topics[rows]]
        block = arr[rows]
        np.matmul(z, prm.query_map, out=block)  # W is symmetric: z W == (W z^T)^T
        block += prm.query_bias

    _chunked(out, seed, fill)


def _topic_count(n_keys: int, n_train: int, n_test: int, dim: int, n_topics: int | None) -> int:
    """Validate the sizes; return the number of topics T."""
    if n_keys < 1 or n_train < 0 or n_test < 0 or dim < 2:
        raise ValueError(
            f"need n_keys >= 1, n_train >= 0, n_test >= 0, dim >= 2; got {n_keys}, {n_train}, {n_test}, {dim}"
        )
    topics = max(1, round(np.sqrt(n_keys))) if n_topics is None else n_topics
    if topics < 1:
        raise ValueError(f"n_topics must be >= 1, got {n_topics}")
    return int(topics)


def _labels(
    streams: dict[str, np.random.SeedSequence], probs: np.ndarray, n_keys: int, n_train: int, n_test: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Topic labels of keys, train and test queries (each from its own stream)."""
    key, train, test = (
        _draw_topics(np.random.default_rng(streams[f"{name}_topics"]), n, probs)
        for name, n in (("key", n_keys), ("train", n_train), ("test", n_test))
    )
    return key, train, test


def ood_dataset(
    n_keys: int,
    n_train: int,
    n_test: int,
    dim: int = 128,
    seed: int = 0,
    *,
    n_topics: int | None = None,
    topic_skew: float = 0.5,
    key_noise: float = 1.0,
    query_noise: float = 1.0,
    key_bias: float = 1.0,
    query_bias: float = 3.0,
    query_spread: float = 4.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate attention-like keys and OOD queries (see the module docstring).

    Args:
        n_keys: number of keys N.
        n_train: number of training queries (e.g. to build a query-aware index).
        n_test: number of test queries, drawn independently of the training ones.
        dim: vector dimension d.
        seed: the only source of randomness; equal arguments give equal arrays.
        n_topics: number of Gaussian topics T (default ``round(sqrt(n_keys))``).
        topic_skew: topic probabilities are ``∝ (t + 1) ** -topic_skew``.
        key_noise / query_noise: noise around a topic centre, relative to the
            centres' spread (1.0: as large as the centres themselves).
        key_bias: norm of the common key bias, in units of ``sqrt(d)``.
        query_bias: norm of the common query bias, in units of ``sqrt(d)``; it
            sets the size of the OOD gap.
        query_spread: the query map's eigenvalues are log-uniform in
            ``[1/query_spread, query_spread]``.

    Returns:
        ``(keys [n_keys, d], train_queries [n_train, d], test_queries [n_test, d])``,
        float32, C-contiguous.
    """
    probs = _topic_probs(_topic_count(n_keys, n_train, n_test, dim, n_topics), topic_skew)
    streams = _streams(seed)
    prm = _make_params(np.random.default_rng(streams["params"]), dim, probs, key_bias, query_bias, query_spread)
    key_topics, train_topics, test_topics = _labels(streams, probs, n_keys, n_train, n_test)

    keys = np.empty((n_keys, dim), dtype=np.float32)
    _fill_keys(keys, key_topics, streams["key_noise"], prm, key_noise)
    train = np.empty((n_train, dim), dtype=np.float32)
    _fill_queries(train, train_topics, streams["train_noise"], prm, query_noise)
    test = np.empty((n_test, dim), dtype=np.float32)
    _fill_queries(test, test_topics, streams["test_noise"], prm, query_noise)
    return keys, train, test


def ood_topics(
    n_keys: int,
    n_train: int,
    n_test: int,
    dim: int = 128,
    seed: int = 0,
    *,
    n_topics: int | None = None,
    topic_skew: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Topic labels of the rows that :func:`ood_dataset` returns for the same arguments.

    Cheap (no vectors are generated). Returns int32 arrays
    ``(key_topics [n_keys], train_topics [n_train], test_topics [n_test])``.
    """
    probs = _topic_probs(_topic_count(n_keys, n_train, n_test, dim, n_topics), topic_skew)
    return _labels(_streams(seed), probs, n_keys, n_train, n_test)


def _nearest_distances(points: np.ndarray, base: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """L2 distance from each row of ``points`` ``[m, d]`` to its nearest row of ``base`` ``[n, d]``.

    ``exclude[i]`` (optional) is a row index of ``base`` to ignore for point ``i``.
    """
    p = points.astype(np.float32)
    p_sq = np.einsum("ij,ij->i", p, p)
    best = np.full(len(p), np.inf, dtype=np.float64)
    for lo in range(0, base.shape[0], _CHUNK):
        b = base[lo : lo + _CHUNK].astype(np.float32)
        d2 = p_sq[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2.0 * (p @ b.T)
        if exclude is not None:
            rows = np.nonzero((exclude >= lo) & (exclude < lo + len(b)))[0]
            d2[rows, exclude[rows] - lo] = np.inf
        best = np.minimum(best, d2.min(axis=1))
    return np.sqrt(np.maximum(best, 0.0))


def ood_gap(keys: np.ndarray, queries: np.ndarray, sample: int = 256, seed: int = 0) -> float:
    """OOD gap: mean query-to-nearest-key L2 distance / mean key-to-nearest-other-key distance.

    Args:
        keys: ``[N, d]`` (N >= 2).
        queries: ``[M, d]``.
        sample: at most this many queries and keys (seeded) are measured.
        seed: seed of the sampling.

    Returns:
        The ratio; about 1 for in-distribution queries, well above 1 for OOD ones.
    """
    rng = np.random.default_rng(seed)
    qi = rng.choice(len(queries), size=min(sample, len(queries)), replace=False)
    ki = rng.choice(len(keys), size=min(sample, len(keys)), replace=False)
    q_dist = _nearest_distances(queries[qi], keys, None)
    k_dist = _nearest_distances(keys[ki], keys, ki)
    return float(q_dist.mean() / k_dist.mean())
