"""``index_factory``: build an index from a faiss-style description string.

Accepted forms (one per entry of ``_FORMS``; add a line there for a new kind):

- ``"Flat"``                 -> :class:`kvstore.flat.FlatIndex`
- ``"IVF<nlist>,Flat"``      -> :class:`kvstore.faiss_indexes.IVFIndex` (needs faiss)
- ``"HNSW<M>"``              -> :class:`kvstore.faiss_indexes.HNSWIndex` (needs faiss)
- ``"Graph<degree>"``        -> :class:`kvstore.graph.AttentionGraphIndex`
- ``"Wave<tokens_per_cluster>"`` -> :class:`kvstore.wave.WaveIndex`
"""
from __future__ import annotations

import re
from typing import Any, Callable

from .index_base import Index

__all__ = ["index_factory"]


def _flat(dim: int, **kw: Any) -> Index:
    from .flat import FlatIndex
    return FlatIndex(dim, **kw)


def _ivf(dim: int, nlist: int, **kw: Any) -> Index:
    from .faiss_indexes import IVFIndex
    return IVFIndex(dim, nlist=nlist, **kw)


def _hnsw(dim: int, M: int, **kw: Any) -> Index:
    from .faiss_indexes import HNSWIndex
    return HNSWIndex(dim, M=M, **kw)


def _graph(dim: int, degree: int, **kw: Any) -> Index:
    from .graph import AttentionGraphIndex
    return AttentionGraphIndex(dim, degree=degree, **kw)


def _wave(dim: int, tokens_per_cluster: int, **kw: Any) -> Index:
    from .wave import WaveIndex
    return WaveIndex(dim, tokens_per_cluster=tokens_per_cluster, **kw)


# (form shown in errors, full-match pattern with at most one int group, builder(dim, [int], **kwargs))
_FORMS: list[tuple[str, str, Callable[..., Index]]] = [
    ("Flat", r"Flat", _flat),
    ("IVF<nlist>,Flat", r"IVF(\d{1,18}),Flat", _ivf),
    ("HNSW<M>", r"HNSW(\d{1,18})", _hnsw),
    ("Graph<degree>", r"Graph(\d{1,18})", _graph),
    ("Wave<tokens_per_cluster>", r"Wave(\d{1,18})", _wave),
]


def index_factory(dim: int, description: str, **kwargs: Any) -> Index:
    """Create an empty index of dimension ``dim`` from ``description`` (e.g. ``"IVF256,Flat"``).

    ``kwargs`` go to the index constructor (e.g. ``nprobe=8`` for IVF,
    ``ef_search=128`` for HNSW). Unknown descriptions raise ``ValueError``
    listing the accepted forms.
    """
    if not isinstance(description, str):
        raise TypeError(f"description must be a str, got {type(description).__name__}")
    text = description.strip()
    for _, pattern, build in _FORMS:
        m = re.fullmatch(pattern, text)
        if m:
            return build(dim, *(int(g) for g in m.groups()), **kwargs)
    forms = ", ".join(repr(f) for f, _, _ in _FORMS)
    raise ValueError(f"unknown index description {description!r}; accepted forms: {forms}")
