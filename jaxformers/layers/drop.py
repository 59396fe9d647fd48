"""Stochastic depth (DropPath) and LayerScale."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers.linear import logical


class DropPath(nn.Module):
    """Drops the whole residual branch per example with probability ``rate`` and rescales the rest
    by 1/(1-rate) (Huang et al. 2016). Active only when ``train=True``; RNG stream ``dropout``."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT), initialised to ``init_value``."""

    init_value: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", logical(nn.initializers.constant(self.init_value), ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(x.dtype)
