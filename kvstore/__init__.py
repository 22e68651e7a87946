"""kvstore: a vector-database-style storage engine for LLM KV caches.

Indexes over one KV head's keys, searched by inner product like faiss:

>>> import kvstore
>>> index = kvstore.AttentionGraphIndex(dim=64).build(keys, train_queries)
>>> D, I = index.search(queries, k=32)

Needs only torch and numpy; faiss-backed baselines need ``kvstore[faiss]``.
"""
from ._version import __version__
from .factory import index_factory
from .faiss_indexes import HNSWIndex, IVFIndex
from .flat import FlatIndex
from .graph import AttentionGraphIndex
from .index_base import Index, load_index
from .wave import WaveIndex
from .config import StoreConfig
from .store import KVStore, decode_attention
from . import attention

__all__ = [
    "__version__",
    "AttentionGraphIndex",
    "FlatIndex",
    "HNSWIndex",
    "IVFIndex",
    "Index",
    "index_factory",
    "KVStore",
    "StoreConfig",
    "attention",
    "decode_attention",
    "load_index",
    "WaveIndex",
]
