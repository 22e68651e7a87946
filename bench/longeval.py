"""Long-context accuracy (RULER-style synthetic tasks) per decode method: a
script entry for ``kvstore.benchmarks.longeval`` (the same as ``kvstore eval``).

    python bench/longeval.py --help
    python bench/longeval.py --contexts 2048 4096 --depths 0.5

Results go to ``docs/longeval.{json,md,png}`` (``--out`` changes the folder).
"""
from __future__ import annotations

import sys

from kvstore.benchmarks.longeval import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
