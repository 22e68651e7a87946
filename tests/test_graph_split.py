"""GraphSplitLayer (kvstore.gpu.graph_split): RetrievalAttention's CPU/GPU split of one layer.

CPU tests run both halves on the CPU; the GPU-marked tests keep the steady zone on CUDA and check the same
equalities. References: full attention in float64 (kvstore.attention.core.full_attention) and the per-slot
Python path (group search of kvstore.graph + attention_with_lse per query head).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvstore.attention.core import attention_with_lse, full_attention
from kvstore.gpu.graph_split import GraphSplitConfig, GraphSplitLayer, graph_partial

CUDA = torch.cuda.is_available()
B, HKV, G, D = 2, 2, 4, 64


def _data(B=B, Hkv=HKV, G=G, N=300, D=D, Dv=None, Nq=40, seed=0, dtype=torch.float32, device="cpu"):
    """Keys drawn around a few directions (so attention is peaked), queries near them, fresh per seed."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(8, D, generator=g) * 1.5
    k = dirs[torch.randint(0, 8, (B, Hkv, N), generator=g)] + torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, Dv or D, generator=g)
    qt = dirs[torch.randint(0, 8, (B, Hkv * G, Nq), generator=g)] + torch.randn(B, Hkv * G, Nq, D, generator=g)
    q = dirs[torch.randint(0, 8, (B, Hkv * G), generator=g)] + torch.randn(B, Hkv * G, D, generator=g)
    return tuple(x.to(device, dtype) for x in (k, v, qt, q))


def _rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def _full(q, k, v):
    o, lse = full_attention(q.double()[:, :, None].cpu(), k.double().cpu(), v.double().cpu())
    return o[:, :, 0], lse[:, :, 0]


def _exhaustive(n_mid, **kw):
    """A config whose searches find, and whose heads attend, every middle token."""
    return GraphSplitConfig(top_k=max(1, n_mid), ef=max(1, n_mid), num_threads=2, **kw)


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("Dv", [None, 48])
def test_exhaustive_split_equals_full_attention(Dv):
    k, v, qt, q = _data(Dv=Dv)
    n_mid = k.shape[2] - 4 - 64
    layer = GraphSplitLayer.build(k, v, qt, _exhaustive(n_mid))
    assert layer.n == n_mid and layer.steady_used == 68 and len(layer.indexes) == B * HKV
    o, lse = layer.decode(q, return_lse=True)
    ref_o, ref_lse = _full(q, k, v)
    assert o.shape == (B, HKV * G, Dv or D) and o.dtype == q.dtype
    assert _rel(o, ref_o) <= 1e-4
    assert float((lse.double() - ref_lse).abs().max()) <= 1e-4
    pos = layer.last_positions()
    assert pos.shape == (B, HKV * G, n_mid)
    assert (torch.sort(pos, -1).values == torch.arange(4, 4 + n_mid)).all()  # every middle token, once
    assert layer.stats()["read_fraction"] == pytest.approx(1.0)


def test_keys_as_training_queries_and_default_config_run():
    k, v, _, q = _data(N=200, seed=3)
    layer = GraphSplitLayer.build(k, v, None, _exhaustive(200 - 68))
    assert _rel(layer.decode(q), _full(q, k, v)[0]) <= 1e-4
    small = GraphSplitLayer.build(k, v)  # defaults: top_k=100 of 132 middle tokens
    o = small.decode(q)
    assert torch.isfinite(o).all() and _rel(o, _full(q, k, v)[0]) < 0.5


@pytest.mark.parametrize("N", [1, 40, 68, 69])
def test_short_contexts(N):
    """No middle tokens (all steady) or a single one: still exactly full attention."""
    k, v, qt, q = _data(N=N, seed=N)
    n_mid = max(0, N - 68)
    layer = GraphSplitLayer.build(k, v, qt, _exhaustive(n_mid))
    assert layer.n == n_mid and len(layer.indexes) == (B * HKV if n_mid else 0)
    o, lse = layer.decode(q, return_lse=True)
    ref_o, ref_lse = _full(q, k, v)
    assert _rel(o, ref_o) <= 1e-4 and float((lse.double() - ref_lse).abs().max()) <= 1e-4
    assert layer.stats()["read_fraction"] == pytest.approx(1.0)


