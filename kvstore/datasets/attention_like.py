"""Generated keys, values and decode queries with the structure of real attention.

I.i.d. Gaussian keys make every index look bad (nothing clusters) and every
query look flat (no key stands out), so decode benchmarks on them say little.
This generator builds one layer's post-RoPE KV cache and decode queries with
the properties that sparse decode attention relies on and that real LLM
attention shows (Llama-3-8B layout by default: 8 KV heads, 32 query heads,
``d = 128``, RoPE theta 500 000).

Keys (per batch row ``b``, KV head ``h``, position ``n``; pre-RoPE, fp32)
--------------------------------------------------------------------------
* **Passages about topics.** The context is cut into blocks of ``block_len``
  tokens; each block is about one topic drawn from ``n_topics`` topics with
  Zipf popularity ``p_t ∝ (t + 1) ** -topic_skew`` (the topic sequence is the
  same text for every head). A token is a *function word* with probability
  ``function_prob`` (one of ``n_function`` shared clusters, Zipf too), else a
  content word of its block's topic.
* **Topic directions drift with position:** ``c_t(n) = A[h, t] +
  drift * sin(2π n / drift_period + φ_t) B[h, t]`` (function clusters do not
  drift); ``A``, ``B`` are ``N(0, I)`` per head (a different projection of the
  same text per head).
* ``k_pre = bias[h] + c_t(n) + key_noise * e`` with ``e ~ N(0, I)``.
* **Recency:** part of the bias, ``r[h]`` (norm ``recency_norm * sqrt(d)``),
  lives only in the high-frequency RoPE pairs; a query holding ``RoPE_N(r)``
  scores key ``n`` by ``r . R(n - N) r``, a profile that decays with distance
  (over the last few hundred to thousand tokens), like real local heads.
* **Outlier channels:** the key bias has ``key_bias * sqrt(d)`` norm and, in
  the ``n_outlier_pairs`` lowest-frequency RoPE pairs, a large constant value
  ``outlier_scale`` (real key caches show a few large-magnitude channels,
  concentrated in the low-frequency dimensions).
* **Attention sinks:** the first ``sink_tokens`` positions have a distinctive
  key ``sink_norm`` times the content scale along a per-head direction, and
  near-zero values (real sinks are "no-op" tokens).
* **RoPE** by position (Llama ``rotate_half`` convention, angles in float64).

Values: ``v = Vc[h, t] + value_noise * e'`` (topic-correlated, so a cluster's
value sum means something), sinks ``0.05 * e'``.

Decode queries (post-RoPE, for the next position ``N``)
-------------------------------------------------------
Each KV head picks ``needle_spans`` random *needle passages* of ``span_len``
consecutive tokens in ``[sink_tokens, N - window)``. Let the *content* of a key
be ``k_post(p) - RoPE_p(bias)`` and ``unit(x) = x / |x|``. Query head ``j`` of
the head's group gets weights ``w_ji = u_ji ** 3 / max_i u_ji ** 3``
(``u ~ U(0, 1)``: usually one passage dominates, the group's heads differ)
and::

    q_dir = needle_weight  * sum_i w_ji unit(mean content of passage i)
          + recency_weight * unit(RoPE_N(r[h]))
          + sink_weight    * unit(mean key of the sinks)
          + noise_weight   * unit(N(0, I))
    q = tau_j * sqrt(d) * q_dir / content_rms

``content_rms`` is the typical content norm, so ``q.k / sqrt(d) ≈ tau_j *
(weights x cosines)``; ``tau_j`` is log-uniform in ``tau_range`` per
query head (some heads sharp, some diffuse, as in real models). Through RoPE
the query also scores same-topic keys near its passages: attention is peaked on
a few passages plus the recent window and the sinks, not on isolated tokens.

Measured on CPU (:func:`attention_stats`, defaults, seed 0, B=1, the
Llama-3-8B layout, 4 query sets x 32 query heads; median [p10, p90] over
query heads; "window" = the last 64 keys)::

    context  top-1% mass        top-100 mass       sink mass          window mass        eff. support
    32 K     0.95 [0.46, 1.00]  0.88 [0.31, 1.00]  0.05 [0.00, 0.93]  0.06 [0.00, 0.56]  0.2% [0.0, 8.1]
    128 K    0.92 [0.47, 1.00]  0.81 [0.17, 1.00]  0.20 [0.01, 1.00]  0.00 [0.00, 0.07]  0.0% [0.0, 7.8]

(effective support ``exp(entropy) / N``). For reference, real decode
attention in long-context LLMs puts most of its mass on ~1-2% of the tokens in
most heads, with a minority of diffuse heads; the SmolLM2-135M traces of
:mod:`kvstore.datasets.traces` give top-100 mass 0.73-0.99 outside layer 0.

Determinism: the fixed parameters (centres, biases, sink directions, needle
positions, temperatures) come from CPU generators seeded by ``seed``; the
per-token noise from a generator on the target device seeded by ``(seed, b,
block)``. Same arguments and device type give the same tensors; CPU and CUDA
differ. Generation runs on the target device in blocks of 16 384 positions per
batch row (fp32 work space ~ 6 x Hkv x 16384 x d x 4 bytes, ~0.4 GB at the
defaults), so 1 M tokens x 8 heads x 128 needs little beyond the output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["AttentionLikeSpec", "generate_kv", "decode_queries", "attention_stats", "rope", "content_rms"]

_CHUNK = 16384  # noise is drawn per block of this many positions (fixed: keeps the data chunk-independent)


@dataclass(frozen=True)
class AttentionLikeSpec:
    """Shape and structure of the generated layer (defaults: Llama-3-8B layout).

    See the module docstring for what each knob does.
    """

    num_kv_heads: int = 8
    num_q_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 500_000.0
    # keys
    n_topics: int = 512
    topic_skew: float = 1.0
    block_len: int = 256
    n_function: int = 32
    function_prob: float = 0.35
    key_noise: float = 0.5
    drift: float = 0.5
    drift_period: int = 65536
    key_bias: float = 1.0
    n_outlier_pairs: int = 4
    outlier_scale: float = 8.0
    sink_tokens: int = 4
    recency_norm: float = 1.5
    sink_norm: float = 2.0
    value_noise: float = 1.0
    # decode queries
    needle_spans: int = 3
    span_len: int = 8
    window: int = 64
    needle_weight: float = 0.9
    recency_weight: float = 0.9
    sink_weight: float = 0.6
    noise_weight: float = 0.3
    tau_range: tuple[float, float] = field(default=(6.0, 30.0))

    def __post_init__(self) -> None:
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE pairs), got {self.head_dim}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if not 0 <= self.n_outlier_pairs <= self.head_dim // 2:
            raise ValueError(f"n_outlier_pairs must be in [0, head_dim/2], got {self.n_outlier_pairs}")

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_q_heads // self.num_kv_heads


@dataclass(frozen=True)
class _Params:
    centres: torch.Tensor  # [Hkv, T + F, d] A (topics then function clusters)
    drift_dirs: torch.Tensor  # [Hkv, T + F, d] B (zero for function clusters)
    phases: torch.Tensor  # [T + F]
    value_centres: torch.Tensor  # [Hkv, T + F, d]
    bias: torch.Tensor  # [Hkv, d] (recency part included)
    recency: torch.Tensor  # [Hkv, d]
    sink_keys: torch.Tensor  # [Hkv, d]
    topic_probs: torch.Tensor  # [T]
    function_probs: torch.Tensor  # [F]

    def to(self, device: torch.device) -> "_Params":
        return _Params(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def content_rms(spec: AttentionLikeSpec) -> float:
    """Typical norm of a key's content ``c_t(n) + key_noise * e`` (bias excluded)."""
    return math.sqrt(spec.head_dim * (1.0 + spec.key_noise ** 2 + spec.drift ** 2 / 2))


