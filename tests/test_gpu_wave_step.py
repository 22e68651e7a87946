"""The wave step on the CUDA kernels (kvstore.attention.selection.wave_attend, kernel path) against the torch
reference of the same step, on the index of a real GpuWaveLayer: output, log-sum-exp and what the step read,
for the default budgets, per-slot budgets, budgets that cover everything and with steps 5-7 off."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kvstore.attention.core import full_attention
from kvstore.attention.selection import WaveBudget, slot_budgets, wave_attend
from kvstore.gpu.wave_layer import GpuWaveLayer, WaveGpuConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _ready() -> bool:
    from kvstore.gpu import has_cuda_ext

    return has_cuda_ext()


def _kv(B, H, N, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(16, D, generator=g)
    lab = torch.randint(0, 16, (B, H, N), generator=g)
    k = dirs[lab] * 2 + torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, D, generator=g)
    return k.to("cuda", dtype), v.to("cuda", dtype)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of the non-negative entries of a and b (per row, as sets) that both hold."""
    both = total = 0
    for x, y in zip(a.cpu().tolist(), b.cpu().tolist()):
        sx, sy = {i for i in x if i >= 0}, {i for i in y if i >= 0}
        both += len(sx & sy) if sx | sy else 1
        total += max(len(sx | sy), 1)
    return both / total


def _layer(dtype, N=30000, B=4, H=4, Hg=4, D=128, seed=11, candidate_dtype="int8"):
    """A layer of B * H slots and queries whose step the kernel path takes."""
    from kvstore.attention.selection import _fused_ready

    k, v = _kv(B, H, N, D, dtype, seed)
    layer = GpuWaveLayer.build(k, v, WaveGpuConfig(segment_len=8192, cuda_graph=False, backend="cuda",
                                                   candidate_dtype=candidate_dtype))
    q = torch.randn(B, H * Hg, D, device="cuda", dtype=dtype) * 2
    qg = q.reshape(layer.G, Hg, D)
    assert _fused_ready(qg, *layer._slots())
    return layer, k, v, qg