def test_append_keeps_equality_and_grows_the_window():
    k, v, qt, q = _data(N=250, seed=5)
    layer = GraphSplitLayer.build(k, v, qt, _exhaustive(250 - 68))
    cap = layer.steady_k.shape[2]
    g = torch.Generator().manual_seed(6)
    for step in range(cap - layer.steady_used + 3):  # past the first reallocation
        k1, v1 = torch.randn(B, HKV, D, generator=g), torch.randn(B, HKV, D, generator=g)
        layer.append(k1, v1)
        k, v = torch.cat([k, k1[:, :, None]], 2), torch.cat([v, v1[:, :, None]], 2)
        if step % 20 == 0 or layer.steady_used > cap:
            q = torch.randn(B, HKV * G, D, generator=g)
            assert _rel(layer.decode(q), _full(q, k, v)[0]) <= 1e-4
    assert layer.steady_k.shape[2] > cap and layer.length == k.shape[2]
    q = torch.randn(B, HKV * G, D, generator=g)
    assert _rel(layer.decode(q), _full(q, k, v)[0]) <= 1e-4
    assert layer.stats()["steady_tokens"] == k.shape[2] - layer.n


# ---------------------------------------------------------------------------------- C++ vs Python path
def _python_partial(layer, qh, top_k, ef, group_k):
    """Per slot: the group search of kvstore.graph, each head's own top_k by float64 score (ties: smaller id),
    attention_with_lse in float32. Returns o [H, G, Dv], lse [H, G], ids [H, G, top_k] (-1 padded)."""
    H, Gq, _ = qh.shape
    o = torch.zeros(H, Gq, layer.Dv)
    lse = torch.full((H, Gq), -math.inf)
    ids = torch.full((H, Gq, top_k), -1, dtype=torch.int64)
    for h in range(H):
        pool_k = min(group_k, layer.n)
        _, found, _ = layer.indexes[h].search_group(qh[h][None], pool_k, ef=max(ef, pool_k))
        found = found[0][found[0] >= 0]
        keys, vals = torch.from_numpy(layer.keys[h]), torch.from_numpy(layer.values[h])
        for j in range(Gq):
            s = keys[found].double() @ qh[h, j].double()
            order = np.lexsort((found, -s.numpy()))[:top_k]
            sel = torch.from_numpy(found[order])
            oj, lj = attention_with_lse(qh[h, j][None], keys[sel], vals[sel], layer.scale)
            o[h, j], lse[h, j], ids[h, j, :len(sel)] = oj[0], lj[0], sel
    return o, lse, ids


@pytest.mark.parametrize("top_k,ef,group_k", [(8, 16, None), (20, 64, 30), (1, 1, 1)])
def test_cpp_partial_matches_python_path(top_k, ef, group_k):
    k, v, qt, q = _data(N=900, seed=11)
    layer = GraphSplitLayer.build(k, v, qt, GraphSplitConfig(top_k=top_k, ef=ef, group_k=group_k, num_threads=2))
    qh = q.reshape(B * HKV, G, D).contiguous()
    o, lse, scanned, ids = graph_partial(layer.indexes, layer.keys, layer.values, qh.numpy(), top_k, ef,
                                         layer.scale, group_k)
    ro, rl, rids = _python_partial(layer, qh, top_k, ef, group_k or top_k * G)
    assert (torch.from_numpy(ids) == rids).all()
    np.testing.assert_allclose(o, ro.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, rl.numpy(), rtol=1e-5, atol=1e-5)
    assert scanned.shape == (B * HKV,) and (scanned > 0).all() and (scanned <= layer.n).all()
    # the layer runs the same partial: its positions are these ids shifted past the sink
    layer.decode(q)
    pos = layer.last_positions().reshape(B * HKV, G, top_k)
    assert (pos == torch.where(rids >= 0, rids + layer.sink, rids)).all()


def test_threads_give_identical_results_and_outputs_are_written_in_place():
    k, v, qt, q = _data(N=700, seed=13)
    layer = GraphSplitLayer.build(k, v, qt, GraphSplitConfig(top_k=10, ef=24, num_threads=2))
    qh = q.reshape(B * HKV, G, D).numpy().copy()
    one = graph_partial(layer.indexes, layer.keys, layer.values, qh, 10, 24, layer.scale, num_threads=1)
    out = (np.full((B * HKV, G, D), np.nan, np.float32), np.full((B * HKV, G), np.nan, np.float32),
           np.full(B * HKV, -7, np.int64), np.full((B * HKV, G, 10), -7, np.int64))
    two = graph_partial(layer.indexes, layer.keys, layer.values, qh, 10, 24, layer.scale, num_threads=2, out=out)
    for a, b, c in zip(one, two, out):
        assert np.array_equal(a, b) and np.shares_memory(b, c)


