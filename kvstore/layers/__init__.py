"""One layer's KV cache for a batch of sequences, behind one interface for every method and device.

A :class:`kvstore.KVStore` holds one :class:`LayerCache` per layer and never looks inside it. Each
implementation is one method family on one kind of device (as faiss has one ``Index`` with GPU subclasses, or
vLLM one attention backend per kernel family):

=======================  ==========================================  =========================================
layer                    methods, device                              module
=======================  ==========================================  =========================================
:class:`HeadsLayer`      every method, any device: one cache per      :mod:`kvstore.layers.heads` (the reference)
                         sequence and KV head
:class:`WaveLayer`       wave on CUDA: every slot in one batched      :mod:`kvstore.layers.wave`
                         step (:mod:`kvstore.gpu.wave_layer`)
:class:`GraphSplitLayer` graph on CUDA: steady zone on the GPU, the   :mod:`kvstore.layers.graph_split`
                         graph search on the CPU
:class:`DenseLayer`      full attention on CUDA                       :mod:`kvstore.layers.dense`
=======================  ==========================================  =========================================

:func:`layer_class` picks one from the config and the device; :data:`LAYER_KINDS` names them in saved files.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import StoreConfig
from .base import Layout, LayerCache

__all__ = ["LayerCache", "Layout", "LAYER_KINDS", "layer_class", "HeadsLayer", "WaveLayer", "GraphSplitLayer",
           "DenseLayer"]


def _kinds() -> dict[str, type[LayerCache]]:
    from .dense import DenseLayer
    from .graph_split import GraphSplitLayer
    from .heads import HeadsLayer
    from .wave import WaveLayer

    return {c.kind: c for c in (HeadsLayer, WaveLayer, GraphSplitLayer, DenseLayer)}


def layer_class(config: StoreConfig, device: torch.device, mask: torch.Tensor | None = None) -> type[LayerCache]:
    """The layer implementation for ``config.method`` on ``device``: the batched GPU layers on CUDA, the per-head
    reference elsewhere and for the methods without a batched layer (streaming, quest, and graph with a padded
    batch: ``mask [B, N]`` with padding)."""
    kinds = _kinds()
    if device.type == "cuda":
        batched = {"wave": "wave", "graph": "graph_split", "full": "dense"}.get(config.method)
        if batched is not None and (batched != "graph_split" or mask is None or bool(mask.all())):
            return kinds[batched]
    return kinds["heads"]


def __getattr__(name: str) -> Any:
    if name == "LAYER_KINDS":
        return _kinds()
    if name in ("HeadsLayer", "WaveLayer", "GraphSplitLayer", "DenseLayer"):
        return {c.__name__: c for c in _kinds().values()}[name]
    raise AttributeError(name)
