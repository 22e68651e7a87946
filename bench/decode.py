"""Decode latency of kvstore's GPU path against torch SDPA, one Llama-3-8B-shaped layer: a script entry
for ``kvstore.benchmarks.decode`` (the same as ``kvstore bench decode``).

    python bench/decode.py --help
    python bench/decode.py                                   # the full sweep (needs a CUDA GPU)
    python bench/decode.py --contexts 128K --batches 8 --modes gpu_only

Results go to ``docs/decode.{json,md,png}`` (``--out`` changes the folder).
"""
from __future__ import annotations

import sys

from kvstore.benchmarks.decode import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
