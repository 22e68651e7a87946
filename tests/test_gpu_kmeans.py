"""kvstore.gpu.kmeans: segmented spherical k-means of many heads at once.

CPU tests: the torch backend against the C++ reference (kvstore._C via
kvstore.wave._kmeans_cpu) head by head, k-means invariants, the centroid update
against float64. GPU tests (marked ``gpu``): the CUDA update kernel against the
torch reference, the whole clustering on the GPU against the CPU reference, and
the 1M-key timing target."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from kvstore.gpu.kmeans import cluster_means, kmeans_objective, segmented_kmeans_gpu
from kvstore.wave import _kmeans_cpu, clusters_for, segment_bounds


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from kvstore.gpu import has_cuda_ext

    return has_cuda_ext()


gpu = pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and the kvstore._cuda extension")


def keys_like(G, n, D, seed, dup=False):
    """Keys with a common offset per head (like real keys); ``dup``: few distinct directions (clusters go empty)."""
    gen = torch.Generator().manual_seed(seed)
    if dup:
        base = torch.randn(G, 12, D, generator=gen) * 3
        pick = torch.randint(0, 12, (G, n), generator=gen)
        k = torch.gather(base, 1, pick[..., None].expand(G, n, D)) + 0.05 * torch.randn(G, n, D, generator=gen)
    else:
        k = torch.randn(G, n, D, generator=gen)
    return k + 2.0 * torch.randn(G, 1, D, generator=gen)


def total_clusters(n, tpc, seg):
    b = segment_bounds(n, tpc, seg)
    return sum(clusters_for(b[i + 1] - b[i], tpc) for i in range(len(b) - 1))


def check_invariants(keys, assign, centroids, sizes):
    """Every token in one cluster, sizes = member counts, centroid = float64 mean of the members, empty -> 0."""
    G, n, D = keys.shape
    C = centroids.shape[1]
    assert assign.dtype == torch.int64 and assign.shape == (G, n)
    assert centroids.dtype == sizes.dtype == torch.float32 and sizes.shape == (G, C)
    assert int(assign.min()) >= 0 and int(assign.max()) < C
    for g in range(G):
        cnt = torch.bincount(assign[g].cpu(), minlength=C)
        assert torch.equal(sizes[g].cpu(), cnt.float())
        sums = torch.zeros(C, D, dtype=torch.float64).index_add_(0, assign[g].cpu(), keys[g].cpu().double())
        mean = sums / cnt.clamp_min(1)[:, None]
        torch.testing.assert_close(centroids[g].cpu().double(), mean, rtol=1e-6, atol=1e-6)
    assert float(sizes.sum()) == G * n


def compare_with_cpu_reference(keys, assign, centroids, sizes, tpc, seg, iters, seed, min_agree=1.0,
                               obj_tol=1e-3):
    """Head by head against kvstore._C: same clusters (after dropping empty ones) or a k-means objective
    within obj_tol (relative); at least min_agree of the tokens agree."""
    for g in range(keys.shape[0]):
        a_ref, c_ref, s_ref = _kmeans_cpu(keys[g].cpu().float().numpy(), tpc, seg, iters, seed, 2)
        keep = sizes[g].cpu() > 0
        ours = (torch.cumsum(keep.to(torch.int64), 0) - 1)[assign[g].cpu()]      # drop empties like the reference
        agree = float((ours == a_ref).double().mean())
        obj = float(kmeans_objective(keys[g:g + 1].cpu(), assign[g:g + 1].cpu(), centroids[g:g + 1].cpu())[0])
        obj_ref = float(kmeans_objective(keys[g:g + 1].cpu(), a_ref[None], c_ref[None])[0])
        assert agree >= min_agree, f"head {g}: {agree:.4f} of the tokens agree"
        assert abs(obj - obj_ref) <= obj_tol * obj_ref, f"head {g}: objective {obj} vs {obj_ref}"
        if agree == 1.0 and int(keep.sum()) == c_ref.shape[0]:
            torch.testing.assert_close(centroids[g].cpu()[keep], c_ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- CPU (torch backend)

@pytest.mark.parametrize("G,n,D,tpc,seg", [(3, 3000, 32, 16, 1024), (2, 1000, 64, 8, 8192), (4, 2100, 16, 16, 700)])
def test_torch_backend_equals_cpu_reference(G, n, D, tpc, seg):
    keys = keys_like(G, n, D, seed=n + D)
    assign, cen, sizes = segmented_kmeans_gpu(keys, tpc, seg, 10, 3, backend="torch")
    assert cen.shape == (G, total_clusters(n, tpc, seg), D)
    check_invariants(keys, assign, cen, sizes)
    compare_with_cpu_reference(keys, assign, cen, sizes, tpc, seg, 10, 3, min_agree=0.999)


def test_torch_backend_with_emptied_clusters():
    keys = keys_like(3, 2400, 16, seed=9, dup=True)
    assign, cen, sizes = segmented_kmeans_gpu(keys, 8, 800, 10, 0, backend="torch")
    check_invariants(keys, assign, cen, sizes)
    compare_with_cpu_reference(keys, assign, cen, sizes, 8, 800, 10, 0, min_agree=0.99)
    empty = sizes == 0
    assert bool((cen[empty] == 0).all())


def test_bf16_keys_and_iters_zero():
    keys = keys_like(2, 900, 32, seed=4).bfloat16()
    for iters in (0, 3):
        assign, cen, sizes = segmented_kmeans_gpu(keys, 16, 8192, iters, 1, backend="torch")
        check_invariants(keys.float(), assign, cen, sizes)
        compare_with_cpu_reference(keys.float(), assign, cen, sizes, 16, 8192, iters, 1, min_agree=0.999)


def test_deterministic_and_seeded():
    keys = keys_like(2, 1500, 32, seed=1)
    a1, c1, _ = segmented_kmeans_gpu(keys, 16, 8192, 5, 0, backend="torch")
    a2, c2, _ = segmented_kmeans_gpu(keys, 16, 8192, 5, 0, backend="torch")
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    a3, _, _ = segmented_kmeans_gpu(keys, 16, 8192, 5, 1, backend="torch")
    assert not torch.equal(a1, a3)


def test_half_precision_matmul_keeps_quality():
    keys = keys_like(2, 3000, 64, seed=2)
    a32, c32, s32 = segmented_kmeans_gpu(keys, 16, 8192, 10, 0, backend="torch", matmul="fp32")
    for mm in ("fp16", "bf16"):
        a, c, s = segmented_kmeans_gpu(keys, 16, 8192, 10, 0, backend="torch", matmul=mm)
        check_invariants(keys, a, c, s)
        obj, obj32 = kmeans_objective(keys, a, c), kmeans_objective(keys, a32, c32)
        assert bool((obj <= obj32 * 1.01).all()), (mm, obj, obj32)


def _two_clusterings(dtype, seed: int, first: str, second: str):
    """The torch-backend k-means of one set of 16-bit keys with two assignment matmuls: (assign, centroids,
    objective) of each."""
    keys = keys_like(2, 3000, 64, seed=seed).to(dtype)
    out = []
    for mm in (first, second):
        a, c, s = segmented_kmeans_gpu(keys, 16, 1500, 10, 0, backend="torch", matmul=mm)
        check_invariants(keys.float(), a, c, s)
        out.append((a, c, kmeans_objective(keys.float(), a, c)))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_directions_keep_float32_quality(dtype):
    """matmul='split' (the stored 16-bit keys against directions as two 16-bit terms) clusters as well as fp32."""
    (a32, _, obj32), (a, _, obj) = _two_clusterings(dtype, 5, "fp32", "split")
    torch.testing.assert_close(obj, obj32, rtol=1e-3, atol=0)
    assert float((a == a32).double().mean()) >= 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_late_clusters_as_well_as_split(dtype):
    """matmul='split_late' (16-bit directions before the last passes) keeps the objective of 'split'."""
    (_, _, obj), (_, _, objl) = _two_clusterings(dtype, 6, "split", "split_late")
    assert bool((objl <= obj * 1.002).all()), (objl, obj)
    with pytest.raises(ValueError, match="split_late"):
        segmented_kmeans_gpu(torch.randn(1, 100, 16), matmul="split_late")


@pytest.mark.parametrize("n,seg", [(3000, 1024), (2048, 1024), (1000, 1024), (2070, 1024)])
def test_padded_segments_equal_runs_of_equal_segments(n, seg):
    """All segments in one padded batch (the path of the tensor-core kernel) give the clustering of the runs of
    equal segments: the same assignment (f32 torch products here; a shorter or longer last segment)."""
    import kvstore.gpu.kmeans as km
    from kvstore.wave import clusters_for, segment_bounds

    keys = keys_like(2, n, 64, seed=9).bfloat16()
    ref = segmented_kmeans_gpu(keys, 16, seg, 6, 3, backend="torch", matmul="split")
    mean = (torch.sum(keys, dim=1, dtype=torch.float64) / n).float()
    b = segment_bounds(n, 16, seg)
    cs = [clusters_for(b[i + 1] - b[i], 16) for i in range(len(b) - 1)]
    cbase = [0]
    for c in cs:
        cbase.append(cbase[-1] + c)
    a = torch.empty(2, n, dtype=torch.int64)
    km._kmeans_padded(keys, mean, b, cs, cbase, 6, 3, "torch", a, kernel=False)
    assert float((a == ref[0]).double().mean()) >= 0.999


def test_split_terms_sum_to_the_direction():
    from kvstore.gpu.kmeans import split_directions

    c = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(1)) * 5
    u, terms = split_directions(c, torch.bfloat16)
    assert terms.shape == (3, 2, 40, 64) and terms.dtype == torch.bfloat16
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3, 40), rtol=1e-6, atol=0)
    err = (terms[:, 0].float() + terms[:, 1].float() - u).abs()
    assert float((err / u.abs().clamp_min(1e-30)).max()) < 2.0 ** -16


def test_split_needs_16_bit_keys():
    with pytest.raises(ValueError, match="split"):
        segmented_kmeans_gpu(torch.randn(1, 100, 16), matmul="split")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cluster_means_torch_matches_float64(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 200, 24, generator=gen) * 3).to(dtype)
    assign = torch.randint(0, 17, (5, 200), generator=gen)
    assign[1] = torch.randint(0, 3, (200,), generator=gen)          # clusters 3..16 of batch 1 are empty
    fallback = torch.randn(5, 17, 24, generator=gen)
    shift = torch.randn(5, 24, generator=gen) * 2
    for fb, sh in ((None, None), (fallback, None), (None, shift), (fallback, shift)):
        means, counts = cluster_means(x, assign, 17, fb, backend="torch", shift=sh)
        for b in range(5):
            cnt = torch.bincount(assign[b], minlength=17)
            assert torch.equal(counts[b], cnt)
            ref = torch.zeros(17, 24, dtype=torch.float64).index_add_(0, assign[b], x[b].double())
            ref = ref / cnt.clamp_min(1)[:, None]
            ref = (ref if sh is None else ref - sh[b].double()).float()  # the mean of the centred rows
            ref[cnt == 0] = 0 if fb is None else fb[b][cnt == 0]
            assert torch.equal(means[b], ref)


def test_rejects_bad_input():
    keys = keys_like(2, 100, 8, seed=0)
    with pytest.raises(ValueError, match="keys"):
        segmented_kmeans_gpu(keys[0])
    with pytest.raises(TypeError, match="keys"):
        segmented_kmeans_gpu(keys.long())
    with pytest.raises(ValueError, match="keys"):
        segmented_kmeans_gpu(keys[:, :0])
    bad = keys.clone()
    bad[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        segmented_kmeans_gpu(bad)
    with pytest.raises(ValueError, match="tokens_per_cluster"):
        segmented_kmeans_gpu(keys, tokens_per_cluster=0)
    with pytest.raises(ValueError, match="iters"):
        segmented_kmeans_gpu(keys, iters=-1)
    with pytest.raises(TypeError, match="segment_len"):
        segmented_kmeans_gpu(keys, segment_len=2.5)
    with pytest.raises(ValueError, match="matmul"):
        segmented_kmeans_gpu(keys, matmul="int8")
    with pytest.raises(ValueError, match="backend='cuda'"):
        segmented_kmeans_gpu(keys, backend="cuda")
    with pytest.raises(ValueError, match="assign"):
        cluster_means(keys, torch.zeros(2, 99, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="fallback"):
        cluster_means(keys, torch.zeros(2, 100, dtype=torch.int64), 4, torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="shift"):
        cluster_means(keys, torch.zeros(2, 100, dtype=torch.int64), 4, shift=torch.zeros(2, 7))
    with pytest.raises(TypeError, match="shift"):
        cluster_means(keys, torch.zeros(2, 100, dtype=torch.int64), 4, shift=torch.zeros(2, 8, dtype=torch.int64))


# --------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,D,C", [(7, 1000, 128, 63), (3, 513, 64, 40), (2, 300, 100, 300), (1, 50, 1, 4)])
def test_cluster_means_kernel_matches_torch(dtype, B, L, D, C):
    gen = torch.Generator().manual_seed(B * L + D)
    x = (torch.randn(B, L, D, generator=gen) * 3 + 1).to(dtype).cuda()
    assign = torch.randint(0, C, (B, L), generator=gen)
    assign[0, : L // 2] = 0                                          # a big cluster and likely empty ones
    assign = assign.cuda()
    fallback = torch.randn(B, C, D, generator=gen).cuda()
    shift = torch.randn(B, D, generator=gen).cuda()
    for fb, sh in ((None, None), (fallback, None), (fallback, shift), (None, shift)):
        mt, ct = cluster_means(x, assign, C, fb, backend="torch", shift=sh)
        junk = torch.full((B * C * D,), float("nan"), device="cuda")   # poison the allocator's cache
        del junk
        mk, ck = cluster_means(x, assign, C, fb, backend="cuda", shift=sh)
        assert torch.equal(ck, ct)
        assert not bool(mk.isnan().any())
        torch.testing.assert_close(mk, mt, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kmeans_cuda_vs_torch_backend(dtype):
    keys = keys_like(4, 5000, 128, seed=21).to(dtype).cuda()
    mm = "fp32" if dtype == torch.float32 else "split"   # 16-bit keys: the tensor-core kernel against torch
    ak, ck, sk = segmented_kmeans_gpu(keys, 16, 2048, 10, 0, backend="cuda", matmul=mm)
    at, ct, st = segmented_kmeans_gpu(keys, 16, 2048, 10, 0, backend="torch", matmul=mm)
    check_invariants(keys.float(), ak, ck, sk)
    agree = float((ak == at).double().mean())
    assert agree >= 0.999
    ok, ot = kmeans_objective(keys.float(), ak, ck), kmeans_objective(keys.float(), at, ct)
    torch.testing.assert_close(ok, ot, rtol=1e-4, atol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dup", [False, True])
@pytest.mark.parametrize("matmul", ["fp32", "auto"])
def test_gpu_kmeans_vs_cpu_reference(dup, matmul):
    G, n, D = 3, 6000, 64
    keys = keys_like(G, n, D, seed=33, dup=dup)
    a, c, s = segmented_kmeans_gpu(keys.cuda(), 16, 2500, 10, 7, backend="cuda", matmul=matmul)
    check_invariants(keys, a, c, s)
    # fp32 on the GPU differs from C++ only in summation order; fp16 inputs flip near ties, and k-means
    # amplifies a flip over the iterations: then only the quality (objective) is comparable
    compare_with_cpu_reference(keys, a, c, s, 16, 2500, 10, 7, min_agree=0.95 if matmul == "fp32" else 0.0,
                               obj_tol=1e-3 if matmul == "fp32" else 1e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,C,D", [(3, 1000, 37, 128), (2, 777, 100, 64), (2, 300, 129, 256), (1, 5, 1, 128),
                                     (4, 2048, 128, 128)])
def test_assign_kernel_matches_torch(dtype, B, L, C, D):
    """The tensor-core assignment against the same products in f32 torch: best scores to f32 rounding, the same
    centroid wherever the runner-up is not within rounding of the best."""
    from kvstore.gpu.kmeans import _assign_split

    gen = torch.Generator(device="cuda").manual_seed(B * 1000 + C)
    raw = (torch.randn(B, L, D, device="cuda", generator=gen) + 3).to(dtype)
    mu = raw.float().mean(1)
    c = torch.randn(B, C, D, device="cuda", generator=gen)
    bk, ak = _assign_split(raw, mu, c, kernel=True)
    bt, at = _assign_split(raw, mu, c, kernel=False)
    assert bk.shape == (B, L) and ak.dtype == torch.int64
    scale = raw.float().norm(dim=-1)
    assert float(((bk - bt).abs() / scale).max()) < 1e-5
    from kvstore.gpu.kmeans import split_directions

    u, terms = split_directions(c, dtype)
    w = terms[:, 0].float() + terms[:, 1].float()
    s = torch.bmm(raw.float(), w.transpose(1, 2))
    top2 = s.topk(min(2, C), dim=2).values
    clear = (top2[..., 0] - top2[..., -1]) > 1e-4 * scale if C > 1 else torch.ones_like(bk, dtype=torch.bool)
    assert torch.equal(ak[clear], at[clear])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,C,D", [(3, 1000, 37, 128), (2, 300, 129, 256), (2, 777, 100, 64)])
def test_assign_kernel_high_term_only_matches_torch(dtype, B, L, C, D):
    """precise=False: the kernel scores against the 16-bit directions, as the torch products of the high term."""
    from kvstore.gpu.kmeans import _assign_split, split_directions

    gen = torch.Generator(device="cuda").manual_seed(B * 7 + C)
    raw = (torch.randn(B, L, D, device="cuda", generator=gen) + 3).to(dtype)
    mu = raw.float().mean(1)
    c = torch.randn(B, C, D, device="cuda", generator=gen)
    bk, ak = _assign_split(raw, mu, c, kernel=True, precise=False)
    bt, at = _assign_split(raw, mu, c, kernel=False, precise=False)
    scale = raw.float().norm(dim=-1)
    assert float(((bk - bt).abs() / scale).max()) < 1e-5
    s = torch.bmm(raw.float(), split_directions(c, dtype)[1][:, 0].float().transpose(1, 2))
    top2 = s.topk(2, dim=2).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4 * scale
    assert torch.equal(ak[clear], at[clear])
    bp, _ = _assign_split(raw, mu, c, kernel=True, precise=True)
    assert float(((bk - bp).abs() / scale).max()) > 0        # the low term is left out


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,seg", [(6000, 2048), (4096, 2048), (4120, 2048), (1500, 2048)])
def test_gpu_padded_segments_equal_runs_exactly(monkeypatch, n, seg):
    import kvstore.gpu.kmeans as km

    keys = keys_like(3, n, 128, seed=4).bfloat16().cuda()
    padded = segmented_kmeans_gpu(keys, 16, seg, 10, 0, backend="cuda")
    monkeypatch.setattr(km, "_PAD_SEGMENTS", False)
    runs = segmented_kmeans_gpu(keys, 16, seg, 10, 0, backend="cuda")
    assert all(torch.equal(p, r) for p, r in zip(padded, runs))


@pytest.mark.gpu
@gpu
def test_assign_kernel_ties_take_the_lowest_id():
    from kvstore.gpu.kmeans import _assign_split

    raw = torch.randn(2, 600, 128, device="cuda").bfloat16()
    c = torch.randn(2, 50, 128, device="cuda")
    c[:, 30:] = c[:, 0:20]                                 # centroids 30..49 repeat 0..19
    c[:, 20:30] = c[:, 5:6]                                # and 20..29 repeat 5
    best, arg = _assign_split(raw, torch.zeros(2, 128, device="cuda"), c, kernel=True)
    _, ref = _assign_split(raw, torch.zeros(2, 128, device="cuda"), c[:, :20], kernel=True)
    assert torch.equal(arg, ref)


@pytest.mark.gpu
@gpu
def test_assign_kernel_rejects_bad_input():
    ext = pytest.importorskip("kvstore.gpu._ext").cuda_ext()
    x = torch.zeros(1, 10, 128, device="cuda", dtype=torch.bfloat16)
    cen = torch.zeros(1, 4, 128, device="cuda")
    mu = torch.zeros(1, 128, device="cuda")
    best, arg = ext.kmeans_assign(x, cen, mu)
    assert best.shape == arg.shape == (1, 10)
    with pytest.raises(RuntimeError, match="cen"):
        ext.kmeans_assign(x, cen[:, :, :64].contiguous(), mu)
    with pytest.raises(RuntimeError, match="cen"):
        ext.kmeans_assign(x, cen.half(), mu)
    with pytest.raises(RuntimeError, match="mu"):
        ext.kmeans_assign(x, cen, mu.double())
    with pytest.raises(RuntimeError, match="64, 128 or 256"):
        ext.kmeans_assign(x[..., :96].contiguous(), cen[..., :96].contiguous(), mu[:, :96].contiguous())
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.kmeans_assign(x[:, ::2], cen, mu)
    assert not ext.kmeans_assign_supported(x.float())
    assert ext.kmeans_assign_supported(x) and ext.kmeans_assign_supported(x.half())


@pytest.mark.gpu
@gpu
def test_gpu_kmeans_split_vs_fp32_on_model_like_keys():
    """The default (split kernel) against the fp32 matmul on generated attention keys: the same quality."""
    from kvstore.datasets.attention_like import generate_kv

    k, _ = generate_kv(1, 32768, device="cuda", seed=3)
    keys = k[0]                                                           # [8, 32768, 128] bf16
    a, c, s = segmented_kmeans_gpu(keys, backend="cuda")
    a32, c32, _ = segmented_kmeans_gpu(keys, backend="cuda", matmul="fp32")
    check_invariants(keys.float(), a, c, s)
    obj, obj32 = kmeans_objective(keys.float(), a, c), kmeans_objective(keys.float(), a32, c32)
    assert bool((obj <= obj32 * 1.002).all()), (obj, obj32)


@pytest.mark.gpu
@gpu
def test_gpu_kmeans_one_million_keys_timing():
    """The target: 1M keys (G=8 heads, n=128K, d=128, bf16) clustered in well under 100 ms on an H100."""
    G, n, D = 8, 128 * 1024, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    keys = (torch.randn(G, n, D, device="cuda", generator=gen)
            + 2 * torch.randn(G, 1, D, device="cuda", generator=gen)).bfloat16()
    segmented_kmeans_gpu(keys[:, :16384], backend="cuda")          # warm-up (cuBLAS, allocator)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a, c, s = segmented_kmeans_gpu(keys, backend="cuda")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    print(f"\nsegmented_kmeans_gpu, 1M keys (8 x 131072 x 128, bf16): {ms:.1f} ms (median of 3)")
    assert c.shape == (G, n // 16, D) and float(s.sum()) == G * n
    assert ms < 500, f"{ms:.1f} ms"


def test_score_chunking_does_not_change_the_result(monkeypatch):
    import kvstore.gpu.kmeans as km

    keys = keys_like(2, 2000, 16, seed=8)
    ref = segmented_kmeans_gpu(keys, 16, 1000, 4, 0, backend="torch")
    for budget in (4 * 63 * 100, 4 * 1000 * 63 + 4):                # row chunks; one segment a chunk
        monkeypatch.setattr(km, "_SCORE_BYTES", budget)
        out = segmented_kmeans_gpu(keys, 16, 1000, 4, 0, backend="torch")
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
