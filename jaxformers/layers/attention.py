"""Multi-head attention with one seam for the attention computation.

``dot_product_attention(q, k, v, implementation=...)`` is the single place where scores meet values:

- ``"xla"``: plain ``jnp`` (softmax in float32); runs everywhere, supports bias, masks and dropout.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16/fp16).
- ``"pallas"``: ``jaxformers.kernels.local_global_attention`` (flash-style Pallas kernel; segment
  ids but no arbitrary bias/mask). On CPU it runs in interpret mode (slow, for tests).
- ``"auto"``: cuDNN on a GPU when the call is eligible (Ampere or newer, bf16/f16, no dropout, head
  dim a multiple of 8 up to 128), else ``"xla"``.

``MultiHeadAttention`` is the one attention module every model reuses; its projections carry the
logical axes (``embed``, ``heads``, ``kv``) so tensor parallelism shards whole heads. For
autoregressive decoding it takes and returns an explicit ``KVCache`` (``init_kv_cache``): a pure
value threaded through the decoding loop (e.g. a ``lax.scan`` carry), no mutable collection.

Outlier-free attention (Bondarenko, Nagel, Blankevoort, "Quantizable Transformers: Removing
Outliers by Helping Attention Heads Do Nothing", NeurIPS 2023, arXiv 2306.12929; official code
Qualcomm-AI-research/outlier-free-transformers) is two options of ``MultiHeadAttention``:
``softmax="clipped(γ:ζ)"`` (``clipped_softmax``) and ``gate=`` (``HeadGate``: a per-head sigmoid
gate on the head outputs, computed from that head's slice of the layer input). The probabilities
go through the module's ``attention_probs(scores, mask)`` method, a seam that Flax interceptors
(e.g. ``jaxformers.compress``'s quantizers) can wrap without touching any model file.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.kernels.gpu_kernel import gpu_compute_capability
from jaxformers.layers.linear import logical, trunc_normal
from jaxformers.sharding import constrain

AttentionImpl = Literal["xla", "cudnn", "pallas", "auto"]
IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")


def _check_qkv(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (batch, length, heads, head_dim); got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k, v disagree on batch, kv length or heads: {q.shape}, {k.shape}, {v.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share head_dim; got {q.shape[-1]} and {k.shape[-1]}")


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """(B, 1, Lq, Lk) boolean mask: a token sees only tokens of its own segment (0 = padding)."""
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (same & (kv_segment_ids[:, None, :] != 0))[:, None]


def causal_mask(q_len: int, kv_len: int | None = None) -> jax.Array:
    """(1, 1, Lq, Lk) boolean mask: query i sees key j <= i + Lk - Lq (the queries are the last Lq positions)."""
    kv_len = q_len if kv_len is None else kv_len
    return (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + (kv_len - q_len))[None, None]


def masked_softmax(scores: jax.Array, mask: jax.Array | None = None, axis: int = -1) -> jax.Array:
    """softmax over ``axis`` with masked-out entries (``mask`` False) at exactly 0 (a row with no
    visible entry comes out uniform, never NaN)."""
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores, axis=axis)


def clipped_softmax(x: jax.Array, gamma: float, zeta: float, axis: int = -1, *,
                    mask: jax.Array | None = None) -> jax.Array:
    """clip((ζ − γ)·softmax(x) + γ, 0, 1) (Bondarenko et al. 2023, eq. 4; the official code names ζ
    ``eta``). With γ < 0 small probabilities become exact zeros (ζ > 1: large ones exact ones)
    without pushing the logits to extremes, and the gradient is zero where clipped. γ = 0, ζ = 1 is
    the softmax. ``mask`` (False = excluded) is applied before the softmax."""
    return jnp.clip((zeta - gamma) * masked_softmax(x, mask, axis) + gamma, 0.0, 1.0)


_CLIPPED = re.compile(r"^clipped\(\s*([-+0-9.eE]+)\s*:\s*([-+0-9.eE]+)\s*\)$")
SOFTMAX_SPECS = ("softmax", "clipped(<gamma>:<zeta>)")


def parse_softmax(spec: str) -> tuple[float, float] | None:
    """None for ``"softmax"``; (γ, ζ) for ``"clipped(γ:ζ)"`` (the official code's names, e.g.
    ``"clipped(-.025:1)"``); a ValueError naming the valid forms otherwise."""
    if spec in ("softmax", "vanilla"):
        return None
    match = _CLIPPED.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(f"unknown attention softmax {spec!r}; valid: {', '.join(SOFTMAX_SPECS)} "
                         f"(e.g. 'clipped(-0.025:1)')")
    try:
        gamma, zeta = float(match.group(1)), float(match.group(2))
    except ValueError:
        raise ValueError(f"attention softmax {spec!r}: gamma and zeta must be numbers") from None
    if not gamma <= 0.0 < 1.0 <= zeta:
        raise ValueError(f"attention softmax {spec!r}: expected gamma <= 0 and zeta >= 1")
    return gamma, zeta


def _xla_attention(q, k, v, bias, mask, scale, dropout_rate, dropout_rng, softmax_fn=None):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    weights = masked_softmax(logits, mask) if softmax_fn is None else softmax_fn(logits, mask)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def _cudnn_eligible(q, bias, mask, dropout_rate) -> bool:
    """cuDNN's flash attention takes the call: an NVIDIA GPU of compute capability 8.0 or newer (not a
    T4 or V100, nor a ROCm GPU), bf16/f16, no dropout, a head dim that is a multiple of 8 up to 128."""
    capability = gpu_compute_capability()
    return (capability is not None and capability >= (8, 0) and q.dtype in (jnp.bfloat16, jnp.float16)
            and dropout_rate == 0.0 and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    implementation: AttentionImpl = "xla",
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    causal: bool = False,
    softmax_fn: Callable[[jax.Array, jax.Array | None], jax.Array] | None = None,
) -> jax.Array:
    """softmax(q kᵀ · scale + bias, masked) v with q (B, Lq, H, D), k (B, Lk, H, D), v (B, Lk, H, Dv).

    ``mask`` (bool, True = attend) and ``bias`` broadcast to (B, H, Lq, Lk). ``segment_ids`` (B, L)
    int restricts attention to tokens of the same segment (self-attention, 0 = padding).
    ``causal``: query i sees key j only if j <= i + Lk - Lq (decoders; combines with the rest).
    ``scale`` defaults to D**-0.5. ``softmax_fn(scores, mask) -> probs`` replaces the masked softmax
    (scores: the float32 (B, H, Lq, Lk) scaled logits plus bias, before masking; mask: the combined
    boolean mask or None); it needs the ``"xla"`` implementation (``"auto"`` picks it).
    Returns (B, Lq, H, Dv) in v's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _check_qkv(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be (batch, length) = {q.shape[:2]}, got {segment_ids.shape}")
    if implementation == "auto":
        implementation = "cudnn" if softmax_fn is None and _cudnn_eligible(q, bias, mask, dropout_rate) else "xla"
    if softmax_fn is not None and implementation != "xla":
        raise ValueError(f"a softmax_fn (clipped softmax, quantized probabilities...) needs implementation='xla'; "
                         f"got {implementation!r}")

    if implementation == "pallas":
        if bias is not None or mask is not None or dropout_rate > 0.0:
            raise ValueError("implementation='pallas' takes segment_ids, not an arbitrary bias, "
                             "mask or attention dropout; use implementation='xla' for those")
        from jaxformers.kernels import local_global_attention

        return local_global_attention(q, k, v, segment_ids=segment_ids, scale=scale, causal=causal,
                                      implementation="pallas")

    if causal:
        mask = causal_mask(q.shape[1], k.shape[1]) if mask is None else jnp.logical_and(
            mask, causal_mask(q.shape[1], k.shape[1]))
    if segment_ids is not None:
        seg = segment_mask(segment_ids, segment_ids)
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    if implementation == "cudnn":
        if dropout_rate > 0.0:
            raise ValueError("implementation='cudnn' has no attention dropout; use 'xla'")
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")
    return _xla_attention(q, k, v, bias, mask, scale, dropout_rate, dropout_rng, softmax_fn)


