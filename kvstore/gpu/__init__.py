"""The GPU decode path: CUDA kernels (``kvstore._cuda``) and the layers built on them.

* :mod:`kvstore.gpu.cluster_ops` - cluster ranking and selection, copy kernel;
* :mod:`kvstore.gpu.attention_ops` - sparse decode attention over row runs + estimation zone;
* :mod:`kvstore.gpu.kmeans` - segmented spherical k-means on the GPU;
* :mod:`kvstore.gpu.wave_buffer` - the wave buffer's CPU side (LRU planner, pinned memory);
* :mod:`kvstore.gpu.wave_layer` - :class:`GpuWaveLayer`, one layer's wave attention (``gpu_only`` / ``offload``);
* :mod:`kvstore.gpu.graph_split` - the graph method split between GPU (steady zone) and CPU (graph search).

Every op takes ``backend="auto" | "torch" | "cuda"``; ``torch`` is the reference and runs anywhere.
Importing this package needs only torch.
"""
from ._ext import cuda_ext, has_cuda_ext

__all__ = ["cuda_ext", "has_cuda_ext"]
