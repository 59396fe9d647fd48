"""Bit packing and integer XNOR + popcount products: the packed 1-bit inference path.

A weight's ±1 code is one bit (1 = +1, 0 = −1), 32 to a ``uint32`` word along the contracted axis,
zero-padded up to a multiple of 32. An input's code follows torch.sign and may be 0, so inputs are
packed at run time as two planes: sign (1 = +1) and nonzero (1 = ±1, 0 = 0 or padding). Then

    Σᵢ aᵢ wᵢ = popcount(nz) − 2·popcount((a XOR w) AND nz)

counts only the nonzero inputs (padding bits are 0 in the nonzero plane, so the true length needs
no bookkeeping; nor do a convolution's zero-padded borders). A {0, 1} vector p (binary attention
probabilities) against ternary codes v: Σᵢ pᵢ vᵢ = 2·popcount(p ∧ nz ∧ v) − popcount(p ∧ nz).
All sums are exact int32; ``lax.population_count`` is the popcount. These are the reference (XLA)
kernels: plain ``jnp``, which XLA fuses into xor-and-popcount-reduce loops.
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


def pack_ternary(codes: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """(sign plane, nonzero plane) of codes in {−1, 0, 1} along ``axis`` (see ``pack_bits``)."""
    return pack_bits(codes, axis), pack_bits(codes != 0, axis)


def popcount(x: jax.Array) -> jax.Array:
    return lax.population_count(x).astype(jnp.int32)


def xnor_matmul(x_sign: jax.Array, x_nz: jax.Array, w_bits: jax.Array) -> jax.Array:
    """Σᵢ xᵢ wᵢ for ternary inputs (sign, nonzero planes (..., W)) against every ±1 row of ``w_bits``
    (O, W) → int32 (..., O)."""
    total = jnp.sum(popcount(x_nz), axis=-1)[..., None]
    return total - 2 * jnp.sum(popcount((x_sign[..., None, :] ^ w_bits) & x_nz[..., None, :]), axis=-1)


def xnor_scores(q_sign, q_nz, k_sign, k_nz) -> jax.Array:
    """Q_b K_bᵀ per head for ternary codes packed along head_dim (B, Lq, H, W) and (B, Lk, H, W) →
    int32 (B, H, Lq, Lk)."""
    nz = q_nz[:, :, None] & k_nz[:, None]
    dots = jnp.sum(popcount(nz) - 2 * popcount((q_sign[:, :, None] ^ k_sign[:, None]) & nz), axis=-1)  # (B, Lq, Lk, H)
    return jnp.transpose(dots, (0, 3, 1, 2))


def mask_matmul(p_bits: jax.Array, v_sign: jax.Array, v_nz: jax.Array) -> jax.Array:
    """P V for P in {0, 1} packed along the keys (B, H, Lq, W) and ternary V packed along the keys
    (B, H, D, W) → int32 (B, Lq, H, D): 2·popcount(p ∧ nz ∧ v) − popcount(p ∧ nz)."""
    seen = p_bits[:, :, :, None] & v_nz[:, :, None]  # (B, H, Lq, D, W)
    dots = jnp.sum(2 * popcount(seen & v_sign[:, :, None]) - popcount(seen), axis=-1)
    return jnp.transpose(dots, (0, 2, 1, 3))


def xnor_conv(x_sign: jax.Array, x_nz: jax.Array, w_bits: jax.Array, kernel_size: Sequence[int],
              strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
    """A 2-D convolution of ternary input codes (sign and nonzero planes (B, H, W, Cw), packed along
    the input channels) with ±1 kernel bits (O, kh·kw, Cw), zero padding: padded pixels have a zero
    nonzero plane, so they contribute 0 as in ``lax.conv_general_dilated`` on the codes. Returns int32
    (B, H', W', O)."""
    kh, kw = kernel_size
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    pad = ((0, 0), (pt, pb), (pl, pr), (0, 0))
    xs, xn = jnp.pad(x_sign, pad), jnp.pad(x_nz, pad)
    ho, wo = (xs.shape[1] - kh) // sh + 1, (xs.shape[2] - kw) // sw + 1

    def patches(x):
        return jnp.stack([x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw] for i in range(kh)
                          for j in range(kw)], axis=3)[:, :, :, None]  # (B, H', W', 1, T, Cw)

    ps, pn = patches(xs), patches(xn)
    return jnp.sum(popcount(pn) - 2 * popcount((ps ^ w_bits) & pn), axis=(-2, -1))


def nbytes(tree) -> int:
    """Bytes of every array in a pytree (packed words at 4 bytes each, floats at their width)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
