"""The :class:`LayerCache` interface shared by every layer implementation."""
from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import torch

from ..config import StoreConfig


class Layout(NamedTuple):
    """A store's attention layout: KV heads, key and value dims."""

    num_kv_heads: int
    head_dim: int
    value_dim: int


class TokenStepLayer:
    """A layer implementation around a batched layer that appends one token per sequence at a time
    (``inner.append(k1 [B, Hkv, D], v1 [B, Hkv, Dv])``) and holds ``B`` sequences (``inner.B``)."""

    layer: Any

    @property
    def batch_size(self) -> int:
        return self.layer.B

    def append(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
        if mask is not None and not bool(mask.all()):
            raise ValueError(f"append: the {self.kind} layer takes a token for every sequence at every step "
                             "(no padding in decoded tokens)")
        for t in range(k.shape[2]):
            self.layer.append(k[:, :, t], v[:, :, t])


class LayerCache(abc.ABC):
    """One layer's KV for a batch of ``B`` sequences.

    Built from a prompt by :meth:`build`; :meth:`append` adds decoded tokens, :meth:`attend` answers a decode
    step. Tensors: k ``[B, Hkv, N, D]``, v ``[B, Hkv, N, Dv]``, q ``[B, Hq, ...]`` with ``Hq`` a multiple of
    ``Hkv`` (GQA). ``mask [B, N]`` (bool, True for real tokens) marks padding on either side; real tokens keep
    their order. Inputs are validated by the store; a layer may assume shapes, dtypes and devices are right.
    """

    kind: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def build(cls, config: StoreConfig, layout: Layout, k: torch.Tensor, v: torch.Tensor,
              q: torch.Tensor | None, mask: torch.Tensor | None, device: torch.device) -> "LayerCache":
        """Index a prompt: k, v, q ``[B, Hq, N, D]`` (the prompt's queries, or None), mask ``[B, N]`` or None."""

    @abc.abstractmethod
    def append(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add ``T`` decoded tokens: k ``[B, Hkv, T, D]``, v ``[B, Hkv, T, Dv]``, mask ``[B, T]`` or None."""

    @abc.abstractmethod
    def attend(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode attention: q ``[B, Hq, D]`` -> ``(o [B, Hq, Dv]`` in q's dtype, ``lse [B, Hq]`` float32 on q's
        device)."""

    @property
    @abc.abstractmethod
    def batch_size(self) -> int:
        """Sequences held."""

    @abc.abstractmethod
    def seq_lengths(self) -> list[int]:
        """Tokens seen per sequence (padding excluded, tokens a method dropped included)."""

    def last_access(self) -> list[list[Any]] | None:
        """What the last :meth:`attend` read per sequence and KV head (:class:`kvstore.attention.heads.Access`),
        when the layer records it; None otherwise."""
        return None

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Tokens stored and, after a step, ``read_fraction``: bytes the last step read over full attention's."""

    @abc.abstractmethod
    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Everything the layer holds: ``(meta, arrays)`` (JSON-able meta, numpy arrays)."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, Any], config: StoreConfig, layout: Layout,
                   device: torch.device) -> "LayerCache":
        """Rebuild a layer saved by :meth:`state`; ``ValueError`` naming what is inconsistent."""