def test_stats_report_a_sparse_read():
    k, v, qt, q = _data(N=3000, seed=17)
    layer = GraphSplitLayer.build(k, v, qt, GraphSplitConfig(top_k=16, ef=32, num_threads=2))
    assert layer.stats()["read_fraction"] is None
    layer.decode(q)
    st = layer.stats()
    H, n = B * HKV, 3000 - 68
    assert st["gpu_kv_bytes"] == H * 68 * 2 * D * 4 and st["gpu_bytes"] >= st["gpu_kv_bytes"]
    assert st["host_bytes"] >= H * n * 2 * D * 4 and st["build_seconds"] > 0
    assert 0 < st["keys_scanned"] < H * n and 0 < st["values_read"] <= H * G * 16
    assert 0 < st["read_fraction"] < 0.5
    pos = layer.last_positions()
    assert ((pos >= 4) & (pos < 3000 - 64)).all()  # only middle positions, none padded here


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_on_cpu(dtype):
    k, v, qt, q = _data(N=200, seed=19, dtype=dtype)
    layer = GraphSplitLayer.build(k, v, qt, _exhaustive(200 - 68))
    o = layer.decode(q)
    assert o.dtype == dtype and layer.steady_k.dtype == dtype
    assert _rel(o, _full(q, k, v)[0]) <= (1e-2 if dtype == torch.bfloat16 else 2e-3)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_config():
    for kw, err in [({"top_k": 0}, ValueError), ({"sink": -1}, ValueError), ({"degree": 1}, ValueError),
                    ({"num_threads": 0}, ValueError), ({"top_k": 10, "group_k": 5}, ValueError),
                    ({"ef": 2.5}, TypeError), ({"window": True}, TypeError), ({"scale": math.nan}, ValueError)]:
        with pytest.raises(err, match=list(kw)[-1]):
            GraphSplitConfig(**kw)


def test_bad_build_inputs():
    k, v, qt, _ = _data(N=100)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        GraphSplitLayer.build(k.numpy(), v)
    with pytest.raises(ValueError, match="k must be"):
        GraphSplitLayer.build(k[0], v[0])
    with pytest.raises(TypeError, match="v must be float32"):
        GraphSplitLayer.build(k, v.double())
    with pytest.raises(ValueError, match="must agree"):
        GraphSplitLayer.build(k, v[:, :, :50])
    with pytest.raises(ValueError, match="dtype and device"):
        GraphSplitLayer.build(k, v.half())
    with pytest.raises(ValueError, match="q_train must be"):
        GraphSplitLayer.build(k, v, qt[:, :3])
    with pytest.raises(ValueError, match="q_train must be"):
        GraphSplitLayer.build(k, v, qt[..., :32])
    with pytest.raises(ValueError, match="empty"):
        GraphSplitLayer.build(k[:, :, :0], v[:, :, :0])
    bad = k.clone()
    bad[1, 1, 50, 3] = math.nan
    with pytest.raises(ValueError, match="k contains NaN"):
        GraphSplitLayer.build(bad, v, qt)
    with pytest.raises(TypeError, match="config"):
        GraphSplitLayer.build(k, v, qt, {"top_k": 3})


