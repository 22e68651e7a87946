"""The reference layer: one cache per sequence and KV head (:mod:`kvstore.attention.heads`), any method, any
device. Sequences of one batch may have any lengths (padding is dropped at prefill)."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..attention.heads import HEADS, Access, HeadCache, head_from_state, head_state
from ..config import StoreConfig
from .base import LayerCache, Layout


class HeadsLayer(LayerCache):
    """``B x Hkv`` per-head caches of ``config.method``."""

    kind = "heads"

    def __init__(self, config: StoreConfig, layout: Layout, heads: list[list[HeadCache]]) -> None:
        self.config, self.layout, self.heads = config, layout, heads
        self._access: list[list[Access]] | None = None

    @classmethod
    def build(cls, config, layout, k, v, q, mask, device):
        B, H, N, _ = k.shape
        make = HEADS[config.method]
        heads = [[make(config, layout.head_dim, layout.value_dim, device, k.dtype) for _ in range(H)]
                 for _ in range(B)]
        for b in range(B):
            rows = None if mask is None else mask[b].nonzero().squeeze(1).to(k.device)
            for h in range(H):
                kb, vb = (k[b, h], v[b, h]) if rows is None else (k[b, h].index_select(0, rows),
                                                                  v[b, h].index_select(0, rows))
                qb = None
                if q is not None:
                    G = q.shape[1] // H
                    qb = q[b, h * G:(h + 1) * G]
                    if rows is not None:
                        qb = qb.index_select(1, rows.to(q.device))
                heads[b][h].prefill(kb, vb, qb)
        return cls(config, layout, heads)

    @property
    def batch_size(self) -> int:
        return len(self.heads)

    def append(self, k, v, mask):
        for b, row in enumerate(self.heads):
            if mask is None:
                for h, head in enumerate(row):
                    head.append(k[b, h], v[b, h])
                continue
            rows = mask[b].nonzero().squeeze(1).to(k.device)
            if rows.numel():
                for h, head in enumerate(row):
                    head.append(k[b, h].index_select(0, rows), v[b, h].index_select(0, rows))

    def attend(self, q):
        B, Hq, _ = q.shape
        H = self.layout.num_kv_heads
        G = Hq // H
        out = torch.empty(B, Hq, self.layout.value_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
        access: list[list[Access]] = []
        for b, row in enumerate(self.heads):
            acc_row = []
            for h, head in enumerate(row):
                o, l, acc = head.decode(q[b, h * G:(h + 1) * G])
                out[b, h * G:(h + 1) * G] = o.to(q.dtype)
                lse[b, h * G:(h + 1) * G] = l.float().to(q.device)
                acc_row.append(acc)
            access.append(acc_row)
        self._access = access
        return out, lse

    def last_access(self):
        return self._access

    def seq_lengths(self):
        return [row[0].length for row in self.heads]

    def stats(self):
        d, dv = self.layout.head_dim, self.layout.value_dim
        full = sum(hd.length * (d + dv) for row in self.heads for hd in row)
        entry: dict[str, Any] = {
            "tokens": self.seq_lengths(),
            "tokens_stored": sum(hd.stored_tokens() for row in self.heads for hd in row),
            "tokens_indexed": sum(hd.indexed for row in self.heads for hd in row),
            "index_bytes": sum(hd.index_bytes() for row in self.heads for hd in row),
        }
        if self._access is not None:
            read = sum(a.elems(d, dv) for row in self._access for a in row)
            entry["read_fraction"] = read / full if full else math.nan
        return entry

    def state(self):
        rows, arrays = [], {}
        for b, row in enumerate(self.heads):
            metas = []
            for h, head in enumerate(row):
                m, a = head_state(head)
                metas.append(m)
                arrays.update({f"B{b}.H{h}.{k}": x for k, x in a.items()})
            rows.append(metas)
        return {"rows": rows}, arrays

    @classmethod
    def from_state(cls, meta, arrays, config, layout, device):
        rows = meta.get("rows") if isinstance(meta, dict) else None
        if not isinstance(rows, list):
            raise ValueError("rows must be a list of per-head metadata lists")
        make = HEADS[config.method]
        heads = []
        for b, metas in enumerate(rows):
            if not isinstance(metas, list) or len(metas) != layout.num_kv_heads:
                raise ValueError(f"sequence {b} must have {layout.num_kv_heads} heads")
            row = []
            for h, m in enumerate(metas):
                if not isinstance(m, dict):
                    raise ValueError(f"head {b}.{h}: metadata must be a dict")
                prefix = f"B{b}.H{h}."
                a = {k[len(prefix):]: x for k, x in arrays.items() if k.startswith(prefix)}
                row.append(head_from_state(make, config, layout.head_dim, layout.value_dim, device, m, a))
            heads.append(row)
        if not heads:
            raise ValueError("a layer holds at least one sequence")
        return cls(config, layout, heads)