def _zipf(n: int, skew: float) -> torch.Tensor:
    p = torch.arange(1, n + 1, dtype=torch.float64) ** -skew
    return (p / p.sum()).float()


def _params(spec: AttentionLikeSpec, seed: int) -> _Params:
    g = torch.Generator().manual_seed(seed)
    H, d, T, F = spec.num_kv_heads, spec.head_dim, spec.n_topics, spec.n_function
    centres = torch.randn(H, T + F, d, generator=g)
    drift_dirs = torch.randn(H, T + F, d, generator=g)
    drift_dirs[:, T:] = 0
    phases = torch.rand(T + F, generator=g) * (2 * math.pi)
    value_centres = torch.randn(H, T + F, d, generator=g)
    bias = torch.randn(H, d, generator=g)
    bias *= spec.key_bias * math.sqrt(d) / bias.norm(dim=-1, keepdim=True)
    if spec.n_outlier_pairs:
        # Llama rotate_half pairs channel i with i + d/2; the highest i rotate slowest.
        lo = d // 2 - spec.n_outlier_pairs
        signs = torch.randint(0, 2, (H, spec.n_outlier_pairs), generator=g).float() * 2 - 1
        bias[:, lo:d // 2] = spec.outlier_scale * signs
        bias[:, d // 2 + lo:] = spec.outlier_scale * signs
    # recency: a constant pre-RoPE part in the high-frequency pairs; a query holding it rotated to its own
    # position scores keys by RoPE distance (a decaying recency profile, as real heads have)
    rec = torch.zeros(H, d)
    rec[:, :d // 4] = torch.randn(H, d // 4, generator=g)
    rec[:, d // 2:d // 2 + d // 4] = torch.randn(H, d // 4, generator=g)
    rec *= spec.recency_norm * math.sqrt(d) / rec.norm(dim=-1, keepdim=True)
    bias += rec
    sink = torch.randn(H, d, generator=g)
    sink *= spec.sink_norm * content_rms(spec) / sink.norm(dim=-1, keepdim=True)
    return _Params(centres, drift_dirs, phases, value_centres, bias, rec, sink,
                   _zipf(T, spec.topic_skew), _zipf(F, spec.topic_skew))


def _rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[n, d/2]`` fp32; angles in float64 (1 M x 1 rad is beyond fp32 precision)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    ang = torch.remainder(positions.to(torch.float64)[:, None] * inv_freq[None], 2 * math.pi)
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x [..., n, d]`` (fp32) by positions ``[n]`` (Llama ``rotate_half`` convention)."""
    cos, sin = _rope_cos_sin(positions, x.shape[-1], theta)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _device_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _block_topics(spec: AttentionLikeSpec, n_blocks: int, seed: int, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + 104729 * (b + 1))
    return torch.multinomial(_zipf(spec.n_topics, spec.topic_skew), n_blocks, replacement=True, generator=g)


def generate_kv(batch: int, context: int, spec: AttentionLikeSpec = AttentionLikeSpec(), *,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer: ``k, v [batch, num_kv_heads, context, head_dim]`` in ``dtype``.

    Keys are post-RoPE (positions ``0 .. context-1``). Generated on ``device``
    in blocks of 16384 positions per batch row.
    """
    if batch < 1 or context < 1:
        raise ValueError(f"batch and context must be >= 1, got batch={batch}, context={context}")
    device = torch.device(device)
    H, d = spec.num_kv_heads, spec.head_dim
    P = _params(spec, seed).to(device)
    k = torch.empty(batch, H, context, d, dtype=dtype, device=device)
    v = torch.empty_like(k)
    for b in range(batch):
        topics = _block_topics(spec, -(-context // spec.block_len), seed, b).to(device)
        for n0 in range(0, context, _CHUNK):
            n1 = min(context, n0 + _CHUNK)
            g = _device_generator(device, _mix(seed, b, n0 // _CHUNK))
            kk, vv = _chunk(spec, P, topics, n0, n1, g)
            k[b, :, n0:n1] = kk.to(dtype)
            v[b, :, n0:n1] = vv.to(dtype)
    return k, v


def _mix(*xs: int) -> int:
    """A 62-bit seed from small non-negative integers (distinct tuples give distinct streams in practice)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (x + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 2


def _chunk(spec: AttentionLikeSpec, P: _Params, topics: torch.Tensor, n0: int, n1: int, g: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE keys and values ``[Hkv, n1 - n0, d]`` fp32 of positions ``[n0, n1)``."""
    dev = topics.device
    H, d, C = spec.num_kv_heads, spec.head_dim, n1 - n0
    pos = torch.arange(n0, n1, device=dev)
    func = torch.rand(C, generator=g, device=dev) < spec.function_prob
    fid = torch.multinomial(P.function_probs, C, replacement=True, generator=g)
    ids = torch.where(func, spec.n_topics + fid, topics[pos // spec.block_len])
    wave = torch.sin(2 * math.pi * pos.double() / spec.drift_period + P.phases[ids].double()).float()
    content = P.centres[:, ids] + spec.drift * wave[None, :, None] * P.drift_dirs[:, ids]
    content += spec.key_noise * torch.randn(H, C, d, generator=g, device=dev)
    k = content + P.bias[:, None, :]
    v = P.value_centres[:, ids] + spec.value_noise * torch.randn(H, C, d, generator=g, device=dev)
    s = min(max(spec.sink_tokens - n0, 0), C)
    if s:
        k[:, :s] = P.sink_keys[:, None, :] + 0.05 * torch.randn(H, s, d, generator=g, device=dev)
        v[:, :s] = 0.05 * torch.randn(H, s, d, generator=g, device=dev)
    return rope(k, pos, spec.rope_theta), v


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def decode_queries(k: torch.Tensor, spec: AttentionLikeSpec = AttentionLikeSpec(), *, num_sets: int = 4,
                   seed: int = 0, query_seed: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode queries for position ``N`` attending to ``k [B, Hkv, N, d]`` (from :func:`generate_kv`).

    Returns ``q [num_sets, B, num_q_heads, d]`` (post-RoPE, ``dtype`` default
    ``k.dtype``): ``num_sets`` independent query sets, each with its own
    needle passages and temperatures. ``seed`` must be the seed ``k`` was
    generated with (the key bias and recency directions are re-derived from
    it); the needles, weights and temperatures come from ``query_seed``
    (default ``seed + 1``): another ``query_seed`` gives independent queries
    of the same kind (e.g. training queries for a graph index).
    """
    B, H, N, d = k.shape
    if (H, d) != (spec.num_kv_heads, spec.head_dim):
        raise ValueError(f"k has {H} heads of dim {d}, spec says {spec.num_kv_heads} x {spec.head_dim}")
    lo, hi = spec.sink_tokens, N - spec.window - spec.span_len
    if hi <= lo:
        raise ValueError(f"context {N} is too short for sink {spec.sink_tokens} + window {spec.window} + "
                         f"span {spec.span_len}")
    if num_sets < 1:
        raise ValueError(f"num_sets must be >= 1, got {num_sets}")
    dev, G = k.device, spec.group
    P = _params(spec, seed).to(dev)
    g = torch.Generator().manual_seed(seed + 1 if query_seed is None else query_seed)  # CPU: same on every device
    S, M, L = num_sets, spec.needle_spans, spec.span_len
    starts = torch.randint(lo, hi, (S, B, H, M), generator=g)
    weights = torch.rand(S, B, H, G, M, generator=g) ** 3
    weights = weights / weights.amax(-1, keepdim=True)
    log_tau = torch.empty(S, B, H, G).uniform_(math.log(spec.tau_range[0]), math.log(spec.tau_range[1]),
                                                generator=g)
    noise = _unit(torch.randn(S, B, H, G, d, generator=g))

    def content(pos: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # pos [..., L] positions of keys of (b, h): k_post - RoPE(bias), mean over the last axis
        kk = k[b[..., None], h[..., None], pos].float()  # [..., L, d]
        rb = rope(P.bias[h[..., None].expand_as(pos).reshape(-1)], pos.reshape(-1), spec.rope_theta)
        rb = rb.reshape(*pos.shape, d)
        return _unit((kk - rb).mean(-2))

    bi = torch.arange(B).view(1, B, 1, 1).expand(S, B, H, M)
    hi_ = torch.arange(H).view(1, 1, H, 1).expand(S, B, H, M)
    span_pos = (starts[..., None] + torch.arange(L)).to(dev)  # [S, B, H, M, L]
    c_span = content(span_pos, bi.to(dev), hi_.to(dev))  # [S, B, H, M, d]
    c_rec = _unit(rope(P.recency, torch.full((H,), N, device=dev), spec.rope_theta))  # [H, d]
    c_sink = _unit(k[:, :, :max(spec.sink_tokens, 1)].float().mean(2))  # [B, H, d]
    q_dir = (spec.needle_weight * torch.einsum("sbhgm,sbhmd->sbhgd", weights.to(dev), c_span)
             + spec.recency_weight * c_rec[None, None, :, None] + spec.sink_weight * c_sink[None, :, :, None]
             + spec.noise_weight * noise.to(dev))
    scale = torch.exp(log_tau).to(dev) * math.sqrt(d) / content_rms(spec)
    q = q_dir * scale[..., None]
    return q.reshape(S, B, H * G, d).to(dtype or k.dtype)


@torch.no_grad()
def attention_stats(q: torch.Tensor, k: torch.Tensor, *, sink: int = 4, window: int = 64,
                    top_fraction: float = 0.01, top_k: int = 100) -> dict[str, dict[str, float]]:
    """How peaked the softmax of ``q [S, B, Hq, d]`` (or ``[B, Hq, d]``) over ``k [B, Hkv, N, d]`` is.

    Per query head (fp32, scale ``1/sqrt(d)``): ``top_fraction_mass`` (mass of
    the top ``ceil(top_fraction * N)`` keys), ``top_k_mass``, ``sink_mass``
    (first ``sink`` positions), ``window_mass`` (last ``window``),
    ``entropy`` (nats) and ``effective_support`` (``exp(entropy) / N``).
    Returns each statistic's ``median``, ``p10`` and ``p90`` over query
    heads. Works one (batch row, KV head) at a time.
    """
    if q.dim() == 3:
        q = q[None]
    S, B, Hq, d = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    n_top = max(1, math.ceil(top_fraction * N))
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in ("top_fraction_mass", "top_k_mass", "sink_mass",
                                                          "window_mass", "entropy", "effective_support")}
    for b in range(B):
        for h in range(Hkv):
            qq = q[:, b, h * G:(h + 1) * G].reshape(S * G, d).float()
            s = (qq @ k[b, h].float().T) / math.sqrt(d)  # [S*G, N]
            p = torch.softmax(s, -1)
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
            rows["top_fraction_mass"].append(p.topk(min(n_top, N), -1).values.sum(-1))
            rows["top_k_mass"].append(p.topk(min(top_k, N), -1).values.sum(-1))
            rows["sink_mass"].append(p[:, :sink].sum(-1))
            rows["window_mass"].append(p[:, max(0, N - window):].sum(-1))
            rows["entropy"].append(ent)
            rows["effective_support"].append(torch.exp(ent) / N)
    out = {}
    for name, vals in rows.items():
        x = torch.cat(vals).double().cpu()
        out[name] = {"median": float(x.median()), "p10": float(torch.quantile(x, 0.1)),
                     "p90": float(torch.quantile(x, 0.9))}
    return out
