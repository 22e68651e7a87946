"""Where a GPU wave index build goes, against the causal SDPA prefill of the same context (one layer,
Llama-3-8B layout, generated KV): build seconds per mode, the k-means of one sequence per assignment matmul
(seconds, objective against fp32, and the decode error of a layer built with it), and with ``--profile`` the
CUDA kernels and host time of one gpu_only build (torch.profiler).

    python bench/profile_build.py --context 131072 --batch 1 [--modes gpu_only offload] [--matmuls auto fp32]
        [--profile] [--json out.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from kvstore.benchmarks.decode import (chunked_causal_attention, error_summary, reference_attention,
                                       relative_errors, timed_seconds)
from kvstore.datasets.attention_like import AttentionLikeSpec, decode_queries, generate_kv
from kvstore.gpu import kmeans as kmeans_mod
from kvstore.gpu.wave_layer import GpuWaveLayer, WaveGpuConfig


def prefill_seconds(k: torch.Tensor, v: torch.Tensor, spec: AttentionLikeSpec, chunk: int = 8192) -> float:
    """Seconds of a causal SDPA prefill of the first sequence (8192-query chunks against the growing prefix)."""
    q = torch.randn(1, spec.num_q_heads, k.shape[2], spec.head_dim, device=k.device, dtype=k.dtype)
    chunked_causal_attention(q[:, :, :chunk], k[:1, :, :chunk], v[:1, :, :chunk], chunk)
    return timed_seconds(lambda: chunked_causal_attention(q, k[:1], v[:1], chunk, out=q), k.device)[1]


def median_seconds(fn, reps: int, device: torch.device) -> float:
    fn()  # warm-up (allocator, cuBLAS, pinned-memory cache)
    return statistics.median(timed_seconds(fn, device)[1] for _ in range(reps))


def decode_error(layer: GpuWaveLayer, q: torch.Tensor, ref: torch.Tensor) -> float:
    errs = [relative_errors(layer.decode(q[s]).float(), ref[s]) for s in range(q.shape[0])]
    return error_summary(torch.cat([e.flatten() for e in errs]))["error_median"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--context", type=int, default=131072, help="tokens a sequence (131072)")
    p.add_argument("--batch", type=int, default=1, help="sequences (1)")
    p.add_argument("--modes", nargs="+", default=["gpu_only", "offload"], choices=["gpu_only", "offload"])
    p.add_argument("--matmuls", nargs="+", default=["auto", "fp32"], choices=list(kmeans_mod.MATMULS),
                   help="assignment matmuls of the k-means comparison (auto fp32)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions, median (3)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one gpu_only build")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_build.py needs a CUDA device")
    dev = torch.device("cuda")
    spec = AttentionLikeSpec()
    k, v = generate_kv(a.batch, a.context, spec, device=dev, seed=0)
    q = decode_queries(k, spec, num_sets=2, seed=0)
    ref = reference_attention(q, k, v)
    out: dict = {"context": a.context, "batch": a.batch, "device": torch.cuda.get_device_name(dev)}
    pre = prefill_seconds(k, v, spec) * a.batch
    out["prefill_s"] = pre
    print(f"{out['device']}: context {a.context}, batch {a.batch}; SDPA prefill {pre:.3f} s (batch 1 x {a.batch})")

    cfg = WaveGpuConfig()
    mid = k[0][:, cfg.sink:a.context - cfg.window].contiguous()
    km = {}
    ref_obj = None
    for mm in ["fp32"] + [m for m in a.matmuls if m != "fp32"]:
        run = functools.partial(kmeans_mod.segmented_kmeans_gpu, mid, cfg.tokens_per_cluster, cfg.segment_len,
                                cfg.kmeans_iters, cfg.seed, matmul=mm)
        secs = median_seconds(run, a.reps, dev)
        asg, cen, _ = run()
        obj = float(kmeans_mod.kmeans_objective(mid.float(), asg, cen).sum())
        ref_obj = obj if mm == "fp32" else ref_obj
        original = kmeans_mod.segmented_kmeans_gpu
        kmeans_mod.segmented_kmeans_gpu = functools.partial(original, matmul=mm)  # the layer's build takes it
        try:
            err = decode_error(GpuWaveLayer.build(k, v, cfg, device=dev), q, ref)
        finally:
            kmeans_mod.segmented_kmeans_gpu = original
        km[mm] = {"seconds": secs, "objective_over_fp32": obj / ref_obj, "decode_error_median": err}
        print(f"  k-means of one sequence, matmul={mm}: {1e3 * secs:.1f} ms, objective / fp32 {obj / ref_obj:.5f}, "
              f"decode error median {err:.4f}")
    out["kmeans_one_sequence"] = km
    builds = {}
    for mode in a.modes:
        mcfg = WaveGpuConfig(mode=mode)
        # the first build of a mode also allocates its memory (pinned host memory for offload); later ones reuse
        # the allocators' caches, as the layers of one model do not
        first = timed_seconds(lambda: GpuWaveLayer.build(k, v, mcfg, device=dev), dev)[1]
        secs = median_seconds(lambda: GpuWaveLayer.build(k, v, mcfg, device=dev), a.reps, dev)
        builds[mode] = {"seconds": secs, "over_prefill": secs / pre, "first_seconds": first}
        print(f"  build ({mode}): {secs:.3f} s = {100 * secs / pre:.1f}% of the prefill (first build, memory "
              f"allocated: {first:.3f} s)")
    out["build"] = builds
    # the k-means share of a gpu_only build, and the device-to-pinned-host copy rate the offload build moves at
    spent = []
    original = kmeans_mod.segmented_kmeans_gpu

    def timed_kmeans(*args, **kw):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = original(*args, **kw)
        torch.cuda.synchronize()
        spent.append(time.perf_counter() - t0)
        return r

    kmeans_mod.segmented_kmeans_gpu = timed_kmeans
    try:
        total = timed_seconds(lambda: GpuWaveLayer.build(k, v, cfg, device=dev), dev)[1]
    finally:
        kmeans_mod.segmented_kmeans_gpu = original
    host = torch.empty(k.numel() * 2, dtype=k.dtype, pin_memory=True)
    flat = torch.cat([k.flatten(), v.flatten()])
    host.copy_(flat)
    d2h = timed_seconds(lambda: host.copy_(flat), dev)[1]
    out["phases"] = {"build_s": total, "kmeans_s": sum(spent), "kmeans_calls": len(spent),
                     "kv_to_pinned_s": d2h, "kv_bytes": flat.numel() * flat.element_size()}
    print(f"  gpu_only build {1e3 * total:.1f} ms: k-means {1e3 * sum(spent):.1f} ms in {len(spent)} calls, the rest "
          f"{1e3 * (total - sum(spent)):.1f} ms; the KV to pinned host memory: {1e3 * d2h:.1f} ms "
          f"({flat.numel() * flat.element_size() / d2h / 1e9:.1f} GB/s)")
    del host, flat
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        GpuWaveLayer.build(k, v, cfg, device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            GpuWaveLayer.build(k, v, cfg, device=dev)
            torch.cuda.synchronize()
        print(f"  profiled gpu_only build: {time.perf_counter() - t0:.3f} s wall (profiler on)")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=25, max_name_column_width=60))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.json}")
    return out


if __name__ == "__main__":
    main()
