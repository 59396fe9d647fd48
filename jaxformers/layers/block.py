"""The pre-norm transformer block and per-block rematerialisation."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers.attention import AttentionImpl, MultiHeadAttention
from jaxformers.layers.drop import DropPath, LayerScale
from jaxformers.layers.mlp import Mlp
from jaxformers.layers.norm import LayerNorm
from jaxformers.sharding import constrain


def maybe_remat(module_cls: type[nn.Module], remat: bool) -> type[nn.Module]:
    """``module_cls`` rematerialised in the backward pass when ``remat`` (its ``train`` argument,
    passed positionally as the second argument, is static)."""
    return nn.remat(module_cls, static_argnums=(2,)) if remat else module_cls


class TransformerBlock(nn.Module):
    """x + DropPath(LS(Attn(LN(x)))) then x + DropPath(LS(MLP(LN(x)))) (timm ``Block`` names:
    ``norm1``, ``attn``, ``norm2``, ``mlp``, ``ls1``, ``ls2``)."""

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    attention_dropout: float = 0.0
    dropout: float = 0.0
    layer_scale_init: float | None = None
    norm_eps: float = 1e-6
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    binary: Any = None  # a jaxformers.compress.binary.BinaryRecipe for the attention and the MLP

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, qk_fn=None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        y = LayerNorm(self.norm_eps, name="norm1", **kw)(x)
        y = MultiHeadAttention(self.num_heads, qkv_bias=self.qkv_bias, attention_dropout=self.attention_dropout,
                               proj_dropout=self.dropout, attention_impl=self.attention_impl, name="attn",
                               binary=self.binary, **kw)(y, mask=mask, segment_ids=segment_ids, train=train,
                                                         qk_fn=qk_fn)
        if self.layer_scale_init is not None:
            y = LayerScale(self.layer_scale_init, name="ls1")(y)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = LayerNorm(self.norm_eps, name="norm2", **kw)(x)
        y = Mlp(int(dim * self.mlp_ratio), dropout=self.dropout, name="mlp", binary=self.binary, **kw)(y, train=train)
        if self.layer_scale_init is not None:
            y = LayerScale(self.layer_scale_init, name="ls2")(y)
        x = x + DropPath(self.drop_path)(y, train=train)
        return constrain(x, ("act_batch", "act_len", "act_embed"))
