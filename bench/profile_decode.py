"""Per-kernel CUDA time of one GpuWaveLayer decode step (torch.profiler), to see where a step goes; with
``--parts``, also CUDA-event timings of the sparse attention with only its exact part and only its
estimation part.

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


def time_parts(layer: GpuWaveLayer, q: torch.Tensor) -> None:
    """Sparse attention of one gpu_only step: whole, exact runs only, estimation only (steady run kept)."""
    from kvstore.gpu.attention_ops import Estimation, KVSource, RunTable, sparse_decode_attention
    from kvstore.gpu.cluster_ops import cluster_runs

    G, Hg = layer.G, q.shape[1] // layer.Hkv
    qg = q.reshape(G, Hg, layer.D)
    scores, ret, est, _ = layer._rank(qg)
    r, e = ret.shape[1], est.shape[1]
    row, length = cluster_runs(ret, layer.offsets, layer.slot_base, layer._steady_row, layer._steady_len_dev.view(G))
    src, offsets = layer._run_layout(r)
    runs = RunTable(src, row.reshape(-1), length.reshape(-1), offsets)
    steady = RunTable(torch.ones(G, dtype=torch.int32, device=q.device), layer._steady_row,
                      layer._steady_len_dev.view(G), torch.arange(G + 1, dtype=torch.int32, device=q.device))
    sources = [KVSource(layer.kv_k, layer.kv_v), KVSource(layer.steady_k.view(-1, layer.D),
                                                          layer.steady_v.view(-1, layer.Dv))]
    estim = Estimation(scores, layer.sizes, layer.value_sums, est)
    ns, es = layer._splits(Hg, r, e)
    ns0, _ = layer._splits(Hg, r, 0)
    _, es1 = layer._splits(Hg, 0, e)
    cases = {
        f"whole ({ns} exact + {es} estimation blocks a slot)":
            lambda: sparse_decode_attention(qg, sources, runs, estim, layer.scale, num_splits=ns, est_splits=es),
        f"exact only ({ns0} blocks a slot)":
            lambda: sparse_decode_attention(qg, sources, runs, None, layer.scale, num_splits=ns0),
        f"estimation only (+ steady run; 1 + {es1} blocks a slot)":
            lambda: sparse_decode_attention(qg, sources, steady, estim, layer.scale, num_splits=1, est_splits=es1),
        "rank (scores + probs + select)": lambda: layer._rank(qg),
        "cluster_runs": lambda: cluster_runs(ret, layer.offsets, layer.slot_base, layer._steady_row,
                                             layer._steady_len_dev.view(G)),
    }
    for name, fn in cases.items():
        print(f"{name:60s} {_median_ms(fn) * 1000:8.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mode", default="gpu_only", choices=["gpu_only", "offload"])
    p.add_argument("--parts", action="store_true", help="also time the attention's exact / estimation parts")
    a = p.parse_args()
    k, v = generate_kv(a.batch, a.context, device="cuda")
    q = decode_queries(k, num_sets=2)[0]
    layer = GpuWaveLayer.build(k, v, WaveGpuConfig(mode=a.mode, cuda_graph=False))
    for _ in range(5):
        layer.decode(q)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            layer.decode(q)
        torch.cuda.synchronize()
    sort = "cuda_time_total" if a.mode == "gpu_only" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))
    if a.parts and a.mode == "gpu_only":
        time_parts(layer, q)
        print(f"{'whole step (graph replay of layer.decode)':60s} "
              f"{_median_ms(lambda: layer._decode_gpu_only(q)) * 1000:8.1f} us")


if __name__ == "__main__":
    main()
