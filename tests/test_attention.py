"""Attention pieces against float64 references: partials, merge, estimation, full attention."""
from __future__ import annotations

import math

import pytest
import torch

from kvstore.attention import attention_with_lse, estimate_clusters, full_attention, merge_partials


def ref_attention(q, k, v):
    """Plain float64 softmax attention: q [G, d], k [n, d], v [n, dv]."""
    s = (q.double() @ k.double().T) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def test_partial_matches_reference():
    q, k, v = torch.randn(4, 64), torch.randn(100, 64), torch.randn(100, 32)
    o, lse = attention_with_lse(q, k, v)
    ro, rl = ref_attention(q, k, v)
    torch.testing.assert_close(o.double(), ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), rl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [[50, 50], [1, 99], [0, 100], [10, 30, 0, 60]])
def test_merge_equals_attention_over_union(splits):
    q, k, v = torch.randn(3, 16, dtype=torch.float64), torch.randn(100, 16, dtype=torch.float64), \
        torch.randn(100, 8, dtype=torch.float64)
    perm = torch.randperm(100)
    parts, i = [], 0
    for n in splits:
        idx = perm[i:i + n]
        parts.append(attention_with_lse(q, k[idx], v[idx]))
        i += n
    o, lse = merge_partials(parts)
    ro, rl = ref_attention(q, k, v)
    torch.testing.assert_close(o, ro, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, rl, rtol=1e-10, atol=1e-10)


def test_merge_of_empty_parts_is_empty():
    q = torch.randn(2, 8)
    empty = attention_with_lse(q, torch.zeros(0, 8), torch.zeros(0, 4))
    o, lse = merge_partials([empty, empty])
    assert (o == 0).all() and torch.isneginf(lse).all()
    with pytest.raises(ValueError, match="parts"):
        merge_partials([])


def test_estimation_with_singleton_clusters_is_exact():
    q, k, v = torch.randn(4, 32, dtype=torch.float64), torch.randn(50, 32, dtype=torch.float64), \
        torch.randn(50, 16, dtype=torch.float64)
    o, lse = estimate_clusters(q, k, torch.ones(50, dtype=torch.float64), v)
    ro, rl = ref_attention(q, k, v)
    torch.testing.assert_close(o, ro)
    torch.testing.assert_close(lse, rl)


def test_estimation_of_identical_keys_is_exact():
    """A cluster whose members share one key is estimated exactly by centroid, size, value sum."""
    q = torch.randn(2, 8, dtype=torch.float64)
    c = torch.randn(3, 8, dtype=torch.float64)
    sizes = torch.tensor([1.0, 5.0, 300.0], dtype=torch.float64)
    k = torch.cat([c[i].expand(int(s), 8) for i, s in enumerate(sizes)])
    v = torch.randn(k.shape[0], 4, dtype=torch.float64)
    sums = torch.stack([v[:1].sum(0), v[1:6].sum(0), v[6:].sum(0)])
    o, lse = estimate_clusters(q, c, sizes, sums)
    ro, rl = ref_attention(q, k, v)
    torch.testing.assert_close(o, ro)
    torch.testing.assert_close(lse, rl)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (9, 3), (4, 1)])
def test_full_attention_gqa_and_lengths(hq, hkv):
    B, N, d = 3, 40, 16
    q = torch.randn(B, hq, 1, d)
    k, v = torch.randn(B, hkv, N, d), torch.randn(B, hkv, N, d)
    lengths = torch.tensor([40, 7, 1])
    o, lse = full_attention(q, k, v, lengths)
    G = hq // hkv
    for b in range(B):
        for h in range(hq):
            n = int(lengths[b])
            ro, rl = ref_attention(q[b, h], k[b, h // G, :n], v[b, h // G, :n])
            torch.testing.assert_close(o[b, h].double(), ro, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[b, h].double(), rl, rtol=1e-5, atol=1e-5)


def test_full_attention_rejects_bad_gqa():
    with pytest.raises(ValueError, match="multiple"):
        full_attention(torch.randn(1, 5, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


def test_low_precision_inputs_accumulate_in_fp32():
    q, k, v = torch.randn(4, 64), torch.randn(2000, 64), torch.randn(2000, 64)
    o, lse = attention_with_lse(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert o.dtype == torch.float32
    ro, _ = ref_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    assert ((o.double() - ro).norm() / ro.norm()) < 1e-5
