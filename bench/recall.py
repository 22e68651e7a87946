"""Recall against keys scanned, per index: a script entry for
``kvstore.benchmarks.recall`` (the same as ``kvstore bench recall``).

    python bench/recall.py --help
    python bench/recall.py --data real                       # SmolLM2 traces (default)
    python bench/recall.py --data generated --n-keys 100000  # generated OOD set

Results go to ``bench/results/recall_<dataset>.{json,md,png}`` (``--out`` changes the folder).
"""
from __future__ import annotations

import sys

from kvstore.benchmarks.recall import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
