"""One-layer transformers are universal approximators: the construction of Kajitsuka & Sato, made numerical.

Paper: "Are Transformers with One Layer Self-Attention Using Low-Rank Weight Matrices Universal
Approximators?", Kajitsuka & Sato, ICLR 2024, arXiv 2307.14023 (see also Gumaan, arXiv 2507.10581). No
official code.

The argument: softmax attention computes a **Boltzmann operator**, boltz_β(a) = Σ_j a_j e^{β a_j} /
Σ_j e^{β a_j}. With rank-1 single-head weights (query δ·v, key v, value v, for one direction v) the
attention output of token i is Σ_j softmax_j(δ a_i a_j) a_j = boltz_{δ a_i}(a) with a_j = v·x_j: a
function of the token's own value and of the whole *multiset* of values in the sequence. On quantised
inputs (the first FFN's job) this map is injective — distinct (token, context) pairs land on distinct
numbers (a **contextual mapping**; ``min_separation`` measures the gap), which uniform attention
(δ = 0, a mean) is not. A second FFN can then map those numbers to any targets, so FFN -> one rank-1
single-head attention layer -> FFN approximates any continuous permutation-equivariant function on a
compact set, and memorises any finite labelled sample.

``OneLayerTransformer`` is that architecture: token-wise FFN (residual) -> single-head self-attention
with head dimension 1 (rank-1 query, key, value and output maps; the shared ``MultiHeadAttention``) ->
token-wise FFN to the outputs, with no position information (permutation equivariant). The benchmark
``benchmarks/sequence_scaling.py --only universal`` runs the demonstrations: the separation of distinct
inputs, approximation error falling with the FFN width on a permutation-equivariant target, and
memorisation of random labels.
"""
from __future__ import annotations

import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers import Dense, MultiHeadAttention
from jaxformers.registry import ModelInfo, register_model

__all__ = ["OneLayerTransformer", "boltzmann", "rank_one_attention", "min_separation"]


def boltzmann(a: jax.Array, beta: float | jax.Array = 1.0, axis: int = -1) -> jax.Array:
    """boltz_β(a) = Σ_j a_j e^{β a_j} / Σ_j e^{β a_j}: the softmax-weighted mean of a (β = 0: the mean,
    β → ∞: the max)."""
    return jnp.sum(a * jax.nn.softmax(beta * a, axis=axis), axis=axis)


def rank_one_attention(a: jax.Array, delta: float) -> jax.Array:
    """The attention output of every token for projections a (..., L): softmax over j of δ a_i a_j applied
    to the values a_j, i.e. boltz_{δ a_i}(a) for each i."""
    return jnp.einsum("...ij,...j->...i", jax.nn.softmax(delta * a[..., :, None] * a[..., None, :], axis=-1), a)


def min_separation(values: np.ndarray, seq_len: int, delta: float) -> float:
    """The smallest gap |boltz_{δ a}(S) - boltz_{δ a}(S')| over every token value a and every two distinct
    multisets S ≠ S' of ``seq_len`` elements of ``values`` that both contain a: > 0 means the attention
    output tells apart every context a token can be in (a contextual mapping); float64."""
    values = np.asarray(values, np.float64)
    gaps = []
    for a in values:
        outs = []
        for rest in itertools.combinations_with_replacement(values, seq_len - 1):
            s = np.asarray((a, *rest))
            w = np.exp(delta * a * s - np.max(delta * a * s))
            outs.append(float(np.sum(w * s) / np.sum(w)))
        outs = np.sort(np.asarray(outs))
        if len(outs) > 1:
            gaps.append(np.min(np.diff(outs)))
    return float(min(gaps)) if gaps else float("inf")


class OneLayerTransformer(nn.Module):
    """FFN (residual) -> rank-1 single-head self-attention (residual) -> FFN: (B, L, d) -> (B, L, out)."""

    d_model: int = 8
    hidden: int = 64
    out_features: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def example_inputs(self, batch_size: int = 1) -> tuple[jax.Array]:
        return (jnp.zeros((batch_size, 4, self.d_model), jnp.float32),)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (batch, length, d_model={self.d_model}); got shape {x.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(self.hidden, axes=("embed", "mlp"), name="ffn1_in", **kw)(x)
        x = x + Dense(self.d_model, axes=("mlp", "embed"), name="ffn1_out", **kw)(jax.nn.relu(h))
        x = x + MultiHeadAttention(1, head_dim=1, qkv_bias=False, out_bias=False, scale=1.0, name="attn", **kw)(
            x, train=train)
        h = Dense(self.hidden, axes=("embed", "mlp"), name="ffn2_in", **kw)(x)
        return Dense(self.out_features, axes=("mlp", None), name="ffn2_out", **kw)(jax.nn.relu(h))


@register_model(ModelInfo(paper="Are Transformers with One Layer Self-Attention Using Low-Rank Weight Matrices "
                                "Universal Approximators?", arxiv="2307.14023", repo=None, input_size=(4, 8)))
def one_layer_transformer(**overrides: Any) -> OneLayerTransformer:
    """FFN -> one rank-1 single-head attention layer -> FFN (d 8, FFN width 64)."""
    return OneLayerTransformer(**overrides)