class KVCache(NamedTuple):
    """Keys and values of the positions decoded so far, for ``MultiHeadAttention(..., cache=...)``.

    ``k``, ``v``: (B, S, H, D) buffers of capacity S (any float dtype, e.g. bfloat16 to halve the
    memory); ``index``: int32 scalar, the next position to write (= positions written so far).
    A pytree, so it can be a ``jit`` argument or a ``lax.scan`` carry."""

    k: jax.Array
    v: jax.Array
    index: jax.Array


def init_kv_cache(batch: int, max_len: int, num_heads: int, head_dim: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache of ``max_len`` positions (zeros, index 0) for one attention layer."""
    shape = (batch, max_len, num_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def _check_cache(cache, q: jax.Array) -> None:
    """Clear errors for a cache that does not fit this layer and step (q is (B, s, H, D))."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache(k, v, index) (see init_kv_cache); got {type(cache).__name__}")
    batch, steps, heads, head_dim = q.shape
    for name, t in (("k", cache.k), ("v", cache.v)):
        shape = getattr(t, "shape", None)
        if shape is None or len(shape) != 4 or (shape[0], shape[2], shape[3]) != (batch, heads, head_dim):
            raise ValueError(f"cache.{name} must be (batch, max_len, heads, head_dim) = ({batch}, max_len, {heads}, "
                             f"{head_dim}) for this layer and input; got shape {shape}")
    if cache.k.shape != cache.v.shape:
        raise ValueError(f"cache.k and cache.v must have the same shape; got {cache.k.shape} and {cache.v.shape}")
    if steps > cache.k.shape[1]:
        raise ValueError(f"this step has {steps} positions but the cache holds only max_len={cache.k.shape[1]}")
    index = cache.index
    if getattr(index, "shape", None) != () or not jnp.issubdtype(jnp.asarray(index).dtype, jnp.integer):
        raise ValueError(f"cache.index must be an integer scalar; got {index!r}")
    try:
        index = int(index)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return  # traced (inside jit/scan): the caller keeps index + steps <= max_len
    if not 0 <= index <= cache.k.shape[1] - steps:
        raise ValueError(f"cache.index={index} + {steps} new positions do not fit the cache's "
                         f"max_len={cache.k.shape[1]}")


