"""Uniform fake-quantisation: the integer grids of the quantisation papers, as differentiable JAX ops.

The formulas are those of Qualcomm's quantisation library, as the official code of "Quantizable
Transformers" (Qualcomm-AI-research/outlier-free-transformers, ``quantization/quantizers``) uses
them; each function names its counterpart:

- asymmetric (``AsymmetricUniformQuantizer``): the range is first widened to hold 0
  (x_min <- min(x_min, 0), x_max <- max(x_max, eps)); scale = (x_max - x_min) / (2^b - 1),
  zero point = clip(round(-x_min / scale), 0, 2^b - 1); q = clip(round(x / scale) + zp, 0, 2^b - 1),
  x̂ = scale · (q - zp). Activations.
- symmetric (``SymmetricUniformQuantizer``): signed iff the range holds a negative value; then the
  grid is [-2^(b-1), 2^(b-1) - 1] with scale = absmax / (2^(b-1) - 1), else [0, 2^b - 1] with
  scale = max / (2^b - 1). Weights ("current min-max": the range is the tensor's own).
- ``running_minmax`` (``RunningMinMaxEstimator``): the first batch sets the range, later ones move
  it as r <- momentum · r + (1 - momentum) · r_batch (momentum 0.9).

Rounding passes gradients straight through (``round_ste``), so every op trains (QAT).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-8


def round_ste(x: jax.Array) -> jax.Array:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def asymmetric_params(x_min, x_max, n_bits: int = 8, eps: float = EPS):
    """(scale, zero_point) of the asymmetric grid for the range [x_min, x_max] (widened to hold 0)."""
    int_max = 2.0 ** n_bits - 1
    x_min = jnp.minimum(jnp.asarray(x_min, jnp.float32), 0.0)
    x_max = jnp.maximum(jnp.asarray(x_max, jnp.float32), eps)
    delta = (x_max - x_min) / int_max
    zero_point = jnp.clip(jnp.round(-x_min / delta), 0.0, int_max)
    return jnp.maximum(delta, eps), zero_point


def fake_quant_asymmetric(x: jax.Array, x_min, x_max, n_bits: int = 8) -> jax.Array:
    """x on the asymmetric ``n_bits`` grid of [x_min, x_max] (quantise, then dequantise), in float32."""
    scale, zero_point = asymmetric_params(x_min, x_max, n_bits)
    q = jnp.clip(round_ste(x.astype(jnp.float32) / scale) + zero_point, 0.0, 2.0 ** n_bits - 1)
    return scale * (q - zero_point)


def symmetric_grid(x_min: float, x_max: float, n_bits: int = 8, eps: float = EPS) -> tuple[float, int, int]:
    """(scale, int_min, int_max) of the symmetric grid for a concrete range."""
    signed = min(x_min, 0.0) < 0.0
    absmax = max(abs(min(x_min, 0.0)), max(x_max, eps))
    int_max = 2 ** (n_bits - 1) - 1 if signed else 2 ** n_bits - 1
    int_min = -(2 ** (n_bits - 1)) if signed else 0
    return max(absmax / int_max, eps), int_min, int_max


def quantize_symmetric(w, n_bits: int = 8, channel_axes: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and scale of ``w`` on its symmetric grid: one range for the whole tensor, or one
    per index of ``channel_axes`` (e.g. the q/k/v part of a fused projection, or output channels).
    Codes are int8 (uint8 for an all-non-negative range with ``n_bits`` = 8; int16/uint16 up to 16
    bits); ``codes * scale`` (scale broadcast over the other axes) gives the quantised tensor."""
    w = np.asarray(w, np.float32)
    axes = tuple(a % w.ndim for a in channel_axes)
    reduce = tuple(a for a in range(w.ndim) if a not in axes)
    lo, hi = w.min(axis=reduce, keepdims=True), w.max(axis=reduce, keepdims=True)
    grids = [symmetric_grid(float(a), float(b), n_bits) for a, b in zip(lo.ravel(), hi.ravel())]
    scale = np.array([g[0] for g in grids], np.float32).reshape(lo.shape)
    int_min = np.array([g[1] for g in grids], np.float32).reshape(lo.shape)
    int_max = np.array([g[2] for g in grids], np.float32).reshape(lo.shape)
    codes = np.clip(np.round(w / scale), int_min, int_max)
    signed = bool((int_min < 0).any())
    dtype = {(True, 8): np.int8, (False, 8): np.uint8}.get((signed, n_bits), np.int16 if signed else np.uint16)
    if n_bits > 16:
        raise ValueError(f"n_bits={n_bits}: at most 16 bits are stored as integers")
    return codes.astype(dtype), scale


def fake_quant_symmetric(x: jax.Array, scale, n_bits: int = 8, signed: bool = True) -> jax.Array:
    """x on a symmetric grid of the given ``scale`` (straight-through rounding), in float32."""
    int_min, int_max = (-(2.0 ** (n_bits - 1)), 2.0 ** (n_bits - 1) - 1) if signed else (0.0, 2.0 ** n_bits - 1)
    return scale * jnp.clip(round_ste(x.astype(jnp.float32) / scale), int_min, int_max)


def batch_range(x: jax.Array, percentile: float | None = None) -> jax.Array:
    """[min, max] of ``x`` (float32 (2,)), or its (100 - p, p) percentiles (the official
    ``--percentile`` option of the running min-max estimator)."""
    x = x.astype(jnp.float32)
    if percentile is None:
        return jnp.stack([jnp.min(x), jnp.max(x)])
    return jnp.percentile(x.ravel(), jnp.array([100.0 - percentile, percentile]))


def running_minmax(current: jax.Array, batch: jax.Array, momentum: float = 0.9) -> jax.Array:
    """The running [min, max] after one more batch: the batch's own range when ``current`` is unset
    (NaN), else momentum · current + (1 - momentum) · batch."""
    return jnp.where(jnp.isnan(current), batch, momentum * current + (1.0 - momentum) * batch)
