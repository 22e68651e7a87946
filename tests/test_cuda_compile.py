"""CI has nvcc but no GPU: compile every CUDA kernel source for sm_90 (compile only), so a kernel that does not
build cannot land. The kernels include only CUDA headers (the torch bindings live in python/cuda/)."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_there_are_kernels():
    assert KERNELS, "csrc/cuda/*.cu is empty"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("src", KERNELS, ids=[p.name for p in KERNELS])
def test_kernel_compiles_for_sm90(src, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-arch=sm_90", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'cuda'}",
           "-c", str(src), "-o", str(tmp_path / (src.stem + ".o"))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
