"""The compiled C++ core, with a clear error when the extension was not built."""
from __future__ import annotations

from types import ModuleType


def core() -> ModuleType:
    try:
        from . import _C
    except ImportError as e:  # pragma: no cover - the build always makes it
        raise ImportError(
            "kvstore's C++ extension kvstore._C is not built: run `pip install --no-build-isolation -e .`"
        ) from e
    return _C
