"""Bit packing and integer XNOR + popcount products: the packed 1-bit inference path.

A ±1 code is stored as one bit (1 = +1, 0 = −1), 32 to a ``uint32`` word along the contracted axis,
padded with 0 bits up to a multiple of 32. For two ±1 vectors of length n packed alike,

    Σᵢ aᵢ bᵢ = n − 2·popcount(a XOR b)

(the padding bits are 0 in both, so their XOR is 0 and only the true n enters). A {0, 1} vector p
(binary attention probabilities) against ±1 codes v gives Σᵢ pᵢ vᵢ = 2·popcount(p AND v) − popcount(p).
All sums are exact int32; ``lax.population_count`` is the popcount. These are the reference
(XLA) kernels: plain ``jnp``, fused by XLA into xor-popcount-reduce loops.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

WORD = 32


def num_words(n: int) -> int:
    """uint32 words that hold n bits."""
    return -(-n // WORD)


def pack_bits(codes: jax.Array, axis: int = -1) -> jax.Array:
    """Bits of ``codes > 0`` along ``axis`` (±1 → 1/0, {0, 1} → 0/1), 32 to a uint32 word (bit i of
    word j = element 32·j + i), zero-padded: shape (..., ceil(n/32)) with ``axis`` moved last."""
    bits = (jnp.moveaxis(codes, axis, -1) > 0).astype(jnp.uint32)
    n = bits.shape[-1]
    pad = num_words(n) * WORD - n
    if pad:
        bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
    bits = bits.reshape(*bits.shape[:-1], -1, WORD)
    return jnp.sum(bits << jnp.arange(WORD, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def unpack_bits(bits: jax.Array, n: int, dtype=jnp.float32, signed: bool = True) -> jax.Array:
    """Inverse of ``pack_bits`` along the last axis: (..., words) → (..., n) codes, ±1 (``signed``)
    or {0, 1}."""
    b = (bits[..., None] >> jnp.arange(WORD, dtype=jnp.uint32)) & jnp.uint32(1)
    b = b.reshape(*bits.shape[:-1], -1)[..., :n]
    return (2 * b.astype(jnp.int32) - 1).astype(dtype) if signed else b.astype(dtype)


def popcount(x: jax.Array) -> jax.Array:
    return lax.population_count(x).astype(jnp.int32)


def xnor_matmul(x_bits: jax.Array, w_bits: jax.Array, n: int) -> jax.Array:
    """Σᵢ xᵢ wᵢ for ±1 codes: ``x_bits`` (..., W) against every row of ``w_bits`` (O, W) → int32 (..., O)."""
    return n - 2 * jnp.sum(popcount(x_bits[..., None, :] ^ w_bits), axis=-1)


def xnor_scores(q_bits: jax.Array, k_bits: jax.Array, n: int) -> jax.Array:
    """Q_b K_bᵀ per head for ±1 codes packed along head_dim: (B, Lq, H, W), (B, Lk, H, W) → int32
    (B, H, Lq, Lk)."""
    agree = jnp.sum(popcount(q_bits[:, :, None] ^ k_bits[:, None]), axis=-1)  # (B, Lq, Lk, H)
    return jnp.transpose(n - 2 * agree, (0, 3, 1, 2))


def mask_matmul(p_bits: jax.Array, v_bits: jax.Array) -> jax.Array:
    """P V for P in {0, 1} packed along the keys (B, H, Lq, W) and ±1 codes V packed along the keys
    (B, H, D, W) → int32 (B, Lq, H, D): 2·popcount(p AND v) − popcount(p)."""
    hits = jnp.sum(popcount(p_bits[:, :, :, None] & v_bits[:, :, None]), axis=-1)  # (B, H, Lq, D)
    total = jnp.sum(popcount(p_bits), axis=-1)[..., None]
    return jnp.transpose(2 * hits - total, (0, 2, 1, 3))


def xnor_conv(x_bits: jax.Array, w_bits: jax.Array, channels: int, kernel_size: Sequence[int],
              strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
    """A 2-D convolution of ±1 codes with zero padding, as XNOR + popcount: ``x_bits`` (B, H, W, Cw)
    packed along the input channels, ``w_bits`` (O, kh·kw, Cw), ``channels`` the true input channel
    count. Taps that fall into the padding contribute 0 (a padded zero times ±1), as
    ``lax.conv_general_dilated`` on the codes does. Returns int32 (B, H', W', O)."""
    kh, kw = kernel_size
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    b, h, w, cw = x_bits.shape
    xp = jnp.pad(x_bits, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    valid = jnp.pad(jnp.ones((h, w), jnp.int32), ((pt, pb), (pl, pr)))
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    taps, masks = [], []
    for i in range(kh):
        for j in range(kw):
            window = (slice(i, i + (ho - 1) * sh + 1, sh), slice(j, j + (wo - 1) * sw + 1, sw))
            taps.append(xp[(slice(None),) + window])
            masks.append(valid[window])
    patches = jnp.stack(taps, axis=3)  # (B, H', W', T, Cw)
    valid = jnp.stack(masks, axis=-1)  # (H', W', T)
    agree = jnp.sum(popcount(patches[:, :, :, None] ^ w_bits[None, None, None]), axis=-1)  # (B, H', W', O, T)
    return jnp.sum((channels - 2 * agree) * valid[None, :, :, None, :], axis=-1)


def nbytes(tree) -> int:
    """Bytes of every array in a pytree (packed words at 4 bytes each, floats at their width)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
