"""kvstore.gpu.attention_ops: sparse decode attention over row runs + estimation zone.

CPU tests check the torch reference against float64 references built from kvstore.attention.core
(attention_with_lse over the gathered rows, estimate_clusters over the zone's clusters, merge_partials). GPU tests
(marked ``gpu``) run the CUDA kernels on fresh random data against the same references.
"""
from __future__ import annotations

import math

import pytest
import torch

from kvstore.attention.core import attention_with_lse, estimate_clusters, merge_partials
from kvstore.gpu.attention_ops import (Estimation, KVSource, RunTable, default_num_splits, estimation_splits,
                                       merge_attention_partials, sparse_decode_attention)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _cuda_ready() -> bool:
    from kvstore.gpu import has_cuda_ext

    return torch.cuda.is_available() and has_cuda_ext()


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and the kvstore._cuda extension")


class Case:
    """Random inputs of one call plus what the float64 reference needs (the centroids behind the scores)."""

    def __init__(self, G: int, Hg: int, D: int, Dv: int, dtype: torch.dtype, *, n_sources: int = 3,
                 runs: tuple[int, int] = (0, 6), run_len: tuple[int, int] = (0, 9), E: int = 5, C: int = 12,
                 empty_slots: tuple[int, ...] = (), seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)

        def randint(lo: int, hi: int) -> int:  # inclusive
            return int(torch.randint(lo, hi + 1, (1,), generator=gen))

        block = run_len[1] + 1
        rows = [(2 * runs[1] + 3 + i) * block for i in range(n_sources)]
        self.sources = [KVSource(torch.randn(r, D, generator=gen).to(dtype),
                                 torch.randn(r, Dv, generator=gen).to(dtype)) for r in rows]
        src, row, length, offsets = [], [], [], [0]
        for g in range(G):
            used: set[tuple[int, int]] = set()
            for _ in range(0 if g in empty_slots else randint(*runs)):
                while True:  # runs of a slot are disjoint: one run per (source, block)
                    i = randint(0, n_sources - 1)
                    b = randint(0, rows[i] // block - 1)
                    if (i, b) not in used:
                        used.add((i, b))
                        break
                n = 0 if len(src) % 5 == 4 else randint(*run_len)   # every fifth run is empty
                src.append(i)
                row.append(b * block + randint(0, block - n))
                length.append(n)
            offsets.append(len(src))
        self.runs = RunTable(torch.tensor(src, dtype=torch.int32), torch.tensor(row, dtype=torch.int64),
                             torch.tensor(length, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int32))
        self.q = (2.0 * torch.randn(G, Hg, D, generator=gen)).to(dtype)
        self.scale = 1.0 / math.sqrt(D)
        self.centroids = torch.randn(G, C, D, generator=gen)
        sizes = torch.randint(0, 20, (G, C), generator=gen).float()
        sizes[:, ::5] = 0.0                                      # some empty clusters
        self.value_sums = torch.randn(G, C, Dv, generator=gen) * sizes[..., None]
        scores = (self.q.float() @ self.centroids.transpose(1, 2)) * self.scale
        ids = torch.stack([torch.randperm(C, generator=gen)[:E] for _ in range(G)]) if G else \
            torch.zeros(0, E, dtype=torch.int64)
        self.estimation = Estimation(scores, sizes, self.value_sums, ids.to(torch.int64))

    def to(self, device: str, pinned: int | None = None) -> "Case":
        """Everything on `device`; source `pinned` (if given) in pinned host memory instead."""
        out = Case.__new__(Case)
        out.__dict__.update(self.__dict__)
        out.sources = [KVSource(s.k.pin_memory(), s.v.pin_memory()) if i == pinned else
                       KVSource(s.k.to(device), s.v.to(device)) for i, s in enumerate(self.sources)]
        out.runs = RunTable(*(t.to(device) for t in self.runs))
        out.estimation = Estimation(*(t.to(device) for t in self.estimation))
        out.q = self.q.to(device)
        return out

    def reference(self, with_estimation: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 o [G, Hg, Dv], lse [G, Hg] on the CPU."""
        G, Hg, _ = self.q.shape
        q = self.q.cpu().double()
        src, row, length = (self.runs.src.tolist(), self.runs.row.tolist(), self.runs.length.tolist())
        off = self.runs.offsets.tolist()
        sources = [(s.k.cpu().double(), s.v.cpu().double()) for s in self.sources]
        est = Estimation(*(t.cpu() for t in self.estimation))
        o, lse = [], []
        for g in range(G):
            sel = range(off[g], off[g + 1])
            k = torch.cat([sources[src[r]][0][row[r]:row[r] + length[r]] for r in sel] + [q.new_zeros(0, q.shape[2])])
            v = torch.cat([sources[src[r]][1][row[r]:row[r] + length[r]] for r in sel]
                          + [q.new_zeros(0, sources[0][1].shape[1])])
            parts = [attention_with_lse(q[g], k, v, self.scale)]
            if with_estimation:
                ids = est.ids[g]
                ids = ids[est.sizes[g, ids] > 0]
                parts.append(estimate_clusters(q[g], self.centroids[g, ids].double(), est.sizes[g, ids].double(),
                                               est.value_sums[g, ids].double(), self.scale))
            og, lg = merge_partials(parts)
            o.append(og)
            lse.append(lg)
        Dv = self.sources[0].v.shape[1]
        if not G:
            return torch.zeros(0, Hg, Dv, dtype=torch.float64), torch.zeros(0, Hg, dtype=torch.float64)
        return torch.stack(o), torch.stack(lse)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.cpu().double(), b.cpu().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check(o: torch.Tensor, lse: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype,
           tol: float | None = None) -> None:
    """o, lse against the float64 reference: same empty heads, lse within 1e-3, relative L2 error of o <= tol
    (default: TOL[dtype])."""
    ro, rl = ref
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert o.shape == ro.shape and lse.shape == rl.shape
    o, lse = o.cpu().double(), lse.cpu().double()
    assert torch.isfinite(o).all()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl)), "a head saw nothing in one and not the other"
    assert (o[torch.isneginf(rl)] == 0).all()
    fin = torch.isfinite(rl)
    assert torch.allclose(lse[fin], rl[fin], atol=1e-3 if dtype != torch.float32 else 1e-5, rtol=0)
    assert _rel(o, ro) <= (TOL[dtype] if tol is None else tol)


# ------------------------------------------------------------------------------------------- CPU reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hg", [1, 4, 7])
@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 128), (128, 64)])
def test_reference_matches_float64(dtype, Hg, D, Dv):
    case = Case(6, Hg, D, Dv, dtype, empty_slots=(2,), seed=Hg * 1000 + D + Dv)
    assert (case.runs.length == 0).any(), "the case should hold empty runs"
    o, lse = sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, case.scale, backend="torch")
    _check(o, lse, case.reference(), dtype)


def test_no_estimation_and_empty_zone_agree():
    case = Case(5, 4, 64, 64, torch.float32, E=0, seed=3)
    a = sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, backend="torch")
    b = sparse_decode_attention(case.q, case.sources, case.runs, None, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _check(*b, case.reference(with_estimation=False), torch.float32)


def test_empty_slots_see_only_the_estimation():
    case = Case(4, 3, 64, 64, torch.float32, empty_slots=(0, 1, 2, 3), seed=4)
    assert case.runs.src.numel() == 0
    o, lse = sparse_decode_attention(case.q, case.sources, case.runs, None, backend="torch")
    assert torch.isneginf(lse).all() and (o == 0).all()
    o, lse = sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, backend="torch")
    _check(o, lse, case.reference(), torch.float32)


def test_empty_clusters_contribute_nothing():
    case = Case(3, 4, 64, 64, torch.float32, E=10, seed=5)
    est = case.estimation
    garbage = est.value_sums.clone()
    garbage[est.sizes == 0] = 1e6                     # an empty cluster's value sum must never be read
    a = sparse_decode_attention(case.q, case.sources, case.runs, est._replace(value_sums=garbage), backend="torch")
    _check(*a, case.reference(), torch.float32)


def test_q_dtype_output_and_default_scale():
    case = Case(2, 2, 64, 64, torch.bfloat16, seed=6)
    o, lse = sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, backend="torch")
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32   # default scale = 1/sqrt(D) = case.scale
    _check(o, lse, case.reference(), torch.bfloat16)


def test_zero_slots():
    case = Case(0, 4, 64, 64, torch.float32, seed=7)
    o, lse = sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, backend="torch")
    assert o.shape == (0, 4, 64) and lse.shape == (0, 4)


def _mutations():
    def q_not_tensor(c):
        c.q = c.q.tolist()

    def q_2d(c):
        c.q = c.q[0]

    def q_int(c):
        c.q = c.q.to(torch.int32)

    def no_sources(c):
        c.sources = []

    def five_sources(c):
        c.sources = c.sources + c.sources[:2]

    def k_dim(c):
        c.sources[0] = KVSource(c.sources[0].k[:, :32], c.sources[0].v)

    def v_rows(c):
        c.sources[1] = KVSource(c.sources[1].k, c.sources[1].v[:-1])

    def k_dtype(c):
        c.sources[0] = KVSource(c.sources[0].k.double(), c.sources[0].v)

    def src_int64(c):
        c.runs = c.runs._replace(src=c.runs.src.long())

    def row_int32(c):
        c.runs = c.runs._replace(row=c.runs.row.int())

    def offsets_len(c):
        c.runs = c.runs._replace(offsets=c.runs.offsets[:-1])

    def src_range(c):
        s = c.runs.src.clone()
        s[0] = 3
        c.runs = c.runs._replace(src=s)

    def past_end(c):
        r = c.runs.row.clone()
        r[0] = c.sources[int(c.runs.src[0])].k.shape[0] - int(c.runs.length[0]) + 1
        c.runs = c.runs._replace(row=r)

    def negative_length(c):
        n = c.runs.length.clone()
        n[0] = -1
        c.runs = c.runs._replace(length=n)

    def offsets_order(c):
        o = c.runs.offsets.clone()
        o[1] = o[2] + 1
        c.runs = c.runs._replace(offsets=o)

    def scores_shape(c):
        c.estimation = c.estimation._replace(scores=c.estimation.scores[:, :1])

    def ids_range(c):
        i = c.estimation.ids.clone()
        i[0, 0] = c.estimation.scores.shape[2]
        c.estimation = c.estimation._replace(ids=i)

    def value_sums_dtype(c):
        c.estimation = c.estimation._replace(value_sums=c.estimation.value_sums.half())

    def scale_nan(c):
        c.scale = float("nan")

    def splits_zero(c):
        c.num_splits = 0

    def backend_name(c):
        c.backend = "gpu"

    def cuda_on_cpu(c):
        c.backend = "cuda"

    return [(q_not_tensor, TypeError, "q"), (q_2d, ValueError, "q"), (q_int, TypeError, "q"),
            (no_sources, ValueError, "sources"), (five_sources, ValueError, "sources"),
            (k_dim, ValueError, r"sources\[0\]\.k"), (v_rows, ValueError, r"sources\[1\]\.v"),
            (k_dtype, TypeError, r"sources\[0\]\.k"), (src_int64, TypeError, r"runs\.src"),
            (row_int32, TypeError, r"runs\.row"), (offsets_len, ValueError, r"runs\.offsets"),
            (src_range, ValueError, r"runs\.src"), (past_end, ValueError, r"runs\.row \+ runs\.length"),
            (negative_length, ValueError, r"runs\.length"), (offsets_order, ValueError, r"runs\.offsets"),
            (scores_shape, ValueError, r"estimation\.scores"), (ids_range, ValueError, r"estimation\.ids"),
            (value_sums_dtype, TypeError, r"estimation\.value_sums"), (scale_nan, ValueError, "scale"),
            (splits_zero, ValueError, "num_splits"), (backend_name, ValueError, "backend"),
            (cuda_on_cpu, ValueError, "q must be a CUDA tensor")]


@pytest.mark.parametrize("mutate,exc,match", _mutations(), ids=[m[0].__name__ for m in _mutations()])
def test_bad_inputs_name_the_argument(mutate, exc, match):
    case = Case(4, 2, 64, 64, torch.float32, runs=(2, 4), run_len=(1, 5), seed=8)
    case.num_splits, case.backend = None, "torch"
    mutate(case)
    with pytest.raises(exc, match=match):
        sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, case.scale,
                                backend=case.backend, num_splits=case.num_splits)


def test_merge_attention_partials_reference():
    gen = torch.Generator().manual_seed(9)
    o = torch.randn(3, 5, 4, 16, generator=gen)
    lse = torch.randn(3, 5, 4, generator=gen) * 3
    lse[1, 0] = -math.inf
    o[1, 0] = float("nan")                    # an empty part's o is never read
    lse[:, 2, 1] = -math.inf                  # every part empty
    mo, ml = merge_attention_partials(o, lse, backend="torch")
    parts = [(torch.where(torch.isneginf(lse[p])[..., None], 0.0, o[p]).double(), lse[p].double()) for p in range(3)]
    ro, rl = merge_partials(parts)
    assert torch.allclose(mo.double(), ro, atol=1e-6) and torch.equal(torch.isneginf(ml), torch.isneginf(rl))
    assert (mo[2, 1] == 0).all() and torch.isneginf(ml[2, 1])
    with pytest.raises(TypeError, match="float32"):
        merge_attention_partials(o.half(), lse)
    with pytest.raises(ValueError, match="lse"):
        merge_attention_partials(o, lse[:, :, :2])


def test_split_heuristics():
    assert default_num_splits(1, "cpu") == 64 and default_num_splits(10_000, "cpu") == 1
    assert 1 <= default_num_splits(64, "cpu") <= 64
    assert estimation_splits(0, 8) == 0 and estimation_splits(1, 8) == 1
    assert estimation_splits(10_000, 1) == 64 and estimation_splits(2000, 64) == math.ceil(264 / 64)


# ------------------------------------------------------------------------------------------------------ GPU


def _poison(*nbytes: int) -> None:
    """Leave NaN-filled blocks of these sizes in the caching allocator, so that outputs and workspaces the kernel
    fails to write read back as NaN instead of stale zeros."""
    blocks = [torch.full((max(n // 4, 1),), float("nan"), device="cuda") for n in nbytes]
    del blocks


def _poison_for(case: Case, num_splits: int) -> None:
    G, Hg, _ = case.q.shape
    Dv = case.sources[0].v.shape[1]
    S = num_splits + estimation_splits(case.estimation.ids.shape[1], G)
    _poison(G * Hg * S * Dv * 4, G * Hg * S * 4, G * Hg * Dv * case.q.element_size(), G * Hg * 4)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 128)])
@pytest.mark.parametrize("Hg", [1, 4, 7, 8, 16])
@pytest.mark.parametrize("num_splits", [1, None, 13])
def test_kernel_matches_reference(dtype, D, Dv, Hg, num_splits):
    seed = D + Hg * 7 + (num_splits or 0) * 31 + (dtype == torch.float16)
    cpu = Case(9, Hg, D, Dv, dtype, runs=(0, 12), run_len=(0, 37), E=13, C=40, empty_slots=(4,), seed=seed)
    case = cpu.to("cuda", pinned=1)                      # source 1 is read zero-copy from pinned host memory
    splits = num_splits or default_num_splits(9, case.q.device)
    _poison_for(case, splits)
    o, lse = sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, case.scale, backend="cuda",
                                     num_splits=num_splits)
    torch.cuda.synchronize()
    _check(o, lse, cpu.reference(), dtype)
    ro, rl = sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, case.scale, backend="torch")
    assert _rel(o, ro) <= TOL[dtype]


@gpu
@needs_cuda
@pytest.mark.parametrize("D,Dv", [(128, 64), (64, 128)])
def test_kernel_mixed_dims_and_float32(D, Dv):
    cpu = Case(5, 3, D, Dv, torch.float32, runs=(1, 8), run_len=(0, 20), E=7, C=20, seed=D)
    case = cpu.to("cuda")
    o, lse = sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, case.scale, backend="cuda")
    _check(o, lse, cpu.reference(), torch.float32, tol=1e-4)  # the kernel's approximate exp2 / log2


@gpu
@needs_cuda
def test_kernel_large_case():
    """64 slots x ~200 runs of ~16 rows (a realistic retrieval zone) + 500 estimation clusters of 2000."""
    cpu = Case(64, 4, 128, 128, torch.bfloat16, n_sources=2, runs=(190, 210), run_len=(8, 24), E=500, C=2000,
               seed=11)
    case = cpu.to("cuda", pinned=0)
    _poison_for(case, default_num_splits(64, case.q.device))
    o, lse = sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, case.scale, backend="cuda")
    torch.cuda.synchronize()
    _check(o, lse, cpu.reference(), torch.bfloat16)


@gpu
@needs_cuda
def test_kernel_empty_slots_zone_only_and_zero_slots():
    cpu = Case(4, 4, 128, 128, torch.bfloat16, empty_slots=(0, 1, 2, 3), E=9, C=30, seed=12)
    case = cpu.to("cuda")
    o, lse = sparse_decode_attention(case.q, case.sources, case.runs, None, backend="cuda")
    assert torch.isneginf(lse).all() and (o == 0).all()
    o, lse = sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, backend="cuda")
    _check(o, lse, cpu.reference(), torch.bfloat16)
    z = Case(0, 4, 128, 128, torch.bfloat16, seed=13).to("cuda")
    o, lse = sparse_decode_attention(z.q, z.sources, z.runs, z.estimation, backend="cuda")
    assert o.shape == (0, 4, 128) and lse.shape == (0, 4)


@gpu
@needs_cuda
def test_kernel_poisons_slots_with_bad_runs():
    """Without check_bounds the kernel never reads out of bounds: a bad run or id turns its slot into NaN."""
    cpu = Case(4, 4, 64, 64, torch.float16, runs=(2, 5), run_len=(1, 6), E=5, C=12, seed=14)
    case = cpu.to("cuda")
    good, _ = sparse_decode_attention(case.q, case.sources, case.runs, case.estimation, backend="cuda")
    row = case.runs.row.clone()
    row[int(cpu.runs.offsets[1])] = 1 << 40                    # first run of slot 1: far past its source
    ids = case.estimation.ids.clone()
    ids[2, 0] = -1                                             # slot 2: an id outside [0, C)
    o, lse = sparse_decode_attention(case.q, case.sources, case.runs._replace(row=row),
                                     case.estimation._replace(ids=ids), backend="cuda")
    torch.cuda.synchronize()
    assert torch.isnan(o[1:3]).all() and torch.isnan(lse[1:3]).all()
    assert torch.equal(o[[0, 3]], good[[0, 3]])
    with pytest.raises(ValueError, match="runs"):
        sparse_decode_attention(case.q, case.sources, case.runs._replace(row=row), backend="cuda", check_bounds=True)


@gpu
@needs_cuda
def test_kernel_merge_partials():
    gen = torch.Generator().manual_seed(15)
    o = torch.randn(7, 6, 3, 128, generator=gen)
    lse = torch.randn(7, 6, 3, generator=gen) * 4
    lse[2, 1] = -math.inf
    o[2, 1] = float("nan")
    lse[:, 0, 0] = -math.inf
    ro, rl = merge_attention_partials(o, lse, backend="torch")
    for dtype in (torch.float32, torch.bfloat16):
        mo, ml = merge_attention_partials(o.cuda(), lse.cuda(), out_dtype=dtype, backend="cuda")
        assert mo.dtype == dtype and mo.shape == ro.shape
        assert _rel(mo, ro) <= (1e-5 if dtype == torch.float32 else TOL[dtype])
        assert torch.equal(torch.isneginf(ml.cpu()), torch.isneginf(rl))
        fin = torch.isfinite(rl)
        assert torch.allclose(ml.cpu()[fin], rl[fin], atol=1e-4)


@gpu
@needs_cuda
def test_kernel_captures_in_a_cuda_graph():
    """No host sync on the default path: the call captures in a CUDA graph and replays on new queries."""
    cpu = Case(8, 4, 128, 128, torch.bfloat16, runs=(3, 9), run_len=(4, 20), E=11, C=40, seed=16)
    case = cpu.to("cuda")
    args = (case.sources, case.runs, case.estimation, case.scale)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sparse_decode_attention(case.q, *args, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparse_decode_attention(case.q, *args, backend="cuda")
    cpu.q = (2.0 * torch.randn(cpu.q.shape, generator=torch.Generator().manual_seed(17))).to(cpu.q.dtype)
    cpu.estimation = cpu.estimation._replace(scores=(cpu.q.float() @ cpu.centroids.transpose(1, 2)) * cpu.scale)
    case.q.copy_(cpu.q)                               # new step, same buffers
    case.estimation.scores.copy_(cpu.estimation.scores)
    graph.replay()
    torch.cuda.synchronize()
    _check(out[0], out[1], cpu.reference(), torch.bfloat16)


@gpu
@needs_cuda
def test_binding_errors_with_numbers_devices_and_dtypes_raise():
    """Messages that carry sizes, devices and dtypes are raised as Python errors (no crash while building them)."""
    from kvstore.gpu import cuda_ext

    ext = cuda_ext()
    with pytest.raises(RuntimeError, match="got -5"):
        ext.wave_team_size(-5)
    with pytest.raises(RuntimeError, match="got 7"):
        ext.sparse_attention_blocks_per_sm(0, 7, 128, 128, 4)
    q = torch.zeros(2, 4, 128, device="cuda", dtype=torch.bfloat16)
    bad_k = torch.zeros(10, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.zeros(10, 128, device="cuda", dtype=torch.bfloat16)
    i64 = torch.zeros(2, 1, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="has dim 64, q has 128"):
        ext.sparse_decode_attention(q, [bad_k], [v], i64.int(), i64, i64.int(), i64, None, None, None, None,
                                    1.0, 1, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.sparse_decode_attention(q, [bad_k.float()], [v], i64.int(), i64, i64.int(), i64, None, None, None, None,
                                    1.0, 1, 0)
