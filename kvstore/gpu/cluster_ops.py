"""Cluster ranking, cluster selection and the copy kernel of the GPU wave path.

* :func:`cluster_scores` - the wave decode step (docs/design.md "Selection"): every
  query head of a KV head's group scores every centroid; the softmax over the
  clusters, summed over the group's heads, is the weight that ranks them.
* :func:`select_clusters` - the ``r`` best clusters (retrieval zone) and the
  next ``e`` (estimation zone).
* :func:`copy_rows` - copies runs of rows (clusters) between KV buffers in one
  launch, reading pinned host memory zero-copy (wave buffer admissions).
* :func:`cluster_order` - tokens sorted by cluster and the CSR offsets.
* :func:`cluster_store` - the clustered rows written in cluster order, with each
  cluster's value sum and radius (the index build, one pass over the KV).
* :func:`candidate_scores` - exact scores of the keys of each slot's candidate
  runs and each run's log-sum-exp.

Each op takes ``backend``: ``"torch"`` (the reference, any device),
``"cuda"`` (the kernel of ``kvstore._cuda``) or ``"auto"`` (the kernel when
the inputs are CUDA tensors and the extension loads, else torch).
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["cluster_scores", "quantize_rows", "dequantize_rows", "select_clusters", "copy_rows", "cluster_order", "cluster_store", "candidate_scores", "weighted_rows"]

BACKENDS = ("auto", "torch", "cuda")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HG = 32              # csrc/cuda/cluster_rank.h: kRankMaxHg (candidate_scores.h: kCandMaxHg)
_MAX_HG_TIMES_D = 8192    # csrc/cuda/cluster_rank.h: kRankMaxHgTimesD (candidate_scores.h: kCandMaxHgTimesD)
_COPY_BLOCK_BYTES = 1 << 15  # bytes of a run one block of the copy kernel moves (sets blocks_per_run)


# --------------------------------------------------------------------------- shared checks

def use_cuda_kernel(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve ``backend`` for ops on ``tensors``: True to run the CUDA kernel, False for torch.

    ``"cuda"`` with a non-CUDA tensor raises ValueError; ``"cuda"`` without the
    extension raises RuntimeError (from :func:`kvstore.gpu.cuda_ext`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "cuda":
        if not on_cuda:
            raise ValueError("backend='cuda' needs CUDA tensors (use backend='torch' or 'auto' on CPU)")
        from ._ext import cuda_ext

        cuda_ext()
        return True
    if not on_cuda:
        return False
    from ._ext import has_cuda_ext

    return has_cuda_ext()


def check_tensor(x: Any, name: str, ndim: int, dtypes: tuple[torch.dtype, ...] | None = None,
                 layout: str | None = None) -> torch.Tensor:
    """``x`` must be a torch.Tensor of rank ``ndim`` (and one of ``dtypes``); TypeError/ValueError naming it
    (and the expected ``layout``, e.g. ``"[B, Hkv, N, D]"``, when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {layout or f'{ndim}-D'}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d).replace('torch.', '') for d in dtypes)}, got {x.dtype}")
    return x


