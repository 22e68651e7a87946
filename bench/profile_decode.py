"""Per-kernel CUDA time of one GpuWaveLayer decode step (torch.profiler), to see where a step goes; with
``--parts``, also CUDA-graph timings of the gpu_only step's stages (the StoreConfig defaults).

    python bench/profile_decode.py --context 131072 --batch 8 [--mode gpu_only|offload] [--parts]
"""
from __future__ import annotations

import argparse

import torch

from kvstore.datasets.attention_like import decode_queries, generate_kv
from kvstore.gpu.wave_layer import GpuWaveLayer, WaveGpuConfig


def _median_ms(fn, reps: int = 50) -> float:
    """Median CUDA-event time of fn captured in a CUDA graph (host overhead out of the number)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def time_stages(layer: GpuWaveLayer, q: torch.Tensor) -> None:
    """CUDA-graph timings of the gpu_only step's kernels, each run alone on the layer's index: ranking (centroid
    scores), zones (the cuts of the rank order), candidate scores, the exact tokens and mixture weights, the two
    weighted row sums (apart and in one launch), the merge with the steady zone, and the whole step."""
    from kvstore.gpu._ext import cuda_ext
    from kvstore.gpu.cluster_ops import candidate_scores, cluster_scores

    ext = cuda_ext()
    G, Hg = layer.G, q.shape[1] // layer.Hkv
    qg = q.reshape(G, Hg, layer.D)
    slots, steady = layer._slots()
    budget = layer._budget()
    bound = getattr(budget, "bound", budget)
    r = layer.bounds.clusters_for(bound.candidates)
    e = layer.bounds.clusters_for(bound.candidates + bound.estimation) if bound.estimation else 0
    radii = layer.radii if bound.rank_radius else None
    scores, probs = cluster_scores(qg, slots.centroids, layer.sizes, layer.scale, radii=radii,
                                   rank_radius=bound.rank_radius, centroid_scale=slots.centroid_scale)

    def zones():
        return ext.wave_zones(probs, layer.sizes, scores, layer.offsets, layer.slot_base, None, bound.candidates,
                              bound.estimation, r, e)

    cand, run_row, run_len, run_pos, low, est, rest_lse, low_lse = zones()
    width = layer.bounds.rows_for(bound.candidates, r)
    s_tok, run_lse = candidate_scores(qg, slots.keys, run_row, run_len, run_pos, width, layer.scale,
                                      key_scale=slots.key_scale)
    t = min(bound.tokens, width)

    def mix():
        return ext.wave_mix(s_tok, run_lse, run_row, run_len, run_pos, low, cand, est, scores, layer.sizes,
                            rest_lse, low_lse, layer.slot_base, None, bound.tokens, t, bound.calibrate, bound.rest)

    pick_rows, _, pick_w, pick_d, pick_ref, _, mix_rows, mix_w, rest_w, mix_lse = mix()
    means = layer.mean_values.reshape(G * layer.C, layer.Dv)
    pick_part, mix_part = ext.weighted_rows_jobs([pick_w, mix_w], [pick_rows, mix_rows], [layer.kv_v, means])
    cases = {
        f"cluster scores ({layer.C} clusters a slot)":
            lambda: cluster_scores(qg, slots.centroids, layer.sizes, layer.scale, radii=radii,
                                   rank_radius=bound.rank_radius, centroid_scale=slots.centroid_scale),
        f"zones ({r} candidate, {e} estimation clusters at most)": zones,
        f"candidate scores ({r} clusters, {width} rows a slot)":
            lambda: candidate_scores(qg, slots.keys, run_row, run_len, run_pos, width, layer.scale,
                                     key_scale=slots.key_scale),
        f"exact tokens and mixture ({t} tokens a slot)": mix,
        "values of the exact tokens": lambda: ext.weighted_rows_partial(pick_w, pick_rows, layer.kv_v),
        "mean values of the mixture": lambda: ext.weighted_rows_partial(mix_w, mix_rows, means),
        "values and mean values (one launch)":
            lambda: ext.weighted_rows_jobs([pick_w, mix_w], [pick_rows, mix_rows], [layer.kv_v, means]),
        "merge with the steady zone": lambda: ext.wave_combine(pick_part, mix_part, pick_d, pick_ref, mix_lse, rest_w,
                                                               layer.value_mean, qg, steady.k, steady.v,
                                                               steady.length, layer.scale),
        "whole step (graph replay of layer.decode)": lambda: layer._decode_gpu_only(q),
    }
    for name, fn in cases.items():
        print(f"{name:60s} {_median_ms(fn) * 1000:8.1f} us")


def _field(item: str) -> tuple[str, object]:
    """'candidates=0.06' -> ('candidates', 0.06); ints stay ints, other values strings."""
    name, _, text = item.partition("=")
    for kind in (int, float):
        try:
            return name, kind(text)
        except ValueError:
            pass
    return name, text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mode", default="gpu_only", choices=["gpu_only", "offload"])
    p.add_argument("--retroinfer", action="store_true", help="the published budgets instead of the defaults")
    p.add_argument("--parts", action="store_true", help="also time the gpu_only step's stages")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="StoreConfig fields to change, e.g. candidates=0.06 centroid_dtype=kv")
    p.add_argument("--profiler-range", action="store_true",
                   help="run one step between cudaProfilerStart/Stop and exit (for ncu --profile-from-start off)")
    a = p.parse_args()
    k, v = generate_kv(a.batch, a.context, device="cuda")
    q = decode_queries(k, num_sets=2)[0]
    from kvstore import StoreConfig

    sc = StoreConfig.retroinfer() if a.retroinfer else StoreConfig()
    if a.set:
        import dataclasses

        sc = dataclasses.replace(sc, **dict(_field(item) for item in a.set))
    layer = GpuWaveLayer.build(k, v, WaveGpuConfig.from_store(sc, mode=a.mode, cuda_graph=False))
    for _ in range(5):
        layer.decode(q)
    torch.cuda.synchronize()
    if a.profiler_range:
        torch.cuda.profiler.start()
        layer.decode(q)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            layer.decode(q)
        torch.cuda.synchronize()
    sort = "self_cuda_time_total" if a.mode == "gpu_only" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=60))
    if a.parts and a.mode == "gpu_only":
        time_stages(layer, q)


if __name__ == "__main__":
    main()
