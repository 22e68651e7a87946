"""Optional-dependency helper for :mod:`kvstore.datasets`.

The real-model tools need ``transformers``, ``gguf`` and ``accelerate`` (the
``kvstore[hf]`` extra). They are imported lazily, so ``import kvstore.datasets``
works with only torch and numpy installed.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str = "hf") -> ModuleType:
    """Import and return ``module``, or raise an ImportError naming the extra.

    Args:
        module: dotted module name, e.g. ``"transformers"``.
        extra: the ``kvstore`` extra that installs it, e.g. ``"hf"``.

    Raises:
        ImportError: ``module`` is not installed; the message says to
            ``pip install 'kvstore[<extra>]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this feature needs the optional package {module!r}, which is not installed; "
            f"install kvstore[{extra}] (pip install 'kvstore[{extra}]')"
        ) from exc
