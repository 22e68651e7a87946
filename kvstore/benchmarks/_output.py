"""Where the benchmarks write their results, and telling the user what they wrote.

A command writes into ``--out`` when it is given, otherwise into ``$KVSTORE_RESULTS/<command>`` or, without that
variable, ``./kvstore-results/<command>`` under the current directory. A run from a clone of the repository
therefore never overwrites the committed results in ``docs/`` and ``bench/results/``; regenerating those takes
``--out docs`` (or ``--out bench/results``) on purpose. When it is done, a command prints every file it wrote
(:meth:`Results.report`).

Plots need matplotlib (the ``kvstore[bench]`` extra). Without it, :meth:`Results.plot` and :func:`plot_or_note`
print one line that names the extra, and the command still writes its JSON and markdown.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
from typing import Any, Callable

__all__ = ["RESULTS_ENV", "DEFAULT_FOLDER", "PlotUnavailable", "Results", "add_out_argument", "default_dir",
           "plot_or_note", "pyplot", "save_plot"]

RESULTS_ENV = "KVSTORE_RESULTS"
DEFAULT_FOLDER = "kvstore-results"


def default_dir(command: str) -> pathlib.Path:
    """``$KVSTORE_RESULTS/<command>``, or ``./kvstore-results/<command>``."""
    root = os.environ.get(RESULTS_ENV)
    return (pathlib.Path(root) if root else pathlib.Path.cwd() / DEFAULT_FOLDER) / command


def add_out_argument(parser: argparse.ArgumentParser, command: str) -> None:
    """``--out DIR`` (default None: :func:`default_dir` of ``command``)."""
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"output folder (default: ${RESULTS_ENV}/{command}, or ./{DEFAULT_FOLDER}/{command})")


def _shown(path: pathlib.Path) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(pathlib.Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _files(folder: pathlib.Path) -> dict[pathlib.Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


class Results:
    """One command's output folder. The folder is created on the first write; :meth:`report` prints what the
    command wrote there (files that are new or changed since this object was made)."""

    def __init__(self, command: str, out: str | os.PathLike | None = None) -> None:
        self.command = command
        self.dir = pathlib.Path(out) if out is not None else default_dir(command)
        self._before = _files(self.dir)

    def folder(self) -> pathlib.Path:
        """The output folder, created."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir

    def path(self, name: str) -> pathlib.Path:
        """``<dir>/<name>``, with the folder created."""
        return self.folder() / name

    def write_text(self, name: str, text: str) -> pathlib.Path:
        path = self.path(name)
        path.write_text(text)
        return path

    def write_json(self, name: str, obj: Any, **dumps_kwargs: Any) -> pathlib.Path:
        return self.write_text(name, json.dumps(obj, **{"indent": 1, **dumps_kwargs}))

    def plot(self, name: str, draw: Callable[[pathlib.Path], Any]) -> pathlib.Path | None:
        """``draw(path)`` writes the figure (see :func:`plot_or_note`)."""
        return plot_or_note(draw, self.path(name))

    def written(self) -> list[pathlib.Path]:
        now = _files(self.dir)
        return sorted(p for p, mtime in now.items() if self._before.get(p) != mtime)

    def report(self) -> list[pathlib.Path]:
        """Print the files written (or that none were) and return them."""
        files = self.written()
        if not files:
            print("no files written")
        else:
            print(f"wrote {len(files)} file{'s' if len(files) > 1 else ''} in {_shown(self.dir)}/")
            for p in files:
                print(f"  {_shown(p)}")
        return files


# --- plots ---------------------------------------------------------------------------------------------------------
class PlotUnavailable(ModuleNotFoundError):
    """matplotlib is not installed."""


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend; :class:`PlotUnavailable` (naming the
    ``kvstore[bench]`` extra) when matplotlib is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise PlotUnavailable("matplotlib is not installed: pip install 'kvstore[bench]' for the plots",
                              name="matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_or_note(draw: Callable[[pathlib.Path], Any], path: pathlib.Path) -> pathlib.Path | None:
    """Run ``draw(path)``; without matplotlib print one line instead and return None."""
    try:
        draw(path)
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        print(f"no plot {path.name}: matplotlib is not installed (pip install 'kvstore[bench]')")
        return None
    return path


def _tidy_log_axis(axis: Any) -> None:
    """Plain-number labels at 1-2-5 steps on a log axis still on matplotlib's default labels (which print
    ``2 x 10^-1`` at every minor tick and overlap on narrow panels). Axes given explicit labels are kept."""
    from matplotlib import ticker

    if axis.get_scale() != "log" or not isinstance(axis.get_major_formatter(), ticker.LogFormatter):
        return
    lo, hi = sorted(axis.get_view_interval())
    decades = math.log10(hi / lo) if lo > 0 and hi > 0 else 3.0
    subs = (1.0, 2.0, 3.0, 5.0) if decades <= 1 else (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def save_plot(fig: Any, path: pathlib.Path, dpi: int = 120) -> pathlib.Path:
    """Write ``fig`` to ``path`` (log axes with readable labels, see :func:`_tidy_log_axis`) and close it."""
    for ax in fig.axes:
        _tidy_log_axis(ax.xaxis)
        _tidy_log_axis(ax.yaxis)
    if not fig.get_constrained_layout():
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
