"""Segmented spherical k-means of many heads at once, on the GPU.

The algorithm of the CPU reference (:mod:`kvstore.wave`, ``csrc/kmeans.cpp``)
applied to each of ``G`` heads: centre by the head mean, split into segments
(:func:`kvstore.wave.segment_bounds`), ``clusters_for`` clusters a segment,
init rows :func:`kvstore.wave._init_rows` (``seed + s`` for segment ``s``),
``iters`` spherical iterations (assign to the L2-normalised centroid of
largest inner product, first maximum wins; centroid = mean of the members; an
emptied cluster is re-seeded with the token farthest from its centroid's ray,
as the reference does), one final assignment, then the centroids are the plain
means of the members' (un-centred) keys.

All heads and all equal-length segments of a head are assigned at once. With
16-bit keys on CUDA (the default, ``matmul="split"``) a tensor-core kernel
scores each key against the centroid directions split into two 16-bit terms
(f32 precision of the direction; the head mean enters as a per-centroid
bias, so the keys are used exactly as stored) and keeps each key's best
centroid in registers; otherwise one batched matmul a chunk at a time gives
the scores ``[batches, L, C]``, then an argmax. The centroid update is :func:`cluster_means` (a CUDA kernel
summing the members in float64 in a fixed order, or its torch reference with
``index_add_``). Both backends share everything else, so they agree up to
float rounding of the matmul.

Unlike the CPU reference, clusters that end empty are kept (size 0, zero
centroid), so that every head has the same number of clusters.
"""
from __future__ import annotations

import functools
import math

import torch

from ..wave import _MASK64, _init_rows, clusters_for, segment_bounds
from .cluster_ops import check_count, check_tensor, use_cuda_kernel

__all__ = ["segmented_kmeans_gpu", "cluster_means", "kmeans_objective"]

MATMULS = ("auto", "split", "split_late", "fp32", "fp16", "bf16")
_PRECISE_PASSES = 2      # split_late: the last assignment passes that take both terms of the directions
_SCORE_BYTES = 1 << 28   # bytes of one f32 score chunk [batches, L, C]
_FP16_MAX = 60000.0      # centred keys beyond this (in absolute value) use bf16 instead of fp16
_PAD_SEGMENTS = True     # the split kernel takes all segments in one padded batch (tests compare with False)