def test_bad_decode_and_append_inputs():
    k, v, qt, q = _data(N=150)
    layer = GraphSplitLayer.build(k, v, qt, GraphSplitConfig(top_k=4, num_threads=1))
    for bad, err in [(q[0], ValueError), (q[:, :5], ValueError), (q[:1], ValueError), (q[..., :32], ValueError),
                     (q.double(), TypeError), (q.numpy(), TypeError), (q[:, :HKV], ValueError)]:
        with pytest.raises(err, match="q "):
            layer.decode(bad)
    nan_q = q.clone()
    nan_q[0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.decode(nan_q)
    k1 = torch.randn(B, HKV, D)
    with pytest.raises(ValueError, match="k1 must be"):
        layer.append(k1[:, :1], k1)
    with pytest.raises(ValueError, match="v1 must be"):
        layer.append(k1, k1[..., :3])
    with pytest.raises(TypeError, match="v1 must be"):
        layer.append(k1, k1.long())
    assert layer.steady_used == 68 and layer.length == 150  # nothing appended by the failed calls


def test_bad_graph_partial_inputs():
    k, v, qt, q = _data(N=150)
    layer = GraphSplitLayer.build(k, v, qt, GraphSplitConfig(top_k=4, num_threads=1))
    ix, ks, vs = layer.indexes, layer.keys, layer.values
    qh = q.reshape(B * HKV, G, D).numpy()
    with pytest.raises(ValueError, match="keys has 3 entries"):
        graph_partial(ix, ks[:3], vs, qh, 4, 8, 0.1)
    with pytest.raises(ValueError, match="queries must be"):
        graph_partial(ix, ks, vs, qh[:3], 4, 8, 0.1)
    with pytest.raises(TypeError, match="queries must have dtype float32"):
        graph_partial(ix, ks, vs, qh.astype(np.float64), 4, 8, 0.1)
    with pytest.raises(TypeError, match=r"keys\[1\] must have dtype float32"):
        graph_partial(ix, [ks[0], ks[1].astype(np.float16), *ks[2:]], vs, qh, 4, 8, 0.1)
    with pytest.raises(ValueError, match=r"values\[0\] must be C-contiguous"):
        graph_partial(ix, ks, [np.asfortranarray(vs[0]), *vs[1:]], qh, 4, 8, 0.1)
    with pytest.raises(ValueError, match=r"values\[2\] must have shape"):
        graph_partial(ix, ks, [*vs[:2], vs[2][:10], vs[3]], qh, 4, 8, 0.1)
    with pytest.raises(ValueError, match=r"indexes\[0\] holds 82 keys but keys\[0\] has 10 rows"):
        graph_partial(ix, [ks[0][:10], *ks[1:]], [vs[0][:10], *vs[1:]], qh, 4, 8, 0.1)
    with pytest.raises(ValueError, match="top_k"):
        graph_partial(ix, ks, vs, qh, 0, 8, 0.1)
    with pytest.raises(ValueError, match="group_k"):
        graph_partial(ix, ks, vs, qh, 4, 8, 0.1, group_k=3)
    with pytest.raises(ValueError, match="scale"):
        graph_partial(ix, ks, vs, qh, 4, 8, math.inf)
    with pytest.raises(ValueError, match="out_o must have shape"):
        graph_partial(ix, ks, vs, qh, 4, 8, 0.1, out=(np.zeros((1, 1, 1), np.float32), None, None, None))
    frozen = np.zeros((B * HKV, G), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out_lse must be writable"):
        graph_partial(ix, ks, vs, qh, 4, 8, 0.1, out=(None, frozen, None, None))


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,Gq", [(64, 1), (64, 4), (128, 7), (128, 8)])
def test_cuda_split_equals_full_attention(dtype, D, Gq):
    k, v, qt, q = _data(N=333, D=D, G=Gq, seed=D + Gq, dtype=dtype, device="cuda")
    layer = GraphSplitLayer.build(k, v, qt, _exhaustive(333 - 68))
    assert layer.steady_k.is_cuda and not torch.from_numpy(layer.keys[0]).is_cuda
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for step in range(3):
        o = layer.decode(q)
        assert o.is_cuda and o.dtype == dtype
        assert _rel(o, _full(q, k, v)[0]) <= tol
        k1, v1 = torch.randn_like(k[:, :, 0]), torch.randn_like(v[:, :, 0])
        layer.append(k1, v1)
        k, v = torch.cat([k, k1[:, :, None]], 2), torch.cat([v, v1[:, :, None]], 2)
        q = torch.randn_like(q)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_and_cpu_layers_agree_on_a_sparse_step():
    """The same graphs (same seed, same float32 keys) give the same ids and the same output on both devices."""
    k, v, qt, q = _data(N=1500, seed=23)
    cfg = GraphSplitConfig(top_k=12, ef=32, num_threads=2)
    cpu = GraphSplitLayer.build(k, v, qt, cfg)
    gpu = GraphSplitLayer.build(k.cuda(), v.cuda(), qt.cuda(), cfg)
    oc, og = cpu.decode(q), gpu.decode(q.cuda())
    assert (cpu.last_positions() == gpu.last_positions()).all()
    assert _rel(og.cpu(), oc) <= 1e-5
