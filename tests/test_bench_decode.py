"""The decode / e2e benchmarks: the attention-like generator, the memory estimator, the references and the
report writers (CPU), plus the whole pipeline on a CUDA device (``gpu`` marker)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch

from kvstore import StoreConfig

from kvstore.attention.core import attention_with_lse
from kvstore.benchmarks import decode as bd
from kvstore.benchmarks import e2e
from kvstore.datasets.attention_like import (AttentionLikeSpec, attention_stats, decode_queries, generate_kv,
                                             rope)

SMALL = AttentionLikeSpec(num_kv_heads=2, num_q_heads=8, head_dim=64)
GiB = 1 << 30


# --- generator -------------------------------------------------------------------------------------------------
def test_generator_shapes_dtype_and_determinism():
    k, v = generate_kv(2, 3000, SMALL, seed=3)
    assert k.shape == v.shape == (2, 2, 3000, 64)
    assert k.dtype == v.dtype == torch.bfloat16
    assert torch.isfinite(k.float()).all() and torch.isfinite(v.float()).all()
    k2, v2 = generate_kv(2, 3000, SMALL, seed=3)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    k3, _ = generate_kv(2, 3000, SMALL, seed=4)
    assert not torch.equal(k, k3)
    assert not torch.equal(k[0], k[1])  # batch rows are different texts
    q = decode_queries(k, SMALL, num_sets=3, seed=3)
    assert q.shape == (3, 2, 8, 64) and q.dtype == torch.bfloat16
    assert torch.equal(q, decode_queries(k, SMALL, num_sets=3, seed=3))
    assert not torch.equal(q, decode_queries(k, SMALL, num_sets=3, seed=3, query_seed=99))
    assert decode_queries(k, SMALL, num_sets=1, seed=3, dtype=torch.float32).dtype == torch.float32


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch"):
        generate_kv(0, 100, SMALL)
    with pytest.raises(ValueError, match="head_dim"):
        AttentionLikeSpec(head_dim=63)
    with pytest.raises(ValueError, match="num_q_heads"):
        AttentionLikeSpec(num_kv_heads=3, num_q_heads=8)
    k, _ = generate_kv(1, 100, SMALL)
    with pytest.raises(ValueError, match="too short"):
        decode_queries(k[:, :, :50], SMALL)
    with pytest.raises(ValueError, match="heads"):
        decode_queries(k, AttentionLikeSpec())


def test_rope_is_a_rotation():
    x = torch.randn(3, 40, 64, dtype=torch.float64).float()
    pos = torch.arange(1_000_000, 1_000_040)
    y = rope(x, pos, 500000.0)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(rope(x, torch.zeros(40, dtype=torch.long), 500000.0), x)


@pytest.fixture(scope="module")
def small_layer():
    k, v = generate_kv(1, 16384, SMALL, seed=0)
    q = decode_queries(k, SMALL, num_sets=8, seed=0)
    return k, v, q


def test_generator_structure(small_layer):
    k, v, _ = small_layer
    kf, vf = k[0].float(), v[0].float()  # [H, N, d]
    d = SMALL.head_dim
    # outlier channels: the lowest-frequency RoPE pairs carry far more magnitude than the typical pair
    pair = torch.sqrt(kf[..., :d // 2] ** 2 + kf[..., d // 2:] ** 2).mean((0, 1))  # [d/2]
    out = pair[d // 2 - SMALL.n_outlier_pairs:]
    assert out.min() > 3 * pair[:d // 2 - SMALL.n_outlier_pairs].median()
    # sinks: distinctive keys, near-zero values
    assert vf[:, :SMALL.sink_tokens].norm(dim=-1).max() < 0.2 * vf[:, 100:].norm(dim=-1).median()
    # topic passages: neighbouring keys are far more alike than keys far apart
    kn = kf / kf.norm(dim=-1, keepdim=True)
    near = (kn[:, 100:8000] * kn[:, 101:8001]).sum(-1).mean()
    far = (kn[:, 100:8000] * kn[:, 8100:16000]).sum(-1).mean()
    assert near > far + 0.1


def test_decode_attention_is_peaked_and_heterogeneous(small_layer):
    k, _, q = small_layer
    st = attention_stats(q, k, sink=SMALL.sink_tokens, window=SMALL.window)
    assert set(st) == {"top_fraction_mass", "top_k_mass", "sink_mass", "window_mass", "entropy", "effective_support"}
    assert st["top_fraction_mass"]["median"] > 0.6  # most mass on 1% of the keys
    assert st["top_fraction_mass"]["p10"] < st["top_fraction_mass"]["p90"] - 0.2  # some heads diffuse
    assert st["sink_mass"]["p90"] > 0.1  # some heads lean on the sinks
    assert st["effective_support"]["median"] < 0.05
    for s in st.values():
        assert s["p10"] <= s["median"] <= s["p90"]


def test_attention_stats_of_uniform_attention():
    k = torch.randn(1, 2, 500, 16)
    q = torch.zeros(1, 4, 16)  # every score 0: uniform softmax
    st = attention_stats(q, k, sink=4, window=10, top_fraction=0.01, top_k=50)
    assert st["top_fraction_mass"]["median"] == pytest.approx(5 / 500, rel=1e-5)
    assert st["top_k_mass"]["median"] == pytest.approx(50 / 500, rel=1e-5)
    assert st["sink_mass"]["median"] == pytest.approx(4 / 500, rel=1e-5)
    assert st["window_mass"]["median"] == pytest.approx(10 / 500, rel=1e-5)
    assert st["entropy"]["median"] == pytest.approx(math.log(500), rel=1e-5)
    assert st["effective_support"]["median"] == pytest.approx(1.0, rel=1e-4)


# --- references --------------------------------------------------------------------------------------------------
def test_reference_attention_matches_float64():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 70, 16, generator=g).bfloat16()
    v = torch.randn(2, 3, 70, 16, generator=g).bfloat16()
    q = torch.randn(4, 2, 12, 16, generator=g).bfloat16()
    ref = bd.reference_attention(q, k, v)
    assert ref.shape == (4, 2, 12, 16) and ref.dtype == torch.float32
    G = 4
    kk = k.double().repeat_interleave(G, 1)  # [B, Hq, N, d]
    vv = v.double().repeat_interleave(G, 1)
    o64, _ = attention_with_lse(q.double().permute(1, 2, 0, 3), kk, vv)  # [B, Hq, S, d]
    err = bd.relative_errors(ref, o64.permute(2, 0, 1, 3))
    assert err.max() < 1e-5


def test_error_summary():
    e = torch.tensor([0.0, 0.1, 0.2, 0.3])
    s = bd.error_summary(e)
    assert s["error_median"] == pytest.approx(0.1, abs=0.051) and s["error_p99"] == pytest.approx(0.297, abs=1e-3)
    assert bd.error_summary(torch.tensor([0.1, float("nan")]))["error_p99"] == math.inf


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_chunked_causal_attention_is_exact(chunk, per_head):
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, N, d = 2, 2, 3, 45, 16
    q = torch.randn(B, Hkv * G, N, d, generator=g)
    k = torch.randn(B, Hkv, N, d, generator=g)
    v = torch.randn(B, Hkv, N, d, generator=g)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                            is_causal=True)
    got = bd.chunked_causal_attention(q, k, v, chunk, per_head=per_head)
    assert torch.allclose(got, want, atol=1e-5)
    inplace = q.clone()
    bd.chunked_causal_attention(inplace, k, v, chunk, out=inplace, per_head=per_head)
    assert torch.allclose(inplace, want, atol=1e-5)


def test_sdpa_decode_variants_agree_with_reference():
    k, v = generate_kv(1, 600, SMALL, dtype=torch.float32)
    q = decode_queries(k, SMALL, num_sets=1)
    ref = bd.reference_attention(q, k, v)[0]
    ran = 0
    for name, fn in bd.sdpa_decode_variants(k, v).items():
        try:
            o = fn(q[0])
        except RuntimeError:
            continue  # a backend this machine lacks
        ran += 1
        assert o.shape == (1, 8, 64), name
        assert bd.relative_errors(o, ref).max() < 1e-3, name
    assert ran >= 1


def test_time_calls_on_cpu():
    calls = []
    t = bd.time_calls(lambda i: calls.append(i), reps=5, warmup=2, device=torch.device("cpu"))
    assert len(t) == 5 and all(x >= 0 for x in t)
    assert calls == [0, 1, 0, 1, 2, 3, 4]


# --- memory estimator ------------------------------------------------------------------------------------------
def test_kv_bytes_llama3_layout():
    assert bd.kv_bytes(1, 131072) == 512 * (1 << 20)  # 2 x 8 heads x 128K x 128 x 2 bytes
    assert bd.kv_bytes(8, 1 << 20) == 32 * GiB


def test_estimate_memory():
    h100, host = 79 * GiB, 120 * GiB
    e = bd.estimate_memory(8, 131072, "gpu_only")
    assert e.kv_bytes == 4 * GiB
    assert e.gpu_peak_bytes > 2 * e.kv_bytes  # the benchmark's KV + the layer's sorted copy
    assert e.host_bytes == 0 and e.check(h100, host) == (True, "")
    off = bd.estimate_memory(8, 131072, "offload")
    assert off.host_bytes == off.kv_bytes and off.gpu_peak_bytes < e.gpu_peak_bytes
    assert off.parts["layer"] < 0.3 * off.kv_bytes
    for mode in ("gpu_only", "offload", "baseline"):
        assert bd.estimate_memory(32, 1 << 20, mode).check(h100, host)[0] is False  # 128 GiB of KV
    ok, why = bd.estimate_memory(32, 1 << 20, "gpu_only").check(h100, host)
    assert "GPU memory" in why and "KV 128.0 GiB" in why
    ok, why = bd.estimate_memory(8, 1 << 20, "offload").check(h100, 16 * GiB)
    assert not ok and "host memory" in why
    assert bd.estimate_memory(1, 1 << 20, "baseline", with_prefill=True).gpu_peak_bytes > \
        bd.estimate_memory(1, 1 << 20, "baseline").gpu_peak_bytes
    small = [bd.estimate_memory(b, 524288, "gpu_only").gpu_peak_bytes for b in (1, 8, 32)]
    assert small == sorted(small)
    with pytest.raises(ValueError, match="mode"):
        bd.estimate_memory(1, 1024, "nope")


def test_sizes():
    assert [bd.parse_size(s) for s in ("32768", "32K", "128k", "1M")] == [32768, 32768, 131072, 1 << 20]
    assert [bd.fmt_size(n) for n in (32768, 1 << 20, 1000)] == ["32K", "1M", "1000"]
    with pytest.raises(Exception):
        bd.parse_size("lots")


# --- command line --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mod, prog", [(bd, "kvstore bench decode"), (e2e, "kvstore bench e2e")])
def test_help(mod, prog, capsys):
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    assert f"usage: {prog}" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("mod", [bd, e2e])
def test_needs_cuda(mod, capsys, tmp_path):
    assert mod.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err
    assert not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="CUDA"):
        bd.require_cuda("x")


# --- reports ---------------------------------------------------------------------------------------------------------
def _row(context, batch, mode, speedup, err=0.01, status="ok", **kw):
    stat = {"median": 0.8, "p10": 0.3, "p90": 0.99}
    kv = bd.kv_bytes(batch, context)
    row = {"context": context, "batch": batch, "mode": mode, "status": status, "note": "", "kv_bytes": kv,
           "sdpa_ms": 1.0, "sdpa_backend": "gqa_flash", "kvstore_ms": 1.0 / speedup, "speedup": speedup,
           "error_median": err, "error_p99": 4 * err, "gpu_bytes": kv // 5, "gpu_kv_bytes": kv // 10,
           "gpu_kv_fraction": 0.1, "alloc_delta_bytes": kv // 5, "hit_ratio": 0.9 if mode == "offload" else None,
           "read_fraction": 0.05, "build_s": 0.2, "prefill_s": 10.0, "build_over_prefill": 0.02,
           "oracle_error_median": 0.008, "oracle_error_p99": 0.03, "ratio_to_oracle": err / 0.008,
           "attention": {n: stat for n in ("top_fraction_mass", "top_k_mass", "sink_mass", "window_mass",
                                           "entropy", "effective_support")}}
    row.update(kw)
    return row


FAKE = [_row(131072, 8, "gpu_only", 9.5), _row(131072, 8, "offload", 2.5), _row(131072, 8, "store", 8.0),
        _row(1 << 20, 1, "gpu_only", 25.0, err=0.06), _row(1 << 20, 8, "offload", 4.0),
        _row(1 << 20, 8, "gpu_only", 1.0, status="skipped", note="needs ~90 GiB"),
        _row(32768, 1, "graph_split", 0.5, build_over_prefill=3.0)]


def test_check_targets():
    t = {x["target"]: x for x in bd.check_targets(FAKE)}
    assert t["gpu_only 128K batch 8 >= 6x SDPA"]["met"] is True
    assert t["gpu_only 1M batch 1 >= 6x SDPA"]["value"] == 25.0
    assert t["gpu_only 128K batch 8: median error <= 2x the oracle at equal bytes"]["met"] is True   # 0.01 / 0.008
    assert t["gpu_only 1M batch 1: median error <= 2x the oracle at equal bytes"]["met"] is False    # 0.06 / 0.008
    assert t["KVStore.attend 128K batch 8 >= 5x SDPA"]["met"] is True
    assert t["KVStore.attend 128K batch 8 within 10% of the bare layer"]["met"] is False              # 9.5x vs 8x
    assert t["KVStore.attend 1M batch 1 >= 5x SDPA"]["met"] is None
    assert t["offload (<= 10% of KV on GPU) >= 3x at 128K batch 8"]["met"] is False
    assert t["offload >= 4x at 1M batch 8"]["met"] is True
    assert t["index build <= 5% of prefill at 128K"]["met"] is True  # the graph row is not a wave row
    none = {x["target"]: x["met"] for x in bd.check_targets([])}
    assert set(none.values()) == {None}
    over = [_row(131072, 8, "offload", 5.0, gpu_kv_fraction=0.2)]
    assert {x["target"]: x for x in bd.check_targets(over)}[
        "offload (<= 10% of KV on GPU) >= 3x at 128K batch 8"]["met"] is False


def test_report_writes_json_markdown_and_plot(tmp_path):
    env = {"torch": torch.__version__, "python": "3", "device": "cuda:0", "gpu": "NVIDIA H100"}
    md = bd.report(FAKE, env, {"reps": 50, "query_sets": 8, "warmup": 10}, tmp_path, 12.0)
    data = json.loads((tmp_path / "decode.json").read_text())
    assert len(data["rows"]) == len(FAKE) and len(data["targets"]) == 14
    text = (tmp_path / "decode.md").read_text()
    assert "| context | batch | mode | kvstore ms |" in text and "| 128K | 8 | gpu_only | 0.105 |" in text
    assert "9.5x" in text and "Not measured" in text and "needs ~90 GiB" in text
    assert "### Goals" in text and "### Generated attention" in text
    assert md.strip() in text
    png = (tmp_path / "decode.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_sections_keep_each_other(tmp_path):
    path = tmp_path / "decode.md"
    bd.write_section(path, "decode", "decode v1")
    bd.write_section(path, "e2e", "e2e v1")
    bd.write_section(path, "decode", "decode v2")
    text = path.read_text()
    assert "decode v2" in text and "e2e v1" in text and "decode v1" not in text
    assert text.index("decode v2") < text.index("e2e v1")


def test_e2e_table():
    res = [{"method": "full", "batch": 2, "context": 131072, "status": "ok", "prefill_s": 20.0, "tokens_per_s": 10.0,
            "ms_per_step": 200.0, "peak_gpu_bytes": 70 * GiB, "tried": [{"batch": 4, "outcome": "out of memory"},
                                                                       {"batch": 2, "outcome": "ok"}]},
           {"method": "kvstore", "batch": 4, "context": 131072, "status": "ok", "prefill_s": 25.0,
            "tokens_per_s": 80.0, "ms_per_step": 50.0, "peak_gpu_bytes": 60 * GiB, "tried": []},
           {"method": "kvstore-offload", "batch": None, "context": 131072, "status": "oom", "tried": []}]
    md = e2e.table(res, "t")
    assert "| full | 2 | 128K | 20.00 | 10.0 | 200.0 | 1.00x | 70.0 GiB | 4: out of memory, 2: ok |" in md
    assert "| kvstore | 4 | 128K | 25.00 | 80.0 | 50.0 | 8.00x |" in md
    assert "| kvstore-offload | - |" in md


def test_llama3_config():
    pytest.importorskip("transformers")
    c = e2e.llama3_8b_config(layers=4, max_positions=200_000)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (4096, 4, 32, 8)
    assert (c.intermediate_size, c.vocab_size, c.head_dim) == (14336, 128256, 128)
    assert c.max_position_embeddings >= 200_000
    theta = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
    assert theta["rope_theta"] == 500000.0


@pytest.mark.slow
def test_e2e_runs_a_tiny_llama_on_cpu():
    """The e2e loop (prefill, warm-up, timed steps) with both caches on a tiny random Llama on the CPU."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=128, vocab_size=500, max_position_embeddings=2048)
    res = e2e.run(cfg, ["full", "kvstore"], [2, 1], 300, 3, torch.device("cpu"), warmup_steps=1)
    assert [r["method"] for r in res] == ["full", "kvstore"]
    for r in res:
        assert r["status"] == "ok" and r["batch"] == 2
        assert r["final_length"] == 300 + 1 + 3  # prompt, warm-up step, timed steps
        assert r["tokens_per_s"] > 0 and r["prefill_s"] > 0
    assert res[0]["store_config"] is None  # full attention: a DynamicCache
    assert res[1]["store_config"] == StoreConfig().to_dict()  # KVStoreCache(model.config): the defaults


