"""Longformer-style self-attention for ``Bert(attention_window=w, global_tokens=g)``.

Each token attends to its ±w neighbours (sliding window, Beltagy et al. 2020, arXiv 2004.05150)
and the first g tokens of every row are global (attend to and are attended by all tokens), all
inside packed segments, through ``jaxformers.kernels.local_global_attention`` (block-sparse Pallas
kernel on GPU/TPU, its plain-jnp reference on CPU). Parameters have ``MultiHeadAttention``'s
layout (``qkv`` (E, 3, H, D), ``proj`` (H, D, E)), so a dense BERT checkpoint loads unchanged and
the model can switch between dense and local attention.

Deviations from Longformer: global tokens are the first ``g`` of a row (a static count, not a
per-token mask), they reuse the local q/k/v projections (Longformer has separate global ones),
and attention-probability dropout is not applied on this path (the kernel has none).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers import logical, trunc_normal
from jaxformers.sharding import constrain

_KERNEL_IMPL = {"xla": "xla", "pallas": "pallas", "auto": "auto", "cudnn": "auto"}


class LocalGlobalSelfAttention(nn.Module):
    """Sliding-window + global-token self-attention with ``MultiHeadAttention``'s parameters."""

    num_heads: int
    window: int
    global_tokens: int = 0
    proj_dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None, train: bool = False) -> jax.Array:
        from jaxformers.kernels import local_global_attention

        dim = x.shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads={self.num_heads}")
        if self.window < 0:
            raise ValueError(f"attention_window must be >= 0, got {self.window}")
        heads = (self.num_heads, dim // self.num_heads)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = nn.DenseGeneral((3,) + heads, kernel_init=logical(trunc_normal(0.02), ("embed", None, "heads", "kv")),
                              bias_init=logical(nn.initializers.zeros_init(), (None, "heads", "kv")), name="qkv",
                              **kw)(x)
        names = ("act_batch", "act_len", "act_heads", None)
        q, k, v = (constrain(qkv[..., i, :, :], names) for i in range(3))
        out = local_global_attention(q, k, v, window=(self.window, self.window), global_tokens=self.global_tokens,
                                     segment_ids=segment_ids, implementation=_KERNEL_IMPL[self.attention_impl])
        out = nn.DenseGeneral(dim, axis=(-2, -1), kernel_init=logical(trunc_normal(0.02), ("heads", "kv", "embed")),
                              bias_init=logical(nn.initializers.zeros_init(), ("embed",)), name="proj",
                              **kw)(constrain(out, names))
        return nn.Dropout(self.proj_dropout)(out, deterministic=not train)
