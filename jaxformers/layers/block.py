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
    attn_softmax: str = "softmax"
    attn_gate: str | None = None
    attn_gate_mlp: bool = False
    attn_gate_init: float | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    binary: Any = None  # a jaxformers.compress.binary.BinaryRecipe for the attention and the MLP
    # Per-block widths (pruned / searched subnets): head_dim (default dim // num_heads), MLP hidden
    # width (default dim * mlp_ratio), attention scale (default head_dim ** -0.5).
    # num_heads=0 / mlp_hidden=0 remove that sublayer; attention_fn replaces the attention pattern.
    head_dim: int | None = None
    mlp_hidden: int | None = None
    scale: float | None = None
    attention_fn: Any = None
    # Token reduction between attention and MLP: reduce(x, size, q, k) -> (x, size); the block then
    # returns (x, size). ``bias`` is added to the attention logits (e.g. log(size): proportional attention).
    reduce: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, bias: jax.Array | None = None,
                 size: jax.Array | None = None, qk_fn=None) -> jax.Array | tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        if self.num_heads == 0:  # attention sublayer removed (pruned)
            x = self._mlp(x, train, dim, kw)
            return x if self.reduce is None else (x, size)
        y = LayerNorm(self.norm_eps, name="norm1", **kw)(x)
        y = MultiHeadAttention(self.num_heads, head_dim=self.head_dim, qkv_bias=self.qkv_bias, scale=self.scale,
                               attention_dropout=self.attention_dropout, proj_dropout=self.dropout,
                               attention_impl=self.attention_impl, attention_fn=self.attention_fn,
                               return_qk=self.reduce is not None, name="attn", binary=self.binary,
                               softmax=self.attn_softmax, gate=self.attn_gate, gate_mlp=self.attn_gate_mlp,
                               gate_init=self.attn_gate_init,
                               **kw)(y, mask=mask, bias=bias, segment_ids=segment_ids, train=train,
                                       qk_fn=qk_fn)
        if self.reduce is not None:
            y, (q, k) = y
        if self.layer_scale_init is not None:
            y = LayerScale(self.layer_scale_init, name="ls1")(y)
        x = x + DropPath(self.drop_path)(y, train=train)
        if self.reduce is not None:
            x, size = self.reduce(x, size, q, k)
        x = self._mlp(x, train, dim, kw)
        return x if self.reduce is None else (x, size)

    def _mlp(self, x, train, dim, kw):
        hidden = int(dim * self.mlp_ratio) if self.mlp_hidden is None else self.mlp_hidden
        if hidden:  # mlp_hidden=0: MLP sublayer removed (pruned)
            y = LayerNorm(self.norm_eps, name="norm2", **kw)(x)
            y = Mlp(hidden, dropout=self.dropout, name="mlp", binary=self.binary, **kw)(y, train=train)
            if self.layer_scale_init is not None:
                y = LayerScale(self.layer_scale_init, name="ls2")(y)
            x = x + DropPath(self.drop_path)(y, train=train)
        return constrain(x, ("act_batch", "act_len", "act_embed"))