def cached_attention(q, k, v, cache: KVCache, *, mask=None, bias=None, scale=None, dropout_rate=0.0,
                     dropout_rng=None, softmax_fn=None) -> tuple[jax.Array, KVCache]:
    """One decoding step: writes the s new keys/values at ``cache.index`` and attends q (B, s, H, D)
    to every position written so far (``< index + s``: the whole new step included), further
    restricted by ``mask`` (broadcast to (B, H, s, max_len); e.g. causal within a multi-token step:
    ``arange(max_len)[None] <= index + arange(s)[:, None]``). Returns (out, cache advanced by s).

    Plain XLA attention: a step is a few queries against a short cache, which the fused kernels do
    not speed up."""
    _check_cache(cache, q)
    steps, size = q.shape[1], cache.k.shape[1]
    index = jnp.asarray(cache.index, jnp.int32)
    new_k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), index, axis=1)
    new_v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), index, axis=1)
    written = (jnp.arange(size) < index + steps)[None, None, None, :]
    mask = written if mask is None else jnp.logical_and(mask, written)
    out = dot_product_attention(q, new_k.astype(q.dtype), new_v.astype(q.dtype), mask=mask, bias=bias, scale=scale,
                                implementation="xla", dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                                softmax_fn=softmax_fn)
    return out, KVCache(new_k, new_v, index + steps)


