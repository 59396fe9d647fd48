"""Byte-level text classifier for "Wide Attention Is The Way Forward For Transformers?".

Paper: Brown, Zhao, Shumailov, Mullins, NeurIPS 2022 workshop (All Things Attention), arXiv
2210.00640. No official code was found. The paper varies a Transformer's aspect ratio: the number of
layers against the number of heads per layer, with the *total* number of heads, the head width and
everything else fixed, trained from scratch; its byte-level IMDb task follows the Long Range Arena
text setup (Tay et al., arXiv 2011.04006): bytes as tokens, sequences of up to 1000 (LRA: 1000,
here 1024), learned positions, mean pooling, 2 classes.

Host: ``WideAttentionClassifier``: byte embedding (256 bytes + padding id 0 shifted: ids are
byte + 1) + learned positions -> ``depth`` pre-norm ``TransformerBlock``s with ``num_heads`` heads
of width ``head_dim`` each (the attention width heads x head_dim may differ from the model width,
as in the paper, where widening keeps each head's size) -> LayerNorm -> mean over non-padding
tokens -> Linear. ``jaxformers.compress.wide.aspect_ratio_configs`` gives the configs with the
total number of heads fixed.

Registered: ``wide_attention_lra_text_deep`` (LRA's byte-level text baseline: 4 layers x 4 heads of
width 64, model width 256, MLP 1024) and ``wide_attention_lra_text_wide`` (1 layer x 16 heads: the
same 16 heads in one layer). The paper's exact widths for every task and attention type could not
be read offline; these follow the LRA text configuration it builds on.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers import Dense, LayerNorm, TransformerBlock, check_token_ids, logical, maybe_remat
from jaxformers.layers.attention import AttentionImpl
from jaxformers.registry import ModelInfo, register_model

PAD_ID = 0  # byte b is token b + 1


def encode_bytes(texts: list[str | bytes], max_len: int) -> np.ndarray:
    """(len(texts), max_len) int32 ids: UTF-8 bytes + 1, truncated, padded with 0."""
    out = np.zeros((len(texts), max_len), np.int32)
    for i, t in enumerate(texts):
        b = np.frombuffer(t.encode("utf-8") if isinstance(t, str) else bytes(t), np.uint8)[:max_len]
        out[i, : b.size] = b.astype(np.int32) + 1
    return out


class WideAttentionClassifier(nn.Module):
    """Byte-level Transformer classifier with a configurable aspect ratio (depth x heads)."""

    num_classes: int = 2
    max_len: int = 1024
    embed_dim: int = 256
    depth: int = 4
    num_heads: int = 4
    head_dim: int = 64
    mlp_dim: int = 1024
    drop_rate: float = 0.1
    attn_drop_rate: float = 0.1
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def example_inputs(self, batch_size: int = 1):
        return (jnp.ones((batch_size, self.max_len), jnp.int32),)

    @nn.compact
    def __call__(self, ids: jax.Array, *, train: bool = False) -> jax.Array:
        check_token_ids(ids, vocab_size=257, max_len=self.max_len, name="ids")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(257, self.embed_dim, embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="embed", **kw)(ids)
        pos = self.param("pos_embed", logical(nn.initializers.normal(0.02), (None, "embed")),
                         (self.max_len, self.embed_dim), self.param_dtype)
        x = x + pos[: ids.shape[1]].astype(x.dtype)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        block = maybe_remat(TransformerBlock, self.remat)
        for i in range(self.depth):
            x = block(self.num_heads, 4.0, True, 0.0, self.attn_drop_rate, self.drop_rate,
                      attention_impl=self.attention_impl, head_dim=self.head_dim, mlp_hidden=self.mlp_dim,
                      name=f"blocks_{i}", **kw)(x, train, mask=(ids != PAD_ID)[:, None, None, :])
        x = LayerNorm(1e-6, name="norm", **kw)(x)
        keep = (ids != PAD_ID)[..., None].astype(x.dtype)
        pooled = (x * keep).sum(1) / jnp.maximum(keep.sum(1), 1.0)
        return Dense(self.num_classes, axes=("embed", "classes"), name="head", **kw)(pooled)


LRA_TEXT = dict(embed_dim=256, head_dim=64, mlp_dim=1024, max_len=1024, num_classes=2)


def _info(params_m: float) -> ModelInfo:
    return ModelInfo(paper="Wide Attention Is The Way Forward For Transformers?", arxiv="2210.00640", repo=None,
                     input_size=(1024,), params_m=params_m)


@register_model(_info(3.49))
def wide_attention_lra_text_deep(**overrides: Any) -> WideAttentionClassifier:
    """4 layers x 4 heads (16 heads in all): LRA's byte-level text configuration."""
    return WideAttentionClassifier(**{**LRA_TEXT, "depth": 4, "num_heads": 4, **overrides})


@register_model(_info(1.91))
def wide_attention_lra_text_wide(**overrides: Any) -> WideAttentionClassifier:
    """1 layer x 16 heads: the same 16 heads of width 64 in one wide layer."""
    return WideAttentionClassifier(**{**LRA_TEXT, "depth": 1, "num_heads": 16, **overrides})
