"""kvstore.gpu.cluster_ops: cluster ranking, selection, ordering, the copy kernel and the candidate scores.

CPU tests check the torch reference against float64 references; GPU tests
(marked ``gpu``) check the CUDA kernels against the torch reference on fresh
random data (bf16 / fp16 / f32, head_dim 64 / 128 and odd sizes, GQA groups
1, 4, 7, 8, empty clusters and runs, unaligned inputs, pinned host sources)."""
from __future__ import annotations

import math

import pytest
import torch

from kvstore.gpu.cluster_ops import (candidate_scores, cluster_order, cluster_runs, cluster_scores, cluster_store,
                                     dequantize_rows, quantize_rows,
                                     copy_rows, select_clusters, weighted_rows)


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from kvstore.gpu import has_cuda_ext

    return has_cuda_ext()


CUDA = _cuda_ready()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the kvstore._cuda extension")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def ranking_inputs(G, Hg, C, D, dtype=torch.float32, device="cpu", empty_frac=0.1, gen=None):
    """Fresh queries / centroids (a shared offset, like real keys) and sizes with some empty clusters."""
    q = torch.randn(G, Hg, D, generator=gen) * 2
    c = torch.randn(G, C, D, generator=gen) + torch.randn(G, 1, D, generator=gen)
    sizes = torch.randint(1, 40, (G, C), generator=gen).float()
    sizes[torch.rand(G, C, generator=gen) < empty_frac] = 0
    return q.to(device, dtype), c.to(device, dtype), sizes.to(device)


def ranking_float64(q, c, sizes, scale, radii=None, rank_radius=0.0):
    """scores [G, Hg, C] and group-summed softmax [G, C] of the rank scores (scores + rank_radius * |q_h| *
    radii * scale) in float64 (WaveHead's ranking, per group)."""
    s = torch.einsum("ghd,gcd->ghc", q.double(), c.double()) * scale
    s = s.masked_fill((sizes <= 0)[:, None, :], -math.inf)
    rank = s
    if radii is not None:
        rank = s + rank_radius * q.double().norm(dim=2)[..., None] * radii.double()[:, None, :] * scale
    probs = torch.zeros(s.shape[0], s.shape[2], dtype=torch.float64)
    for g in range(s.shape[0]):
        if bool(torch.isfinite(s[g]).any()):
            probs[g] = torch.softmax(rank[g], dim=-1).sum(0)
    return s, probs


def ranking_radii(G, C, gen=None, device="cpu"):
    return (torch.rand(G, C, generator=gen) * 6).to(device)


# --------------------------------------------------------------------------- ranking (torch reference)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,Hg,C,D", [(3, 4, 257, 64), (2, 1, 100, 128), (4, 7, 33, 72)])
def test_cluster_scores_torch_matches_float64(dtype, G, Hg, C, D):
    q, c, sizes = ranking_inputs(G, Hg, C, D, dtype)
    s, p = cluster_scores(q, c, sizes, backend="torch")
    assert s.dtype == p.dtype == torch.float32 and s.shape == (G, Hg, C) and p.shape == (G, C)
    s64, p64 = ranking_float64(q, c, sizes, 1 / math.sqrt(D))
    fin = torch.isfinite(s64)
    assert torch.equal(torch.isfinite(s), fin) and bool((s[~fin] == -math.inf).all())
    assert rel_l2(s[fin], s64[fin]) < 1e-5
    assert rel_l2(p, p64) < 1e-5
    torch.testing.assert_close(p.sum(1).double(), torch.full((G,), float(Hg), dtype=torch.float64), rtol=1e-5,
                               atol=0)


@pytest.mark.parametrize("rank_radius", [0.25, 1.0])
def test_cluster_scores_torch_radius_matches_float64(rank_radius):
    G, Hg, C, D = 3, 4, 257, 64
    q, c, sizes = ranking_inputs(G, Hg, C, D)
    radii = ranking_radii(G, C)
    s, p = cluster_scores(q, c, sizes, backend="torch", radii=radii, rank_radius=rank_radius)
    s64, p64 = ranking_float64(q, c, sizes, 1 / math.sqrt(D), radii, rank_radius)
    fin = torch.isfinite(s64)
    assert rel_l2(s[fin], s64[fin]) < 1e-5          # the scores stay q.c * scale
    assert rel_l2(p, p64) < 1e-5
    plain = cluster_scores(q, c, sizes, backend="torch")[1]
    assert rel_l2(p, plain) > 1e-3                  # the radius changes the ranking weights
    same = cluster_scores(q, c, sizes, backend="torch", radii=radii, rank_radius=0.0)[1]
    assert torch.equal(same, plain)


