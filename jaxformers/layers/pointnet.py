"""PointNet++ set abstraction in ``jnp``: farthest point sampling, ball-query grouping, shared MLP, max-pool.

Qi, Yi, Su, Guibas, "PointNet++: Deep Hierarchical Feature Learning on Point Sets in a Metric Space"
(NeurIPS 2017, arXiv 1706.02413). The semantics follow the CUDA ops and ``PointnetSAModuleVotes`` that
3DETR (facebookresearch/3detr, ``third_party/pointnet2``) and Vote2Cap-DETR (ch3cook-fdu/Vote2Cap-DETR)
ship, in fixed shapes so everything jits:

- ``farthest_point_sample(xyz, n)``: starts at point 0, then repeatedly takes the point whose squared
  distance to the chosen set is largest (the first such index on ties). The CUDA kernel also skips
  points with ``|p|^2 <= 1e-3`` (points at the origin are never chosen after the start); we do not
  copy that quirk: every point can be chosen.
- ``ball_query(xyz, centers, radius, k)``: for each centre, the first ``k`` points (in index order) with
  squared distance ``< radius^2``; fewer than ``k`` found: the slots repeat the first one found (as the
  CUDA kernel fills them); none found: index 0 (the kernel's zero-initialised output).
- ``SetAbstraction``: grouped xyz relative to the centre (divided by the radius with
  ``normalize_xyz``, as 3DETR's pre-encoder and vote-query layers use), concatenated with the grouped
  features, a shared MLP of 1x1 layers (Dense + BatchNorm + ReLU per layer, pointnet2's ``SharedMLP``
  with ``bn=True``), max-pooled over the ``k`` neighbours.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers.linear import Dense
from jaxformers.layers.norm import BatchNorm


def _check_xyz(xyz: jax.Array, what: str = "xyz") -> None:
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"{what} must be (batch, points, 3); got shape {tuple(xyz.shape)}")


def farthest_point_sample(xyz: jax.Array, num_samples: int) -> jax.Array:
    """(B, N, 3) -> (B, num_samples) int32 indices of a farthest point sampling that starts at point 0."""
    _check_xyz(xyz)
    n = xyz.shape[1]
    if not 0 < num_samples <= n:
        raise ValueError(f"farthest point sampling of {num_samples} points needs a cloud of at least that many "
                         f"points; got {n}")
    xyz = xyz.astype(jnp.float32)

    def body(i, carry):
        inds, dist, last = carry
        p = jnp.take_along_axis(xyz, last[:, None, None], axis=1)  # (B, 1, 3)
        dist = jnp.minimum(dist, jnp.sum((xyz - p) ** 2, -1))
        nxt = jnp.argmax(dist, axis=1).astype(jnp.int32)
        return inds.at[:, i].set(nxt), dist, nxt

    b = xyz.shape[0]
    init = (jnp.zeros((b, num_samples), jnp.int32), jnp.full((b, n), 1e10, jnp.float32), jnp.zeros((b,), jnp.int32))
    inds, _, _ = jax.lax.fori_loop(1, num_samples, body, init)
    return inds


def gather_points(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (B, N, C), idx (B, ...) int -> (B, ..., C)."""
    b = x.shape[0]
    flat = idx.reshape(b, -1)
    out = jnp.take_along_axis(x, flat[..., None], axis=1)
    return out.reshape(idx.shape + x.shape[-1:])


def ball_query(xyz: jax.Array, centers: jax.Array, radius: float, num_neighbors: int) -> jax.Array:
    """xyz (B, N, 3), centers (B, M, 3) -> (B, M, k) int32: the first k points within ``radius`` of each
    centre in index order, padded with the first one found (0 where none is)."""
    _check_xyz(xyz)
    _check_xyz(centers, "centers")
    n = xyz.shape[1]
    if num_neighbors > n:
        raise ValueError(f"ball query of {num_neighbors} neighbours needs at least that many points; got {n}")
    d2 = jnp.sum((centers[:, :, None, :].astype(jnp.float32) - xyz[:, None, :, :].astype(jnp.float32)) ** 2, -1)
    key = jnp.where(d2 < radius * radius, jnp.arange(n, dtype=jnp.int32), n)  # (B, M, N)
    neg, _ = jax.lax.top_k(-key, num_neighbors)  # the k smallest keys, ascending
    idx = -neg
    first = idx[..., :1]
    idx = jnp.where(idx == n, jnp.where(first == n, 0, first), idx)
    return idx.astype(jnp.int32)


class SetAbstraction(nn.Module):
    """FPS (or given indices) -> ball query -> [relative xyz, features] -> shared MLP -> max-pool.

    ``__call__(xyz (B, N, 3), features (B, N, C) or None, inds=None, train=False)`` returns
    ``(new_xyz (B, npoint, 3), new_features (B, npoint, mlp[-1]), inds (B, npoint))``; ``inds`` given
    (e.g. sampled on another cloud, as Vote2Cap-DETR's vote query does) replaces the sampling."""

    npoint: int
    radius: float
    nsample: int
    mlp: Sequence[int]
    normalize_xyz: bool = True
    use_xyz: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xyz: jax.Array, features: jax.Array | None = None, inds: jax.Array | None = None,
                 train: bool = False):
        _check_xyz(xyz)
        if features is not None and features.shape[:2] != xyz.shape[:2]:
            raise ValueError(f"features (batch, points, C) {tuple(features.shape)} do not match xyz "
                             f"{tuple(xyz.shape)}")
        if xyz.shape[1] < max(self.npoint, self.nsample):
            raise ValueError(f"set abstraction samples {self.npoint} centres with {self.nsample} neighbours each "
                             f"and needs a cloud of at least {max(self.npoint, self.nsample)} points; got "
                             f"{xyz.shape[1]}")
        if inds is None:
            inds = farthest_point_sample(xyz, self.npoint)
        new_xyz = gather_points(xyz, inds)
        idx = ball_query(xyz, new_xyz, self.radius, self.nsample)
        rel = gather_points(xyz, idx) - new_xyz[:, :, None, :]
        if self.normalize_xyz:
            rel = rel / self.radius
        parts = ([rel] if self.use_xyz else []) + ([gather_points(features, idx)] if features is not None else [])
        if not parts:
            raise ValueError("set abstraction without xyz needs features")
        h = jnp.concatenate([p.astype(rel.dtype) for p in parts], -1)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i, width in enumerate(self.mlp):
            h = Dense(width, axes=(None, "mlp"), use_bias=False, name=f"conv{i}", **kw)(h)
            h = nn.relu(BatchNorm(train=train, axis_name="mlp", name=f"bn{i}", **kw)(h))
        return new_xyz, jnp.max(h, axis=2), inds