def check_count(v: Any, name: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


# --------------------------------------------------------------------------- ranking

def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[..., D]`` (centroids or keys, any float dtype) as int8 ``[..., D]`` and a float32 scale ``[...]``:
    each row divided by its largest magnitude over 127 and rounded, so that ``int8 * scale`` is the row to within
    half a step (a row of zeros gets scale 0)."""
    c = rows.float()
    scale = c.abs().amax(-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(c / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(rows: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 rows ``[..., D]`` from :func:`quantize_rows` (``scale`` None: already floats)."""
    return rows.float() if scale is None else rows.float() * scale[..., None]


def _int8_kernel_fits(q: torch.Tensor, centroids: torch.Tensor) -> bool:
    """Whether the tensor-core scores kernel takes int8 centroids for this q (csrc/cuda/cluster_rank.h)."""
    G, Hg, D = q.shape
    return (q.dtype in (torch.bfloat16, torch.float16) and D in (64, 128) and Hg <= 16
            and torch.cuda.get_device_capability(q.device)[0] >= 8 and q.is_contiguous()
            and centroids.is_contiguous() and q.data_ptr() % 16 == 0 and centroids.data_ptr() % 8 == 0)


def cluster_scores(q: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor, scale: float | None = None,
                   backend: str = "auto", radii: torch.Tensor | None = None, rank_radius: float = 0.0,
                   centroid_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every cluster with every query head and rank the clusters of each group.

    q ``[G, Hg, D]`` (bf16, fp16 or f32): the ``Hg`` query heads of each of the
    ``G`` KV-head slots; centroids ``[G, C, D]`` (q's dtype, or int8 with
    ``centroid_scale`` f32 ``[G, C]``: :func:`quantize_rows`); sizes f32
    ``[G, C]`` (``<= 0``: empty or padding cluster); scale: defaults to
    ``1 / sqrt(D)``. Returns

    * scores f32 ``[G, Hg, C]`` = ``(q . c) * scale`` (int8: ``(q . c_int8) * centroid_scale * scale``),
      ``-inf`` where the size is ``<= 0``;
    * probs f32 ``[G, C]`` = ``sum_j softmax_c(rank[g, j, :])``, the
      group-summed cluster weight (a group whose clusters are all empty gets 0),
      with ``rank = scores + rank_radius * |q_j| * radii[g, c] * scale`` when
      ``radii`` (f32 ``[G, C]``, each cluster's largest member distance from its
      centroid) is given, else ``rank = scores``.

    The kernel reads the centroids once (16-byte loads); accumulation in f32.
    Limits: ``Hg <= 32`` and ``Hg * D <= 8192``, ``G <= 65535``.
    """
    check_tensor(q, "q", 3, _FLOATS)
    check_tensor(centroids, "centroids", 3)
    check_tensor(sizes, "sizes", 2, (torch.float32,))
    G, Hg, D = q.shape
    if centroid_scale is None and centroids.dtype != q.dtype:
        raise TypeError(f"centroids must have q's dtype {q.dtype}, got {centroids.dtype}")
    if centroids.shape[0] != G or centroids.shape[2] != D:
        raise ValueError(f"centroids must be [G={G}, C, D={D}], got {tuple(centroids.shape)}")
    C = centroids.shape[1]
    if centroid_scale is not None:
        if centroids.dtype != torch.int8:
            raise TypeError(f"centroids with a centroid_scale must be int8, got {centroids.dtype}")
        check_tensor(centroid_scale, "centroid_scale", 2, (torch.float32,))
        if tuple(centroid_scale.shape) != (G, C) or centroid_scale.device != q.device:
            raise ValueError(f"centroid_scale must be [G={G}, C={C}] on q's device, got "
                             f"{tuple(centroid_scale.shape)} on {centroid_scale.device}")
    if tuple(sizes.shape) != (G, C):
        raise ValueError(f"sizes must be [G={G}, C={C}], got {tuple(sizes.shape)}")
    if D == 0 or Hg == 0:
        raise ValueError(f"q must have Hg >= 1 heads of D >= 1 dims, got shape {tuple(q.shape)}")
    if not (q.device == centroids.device == sizes.device):
        raise ValueError(f"q, centroids and sizes must be on one device, got {q.device}, {centroids.device}, "
                         f"{sizes.device}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if isinstance(rank_radius, bool) or not isinstance(rank_radius, (int, float)) or not (
            math.isfinite(rank_radius) and rank_radius >= 0):
        raise ValueError(f"rank_radius must be a finite number >= 0, got {rank_radius!r}")
    bonus = None                                                                   # [G, Hg] f32 or None
    if radii is not None and rank_radius:
        check_tensor(radii, "radii", 2, (torch.float32,))
        if tuple(radii.shape) != (G, C):
            raise ValueError(f"radii must be [G={G}, C={C}], got {tuple(radii.shape)}")
        if radii.device != q.device:
            raise ValueError(f"radii must be on q's device {q.device}, got {radii.device}")
        bonus_scale = float(rank_radius) * scale
        bonus = (q.float().norm(dim=2) if q.dtype == torch.float64                   # |q_h| (f32)
                 else torch.linalg.vector_norm(q, dim=2, dtype=torch.float32))       # one kernel
    kernel = use_cuda_kernel(backend, q, centroids, sizes)
    if kernel and centroid_scale is not None and not _int8_kernel_fits(q, centroids):
        # the kernel reads int8 centroids on its tensor-core path only: other shapes score dequantized copies
        centroids, centroid_scale = dequantize_rows(centroids, centroid_scale).to(q.dtype), None
    if kernel:
        if Hg > _MAX_HG or Hg * D > _MAX_HG_TIMES_D or G > 65535 or C >= 2 ** 31:
            raise ValueError(f"q [G={G}, Hg={Hg}, D={D}] with C={C} exceeds the kernel's limits "
                             f"(Hg <= {_MAX_HG}, Hg * D <= {_MAX_HG_TIMES_D}, G <= 65535); use backend='torch'")
        from ._ext import cuda_ext

        return cuda_ext().cluster_scores(q.contiguous(), centroids.contiguous(), sizes.contiguous(), scale,
                                         None if bonus is None else bonus.contiguous(),
                                         None if bonus is None else radii.contiguous(),
                                         1.0 if bonus is None else bonus_scale, centroid_scale)
    s = torch.bmm(q.float(), centroids.float().transpose(1, 2))                   # [G, Hg, C]
    s = (s if centroid_scale is None else s * centroid_scale[:, None, :]) * scale
    s = s.masked_fill((sizes <= 0)[:, None, :], -math.inf)
    rank = s if bonus is None else s + (bonus * bonus_scale)[..., None] * radii[:, None, :]
    m = rank.amax(dim=2, keepdim=True) if C else s.new_zeros(G, Hg, 1)
    w = torch.exp(rank - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))   # exp(-inf) = 0
    z = w.sum(dim=2, keepdim=True)
    probs = (w / torch.where(z > 0, z, torch.ones_like(z))).sum(dim=1)
    return s, probs


def _order_keys(probs: torch.Tensor) -> torch.Tensor:
    """int64 keys ``[G, C]`` whose descending order is probs descending, lower id first on ties."""
    p = probs.float() + 0.0                                      # -0.0 -> +0.0 (a tie, as in argsort)
    bits = p.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)   # float order as signed int order
    ids = torch.arange(probs.shape[1], device=probs.device, dtype=torch.int64)
    return ordered * (1 << 32) + ((1 << 32) - 1 - ids)


def select_clusters(probs: torch.Tensor, r: int, e: int, backend: str = "auto"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``r`` best clusters and the next ``e`` of each group.

    probs ``[G, C]`` (float, finite; from :func:`cluster_scores`), ``r + e <= C``.
    Returns retrieval ids int64 ``[G, r]`` and estimation ids int64 ``[G, e]``:
    under the order "probs descending, lower id first on ties" (the CPU
    reference's ``argsort(descending=True, stable=True)``), the first ``r`` and
    the next ``e`` clusters, each zone listed in **ascending id order** (the
    zones are sets to the attention; ascending ids are ascending rows of the
    sorted KV, and the kernel needs no sort).

    The kernel (one block per row) radix-selects the ``r``-th and the
    ``(r + e)``-th key side by side and compacts both zones in id order. The
    torch reference is one ``torch.topk`` over int64 keys that pack
    (probs, -id), so its cut is exact on ties too, then a sort of each zone.
    """
    check_tensor(probs, "probs", 2)
    if not probs.dtype.is_floating_point:
        raise TypeError(f"probs must be a float tensor, got {probs.dtype}")
    r, e = check_count(r, "r"), check_count(e, "e")
    G, C = probs.shape
    if r + e > C:
        raise ValueError(f"r + e = {r + e} exceeds the {C} clusters")
    if C >= 2 ** 32:
        raise ValueError(f"probs has {C} clusters, at most 2**32 - 1 are supported")
    kernel = use_cuda_kernel(backend, probs)
    if r + e == 0:
        z = torch.zeros(G, 0, dtype=torch.int64, device=probs.device)
        return z, z.clone()
    if kernel:
        from ._ext import cuda_ext

        return cuda_ext().select_clusters(probs.float().contiguous(), r, e)
    top = torch.topk(_order_keys(probs), r + e, dim=1, sorted=True).values
    ids = ((1 << 32) - 1) - (top & 0xFFFFFFFF)
    return ids[:, :r].sort(dim=1).values, ids[:, r:].sort(dim=1).values


def cluster_runs(ids: torch.Tensor, offsets: torch.Tensor, base: torch.Tensor, head_row: torch.Tensor,
                 head_len: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The run table of a wave decode step: the steady run of each slot, then its selected clusters.

    ids int64 ``[G, r]`` (clusters, from :func:`select_clusters`), offsets int64 ``[G, C + 1]`` (cluster ``c`` of
    slot ``g`` is rows ``offsets[g, c]:offsets[g, c + 1]`` of the slot), base int64 ``[G]`` (first row of each
    slot in the sorted KV), head_row int64 ``[G]`` / head_len int32 ``[G]`` (the steady run). Returns row int64
    ``[G, r + 1]`` and length int32 ``[G, r + 1]``: column 0 is the steady run, column ``1 + j`` cluster
    ``ids[g, j]`` at rows ``base[g] + offsets[g, c]``. An id outside ``[0, C)`` gives an empty run. One kernel
    launch on CUDA (instead of the gathers and concatenations of the torch reference).
    """
    check_tensor(ids, "ids", 2, (torch.int64,))
    check_tensor(offsets, "offsets", 2, (torch.int64,))
    G, r = ids.shape
    if offsets.shape[0] != G or offsets.shape[1] < 1:
        raise ValueError(f"offsets must be [G={G}, C + 1], got {tuple(offsets.shape)}")
    for name, t, dt in (("base", base, torch.int64), ("head_row", head_row, torch.int64),
                        ("head_len", head_len, torch.int32)):
        check_tensor(t, name, 1, (dt,))
        if t.shape[0] != G:
            raise ValueError(f"{name} must be [G={G}], got {tuple(t.shape)}")
        if t.device != ids.device:
            raise ValueError(f"{name} is on {t.device}, ids on {ids.device}")
    if offsets.device != ids.device:
        raise ValueError(f"offsets is on {offsets.device}, ids on {ids.device}")
    if use_cuda_kernel(backend, ids, offsets, base, head_row, head_len):
        from ._ext import cuda_ext

        return cuda_ext().cluster_runs(ids.contiguous(), offsets.contiguous(), base.contiguous(),
                                       head_row.contiguous(), head_len.contiguous())
    C = offsets.shape[1] - 1
    ok = (ids >= 0) & (ids < C)
    c = ids.clamp(0, max(C - 1, 0))
    start = torch.gather(offsets, 1, c)
    length = torch.where(ok, torch.gather(offsets, 1, c + 1) - start, 0).to(torch.int32)
    row = torch.where(ok, start + base[:, None], 0)
    return (torch.cat([head_row[:, None], row], 1),
            torch.cat([head_len[:, None], length], 1))


def cluster_order(assign: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens sorted by cluster: assign int ``[G, n]`` (cluster of each token, in ``[0, C)``) ->
    order int64 ``[G, n]`` (token ids, stable: input order within a cluster) and
    offsets int64 ``[G, C + 1]`` (cluster ``c`` of head ``g`` is ``order[g, offsets[g, c]:offsets[g, c + 1]]``).
    Runs on assign's device (torch ops)."""
    check_tensor(assign, "assign", 2, (torch.int64, torch.int32))
    C = check_count(C, "C", 1)
    G, n = assign.shape
    a = assign.to(torch.int64)
    order = torch.sort(a, dim=1, stable=True).indices
    counts = torch.bincount((torch.arange(G, device=a.device)[:, None] * C + a).reshape(-1), minlength=G * C)
    if counts.numel() != G * C:
        raise ValueError(f"assign has values outside [0, C={C})")
    offsets = torch.zeros(G, C + 1, dtype=torch.int64, device=a.device)
    offsets[:, 1:] = torch.cumsum(counts.reshape(G, C), dim=1)
    return order, offsets


def cluster_store(k: torch.Tensor, v: torch.Tensor, assign: torch.Tensor, order: torch.Tensor,
                  offsets: torch.Tensor, centroids: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Write clustered rows in cluster order; return each cluster's value sum and radius.

    k ``[S, m, D]``, v ``[S, m, Dv]`` (one dtype; rows contiguous, slots may be strided), assign int64 ``[S, m]``
    and ``order, offsets = cluster_order(assign, C)``, centroids f32 ``[S, C, D]``. ``out_k[:, :m]`` /
    ``out_v[:, :m]`` (``[S, R >= m, D / Dv]``, k's dtype, on k's device) receive ``k[s, order[s]]`` /
    ``v[s, order[s]]``. Returns value sums f32 ``[S, C, Dv]`` and radii f32 ``[S, C]`` (the largest distance of
    a member key from its centroid, 0 for an empty cluster; :func:`kvstore.wave.cluster_radii`).
    """
    from ..wave import cluster_radii

    S, m, D = k.shape
    Dv = v.shape[-1]
    C = centroids.shape[1]
    if (use_cuda_kernel(backend, k, v, order, offsets, centroids, out_k, out_v)
            and k.dtype in _FLOATS and v.dtype == k.dtype and out_k.dtype == k.dtype and out_v.dtype == k.dtype):
        from ._ext import cuda_ext

        return cuda_ext().cluster_store(k, v, order, offsets, centroids.float().contiguous(), out_k, out_v)
    vs = torch.zeros(S, C, Dv, dtype=torch.float32, device=k.device)
    vs.scatter_add_(1, assign[..., None].expand(S, m, Dv), v.float())
    radii = cluster_radii(k, centroids, assign)
    out_k[:, :m].copy_(torch.gather(k, 1, order[..., None].expand(S, m, D)))
    out_v[:, :m].copy_(torch.gather(v, 1, order[..., None].expand(S, m, Dv)))
    return vs, radii


# --------------------------------------------------------------------------- copies

def _run_rows(start: torch.Tensor, lens: torch.Tensor, total: int) -> torch.Tensor:
    """Rows ``start[i] .. start[i] + lens[i]`` of every run, concatenated ([total] int64)."""
    first = torch.cumsum(lens, 0) - lens
    return (torch.repeat_interleave(start - first, lens, output_size=total)
            + torch.arange(total, device=lens.device))


def copy_rows(dst_k: torch.Tensor, dst_v: torch.Tensor | None, src_k: torch.Tensor, src_v: torch.Tensor | None,
              src_row: torch.Tensor, dst_row: torch.Tensor, length: torch.Tensor, backend: str = "auto",
              check_bounds: bool = False, max_length: int | None = None) -> None:
    """Copy ``M`` runs of rows in one launch, in place.

    For every run ``i`` with ``length[i] > 0``:
    ``dst_k[dst_row[i] : dst_row[i] + length[i]] = src_k[src_row[i] : src_row[i] + length[i]]``,
    and the same for v.

    dst_k ``[rows_d, D]``, dst_v ``[rows_d, Dv]``: CUDA, contiguous; src_k
    ``[rows_s, D]``, src_v ``[rows_s, Dv]``: CUDA or pinned CPU (read
    zero-copy by the kernel), dst's dtype; dst_v and src_v may both be None.
    src_row, dst_row int64 ``[M]``, length int32 ``[M]`` (CUDA for the kernel).

    A run that would read or write outside the tensors (or starts below 0) is
    skipped by both backends; ``check_bounds=True`` raises ValueError for it
    instead (one device sync). Runs whose destinations overlap give an
    unspecified mix. ``max_length`` (an upper bound of ``length``) lets the
    kernel split long runs over several blocks; without it a run is one block.
    """
    check_tensor(dst_k, "dst_k", 2)
    check_tensor(src_k, "src_k", 2)
    if (dst_v is None) != (src_v is None):
        raise ValueError("give both dst_v and src_v, or neither")
    pairs = [("k", dst_k, src_k)] + ([] if dst_v is None else [("v", dst_v, src_v)])
    for tag, d, s in pairs:
        check_tensor(d, f"dst_{tag}", 2)
        check_tensor(s, f"src_{tag}", 2)
        if d.dtype != s.dtype:
            raise TypeError(f"src_{tag} must have dst_{tag}'s dtype {d.dtype}, got {s.dtype}")
        if d.shape[1] != s.shape[1]:
            raise ValueError(f"src_{tag} has {s.shape[1]} columns, dst_{tag} {d.shape[1]}")
        if not d.is_contiguous():
            raise ValueError(f"dst_{tag} must be contiguous")
        if not s.is_contiguous():
            raise ValueError(f"src_{tag} must be contiguous")
    if dst_v is not None:
        if dst_v.shape[0] != dst_k.shape[0]:
            raise ValueError(f"dst_v has {dst_v.shape[0]} rows, dst_k {dst_k.shape[0]}")
        if src_v.shape[0] != src_k.shape[0]:
            raise ValueError(f"src_v has {src_v.shape[0]} rows, src_k {src_k.shape[0]}")
    check_tensor(src_row, "src_row", 1, (torch.int64,))
    check_tensor(dst_row, "dst_row", 1, (torch.int64,))
    check_tensor(length, "length", 1, (torch.int32,))
    M = src_row.shape[0]
    if dst_row.shape[0] != M or length.shape[0] != M:
        raise ValueError(f"src_row, dst_row and length must all be [M], got {M}, {dst_row.shape[0]}, "
                         f"{length.shape[0]}")
    if max_length is not None:
        check_count(max_length, "max_length")
    rows_s, rows_d = src_k.shape[0], dst_k.shape[0]
    lens = length.to(torch.int64)
    if check_bounds and M:
        bad = (lens < 0) | (src_row < 0) | (dst_row < 0) | (src_row + lens > rows_s) | (dst_row + lens > rows_d)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"run {i} (src_row={int(src_row[i])}, dst_row={int(dst_row[i])}, "
                             f"length={int(length[i])}) is outside src ({rows_s} rows) or dst ({rows_d} rows)")
    if M == 0:
        return
    src_ok = all(s.is_cuda or s.is_pinned() for _, _, s in pairs)
    if use_cuda_kernel(backend, dst_k, src_row, dst_row, length, *(d for _, d, _ in pairs[1:])) and src_ok:
        from ._ext import cuda_ext

        row_bytes = sum(d.shape[1] * d.element_size() for _, d, _ in pairs)
        blocks = 1 if max_length is None else max(1, min(65535, -(-max_length * row_bytes // _COPY_BLOCK_BYTES)))
        cuda_ext().copy_rows(dst_k, dst_v, src_k, src_v, src_row, dst_row, length, blocks)
        return
    if backend == "cuda" and not src_ok:
        raise ValueError("backend='cuda' needs src_k / src_v on the GPU or in pinned CPU memory")
    ok = (lens > 0) & (src_row >= 0) & (dst_row >= 0) & (src_row + lens <= rows_s) & (dst_row + lens <= rows_d)
    lens = torch.where(ok, lens, torch.zeros_like(lens))
    total = int(lens.sum())
    if total == 0:
        return
    srows = _run_rows(src_row, lens, total)
    drows = _run_rows(dst_row, lens, total).to(dst_k.device)
    for _, d, s in pairs:
        d[drows] = s[srows.to(s.device)].to(d.device)


# --------------------------------------------------------------------------- candidate scores

def candidate_scores(q: torch.Tensor, keys: torch.Tensor, run_row: torch.Tensor, run_len: torch.Tensor,
                     run_pos: torch.Tensor, width: int, scale: float | None = None, backend: str = "auto",
                     key_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the keys of each slot's candidate runs (the wave method's second stage).

    q ``[G, Hg, D]``; keys ``[rows, D]`` (q's dtype; the sorted KV of every slot; or int8 with ``key_scale`` f32
    ``[rows]``, :func:`quantize_rows`: row ``i`` is then ``keys[i] * key_scale[i]``); run_row int64 ``[G, r]``: the
    first row of each run in ``keys``; run_len int64 ``[G, r]``: its rows (0 allowed); run_pos int64 ``[G, r]``:
    where the run starts in the slot's padded list (the exclusive prefix sum of run_len); ``width``: the padded
    list's length (``>= run_pos + run_len`` of every run). Returns

    * scores float32 ``[G, Hg, width]``: position ``run_pos[g, j] + i`` holds ``(q[g, h] . keys[run_row[g, j] + i])
      * scale``; positions no run covers hold ``-inf``;
    * run_lse float32 ``[G, Hg, r]``: the log-sum-exp of each run's scores (``-inf`` for an empty run).

    The kernel (a tensor-core kernel over the rows of 64 runs a block for int8 keys with 16-bit queries, else a
    warp per run) reads each key row once; the torch reference gathers the rows. Both accumulate
    in f32. Runs that leave ``keys`` or the width (``run_row < 0``, ``run_len < 0``, ``run_pos < 0``,
    ``run_row + run_len > rows``, ``run_pos + run_len > width``) are invalid input: the kernel skips them (their
    positions stay ``-inf``, their run_lse is NaN), the reference's result for them is unspecified.
    Kernel limits: ``Hg <= 32``, ``Hg * D <= 8192``, ``D >= 1``, ``G * r < 2**31``.
    """
    check_tensor(q, "q", 3, _FLOATS)
    check_tensor(keys, "keys", 2)
    G, Hg, D = q.shape
    if key_scale is None and (keys.dtype != q.dtype or keys.shape[1] != D):
        raise ValueError(f"keys must be [rows, D={D}] of q's dtype {q.dtype}, got {keys.dtype} {tuple(keys.shape)}")
    if key_scale is not None:
        if keys.dtype != torch.int8 or keys.shape[1] != D:
            raise ValueError(f"keys with a key_scale must be int8 [rows, D={D}], got {keys.dtype} "
                             f"{tuple(keys.shape)}")
        if key_scale.dtype != torch.float32 or tuple(key_scale.shape) != (keys.shape[0],) \
                or key_scale.device != keys.device:
            raise ValueError(f"key_scale must be float32 [rows={keys.shape[0]}] on the keys' device, got "
                             f"{key_scale.dtype} {tuple(key_scale.shape)} on {key_scale.device}")
    for name, t in (("run_row", run_row), ("run_len", run_len), ("run_pos", run_pos)):
        check_tensor(t, name, 2, (torch.int64,))
        if t.shape[0] != G or t.shape != run_row.shape:
            raise ValueError(f"{name} must be [G={G}, r] like run_row, got {tuple(t.shape)}")
    width = check_count(width, "width")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    r = run_row.shape[1]
    if use_cuda_kernel(backend, q, keys, run_row, run_len, run_pos):
        from ._ext import cuda_ext

        if Hg > _MAX_HG or Hg * D > _MAX_HG_TIMES_D or D == 0 or G * r >= 2 ** 31:
            raise ValueError(f"q [G={G}, Hg={Hg}, D={D}] with r={r} exceeds the kernel's limits (Hg <= {_MAX_HG}, "
                             f"Hg * D <= {_MAX_HG_TIMES_D}, D >= 1, G * r < 2**31); use backend='torch'")
        if hasattr(cuda_ext(), "candidate_scores"):
            return cuda_ext().candidate_scores(q.contiguous(), keys.contiguous(), run_row.contiguous(),
                                               run_len.contiguous(), run_pos.contiguous(), width, scale,
                                               key_scale=None if key_scale is None else key_scale.contiguous())
    dev = q.device
    pos = torch.arange(width, device=dev).expand(G, width).contiguous()
    end = run_pos + run_len
    j = torch.searchsorted(end, pos, right=True).clamp(max=max(r - 1, 0))     # [G, width] run holding pos
    if r:
        inside = (pos >= run_pos.gather(1, j)) & (pos < end.gather(1, j))
        row = run_row.gather(1, j) + pos - run_pos.gather(1, j)
    else:
        inside = torch.zeros(G, width, dtype=torch.bool, device=dev)
        row = torch.zeros(G, width, dtype=torch.int64, device=dev)
    row = torch.where(inside, row, 0).clamp(0, max(keys.shape[0] - 1, 0))
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = keys[row.reshape(-1)].reshape(G, width, D).to(ct) if keys.shape[0] else keys.new_zeros(G, width, D).to(ct)
    if key_scale is not None and keys.shape[0]:
        k = k * key_scale[row].to(ct)[..., None]
    s = (torch.bmm(q.to(ct), k.transpose(1, 2)) * scale).masked_fill(~inside[:, None, :], -math.inf)
    run_of = torch.where(inside, j, r)                                          # r: a bin for padding
    m = torch.full((G, Hg, r + 1), -math.inf, device=dev, dtype=ct).scatter_reduce(
        2, run_of[:, None, :].expand(G, Hg, width), s, "amax")
    ref = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    tot = torch.zeros(G, Hg, r + 1, device=dev, dtype=ct).scatter_add_(
        2, run_of[:, None, :].expand(G, Hg, width), torch.exp(s - ref.gather(2, run_of[:, None, :].expand(G, Hg, width))))
    lse = torch.where(tot > 0, ref + torch.log(tot), torch.full_like(tot, -math.inf))
    return s, lse[..., :r]


# --------------------------------------------------------------------------- weighted rows

def weighted_rows(w: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``out[g, h] = sum_i w[g, h, i] * values[rows[g, i]]``: the value part of attention over rows whose weights
    are already known (the wave step's exact tokens, and its clusters' mean values).

    w float32/float64 ``[G, Hg, t]``; rows int64 ``[G, t]`` (``-1``: skipped); values ``[R, Dv]``. Returns
    ``[G, Hg, Dv]`` in w's dtype. The kernel (float32 w, ``Dv <= 256``) reads each row once and adds the sums of
    a slot's blocks with atomics; the torch reference gathers the rows.
    """
    check_tensor(w, "w", 3, (torch.float32, torch.float64))
    check_tensor(rows, "rows", 2, (torch.int64,))
    check_tensor(values, "values", 2, (*_FLOATS, torch.float64))
    G, Hg, t = w.shape
    if tuple(rows.shape) != (G, t):
        raise ValueError(f"rows must be [G={G}, t={t}] like w, got {tuple(rows.shape)}")
    R, Dv = values.shape
    if w.dtype == torch.float32 and 1 <= Dv <= 256 and G < 65536 and use_cuda_kernel(backend, w, rows, values):
        from ._ext import cuda_ext

        if hasattr(cuda_ext(), "weighted_rows"):
            return cuda_ext().weighted_rows(w.contiguous(), rows.contiguous(), values.contiguous())
    ok = (rows >= 0) & (rows < R)
    if R == 0 or t == 0:
        return w.new_zeros(G, Hg, Dv)
    vals = values[torch.where(ok, rows, 0).reshape(-1)].reshape(G, t, Dv).to(w.dtype)
    return torch.bmm(w * ok[:, None, :], vals)
