"""kvstore.gpu.estimation (the finite-sample estimator) against float64 references, and GpuWaveLayer with
``estimator="fs_iso"`` against exact attention (torch backend on the CPU; the GPU test compares the kernels)."""
from __future__ import annotations

import math

import pytest
import torch

from kvstore.gpu.estimation import SIGMA_MAX, blom_scores, fs_correction, fs_table, isotropic_variance
from kvstore.gpu.wave_layer import GpuWaveLayer, WaveGpuConfig


def test_blom_scores_are_standardised_and_sorted():
    for n in (2, 3, 16, 100):
        z = blom_scores(n)
        assert z.shape == (n,) and bool((z[1:] > z[:-1]).all())
        assert abs(float(z.mean())) < 1e-12 and abs(float(z.pow(2).mean()) - 1) < 1e-12
    assert torch.equal(blom_scores(1), torch.zeros(1, dtype=torch.float64))


def test_fs_correction_matches_direct_logsumexp():
    gen = torch.Generator().manual_seed(0)
    table, slope = fs_table(40)
    n = torch.randint(0, 41, (500,), generator=gen)
    sigma = torch.rand(500, generator=gen) * (SIGMA_MAX + 6)       # also past the grid: the asymptote
    got = fs_correction(table, slope, n.float(), sigma).double()
    want = torch.tensor([0.0 if int(k) <= 1 else
                         float(torch.logsumexp(float(s) * blom_scores(int(k)), 0) - math.log(int(k)))
                         for k, s in zip(n, sigma)], dtype=torch.float64)
    assert float((got - want).abs().max()) < 2e-3 * (1 + float(want.abs().max()))
    # finite-sample below the log-normal sigma^2 / 2 (which is the n -> infinity limit)
    big = fs_correction(table, slope, torch.full((10,), 40.0), torch.linspace(0.5, 4, 10))
    assert bool((big < torch.linspace(0.5, 4, 10).pow(2) / 2).all())
    with pytest.raises(ValueError, match="nmax"):
        fs_table(0)


def test_isotropic_variance_matches_float64():
    gen = torch.Generator().manual_seed(1)
    H, n, D, C = 3, 200, 16, 9
    k = torch.randn(H, n, D, generator=gen)
    a = torch.randint(0, C - 1, (H, n), generator=gen)              # cluster C - 1 stays empty
    got = isotropic_variance(k, a, C)
    for h in range(H):
        for c in range(C):
            m = k[h][a[h] == c].double()
            want = 0.0 if m.shape[0] == 0 else float(m.var(0, unbiased=False).mean())
            assert abs(float(got[h, c]) - want) < 1e-5


def _attention_like(N, seed=0):
    from kvstore.datasets.attention_like import decode_queries, generate_kv

    torch.manual_seed(seed)
    k, v = generate_kv(1, N, device="cpu")
    return k, v, decode_queries(k, num_sets=2)


def _errors(layer, k, v, q):
    o = layer.decode(q).double()
    Hg = q.shape[1] // k.shape[1]
    kf, vf = k.double().repeat_interleave(Hg, 1), v.double().repeat_interleave(Hg, 1)
    s = torch.einsum("bhd,bhnd->bhn", q.double(), kf) / math.sqrt(q.shape[-1])
    ref = torch.einsum("bhn,bhnd->bhd", torch.softmax(s, -1), vf)
    return ((o - ref).norm(dim=-1) / ref.norm(dim=-1)).flatten()


def test_fs_iso_beats_centroid_estimator_at_equal_budgets():
    """Under the published step (no calibration, the rest dropped), the finite-sample estimator is the better one."""
    from kvstore import StoreConfig

    k, v, qs = _attention_like(8192)
    base = dict(backend="torch", cuda_graph=False)
    pub = StoreConfig.retroinfer()
    cen = GpuWaveLayer.build(k, v, WaveGpuConfig.from_store(pub, **base), device="cpu")
    fs = GpuWaveLayer.build(k, v, WaveGpuConfig.from_store(pub, estimator="fs_iso", estimate_rest=True, **base),
                            device="cpu")
    e_cen = torch.cat([_errors(cen, k, v, q) for q in qs]).median()
    e_fs = torch.cat([_errors(fs, k, v, q) for q in qs]).median()
    assert float(e_fs) < 0.8 * float(e_cen)
    assert fs.stats()["read_fraction"] < 1.1 * cen.stats()["read_fraction"]


