"""GpuWaveLayer (kvstore.gpu.wave_layer) against exact references.

CPU tests run the torch backend (the reference the kernels are compared with); the GPU-marked tests run the
CUDA kernels and compare them with the torch backend on the same index.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import numpy as np
import torch

from kvstore import KVStore, StoreConfig
from kvstore.attention.core import attention_with_lse, estimate_clusters, full_attention, merge_partials
from kvstore.gpu.wave_layer import GpuWaveLayer, WaveGpuConfig

FULL = dict(candidates=1.0, retrieval=1.0, estimation=0.0, candidate_dtype="kv")


def _published(**kw) -> WaveGpuConfig:
    """The published RetroInfer step as a layer config (the offload mode's step)."""
    return WaveGpuConfig.from_store(StoreConfig.retroinfer(**{k: v for k, v in kw.items() if k in _STORE}),
                                    **{k: v for k, v in kw.items() if k not in _STORE})


_STORE = {f.name for f in dataclasses.fields(StoreConfig)} - {"gpu_mode"}


def _with_backend(layer: GpuWaveLayer, backend: str) -> GpuWaveLayer:
    layer.cfg = dataclasses.replace(layer.cfg, backend=backend, cuda_graph=False)
    return layer

CUDA = torch.cuda.is_available()


def _cuda_ready() -> bool:
    from kvstore.gpu import has_cuda_ext

    return CUDA and has_cuda_ext()


def _kv(B, H, N, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    # a few directions + noise, so clusters mean something
    dirs = torch.randn(8, D, generator=g)
    lab = torch.randint(0, 8, (B, H, N), generator=g)
    k = dirs[lab] * 2 + torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, D, generator=g)
    return k.to(device, dtype), v.to(device, dtype)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _reference(layer: GpuWaveLayer, q: torch.Tensor) -> torch.Tensor:
    """The CPU reference method (kvstore.attention.core pieces, float64) on the layer's own index."""
    B, Hq, D = q.shape
    G, Hg = layer.G, Hq // layer.Hkv
    qg = q.double().reshape(G, Hg, D).cpu()
    out = torch.zeros(G, Hg, layer.Dv, dtype=torch.float64)
    kv_k = layer.kv_k.cpu().double().reshape(G, layer.n, D)
    kv_v = layer.kv_v.cpu().double().reshape(G, layer.n, layer.Dv)
    r, e = layer.cfg.budget(layer.length, layer.n).clusters(layer.n, layer.C)
    for g in range(G):
        sk = layer.steady_k[g, :layer.steady_len[g]].cpu().double()
        sv = layer.steady_v[g, :layer.steady_len[g]].cpu().double()
        parts = [attention_with_lse(qg[g], sk, sv, layer.scale)]
        if layer.C:
            cen = layer.centroid_values()[g].cpu().double()
            sizes = layer.sizes[g].cpu().double()
            s = (qg[g] @ cen.T) * layer.scale
            s = s.masked_fill(sizes[None] == 0, -math.inf)
            bonus = layer.cfg.rank_radius * qg[g].norm(dim=1)[:, None] * layer.radii[g].cpu().double() * layer.scale
            rank = torch.softmax(s + bonus, -1).sum(0)
            order = torch.argsort(rank, descending=True, stable=True)
            ret, est = order[:r], order[r:r + e]
            off = layer.offsets[g].cpu()
            rows = torch.cat([torch.arange(int(off[c]), int(off[c + 1])) for c in ret.tolist()] or
                             [torch.zeros(0, dtype=torch.long)])
            parts.append(attention_with_lse(qg[g], kv_k[g, rows], kv_v[g, rows], layer.scale))
            keep = est[sizes[est] > 0]
            if keep.numel():
                parts.append(estimate_clusters(qg[g], cen[keep], sizes[keep],
                                               layer.value_sums[g].cpu().double()[keep], layer.scale))
        out[g] = merge_partials(parts)[0]
    return out.reshape(B, Hq, layer.Dv)


@pytest.mark.parametrize("mode", ["gpu_only", "offload"])
def test_full_budget_equals_full_attention(mode):
    B, H, Hg, N, D = 2, 2, 3, 700, 32
    k, v = _kv(B, H, N, D, seed=1)
    cfg = WaveGpuConfig(mode=mode, segment_len=256, backend="torch", cuda_graph=False, cache_ratio=0.2, **FULL)
    layer = GpuWaveLayer.build(k, v, cfg, device="cpu")
    q = torch.randn(B, H * Hg, D)
    o = layer.decode(q)
    ref = full_attention(q[:, :, None].double(), k.double(), v.double())[0][:, :, 0]
    assert _rel(o, ref) < 1e-5


@pytest.mark.parametrize("mode", ["offload"])
@pytest.mark.parametrize("rank_radius", [0.0, 0.25])
def test_published_budgets_match_reference_method(mode, rank_radius):
    B, H, Hg, N, D = 1, 3, 4, 2000, 64
    k, v = _kv(B, H, N, D, seed=2)
    cfg = _published(mode=mode, segment_len=512, backend="torch", cuda_graph=False, rank_radius=rank_radius)
    layer = GpuWaveLayer.build(k, v, cfg, device="cpu")
    for step in range(3):
        q = torch.randn(B, H * Hg, D, generator=torch.Generator().manual_seed(10 + step)) * 2
        o = layer.decode(q)
        assert _rel(o, _reference(layer, q)) < 1e-5
    st = layer.stats()
    assert 0 < st["read_fraction"] < 0.5
    if mode == "offload":
        assert st["hit_ratio"] is not None and st["host_bytes"] > 0


def test_offload_caches_the_clusters_it_reads():
    B, H, Hg, N, D = 2, 2, 2, 1500, 32
    k, v = _kv(B, H, N, D, seed=3)
    b = GpuWaveLayer.build(k, v, _published(mode="offload", cache_ratio=0.5, segment_len=512, backend="torch",
                                            cuda_graph=False, candidates=0.05), device="cpu")
    q = torch.randn(B, H * Hg, D)
    for _ in range(4):  # the same query: after the first step its clusters are cached
        assert _rel(b.decode(q), _reference(b, q)) < 1e-5
    assert b.stats()["hit_ratio"] >= 0.7


def test_append_and_reindex_keep_every_token_once():
    B, H, Hg, N, D = 1, 2, 2, 300, 16
    k, v = _kv(B, H, N + 40, D, seed=4)
    cfg = WaveGpuConfig(update_interval=16, window=8, segment_len=128, backend="torch", cuda_graph=False, **FULL)
    layer = GpuWaveLayer.build(k[:, :, :N], v[:, :, :N], cfg, device="cpu")
    C0 = layer.C
    for t in range(N, N + 40):
        layer.append(k[:, :, t], v[:, :, t])
    assert layer.C > C0 and layer.length == N + 40
    q = torch.randn(B, H * Hg, D)
    ref = full_attention(q[:, :, None].double(), k.double(), v.double())[0][:, :, 0]
    assert _rel(layer.decode(q), ref) < 1e-5


@pytest.mark.parametrize("budgets", [{}, dict(candidates=0.3, retrieval=0.05, estimation=0.2),
                                     dict(candidates=400, retrieval=40, estimation=0, calibrate=False)])
def test_batched_layer_equals_per_head_store_over_appends(budgets):
    """One algorithm: the batched layer (torch backend) and the per-head CPU store give the same step, through
    prefill, appends and several re-indexings (clusters of every size, as small re-indexing chunks make)."""
    B, H, Hg, N, D = 2, 2, 3, 1200, 32
    k, v = _kv(B, H, N + 60, D, seed=21)
    sc = StoreConfig(method="wave", segment_len=512, update_interval=20, window=16, **budgets)
    layer = GpuWaveLayer.build(k[:, :, :N], v[:, :, :N], WaveGpuConfig.from_store(sc, backend="torch",
                                                                                  cuda_graph=False), device="cpu")
    store = KVStore(1, H, D, sc)
    store.prefill(0, k[:, :, :N], v[:, :, :N])
    g = torch.Generator().manual_seed(5)
    for t in range(N, N + 60):
        if t % 15 == 0:
            q = torch.randn(B, H * Hg, D, generator=g) * 2
            assert _rel(layer.decode(q), store.attend(0, q[:, :, None])[:, :, 0]) < 1e-5
        layer.append(k[:, :, t], v[:, :, t])
        store.append(0, k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert layer.length == N + 60 and layer.C > 0


def test_short_context_is_all_steady():
    k, v = _kv(1, 1, 20, 8, seed=5)
    layer = GpuWaveLayer.build(k, v, WaveGpuConfig(backend="torch", cuda_graph=False), device="cpu")
    assert layer.C == 0
    q = torch.randn(1, 2, 8)
    ref = full_attention(q[:, :, None].double(), k.double(), v.double())[0][:, :, 0]
    assert _rel(layer.decode(q), ref) < 1e-6


def test_bad_inputs():
    k, v = _kv(1, 2, 100, 8)
    with pytest.raises(ValueError, match="mode"):
        WaveGpuConfig(mode="fast")
    with pytest.raises(ValueError, match="cache_ratio"):
        WaveGpuConfig(cache_ratio=0)
    with pytest.raises(ValueError, match="k must be"):
        GpuWaveLayer.build(k[0], v, WaveGpuConfig(backend="torch"), device="cpu")
    with pytest.raises(ValueError, match="agree"):
        GpuWaveLayer.build(k, v[:, :, :50], WaveGpuConfig(backend="torch"), device="cpu")
    layer = GpuWaveLayer.build(k, v, WaveGpuConfig(backend="torch", cuda_graph=False), device="cpu")
    with pytest.raises(ValueError, match="q must be"):
        layer.decode(torch.randn(1, 3, 8))
    with pytest.raises(TypeError, match="q must be"):
        layer.decode(torch.randn(1, 4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="k1"):
        layer.append(torch.randn(1, 2, 9), torch.randn(1, 2, 8))
    q = torch.randn(1, 4, 8)
    assert torch.isfinite(layer.decode(q)).all()  # still usable after the failed calls


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["gpu_only", "offload"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernels_match_torch_backend(mode, dtype):
    if not _cuda_ready():
        pytest.skip("kvstore._cuda not built")
    B, H, Hg, N, D = 2, 4, 4, 20000, 128
    k, v = _kv(B, H, N, D, dtype, "cuda", seed=6)
    torch.manual_seed(6)  # the queries: the same ones whatever ran before
    base = dict(mode=mode, segment_len=8192, cuda_graph=(mode == "gpu_only"))
    fast = GpuWaveLayer.build(k, v, WaveGpuConfig(backend="cuda", **base))
    for step in range(3):
        q = torch.randn(B, H * Hg, D, device="cuda", dtype=dtype) * 2
        o = fast.decode(q)
        cfg = fast.cfg
        ref = _with_backend(fast, "torch").decode(q)
        fast.cfg = cfg
        assert _rel(o.float(), ref.float()) < 2e-2
        if mode == "offload":
            assert _rel(o.cpu(), _reference(fast, q.cpu())) < 2e-2
        fast.append(k[:, :, -1], v[:, :, -1])
    if mode == "offload":
        assert fast.stats()["hit_ratio"] is not None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("B, H", [(1, 8), (3, 2), (2, 3)])
def test_offload_build_gives_the_gpu_only_index(B, H):
    """The offload build's index in pinned memory is the one the gpu_only build keeps on the device."""
    if not _cuda_ready():
        pytest.skip("kvstore._cuda not built")
    k, v = _kv(B, H, 9000, 128, torch.bfloat16, "cuda", seed=8)
    a = GpuWaveLayer.build(k, v, WaveGpuConfig(mode="gpu_only", segment_len=4096))
    b = GpuWaveLayer.build(k, v, WaveGpuConfig(mode="offload", segment_len=4096))
    assert b.kv_k.device.type == "cpu"
    assert torch.equal(b.kv_k, a.kv_k.cpu()) and torch.equal(b.kv_v, a.kv_v.cpu())
    for name in ("centroids", "sizes", "offsets", "value_sums", "radii"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_full_budget_is_exact():
    if not _cuda_ready():
        pytest.skip("kvstore._cuda not built")
    B, H, Hg, N, D = 2, 2, 4, 5000, 64
    k, v = _kv(B, H, N, D, torch.float32, "cuda", seed=7)
    layer = GpuWaveLayer.build(k, v, WaveGpuConfig(segment_len=2048, **FULL))
    q = torch.randn(B, H * Hg, D, device="cuda")
    ref = full_attention(q[:, :, None].double(), k.double(), v.double())[0][:, :, 0]
    assert _rel(layer.decode(q).double(), ref) < 1e-4


# --- persistence (KVStore.save / load of GPU-layer stores; the layer runs on the CPU here) --------------------------
@pytest.mark.parametrize("mode", ["gpu_only", "offload"])
@pytest.mark.parametrize("estimator", ["centroid", "fs_iso"])
def test_state_round_trip_decodes_the_same(mode, estimator):
    B, H, Hg, N, D = 2, 2, 3, 900, 32
    k, v = _kv(B, H, N, D, seed=11)
    cfg = WaveGpuConfig(mode=mode, estimator=estimator, segment_len=256, update_interval=16, window=8,
                        backend="torch", cuda_graph=False, cache_ratio=0.3)
    layer = GpuWaveLayer.build(k, v, cfg, device="cpu")
    for t in range(20):                                            # past update_interval: the index grew
        layer.append(k[:, :, t], v[:, :, t])
    meta, arrays = layer.state()
    again = GpuWaveLayer.from_state(meta, arrays, "cpu")
    assert (again.C, again.n, again.seq_len, again.steady_len) == (layer.C, layer.n, layer.seq_len, layer.steady_len)
    q = torch.randn(B, H * Hg, D, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.decode(q), layer.decode(q))
    again.append(k[:, :, 30], v[:, :, 30])                           # and it keeps going
    assert bool(torch.isfinite(again.decode(q)).all())


@pytest.mark.parametrize("saved,loaded", [("kv", "int8"), ("int8", "kv"), ("int8", "int8")])
def test_state_centroids_convert_between_dtypes(saved, loaded):
    B, H, Hg, N, D = 1, 2, 3, 800, 32
    k, v = _kv(B, H, N, D, seed=21)
    base = dict(segment_len=256, update_interval=16, window=8, backend="torch", cuda_graph=False)
    layer = GpuWaveLayer.build(k, v, WaveGpuConfig(centroid_dtype=saved, **base), device="cpu")
    meta, arrays = layer.state()
    assert arrays["centroids"].dtype == (np.int8 if saved == "int8" else np.float32)
    again = GpuWaveLayer.from_state(dict(meta, config=dict(meta["config"], centroid_dtype=loaded)), arrays, "cpu")
    want = GpuWaveLayer.build(k, v, WaveGpuConfig(centroid_dtype=loaded, **base), device="cpu")
    assert again.centroids.dtype == want.centroids.dtype
    if saved == loaded or loaded == "int8":                       # quantizing is a function of the float centroids
        assert torch.equal(again.centroids, want.centroids)
        q = torch.randn(B, H * Hg, D, generator=torch.Generator().manual_seed(5))
        assert torch.equal(again.decode(q), want.decode(q))
    else:                                                          # int8 widened: within half a quantization step
        step = layer.centroid_scale[..., None] * 0.5 * (1 + 1e-5)
        assert bool(((again.centroids.float() - want.centroids.float()).abs() <= step + 1e-6).all())
    with pytest.raises(ValueError, match="centroid_scale"):
        GpuWaveLayer.from_state(meta, dict(arrays, centroid_scale=arrays["centroid_scale"][:, :3]), "cpu")


def _radii_brute(layer: GpuWaveLayer) -> torch.Tensor:
    """[G, C] float64: each cluster's largest member distance from its f32-rounded stored centroid."""
    out = torch.zeros(layer.G, layer.C, dtype=torch.float64)
    keys = layer.kv_k.view(layer.G, layer.n, layer.D).double()
    for g in range(layer.G):
        for c in range(layer.C):
            a, b = int(layer.offsets[g, c]), int(layer.offsets[g, c + 1])
            if b > a:
                out[g, c] = (keys[g, a:b] - layer.centroids[g, c].double()).norm(dim=1).max()
    return out


def test_radii_after_appends_and_a_state_without_them():
    B, H, N, D = 2, 2, 700, 16
    k, v = _kv(B, H, N, D, seed=13)
    cfg = WaveGpuConfig(segment_len=256, update_interval=16, window=8, backend="torch", cuda_graph=False,
                        centroid_dtype="kv")                       # radii against the centroids as stored
    layer = GpuWaveLayer.build(k, v, cfg, device="cpu")
    for t in range(40):                                            # two re-indexings
        layer.append(k[:, :, t], v[:, :, t])
    ref = _radii_brute(layer)
    # built from the original keys and f32 centroids: within float32 rounding of the stored ones
    assert float((layer.radii.double() - ref).abs().max()) < 1e-4
    meta, arrays = layer.state()
    old = GpuWaveLayer.from_state(meta, {n: a for n, a in arrays.items() if n != "radii"}, "cpu")
    assert float((old.radii.double() - ref).abs().max()) < 1e-4
    q = torch.randn(B, H * 3, D, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(old.decode(q), layer.decode(q), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="radii"):
        GpuWaveLayer.from_state(meta, dict(arrays, radii=-arrays["radii"] - 1), "cpu")


def test_from_state_rejects_inconsistent_state():
    k, v = _kv(1, 2, 600, 16, seed=12)
    layer = GpuWaveLayer.build(k, v, WaveGpuConfig(segment_len=256, backend="torch", cuda_graph=False), device="cpu")
    meta, arrays = layer.state()
    with pytest.raises(ValueError, match="offsets"):
        bad = dict(arrays, offsets=arrays["offsets"][:, ::-1].copy())
        GpuWaveLayer.from_state(meta, bad, "cpu")
    with pytest.raises(ValueError, match="kv_k"):
        GpuWaveLayer.from_state(meta, dict(arrays, kv_k=arrays["kv_k"][1:]), "cpu")
    with pytest.raises(ValueError, match="dtype"):
        GpuWaveLayer.from_state(dict(meta, dtype="int8"), arrays, "cpu")
    with pytest.raises(ValueError, match="missing"):
        GpuWaveLayer.from_state(meta, {n: a for n, a in arrays.items() if n != "sizes"}, "cpu")


def test_store_with_a_gpu_layer_saves_and_loads(tmp_path):
    from kvstore._fileformat import CorruptFileError

    B, H, Hg, N, D = 1, 2, 2, 700, 16
    k, v = _kv(B, H, N, D, seed=13)
    store = KVStore(2, H, D, StoreConfig(method="wave", segment_len=256))
    from kvstore.layers import WaveLayer

    store._layers[1] = WaveLayer(GpuWaveLayer.build(k, v, WaveGpuConfig(segment_len=256, backend="torch",
                                                                        cuda_graph=False), device="cpu"))
    # what a CUDA store builds, here on the CPU
    store.batch_size = B
    store.save(tmp_path / "s.kvs")
    loaded = KVStore.load(tmp_path / "s.kvs")
    assert isinstance(loaded.layer_cache(1), WaveLayer) and loaded.layer_cache(0) is None
    q = torch.randn(B, H * Hg, 1, D)
    assert torch.equal(loaded.attend(1, q), store.attend(1, q))
    raw = bytearray((tmp_path / "s.kvs").read_bytes())
    raw[-100] ^= 0xFF
    (tmp_path / "bad.kvs").write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError):
        KVStore.load(tmp_path / "bad.kvs")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_store_saves_and_loads(tmp_path):
    from kvstore import KVStore, StoreConfig

    B, H, Hg, N, D = 2, 2, 2, 5000, 64
    k, v = _kv(B, H, N, D, torch.bfloat16, "cuda", seed=14)
    store = KVStore(1, H, D, StoreConfig(method="wave"), device="cuda")
    store.prefill(0, k, v)
    store.save(tmp_path / "s.kvs")
    loaded = KVStore.load(tmp_path / "s.kvs", device="cuda")
    q = torch.randn(B, H * Hg, 1, D, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(loaded.attend(0, q), store.attend(0, q))


@pytest.mark.parametrize("budgets", [{}, FULL])
def test_ragged_batch_equals_each_sequence_alone(budgets):
    """Prompts of different lengths, left-padded into one batch: every sequence's steps (prefill, appends across
    re-indexing) equal those of the sequence run alone."""
    H, Hg, D = 2, 2, 32
    lengths = [900, 400, 60, 1300]
    N = max(lengths)
    k, v = _kv(len(lengths), H, N + 40, D, seed=22)
    mask = torch.zeros(len(lengths), N, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, N - n:] = True                                     # left padding
    sc = StoreConfig(method="wave", segment_len=256, update_interval=16, window=16, **budgets)
    cfg = WaveGpuConfig.from_store(sc, backend="torch", cuda_graph=False)
    batch = GpuWaveLayer.build(k[:, :, :N], v[:, :, :N], cfg, device="cpu", mask=mask)
    alone = [GpuWaveLayer.build(k[b:b + 1, :, N - n:N], v[b:b + 1, :, N - n:N], cfg, device="cpu")
             for b, n in enumerate(lengths)]
    assert batch.seq_lengths() == lengths
    g = torch.Generator().manual_seed(9)
    for t in range(N, N + 40):
        if t % 10 == 0:
            q = torch.randn(len(lengths), H * Hg, D, generator=g) * 2
            got = batch.decode(q)
            for b, layer in enumerate(alone):
                assert _rel(got[b:b + 1], layer.decode(q[b:b + 1])) < 1e-5, (t, b)
        batch.append(k[:, :, t], v[:, :, t])
        for b, layer in enumerate(alone):
            layer.append(k[b:b + 1, :, t], v[b:b + 1, :, t])
    assert batch.seq_lengths() == [n + 40 for n in lengths]
    meta, arrays = batch.state()
    again = GpuWaveLayer.from_state(meta, arrays, "cpu")
    q = torch.randn(len(lengths), H * Hg, D, generator=g)
    assert torch.equal(again.decode(q), batch.decode(q))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_ragged_batch_of_eight_equals_each_alone():
    """Eight prompts of 16K-128K tokens (Llama-3-8B layout, bf16) in one batched layer through KVStore on CUDA:
    every sequence's output equals the same sequence run alone, to bf16 tolerance."""
    if not _cuda_ready():
        pytest.skip("kvstore._cuda not built")
    from kvstore.datasets.attention_like import AttentionLikeSpec, decode_queries, generate_kv

    spec = AttentionLikeSpec()
    lengths = [16384, 131072, 32768, 65536, 24576, 98304, 49152, 114688]
    N = max(lengths)
    k, v = generate_kv(len(lengths), N, spec, device="cuda", seed=4)
    mask = torch.zeros(len(lengths), N, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, N - n:] = True
    store = KVStore(1, spec.num_kv_heads, spec.head_dim, StoreConfig(), device="cuda")
    store.prefill(0, k, v, mask=mask)
    assert store.stats()["layers"][0]["layer"] == "wave" and store.seq_lengths() == lengths
    q = torch.stack([decode_queries(k[b:b + 1, :, N - n:], spec, num_sets=1, seed=4)[0, 0]
                     for b, n in enumerate(lengths)])
    got = store.attend(0, q[:, :, None])
    for b, n in enumerate(lengths):
        alone = KVStore(1, spec.num_kv_heads, spec.head_dim, StoreConfig(), device="cuda")
        alone.prefill(0, k[b:b + 1, :, N - n:], v[b:b + 1, :, N - n:])
        assert _rel(got[b:b + 1].float(), alone.attend(0, q[b:b + 1, :, None]).float()) < 2e-2, b
