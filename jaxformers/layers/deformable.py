"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, arXiv 2010.04159).

Each query attends to ``n_points`` sampled locations per head and per feature level, around its
reference point, with offsets and weights predicted from the query:

    out_h(q) = sum_{l, p} A_{h,l,p}(q) * V_{h,l}(ref_l(q) + dp_{h,l,p}(q) / (W_l, H_l))

``multi_scale_deformable_attention`` is the op in plain ``jnp`` (the reference of the official
CUDA kernel, ``ms_deform_attn_core_pytorch``: bilinear ``grid_sample`` with zero padding and
``align_corners=False``); ``MSDeformAttn`` is the module (the official / Hugging Face parameter
names ``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj`` and their
initialisation). ``ratio`` < 1 projects the values to ``int(d_model * ratio)`` channels (the
ViT-Adapter / ViT-CoMer variant); the output projection maps them back to ``d_model``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers.linear import Dense


def multi_scale_deformable_attention(value: jax.Array, spatial_shapes: Sequence[tuple[int, int]],
                                     sampling_locations: jax.Array, attention_weights: jax.Array) -> jax.Array:
    """value (B, S, heads, Dh) with S = sum of H_l * W_l (levels in ``spatial_shapes`` order, row-major);
    sampling_locations (B, Q, heads, L, P, 2) as (x, y) in [0, 1]; attention_weights (B, Q, heads, L, P)
    -> (B, Q, heads * Dh).

    Bilinear sampling with zero padding and ``align_corners=False`` (as ``grid_sample``): the four
    taps of every point of every level are read with one gather from the flattened value and summed
    with their bilinear x attention weights."""
    b, s, heads, dh = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    sizes = [h * w for h, w in spatial_shapes]
    if sum(sizes) != s or len(sizes) != levels:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} hold {sum(sizes)} positions on {len(sizes)} levels, "
                         f"but value has {s} positions and sampling_locations {levels} levels")
    hw = np.asarray(spatial_shapes, np.float32)  # (L, 2) = (H, W)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    px = sampling_locations[..., 0] * hw[:, 1][:, None] - 0.5  # (B, Q, heads, L, P)
    py = sampling_locations[..., 1] * hw[:, 0][:, None] - 0.5
    x0, y0 = jnp.floor(px), jnp.floor(py)
    fx, fy = px - x0, py - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    width = jnp.asarray(hw[:, 1].astype(np.int32))[:, None]
    height = jnp.asarray(hw[:, 0].astype(np.int32))[:, None]
    idx, wts = [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            idx.append(jnp.asarray(starts)[:, None] + jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1))
            wts.append(jnp.where(inside, wx * wy, 0.0) * attention_weights)
    idx = jnp.stack(idx, -1).transpose(0, 2, 1, 3, 4, 5).reshape(b * heads, -1)  # (B*heads, Q*L*P*4)
    wts = jnp.stack(wts, -1).transpose(0, 2, 1, 3, 4, 5).reshape(b * heads, q, -1)
    flat = value.transpose(0, 2, 1, 3).reshape(b * heads, s, dh)
    taps = jnp.take_along_axis(flat, idx[..., None], axis=1).reshape(b * heads, q, -1, dh)
    out = jnp.einsum("nqkd,nqk->nqd", taps, wts.astype(taps.dtype))
    return out.reshape(b, heads, q, dh).transpose(0, 2, 1, 3).reshape(b, q, heads * dh)


def _offset_bias_init(n_heads: int, n_levels: int, n_points: int):
    """Deformable DETR's initial offsets: head h points in direction 2*pi*h/heads, point p at distance p+1."""

    def init(key, shape, dtype=jnp.float32):
        thetas = np.arange(n_heads, dtype=np.float32) * (2.0 * math.pi / n_heads)
        grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
        grid = grid / np.abs(grid).max(-1, keepdims=True)
        grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))
        grid *= np.arange(1, n_points + 1, dtype=np.float32)[None, None, :, None]
        return jnp.asarray(grid.reshape(shape), dtype)

    return init


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention over ``n_levels`` flattened maps.

    ``__call__(query (B, Q, D), reference_points (B, Q, L, 2|4), value (B, S, D), spatial_shapes,
    padding_mask=None)``: reference points are (x, y) in [0, 1] per level (or boxes (x, y, w, h),
    offsets then scale with the box); ``padding_mask`` (B, S) True zeroes a position's value.
    Returns (B, Q, D)."""

    d_model: int = 256
    n_levels: int = 4
    n_heads: int = 8
    n_points: int = 4
    ratio: float = 1.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query: jax.Array, reference_points: jax.Array, value: jax.Array,
                 spatial_shapes: Sequence[tuple[int, int]], padding_mask: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        value_dim = int(self.d_model * self.ratio)
        if value_dim % self.n_heads:
            raise ValueError(f"value channels int(d_model * ratio) = {value_dim} are not divisible by "
                             f"n_heads={self.n_heads}")
        b, q, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        if len(spatial_shapes) != levels:
            raise ValueError(f"MSDeformAttn has n_levels={levels} but got {len(spatial_shapes)} spatial shapes")
        xavier = nn.initializers.xavier_uniform()
        v = Dense(value_dim, axes=("embed", "mlp"), kernel_init=xavier, name="value_proj", **kw)(value)
        if padding_mask is not None:
            v = jnp.where(padding_mask[..., None], 0.0, v)
        v = v.reshape(b, v.shape[1], heads, value_dim // heads)
        offsets = Dense(heads * levels * points * 2, axes=("embed", None), kernel_init=nn.initializers.zeros_init(),
                        bias_init=_offset_bias_init(heads, levels, points), name="sampling_offsets", **kw)(query)
        offsets = offsets.reshape(b, q, heads, levels, points, 2)
        weights = Dense(heads * levels * points, axes=("embed", None), kernel_init=nn.initializers.zeros_init(),
                        name="attention_weights", **kw)(query)
        weights = jax.nn.softmax(weights.reshape(b, q, heads, levels * points).astype(jnp.float32), -1)
        weights = weights.reshape(b, q, heads, levels, points)
        ref = reference_points[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:
            normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], offsets.dtype)
            locations = ref + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), got {reference_points.shape}")
        out = multi_scale_deformable_attention(v, spatial_shapes, locations, weights.astype(v.dtype))
        return Dense(self.d_model, axes=("mlp", "embed"), kernel_init=xavier, name="output_proj", **kw)(out)


def reference_points(spatial_shapes: Sequence[tuple[int, int]], batch: int = 1) -> jax.Array:
    """Pixel centres of every level, normalised to [0, 1], (x, y), repeated for every level:
    (batch, S, L, 2) (the deformable encoder's reference points, all positions valid)."""
    pts = []
    for h, w in spatial_shapes:
        ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        pts.append(np.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    ref = np.concatenate(pts, 0).astype(np.float32)
    return jnp.broadcast_to(jnp.asarray(ref)[None, :, None, :], (batch, ref.shape[0], len(spatial_shapes), 2))
