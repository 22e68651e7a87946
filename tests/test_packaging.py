"""The source distribution carries everything the build needs, and the package metadata is complete.

``setup.py`` names every C++/CUDA source; these tests check that the names match the files on disk, and that
an sdist built from this tree (``python -m build --sdist --no-isolation``, no network) holds each source, each
header those sources include (transitively), the licence and the metadata a user reads on the package page.
"""
from __future__ import annotations

import ast
import email.parser
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

import kvstore

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETUP = ROOT / "setup.py"
# build outputs and local state that a fresh clone does not have
_NOT_SOURCE = ("*.egg-info", "build", "dist", "__pycache__", "*.so", "*.o", "*.pyc", ".git", ".pytest_cache",
               ".benchmarks", ".hypothesis", ".venv", ".whl", ".cache", ".gpu_build", "kvstore-results")
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)

pytestmark = pytest.mark.skipif(not SETUP.is_file(), reason="needs the source tree (setup.py), not an install")


def _setup_lists() -> dict[str, list[str]]:
    """The list literals assigned at the top level of setup.py (sources and include folders)."""
    out: dict[str, list[str]] = {}
    for node in ast.parse(SETUP.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                out[node.targets[0].id] = value
    return out


def _needed_files() -> set[str]:
    """Every named source and every header reachable from them through ``#include "..."``."""
    lists = _setup_lists()
    include_dirs = lists["CORE_INCLUDE_DIRS"] + lists["CUDA_INCLUDE_DIRS"]
    todo = list(lists["CORE_SOURCES"] + lists["CUDA_SOURCES"])
    seen: set[str] = set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        path = ROOT / rel
        for name in _INCLUDE.findall(path.read_text()):
            for folder in [str(pathlib.PurePosixPath(rel).parent), *include_dirs]:
                candidate = pathlib.PurePosixPath(folder) / name
                if (ROOT / candidate).is_file():
                    todo.append(str(candidate))
                    break
            else:
                pytest.fail(f"{rel} includes {name!r}, found in none of {include_dirs}")
    return seen


def test_setup_names_every_source_on_disk():
    lists = _setup_lists()
    on_disk = {str(p.relative_to(ROOT)) for folder in ("csrc", "python")
               for p in (ROOT / folder).rglob("*") if p.suffix in (".cpp", ".cu")}
    named = lists["CORE_SOURCES"] + lists["CUDA_SOURCES"]
    assert len(named) == len(set(named)), "a source is named twice in setup.py"
    assert set(named) == on_disk, "setup.py's source lists and the .cpp/.cu files differ"
    assert all(s.endswith(".cpp") for s in lists["CORE_SOURCES"])


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tarfile.TarFile:
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' package is not installed (pip install build, or kvstore[test])")
    # A copy without build outputs, as a fresh clone has it: setuptools would otherwise re-read the file list of
    # an earlier build (kvstore.egg-info/SOURCES.txt) and hide a file MANIFEST.in leaves out.
    tree = tmp_path_factory.mktemp("tree") / "kvstore"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out),
                           str(tree)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        yield tar


def _members(tar: tarfile.TarFile) -> set[str]:
    return {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}


def test_sdist_lists_every_source_the_build_needs(sdist):
    members = _members(sdist)
    needed = _needed_files() | {"setup.py", "pyproject.toml", "LICENSE", "README.md", "kvstore/_version.py"}
    missing = sorted(needed - members)
    assert not missing, f"the sdist lacks {missing} (MANIFEST.in)"
    package = {str(p.relative_to(ROOT)) for p in (ROOT / "kvstore").rglob("*.py")}
    assert package <= members
    assert not [m for m in members if m.endswith((".so", ".o", ".pyc"))], "build outputs in the sdist"


def test_sdist_metadata(sdist):
    (pkg_info,) = [m for m in sdist.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")]
    meta = email.parser.Parser().parsestr(sdist.extractfile(pkg_info).read().decode())
    assert meta["Name"] == "kvstore"
    assert meta["Version"] == kvstore.__version__
    assert meta["License-Expression"] == "MIT"
    assert "LICENSE" in meta.get_all("License-File")
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "# kvstore" in meta.get_payload()
    assert meta.get_all("Classifier") and meta.get_all("Project-URL")
    extras = set(meta.get_all("Provides-Extra"))
    assert {"faiss", "hf", "bench", "test"} <= extras
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("torch") for r in requires) and any(r.startswith("numpy") for r in requires)