@pytest.mark.parametrize("mode", ["gpu_only", "offload"])
def test_fs_iso_full_retrieval_is_exact_and_rest_vanishes(mode):
    k, v, qs = _attention_like(3000, seed=3)
    cfg = WaveGpuConfig(mode=mode, estimator="fs_iso", candidates=1.0, retrieval=1.0, estimation=0.0,
                        candidate_dtype="kv", segment_len=1024,
                        backend="torch", cuda_graph=False, cache_ratio=0.3)
    layer = GpuWaveLayer.build(k.float(), v.float(), cfg, device="cpu")
    q = qs[0].float()
    G, Hg = layer.G, q.shape[1] // layer.Hkv
    rest = layer._rank(q.reshape(G, Hg, -1))[3]
    assert bool(torch.isneginf(rest).all())
    assert float(_errors(layer, k.float(), v.float(), q).max()) < 1e-4


def test_fs_iso_after_reindex():
    k, v, qs = _attention_like(4096, seed=4)
    cfg = WaveGpuConfig(estimator="fs_iso", update_interval=32, backend="torch", cuda_graph=False)
    layer = GpuWaveLayer.build(k, v, cfg, device="cpu")
    C0 = layer.C
    for t in range(40):                                              # past update_interval: one re-index
        layer.append(k[:, :, t], v[:, :, t])
    assert layer.C > C0 and layer.key_var.shape == layer.sizes.shape
    assert bool(torch.isfinite(layer.decode(qs[0])).all())


def test_bad_estimator():
    with pytest.raises(ValueError, match="estimator"):
        WaveGpuConfig(estimator="magic")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["gpu_only", "offload"])
def test_fs_iso_cuda_kernels_match_torch_backend(mode):
    from kvstore.gpu import has_cuda_ext

    if not has_cuda_ext():
        pytest.skip("kvstore._cuda not built")
    k, v, qs = _attention_like(20000, seed=5)
    k, v = k.cuda(), v.cuda()
    base = dict(mode=mode, estimator="fs_iso", retrieval=0.05, estimation=0.116)
    fast = GpuWaveLayer.build(k, v, WaveGpuConfig(backend="cuda", cuda_graph=(mode == "gpu_only"), **base))
    ref = GpuWaveLayer.build(k, v, WaveGpuConfig(backend="torch", cuda_graph=False, **base))
    for q in qs:
        q = q.cuda()
        o, r = fast.decode(q).double(), ref.decode(q).double()
        assert float((o - r).norm() / r.norm()) < 2e-2
    errs = torch.cat([_errors(fast, k, v, q.cuda()).cpu() for q in qs])
    assert float(errs.median()) < 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,Hg,C,D", [(8, 4, 1000, 128), (3, 12, 257, 64), (64, 4, 8192, 128), (2, 1, 33, 128)])
def test_fs_cluster_scores_kernel_matches_torch(dtype, G, Hg, C, D):
    from kvstore.gpu import has_cuda_ext
    from kvstore.gpu.estimation import fs_cluster_scores

    if not has_cuda_ext():
        pytest.skip("kvstore._cuda not built")
    gen = torch.Generator().manual_seed(G + C)
    q = (torch.randn(G, Hg, D, generator=gen) * 2).to("cuda", dtype)
    cen = (torch.randn(G, C, D, generator=gen) + torch.randn(G, 1, D, generator=gen)).to("cuda", dtype)
    sizes = torch.randint(0, 60, (G, C), generator=gen).float().cuda()          # 0: empty clusters
    sd = (torch.rand(G, C, generator=gen) * 3).cuda()
    table, slope = fs_table(int(sizes.max()), "cuda")
    scale = 1 / math.sqrt(D)
    s, p, lse = fs_cluster_scores(q, cen, sizes, sd, table, slope, scale, backend="cuda")
    rs, rp, rl = fs_cluster_scores(q, cen, sizes, sd, table, slope, scale, backend="torch")
    fin = torch.isfinite(rs)
    assert torch.equal(torch.isfinite(s), fin)
    assert float((s[fin] - rs[fin]).abs().max()) < 1e-3 * (1 + float(rs[fin].abs().max()))
    assert float((p - rp).norm() / rp.norm()) < 1e-3
    assert float((lse - rl).abs().max()) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_store_passes_the_estimator_to_the_gpu_layer():
    from kvstore import KVStore, StoreConfig

    k, v, qs = _attention_like(4096, seed=6)
    store = KVStore(1, k.shape[1], k.shape[-1], StoreConfig(gpu_estimator="fs_iso", check_finite=False),
                    device="cuda")
    store.prefill(0, k.cuda(), v.cuda())
    assert store.layer_cache(0).layer.cfg.estimator == "fs_iso"
    assert bool(torch.isfinite(store.attend(0, qs[0].cuda()[:, :, None])).all())