def test_quantize_rows_round_trip():
    gen = torch.Generator().manual_seed(3)
    c = torch.randn(3, 50, 64, generator=gen) * torch.rand(3, 50, 1, generator=gen) * 20
    c[0, 7] = 0                                                    # a zero row: scale 0, no NaN
    c[1, 3, 5] = 400.0                                             # one outlier channel sets the row's step
    qc, sc = quantize_rows(c)
    assert qc.dtype == torch.int8 and sc.dtype == torch.float32 and sc.shape == (3, 50)
    assert int(qc.abs().max()) <= 127 and bool((sc[0, 7] == 0) & (qc[0, 7] == 0).all())
    back = dequantize_rows(qc, sc)
    # within half a step per element, and the largest element of every row exact up to float rounding
    assert bool(((back - c).abs() <= 0.5 * sc[..., None] * (1 + 1e-5) + 1e-6).all())
    assert torch.allclose(back.abs().amax(-1), c.abs().amax(-1), rtol=1e-6)
    assert torch.equal(dequantize_rows(c, None), c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cluster_scores_torch_int8_matches_float64(dtype):
    G, Hg, C, D = 3, 4, 257, 64
    q, c, sizes = ranking_inputs(G, Hg, C, D, dtype)
    radii = ranking_radii(G, C)
    qc, sc = quantize_rows(c)
    s, p = cluster_scores(q, qc, sizes, backend="torch", radii=radii, rank_radius=0.25, centroid_scale=sc)
    s64, p64 = ranking_float64(q, dequantize_rows(qc, sc), sizes, 1 / math.sqrt(D), radii, 0.25)
    fin = torch.isfinite(s64)
    assert torch.equal(torch.isfinite(s), fin)
    assert rel_l2(s[fin], s64[fin]) < 1e-5 and rel_l2(p, p64) < 1e-4
    with pytest.raises(TypeError, match="int8"):
        cluster_scores(q, c, sizes, backend="torch", centroid_scale=sc)
    with pytest.raises(ValueError, match="centroid_scale"):
        cluster_scores(q, qc, sizes, backend="torch", centroid_scale=sc[:, :5])
    with pytest.raises(TypeError, match="centroids"):
        cluster_scores(q, qc, sizes, backend="torch")                # int8 without its scale


def test_cluster_scores_scale_and_empty_groups():
    q, c, sizes = ranking_inputs(3, 2, 50, 16)
    sizes[1] = 0                                   # a group whose clusters are all padding
    s, p = cluster_scores(q, c, sizes, scale=0.3, backend="torch")
    s64, p64 = ranking_float64(q, c, sizes, 0.3)
    assert bool((s[1] == -math.inf).all()) and bool((p[1] == 0).all())
    assert rel_l2(p, p64) < 1e-5


def test_cluster_scores_rejects_bad_input():
    q, c, sizes = ranking_inputs(2, 4, 10, 8)
    with pytest.raises(TypeError, match="q"):
        cluster_scores(q.numpy(), c, sizes)
    with pytest.raises(ValueError, match="q"):
        cluster_scores(q[0], c, sizes)
    with pytest.raises(TypeError, match="centroids"):
        cluster_scores(q, c.double(), sizes)
    with pytest.raises(ValueError, match="centroids"):
        cluster_scores(q, c[:, :, :4], sizes)
    with pytest.raises(ValueError, match="sizes"):
        cluster_scores(q, c, sizes[:, :5])
    with pytest.raises(TypeError, match="sizes"):
        cluster_scores(q, c, sizes.long())
    with pytest.raises(ValueError, match="backend"):
        cluster_scores(q, c, sizes, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda'"):
        cluster_scores(q, c, sizes, backend="cuda")
    with pytest.raises(ValueError, match="scale"):
        cluster_scores(q, c, sizes, scale=float("nan"))
    with pytest.raises(ValueError, match="radii"):
        cluster_scores(q, c, sizes, radii=torch.zeros(2, 9), rank_radius=0.5)
    with pytest.raises(TypeError, match="radii"):
        cluster_scores(q, c, sizes, radii=torch.zeros(2, 10, dtype=torch.float64), rank_radius=0.5)
    with pytest.raises(ValueError, match="rank_radius"):
        cluster_scores(q, c, sizes, radii=torch.zeros(2, 10), rank_radius=float("inf"))
    with pytest.raises(ValueError, match="rank_radius"):
        cluster_scores(q, c, sizes, radii=torch.zeros(2, 10), rank_radius=-1.0)


# --------------------------------------------------------------------------- selection and order

def test_select_clusters_matches_stable_argsort():
    gen = torch.Generator().manual_seed(7)
    probs = torch.rand(6, 500, generator=gen)
    probs[0, ::3] = 0.25                                            # exact ties
    probs[1] = 0.0
    probs[2, :10] = -0.0
    ref = torch.argsort(probs, dim=1, descending=True, stable=True)
    for r, e in [(10, 100), (0, 7), (9, 0), (0, 0), (200, 300)]:
        ret, est = select_clusters(probs, r, e, backend="torch")
        assert ret.dtype == est.dtype == torch.int64 and ret.shape == (6, r) and est.shape == (6, e)
        assert torch.equal(ret, ref[:, :r].sort(1).values) and torch.equal(est, ref[:, r:r + e].sort(1).values)


def test_select_clusters_rejects_bad_input():
    probs = torch.rand(2, 10)
    with pytest.raises(ValueError, match="r \\+ e"):
        select_clusters(probs, 6, 5)
    with pytest.raises(ValueError, match="e"):
        select_clusters(probs, 1, -1)
    with pytest.raises(TypeError, match="r"):
        select_clusters(probs, 1.5, 2)
    with pytest.raises(TypeError, match="probs"):
        select_clusters(probs.long(), 1, 2)
    with pytest.raises(ValueError, match="probs"):
        select_clusters(probs[0], 1, 2)


def test_cluster_order():
    gen = torch.Generator().manual_seed(3)
    assign = torch.randint(0, 9, (4, 300), generator=gen)
    assign[2] = 4                                                   # one cluster holds everything
    order, offsets = cluster_order(assign, 12)
    assert order.shape == (4, 300) and offsets.shape == (4, 13)
    for g in range(4):
        assert torch.equal(order[g], torch.argsort(assign[g], stable=True))
        counts = torch.bincount(assign[g], minlength=12)
        assert torch.equal(offsets[g], torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
    with pytest.raises(ValueError, match="assign"):
        cluster_order(assign, 5)


def store_case(S=3, m=257, C=20, D=64, Dv=48, dtype=torch.float32, device="cpu", seed=0, strided=False):
    """Keys / values of S slots (a strided view of a wider buffer when ``strided``), an assignment with an empty
    cluster and one holding a third of the rows, centroids near the member means."""
    gen = torch.Generator().manual_seed(seed)
    wide = m + 13 if strided else m
    kbuf = (torch.randn(S, wide, D, generator=gen) + 0.5).to(dtype)
    vbuf = torch.randn(S, wide, Dv, generator=gen).to(dtype)
    o = 5 if strided else 0
    k, v = kbuf[:, o:o + m], vbuf[:, o:o + m]
    assign = torch.randint(0, C - 1, (S, m), generator=gen)        # cluster C - 1 stays empty
    assign[:, : m // 3] = 2
    cen = torch.randn(S, C, D, generator=gen) * 0.1 + 0.5
    return [t.to(device) for t in (k, v, assign, cen)]


def store_expected(k, v, assign, cen):
    """float64 loops: rows in cluster order, value sums and radii."""
    S, m, _ = k.shape
    C = cen.shape[1]
    ok, ov = torch.empty_like(k), torch.empty_like(v)
    vs = torch.zeros(S, C, v.shape[-1], dtype=torch.float64)
    rad = torch.zeros(S, C, dtype=torch.float64)
    for s in range(S):
        idx = torch.argsort(assign[s], stable=True)
        ok[s], ov[s] = k[s, idx], v[s, idx]
        for c in range(C):
            mem = (assign[s] == c).nonzero().squeeze(1)
            if mem.numel():
                vs[s, c] = v[s, mem].double().sum(0)
                rad[s, c] = (k[s, mem].double() - cen[s, c].double()).norm(dim=-1).max()
    return ok, ov, vs, rad


@pytest.mark.parametrize("strided", [False, True])
def test_cluster_store_reference(strided):
    k, v, assign, cen = store_case(strided=strided)
    order, offsets = cluster_order(assign, cen.shape[1])
    out_k = torch.full((3, 300, 64), 7.0)
    out_v = torch.full((3, 300, 48), 7.0)
    vs, rad = cluster_store(k, v, assign, order, offsets, cen, out_k, out_v, backend="torch")
    ek, ev, evs, erad = store_expected(k, v, assign, cen)
    assert torch.equal(out_k[:, :257], ek) and torch.equal(out_v[:, :257], ev)
    assert (out_k[:, 257:] == 7).all() and (out_v[:, 257:] == 7).all()      # rows past m untouched
    assert rel_l2(vs, evs) < 1e-6 and rel_l2(rad, erad) < 1e-6
    assert (rad[:, -1] == 0).all() and (vs[:, -1] == 0).all()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D,Dv,strided", [(64, 48, True), (128, 128, False), (256, 256, True), (40, 72, False)])
def test_cluster_store_kernel_matches_reference(dtype, D, Dv, strided):
    k, v, assign, cen = store_case(S=5, m=999, C=70, D=D, Dv=Dv, dtype=dtype, device="cuda", seed=D + Dv,
                                   strided=strided)
    order, offsets = cluster_order(assign, 70)
    outs = []
    for backend in ("torch", "cuda"):
        out_k = torch.zeros(5, 1001, D, dtype=dtype, device="cuda")
        out_v = torch.zeros(5, 1001, Dv, dtype=dtype, device="cuda")
        vs, rad = cluster_store(k, v, assign, order, offsets, cen, out_k, out_v, backend=backend)
        outs.append((out_k, out_v, vs, rad))
    (rk, rv, rvs, rrad), (ck, cv, cvs, crad) = outs
    assert torch.equal(ck, rk) and torch.equal(cv, rv)
    assert rel_l2(cvs, rvs) < 1e-5
    assert torch.allclose(crad, rrad, rtol=1e-5, atol=1e-6)
    ek, ev, evs, erad = store_expected(k.cpu(), v.cpu(), assign.cpu(), cen.cpu())
    assert rel_l2(cvs.cpu(), evs) < 1e-6                   # summed in double: closer to float64 than torch's f32
    assert torch.allclose(crad.cpu().double(), erad, rtol=1e-5, atol=1e-6)


@gpu
def test_cluster_store_kernel_refuses_bad_layouts():
    k, v, assign, cen = store_case(device="cuda")
    order, offsets = cluster_order(assign, cen.shape[1])
    ext = __import__("kvstore.gpu._ext", fromlist=["cuda_ext"]).cuda_ext()
    out_k = torch.zeros(3, 300, 64, device="cuda")
    out_v = torch.zeros(3, 300, 48, device="cuda")
    with pytest.raises(RuntimeError, match="out_k"):
        ext.cluster_store(k, v, order, offsets, cen, out_k[:, :100], out_v[:, :100])   # fewer rows than m
    with pytest.raises(RuntimeError, match="rows"):
        ext.cluster_store(k.transpose(1, 2).contiguous().transpose(1, 2), v, order, offsets, cen, out_k, out_v)
    with pytest.raises(RuntimeError, match="offsets"):
        ext.cluster_store(k, v, order, offsets[:, :-1], cen, out_k, out_v)


# --------------------------------------------------------------------------- copies (torch reference)

def copy_case(rows_s=300, rows_d=800, D=24, Dv=40, M=30, dtype=torch.float32, gen=None):
    """Random non-overlapping destination runs of 0..20 rows, random source runs."""
    src_k = torch.randn(rows_s, D, generator=gen).to(dtype)
    src_v = torch.randn(rows_s, Dv, generator=gen).to(dtype)
    dst_k = torch.randn(rows_d, D, generator=gen).to(dtype)
    dst_v = torch.randn(rows_d, Dv, generator=gen).to(dtype)
    length = torch.randint(0, 21, (M,), generator=gen)
    slot = torch.randperm(rows_d // 20, generator=gen)[:M]            # disjoint destination slots of 20 rows
    dst_row = slot * 20
    src_row = torch.randint(0, rows_s - 20, (M,), generator=gen)
    return dst_k, dst_v, src_k, src_v, src_row, dst_row, length.to(torch.int32)


def copy_expected(dst_k, dst_v, src_k, src_v, src_row, dst_row, length):
    ek, ev = dst_k.clone(), dst_v.clone()
    for s, d, n in zip(src_row.tolist(), dst_row.tolist(), length.tolist()):
        ek[d:d + n] = src_k[s:s + n]
        ev[d:d + n] = src_v[s:s + n]
    return ek, ev


def runs_inputs(G, C, r, device="cpu", seed=0):
    """Random cluster offsets (some empty clusters), ids (one out of range per slot when r > 1), steady runs."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 30, (G, C), generator=gen)
    offsets = torch.cat([torch.zeros(G, 1, dtype=torch.int64), sizes.cumsum(1)], 1)
    ids = torch.stack([torch.randperm(C, generator=gen)[:r] for _ in range(G)]) if r else torch.zeros(G, 0).long()
    if r > 1:
        ids[:, -1] = C + 3
    base = torch.arange(G, dtype=torch.int64) * 100_000
    head_row = torch.randint(0, 1000, (G,), generator=gen)
    head_len = torch.randint(0, 90, (G,), generator=gen).int()
    return [t.to(device) for t in (ids, offsets, base, head_row, head_len)]


def expected_runs(ids, offsets, base, head_row, head_len):
    G, r = ids.shape
    C = offsets.shape[1] - 1
    row = torch.zeros(G, r + 1, dtype=torch.int64)
    length = torch.zeros(G, r + 1, dtype=torch.int32)
    for g in range(G):
        row[g, 0], length[g, 0] = head_row[g], head_len[g]
        for j in range(r):
            c = int(ids[g, j])
            if 0 <= c < C:
                row[g, j + 1] = base[g] + offsets[g, c]
                length[g, j + 1] = int(offsets[g, c + 1] - offsets[g, c])
    return row, length


@pytest.mark.parametrize("G,C,r", [(3, 50, 7), (1, 5, 0), (4, 9, 9)])
def test_cluster_runs_torch(G, C, r):
    args = runs_inputs(G, C, r, seed=G + C + r)
    row, length = cluster_runs(*args, backend="torch")
    erow, elen = expected_runs(*args)
    assert row.dtype == torch.int64 and length.dtype == torch.int32
    assert torch.equal(row, erow) and torch.equal(length, elen)


def test_cluster_runs_rejects_bad_input():
    ids, offsets, base, head_row, head_len = runs_inputs(2, 10, 3)
    with pytest.raises(TypeError, match="ids"):
        cluster_runs(ids.int(), offsets, base, head_row, head_len)
    with pytest.raises(ValueError, match="offsets"):
        cluster_runs(ids, offsets[:1], base, head_row, head_len)
    with pytest.raises(ValueError, match="head_len"):
        cluster_runs(ids, offsets, base, head_row, head_len[:1])
    with pytest.raises(TypeError, match="head_len"):
        cluster_runs(ids, offsets, base, head_row, head_len.long())


def test_copy_rows_torch():
    gen = torch.Generator().manual_seed(11)
    dk, dv, sk, sv, sr, dr, ln = copy_case(gen=gen)
    ek, ev = copy_expected(dk, dv, sk, sv, sr, dr, ln)
    copy_rows(dk, dv, sk, sv, sr, dr, ln, backend="torch", check_bounds=True)
    assert torch.equal(dk, ek) and torch.equal(dv, ev)
    # keys only
    dk, dv, sk, sv, sr, dr, ln = copy_case(gen=gen)
    ek, _ = copy_expected(dk, dv, sk, sv, sr, dr, ln)
    copy_rows(dk, None, sk, None, sr, dr, ln, backend="torch")
    assert torch.equal(dk, ek)


def test_copy_rows_out_of_bounds_runs():
    gen = torch.Generator().manual_seed(12)
    dk, dv, sk, sv, sr, dr, ln = copy_case(gen=gen)
    sr[3], ln[3] = sk.shape[0] - 2, 5                              # reads past src
    dr[5] = -1                                                      # negative start
    ln[6] = -4                                                      # negative length
    with pytest.raises(ValueError, match="run 3"):
        copy_rows(dk, dv, sk, sv, sr, dr, ln, check_bounds=True)
    ok = torch.ones(len(sr), dtype=torch.bool)
    ok[[3, 5, 6]] = False
    ek, ev = copy_expected(dk, dv, sk, sv, sr[ok], dr[ok], ln[ok])
    copy_rows(dk, dv, sk, sv, sr, dr, ln, backend="torch")          # invalid runs are skipped
    assert torch.equal(dk, ek) and torch.equal(dv, ev)


def test_copy_rows_rejects_bad_input():
    dk, dv, sk, sv, sr, dr, ln = copy_case()
    with pytest.raises(TypeError, match="length"):
        copy_rows(dk, dv, sk, sv, sr, dr, ln.long())
    with pytest.raises(TypeError, match="src_row"):
        copy_rows(dk, dv, sk, sv, sr.int(), dr, ln)
    with pytest.raises(ValueError, match="length"):
        copy_rows(dk, dv, sk, sv, sr, dr, ln[:-1])
    with pytest.raises(TypeError, match="src_k"):
        copy_rows(dk, dv, sk.half(), sv, sr, dr, ln)
    with pytest.raises(ValueError, match="src_v"):
        copy_rows(dk, dv, sk, sv[:, :3], sr, dr, ln)
    with pytest.raises(ValueError, match="both"):
        copy_rows(dk, dv, sk, None, sr, dr, ln)
    with pytest.raises(ValueError, match="dst_k"):
        copy_rows(dk.t(), dv, sk, sv, sr, dr, ln)
    with pytest.raises(ValueError, match="backend='cuda'"):
        copy_rows(dk, dv, sk, sv, sr, dr, ln, backend="cuda")


# --------------------------------------------------------------------------- candidate scores (torch reference)

def candidate_case(G, Hg, D, r, rows=3000, max_len=40, pad=7, dtype=torch.float32, gen=None, run_len=None,
                   empty_frac=0.1):
    """Queries, keys (a shared offset, like real keys) and r runs a slot (random rows, 0..max_len of them, some
    empty, or the given run_len), laid out one after another; width = the longest slot + pad positions."""
    q = torch.randn(G, Hg, D, generator=gen) * 2
    keys = torch.randn(rows, D, generator=gen) + torch.randn(1, D, generator=gen)
    if run_len is None:
        run_len = torch.randint(0, max_len + 1, (G, r), generator=gen)
        run_len[torch.rand(G, r, generator=gen) < empty_frac] = 0
    run_row = (torch.rand(G, r, generator=gen) * (rows - run_len + 1)).long()       # row + len <= rows
    run_pos = run_len.cumsum(1) - run_len
    width = (int(run_len.sum(1).max()) if G * r else 0) + pad
    return q.to(dtype), keys.to(dtype), run_row, run_len, run_pos, width


def candidate_float64(q, keys, run_row, run_len, run_pos, width, scale):
    """scores [G, Hg, width] and run_lse [G, Hg, r] in float64, run by run."""
    G, Hg, _ = q.shape
    r = run_row.shape[1]
    s = torch.full((G, Hg, width), -math.inf, dtype=torch.float64)
    lse = torch.full((G, Hg, r), -math.inf, dtype=torch.float64)
    for g in range(G):
        for j in range(r):
            row, n, pos = int(run_row[g, j]), int(run_len[g, j]), int(run_pos[g, j])
            if n:
                v = q[g].double() @ keys[row:row + n].double().T * scale
                s[g, :, pos:pos + n] = v
                lse[g, :, j] = torch.logsumexp(v, dim=1)
    return s, lse


def assert_candidates_close(s, lse, s_ref, lse_ref, tol=1e-5):
    """-inf exactly where the reference has it, the other scores and the run lse close."""
    s, lse, s_ref, lse_ref = s.cpu(), lse.cpu(), s_ref.cpu(), lse_ref.cpu()
    assert s.dtype == lse.dtype == torch.float32
    assert s.shape == s_ref.shape and lse.shape == lse_ref.shape
    assert torch.equal(s == -math.inf, s_ref == -math.inf) and not bool(s.isnan().any())
    fin = s_ref != -math.inf
    torch.testing.assert_close(s[fin].double(), s_ref[fin].double(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), lse_ref.double(), rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,Hg,D,r", [(3, 4, 64, 20), (2, 1, 128, 7), (1, 3, 72, 1), (4, 8, 16, 33)])
def test_candidate_scores_torch_matches_float64(dtype, G, Hg, D, r):
    gen = torch.Generator().manual_seed(G * 100 + r)
    case = candidate_case(G, Hg, D, r, dtype=dtype, gen=gen, empty_frac=0.2)
    s, lse = candidate_scores(*case, backend="torch")
    assert s.shape == (G, Hg, case[-1]) and lse.shape == (G, Hg, r)
    assert_candidates_close(s, lse, *candidate_float64(*case, 1 / math.sqrt(D)))


def test_candidate_scores_torch_special_runs():
    gen = torch.Generator().manual_seed(4)
    lens = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 1], [500, 0, 3, 250], [0, 2, 0, 0]])  # empty slot, ones, long
    case = candidate_case(4, 2, 32, 4, rows=1000, pad=30, gen=gen, run_len=lens)
    s, lse = candidate_scores(*case, scale=0.2, backend="torch")
    assert_candidates_close(s, lse, *candidate_float64(*case, 0.2))
    assert bool((s[0] == -math.inf).all()) and bool((lse[0] == -math.inf).all())
    assert bool((s[:, :, case[-1] - 30:] == -math.inf).all())                      # the padding tail
    for r, pad in [(0, 5), (1, 0)]:                                                 # no runs; one run, no padding
        case = candidate_case(3, 4, 16, r, pad=pad, gen=gen, empty_frac=0.0)
        s, lse = candidate_scores(*case, backend="torch")
        assert_candidates_close(s, lse, *candidate_float64(*case, 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,Hg,D,r", [(3, 4, 64, 20), (2, 1, 128, 7), (1, 3, 72, 1)])
def test_candidate_scores_torch_int8_matches_float64(dtype, G, Hg, D, r):
    """int8 keys with a scale a row score like the dequantized keys, and those are the keys to within the int8
    rounding."""
    gen = torch.Generator().manual_seed(G * 10 + r)
    q, keys, row, length, pos, width = candidate_case(G, Hg, D, r, dtype=dtype, gen=gen, empty_frac=0.2)
    codes, kscale = quantize_rows(keys)
    s, lse = candidate_scores(q, codes, row, length, pos, width, backend="torch", key_scale=kscale)
    ref = candidate_float64(q, dequantize_rows(codes, kscale), row, length, pos, width, 1 / math.sqrt(D))
    assert_candidates_close(s, lse, *ref)
    exact = candidate_float64(q, keys, row, length, pos, width, 1 / math.sqrt(D))[0]
    fin = exact != -math.inf
    assert float((s[fin].double() - exact[fin]).abs().max()) < 0.05 * float(exact[fin].abs().max())


def test_candidate_scores_rejects_bad_key_scale():
    q, keys, row, length, pos, width = candidate_case(2, 4, 16, 5)
    codes, kscale = quantize_rows(keys)
    with pytest.raises(ValueError, match="int8"):
        candidate_scores(q, keys, row, length, pos, width, key_scale=kscale)
    with pytest.raises(ValueError, match="key_scale"):
        candidate_scores(q, codes, row, length, pos, width, key_scale=kscale[:-1])
    with pytest.raises(ValueError, match="key_scale"):
        candidate_scores(q, codes, row, length, pos, width, key_scale=kscale.double())
    with pytest.raises(ValueError, match="keys"):
        candidate_scores(q, codes, row, length, pos, width)


def test_candidate_scores_rejects_bad_input():
    q, keys, row, length, pos, width = candidate_case(2, 4, 16, 5)
    with pytest.raises(ValueError, match="keys"):
        candidate_scores(q, keys.half(), row, length, pos, width)
    with pytest.raises(ValueError, match="keys"):
        candidate_scores(q, keys[:, :8], row, length, pos, width)
    with pytest.raises(TypeError, match="run_len"):
        candidate_scores(q, keys, row, length.int(), pos, width)
    with pytest.raises(ValueError, match="run_pos"):
        candidate_scores(q, keys, row, length, pos[:, :3], width)
    with pytest.raises(ValueError, match="width"):
        candidate_scores(q, keys, row, length, pos, -1)
    with pytest.raises(ValueError, match="backend='cuda'"):
        candidate_scores(q, keys, row, length, pos, width, backend="cuda")


# --------------------------------------------------------------------------- GPU parity

def poison_cuda_cache(nbytes: int) -> None:
    """Leave NaN in freed blocks of the caching allocator, so outputs a kernel fails to write show up."""
    junk = [torch.full((nbytes // 4,), float("nan"), device="cuda") for _ in range(4)]
    del junk


RANK_SHAPES = [  # G, Hg, C, D
    (8, 4, 1000, 128), (5, 1, 257, 64), (3, 7, 33, 128), (16, 8, 4099, 64), (2, 4, 1, 128),
    (4, 16, 300, 128), (3, 2, 700, 72), (2, 3, 129, 100), (64, 4, 8192, 128), (1, 32, 50, 256), (4, 12, 1001, 64),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("G,Hg,C,D", RANK_SHAPES)
def test_cluster_scores_kernel_matches_reference(dtype, G, Hg, C, D):
    if Hg * D > 8192:
        pytest.skip("beyond the kernel's Hg * D limit")
    q, c, sizes = ranking_inputs(G, Hg, C, D, dtype, "cuda")
    poison_cuda_cache(4 * G * Hg * C + 4 * G * C)
    s, p = cluster_scores(q, c, sizes, backend="cuda")
    s64, p64 = ranking_float64(q.cpu(), c.cpu(), sizes.cpu(), 1 / math.sqrt(D))
    s, p = s.cpu(), p.cpu()
    fin = torch.isfinite(s64)
    assert torch.equal(torch.isfinite(s), fin) and bool((s[~fin] == -math.inf).all())
    assert not bool(p.isnan().any())
    # inputs are the same rounded values: only f32 accumulation (and fast exp) separates the two
    assert rel_l2(s[fin], s64[fin]) < 1e-5
    assert rel_l2(p, p64) < 1e-4
    st, pt = cluster_scores(q, c, sizes, backend="torch")
    assert rel_l2(p, pt.cpu()) < 1e-4


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("G,Hg,C,D", [(64, 4, 8192, 128), (3, 12, 1000, 128), (5, 3, 777, 64), (2, 4, 300, 72)])
def test_cluster_scores_kernel_radius_matches_reference(dtype, G, Hg, C, D):
    # bf16 / fp16 with D 64 or 128: the tensor-core kernel (both row counts); D = 72 and float32: the other one
    q, c, sizes = ranking_inputs(G, Hg, C, D, dtype, "cuda")
    radii = ranking_radii(G, C, device="cuda")
    s, p = cluster_scores(q, c, sizes, backend="cuda", radii=radii, rank_radius=0.25)
    s64, p64 = ranking_float64(q.cpu(), c.cpu(), sizes.cpu(), 1 / math.sqrt(D), radii.cpu(), 0.25)
    fin = torch.isfinite(s64)
    assert torch.equal(torch.isfinite(s.cpu()), fin)
    assert rel_l2(s.cpu()[fin], s64[fin]) < 1e-5 and rel_l2(p.cpu(), p64) < 1e-4
    pt = cluster_scores(q, c, sizes, backend="torch", radii=radii, rank_radius=0.25)[1]
    assert rel_l2(p, pt) < 1e-4


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("G,Hg,C,D", [(64, 4, 8192, 128), (3, 12, 1000, 128), (5, 3, 777, 64), (2, 4, 300, 72),
                                      (1, 32, 50, 128)])
def test_cluster_scores_kernel_int8_matches_reference(dtype, G, Hg, C, D):
    # bf16 / fp16, D 64 or 128, Hg <= 16: the tensor-core kernel reads the int8 rows; other shapes and float32
    # score dequantized copies
    q, c, sizes = ranking_inputs(G, Hg, C, D, dtype, "cuda")
    radii = ranking_radii(G, C, device="cuda")
    qc, sc = quantize_rows(c)
    poison_cuda_cache(4 * G * Hg * C + 4 * G * C)
    s, p = cluster_scores(q, qc, sizes, backend="cuda", radii=radii, rank_radius=0.25, centroid_scale=sc)
    s64, p64 = ranking_float64(q.cpu(), dequantize_rows(qc, sc).cpu(), sizes.cpu(), 1 / math.sqrt(D),
                               radii.cpu(), 0.25)
    fin = torch.isfinite(s64)
    assert torch.equal(torch.isfinite(s.cpu()), fin)
    tol = 1e-5 if dtype == torch.float32 or (D in (64, 128) and Hg <= 16) else 1e-2   # dequantized to 16 bits
    assert rel_l2(s.cpu()[fin], s64[fin]) < tol and rel_l2(p.cpu(), p64) < 10 * tol
    pt = cluster_scores(q, qc, sizes, backend="torch", radii=radii, rank_radius=0.25, centroid_scale=sc)[1]
    assert rel_l2(p, pt) < 10 * tol


@pytest.mark.gpu
@gpu
def test_fs_cluster_scores_kernel_int8_matches_torch():
    from kvstore.gpu.estimation import fs_cluster_scores, fs_table

    G, Hg, C, D = 8, 4, 2000, 128
    q, c, sizes = ranking_inputs(G, Hg, C, D, torch.bfloat16, "cuda")
    key_sd = torch.rand(G, C, device="cuda")
    tab, slope = fs_table(64, "cuda")
    qc, sc = quantize_rows(c)
    got = fs_cluster_scores(q, qc, sizes, key_sd, tab, slope, 1 / math.sqrt(D), backend="cuda", centroid_scale=sc)
    ref = fs_cluster_scores(q, qc, sizes, key_sd, tab, slope, 1 / math.sqrt(D), backend="torch", centroid_scale=sc)
    fin = torch.isfinite(ref[0])
    assert torch.equal(torch.isfinite(got[0]), fin)
    assert rel_l2(got[0][fin], ref[0][fin]) < 1e-5 and rel_l2(got[1], ref[1]) < 1e-4 and rel_l2(got[2], ref[2]) < 1e-5


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cluster_scores_kernel_unaligned_and_all_empty(dtype):
    G, Hg, C, D = 3, 4, 300, 128
    q, c, sizes = ranking_inputs(G, Hg, C, D, dtype, "cuda")
    sizes[1] = 0
    qb = torch.empty(q.numel() + 1, dtype=dtype, device="cuda")
    cb = torch.empty(c.numel() + 1, dtype=dtype, device="cuda")
    qu = qb[1:].view(G, Hg, D)                                    # 2- or 4-byte aligned: the scalar path
    cu = cb[1:].view(G, C, D)
    qu.copy_(q)
    cu.copy_(c)
    s, p = cluster_scores(qu, cu, sizes, backend="cuda")
    s64, p64 = ranking_float64(q.cpu(), c.cpu(), sizes.cpu(), 1 / math.sqrt(D))
    fin = torch.isfinite(s64)
    assert torch.equal(torch.isfinite(s.cpu()), fin)
    assert rel_l2(s.cpu()[fin], s64[fin]) < 1e-5 and rel_l2(p.cpu(), p64) < 1e-4
    assert bool((p[1] == 0).all())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("G,C,r,e", [(64, 8192, 150, 1900), (3, 1, 1, 0), (5, 1000, 0, 1000), (7, 777, 13, 0),
                                     (2, 70_000, 1200, 16_000), (2, 70_000, 1200, 20_000), (1, 4097, 2048, 1),
                                     (3, 16_000, 100, 3000),
                                     # thread-block clusters (sm_90): 2 / 4 / 8 / 16 keys a thread, a tail block, and
                                     # past 8 x 16384 ids the one-block kernel again
                                     (8, 8192, 150, 1900), (3, 3000, 50, 500), (64, 8192, 148, 1900),
                                     (40, 5000, 60, 1200), (1, 65_536, 1200, 15_000),
                                     (2, 131_072, 2400, 30_000), (1, 131_073, 10, 100)])
def test_select_clusters_kernel_matches_stable_argsort(G, C, r, e):
    gen = torch.Generator().manual_seed(C + r)
    probs = torch.rand(G, C, generator=gen)
    probs[0, ::5] = 0.5                                             # exact ties, also across the cut
    probs[-1, : C // 3] = 0.0
    probs[-1, : C // 7] = -0.0
    ref = torch.argsort(probs, dim=1, descending=True, stable=True)
    ret, est = select_clusters(probs.cuda(), r, e, backend="cuda")
    assert torch.equal(ret.cpu(), ref[:, :r].sort(1).values) and torch.equal(est.cpu(), ref[:, r:r + e].sort(1).values)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D,Dv", [(128, 128), (64, 64), (3, 5)])
@pytest.mark.parametrize("pinned", [False, True])
def test_copy_rows_kernel(dtype, D, Dv, pinned):
    gen = torch.Generator().manual_seed(D * 7 + Dv)
    dk, dv, sk, sv, sr, dr, ln = copy_case(2000, 3000, D, Dv, 120, dtype, gen)
    ek, ev = copy_expected(dk, dv, sk, sv, sr, dr, ln)
    sr[0], ln[0] = 1995, 10                                         # out of bounds: skipped
    ek[dr[0]:dr[0] + 20], ev[dr[0]:dr[0] + 20] = dk[dr[0]:dr[0] + 20], dv[dr[0]:dr[0] + 20]
    src_k, src_v = (sk.pin_memory(), sv.pin_memory()) if pinned else (sk.cuda(), sv.cuda())
    dkc, dvc = dk.cuda(), dv.cuda()
    copy_rows(dkc, dvc, src_k, src_v, sr.cuda(), dr.cuda(), ln.cuda(), backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(dkc.cpu(), ek) and torch.equal(dvc.cpu(), ev)


@pytest.mark.gpu
@gpu
def test_copy_rows_kernel_long_runs_split_over_blocks():
    gen = torch.Generator().manual_seed(5)
    sk = torch.randn(100_000, 128, generator=gen).bfloat16()
    dk = torch.randn(120_000, 128, generator=gen).bfloat16()
    sr = torch.tensor([0, 50_000, 7])
    dr = torch.tensor([0, 60_000, 110_000])
    ln = torch.tensor([40_000, 50_000, 9_999], dtype=torch.int32)
    ek = dk.clone()
    for s, d, n in zip(sr.tolist(), dr.tolist(), ln.tolist()):
        ek[d:d + n] = sk[s:s + n]
    dkc = dk.cuda()
    copy_rows(dkc, None, sk.cuda(), None, sr.cuda(), dr.cuda(), ln.cuda(), backend="cuda", max_length=50_000)
    assert torch.equal(dkc.cpu(), ek)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("G,C,r", [(64, 8192, 148), (3, 50, 7), (1, 5, 0), (5, 70_000, 1200)])
def test_cluster_runs_kernel_matches_reference(G, C, r):
    args = runs_inputs(G, C, r, seed=C + r)
    erow, elen = expected_runs(*args)
    row, length = cluster_runs(*[t.cuda() for t in args], backend="cuda")
    assert torch.equal(row.cpu(), erow) and torch.equal(length.cpu(), elen)


def candidate_cuda(case):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in case]


def check_candidate_kernel(case, scale=None, int8=False):
    """The kernel on case (moved to the GPU) against the torch reference on the CPU (exact f32 products); int8:
    with the keys as int8 copies and a scale a row."""
    q, keys, row, length, pos, width = case
    kw = {}
    if int8:
        codes, kscale = quantize_rows(keys)
        case = (q, codes, row, length, pos, width)
        kw = {"key_scale": kscale}
    poison_cuda_cache(4 * q.shape[0] * q.shape[1] * (width + row.shape[1]))
    s, lse = candidate_scores(*candidate_cuda(case), scale=scale, backend="cuda",
                              **{k: v.cuda() for k, v in kw.items()})
    assert s.is_cuda and lse.is_cuda
    assert_candidates_close(s, lse, *candidate_scores(*case, scale=scale, backend="torch", **kw), tol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hg", [1, 3, 4, 8])
def test_candidate_scores_kernel_matches_reference(dtype, D, Hg):
    gen = torch.Generator().manual_seed(D + Hg)
    check_candidate_kernel(candidate_case(5, Hg, D, 60, dtype=dtype, gen=gen, empty_frac=0.2))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128, 72])
@pytest.mark.parametrize("Hg", [1, 4, 8])
def test_candidate_scores_kernel_int8_matches_reference(dtype, D, Hg):
    """int8 keys (16-byte rows, and D = 72 element by element) against the torch reference."""
    gen = torch.Generator().manual_seed(D * Hg)
    q, keys, row, length, pos, width = candidate_case(5, Hg, D, 60, rows=5000, dtype=dtype, gen=gen, empty_frac=0.2)
    codes, kscale = quantize_rows(keys)
    s, lse = candidate_scores(q.cuda(), codes.cuda(), row.cuda(), length.cuda(), pos.cuda(), width, backend="cuda",
                              key_scale=kscale.cuda())
    assert_candidates_close(s, lse, *candidate_scores(q, codes, row, length, pos, width, backend="torch",
                                                      key_scale=kscale), tol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("G,Hg,D,r,max_len", [(64, 4, 128, 330, 40), (1, 4, 128, 2600, 64), (8, 16, 128, 40, 100),
                                              (3, 32, 256, 9, 70), (4, 4, 256, 30, 40), (3, 4, 72, 25, 40),
                                              (2, 5, 3, 40, 9),
                                              # short runs (8 rows or fewer on average): two rows a lane group
                                              (64, 4, 128, 1251, 12), (8, 1, 64, 500, 10), (4, 8, 128, 300, 14),
                                              (3, 2, 64, 200, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("int8", [False, True])
def test_candidate_scores_kernel_shapes(G, Hg, D, r, max_len, dtype, int8):
    gen = torch.Generator().manual_seed(G + r)
    check_candidate_kernel(candidate_case(G, Hg, D, r, rows=20_000, max_len=max_len, dtype=dtype, gen=gen),
                           int8=int8)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_candidate_scores_kernel_special_runs(dtype):
    gen = torch.Generator().manual_seed(6)
    lens = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 1], [500, 0, 3, 250], [0, 2, 0, 0], [1000, 1, 499, 64]])
    for int8 in (False, True):
        check_candidate_kernel(candidate_case(5, 4, 128, 4, rows=3000, pad=300, dtype=dtype, gen=gen, run_len=lens),
                               0.3, int8=int8)
        for r, pad in [(0, 5), (1, 0), (1, 1)]:                                     # no runs; a single run
            check_candidate_kernel(candidate_case(3, 4, 64, r, pad=pad, dtype=dtype, gen=gen, empty_frac=0.0),
                                   int8=int8)
    # unaligned keys (2- or 4-byte aligned: the element-wise path)
    q, keys, row, length, pos, width = candidate_case(4, 4, 128, 30, dtype=dtype, gen=gen)
    buf = torch.empty(keys.numel() + 1, dtype=dtype, device="cuda")
    ku = buf[1:].view(keys.shape)
    ku.copy_(keys)
    s, lse = candidate_scores(q.cuda(), ku, row.cuda(), length.cuda(), pos.cuda(), width, backend="cuda")
    assert_candidates_close(s, lse, *candidate_scores(q, keys, row, length, pos, width, backend="torch"), tol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("int8", [False, True])
def test_candidate_scores_kernel_skips_out_of_range_runs(int8):
    gen = torch.Generator().manual_seed(8)
    lens = torch.randint(1, 41, (3, 12), generator=gen)
    q, keys, row, length, pos, width = candidate_case(3, 4, 128, 12, rows=1000, pad=20, dtype=torch.bfloat16,
                                                      gen=gen, run_len=lens)
    kw = {}
    if int8:
        keys, kscale = quantize_rows(keys)
        kw = {"key_scale": kscale}
    s_ref, lse_ref = candidate_scores(q, keys, row, length, pos, width, backend="torch", **kw)
    for g, j in [(0, 2), (0, 5), (1, 0), (1, 7), (2, 11), (2, 3)]:                  # skipped: nothing written
        s_ref[g, :, pos[g, j]:pos[g, j] + length[g, j]] = -math.inf
        lse_ref[g, :, j] = math.nan
    row[0, 2], length[0, 2] = 1000 - 3, 4                                           # reads past keys
    row[0, 5] = -1                                                                  # negative row
    length[1, 0] = -2                                                               # negative length
    pos[1, 7] = -5                                                                  # negative position
    pos[2, 11] = width - 2                                                          # writes past the width
    length[2, 11] = 3
    length[2, 3] = 1 << 62                                                          # overflows row + len
    s, lse = candidate_scores(q.cuda(), keys.cuda(), row.cuda(), length.cuda(), pos.cuda(), width, backend="cuda",
                              **{k: v.cuda() for k, v in kw.items()})
    s, lse = s.cpu(), lse.cpu()
    nan = lse_ref.isnan()
    assert torch.equal(lse.isnan(), nan)
    assert_candidates_close(s, lse.masked_fill(nan, 0), s_ref, lse_ref.masked_fill(nan, 0), tol=1e-4)


@pytest.mark.gpu
@gpu
def test_candidate_scores_kernel_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(9)
    case = candidate_cuda(candidate_case(8, 4, 128, 50, dtype=torch.bfloat16, gen=gen))
    q = case[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        candidate_scores(*case, backend="cuda")                                     # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s, lse = candidate_scores(*case, backend="cuda")
    q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
    graph.replay()
    torch.cuda.synchronize()
    ref = candidate_scores(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in case], backend="torch")
    assert_candidates_close(s, lse, *ref, tol=1e-4)


@pytest.mark.gpu
@gpu
def test_candidate_scores_kernel_limits():
    q, keys, row, length, pos, width = candidate_cuda(candidate_case(2, 33, 16, 5))
    with pytest.raises(ValueError, match="limits"):
        candidate_scores(q, keys, row, length, pos, width, backend="cuda")


# --------------------------------------------------------------------------- weighted rows

def weighted_case(G, Hg, t, R, Dv, dtype=torch.float32, gen=None, skip_frac=0.2):
    w = torch.rand(G, Hg, t, generator=gen)
    rows = torch.randint(0, max(R, 1), (G, t), generator=gen)
    rows[torch.rand(G, t, generator=gen) < skip_frac] = -1
    if R and t:
        rows[0, 0] = R        # out of range: skipped too
    values = torch.randn(R, Dv, generator=gen).to(dtype)
    return w, rows, values


def weighted_float64(w, rows, values):
    out = torch.zeros(w.shape[0], w.shape[1], values.shape[1], dtype=torch.float64)
    for g in range(w.shape[0]):
        for i in range(w.shape[2]):
            r = int(rows[g, i])
            if 0 <= r < values.shape[0]:
                out[g] += w[g, :, i].double()[:, None] * values[r].double()[None, :]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,Hg,t,R,Dv", [(3, 4, 50, 40, 64), (1, 1, 1, 1, 5), (2, 9, 300, 1000, 128), (2, 3, 0, 10, 8),
                                         (2, 2, 7, 0, 8)])
def test_weighted_rows_torch_matches_float64(dtype, G, Hg, t, R, Dv):
    case = weighted_case(G, Hg, t, R, Dv, dtype, torch.Generator().manual_seed(t + R))
    out = weighted_rows(*case, backend="torch")
    assert out.shape == (G, Hg, Dv) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), weighted_float64(*case), rtol=1e-5, atol=1e-5)
    w64 = case[0].double()
    assert weighted_rows(w64, *case[1:], backend="torch").dtype == torch.float64


def test_weighted_rows_rejects_bad_input():
    w, rows, values = weighted_case(2, 3, 10, 20, 8)
    with pytest.raises(ValueError, match="rows"):
        weighted_rows(w, rows[:, :5], values)
    with pytest.raises(TypeError, match="rows"):
        weighted_rows(w, rows.int(), values)
    with pytest.raises(TypeError, match="w"):
        weighted_rows(w.half(), rows, values)
    with pytest.raises(ValueError, match="values"):
        weighted_rows(w, rows, values[0])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("G,Hg,t,R,Dv", [(64, 4, 2600, 500_000, 128), (8, 4, 21000, 100_000, 128), (3, 9, 300, 1000, 64),
                                         (2, 1, 5, 7, 256), (4, 12, 1001, 3000, 100), (1, 3, 0, 10, 64), (2, 2, 9, 0, 8)])
def test_weighted_rows_kernel_matches_reference(dtype, G, Hg, t, R, Dv):
    case = weighted_case(G, Hg, t, R, Dv, dtype, torch.Generator().manual_seed(G + t))
    poison_cuda_cache(1 << 24)
    out = weighted_rows(*(x.cuda() for x in case), backend="cuda")
    torch.cuda.synchronize()
    ref = weighted_rows(*case, backend="torch")
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("G,Hg,t1,t2,Dv", [(64, 4, 2600, 1300, 128), (8, 4, 21000, 9000, 128), (3, 9, 300, 0, 64),
                                           (2, 1, 5, 700, 256)])
def test_two_weighted_row_jobs_in_one_launch_match_each_alone(dtype, G, Hg, t1, t2, Dv):
    """weighted_rows_jobs: the wave step's exact-token values and mixture mean values in one launch; each job's
    partials sum to its reference (the chunks differ from a launch alone: the warps are shared between jobs)."""
    from kvstore.gpu._ext import cuda_ext

    a = [x.cuda() for x in weighted_case(G, Hg, t1, 50_000, Dv, dtype, torch.Generator().manual_seed(t1))]
    b = [x.cuda() for x in weighted_case(G, Hg, t2, 3_000, Dv, dtype, torch.Generator().manual_seed(t2 + 1))]
    pa, pb = cuda_ext().weighted_rows_jobs([a[0], b[0]], [a[1], b[1]], [a[2], b[2]])
    torch.cuda.synchronize()
    for part, case in ((pa, a), (pb, b)):
        assert part.shape[0] == G and part.shape[2:] == (Hg, Dv)
        ref = weighted_rows(*(x.cpu() for x in case), backend="torch")
        torch.testing.assert_close(part.sum(1).cpu(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("runs_per_block", [1, 5, 8, 64, 4096])
def test_candidate_scores_do_not_depend_on_runs_per_block(runs_per_block):
    """The runs a block takes (16 by default, chosen by a sweep on the H200) change the launch, not the result."""
    from kvstore.gpu._ext import cuda_ext

    gen = torch.Generator().manual_seed(21)
    q, keys, row, length, pos, width = candidate_cuda(
        candidate_case(16, 4, 128, 700, rows=20_000, max_len=12, dtype=torch.bfloat16, gen=gen, empty_frac=0.2))
    ext = cuda_ext()
    default = ext.candidate_scores(q, keys, row, length, pos, width, 0.1)
    other = ext.candidate_scores(q, keys, row, length, pos, width, 0.1, runs_per_block)
    assert torch.equal(default[0], other[0]) and torch.equal(default[1], other[1])
    with pytest.raises(RuntimeError, match="runs_per_block"):
        ext.candidate_scores(q, keys, row, length, pos, width, 0.1, 4097)
