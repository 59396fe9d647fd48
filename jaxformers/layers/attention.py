"""Multi-head attention with one seam for the attention computation.

``dot_product_attention(q, k, v, implementation=...)`` is the single place where scores meet values:

- ``"xla"``: plain ``jnp`` (softmax in float32); runs everywhere, supports bias, masks and dropout.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16/fp16).
- ``"pallas"``: ``jaxformers.kernels.local_global_attention`` (flash-style Pallas kernel; segment
  ids but no arbitrary bias/mask). On CPU it runs in interpret mode (slow, for tests).
- ``"auto"``: cuDNN on a GPU when the call is eligible, else ``"xla"``.

``MultiHeadAttention`` is the one attention module every model reuses; its projections carry the
logical axes (``embed``, ``heads``, ``kv``) so tensor parallelism shards whole heads.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def _xla_attention(q, k, v, bias, mask, scale, dropout_rate, dropout_rng):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def _cudnn_eligible(q, bias, mask, dropout_rate) -> bool:
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
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
) -> jax.Array:
    """softmax(q kᵀ · scale + bias, masked) v with q (B, Lq, H, D), k (B, Lk, H, D), v (B, Lk, H, Dv).

    ``mask`` (bool, True = attend) and ``bias`` broadcast to (B, H, Lq, Lk). ``segment_ids`` (B, L)
    int restricts attention to tokens of the same segment (self-attention, 0 = padding).
    ``scale`` defaults to D**-0.5. Returns (B, Lq, H, Dv) in v's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _check_qkv(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be (batch, length) = {q.shape[:2]}, got {segment_ids.shape}")
    if implementation == "auto":
        implementation = "cudnn" if _cudnn_eligible(q, bias, mask, dropout_rate) else "xla"

    if implementation == "pallas":
        if bias is not None or mask is not None or dropout_rate > 0.0:
            raise ValueError("implementation='pallas' takes segment_ids, not an arbitrary bias, "
                             "mask or attention dropout; use implementation='xla' for those")
        from jaxformers.kernels import local_global_attention

        return local_global_attention(q, k, v, segment_ids=segment_ids, scale=scale, implementation="pallas")

    if segment_ids is not None:
        seg = segment_mask(segment_ids, segment_ids)
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    if implementation == "cudnn":
        if dropout_rate > 0.0:
            raise ValueError("implementation='cudnn' has no attention dropout; use 'xla'")
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")
    return _xla_attention(q, k, v, bias, mask, scale, dropout_rate, dropout_rng)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) through ``dot_product_attention``.

    Self-attention (``kv=None``) uses one fused ``qkv`` projection of shape (embed, 3, heads, head_dim);
    cross-attention uses ``q`` (embed, heads, head_dim) and ``kv`` (embed, 2, heads, head_dim).
    ``proj`` maps (heads, head_dim) back to ``out_features`` (default: the input width).

    ``attention_fn`` replaces the attention pattern while keeping these parameters, e.g.
    ``functools.partial(jaxformers.kernels.local_global_attention, window=(w, w))`` for sliding
    windows: it is called as ``attention_fn(q, k, v, segment_ids=..., scale=...)`` and takes no
    mask, bias or attention dropout.
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
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _dense(self, features, axes, name, use_bias):
        return nn.DenseGeneral(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=logical(trunc_normal(0.02), axes),
                               bias_init=logical(nn.initializers.zeros_init(), axes[1:]), name=name)

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
    ) -> jax.Array:
        dim = x.shape[-1]
        if self.head_dim is None and dim % self.num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads={self.num_heads}")
        head_dim = self.head_dim or dim // self.num_heads
        heads = (self.num_heads, head_dim)
        if kv is None:
            qkv = self._dense((3,) + heads, ("embed", None, "heads", "kv"), "qkv", self.qkv_bias)(x)
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            q = self._dense(heads, ("embed", "heads", "kv"), "q", self.qkv_bias)(x)
            kvp = self._dense((2,) + heads, ("embed", None, "heads", "kv"), "kv", self.qkv_bias)(kv)
            k, v = kvp[..., 0, :, :], kvp[..., 1, :, :]
        names = ("act_batch", "act_len", "act_heads", None)
        q, k, v = (constrain(t, names) for t in (q, k, v))
        rate = self.attention_dropout if train else 0.0
        if self.attention_fn is not None:
            if mask is not None or bias is not None:
                raise ValueError("MultiHeadAttention with an attention_fn takes no mask or bias")
            out = self.attention_fn(q, k, v, segment_ids=segment_ids, scale=self.scale)
        else:
            out = dot_product_attention(
                q, k, v, bias=bias, mask=mask, segment_ids=segment_ids, scale=self.scale,
                implementation=self.attention_impl, dropout_rate=rate,
                dropout_rng=self.make_rng("dropout") if rate > 0.0 else None)
        out = constrain(out, names)
        out = nn.DenseGeneral(self.out_features or dim, axis=(-2, -1), use_bias=self.out_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernel_init=logical(trunc_normal(0.02), ("heads", "kv", "embed")),
                              bias_init=logical(nn.initializers.zeros_init(), ("embed",)), name="proj")(out)
        return nn.Dropout(self.proj_dropout)(out, deterministic=not train)
