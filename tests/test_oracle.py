"""The oracle method (a KVStore whose query heads attend the true best keys) against the float64 yardstick of
kvstore.metrics: one key set shared by each GQA group, the bytes it reports equal to the budget."""
import math

import pytest
import torch

from kvstore import KVStore, StoreConfig
from kvstore.metrics import oracle_attention, oracle_keep


def _data(seed: int, Hkv: int = 2, Hg: int = 3, N: int = 300, D: int = 16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, Hkv, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, Hkv, N, D, generator=g, dtype=torch.float64)
    q = torch.randn(1, Hkv * Hg, 1, D, generator=g, dtype=torch.float64) * 2.0
    return q, k, v


@pytest.mark.parametrize("m", [1, 17, 120, 300])
def test_oracle_store_is_the_shared_oracle(m):
    q, k, v = _data(m)
    Hkv, N = k.shape[1], k.shape[2]
    store = KVStore(1, Hkv, k.shape[3], StoreConfig(method="oracle", retrieval=m, sink=0, window=0))
    store.prefill(0, k, v)
    o, _, access = store.attend_with_lse(0, q)
    ref = oracle_attention(q[0, :, 0].reshape(Hkv, -1, k.shape[3]), k[0], v[0], m / N, shared=True)
    torch.testing.assert_close(o[0, :, 0].double(), ref.reshape(-1, k.shape[3]), rtol=1e-9, atol=1e-9)
    assert [a.key_vectors for a in access[0]] == [m] * Hkv   # the group reads m keys, not m per query head


def test_oracle_full_budget_is_full_attention():
    q, k, v = _data(5)
    store = KVStore(1, k.shape[1], k.shape[3], StoreConfig(method="oracle", retrieval=1.0))
    store.prefill(0, k, v)
    o = store.attend(0, q)
    qg = q[0, :, 0].reshape(k.shape[1], -1, k.shape[3])
    ref = torch.softmax(torch.einsum("ghd,gnd->ghn", qg, k[0]) / math.sqrt(k.shape[3]), -1) @ v[0]
    torch.testing.assert_close(o[0, :, 0].double(), ref.reshape(-1, k.shape[3]), rtol=1e-9, atol=1e-9)


def test_oracle_keep_shared_holds_m_keys_and_each_heads_best():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 3, 50, generator=g, dtype=torch.float64)
    m = torch.tensor([1, 3, 10, 50])
    keep = oracle_keep(s, m, shared=True)
    assert keep.sum(-1).tolist() == [[x] * 3 for x in m.tolist()]
    best = s.argmax(-1)                                       # every head's best key is among the first 3 taken
    for gi in range(1, 4):
        assert keep[gi, 0, best[gi]].all()
    own = oracle_keep(s, m, shared=False)
    assert own.sum(-1).tolist() == [[x] * 3 for x in m.tolist()]
