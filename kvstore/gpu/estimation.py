"""The finite-sample estimator of a cluster's attention mass (``WaveGpuConfig(estimator="fs_iso")``).

RetroInfer's estimation zone stands a cluster of ``n`` keys with mean ``c`` for ``n * exp(s)``, ``s = q.c *
scale``. By Jensen that is a lower bound of the true mass ``sum_i exp(q.k_i * scale)``, and on attention-like keys
a loose one (the CPU study ``bench/error_study.py`` measured the estimated mass of the zone at 6-8% of the true
mass). If the member scores are normal with standard deviation ``sigma``, the mean of ``exp`` over the ``n``
members is ``exp(s + g_n(sigma))`` with

    g_n(sigma) = log mean_i exp(sigma * z_i),

``z_i`` the expected order statistics of ``n`` standard normals (Blom's approximation, re-standardised). For
``n -> inf`` this is the log-normal ``sigma^2 / 2``, which overshoots for the few members of a cluster. Here
``sigma = scale * |q| * sqrt(var)``, ``var`` the cluster's isotropic key variance (mean over dimensions), one
float per cluster stored at build time.

:func:`fs_table` tabulates ``g_n`` on a grid of ``sigma``; :func:`fs_correction` interpolates it for a batch of
clusters and query heads (torch ops: they run on any device and inside a captured CUDA graph).
"""
from __future__ import annotations

import math

import torch

from ..config import GPU_ESTIMATORS

SIGMA_STEP = 0.25          # grid of the table in sigma (linear interpolation error <= step^2 / 8 in log mass)
SIGMA_MAX = 16.0           # beyond it: the linear asymptote sigma * max(z)
NMAX = 128                 # larger clusters use the n = NMAX row (the table fits a block's shared memory)
ESTIMATORS = GPU_ESTIMATORS


def blom_scores(n: int) -> torch.Tensor:
    """Expected order statistics of ``n`` standard normals (Blom), re-standardised to mean 0 and population
    standard deviation 1; float64 ``[n]`` (``[0]`` for ``n <= 1``)."""
    if n <= 1:
        return torch.zeros(1, dtype=torch.float64)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    z = torch.distributions.Normal(0.0, 1.0).icdf((i - 0.375) / (n + 0.25))
    z = z - z.mean()
    return z / z.pow(2).mean().sqrt()


