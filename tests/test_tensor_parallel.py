"""Tensor parallelism: a KVStoreCache on each rank of a model sharded by transformers' own tensor parallelism.

Two real processes (``torch.multiprocessing`` spawn, gloo on the CPU) load tiny random-weight Llama and Qwen2
models with ``from_pretrained(..., distributed_config=DistributedConfig(tp_size=2))`` (the model's
``base_model_tp_plan``: q/k/v colwise, o_proj rowwise), so each rank's attention sees one of the two KV heads.
With full budgets the greedy tokens equal the single-process sdpa run; a context saved on both ranks (a file per
rank and a manifest) continues to the same tokens; a world size, sharding or shard file that differs is refused.
All the distributed work runs once per module (one spawn, both models); the tests check its results.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvstore import StoreConfig  # noqa: E402
from kvstore.integrations.transformers import KVStoreCache, shard_path  # noqa: E402

FULL = dict(method="wave", candidates=1.0, retrieval=1.0, estimation=0, candidate_dtype="kv")   # exact: every key is attended
WORLD = 2
KINDS = ("llama", "qwen2")
NEW = 12


def _unavailable() -> str | None:
    """Why this machine cannot run the test, or None."""
    dist = torch.distributed
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this build"
    try:
        from transformers.distributed import DistributedConfig  # noqa: F401
    except ImportError:
        return f"transformers {transformers.__version__} has no DistributedConfig (native tensor parallelism)"
    accel = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accel is not None:
        return (f"transformers shards over the machine's accelerator ({accel.type}); this test runs the CPU/gloo "
                f"path")
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))


def config(kind: str):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
                  pad_token_id=0)
    return transformers.LlamaConfig(**common) if kind == "llama" else transformers.Qwen2Config(**common)


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    sizes = {"prompt": (2, 160), "doc": (1, 120), "question": (1, 8), "other": (1, 40)}
    return {name: torch.randint(1, 128, size, generator=g) for name, size in sizes.items()}


def generate(model, ids, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str) -> None:
    """One rank: shard each model with transformers' tensor parallelism, generate, save, load, continue; the
    results go to ``root/rank{rank}.pt``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    from transformers.distributed import DistributedConfig

    data, out = inputs(), {}
    try:
        for kind in KINDS:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.join(root, kind), distributed_config=DistributedConfig(tp_size=WORLD),
                attn_implementation="kvstore").eval()
            r: dict = {"k_proj_rows": model.model.layers[0].self_attn.k_proj.weight.to_local().shape[0]}
            cache = KVStoreCache(model.config, StoreConfig(**FULL))
            with _counting_collectives() as calls:
                r["tokens"] = generate(model, data["prompt"], cache=cache)
            r["collectives"] = calls
            r["store_heads"] = cache.store.num_kv_heads
            r["shard"] = cache.store.fingerprint["shard"]
            if kind == "llama":
                r["default_cache"] = generate(model, data["prompt"], cache_config=FULL)  # generate builds the cache
                model.set_attn_implementation("sdpa")                   # the model's own attention and cache
                with _counting_collectives() as calls:
                    r["sdpa_tokens"] = generate(model, data["prompt"])
                r["sdpa_collectives"] = calls
                model.set_attn_implementation("kvstore")
            # a document prefilled once, saved by both ranks, continued from the files
            path = os.path.join(root, f"{kind}-doc.kvstore")
            doc = KVStoreCache(model.config, StoreConfig(**FULL))
            with torch.no_grad():
                model(data["doc"], cache=doc)
            doc.save(path)
            saved = KVStoreCache.from_saved(path, model.config)
            r["loaded_length"] = saved.get_seq_length()
            r["continued"] = generate(model, torch.cat([data["doc"], data["question"]], 1), cache=saved)
            if kind == "llama":
                r["refusals"] = _refusals(rank, root, model, path, data)
            out[kind] = r
            del model
    finally:
        torch.save(out, os.path.join(root, f"rank{rank}.pt"))
        dist.destroy_process_group()


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "gather", "scatter", "reduce",
               "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv")


