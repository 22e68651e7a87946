"""Data sets for kvstore: real model traces and synthetic OOD query/key sets.

* :mod:`~kvstore.datasets.synthetic`: :func:`ood_dataset`, generated
  attention-like keys/queries with an out-of-distribution gap, any size.
* :mod:`~kvstore.datasets.traces`: :func:`capture_traces`,
  :func:`load_traces`, :func:`head_split`, real post-RoPE Q/K/V of
  SmolLM2-135M-Instruct.
* :mod:`~kvstore.datasets.text`: :func:`long_text`, :func:`smollm2_path`,
  :func:`load_smollm2`.

Importing this package needs only numpy and torch; the real-model functions
import transformers lazily (install ``kvstore[hf]``). The trace functions are
loaded on first access, so ``python -m kvstore.datasets.traces`` runs cleanly.
"""
from __future__ import annotations

import importlib
from typing import Any

from ._deps import require
from .synthetic import ood_dataset, ood_gap, ood_topics
from .text import load_smollm2, long_text, smollm2_path

_LAZY = {
    name: "traces"
    for name in ("Trace", "capture_traces", "default_cache_dir", "head_split", "load_traces", "trace_path")
}

__all__ = sorted(
    ["load_smollm2", "long_text", "ood_dataset", "ood_gap", "ood_topics", "require", "smollm2_path", *_LAZY]
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
