"""Sparse decode attention over row runs, merged with the wave index's estimation zone.

One decode step of one layer for ``G`` head slots (``G = batch * KV heads``), each with a group of ``Hg`` query
heads (GQA): every query head of slot ``g`` attends exactly over the rows its runs point at (in up to four
sources: GPU KV, GPU cache pages, pinned host KV read zero-copy by the kernel), and that exact partial is merged by
log-sum-exp with the estimation partial of RetroInfer's estimation zone (docs/design.md "Wave index", "Merging partial
attentions").

``backend="torch"`` is the reference (float32 maths, any device); ``"cuda"`` runs the kernel of
``csrc/cuda/sparse_attention.cu`` (split-K over each slot's rows; the last block of a slot to finish merges its
partials); ``"auto"`` takes the kernel when ``q`` is a CUDA tensor, the extension is built and the inputs suit
it (sources on ``q``'s device or pinned, contiguous, 16-byte aligned; ``D``, ``Dv`` in {64, 128}; ``Hg <= 16``),
else the reference.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import torch

from ..attention.core import attention_with_lse, merge_partials
from .cluster_ops import check_tensor

MAX_SOURCES = 4
MAX_GROUP = 16            # query heads per slot the kernel takes
MAX_TOTAL_SPLITS = 1024   # num_splits + estimation splits (the kernel's grid.y)
MAX_EST_SPLITS = 64
MAX_SPLITS = MAX_TOTAL_SPLITS - MAX_EST_SPLITS
KERNEL_DIMS = (64, 128)   # D and Dv the kernel is instantiated for
BACKENDS = ("auto", "torch", "cuda")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class KVSource(NamedTuple):
    """A table of rows the runs point into: ``k [rows, D]``, ``v [rows, Dv]`` (same device and dtype as ``q``;
    for the kernel: on ``q``'s device or in pinned host memory, contiguous)."""

    k: torch.Tensor
    v: torch.Tensor


class RunTable(NamedTuple):
    """CSR list of contiguous row runs per head slot (all on one device; ``q``'s for the kernel).

    ``src`` int32 ``[R]`` source index; ``row`` int64 ``[R]`` first row in that source; ``length`` int32 ``[R]``
    rows (0 allowed); ``offsets`` int32 ``[G + 1]``: runs of slot ``g`` are ``offsets[g]:offsets[g + 1]``
    (starts at 0, non-decreasing, ends at ``R``). The runs of a slot must be disjoint token sets."""

    src: torch.Tensor
    row: torch.Tensor
    length: torch.Tensor
    offsets: torch.Tensor


class Estimation(NamedTuple):
    """RetroInfer's estimation zone, reusing the ranking scores (all float32 but ``ids``).

    ``scores [G, Hg, C]`` = ``q.c * scale`` for every cluster; ``sizes [G, C]`` (0 = empty cluster: contributes
    nothing); ``value_sums [G, C, Dv]``; ``ids`` int64 ``[G, E]``: the clusters of the zone (``E`` may be 0; no
    duplicates within a slot)."""

    scores: torch.Tensor
    sizes: torch.Tensor
    value_sums: torch.Tensor
    ids: torch.Tensor


def sparse_decode_attention(q: torch.Tensor, sources: Sequence[KVSource], runs: RunTable,
                            estimation: Estimation | None = None, scale: float | None = None, backend: str = "auto",
                            num_splits: int | None = None, check_bounds: bool = False,
                            est_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over each slot's runs, merged with the estimation partial.

    q ``[G, Hg, D]`` (bfloat16 / float16 / float32); ``sources``: 1 to 4 :class:`KVSource` (``k [rows, D]``,
    ``v [rows, Dv]``, ``q``'s dtype); ``runs``: :class:`RunTable`; ``estimation``: :class:`Estimation` or None.
    Each query head ``j`` of slot ``g`` attends exactly over the union of the rows of the slot's runs; cluster
    ``i`` of the estimation zone adds ``size_i * exp(s_i)`` to the normaliser and ``exp(s_i) * value_sum_i`` to
    the numerator (``s_i = scores[g, j, i]``). ``scale`` defaults to ``1 / sqrt(D)``.

    Returns ``o [G, Hg, Dv]`` in ``q.dtype`` and ``lse [G, Hg]`` float32 (natural log of the normaliser); a head
    that saw nothing gets ``lse = -inf`` and ``o = 0``.

    ``num_splits``: kernel blocks per slot over its rows (default: enough to fill the GPU, see
    :func:`default_num_splits`; :func:`plan_splits` sizes both kinds of blocks from the expected rows);
    ``est_splits``: kernel blocks per slot over its estimation clusters (default :func:`estimation_splits`); both
    ignored by the reference. ``check_bounds``: validate the run table and the
    estimation ids against the sources on the host, which syncs with the device (the reference always does). The
    kernel never reads out of bounds without it: a run whose source, row or length is out of range, offsets that
    are not a CSR, or an estimation id outside ``[0, C)`` turn that slot's ``o`` and ``lse`` into NaN. Values are
    never checked for NaN / inf (too slow per step).
    """
    G, Hg, D, Dv = _check_inputs(q, sources, runs, estimation)
    scale = _check_scale(scale, D)
    if num_splits is not None:
        num_splits = _check_int(num_splits, "num_splits", 1, MAX_SPLITS)
    if est_splits is not None:
        est_splits = _check_int(est_splits, "est_splits", 1, MAX_EST_SPLITS)
    use_cuda = _use_cuda(backend, q, sources, runs, estimation, D, Dv, Hg)
    if check_bounds or not use_cuda:
        _check_bounds(sources, runs, estimation)
    if use_cuda:
        return _cuda_attention(q, sources, runs, estimation, scale, num_splits, est_splits)
    return _torch_attention(q, sources, runs, estimation, scale)


def merge_attention_partials(o: torch.Tensor, lse: torch.Tensor, out_dtype: torch.dtype | None = None,
                             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of ``P`` partial attentions over disjoint token sets (``merge_partials`` semantics).

    o ``[P, ..., Dv]`` float32 (normalised partial outputs), lse ``[P, ...]`` float32 (natural log; ``-inf`` for
    an empty part, whose ``o`` is then ignored). Returns ``o [..., Dv]`` in ``out_dtype`` (default float32) and
    ``lse [...]`` float32; ``-inf`` and 0 where every part is empty.
    """
    if not isinstance(o, torch.Tensor) or not isinstance(lse, torch.Tensor):
        raise TypeError(f"o and lse must be tensors, got {type(o).__name__} and {type(lse).__name__}")
    if o.dtype != torch.float32 or lse.dtype != torch.float32:
        raise TypeError(f"o and lse must be float32, got {o.dtype} and {lse.dtype}")
    if o.dim() < 2 or tuple(o.shape[:-1]) != tuple(lse.shape):
        raise ValueError(f"o must be [P, ..., Dv] and lse [P, ...], got {tuple(o.shape)} and {tuple(lse.shape)}")
    if o.shape[0] == 0:
        raise ValueError("o must hold at least one part (P = 0)")
    if o.device != lse.device:
        raise ValueError(f"o and lse must be on one device, got {o.device} and {lse.device}")
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    backend = _check_backend(backend)
    use_cuda = backend == "cuda" or (backend == "auto" and o.is_cuda and _ext_ready())
    if use_cuda:
        if not o.is_cuda:
            raise ValueError(f"o must be a CUDA tensor for backend='cuda', got {o.device}")
        from ._ext import cuda_ext

        P, Dv = o.shape[0], o.shape[-1]
        o3, l2 = o.reshape(P, -1, Dv), lse.reshape(P, -1)
        if o3.stride(2) != 1 and Dv > 1:
            o3 = o3.contiguous()
        mo, ml = cuda_ext().merge_attention_partials(o3, l2, _DTYPE_CODE[out_dtype])
        return mo.reshape(o.shape[1:]), ml.reshape(lse.shape[1:])
    empty = torch.isneginf(lse).unsqueeze(-1)
    parts = [(torch.where(empty[p], 0.0, o[p]), lse[p]) for p in range(o.shape[0])]
    mo, ml = merge_partials(parts)
    return mo.to(out_dtype), ml


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(G: int, device: torch.device | str | None = None) -> int:
    """Blocks per slot over its rows: about 4 blocks per SM over all slots, in [1, 64] (132 SMs if no GPU)."""
    device = torch.device("cuda") if device is None else torch.device(device)
    sms = 132
    if device.type == "cuda" and torch.cuda.is_available():
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(64, math.ceil(4 * sms / max(G, 1))))


def estimation_splits(E: int, G: int, sms: int = 132) -> int:
    """Kernel blocks per slot over its ``E`` estimation clusters: 0 without clusters, else at least 64 clusters
    a block and about 2 blocks per SM over all slots, in [1, 64]."""
    if E == 0:
        return 0
    return max(1, min(MAX_EST_SPLITS, math.ceil(E / 64), math.ceil(2 * sms / max(G, 1))))


@functools.lru_cache(maxsize=None)
def _blocks_per_sm(index: int, dtype: torch.dtype, D: int, Dv: int, Hg: int) -> int:
    from ._ext import cuda_ext

    return int(cuda_ext().sparse_attention_blocks_per_sm(index, _DTYPE_CODE[dtype], D, Dv, Hg))


def plan_splits(G: int, Hg: int, D: int, Dv: int, dtype: torch.dtype, rows: int, E: int,
                device: torch.device | str | None = None) -> tuple[int, int]:
    """(num_splits, est_splits) for a step whose slots read about ``rows`` exact rows and ``E`` estimation
    clusters each: one wave of kernel blocks (the blocks an SM holds at once, from the kernel's occupancy, times
    the SMs), shared between the exact and the estimation blocks in proportion to the bytes each reads, so that
    they finish together. Without the extension: 4 blocks per SM, 132 SMs."""
    device = torch.device("cuda") if device is None else torch.device(device)
    sms, per_sm = 132, 4
    if device.type == "cuda" and torch.cuda.is_available() and D in KERNEL_DIMS and Dv in KERNEL_DIMS:
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms = _sm_count(index)
        if _ext_ready():
            per_sm = _blocks_per_sm(index, dtype, D, Dv, min(Hg, MAX_GROUP)) or per_sm
    per_slot = max(2 if E else 1, (per_sm * sms) // max(G, 1))
    if E == 0:
        return max(1, min(MAX_SPLITS, per_slot)), 0
    el = torch.empty(0, dtype=dtype).element_size()
    exact_bytes = max(rows, 1) * (D + Dv) * el
    est_bytes = E * (Dv * 4 + Hg * 32 + 16)             # value sum + the scores' sectors + id and size
    est = round(per_slot * est_bytes / (exact_bytes + est_bytes))
    est = max(1, min(MAX_EST_SPLITS, math.ceil(E / 128), per_slot - 1, est))
    return max(1, min(MAX_SPLITS, per_slot - est)), est


# ---------------------------------------------------------------------------------------------------- checks


def _check_backend(backend: Any) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _check_int(v: Any, name: str, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not low <= v <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {v}")
    return v


def _check_scale(scale: Any, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_inputs(q: Any, sources: Any, runs: Any, estimation: Any) -> tuple[int, int, int, int]:
    """Shapes, dtypes and devices (no data read). Returns G, Hg, D, Dv."""
    check_tensor(q, "q", 3, _FLOATS)
    G, Hg, D = q.shape
    if Hg < 1 or D < 1:
        raise ValueError(f"q must be [G, Hg >= 1, D >= 1], got {tuple(q.shape)}")
    if not isinstance(sources, (list, tuple)) or not 1 <= len(sources) <= MAX_SOURCES:
        raise ValueError(f"sources must be a list of 1 to {MAX_SOURCES} KVSource, got {sources!r:.80}")
    Dv = None
    for i, s in enumerate(sources):
        if not isinstance(s, tuple) or len(s) != 2:
            raise TypeError(f"sources[{i}] must be a KVSource(k, v), got {type(s).__name__}")
        k = check_tensor(s[0], f"sources[{i}].k", 2, (q.dtype,))
        v = check_tensor(s[1], f"sources[{i}].v", 2, (q.dtype,))
        if k.shape[1] != D:
            raise ValueError(f"sources[{i}].k has dim {k.shape[1]}, q has {D}")
        if v.shape[0] != k.shape[0]:
            raise ValueError(f"sources[{i}].v has {v.shape[0]} rows, sources[{i}].k has {k.shape[0]}")
        if Dv is None:
            Dv = v.shape[1]
        if v.shape[1] != Dv or Dv < 1:
            raise ValueError(f"sources[{i}].v has dim {v.shape[1]}, sources[0].v has {Dv}")
        if v.device != k.device:
            raise ValueError(f"sources[{i}].k and .v are on {k.device} and {v.device}")
    if not isinstance(runs, tuple) or len(runs) != 4:
        raise TypeError(f"runs must be a RunTable(src, row, length, offsets), got {type(runs).__name__}")
    src = check_tensor(runs[0], "runs.src", 1, (torch.int32,))
    row = check_tensor(runs[1], "runs.row", 1, (torch.int64,))
    length = check_tensor(runs[2], "runs.length", 1, (torch.int32,))
    offsets = check_tensor(runs[3], "runs.offsets", 1, (torch.int32,))
    if not src.shape[0] == row.shape[0] == length.shape[0]:
        raise ValueError(f"runs.src, runs.row and runs.length must have one length, got "
                         f"{src.shape[0]}, {row.shape[0]}, {length.shape[0]}")
    if offsets.shape[0] != G + 1:
        raise ValueError(f"runs.offsets must have G + 1 = {G + 1} entries, got {offsets.shape[0]}")
    if len({t.device for t in (src, row, length, offsets)}) != 1:
        raise ValueError("runs.src, runs.row, runs.length and runs.offsets must be on one device")
    if estimation is not None:
        if not isinstance(estimation, tuple) or len(estimation) != 4:
            raise TypeError(f"estimation must be an Estimation(scores, sizes, value_sums, ids) or None, "
                            f"got {type(estimation).__name__}")
        sc = check_tensor(estimation[0], "estimation.scores", 3, (torch.float32,))
        sz = check_tensor(estimation[1], "estimation.sizes", 2, (torch.float32,))
        vs = check_tensor(estimation[2], "estimation.value_sums", 3, (torch.float32,))
        ids = check_tensor(estimation[3], "estimation.ids", 2, (torch.int64,))
        C = sc.shape[2]
        if tuple(sc.shape) != (G, Hg, C):
            raise ValueError(f"estimation.scores must be [G, Hg, C] = [{G}, {Hg}, C], got {tuple(sc.shape)}")
        if tuple(sz.shape) != (G, C):
            raise ValueError(f"estimation.sizes must be [G, C] = [{G}, {C}], got {tuple(sz.shape)}")
        if tuple(vs.shape) != (G, C, Dv):
            raise ValueError(f"estimation.value_sums must be [G, C, Dv] = [{G}, {C}, {Dv}], got {tuple(vs.shape)}")
        if ids.shape[0] != G:
            raise ValueError(f"estimation.ids must be [G, E] with G = {G}, got {tuple(ids.shape)}")
        if ids.shape[1] > 0 and C == 0:
            raise ValueError("estimation.ids is not empty but there are no clusters (C = 0)")
        if len({t.device for t in (sc, sz, vs, ids)}) != 1:
            raise ValueError("estimation.scores, sizes, value_sums and ids must be on one device")
    return G, Hg, D, Dv


def _check_bounds(sources: Sequence[KVSource], runs: RunTable, estimation: Estimation | None) -> None:
    """The run table and the estimation ids against the sources (reads them on the host)."""
    src, row, length = runs.src.cpu().long(), runs.row.cpu(), runs.length.cpu().long()
    off = runs.offsets.cpu().long()
    R = src.shape[0]
    if off[0] != 0 or off[-1] != R or bool((off[1:] < off[:-1]).any()):
        raise ValueError(f"runs.offsets must start at 0, be non-decreasing and end at R = {R}, got "
                         f"{off[0].item()}..{off[-1].item()}")
    if R:
        if bool(((src < 0) | (src >= len(sources))).any()):
            raise ValueError(f"runs.src must be in [0, {len(sources)}), got {src.min().item()}..{src.max().item()}")
        if bool((length < 0).any()):
            raise ValueError("runs.length must be >= 0")
        if bool((row < 0).any()):
            raise ValueError("runs.row must be >= 0")
        rows = torch.tensor([s[0].shape[0] for s in sources], dtype=torch.int64)
        over = row + length > rows[src]
        if bool(over.any()):
            i = int(torch.nonzero(over)[0, 0])
            raise ValueError(f"runs[{i}] = rows {row[i].item()}..{row[i].item() + length[i].item()} of source "
                             f"{src[i].item()} is past its {rows[src[i]].item()} rows (runs.row + runs.length)")
    if estimation is not None and estimation.ids.numel():
        ids, C = estimation.ids.cpu(), estimation.scores.shape[2]
        if bool(((ids < 0) | (ids >= C)).any()):
            raise ValueError(f"estimation.ids must be in [0, {C}), got {ids.min().item()}..{ids.max().item()}")


def _ext_ready() -> bool:
    from ._ext import has_cuda_ext

    return has_cuda_ext()


def kernel_misfit(q: torch.Tensor, sources: Sequence[KVSource], runs: RunTable, estimation: Estimation | None,
                   D: int, Dv: int, Hg: int) -> str | None:
    """Why the kernel cannot take these inputs (None: it can). Names the argument."""
    if not q.is_cuda:
        return f"q must be a CUDA tensor, got {q.device}"
    if D not in KERNEL_DIMS or Dv not in KERNEL_DIMS:
        return f"the kernel takes D and Dv in {KERNEL_DIMS}, got D = {D} (q), Dv = {Dv} (sources[0].v)"
    if Hg > MAX_GROUP:
        return f"the kernel takes at most {MAX_GROUP} query heads per slot, q has Hg = {Hg}"
    for i, s in enumerate(sources):
        for name, t in (("k", s[0]), ("v", s[1])):
            where = f"sources[{i}].{name}"
            if t.is_cuda:
                if t.device != q.device:
                    return f"{where} is on {t.device}, q on {q.device}"
            elif t.device.type != "cpu" or not t.is_pinned():
                return f"{where} must be on {q.device} or in pinned host memory (pin_memory()), got {t.device}"
            if not t.is_contiguous():
                return f"{where} must be contiguous"
            if t.data_ptr() % 16:
                return f"{where} must be 16-byte aligned"
    if runs.src.device != q.device:
        return f"runs must be on {q.device}, got {runs.src.device}"
    if estimation is not None and estimation.scores.device != q.device:
        return f"estimation must be on {q.device}, got {estimation.scores.device}"
    return None


def _use_cuda(backend: Any, q: torch.Tensor, sources: Sequence[KVSource], runs: RunTable,
              estimation: Estimation | None, D: int, Dv: int, Hg: int) -> bool:
    backend = _check_backend(backend)
    if backend == "torch":
        return False
    why = kernel_misfit(q, sources, runs, estimation, D, Dv, Hg)
    if backend == "auto":
        return why is None and _ext_ready()
    if why is not None:
        raise ValueError(f"backend='cuda': {why}")
    from ._ext import cuda_ext

    cuda_ext()  # RuntimeError saying why the extension is missing
    return True


# ------------------------------------------------------------------------------------------------ backends


def _cuda_attention(q: torch.Tensor, sources: Sequence[KVSource], runs: RunTable, estimation: Estimation | None,
                    scale: float, num_splits: int | None, est_splits: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    from ._ext import cuda_ext

    G = q.shape[0]
    E = 0 if estimation is None else estimation.ids.shape[1]
    sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if num_splits is None:
        num_splits = default_num_splits(G, q.device)
    est = [None] * 4 if estimation is None else [_dense(t) for t in estimation]
    return cuda_ext().sparse_decode_attention(
        _dense(q), [s[0] for s in sources], [s[1] for s in sources], runs.src.contiguous(),
        runs.row.contiguous(), runs.length.contiguous(), runs.offsets.contiguous(), *est, scale, num_splits,
        0 if E == 0 else (est_splits or estimation_splits(E, G, sms)))


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernel's vector loads); copies only when it is not."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _torch_attention(q: torch.Tensor, sources: Sequence[KVSource], runs: RunTable, estimation: Estimation | None,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: gather each slot's rows onto q's device, exact float32 attention, merge the estimation."""
    G, Hg, D = q.shape
    Dv = sources[0][1].shape[1]
    dev = q.device
    length = runs.length.cpu().long()
    total = int(length.sum())
    starts = torch.cumsum(length, 0) - length
    tok_run = torch.repeat_interleave(torch.arange(length.shape[0]), length)          # [total]
    tok_row = runs.row.cpu()[tok_run] + (torch.arange(total) - starts[tok_run])
    tok_src = runs.src.cpu().long()[tok_run]
    k = torch.empty(total, D, dtype=torch.float32, device=dev)
    v = torch.empty(total, Dv, dtype=torch.float32, device=dev)
    for i, s in enumerate(sources):
        sel = torch.nonzero(tok_src == i).flatten()
        if sel.numel():
            idx = tok_row[sel].to(s[0].device)
            k[sel.to(dev)] = s[0].index_select(0, idx).to(dev, torch.float32)
            v[sel.to(dev)] = s[1].index_select(0, idx).to(dev, torch.float32)
    bounds = torch.cat([starts, torch.tensor([total])])[runs.offsets.cpu().long()].tolist()  # slot token ranges
    qf = q.float()
    o = torch.zeros(G, Hg, Dv, dtype=torch.float32, device=dev)
    lse = torch.full((G, Hg), -math.inf, dtype=torch.float32, device=dev)
    for g in range(G):
        a, b = bounds[g], bounds[g + 1]
        if b > a:
            o[g], lse[g] = attention_with_lse(qf[g], k[a:b], v[a:b], scale)
    if estimation is not None and estimation.ids.shape[1]:
        o, lse = merge_partials([(o, lse), _torch_estimation(estimation, dev)])
    return o.to(q.dtype), lse


def _torch_estimation(est: Estimation, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimation partial: ``o [G, Hg, Dv]``, ``lse [G, Hg]`` (float32); empty clusters contribute nothing."""
    scores, sizes = est.scores.to(dev), est.sizes.to(dev)
    value_sums, ids = est.value_sums.to(dev), est.ids.to(dev)
    G, Hg, _ = scores.shape
    E, Dv = ids.shape[1], value_sums.shape[2]
    s = torch.gather(scores, 2, ids[:, None, :].expand(G, Hg, E))                    # [G, Hg, E]
    sz = torch.gather(sizes, 1, ids)[:, None, :]                                     # [G, 1, E]
    keep = sz > 0
    logw = torch.where(keep, s + torch.log(torch.where(keep, sz, torch.ones_like(sz))), -math.inf)
    lse = torch.logsumexp(logw, dim=-1)                                              # -inf when nothing kept
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.where(keep, torch.exp(s - safe[..., None]), 0.0)
    vals = torch.gather(value_sums, 1, ids[:, :, None].expand(G, E, Dv))             # [G, E, Dv]
    return torch.bmm(w, vals), lse
