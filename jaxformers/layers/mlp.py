"""The transformer feed-forward block."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers.linear import Dense
from jaxformers.sharding import constrain


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch.nn.GELU() and timm use."""
    return nn.gelu(x, approximate=False)


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout (timm's ``Mlp``); hidden = ``hidden_features``."""

    hidden_features: int
    out_features: int | None = None
    activation: Callable[[jax.Array], jax.Array] = gelu
    dropout: float = 0.0
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    binary: Any = None  # a jaxformers.compress.binary.BinaryRecipe: binarized fc1 / fc2

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        out = self.out_features or x.shape[-1]
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        dense = Dense if self.binary is None else self.binary.dense
        x = dense(self.hidden_features, axes=("embed", "mlp"), name="fc1", **kw)(x)
        x = constrain(x, ("act_batch",) + (None,) * (x.ndim - 2) + ("act_mlp",))
        x = self.activation(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = dense(out, axes=("mlp", "embed"), name="fc2", **kw)(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)
