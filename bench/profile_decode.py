"""Per-kernel CUDA time of one GpuWaveLayer decode step (torch.profiler), to see where a step goes.

    python bench/profile_decode.py --context 131072 --batch 8 [--mode gpu_only]
"""
from __future__ import annotations

import argparse

import torch

from kvstore.datasets.attention_like import decode_queries, generate_kv
from kvstore.gpu.wave_layer import GpuWaveLayer, WaveGpuConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mode", default="gpu_only", choices=["gpu_only", "offload"])
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
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
