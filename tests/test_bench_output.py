"""Where the benchmarks write (kvstore.benchmarks._output), how they report it, and their plots."""
from __future__ import annotations

import json
import pathlib
import sys

import pytest

import kvstore
from kvstore.benchmarks import _output
from kvstore.benchmarks._output import Results, default_dir, plot_or_note
from kvstore.benchmarks.reuse import ratio_text


def test_default_folder_is_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(_output.RESULTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_dir("recall") == tmp_path / "kvstore-results" / "recall"
    package = pathlib.Path(kvstore.__file__).resolve().parent
    assert package not in default_dir("recall").resolve().parents


def test_results_env_moves_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv(_output.RESULTS_ENV, str(tmp_path / "r"))
    assert Results("decode").dir == tmp_path / "r" / "decode"
    assert Results("decode", out=tmp_path / "x").dir == tmp_path / "x"   # --out wins


def test_report_lists_what_was_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.md").write_text("kept")
    res = Results("x", out="out")
    res.write_json("a.json", {"k": 1})
    res.write_text("b.md", "text")
    (res.dir / "c.md").write_text("written by other code")
    assert json.loads((tmp_path / "out" / "a.json").read_text()) == {"k": 1}
    files = res.report()
    out = capsys.readouterr().out
    assert [p.name for p in files] == ["a.json", "b.md", "c.md"]
    assert "wrote 3 files in out/" in out and "out/a.json" in out and "old.md" not in out


def test_nothing_written_creates_no_folder(tmp_path, capsys):
    res = Results("x", out=tmp_path / "never")
    assert res.report() == []
    assert not (tmp_path / "never").exists()
    assert "no files written" in capsys.readouterr().out


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib raises ModuleNotFoundError
    res = Results("x", out=tmp_path)
    res.write_text("r.md", "the table")

    def draw(path):
        _output.pyplot()

    assert res.plot("r.png", draw) is None
    assert "kvstore[bench]" in capsys.readouterr().out
    assert [p.name for p in res.written()] == ["r.md"]


def test_other_import_errors_in_a_plot_propagate(tmp_path):
    def draw(path):
        raise ModuleNotFoundError("no module named nope", name="nope")

    with pytest.raises(ModuleNotFoundError):
        plot_or_note(draw, tmp_path / "p.png")


def test_log_axes_get_plain_labels(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import ticker

    plt = _output.pyplot()
    fig, (a, b) = plt.subplots(1, 2)
    a.plot([1, 30], [0.03, 0.3])
    a.set_xscale("log")
    a.set_yscale("log")
    b.plot([1024, 8192], [1, 2])
    b.set_xscale("log", base=2)
    b.set_xticks([1024, 8192], ["1K", "8K"])
    axes = fig.axes
    _output.save_plot(fig, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    assert isinstance(axes[0].yaxis.get_major_formatter(), ticker.FuncFormatter)
    assert isinstance(axes[0].xaxis.get_minor_formatter(), ticker.NullFormatter)
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["1K", "8K"]   # explicit labels kept


@pytest.mark.parametrize("fresh, saved, text", [(14.2, 18.1, "1.3x slower"), (14.2, 1.2, "12x faster"),
                                                (10.0, 10.0, "1.0x faster"), (250.0, 1.0, "250x faster")])
def test_reuse_ratio_text(fresh, saved, text):
    assert ratio_text(fresh, saved) == text


def test_recall_run_writes_and_reports(tmp_path, capsys):
    from kvstore.benchmarks import recall

    assert recall.main(["--data", "generated", "--n-keys", "2000", "--n-train", "2000", "--max-test", "16",
                        "--k", "10", "--indexes", "Graph", "Wave", "--out", str(tmp_path), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "recall_generated_2000.json").read_text())
    assert set(doc["summary"]) == {"Graph32", "Wave16"}
    out = capsys.readouterr().out
    assert "recall_generated_2000.json" in out and "recall_generated_2000.md" in out