def test_e2e_runs_the_defaults(tmp_path, monkeypatch):
    """kvstore methods run KVStoreCache(model.config), the StoreConfig defaults; e2e.json and decode.md say so."""
    assert e2e.STORE_OPTIONS == {}
    res = [{"method": "kvstore", "batch": 1, "context": 1024, "status": "ok", "prefill_s": 1.0, "tokens_per_s": 8.0,
            "ms_per_step": 125.0, "peak_gpu_bytes": None, "tried": [], "store_config": StoreConfig().to_dict()}]
    monkeypatch.setattr(e2e, "require_cuda", lambda what: None)
    monkeypatch.setattr(e2e, "run", lambda *a, **kw: res)
    monkeypatch.setattr(e2e, "environment", lambda device: {"device": str(device)})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert e2e.main(["--context", "1K", "--layers", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert data["store_options"] == {}
    assert data["results"][0]["store_config"]["candidates"] == StoreConfig().candidates
    assert "KVStoreCache(model.config): the StoreConfig defaults" in (tmp_path / "decode.md").read_text()


def _wave_ops_present() -> bool:
    return all(importlib.util.find_spec(f"kvstore.gpu.{m}") is not None
               for m in ("kmeans", "cluster_ops", "attention_ops"))


@pytest.mark.slow
def test_decode_pipeline_cpu_smoke(tmp_path):
    """The whole sweep on the CPU at a tiny context (--device cpu): data, baselines, layers, reports."""
    rc = bd.main(["--device", "cpu", "--contexts", "1024", "--batches", "1", "--reps", "2", "--warmup", "1",
                  "--query-sets", "2", "--graph-train-queries", "8", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert {r["mode"] for r in rows} == {"gpu_only", "offload", "store", "graph_split"}
    for r in rows:
        assert r["sdpa_error_median"] < 1e-2, r
        if r["mode"] == "graph_split" or _wave_ops_present():
            assert r["status"] == "ok", r["note"]
            assert r["kvstore_ms"] > 0 and r["error_median"] < 0.5 and r["build_s"] > 0
    assert (tmp_path / "decode.png").exists()


# --- GPU ---------------------------------------------------------------------------------------------------------
def _cuda_ready() -> bool:
    from kvstore.gpu import has_cuda_ext

    return torch.cuda.is_available() and has_cuda_ext()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_on_gpu_matches_structure():
    spec = dataclasses.replace(AttentionLikeSpec())
    k, v = generate_kv(2, 40000, spec, device="cuda", seed=0)
    assert k.is_cuda and k.shape == (2, 8, 40000, 128)
    q = decode_queries(k, spec, num_sets=4)
    st = attention_stats(q, k)
    assert st["top_fraction_mass"]["median"] > 0.6
    k2, _ = generate_kv(2, 40000, spec, device="cuda", seed=0)
    assert torch.equal(k, k2)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and kvstore._cuda")
def test_decode_benchmark_on_gpu(tmp_path):
    rc = bd.main(["--contexts", "32K", "--batches", "1", "--reps", "10", "--warmup", "3", "--query-sets", "4",
                  "--methods", "wave", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert {r["mode"] for r in rows} == {"gpu_only", "offload", "store"}
    for r in rows:
        assert r["status"] == "ok", r["note"]
        assert r["sdpa_error_median"] < 1e-2 and r["sdpa_ms"] > 0 and r["kvstore_ms"] > 0
        assert math.isfinite(r["error_median"]) and r["build_s"] > 0 and r["prefill_s"] > 0
        assert r["gpu_bytes"] > 0
    off = next(r for r in rows if r["mode"] == "offload")
    assert off["gpu_kv_fraction"] < 0.2 and off["hit_ratio"] is not None


def test_wave_options_reach_the_layer_config_and_the_report(tmp_path):
    a = bd.build_parser().parse_args(["--estimator", "fs_iso", "--retrieval", "0.05", "--estimation", "0.116",
                                      "--preset", "retroinfer", "--distribution", "flat"])
    assert (a.estimator, a.retrieval, a.estimation, a.preset, a.distribution) == ("fs_iso", 0.05, 0.116,
                                                                                    "retroinfer", "flat")
    cfg = bd._wave_config("gpu_only", bd.Options(estimator="fs_iso", retrieval=0.05, estimation=0.116))
    assert (cfg.estimator, cfg.retrieval, cfg.estimation, cfg.candidates) == ("fs_iso", 0.05, 0.116,
                                                                             StoreConfig().candidates)
    ri = bd._wave_config("offload", bd.Options(preset="retroinfer"))
    assert (ri.mode, ri.tokens_per_cluster, ri.calibrate) == ("offload", 16, False)
    env = {"torch": torch.__version__, "python": "3", "device": "cuda:0", "gpu": "NVIDIA H100"}
    bd.report(FAKE, env, {"reps": 50, "query_sets": 8, "warmup": 10, "estimator": "fs_iso", "retrieval": 0.05,
                          "estimation": 0.116, "preset": "defaults"}, tmp_path, 1.0)
    assert "wave: StoreConfig defaults (retrieval 0.05, estimation 0.116), estimator fs_iso" in \
        (tmp_path / "decode.md").read_text()
    with pytest.raises(SystemExit):
        bd.build_parser().parse_args(["--estimator", "magic"])
