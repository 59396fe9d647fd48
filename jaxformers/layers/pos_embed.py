"""Position embeddings: learned tables (with resampling), 1D/2D sin-cos, RoPE and LePE."""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers.linear import Conv


def sincos_1d(length: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """(length, dim) Transformer sinusoids: [sin(p·ω), cos(p·ω)] with ω_i = temperature^(-i/(dim/2))."""
    if dim % 2:
        raise ValueError(f"sincos_1d needs an even dim, got {dim}")
    omega = 1.0 / temperature ** (np.arange(dim // 2, dtype=np.float64) / (dim // 2))
    angles = np.arange(length, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """(height*width, dim) 2D sin-cos table (MoCo v3 / big_vision): half the channels encode the
    row, half the column."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    rows = sincos_1d(height, dim // 2, temperature)
    cols = sincos_1d(width, dim // 2, temperature)
    grid = np.concatenate([np.repeat(rows, width, axis=0), np.tile(cols, (height, 1))], axis=1)
    return grid.astype(np.float32)


def resample_abs_pos_embed(
    pos_embed: jax.Array | np.ndarray,
    new_size: Sequence[int],
    old_size: Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
) -> jax.Array:
    """Resample a (1, prefix + h*w, D) learned table to a new (h', w') grid, prefix tokens kept.

    ``old_size`` defaults to the square grid that fits. Antialiased bicubic ``jax.image.resize``,
    which equals timm's ``resample_abs_pos_embed`` (torch bicubic, ``antialias=True``) to ~1e-6,
    growing or shrinking.
    """
    pos_embed = jnp.asarray(pos_embed)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid.shape[1]
    if old_size is None:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"cannot infer the grid of a {n}-token position table; pass old_size")
        old_size = (side, side)
    (oh, ow), (nh, nw) = tuple(old_size), tuple(new_size)
    if oh * ow != n:
        raise ValueError(f"old_size {old_size} does not match the table's {n} grid tokens")
    if (oh, ow) == (nh, nw):
        return pos_embed
    d = grid.shape[-1]
    grid = grid.reshape(oh, ow, d).astype(jnp.float32)
    grid = jax.image.resize(grid, (nh, nw, d), method="bicubic", antialias=True)
    grid = grid.reshape(1, nh * nw, d).astype(pos_embed.dtype)
    return jnp.concatenate([prefix, grid], axis=1)


def rope_frequencies(positions: jax.Array, dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """cos and sin of RoPE angles for integer ``positions`` (..., L) -> two (..., L, dim/2) arrays."""
    inv = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array | None = None, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half convention, on x (B, L, H, D).

    ``positions`` (B, L) or (L,) default to 0..L-1 (packed batches pass per-segment positions)."""
    b, length, _, d = x.shape
    if d % 2:
        raise ValueError(f"apply_rope needs an even head_dim, got {d}")
    if positions is None:
        positions = jnp.arange(length)
    cos, sin = rope_frequencies(jnp.broadcast_to(positions, (b, length)), d, theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class LePE(nn.Module):
    """Locally-enhanced positional encoding (CSWin, BiFormer): a depthwise conv over V in NHWC,
    whose output is added to the attention output."""

    kernel_size: int = 3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, v: jax.Array) -> jax.Array:
        c = v.shape[-1]
        k = self.kernel_size
        return Conv(c, (k, k), padding=k // 2, feature_group_count=c, axes=(None, "embed"),
                    dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(v)


class PositionTerms(NamedTuple):
    """What a *position encoder* module (a model's ``position_encoder`` field, e.g.
    ``jaxformers.models.seqpe.SeqPE``) contributes, in place of a learned position table: ``inputs``
    (Lq, D) added to the token embeddings; ``biases``, one (H, Lq, Lk) attention-logit bias per
    layer; ``qk_fns``, one ``(q, k) -> (q, k)`` transform per layer (applied to the projected
    queries and keys). Any of them may be None. A position encoder is called as
    ``encoder(q_positions (Lq, dims), k_positions (Lk, dims), num_layers=, num_heads=, head_dim=,
    width=, num_prefix=, train=)``; ``num_prefix`` leading tokens (class tokens) have no position."""

    inputs: Any = None
    biases: Any = None
    qk_fns: Any = None
