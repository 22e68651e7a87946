"""The wave method on CUDA: every (sequence, KV head) slot of a layer in one batched step
(:class:`kvstore.gpu.wave_layer.GpuWaveLayer`, the same algorithm as the per-head reference)."""
from __future__ import annotations

from typing import Any

from .base import LayerCache, TokenStepLayer


class WaveLayer(TokenStepLayer, LayerCache):
    kind = "wave"

    def __init__(self, layer) -> None:
        self.layer = layer

    @classmethod
    def build(cls, config, layout, k, v, q, mask, device):
        from ..gpu.wave_layer import GpuWaveLayer, WaveGpuConfig

        lengths = None if mask is None else mask.sum(1)
        return cls(GpuWaveLayer.build(k, v, WaveGpuConfig.from_store(config), device=device, mask=mask,
                                      lengths=lengths))

    def attend(self, q):
        return self.layer.decode_with_lse(q)

    def seq_lengths(self):
        return self.layer.seq_lengths()

    def stats(self) -> dict[str, Any]:
        st = self.layer.stats()
        entry = {"tokens": self.seq_lengths(), "gpu": st}
        if "read_fraction" in st:
            entry["read_fraction"] = st["read_fraction"]
        return entry

    def state(self):
        return self.layer.state()

    @classmethod
    def from_state(cls, meta, arrays, config, layout, device):
        from ..gpu.wave_layer import GpuWaveLayer

        layer = GpuWaveLayer.from_state(meta, arrays, device)
        if (layer.Hkv, layer.D, layer.Dv) != tuple(layout):
            raise ValueError(f"the wave layer is {layer.Hkv} x {layer.D}/{layer.Dv}, the layout {tuple(layout)}")
        return cls(layer)

