"""Decode attention: the exact reference, the partial-attention merge, and the
per-head caches of every method (wave, graph, StreamingLLM, Quest, full)."""
from .core import attention_with_lse, estimate_clusters, full_attention, merge_partials
from .heads import HEADS, Access, FullHead, GraphHead, HeadCache, QuestHead, StreamingHead, WaveHead

__all__ = [
    "Access", "FullHead", "GraphHead", "HEADS", "HeadCache", "QuestHead", "StreamingHead", "WaveHead",
    "attention_with_lse", "estimate_clusters", "full_attention", "merge_partials",
]
