"""Saved stores: round trips for every method, refusal of foreign/corrupt files,
interrupted saves keep the previous copy."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import kvstore
from kvstore import KVStore, StoreConfig
from kvstore._fileformat import CorruptFileError

METHODS = ["wave", "graph", "quest", "streaming", "full"]


def filled_store(method: str, dtype=torch.float32, seed=0) -> tuple[KVStore, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = StoreConfig(method=method, window=16, update_interval=32, tokens_per_cluster=8, top_k=20)
    store = KVStore(2, 2, 32, cfg, fingerprint={"model": "test", "layers": 2})
    k = torch.randn(2, 2, 200, 32, generator=g).to(dtype)
    v = torch.randn(2, 2, 200, 32, generator=g).to(dtype)
    q = torch.randn(2, 6, 200, 32, generator=g).to(dtype)
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[1, :30] = False
    store.prefill(0, k, v, q=q, mask=mask)
    store.prefill(1, k, v, q=q, mask=mask)
    for _ in range(40):
        store.append(0, torch.randn(2, 2, 1, 32, generator=g).to(dtype), torch.randn(2, 2, 1, 32, generator=g).to(dtype))
    return store, torch.randn(2, 6, 1, 32, generator=g).to(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_identical(tmp_path, method, mmap):
    store, q = filled_store(method, torch.bfloat16 if method == "wave" else torch.float32)
    path = tmp_path / "s.kvstore"
    store.save(path)
    back = KVStore.load(path, fingerprint={"model": "test", "layers": 2}, mmap=mmap)
    assert back.config == store.config and back.seq_lengths(0) == store.seq_lengths(0)
    for layer in (0, 1):
        assert torch.equal(back.attend(layer, q), store.attend(layer, q))
    # both continue the same way
    kt, vt = torch.randn(2, 2, 1, 32).to(q.dtype), torch.randn(2, 2, 1, 32).to(q.dtype)
    store.append(0, kt, vt)
    back.append(0, kt, vt)
    assert torch.equal(back.attend(0, q), store.attend(0, q))
    assert back.stats()["layers"][1]["tokens"] == store.stats()["layers"][1]["tokens"]


def test_refuses_other_model_and_foreign_files(tmp_path):
    store, _ = filled_store("wave")
    path = tmp_path / "s.kvstore"
    store.save(path)
    with pytest.raises(ValueError, match="different model"):
        KVStore.load(path, fingerprint={"model": "other", "layers": 2})
    idx = kvstore.FlatIndex(4)
    idx.add(np.ones((3, 4), np.float32))
    idx.save(tmp_path / "flat.kvs")
    with pytest.raises(ValueError, match="not a saved KVStore"):
        KVStore.load(tmp_path / "flat.kvs")
    (tmp_path / "junk").write_bytes(os.urandom(4096))
    with pytest.raises(CorruptFileError, match="junk"):
        KVStore.load(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="missing"):
        KVStore.load(tmp_path / "missing")


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99])
def test_truncated_or_altered_store_refused(tmp_path, cut):
    store, _ = filled_store("graph")
    path = tmp_path / "s.kvstore"
    store.save(path)
    good = path.read_bytes()
    path.write_bytes(good[: int(len(good) * cut)])
    with pytest.raises(CorruptFileError, match="s.kvstore"):
        KVStore.load(path)
    bad = bytearray(good)
    bad[int(len(bad) * cut)] ^= 0x10
    path.write_bytes(bytes(bad))
    with pytest.raises(CorruptFileError, match="s.kvstore"):
        KVStore.load(path)


def test_failed_save_keeps_previous_copy(tmp_path, monkeypatch):
    store, q = filled_store("quest")
    path = tmp_path / "s.kvstore"
    store.save(path)
    before = path.read_bytes()
    store.append(0, torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32))
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        store.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.kvstore"]


def test_killed_save_keeps_previous_copy(tmp_path):
    """A process killed in the middle of saving a large store leaves the old file loadable."""
    path = tmp_path / "s.kvstore"
    small, q = filled_store("full")
    small.save(path)
    script = textwrap.dedent(f"""
        import torch, kvstore
        s = kvstore.KVStore(4, 8, 128, kvstore.StoreConfig(method="full"))
        for layer in range(4):
            k = torch.randn(1, 8, 30000, 128)
            s.prefill(layer, k, k)
        print("saving", flush=True)
        while True:
            s.save({str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    back = KVStore.load(path)  # either the old copy or a complete new one, never a torn file
    assert back.num_layers in (2, 4)
    if back.num_layers == 2:
        assert torch.equal(back.attend(0, q), small.attend(0, q))


def test_check_finite_is_saved_and_old_files_load_with_the_default(tmp_path, monkeypatch):
    store, q = filled_store("quest")
    store.config.check_finite = False
    path = tmp_path / "s.kvstore"
    store.save(path)
    assert KVStore.load(path).config.check_finite is False
    # a file saved before check_finite existed: its config has no such key
    to_dict = StoreConfig.to_dict
    monkeypatch.setattr(StoreConfig, "to_dict",
                        lambda self: {k: v for k, v in to_dict(self).items() if k != "check_finite"})
    store.save(path)
    monkeypatch.undo()
    back = KVStore.load(path)
    assert back.config.check_finite is True
    assert back.config == StoreConfig(**{**store.config.to_dict(), "check_finite": True})
    assert torch.equal(back.attend(0, q), store.attend(0, q))