def decomposed_rel_pos_bias(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                            grid: tuple[int, int]) -> jax.Array:
    """Decomposed relative position bias (MViTv2, Li et al. 2022, arXiv 2112.01526; SAM's image encoder,
    facebookresearch/segment-anything ``modeling/image_encoder.py`` ``add_decomposed_rel_pos``):
    bias[q=(y, x), k=(y', x')] = <q, R_h[y - y']> + <q, R_w[x - x']> for queries and keys on the same
    ``grid`` (h, w). ``q`` (B, h*w, H, D) unscaled; ``rel_pos_h`` (2h - 1, D), ``rel_pos_w`` (2w - 1, D).
    Returns the (B, H, h*w, h*w) float32 bias added to the scaled logits."""
    h, w = grid
    b, length, heads, dim = q.shape
    if length != h * w:
        raise ValueError(f"relative positions over a {h}x{w} grid need {h * w} queries; got {length}")
    if rel_pos_h.shape != (2 * h - 1, dim) or rel_pos_w.shape != (2 * w - 1, dim):
        raise ValueError(f"rel_pos tables must be ({2 * h - 1}, {dim}) and ({2 * w - 1}, {dim}) for a {h}x{w} grid; "
                         f"got {rel_pos_h.shape} and {rel_pos_w.shape}")
    r_h = rel_pos_h[jnp.arange(h)[:, None] - jnp.arange(h)[None, :] + h - 1]  # (h, h', D)
    r_w = rel_pos_w[jnp.arange(w)[:, None] - jnp.arange(w)[None, :] + w - 1]  # (w, w', D)
    qg = q.reshape(b, h, w, heads, dim).astype(jnp.float32)
    rel_h = jnp.einsum("byxnd,ykd->bnyxk", qg, r_h.astype(jnp.float32))
    rel_w = jnp.einsum("byxnd,xkd->bnyxk", qg, r_w.astype(jnp.float32))
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, H, h, w, h', w')
    return bias.reshape(b, heads, length, length)


GATES = ("unconditional_per_head", "conditional_per_head", "conditional_per_token")


