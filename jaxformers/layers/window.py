"""Window attention: Swin's (shifted) local windows with a learned relative position bias.

Reusable pieces (Swin, and the models built on its blocks, e.g. DRCT or BiViT):

- ``window_partition`` / ``window_reverse``: (B, H, W, ...) maps <-> (B * windows, wh, ww, ...).
- ``relative_position_index(window)``: the (N, N) index into a ((2wh-1)(2ww-1), heads) bias table.
- ``shifted_window_mask(height, width, window, shift)``: the (windows, N, N) additive mask (0 / -100)
  that keeps tokens of the cyclically wrapped regions apart after a shift (Swin's SW-MSA).
- ``WindowAttention``: multi-head self-attention inside windows of a NHWC map, with a relative
  position bias and an optional cyclic shift; attention goes through the shared
  ``MultiHeadAttention`` (the bias through its ``bias=``).
- ``SwinBlock`` (LN -> (S)W-MSA -> residual, LN -> MLP -> residual) and ``PatchMerging``.

Window and shift conventions (both exist in the reference code and give different numbers when a
map is smaller than the window or not a multiple of it):

- timm's classification Swin (and the official classification code): a window larger than the
  stage's map (at the model's ``img_size``) shrinks to the map, per axis, and such an axis is not
  shifted (``effective_window``); a map that is not a multiple of the window is shifted, then
  padded.
- ``always_partition`` (the official detection/segmentation Swin, Hugging Face's ``SwinBackbone``):
  the window and shift never change; the map is zero-padded to a multiple of the window after the
  norm, then shifted (``pad_first``).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers.attention import AttentionImpl, MultiHeadAttention
from jaxformers.layers.drop import DropPath
from jaxformers.layers.linear import Dense, logical, trunc_normal
from jaxformers.layers.mlp import Mlp
from jaxformers.layers.norm import LayerNorm
from jaxformers.sharding import constrain

MAP_AXES = ("act_batch", None, None, "act_embed")


def window_partition(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """(B, H, W, *rest) -> (B * H/wh * W/ww, wh, ww, *rest): windows in row-major order."""
    b, height, width = x.shape[:3]
    rest = x.shape[3:]
    wh, ww = window
    x = x.reshape((b, height // wh, wh, width // ww, ww) + rest)
    x = jnp.moveaxis(x, 3, 2)  # (B, nH, nW, wh, ww, *rest)
    return x.reshape((-1, wh, ww) + rest)


def window_reverse(x: jax.Array, window: tuple[int, int], height: int, width: int) -> jax.Array:
    """Inverse of :func:`window_partition`."""
    wh, ww = window
    rest = x.shape[3:]
    x = x.reshape((-1, height // wh, width // ww, wh, ww) + rest)
    x = jnp.moveaxis(x, 2, 3)
    return x.reshape((-1, height, width) + rest)


@functools.lru_cache(maxsize=None)
def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """(N, N) int32, N = wh*ww: row (dy + wh - 1) * (2ww - 1) + (dx + ww - 1) of the bias table for
    the offset (dy, dx) from key to query (Swin's ``relative_position_index``)."""
    wh, ww = window
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    return ((rel[0] + wh - 1) * (2 * ww - 1) + rel[1] + ww - 1).astype(np.int32)


@functools.lru_cache(maxsize=None)
def shifted_window_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """(windows, N, N) float32 additive mask for attention in the windows of a map of (``height``,
    ``width``) (a multiple of ``window``) rolled by ``-shift``: 0 within a region, -100 between
    regions that were not neighbours before the roll (Swin's SW-MSA mask)."""

    def region(size, win, sh):  # 0: [0, size-win), 1: [size-win, size-sh), 2: [size-sh, size); one if unshifted
        i = np.arange(size)
        return (i >= size - win).astype(np.int32) + (i >= size - sh) if sh else np.zeros(size, np.int32)

    regions = (region(height, window[0], shift[0])[:, None] * 3 + region(width, window[1], shift[1])[None, :])
    wh, ww = window
    wins = regions.reshape(height // wh, wh, width // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    return np.where(wins[:, None, :] != wins[:, :, None], -100.0, 0.0).astype(np.float32)


def effective_window(resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                     always_partition: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """The window and shift a block uses on a map of ``resolution`` (see the module docstring)."""
    if always_partition:
        return tuple(window), tuple(shift)
    win = tuple(min(r, w) for r, w in zip(resolution, window))
    return win, tuple(0 if r <= w else s for r, w, s in zip(resolution, win, shift))


class WindowAttention(nn.Module):
    """W-MSA / SW-MSA on a NHWC map: attention inside ``window_size`` windows after a cyclic shift
    by ``shift_size`` (0 = no shift), plus a learned relative position bias per head. A map that is
    not a multiple of the window is zero-padded at the bottom/right: after the shift (timm) or,
    with ``pad_first``, before it (official detection Swin, Hugging Face). The window is used as
    given (see ``effective_window`` for the shrinking rule of the classification Swin).

    Parameters: ``relative_position_bias_table`` ((2wh-1)(2ww-1), heads) and
    (``mha``, a ``MultiHeadAttention``: fused ``qkv``, ``proj``)."""

    num_heads: int
    window_size: tuple[int, int] = (7, 7)
    shift_size: tuple[int, int] = (0, 0)
    pad_first: bool = False
    qkv_bias: bool = True
    attention_dropout: float = 0.0
    proj_dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    binary: Any = None  # a jaxformers.compress.binary.BinaryRecipe (BIVIT): binarized q/k/v, proj and attention

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        b, height, width, dim = x.shape
        window, shift = tuple(self.window_size), tuple(self.shift_size)
        table = self.param("relative_position_bias_table", logical(trunc_normal(0.02), (None, "heads")),
                           ((2 * window[0] - 1) * (2 * window[1] - 1), self.num_heads), self.param_dtype)
        n = window[0] * window[1]
        bias = table[relative_position_index(window).reshape(-1)].reshape(n, n, -1).transpose(2, 0, 1)
        pad_h, pad_w = (-height) % window[0], (-width) % window[1]
        shifted = any(shift)

        def roll(t, sign):
            return jnp.roll(t, (sign * shift[0], sign * shift[1]), axis=(1, 2)) if shifted else t

        def pad(t):
            return jnp.pad(t, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))) if pad_h or pad_w else t

        y = roll(pad(x), -1) if self.pad_first else pad(roll(x, -1))
        hp, wp = height + pad_h, width + pad_w
        windows = window_partition(y, window).reshape(-1, n, dim)
        bias = bias[None]  # (1, heads, N, N)
        if shifted:
            mask = jnp.asarray(shifted_window_mask(hp, wp, window, shift))  # (nW, N, N)
            nw = mask.shape[0]
            bias = (bias[None] + mask[None, :, None]).reshape(nw, self.num_heads, n, n)
            bias = jnp.broadcast_to(bias[None], (b, nw, self.num_heads, n, n)).reshape(b * nw, self.num_heads, n, n)
        out = MultiHeadAttention(self.num_heads, qkv_bias=self.qkv_bias, attention_dropout=self.attention_dropout,
                                 proj_dropout=self.proj_dropout, attention_impl=self.attention_impl, dtype=self.dtype,
                                 param_dtype=self.param_dtype, binary=self.binary, name="mha")(windows, bias=bias,
                                                                                              train=train)
        out = window_reverse(out.reshape(-1, window[0], window[1], dim), window, hp, wp)
        if self.pad_first:
            return roll(out, 1)[:, :height, :width]
        return roll(out[:, :height, :width], 1)


class SwinBlock(nn.Module):
    """x + DropPath(WindowAttention(LN(x))), then x + DropPath(MLP(LN(x))) on a NHWC map (timm's
    ``SwinTransformerBlock``; names ``norm1``, ``attn``, ``norm2``, ``mlp``). LayerNorm eps 1e-5."""

    num_heads: int
    window_size: tuple[int, int] = (7, 7)
    shift_size: tuple[int, int] = (0, 0)
    pad_first: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    attention_dropout: float = 0.0
    dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    binary: Any = None  # a jaxformers.compress.binary.BinaryRecipe for the attention and the MLP

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"Swin block width {dim} is not divisible by num_heads={self.num_heads}")
        y = LayerNorm(1e-5, name="norm1", **kw)(x)
        y = WindowAttention(self.num_heads, tuple(self.window_size), tuple(self.shift_size), self.pad_first,
                            self.qkv_bias, self.attention_dropout, self.dropout, self.attention_impl, name="attn",
                            binary=self.binary, **kw)(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = LayerNorm(1e-5, name="norm2", **kw)(x)
        y = Mlp(int(dim * self.mlp_ratio), dropout=self.dropout, name="mlp", binary=self.binary, **kw)(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        return constrain(x, MAP_AXES)


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> channels (order (0,0), (1,0), (0,1), (1,1)) -> LayerNorm(4C) -> Linear
    (no bias) to ``out_dim``; odd sizes are zero-padded (timm / Hugging Face ``PatchMerging``)."""

    out_dim: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        h2, w2 = x.shape[1] // 2, x.shape[2] // 2
        x = x.reshape(b, h2, 2, w2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h2, w2, 4 * c)
        x = LayerNorm(1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        x = Dense(self.out_dim, axes=("embed", "mlp"), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="reduction")(x)
        return constrain(x, MAP_AXES)