@contextlib.contextmanager
def _counting_collectives():
    """Counts the calls of torch.distributed's collectives and point-to-point functions (the real ones run)."""
    dist, calls, real = torch.distributed, {}, {}
    for name in COLLECTIVES:
        real[name] = fn = getattr(dist, name)

        def counted(*a, _name=name, _fn=fn, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **kw)

        setattr(dist, name, counted)
    try:
        yield calls
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def _message(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _refusals(rank: int, root: str, model, path: str, data: dict) -> dict[str, str]:
    """The error messages of continuing a sharded context where its sharding does not hold."""
    got = {}
    # the same world, a model that is not sharded: every rank's attention holds both KV heads
    whole = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(root, "llama"),
                                                              attn_implementation="kvstore").eval()
    cache = KVStoreCache.from_saved(path, whole.config)
    got["unsharded model"] = _message(lambda: generate(whole, torch.cat([data["doc"], data["question"]], 1),
                                                       cache=cache))
    # a shard rewritten by a later save whose manifest went elsewhere
    other = os.path.join(root, "other.kvstore")
    cache = KVStoreCache(model.config, StoreConfig(**FULL))
    with torch.no_grad():
        model(data["other"], cache=cache)
    cache.save(other)
    os.replace(shard_path(other, rank, WORLD), shard_path(path, rank, WORLD))
    got["rewritten shard"] = _message(lambda: KVStoreCache.from_saved(path, model.config))
    # a save that fails on one rank (rank 1's cache holds nothing) fails on both, and writes no manifest
    failing = os.path.join(root, "failing.kvstore")
    try:
        (cache if rank == 0 else KVStoreCache(model.config, StoreConfig(**FULL))).save(failing)
        got["failed save"] = "no error"
    except RuntimeError as e:
        got["failed save"] = str(e)
    got["failed save wrote a manifest"] = os.path.exists(failing)
    return got


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Save both random-weight models, spawn the two ranks once, and return (root, single-process sdpa tokens,
    per-rank results)."""
    root = tmp_path_factory.mktemp("tp")
    data, reference = inputs(), {}
    for kind in KINDS:
        torch.manual_seed(0)
        cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
        model = cls(config(kind)).eval()
        model.save_pretrained(root / kind)
        model.set_attn_implementation("sdpa")
        reference[kind] = {"tokens": generate(model, data["prompt"]),
                           "continued": generate(model, torch.cat([data["doc"], data["question"]], 1))}
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]
    return root, reference, ranks


@pytest.mark.parametrize("kind", KINDS)
def test_each_rank_stores_and_attends_its_own_kv_heads(run, kind):
    _, _, ranks = run
    for rank, r in enumerate(ranks):
        res = r[kind]
        assert res["k_proj_rows"] == 16          # transformers sharded k_proj: one of the two 16-dim KV heads
        assert res["store_heads"] == 1           # from the key states, not config.num_key_value_heads (2)
        assert res["shard"] == {"rank": rank, "world_size": WORLD, "kv_heads": [rank, rank + 1]}


@pytest.mark.parametrize("kind", KINDS)
def test_tensor_parallel_greedy_generation_equals_the_single_process_run(run, kind):
    _, reference, ranks = run
    for r in ranks:
        assert torch.equal(r[kind]["tokens"], reference[kind]["tokens"])


def test_decoding_adds_no_cross_rank_traffic(run):
    """Each rank attends its own KV heads: generating through kvstore makes exactly the collective calls the
    model makes with its own attention and cache (transformers' row-parallel all-reduces), and the same tokens;
    so does the KVStoreCache that generate builds when given no cache."""
    _, reference, ranks = run
    for r in ranks:
        res = r["llama"]
        assert res["sdpa_collectives"].get("all_reduce", 0) > 0      # the counting sees the model's traffic
        assert res["collectives"] == res["sdpa_collectives"]
        assert torch.equal(res["sdpa_tokens"], reference["llama"]["tokens"])
        assert torch.equal(res["default_cache"], reference["llama"]["tokens"])


@pytest.mark.parametrize("kind", KINDS)
def test_saved_shards_continue_like_the_single_process_run(run, kind):
    root, reference, ranks = run
    path = root / f"{kind}-doc.kvstore"
    assert path.is_file() and all(os.path.isfile(shard_path(path, r, WORLD)) for r in range(WORLD))
    from kvstore._fileformat import read_container

    kind_, meta, _ = read_container(path)
    assert kind_ == "kvstore_tp_manifest" and meta["world_size"] == WORLD
    assert [s["kv_heads"] for s in meta["shards"]] == [[0, 1], [1, 2]]
    for r in ranks:
        assert r[kind]["loaded_length"] == 120
        assert torch.equal(r[kind]["continued"], reference[kind]["continued"])


def test_a_sharded_context_is_refused_where_its_sharding_does_not_hold(run):
    root, _, ranks = run
    for rank, r in enumerate(ranks):
        msgs = r["llama"]["refusals"]
        assert "the key states have 2 KV heads, the store holds 1" in msgs["unsharded model"]
        assert f"KV heads [{rank}, {rank + 1}) of 2, rank {rank} of 2" in msgs["unsharded model"]
        assert "is not the shard" in msgs["rewritten shard"] and "SHA-256" in msgs["rewritten shard"]
        assert ("rank 1 failed (RuntimeError: KVStoreCache.save: the cache holds no tokens yet); no manifest was "
                "written" if rank == 0 else "the cache holds no tokens yet") in msgs["failed save"]
        assert msgs["failed save wrote a manifest"] is False
    cfg = transformers.AutoConfig.from_pretrained(root / "qwen2")   # the name the ranks' models had
    path = root / "qwen2-doc.kvstore"
    # another world size: this process is not distributed at all
    with pytest.raises(ValueError, match=r"world_size=2, torch.distributed is not initialised"):
        KVStoreCache.from_saved(path, cfg)
    # one rank's file on its own
    with pytest.raises(ValueError, match=r"one shard of a tensor-parallel context \(KV heads \[1, 2\) of 2, rank 1"):
        KVStoreCache.from_saved(shard_path(path, 1, WORLD), cfg)
    # another model
    cfg.num_hidden_layers = 3
    with pytest.raises(ValueError, match="num_hidden_layers: saved 2, this model 3"):
        KVStoreCache.from_saved(shard_path(path, 1, WORLD), cfg)


def test_the_documented_benchmark_runs_under_torchrun(tmp_path):
    """docs/tensor_parallel.md's benchmark script, run as its CPU check says: torchrun, 2 ranks, gloo."""
    import json
    import pathlib
    import re
    import shlex
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    text = (root / "docs" / "tensor_parallel.md").read_text()
    script = next(b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if "argparse" in b)
    command = next(line for b in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
                   for line in b.splitlines() if "--hidden 256" in line)
    argv = shlex.split(command)
    assert argv[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"] and argv[4] == "tp_bench.py"
    (tmp_path / "tp_bench.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in rows] == ["full", "kvstore"]
    for r in rows:
        assert r["tp_size"] == 2 and r["final_length"] == 512 + 2 + 8 and r["tokens_per_s"] > 0