def _torch_linear_init(fan_in: int):
    """torch.nn.Linear's default weight and bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def check_gate(gate: str | None, mlp: bool = False, init: float | None = None) -> None:
    """A clear error for an unknown gate type or an initial probability outside (0, 1)."""
    if gate is not None and gate not in GATES:
        raise ValueError(f"unknown attention gate {gate!r}; valid: None, {', '.join(GATES)}")
    if init is not None and not 0.0 < init < 1.0:
        raise ValueError(f"attention gate_init is the initial gate probability pi and must be in (0, 1); got {init}")
    if gate == "unconditional_per_head" and (mlp or init is not None):
        raise ValueError("gate='unconditional_per_head' is one learnt logit per head (initialised at 0, gate 0.5); "
                         "gate_mlp and gate_init apply to the conditional gates")


class HeadGate(nn.Module):
    """Gated attention's gate (Bondarenko et al. 2023, eq. 5): sigmoid(G_h(x_h)) per head h, where
    x_h is the h-th (E / H)-wide slice of the attention layer's input (B, T, E). Returns a gate that
    broadcasts against the head outputs (B, T, H, D).

    ``kind``: ``"conditional_per_token"`` (B, T, H, 1); ``"conditional_per_head"`` (B, 1, H, 1),
    the gate logits averaged over all T tokens first (as the official code does, padding
    included); ``"unconditional_per_head"`` (H, 1), one learnt logit per head initialised at 0.
    G_h is ``Linear(E/H, 1)`` or, with ``mlp``, ``Linear(E/H, E/H // 4) -> ReLU -> Linear(·, 1)``,
    every head its own weights, torch's default init; ``init`` = π sets the linear gate's bias to
    logit(π) (the official code applies it to the linear gate only)."""

    kind: str
    num_heads: int
    mlp: bool = False
    init: float | None = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_gate(self.kind, self.mlp, self.init)
        h = self.num_heads
        if self.kind == "unconditional_per_head":
            alpha = self.param("alpha", logical(nn.initializers.zeros_init(), ("heads",)), (h,), self.param_dtype)
            return jax.nn.sigmoid(alpha.astype(jnp.float32))[:, None]
        if x.shape[-1] % h:
            raise ValueError(f"gated attention splits the layer input (width {x.shape[-1]}) into num_heads={h} "
                             f"slices; the width must be divisible by it")
        d = x.shape[-1] // h
        xh = x.reshape(x.shape[:-1] + (h, d)).astype(jnp.float32)
        if self.mlp:
            if d < 4:
                raise ValueError(f"gate_mlp needs head slices of at least 4 features (E/H // 4 hidden); got {d}")
            w1 = self.param("fc1_kernel", logical(_torch_linear_init(d), ("heads", None, None)), (h, d, d // 4),
                            self.param_dtype)
            b1 = self.param("fc1_bias", logical(_torch_linear_init(d), ("heads", None)), (h, d // 4), self.param_dtype)
            w2 = self.param("fc2_kernel", logical(_torch_linear_init(d // 4), ("heads", None)), (h, d // 4),
                            self.param_dtype)
            b2 = self.param("fc2_bias", logical(_torch_linear_init(d // 4), ("heads",)), (h,), self.param_dtype)
            hidden = jax.nn.relu(jnp.einsum("...hd,hdf->...hf", xh, w1) + b1)
            logits = jnp.einsum("...hf,hf->...h", hidden, w2) + b2
        else:
            bias_init = (_torch_linear_init(d) if self.init is None else
                         nn.initializers.constant(math.log(self.init / (1.0 - self.init))))
            w = self.param("kernel", logical(_torch_linear_init(d), ("heads", None)), (h, d), self.param_dtype)
            b = self.param("bias", logical(bias_init, ("heads",)), (h,), self.param_dtype)
            logits = jnp.einsum("...hd,hd->...h", xh, w) + b
        if self.kind == "conditional_per_head":
            logits = jnp.mean(logits, axis=-2, keepdims=True)
        return jax.nn.sigmoid(logits)[..., None]


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) through ``dot_product_attention``.

    Self-attention (``kv=None``) uses one fused ``qkv`` projection of shape (embed, 3, heads, head_dim);
    cross-attention uses ``q`` (embed, heads, head_dim) and ``kv`` (embed, 2, heads, head_dim).
    ``proj`` maps (heads, head_dim) back to ``out_features`` (default: the input width).

    ``attention_fn`` replaces the attention pattern while keeping these parameters, e.g.
    ``functools.partial(jaxformers.kernels.local_global_attention, window=(w, w))`` for sliding
    windows: it is called as ``attention_fn(q, k, v, segment_ids=..., scale=...)`` and takes no
    mask, bias or attention dropout.

    ``cache`` (a ``KVCache``, self-attention only) makes the call one autoregressive decoding step
    (see ``cached_attention``): ``x`` holds the s new positions, the call returns ``(out, cache)``.
    Decoding with a cache of the whole sequence and s = 1 per step equals causal attention over
    the sequence. The step uses neither ``attention_fn`` nor ``attention_impl``: the cache (and
    ``mask``) define what it sees.

    ``causal`` (decoders): position i attends to positions <= i, also within a multi-token cached
    step (a prompt's prefill), so prefill + steps equal one causal pass.

    ``qk_fn`` (a call argument) maps the projected (q, k), each (B, L, H, D), to new ones before
    attention: position encodings that act on queries and keys (``jaxformers.layers.PositionTerms``).

    ``binary`` (a ``jaxformers.compress.binary.BinaryRecipe``) binarizes the projections and the
    attention core (Bi-Attention, BiPFT's elastic attention, BiViT's softmax-aware binarization...).

    Outlier-free attention (see the module docstring): ``softmax`` is ``"softmax"`` or
    ``"clipped(γ:ζ)"``; ``gate`` one of ``GATES`` (``HeadGate``, parameters under ``gate``) with
    ``gate_mlp`` / ``gate_init`` (π). The gate multiplies each head's output before ``proj``.
    Probabilities come from ``attention_probs`` (the ``"xla"`` implementation; a non-default
    softmax makes ``"auto"`` take it).

    ``separate_qkv`` gives three projections ``q``, ``k``, ``v`` (embed, heads, head_dim) instead of
    the fused ones, and ``value`` (an input for the values, default: the keys' input) lets the keys
    and values read different inputs: DETR-style attention adds position embeddings to the queries
    and keys but not to the values (Mask2Former, Deformable DETR).

    ``head_mask`` (B, heads) multiplies each head's output before ``proj`` (0 drops a head: pruning,
    weight-sharing supernets that sample the number of heads per example).

    ``rel_pos`` = (h, w): the tokens are an h x w grid (row-major) and the logits get the decomposed
    relative position bias (``decomposed_rel_pos_bias``; parameters ``rel_pos_h`` (2h - 1, head_dim)
    and ``rel_pos_w``, zero-initialised as SAM's image encoder).
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    scale: float | None = None
    attention_dropout: float = 0.0
    proj_dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    attention_fn: Callable[..., jax.Array] | None = None
    causal: bool = False
    softmax: str = "softmax"
    gate: str | None = None
    gate_mlp: bool = False
    gate_init: float | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    return_qk: bool = False  # also return (q, k), each (B, L, H, D): token reduction reads keys / [CLS] attention
    binary: Any = None
    separate_qkv: bool = False
    rel_pos: tuple[int, int] | None = None

    def attention_probs(self, scores: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Attention probabilities (B, H, Lq, Lk) from the scaled scores (plus bias) before masking
        and the boolean mask: the masked softmax or the clipped softmax of ``softmax``. A method, so
        interceptors (quantizers, statistics) can wrap it."""
        clipped = parse_softmax(self.softmax)
        if clipped is None:
            return masked_softmax(scores, mask)
        return clipped_softmax(scores, *clipped, mask=mask)

    def _dense(self, features, axes, name, use_bias, axis=-1):
        if self.binary is not None:
            return self.binary.dense(features, axes=axes, axis=axis, use_bias=use_bias, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name, role="attention")
        return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=logical(trunc_normal(0.02), axes),
                               bias_init=logical(nn.initializers.zeros_init(), axes[1 if isinstance(axis, int) else len(axis):]),
                               name=name)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        train: bool = False,
        cache: KVCache | None = None,
        value: jax.Array | None = None,
        qk_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
        head_mask: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        dim = x.shape[-1]
        custom_softmax = parse_softmax(self.softmax) is not None
        check_gate(self.gate, self.gate_mlp, self.gate_init)
        if cache is not None and self.gate == "conditional_per_head":
            raise ValueError("gate='conditional_per_head' averages over the whole sequence, which a decoding step "
                             "does not see; use 'conditional_per_token' for cached decoding")
        if self.attention_fn is not None and custom_softmax:
            raise ValueError(f"softmax={self.softmax!r} needs the built-in attention, not an attention_fn")
        if cache is not None and (kv is not None or segment_ids is not None or self.attention_fn is not None
                                  or value is not None):
            raise ValueError("a KV cache is for self-attention decoding steps: pass no kv, value, segment_ids or "
                             "attention_fn with cache")
        if value is not None and not self.separate_qkv:
            raise ValueError("value= (a separate input for the values) needs MultiHeadAttention(separate_qkv=True)")
        if self.head_dim is None and dim % self.num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads={self.num_heads}")
        head_dim = self.head_dim or dim // self.num_heads
        heads = (self.num_heads, head_dim)
        if self.separate_qkv:
            kin = x if kv is None else kv
            q = self._dense(heads, ("embed", "heads", "kv"), "q", self.qkv_bias)(x)
            k = self._dense(heads, ("embed", "heads", "kv"), "k", self.qkv_bias)(kin)
            v = self._dense(heads, ("embed", "heads", "kv"), "v", self.qkv_bias)(kin if value is None else value)
        elif kv is None:
            qkv = self._dense((3,) + heads, ("embed", None, "heads", "kv"), "qkv", self.qkv_bias)(x)
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            q = self._dense(heads, ("embed", "heads", "kv"), "q", self.qkv_bias)(x)
            kvp = self._dense((2,) + heads, ("embed", None, "heads", "kv"), "kv", self.qkv_bias)(kv)
            k, v = kvp[..., 0, :, :], kvp[..., 1, :, :]
        names = ("act_batch", "act_len", "act_heads", None)
        q, k, v = (constrain(t, names) for t in (q, k, v))
        if qk_fn is not None:  # position encodings that act on queries and keys (e.g. SeqPE's attn_mul)
            q, k = qk_fn(q, k)
        if self.rel_pos is not None:
            (gh, gw), zeros = self.rel_pos, logical(nn.initializers.zeros_init(), (None, "kv"))
            rel = decomposed_rel_pos_bias(q, self.param("rel_pos_h", zeros, (2 * gh - 1, head_dim), self.param_dtype),
                                          self.param("rel_pos_w", zeros, (2 * gw - 1, head_dim), self.param_dtype),
                                          (gh, gw))
            bias = rel if bias is None else bias + rel
        rate = self.attention_dropout if train else 0.0
        rng = self.make_rng("dropout") if rate > 0.0 and self.attention_fn is None else None
        if self.binary is not None:
            if cache is not None or kv is not None or self.attention_fn is not None or self.causal or custom_softmax:
                raise ValueError("binarized attention (binary=...) is bidirectional self-attention with its own "
                                 "attention core: no kv, cache, attention_fn, causal or clipped softmax")
            out = self.binary.attention_core(x, q, k, v, mask=mask, bias=bias, segment_ids=segment_ids,
                                             scale=self.scale, dropout_rate=rate, dropout_rng=rng)
        elif cache is not None:
            if self.causal:  # step position index + i sees cache slots <= index + i
                step = (jnp.arange(cache.k.shape[1])[None, :]
                        <= jnp.asarray(cache.index, jnp.int32) + jnp.arange(q.shape[1])[:, None])[None, None]
                mask = step if mask is None else jnp.logical_and(mask, step)
            out, cache = cached_attention(q, k, v, cache, mask=mask, bias=bias, scale=self.scale, dropout_rate=rate,
                                          dropout_rng=rng, softmax_fn=self.attention_probs)
        elif self.attention_fn is not None:
            if self.causal:
                raise ValueError("MultiHeadAttention with an attention_fn does not apply causal=True: give the "
                                 "attention_fn its own causal pattern (e.g. local_global_attention(causal=True))")
            given = [name for name, on in (("mask", mask is not None), ("bias", bias is not None),
                                           (f"attention_dropout={self.attention_dropout} while training", rate > 0.0))
                     if on]
            if given:
                raise ValueError("MultiHeadAttention with an attention_fn takes no mask, bias or attention dropout; "
                                 f"got {', '.join(given)}")
            out = self.attention_fn(q, k, v, segment_ids=segment_ids, scale=self.scale)
        else:
            seam = custom_softmax or self.attention_impl == "xla"
            out = dot_product_attention(
                q, k, v, bias=bias, mask=mask, segment_ids=segment_ids, scale=self.scale,
                implementation=self.attention_impl, dropout_rate=rate, dropout_rng=rng, causal=self.causal,
                softmax_fn=self.attention_probs if seam else None)
        if self.gate is not None:
            gate = HeadGate(self.gate, self.num_heads, self.gate_mlp, self.gate_init, self.param_dtype, name="gate")(x)
            out = out * gate.astype(out.dtype)
        out = constrain(out, names)
        if head_mask is not None:
            out = out * head_mask.astype(out.dtype)[:, None, :, None]
        out = self._dense(self.out_features or dim, ("heads", "kv", "embed"), "proj", self.out_bias, axis=(-2, -1))(out)
        out = nn.Dropout(self.proj_dropout)(out, deterministic=not train)
        if self.return_qk:
            out = (out, (q, k))
        return out if cache is None else (out, cache)