def cluster_means(x: torch.Tensor, assign: torch.Tensor, C: int, fallback: torch.Tensor | None = None,
                  backend: str = "auto", shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster's members, for ``B`` independent batches.

    x ``[B, L, D]`` (f32, fp16 or bf16), assign int64 ``[B, L]`` (cluster of
    each row, in ``[0, C)``), fallback f32 ``[B, C, D]`` or None, shift f32
    ``[B, D]`` or None. Returns means f32 ``[B, C, D]`` (sums in float64,
    divided by the count, minus the batch's shift in float64, rounded to f32:
    the means of the rows centred by ``shift``, read as stored) and counts
    int64 ``[B, C]``; an empty cluster's mean is its fallback row, or zeros.
    The kernel (CUDA) lists the members by a stable sort and sums them in
    that order without atomics, so it is deterministic.
    """
    check_tensor(x, "x", 3, (torch.float32, torch.float16, torch.bfloat16))
    check_tensor(assign, "assign", 2, (torch.int64,))
    C = check_count(C, "C", 1)
    B, L, D = x.shape
    if tuple(assign.shape) != (B, L):
        raise ValueError(f"assign must be [B={B}, L={L}], got {tuple(assign.shape)}")
    if fallback is not None:
        check_tensor(fallback, "fallback", 3, (torch.float32,))
        if tuple(fallback.shape) != (B, C, D):
            raise ValueError(f"fallback must be [B={B}, C={C}, D={D}], got {tuple(fallback.shape)}")
    if shift is not None:
        check_tensor(shift, "shift", 2, (torch.float32,))
        if tuple(shift.shape) != (B, D):
            raise ValueError(f"shift must be [B={B}, D={D}], got {tuple(shift.shape)}")
    if any(t is not None and t.device != x.device for t in (assign, fallback, shift)):
        raise ValueError("x, assign, fallback and shift must be on one device")
    dev = x.device
    flat = (torch.arange(B, device=dev)[:, None] * C + assign).reshape(-1)
    counts = torch.zeros(B * C, dtype=torch.int64, device=dev)
    counts.index_add_(0, flat, torch.ones_like(flat))
    tensors = tuple(t for t in (x, assign, fallback, shift) if t is not None)
    if use_cuda_kernel(backend, *tensors):
        from ._ext import cuda_ext

        key = flat.to(torch.int32) if B * C < 2 ** 31 else flat
        order = torch.sort(key, stable=True).indices
        offsets = torch.zeros(B * C + 1, dtype=torch.int64, device=dev)
        offsets[1:] = torch.cumsum(counts, 0)
        fb = None if fallback is None else fallback.reshape(B * C, D).contiguous()
        sh = None if shift is None else shift.contiguous()
        means = cuda_ext().kmeans_means(x.reshape(B * L, D).contiguous(), order, offsets, fb, sh)
        return means.reshape(B, C, D), counts.reshape(B, C)
    sums = torch.zeros(B * C, D, dtype=torch.float64, device=dev)
    sums.index_add_(0, flat, x.reshape(B * L, D).double())
    means = sums / counts.clamp_min(1)[:, None]
    if shift is not None:
        means = means - shift.double().repeat_interleave(C, 0)
    means = means.float()
    if fallback is not None or shift is not None:  # an empty cluster: its fallback row, or zeros
        means = torch.where((counts == 0)[:, None], 0.0 if fallback is None else fallback.reshape(B * C, D), means)
    return means.reshape(B, C, D), counts.reshape(B, C)


@functools.lru_cache(maxsize=None)
def _bmm_out_dtype_works(device: str) -> bool:
    """Whether ``torch.bmm(a, b, torch.float32)`` (fp16/bf16 in, f32 out) runs on this CUDA device."""
    try:
        a = torch.ones(1, 2, 2, dtype=torch.float16, device=device)
        return torch.bmm(a, a, torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _split_kernel(keys: torch.Tensor, backend: str) -> bool:
    """Whether the tensor-core assignment kernel takes these keys (16-bit, CUDA, a supported head size)."""
    if not use_cuda_kernel(backend, keys):
        return False
    from ._ext import cuda_ext

    return bool(cuda_ext().kmeans_assign_supported(keys))


def _pick_matmul(matmul: str, keys: torch.Tensor, backend: str) -> torch.dtype | str:
    """How the assignment scores are computed: ``"split"``, ``"split_late"`` or the input dtype of a matmul (products accumulate
    in f32 whatever it is). keys: the (uncentred) keys as given."""
    if matmul == "auto":
        # fp32 where the kernel does not run: on an H200 fp16 inputs left the k-means objective 5.5% worse than
        # the CPU reference on clustered keys with duplicates
        return "split" if keys.dtype in (torch.float16, torch.bfloat16) and _split_kernel(keys, backend) \
            else torch.float32
    if matmul in ("split", "split_late"):
        if keys.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"matmul={matmul!r} needs bf16 or fp16 keys, got {keys.dtype}")
        return matmul
    if matmul == "fp16" and keys.is_cuda and not _bmm_out_dtype_works(str(keys.device)):
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[matmul]


def _scores(xm: torch.Tensor, cm: torch.Tensor) -> torch.Tensor:
    """f32 ``xm @ cm^T`` ([b, L, D] x [b, C, D] -> [b, L, C]) of inputs in the matmul dtype."""
    if xm.dtype == torch.float32:
        return torch.bmm(xm, cm.transpose(1, 2))
    if xm.is_cuda and _bmm_out_dtype_works(str(xm.device)):
        return torch.bmm(xm, cm.transpose(1, 2), torch.float32)
    return torch.bmm(xm.float(), cm.float().transpose(1, 2))  # same rounding of the inputs, f32 products


def _normalised(c: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (in float64, as the reference; zero rows stay zero)."""
    cd = c.double()
    return (cd / cd.norm(dim=-1, keepdim=True).clamp_min(1e-300)).float()


def _chunked_best(scores, B: int, L: int, C: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise max and argmax (first maximum wins) of the [B, L, C] f32 scores that ``scores(b0, b1, l0, l1)``
    gives a chunk at a time (at most _SCORE_BYTES of them)."""
    best = torch.empty(B, L, dtype=torch.float32, device=device)
    arg = torch.empty(B, L, dtype=torch.int64, device=device)
    rows = max(1, min(L, _SCORE_BYTES // (4 * C)))   # rows of one batch per chunk (long segments)
    step = max(1, _SCORE_BYTES // (4 * L * C)) if rows == L else 1
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        for l0 in range(0, L, rows):
            l1 = min(L, l0 + rows)
            torch.max(scores(b0, b1, l0, l1), dim=2, out=(best[b0:b1, l0:l1], arg[b0:b1, l0:l1]))
    return best, arg


def _assign(xm: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best normalised centroid of every row: xm ``[B, L, D]`` (matmul dtype), c f32 ``[B, C, D]`` ->
    (best score f32 ``[B, L]``, local cluster id int64 ``[B, L]``), first maximum wins."""
    B, L, _ = xm.shape
    cm = _normalised(c).to(xm.dtype)
    return _chunked_best(lambda b0, b1, l0, l1: _scores(xm[b0:b1, l0:l1], cm[b0:b1]), B, L, c.shape[1], xm.device)


def split_directions(c: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit directions of the centroids c f32 ``[B, C, D]`` (f32, as :func:`_normalised`) and the same as two
    terms of the 16-bit ``dtype``, ``[B, 2, C, D]``, whose sum is the direction to about 2^-17 of each entry."""
    u = _normalised(c)
    hi = u.to(dtype)
    return u, torch.stack([hi, (u - hi.float()).to(dtype)], 1)


def _assign_split(raw: torch.Tensor, mu: torch.Tensor, c: torch.Tensor, kernel: bool,
                  ncent: torch.Tensor | None = None, precise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_assign` of the centred keys ``raw - mu`` computed from the stored keys: raw ``[B, L, D]`` (16-bit),
    mu f32 ``[B, D]`` (the head mean of each batch), c f32 ``[B, C, D]``. A key's score is raw . u - mu . u with
    u the direction split into two 16-bit terms; ``kernel``: on tensor cores, scores kept in registers. ncent
    int32 ``[B]`` or None: batch b's centroids are 0 .. ncent[b] - 1 only. ``precise=False``: the high term
    alone (the direction rounded to 16 bits; half the tensor-core work)."""
    B, L, _ = raw.shape
    if kernel:  # the kernel derives the directions, their split and the bias itself, the same way
        from ._ext import cuda_ext

        return cuda_ext().kmeans_assign(raw, c.contiguous(), mu.contiguous(), ncent, precise)
    u, terms = split_directions(c, raw.dtype)
    bias = torch.bmm(u.double(), mu.double()[:, :, None]).squeeze(2).float()                # [B, C]
    if ncent is not None:
        bias = bias.masked_fill(torch.arange(c.shape[1], device=c.device)[None, :] >= ncent[:, None], math.inf)
    w = terms[:, 0].float() + terms[:, 1].float() if precise else terms[:, 0].float()  # the sum is exact in f32
    return _chunked_best(lambda b0, b1, l0, l1: torch.bmm(raw[b0:b1, l0:l1].float(), w[b0:b1].transpose(1, 2))
                         - bias[b0:b1, None, :], B, L, c.shape[1], raw.device)


def _centred_norm2(x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """Squared norms (float64 ``[B, L]``) of the centred rows ``x - shift`` (x ``[B, L, D]``, shift f32 ``[B, D]``
    or None), at most 2^25 doubles a chunk."""
    B, L, D = x.shape
    step = max(1, (1 << 25) // max(1, L * D))
    parts = []
    for b0 in range(0, B, step):
        xb = x[b0:b0 + step].double()
        parts.append((xb if shift is None else xb - shift[b0:b0 + step].double()[:, None]).pow(2).sum(2))
    return torch.cat(parts)


def _reseed(x: torch.Tensor, c: torch.Tensor, empty: torch.Tensor, best: torch.Tensor, norm2: torch.Tensor,
            shift: torch.Tensor | None = None) -> None:
    """Re-seed the empty clusters in place, as the reference: in each batch the j-th empty
    cluster (by id) takes the j-th token farthest from its centroid's ray (ties: lower index).
    x ``[B, L, D]`` (the rows x - shift are the centred tokens; shift f32 ``[B, D]`` or None), c f32 ``[B, C, D]``,
    empty bool ``[B, C]``, best f32 ``[B, L]``, norm2 = :func:`_centred_norm2` ``(x, shift)``."""
    eb = torch.nonzero(empty.any(1)).flatten()
    norm2 = norm2[eb]
    b = best[eb].double().clamp_min(0)
    resid = norm2 - b * b                                              # [E, L]
    far = torch.sort(-resid, dim=1, stable=True).indices             # [E, L]
    em = empty[eb]
    rank = torch.cumsum(em.to(torch.int64), 1) - 1                   # rank among the batch's empties
    bi, ci = torch.nonzero(em, as_tuple=True)
    rows = x[eb[bi], far[bi, rank[bi, ci]]].float()
    c[eb[bi], ci] = rows if shift is None else rows - shift[eb[bi]]


def _iterate(x: torch.Tensor, c: torch.Tensor, iters: int, assign, backend: str, pad: torch.Tensor | None = None,
             valid: torch.Tensor | None = None, precise_from: int = 0, shift: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Spherical k-means of B batches: x ``[B, L, D]`` (the tokens, centred: ``x - shift`` with shift f32
    ``[B, D]`` where given, so 16-bit keys are read as stored), c f32 ``[B, C, D]`` (init),
    ``assign(c, precise) -> (best, arg)`` the assignment step (``precise``: from pass ``precise_from`` on, of the
    ``iters + 1``). Batches of different sizes padded to one: pad bool
    ``[B, L]`` marks rows that are not tokens (they join no cluster), valid bool ``[B, C]`` the batch's clusters
    (the others stay empty and are never re-seeded). Returns the final assignment int64 ``[B, L]`` (C on pad rows)."""
    C = c.shape[1]
    norm2 = None  # the centred rows' squared norms, computed at the first re-seed
    for it in range(iters + 1):
        best, a = assign(c, it >= precise_from)
        if pad is not None:
            a = a.masked_fill(pad, C)                      # a cluster of their own, dropped below
            best = best.masked_fill(pad, math.inf)         # never the farthest token of a re-seed
        if it == iters:
            return a
        if pad is None:
            c, cnt = cluster_means(x, a, C, fallback=c, backend=backend, shift=shift)
        else:
            c, cnt = cluster_means(x, a, C + 1, fallback=torch.nn.functional.pad(c, (0, 0, 0, 1)), backend=backend,
                                   shift=shift)
            c, cnt = c[:, :C], cnt[:, :C]
        empty = cnt == 0
        if valid is not None:
            empty &= valid
        if bool(empty.any()):
            if norm2 is None:
                norm2 = _centred_norm2(x, shift)
            _reseed(x, c, empty, best, norm2, shift)
    raise AssertionError("unreachable")  # pragma: no cover


def _kmeans_padded(keys: torch.Tensor, mean: torch.Tensor, bounds: list[int], cs: list[int],
                   cbase: list[int], iters: int, seed: int, backend: str, assign: torch.Tensor,
                   kernel: bool = True, precise_from: int = 0) -> None:
    """matmul="split" with all segments of every head in one batch, the last (of another length) padded: one
    pass of launches instead of one a run of equal segments (the tensor-core kernel's results do not depend on
    the batch; ``kernel=False``: the torch products). The 16-bit keys are the only copy of the tokens (centred
    by ``mean`` f32 [G, D] where used). Writes ``assign`` [G, n] in place."""
    G, n, D = keys.shape
    dev = keys.device
    nseg = len(bounds) - 1
    lens = [bounds[s + 1] - bounds[s] for s in range(nseg)]
    L, C, f = max(lens), max(cs), nseg - 1            # segments before the last are all of one length
    seg = lens[0]
    R = keys.new_empty(G, nseg, L, D)
    if f:
        R[:, :f, :seg] = keys[:, :bounds[f]].reshape(G, f, seg, D)
    R[:, f, :lens[f]] = keys[:, bounds[f]:]
    if lens[f] < L:
        R[:, f, lens[f]:] = 0
    B = G * nseg
    R = R.view(B, L, D)
    rows = torch.tensor([_init_rows(lens[s], cs[s], seed + s) + [0] * (C - cs[s]) for s in range(nseg)],
                        dtype=torch.int64, device=dev)
    ncent = torch.tensor(cs, dtype=torch.int32, device=dev).repeat(G)                 # [B]: b = g * nseg + s
    valid = torch.arange(C, device=dev)[None, :] < ncent[:, None]
    mu = mean.repeat_interleave(nseg, 0)                                              # [B, D]
    c0 = R.view(G, nseg, L, D)[:, torch.arange(nseg, device=dev)[:, None], rows].reshape(B, C, D)
    c0 = (c0.float() - mu[:, None]) * valid[..., None]
    pad = None
    if any(x_ != L for x_ in lens):
        pad = torch.arange(L, device=dev)[None, :] >= torch.tensor(lens, device=dev).repeat(G)[:, None]

    def assign_step(c: torch.Tensor, precise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _assign_split(R, mu, c, kernel, ncent, precise)

    a = _iterate(R, c0, iters, assign_step, backend, pad, None if min(cs) == C else valid,
                 precise_from, shift=mu).view(G, nseg, L)
    base = torch.tensor(cbase[:nseg], dtype=torch.int64, device=dev)
    if f:
        assign[:, :bounds[f]] = (a[:, :f, :seg] + base[:f, None]).reshape(G, f * seg)
    assign[:, bounds[f]:] = a[:, f, :lens[f]] + cbase[f]


def segmented_kmeans_gpu(keys: torch.Tensor, tokens_per_cluster: int = 16, segment_len: int = 8192,
                         iters: int = 10, seed: int = 0, backend: str = "auto", matmul: str = "auto"
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segmented spherical k-means of ``G`` heads at once.

    keys ``[G, n, D]`` (any float dtype, CUDA or CPU): G independent heads of n
    tokens each. Per head: the algorithm of :func:`kvstore.wave._kmeans_torch`
    (see the module docstring), except that clusters that end empty are kept
    with size 0 and a zero centroid, so every head has the same ``C`` =
    sum over segments of ``clusters_for(segment length, tokens_per_cluster)``.

    matmul: how the assignment scores are computed, products summed in f32:
    ``"split"`` (16-bit keys only: the stored keys against the centroid
    directions as two 16-bit terms, on tensor cores where the kernel runs,
    else the same products in f32 torch), ``"split_late"`` (the same, but
    passes before the last ``_PRECISE_PASSES`` take the high term alone:
    the directions rounded to 16 bits, half the tensor-core work), ``"fp32"`` (torch's f32 matmul of
    the centred keys: TF32 on CUDA only if the user enabled it), ``"fp16"``,
    ``"bf16"`` (the centred keys and directions rounded), or ``"auto"``
    (split where the kernel takes the keys, else fp32: fp16 inputs cost 5.5%
    of the objective on clustered keys in a GPU test). ``backend`` picks the
    centroid update (:func:`cluster_means`) and whether the split kernel may
    run.

    Returns assign int64 ``[G, n]`` (cluster id within the head, ``0..C-1``),
    centroids f32 ``[G, C, D]`` (plain means of the members' keys), sizes f32
    ``[G, C]``; on keys' device.
    """
    check_tensor(keys, "keys", 3)
    if not keys.dtype.is_floating_point:
        raise TypeError(f"keys must be a float tensor, got {keys.dtype}")
    G, n, D = keys.shape
    if G == 0 or n == 0 or D == 0:
        raise ValueError(f"keys must be [G, n, D] with G, n, D >= 1, got {tuple(keys.shape)}")
    tpc = check_count(tokens_per_cluster, "tokens_per_cluster", 1)
    seg = check_count(segment_len, "segment_len", 1)
    iters = check_count(iters, "iters", 0)
    seed = check_count(seed, "seed", 0)
    if seed > _MASK64:
        raise ValueError(f"seed must be < 2**64, got {seed}")
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {MATMULS}, got {matmul!r}")
    use_cuda_kernel(backend, keys)  # validates backend before any work
    dev = keys.device
    if keys.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        keys = keys.float()
    if not bool(torch.isfinite(torch.linalg.vector_norm(keys, math.inf))):  # one reduction, NaN propagates
        raise ValueError("keys contains NaN or inf")
    mm = _pick_matmul(matmul, keys, backend)
    split = mm in ("split", "split_late")
    kernel = split and _split_kernel(keys, backend)
    precise_from = max(0, iters + 1 - _PRECISE_PASSES) if mm == "split_late" else 0
    mean = (torch.sum(keys, dim=1, dtype=torch.float64) / n).float()    # [G, D]
    x = None if split else keys.float() - mean[:, None, :]  # split: the stored keys are read, centred on the fly
    bounds = segment_bounds(n, tpc, seg)
    nseg = len(bounds) - 1
    cs = [clusters_for(bounds[s + 1] - bounds[s], tpc) for s in range(nseg)]
    cbase = [0]
    for cnt in cs:
        cbase.append(cbase[-1] + cnt)
    assign = torch.empty(G, n, dtype=torch.int64, device=dev)
    s0 = nseg
    if kernel and _PAD_SEGMENTS:
        _kmeans_padded(keys, mean, bounds, cs, cbase, iters, seed, backend, assign, precise_from=precise_from)
    else:
        s0 = 0
    while s0 < nseg:  # runs of consecutive segments of one length (at most two runs)
        L, C = bounds[s0 + 1] - bounds[s0], cs[s0]
        s1 = s0 + 1
        while s1 < nseg and bounds[s1 + 1] - bounds[s1] == L:
            s1 += 1
        S = s1 - s0
        rows = torch.tensor([_init_rows(L, C, seed + s) for s in range(s0, s1)], dtype=torch.int64, device=dev)
        pick = (slice(None), torch.arange(S, device=dev)[:, None], rows)
        if split:
            xs = keys[:, bounds[s0]:bounds[s1]].reshape(G * S, L, D).contiguous()  # the stored keys
            shift = mean.repeat_interleave(S, 0)                                    # [G*S, D]
            c0 = (xs.view(G, S, L, D)[pick].reshape(G * S, C, D).float() - shift[:, None])

            def assign_step(c, precise, raw=xs, mu=shift):
                return _assign_split(raw, mu, c, kernel, precise=precise)
        else:
            xs, shift = x[:, bounds[s0]:bounds[s1]].reshape(G * S, L, D), None
            c0 = xs.view(G, S, L, D)[pick].reshape(G * S, C, D)
            xm = xs if mm == torch.float32 else xs.to(mm)

            def assign_step(c, precise, xm=xm):
                return _assign(xm, c)
        a = _iterate(xs, c0, iters, assign_step, backend, precise_from=precise_from, shift=shift)   # [G*S, L]
        base = torch.tensor(cbase[s0:s1], dtype=torch.int64, device=dev)
        assign[:, bounds[s0]:bounds[s1]] = (a.view(G, S, L) + base[None, :, None]).reshape(G, S * L)
        s0 = s1
    del x
    centroids, counts = cluster_means(keys.contiguous(), assign, cbase[-1], backend=backend)
    return assign, centroids, counts.float()


def kmeans_objective(keys: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Sum of squared distances of each key to its cluster's centroid, per head (float64 ``[G]``).

    keys ``[G, n, D]``, assign ``[G, n]``, centroids ``[G, C, D]`` (a quality measure for tests and benchmarks).
    """
    k = keys.double()
    c = torch.gather(centroids.double(), 1, assign[..., None].expand(-1, -1, keys.shape[2]))
    return (k - c).pow(2).sum(dim=(1, 2))
