"""The graph method on CUDA: the steady zone on the GPU, the middle tokens and their graphs in CPU memory
(:class:`kvstore.gpu.graph_split.GraphSplitLayer`, one C++ call over every slot per step)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import LayerCache, TokenStepLayer


class GraphSplitLayer(TokenStepLayer, LayerCache):
    kind = "graph_split"

    def __init__(self, layer) -> None:
        self.layer = layer

    @staticmethod
    def _config(config):
        from ..gpu.graph_split import GraphSplitConfig

        return GraphSplitConfig(sink=config.sink, window=config.window, top_k=config.top_k,
                                ef=max(config.ef, config.top_k), degree=config.graph_degree,
                                num_threads=config.num_threads or None, seed=config.seed)

    @classmethod
    def supports(cls, mask: torch.Tensor | None) -> bool:
        """Sequences of one length only (a padded batch takes the per-head layer)."""
        return mask is None or bool(mask.all())

    @classmethod
    def build(cls, config, layout, k, v, q, mask, device):
        from ..gpu.graph_split import GraphSplitLayer as Split

        return cls(Split.build(k.to(device), v.to(device), None if q is None else q.to(device), cls._config(config)))

    def attend(self, q):
        return self.layer.decode(q, return_lse=True)

    def seq_lengths(self):
        return [self.layer.length] * self.layer.B

    def stats(self) -> dict[str, Any]:
        st = self.layer.stats()
        entry: dict[str, Any] = {"tokens": self.seq_lengths(), "gpu": st}
        if st.get("read_fraction") is not None:
            entry["read_fraction"] = st["read_fraction"]
        return entry

    def state(self):
        from ..attention.heads import to_numpy

        L = self.layer
        meta: dict[str, Any] = {"B": L.B, "Hkv": L.Hkv, "Hq": L.Hq, "length": L.length, "sink": L.sink, "n": L.n,
                                "steady_used": L.steady_used, "dtype": str(L.dtype), "indexes": []}
        arrays = {"steady_k": to_numpy(L.steady_k[:, :, :L.steady_used]),
                  "steady_v": to_numpy(L.steady_v[:, :, :L.steady_used])}
        for h, ix in enumerate(L.indexes):
            m, a = ix._state()
            meta["indexes"].append(m)
            arrays.update({f"I{h}.{k}": x for k, x in a.items()})
            arrays[f"K{h}"], arrays[f"V{h}"] = L.keys[h], L.values[h]
        return meta, arrays

    @classmethod
    def from_state(cls, meta, arrays, config, layout, device):
        from ..attention.heads import _DTYPES
        from ..gpu.graph_split import GraphSplitLayer as Split
        from ..graph import AttentionGraphIndex

        dtype = _DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise ValueError(f"unknown dtype {meta.get('dtype')!r}")
        for k in ("B", "Hkv", "length", "sink", "n", "steady_used"):
            if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), int) or meta[k] < 0:
                raise ValueError(f"{k} must be an int >= 0")
        B, H = meta["B"], meta["Hkv"]
        if H != layout.num_kv_heads or B < 1 or not isinstance(meta.get("indexes"), list) \
                or len(meta["indexes"]) != (B * H if meta["n"] else 0):
            raise ValueError("the graph layer does not match the layout")
        if meta["sink"] + meta["n"] + (meta["steady_used"] - meta["sink"]) != meta["length"]:
            raise ValueError("token counts do not add up")
        L = Split()
        L.cfg = cls._config(config)
        L.device, L.dtype = torch.device(device), dtype
        L.B, L.Hkv, L.H, L.D, L.Dv = B, H, B * H, layout.head_dim, layout.value_dim
        L.Hq = meta.get("Hq")
        L.scale = 1.0 / float(np.sqrt(layout.head_dim)) if L.cfg.scale is None else float(L.cfg.scale)
        L.sink, L.length, L.n, L.steady_used = meta["sink"], meta["length"], meta["n"], meta["steady_used"]
        sk, sv = np.asarray(arrays["steady_k"]), np.asarray(arrays["steady_v"])
        if sk.shape != (B, H, L.steady_used, L.D) or sv.shape != (B, H, L.steady_used, L.Dv):
            raise ValueError("steady zone arrays do not match the layout")
        L._alloc_steady(max(L.steady_used + 64, 2 * L.steady_used))
        L.steady_k[:, :, :L.steady_used] = torch.from_numpy(np.array(sk)).to(L.device, dtype)
        L.steady_v[:, :, :L.steady_used] = torch.from_numpy(np.array(sv)).to(L.device, dtype)
        L.indexes = []
        L.keys = [np.zeros((0, L.D), np.float32) for _ in range(B * H)]
        L.values = [np.zeros((0, L.Dv), np.float32) for _ in range(B * H)]
        for h, m in enumerate(meta["indexes"]):
            prefix = f"I{h}."
            ix = AttentionGraphIndex._from_state(m, {k[len(prefix):]: x for k, x in arrays.items()
                                                     if k.startswith(prefix)})
            kh, vh = np.ascontiguousarray(arrays[f"K{h}"], np.float32), np.ascontiguousarray(arrays[f"V{h}"], np.float32)
            if ix.ntotal != L.n or kh.shape != (L.n, L.D) or vh.shape != (L.n, L.Dv):
                raise ValueError(f"slot {h}: the graph, keys and values do not hold the middle tokens")
            L.indexes.append(ix)
            L.keys[h], L.values[h] = kh, vh
        L.build_seconds = 0.0
        return cls(L)
