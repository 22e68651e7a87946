"""The code examples of docs/ run as written, so the docs cannot rot.

Every ```python block of each page runs, in order, in one namespace per page,
inside a temporary working directory. Data sizes are cut down by wrapping
``ood_dataset`` (the docs show realistic sizes; the test divides the row
counts by ``SHRINK``). Blocks that build a faiss index are skipped when faiss
is not installed. ``kvstore ...`` lines of ```bash blocks that are cheap
(``kvstore info`` and ``--help``) run through the CLI's ``main``. Relative
links of the README and the docs point at files (and headings) that exist.
"""
from __future__ import annotations

import pathlib
import re
import shlex

import pytest

import kvstore.datasets
import kvstore.datasets.synthetic as synthetic
from kvstore.cli import main as cli_main

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ["quickstart.md", "api.md"]
SHRINK = 10
_FAISS_BUILD = re.compile(r"""(IVFIndex|HNSWIndex)\(|index_factory\([^)]*["'](IVF|HNSW)""")


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def small_data(monkeypatch, tmp_path):
    real = synthetic.ood_dataset

    def shrunk(n_keys, n_train, n_test, *args, **kwargs):
        return real(max(1, n_keys // SHRINK), n_train // SHRINK, min(n_test, 64), *args, **kwargs)

    monkeypatch.setattr(synthetic, "ood_dataset", shrunk)
    monkeypatch.setattr(kvstore.datasets, "ood_dataset", shrunk)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("page", PAGES)
def test_python_examples_run(page, small_data):
    blocks = _blocks((DOCS / page).read_text(), "python")
    assert blocks, f"{page} has no python examples"
    namespace: dict = {"__name__": f"docs_{page}"}
    faiss = _has_faiss()
    for i, code in enumerate(blocks):
        if not faiss and _FAISS_BUILD.search(code):
            continue
        exec(compile(code, f"docs/{page} [python block {i + 1}]", "exec"), namespace)


def _cheap_cli_lines() -> list[str]:
    lines = []
    for page in sorted(DOCS.glob("*.md")):
        for block in _blocks(page.read_text(), "bash"):
            for line in block.splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == ["kvstore"] and (words[1:] == ["info"] or words[-1] == "--help"):
                    lines.append(line.split("#")[0].strip())
    return sorted(set(lines))


@pytest.mark.parametrize("line", _cheap_cli_lines())
def test_cli_examples_run(line, capsys):
    try:
        code = cli_main(shlex.split(line)[1:])
    except SystemExit as e:  # argparse exits after --help
        code = e.code
    assert code in (0, None)
    assert capsys.readouterr().out.strip()


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _linked_pages() -> list[pathlib.Path]:
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted((ROOT / "bench").rglob("README.md"))]
    return [p for p in pages if p.is_file()]


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's heading anchors of a markdown page."""
    heads = re.findall(r"^#+\s+(.*?)\s*$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", _linked_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in _LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"
