"""Time2Vec (Kazemi et al. 2019, arXiv 1907.05321): a learned representation of a time value.

For a scalar τ: t2v(τ)[0] = ω₀ τ + φ₀ (one linear channel, non-periodic progression) and
t2v(τ)[i] = F(ω_i τ + φ_i), i = 1..k (k periodic channels, F = sin by default), with learned
frequencies ω and phases φ. ``Time2Vec`` applies it to each of the F values on the last axis with
separate parameters per value: (..., F) -> (..., F, k + 1) (``flatten`` -> (..., F·(k + 1))).

This is the paper's definition. The widespread Keras variant that *adds* sin(xW + b) to the linear
term and concatenates the input is not offered; concatenating the input is the caller's choice.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers.linear import logical

__all__ = ["Time2Vec"]


class Time2Vec(nn.Module):
    """(..., F) -> (..., F, k + 1): channel 0 linear in τ, channels 1..k periodic (``periodic``)."""

    k: int
    periodic: Callable[[jax.Array], jax.Array] = jnp.sin
    flatten: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tau: jax.Array) -> jax.Array:
        if self.k < 1:
            raise ValueError(f"Time2Vec needs k >= 1 periodic channels; got k={self.k}")
        f = tau.shape[-1]
        omega = self.param("omega", logical(nn.initializers.normal(1.0), (None, None)), (f, self.k + 1),
                           self.param_dtype)
        phi = self.param("phi", logical(nn.initializers.uniform(2 * jnp.pi), (None, None)), (f, self.k + 1),
                         self.param_dtype)
        z = tau.astype(jnp.float32)[..., None] * omega + phi
        out = jnp.concatenate([z[..., :1], self.periodic(z[..., 1:])], axis=-1)
        return out.reshape(*out.shape[:-2], -1) if self.flatten else out