def _budget(layer, case):
    b = layer.cfg.budget(layer.length, layer.n)
    if case == "defaults":
        return b
    if case == "no_calibration_no_rest":
        return dataclasses.replace(b, calibrate=False, rest=False)
    if case == "no_estimation":
        return dataclasses.replace(b, estimation=0)
    if case == "ragged":
        per = [WaveBudget(max(1, b.candidates * (g + 1) // layer.G), max(1, b.tokens * (g % 3 + 1) // 3),
                          b.estimation // (g % 2 + 1)) for g in range(layer.G)]
        return slot_budgets(per, layer.device)
    raise ValueError(case)


@pytest.mark.parametrize("candidate_dtype", ["int8", "kv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["defaults", "ragged", "no_calibration_no_rest", "no_estimation"])
def test_kernel_step_matches_torch_step(dtype, case, candidate_dtype):
    if not _ready():
        pytest.skip("kvstore._cuda not built")
    layer, _, _, qg = _layer(dtype, candidate_dtype=candidate_dtype)
    slots, steady = layer._slots()
    budget = _budget(layer, case)
    o, lse, step = wave_attend(qg, slots, steady, budget, layer.bounds, layer.scale, backend="cuda")
    o_ref, lse_ref, step_ref = wave_attend(qg, slots, steady, budget, layer.bounds, layer.scale, backend="torch")
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    assert _rel(o, o_ref) < tol, (case, _rel(o, o_ref))
    assert float((lse - lse_ref).abs().max()) < 50 * tol
    assert _overlap(step.candidates, step_ref.candidates) > 0.98
    assert _overlap(step.estimation, step_ref.estimation) > 0.95
    assert _overlap(step.exact_rows, step_ref.exact_rows) > 0.95
    assert (step.candidate_rows - step_ref.candidate_rows).abs().max() <= 64


def test_kernel_step_with_full_budgets_is_full_attention():
    if not _ready():
        pytest.skip("kvstore._cuda not built")
    layer, k, v, qg = _layer(torch.float32, N=12000, seed=3, candidate_dtype="kv")
    slots, steady = layer._slots()
    n = layer.n
    o, lse, step = wave_attend(qg, slots, steady, WaveBudget(n, n, 0), layer.bounds, layer.scale, backend="cuda")
    B, H, N, D = k.shape
    ref = full_attention(qg.reshape(B, -1, D)[:, :, None].double(), k.double(), v.double())[0][:, :, 0]
    assert _rel(o.reshape(B, -1, D), ref) < 1e-4
    assert int((step.exact_rows >= 0).sum(1).min()) == n
    assert torch.equal(step.candidate_rows.cpu(), torch.full((layer.G,), n))


def test_kernel_step_is_deterministic_and_graph_safe():
    if not _ready():
        pytest.skip("kvstore._cuda not built")
    layer, _, _, qg = _layer(torch.bfloat16, N=20000, seed=5)
    slots, steady = layer._slots()
    budget = _budget(layer, "defaults")
    runs = [wave_attend(qg, slots, steady, budget, layer.bounds, layer.scale, backend="cuda")[0] for _ in range(3)]
    assert all(torch.equal(runs[0], x) for x in runs[1:])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        wave_attend(qg, slots, steady, budget, layer.bounds, layer.scale, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = wave_attend(qg, slots, steady, budget, layer.bounds, layer.scale, backend="cuda")[0]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, runs[0])


def _zones_and_mix(ext, layer, qg, budget, team):
    """The zone and mix kernels on a layer's index with ``team`` blocks a slot (0: the launcher's choice)."""
    from kvstore.gpu.cluster_ops import candidate_scores, cluster_scores

    slots, _ = layer._slots()
    scores, probs = cluster_scores(qg, slots.centroids, slots.sizes, layer.scale, radii=slots.radii,
                                   rank_radius=budget.rank_radius, centroid_scale=slots.centroid_scale)
    r = layer.bounds.clusters_for(budget.candidates)
    e = layer.bounds.clusters_for(budget.candidates + budget.estimation)
    z = ext.wave_zones(probs, slots.sizes, scores, slots.offsets, slots.slot_base, None, budget.candidates,
                       budget.estimation, r, e, team)
    cand, run_row, run_len, run_pos, low, est, rest_lse, low_lse = z
    width = layer.bounds.rows_for(budget.candidates, r)
    s_tok, run_lse = candidate_scores(qg, slots.keys, run_row, run_len, run_pos, width, layer.scale,
                                      key_scale=slots.key_scale)
    t = min(budget.tokens, width)
    m = ext.wave_mix(s_tok, run_lse, run_row, run_len, run_pos, low, cand, est, scores, slots.sizes, rest_lse,
                     low_lse, slots.slot_base, None, budget.tokens, t, budget.calibrate, budget.rest, team)
    return list(z) + list(m)


@pytest.mark.parametrize("team", [2, 4, 8, 16])
def test_zone_and_mix_kernels_give_one_result_for_every_team_size(team):
    """A slot split over a team of blocks selects what one block selects (the same ids, rows and runs) with the
    same weights up to float rounding of their sums."""
    if not _ready():
        pytest.skip("kvstore._cuda not built")
    from kvstore.gpu._ext import cuda_ext

    ext = cuda_ext()
    layer, _, _, qg = _layer(torch.bfloat16, N=40000, B=1, H=4, seed=7)
    budget = layer.cfg.budget(layer.length, layer.n)
    one = _zones_and_mix(ext, layer, qg, budget, 1)
    try:
        split = _zones_and_mix(ext, layer, qg, budget, team)
    except RuntimeError as err:
        if "cannot launch teams" in str(err):
            pytest.skip(str(err))
        raise
    names = ["cand", "run_row", "run_len", "run_pos", "cand_low", "est", "rest_lse", "low_lse", "pick_rows",
             "pick_local", "pick_w", "pick_d", "pick_ref", "n_valid", "mix_rows", "mix_w", "rest_w", "mix_lse"]
    got = {name: (a, b) for name, a, b in zip(names, one, split)}
    # the zones depend on integer weights and the probabilities' order only: the same in any team
    for name in ("cand", "run_row", "run_len", "run_pos", "cand_low", "est", "n_valid", "mix_rows"):
        assert torch.equal(*got[name]), (team, name)
    # the exact tokens rank by weights whose reference point is a sum in another order: near-ties may swap
    assert _overlap(*got["pick_rows"]) > 0.999
    for name in ("rest_lse", "low_lse", "pick_ref", "mix_lse", "pick_d", "rest_w"):
        a, b = got[name]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6, equal_nan=True), (team, name)
    if torch.equal(*got["pick_rows"]):
        assert torch.allclose(*got["pick_w"], rtol=1e-4, atol=1e-7)
        assert torch.allclose(*got["mix_w"], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("B,H", [(1, 1), (1, 2), (1, 8)])
def test_kernel_step_with_few_slots_matches_torch_step(B, H):
    """One to eight slots (a 1M-token batch of one has eight): the kernels split each slot over a team of blocks."""
    if not _ready():
        pytest.skip("kvstore._cuda not built")
    from kvstore.gpu._ext import cuda_ext

    layer, _, _, qg = _layer(torch.bfloat16, N=60000, B=B, H=H, seed=13)
    assert cuda_ext().wave_team_size(layer.G) >= 1
    slots, steady = layer._slots()
    budget = _budget(layer, "defaults")
    o, lse, step = wave_attend(qg, slots, steady, budget, layer.bounds, layer.scale, backend="cuda")
    o_ref, lse_ref, step_ref = wave_attend(qg, slots, steady, budget, layer.bounds, layer.scale, backend="torch")
    assert _rel(o, o_ref) < 2e-2
    assert float((lse - lse_ref).abs().max()) < 1.0
    assert _overlap(step.candidates, step_ref.candidates) > 0.98
    assert _overlap(step.exact_rows, step_ref.exact_rows) > 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_step_with_long_and_ragged_steady_zones(dtype):
    """The merge kernel attends the steady zone itself: zones of 0 to 700 rows (several of its 256-row chunks),
    a different length in every slot, match the torch step."""
    if not _ready():
        pytest.skip("kvstore._cuda not built")
    from kvstore.attention.selection import SteadyZone

    layer, _, _, qg = _layer(dtype)
    slots, _ = layer._slots()
    G, D, S = layer.G, layer.D, 700
    gen = torch.Generator().manual_seed(5)
    sk = (torch.randn(G, S, D, generator=gen) * 1.5).to("cuda", dtype)
    sv = torch.randn(G, S, layer.Dv, generator=gen).to("cuda", dtype)
    lens = [0, 1, 255, 256, 257, 700, 699, 512, 3, 64, 300, 600, 128, 2, 511, 450]
    steady = SteadyZone(sk, sv, torch.tensor([lens[g % len(lens)] for g in range(G)], device="cuda"))
    budget = _budget(layer, "defaults")
    o, lse, _ = wave_attend(qg, slots, steady, budget, layer.bounds, layer.scale, backend="cuda")
    o_ref, lse_ref, _ = wave_attend(qg, slots, steady, budget, layer.bounds, layer.scale, backend="torch")
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    assert _rel(o, o_ref) < tol
    assert float((lse - lse_ref).abs().max()) < 50 * tol
