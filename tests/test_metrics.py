"""recall@k (exact ties counted) and scanned_fraction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.exact import exact_topk
from kvstore.metrics import recall_at_k, scanned_fraction


@pytest.fixture
def tied():
    """Scores of the one query q = e0 against 8 keys: 5, 4, 4, 4, 3, 2, 1, 0 (three keys tied at 2nd place)."""
    keys = np.zeros((8, 4), np.float32)
    keys[:, 0] = [5, 4, 4, 4, 3, 2, 1, 0]
    keys[:, 1] = np.arange(8)  # distinct keys, same score for q
    q = np.array([[1, 0, 0, 0]], np.float32)
    return q, keys


@pytest.mark.parametrize("gt", [False, True])
def test_ties_count(tied, gt):
    q, keys = tied
    gt_scores = exact_topk(q, keys, 4)[0] if gt else None
    r = lambda ids, k: recall_at_k(np.array([ids]), q, keys, k, gt_scores=gt_scores)[0]  # noqa: E731
    # exact top-2 is {0, one of 1/2/3}: any of the tied keys is right
    for tie in (1, 2, 3):
        assert r([0, tie], 2) == 1.0
    assert r([0, 4], 2) == 0.5
    # two tied keys fill only the one place left after key 0, which was missed
    assert r([1, 2], 2) == 0.5
    # top-3: 0 plus two of {1, 2, 3}
    assert r([0, 3, 1], 3) == 1.0
    assert r([3, 1, 2], 3) == pytest.approx(2 / 3)
    assert r([0, 1, 4], 3) == pytest.approx(2 / 3)
    # top-4 = {0, 1, 2, 3} with no tie at the 4th place
    assert r([3, 2, 1, 0], 4) == 1.0
    assert r([1, 2, 3, 4], 4) == 0.75


def test_duplicates_padding_and_extra_columns(tied):
    q, keys = tied
    r = lambda ids, k: recall_at_k(np.array([ids]), q, keys, k)[0]  # noqa: E731
    assert r([0, 0], 2) == 0.5  # a repeated id counts once
    assert r([0, -1], 2) == 0.5
    assert r([-1, -1], 2) == 0.0
    assert r([4, 5, 0], 2) == 0.0  # only the first k returned columns count
    assert r([0], 2) == 0.5  # fewer than k returned


def test_k_larger_than_ntotal(tied):
    q, keys = tied
    ids = np.array([[7, 6, 5, 4, 3, 2, 1, 0, -1, -1]])
    assert recall_at_k(ids, q, keys, 10)[0] == 1.0  # denominator min(k, N)
    assert recall_at_k(ids[:, :4], q, keys, 10)[0] == 0.5


def test_against_exact_topk_random():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2000, 64)).astype(np.float32)
    q = rng.standard_normal((30, 64)).astype(np.float32)
    D, I = exact_topk(q, keys, 10)
    np.testing.assert_array_equal(recall_at_k(I, q, keys, 10), 1.0)
    np.testing.assert_array_equal(recall_at_k(I, q, keys, 10, gt_scores=D), 1.0)
    # drop the best key of every query: recall 0.9
    shifted = np.concatenate([I[:, 1:], np.full((30, 1), -1)], axis=1)
    np.testing.assert_allclose(recall_at_k(shifted, q, keys, 10), 0.9)
    # a random answer is almost never right
    assert recall_at_k(rng.integers(0, 2000, (30, 10)), q, keys, 10).mean() < 0.05
    # torch inputs
    r = recall_at_k(torch.from_numpy(I), torch.from_numpy(q).bfloat16(), torch.from_numpy(keys).bfloat16(), 10)
    assert r.shape == (30,) and r.dtype == np.float64 and r.mean() > 0.8


def test_exact_duplicate_keys():
    """Many copies of the best key: any k of them is a perfect answer."""
    keys = np.tile(np.array([[1.0, 2.0]], np.float32), (6, 1))
    keys = np.vstack([keys, [[0.1, 0.1]]]).astype(np.float32)
    q = np.array([[0.3, 0.7]], np.float32)
    assert recall_at_k(np.array([[5, 2, 4]]), q, keys, 3)[0] == 1.0
    assert recall_at_k(np.array([[5, 6, 4]]), q, keys, 3)[0] == pytest.approx(2 / 3)


def test_recall_bad_inputs(tied):
    q, keys = tied
    with pytest.raises(ValueError, match="found_ids"):
        recall_at_k(np.array([[0, 8]]), q, keys, 2)
    with pytest.raises(ValueError, match="found_ids"):
        recall_at_k(np.array([[0, -2]]), q, keys, 2)
    with pytest.raises(ValueError, match="found_ids"):
        recall_at_k(np.array([0, 1]), q, keys, 2)
    with pytest.raises(TypeError, match="found_ids"):
        recall_at_k(np.array([[0.0, 1.0]]), q, keys, 2)
    with pytest.raises(ValueError, match="gt_scores"):
        recall_at_k(np.array([[0, 1]]), q, keys, 3, gt_scores=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="keys"):
        recall_at_k(np.array([[0, 1]]), q, keys[:, :3], 2)
    with pytest.raises(ValueError, match="k"):
        recall_at_k(np.array([[0, 1]]), q, keys, 0)


def test_scanned_fraction():
    assert scanned_fraction(np.array([10, 30], np.int64), 100) == pytest.approx(0.2)
    assert scanned_fraction(np.array([110]), 100) == pytest.approx(1.1)  # centroids included
    with pytest.raises(ValueError, match="scanned"):
        scanned_fraction(np.array([], np.int64), 100)
    with pytest.raises(ValueError, match="scanned"):
        scanned_fraction(np.array([[1]]), 100)
    with pytest.raises(ValueError, match="scanned"):
        scanned_fraction(np.array([1.5]), 100)
    with pytest.raises(ValueError, match="ntotal"):
        scanned_fraction(np.array([1]), 0)