def fs_table(nmax: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``g_n(sigma)`` for ``n = 0..min(nmax, NMAX)`` on the grid ``sigma = j * SIGMA_STEP``,
    ``j = 0..SIGMA_MAX / SIGMA_STEP`` (larger clusters read the last row: the kernel keeps the table in shared memory).

    Returns the table float32 ``[nmax + 1, J]`` (row 0 = row 1 = zeros: no spread in one key) and the slope of
    the asymptote per row, float32 ``[nmax + 1]`` (``max z``), used past ``SIGMA_MAX``.
    """
    if not isinstance(nmax, int) or nmax < 1:
        raise ValueError(f"nmax must be an int >= 1, got {nmax!r}")
    nmax = min(nmax, NMAX)
    J = int(round(SIGMA_MAX / SIGMA_STEP)) + 1
    sigma = torch.arange(J, dtype=torch.float64) * SIGMA_STEP
    tab = torch.zeros(nmax + 1, J, dtype=torch.float64)
    slope = torch.zeros(nmax + 1, dtype=torch.float64)
    for n in range(2, nmax + 1):
        z = blom_scores(n)
        tab[n] = torch.logsumexp(sigma[:, None] * z[None], 1) - math.log(n)
        slope[n] = z.max()
    return tab.float().to(device), slope.float().to(device)


def fs_correction(table: torch.Tensor, slope: torch.Tensor, sizes: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``g_n(sigma)`` by linear interpolation in the table of :func:`fs_table`.

    sizes ``[..., C]`` (cluster sizes, rounded, clamped to the table), sigma ``[..., C]`` broadcastable against
    sizes, ``>= 0``. Returns float32 of the broadcast shape.
    """
    nmax, J = table.shape[0] - 1, table.shape[1]
    n = sizes.round().long().clamp(0, nmax)
    x = (sigma.float() / SIGMA_STEP).clamp_min(0)
    x0 = x.floor().clamp_max(J - 2)
    f = x - x0                                   # > 1 past the grid: extrapolates along the last segment
    base = n * J + x0.long()
    flat = table.reshape(-1)
    g0 = flat[base]
    g1 = flat[base + 1]
    g = g0 + (g1 - g0) * f.clamp_max(1)
    past = (x - (J - 1)).clamp_min(0) * SIGMA_STEP
    return g + past * slope[n]


def isotropic_variance(k: torch.Tensor, assign: torch.Tensor, C: int) -> torch.Tensor:
    """Per cluster, the mean over dimensions of the members' key variance: k ``[H, n, D]``, assign int64 ``[H, n]``
    (cluster ids in ``[0, C)``) -> float32 ``[H, C]`` (0 for empty clusters)."""
    H, n, D = k.shape
    kf = k.float()
    cnt = torch.zeros(H, C, device=k.device).scatter_add_(1, assign, torch.ones(H, n, device=k.device))
    ksum = torch.zeros(H, C, D, device=k.device).scatter_add_(1, assign[..., None].expand(H, n, D), kf)
    sq = torch.zeros(H, C, device=k.device).scatter_add_(1, assign, kf.pow(2).sum(-1))
    c = cnt.clamp_min(1)
    var = (sq / c - (ksum / c[..., None]).pow(2).sum(-1)) / D
    return torch.where(cnt > 0, var.clamp_min(0), torch.zeros_like(var))


def fs_cluster_scores(q: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor, key_sd: torch.Tensor,
                      table: torch.Tensor, slope: torch.Tensor, scale: float, backend: str = "auto",
                      centroid_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cluster scores with the finite-sample estimator, and the ranking by estimated mass.

    q ``[G, Hg, D]``, centroids ``[G, C, D]`` (q's dtype, or int8 with ``centroid_scale``, as in
    :func:`kvstore.gpu.cluster_ops.cluster_scores`), sizes / key_sd float32 ``[G, C]`` (cluster sizes and
    isotropic key standard deviations), table / slope from :func:`fs_table`. Returns

    * scores float32 ``[G, Hg, C]`` = ``q.c * scale + g_n(scale * |q| * key_sd)`` (``-inf`` for empty clusters):
      ``size * exp(score)`` is the estimated attention mass of the cluster, as the estimation zone reads it;
    * probs float32 ``[G, C]``: the group-summed share of each cluster in its head's estimated mass;
    * lse float32 ``[G, Hg]``: log of each head's estimated mass over all clusters (``-inf``: none).

    On CUDA (bf16 / fp16, D in {64, 128}, Hg <= 16, sm_80+) one fused pass of the tensor-core scores kernel;
    otherwise (or ``backend="torch"``) the torch reference.
    """
    from .cluster_ops import cluster_scores, use_cuda_kernel

    G, Hg, D = q.shape
    kernel = (use_cuda_kernel(backend, q, centroids, sizes, key_sd) and q.dtype in (torch.bfloat16, torch.float16)
              and D in (64, 128) and Hg <= 16 and torch.cuda.get_device_capability(q.device)[0] >= 8
              and q.is_contiguous() and centroids.is_contiguous() and q.data_ptr() % 16 == 0
              and centroids.data_ptr() % (16 if centroid_scale is None else 8) == 0)
    if kernel:
        from ._ext import cuda_ext

        return cuda_ext().cluster_scores_fs(q, centroids, sizes.contiguous(), key_sd.contiguous(),
                                            table.contiguous(), slope.contiguous(), scale, SIGMA_STEP,
                                            None if centroid_scale is None else centroid_scale.contiguous())
    scores, _ = cluster_scores(q, centroids, sizes, scale, backend=backend, centroid_scale=centroid_scale)
    sigma = (scale * q.float().norm(dim=-1))[..., None] * key_sd[:, None, :]
    scores = scores + fs_correction(table, slope, sizes[:, None, :], sigma)
    logits = scores + torch.log(sizes)[:, None, :]                  # log of each cluster's estimated mass
    lse = torch.logsumexp(logits, -1)
    top = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None]
    return scores, torch.exp(logits - top).sum(1), lse
