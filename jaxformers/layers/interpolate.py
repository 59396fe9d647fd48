"""Bilinear resampling of NHWC maps with PyTorch's conventions (the dense heads' parity depends on them).

- ``resize_bilinear(x, size, align_corners=False)``: ``torch.nn.functional.interpolate(...,
  mode="bilinear", align_corners=...)`` (no antialiasing, edge samples clamped).
- ``grid_sample(x, points)``: ``torch.nn.functional.grid_sample(..., mode="bilinear",
  padding_mode="zeros", align_corners=False)`` at points given in [0, 1] x [0, 1] (x, y) image
  coordinates: what point-sampled mask losses (PointRend / Mask2Former ``point_sample``) and
  multi-scale deformable attention read.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _source_coords(out_size: int, in_size: int, align_corners: bool) -> jax.Array:
    i = jnp.arange(out_size, dtype=jnp.float32)
    if align_corners:
        return i * ((in_size - 1) / (out_size - 1)) if out_size > 1 else jnp.zeros_like(i)
    return jnp.maximum((i + 0.5) * (in_size / out_size) - 0.5, 0.0)


def _interp_axis(x: jax.Array, axis: int, out_size: int, align_corners: bool) -> jax.Array:
    in_size = x.shape[axis]
    if in_size == out_size and not align_corners:
        return x
    src = _source_coords(out_size, in_size, align_corners)
    lo = jnp.clip(jnp.floor(src).astype(jnp.int32), 0, in_size - 1)
    hi = jnp.minimum(lo + 1, in_size - 1)
    w = (src - lo).astype(x.dtype)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w = w.reshape(shape)
    return jnp.take(x, lo, axis=axis) * (1 - w) + jnp.take(x, hi, axis=axis) * w


def resize_bilinear(x: jax.Array, size: tuple[int, int], align_corners: bool = False) -> jax.Array:
    """(..., H, W, C) -> (..., h, w, C) bilinear, as ``F.interpolate(mode="bilinear")`` (no antialias)."""
    h, w = size
    x = _interp_axis(x, x.ndim - 3, h, align_corners)
    return _interp_axis(x, x.ndim - 2, w, align_corners)


def grid_sample(x: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinear samples of ``x`` (B, H, W, C) at ``points`` (B, N, 2) = (x, y) in [0, 1]: (B, N, C).

    Pixel centres sit at (i + 0.5) / size (``align_corners=False``); taps outside the map read 0."""
    b, height, width, c = x.shape
    px = points[..., 0] * width - 0.5
    py = points[..., 1] * height - 0.5
    x0, y0 = jnp.floor(px), jnp.floor(py)
    fx, fy = px - x0, py - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = x.reshape(b, height * width, c)
    idx, wts = [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            idx.append(jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1))
            wts.append(jnp.where(inside, wx * wy, 0.0))
    n = points.shape[1]
    taps = jnp.take_along_axis(flat, jnp.stack(idx, -1).reshape(b, n * 4, 1), axis=1).reshape(b, n, 4, c)
    return jnp.einsum("bnkc,bnk->bnc", taps, jnp.stack(wts, -1).astype(x.dtype))
