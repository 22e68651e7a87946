"""Full attention on CUDA, batched: every sequence's KV in one buffer, one SDPA call per step."""
from __future__ import annotations

import math
from typing import Any

import torch

from .base import LayerCache


class DenseLayer(LayerCache):
    """KV ``[B, Hkv, capacity, D]`` with each sequence's real tokens first (``lengths``); the buffer doubles when
    it fills."""

    kind = "dense"

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> None:
        self.k, self.v, self.lengths = k, v, lengths
        self._lengths_dev = torch.tensor(lengths, device=k.device)

    @classmethod
    def build(cls, config, layout, k, v, q, mask, device):
        B, H, N, D = k.shape
        if mask is None:
            return cls(k.to(device).clone(), v.to(device).clone(), [N] * B)
        lengths = [int(x) for x in mask.sum(1).tolist()]
        cap = max(max(lengths), 1)
        kk = torch.zeros(B, H, cap, D, dtype=k.dtype, device=device)
        vv = torch.zeros(B, H, cap, v.shape[3], dtype=v.dtype, device=device)
        for b in range(B):
            rows = mask[b].to(k.device).nonzero().squeeze(1)
            kk[b, :, :lengths[b]] = k[b][:, rows].to(device)
            vv[b, :, :lengths[b]] = v[b][:, rows].to(device)
        return cls(kk, vv, lengths)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    def append(self, k, v, mask):
        B, H, T, _ = k.shape
        for t in range(T):
            real = [True] * B if mask is None else [bool(x) for x in mask[:, t].tolist()]
            need = max(n + int(r) for n, r in zip(self.lengths, real))
            if need > self.k.shape[2]:
                self._grow(max(need, 2 * self.k.shape[2]))
            if mask is None:
                slot = torch.arange(B, device=self.k.device)
                self.k[slot, :, self._lengths_dev] = k[:, :, t].to(self.k.device, self.k.dtype)
                self.v[slot, :, self._lengths_dev] = v[:, :, t].to(self.v.device, self.v.dtype)
                self._lengths_dev += 1
                self.lengths = [n + 1 for n in self.lengths]
                continue
            for b in range(B):
                if real[b]:
                    self.k[b, :, self.lengths[b]] = k[b, :, t]
                    self.v[b, :, self.lengths[b]] = v[b, :, t]
                    self.lengths[b] += 1
            self._lengths_dev = torch.tensor(self.lengths, device=self.k.device)

    def _grow(self, cap: int) -> None:
        B, H, n, D = self.k.shape
        k = torch.zeros(B, H, cap, D, dtype=self.k.dtype, device=self.k.device)
        v = torch.zeros(B, H, cap, self.v.shape[3], dtype=self.v.dtype, device=self.v.device)
        k[:, :, :n], v[:, :, :n] = self.k, self.v
        self.k, self.v = k, v

    def attend(self, q):
        B, Hq, D = q.shape
        H = self.k.shape[1]
        G = Hq // H
        n = max(self.lengths)
        k, v = self.k[:, :, :n], self.v[:, :, :n]
        qg = q.reshape(B, H, G, D).float()
        s = torch.matmul(qg, k.float().transpose(-1, -2)) / math.sqrt(D)              # [B, H, G, n]
        pad = torch.arange(n, device=q.device)[None, :] >= self._lengths_dev[:, None]
        s = s.masked_fill(pad[:, None, None, :], -math.inf)
        lse = torch.logsumexp(s, -1)
        o = torch.matmul(torch.exp(s - lse[..., None]), v.float())
        return o.reshape(B, Hq, -1).to(q.dtype), lse.reshape(B, Hq)

    def seq_lengths(self):
        return list(self.lengths)

    def stats(self) -> dict[str, Any]:
        return {"tokens": self.seq_lengths(), "tokens_stored": sum(self.lengths) * self.k.shape[1],
                "read_fraction": 1.0}

    def state(self):
        from ..attention.heads import to_numpy

        n = max(self.lengths)
        return ({"lengths": list(self.lengths), "dtype": str(self.k.dtype)},
                {"k": to_numpy(self.k[:, :, :n]), "v": to_numpy(self.v[:, :, :n])})

    @classmethod
    def from_state(cls, meta, arrays, config, layout, device):
        import numpy as np

        from ..attention.heads import _DTYPES

        dtype = _DTYPES.get(meta.get("dtype"))
        lengths = meta.get("lengths")
        if dtype is None or not isinstance(lengths, list) or not lengths or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in lengths):
            raise ValueError("dense layer: bad dtype or lengths")
        k, v = np.asarray(arrays["k"]), np.asarray(arrays["v"])
        want = (len(lengths), layout.num_kv_heads, max(lengths))
        if k.shape != want + (layout.head_dim,) or v.shape != want + (layout.value_dim,):
            raise ValueError("dense layer: k and v do not match the layout")
        return cls(torch.from_numpy(np.array(k)).to(device, dtype), torch.from_numpy(np.array(v)).to(device, dtype),
                   lengths)
