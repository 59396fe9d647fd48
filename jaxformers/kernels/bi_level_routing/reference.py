"""Bi-level routing attention (BiFormer, arXiv 2303.08810) in plain ``jnp``: the ground truth.

This is the official algorithm (``rayleizhu/BiFormer`` ``ops/torch/bra.py``) written with a gather
and dense attention, readable first. It is the test oracle for the Pallas kernels and the
``implementation="xla"`` path of :func:`jaxformers.kernels.bi_level_routing_attention`.

Notation (paper symbol in brackets): the (H, W) map is cut into ``regions_per_side`` [S] squared
regions of ``h x w = (H/S) x (W/S)`` tokens each. Regions are numbered row-major, ``j * S + i`` for
the region in block-row ``j`` and block-column ``i``, and tokens inside a region row-major too (the
official ``"n (j h) (i w) c -> n (j i) (h w) c"``).

1. Region level: the mean of q and of k over each region's tokens (full qk channels, no gradient:
   the official ``diff_routing=False``), affinity ``(q_mean * scale) @ k_mean.T`` (R x R, R = S^2),
   then the ``topk`` regions with the largest affinity per query region, shared by all heads. The
   softmax routing weights of the official code are computed there but never used
   (``mul_weight='none'``), so they are not computed here.
2. Token level: every query token of region r attends, with an ordinary multi-head softmax, to all
   ``topk * h * w`` tokens of the regions routed to r.

Ties in the affinity are broken towards the lower region index (``jax.lax.top_k``); ``torch.topk``
leaves ties unspecified. With real-valued features ties do not happen in practice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "to_regions",
    "from_regions",
    "route_regions",
    "bi_level_routing_attention_reference",
    "region_attention_reference",
]


def to_regions(x: jax.Array, regions_per_side: int) -> jax.Array:
    """(B, H, W, C) -> (B, S*S, (H/S)*(W/S), C): region-major tokens, regions and tokens row-major."""
    b, height, width, c = x.shape
    s = regions_per_side
    h, w = height // s, width // s
    x = x.reshape(b, s, h, s, w, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, s * s, h * w, c)


def from_regions(x: jax.Array, regions_per_side: int, height: int, width: int) -> jax.Array:
    """Inverse of :func:`to_regions`: (B, S*S, (H/S)*(W/S), C) -> (B, H, W, C)."""
    b, _, _, c = x.shape
    s = regions_per_side
    h, w = height // s, width // s
    x = x.reshape(b, s, s, h, w, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def route_regions(
    q: jax.Array,
    k: jax.Array,
    regions_per_side: int,
    topk: int,
    scale: float = 1.0,
) -> jax.Array:
    """Region-level routing: (B, S*S, topk) int32 indices of the regions each query region attends to.

    ``q`` and ``k`` are (B, H, W, C_qk) maps. The affinity is ``(mean_q * scale) @ mean_k.T`` over
    the full qk channels (heads share the routing); ``scale`` (positive) only matters for exact
    parity of rounding with the official code. No gradient flows through the routing. For
    ``topk == S*S`` (or -1) every region is selected and the indices are ``0 .. S*S-1`` in order.
    Indices of one query region are sorted by decreasing affinity.
    """
    b = q.shape[0]
    num_regions = regions_per_side * regions_per_side
    if topk == -1 or topk == num_regions:
        return jnp.broadcast_to(jnp.arange(num_regions, dtype=jnp.int32), (b, num_regions, num_regions))
    q_mean = to_regions(jax.lax.stop_gradient(q), regions_per_side).astype(jnp.float32).mean(axis=2)
    k_mean = to_regions(jax.lax.stop_gradient(k), regions_per_side).astype(jnp.float32).mean(axis=2)
    affinity = jnp.einsum("brc,bsc->brs", q_mean * scale, k_mean, precision=jax.lax.Precision.HIGHEST)
    _, index = jax.lax.top_k(affinity, topk)
    return index.astype(jnp.int32)


def region_attention_reference(
    q_regions: jax.Array,
    k_regions: jax.Array,
    v_regions: jax.Array,
    index: jax.Array | None,
    *,
    num_heads: int,
    scale: float,
) -> jax.Array:
    """Token-level attention of region-major q/k/v given the routing ``index`` (B, R, topk).

    q/k: (B, R, T, C_qk), v: (B, R, T, C_v) -> (B, R, T, C_v). Gathers the ``topk`` selected
    regions' keys and values (the memory-hungry step the Pallas kernel avoids) and runs dense
    attention with the softmax in float32. ``index=None`` means full attention (all regions).
    """
    b, r, t, c_qk = q_regions.shape
    c_v = v_regions.shape[-1]
    d_qk, d_v = c_qk // num_heads, c_v // num_heads
    qh = q_regions.reshape(b, r, t, num_heads, d_qk)
    if index is None:
        # Full attention: every region sees all tokens, so no gather and no per-region copies.
        kh = k_regions.reshape(b, r * t, num_heads, d_qk)
        vh = v_regions.reshape(b, r * t, num_heads, d_v)
        kv_subscripts = "bkhd"
    else:
        topk = index.shape[-1]
        gather = jax.vmap(lambda x, i: x[i])  # per image: (R, T, C)[(R, topk)] -> (R, topk, T, C)
        kh = gather(k_regions, index).reshape(b, r, topk * t, num_heads, d_qk)
        vh = gather(v_regions, index).reshape(b, r, topk * t, num_heads, d_v)
        kv_subscripts = "brkhd"
    logits = jnp.einsum(f"brqhd,{kv_subscripts}->brhqk", qh, kh, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(f"brhqk,{kv_subscripts}->brqhd", weights.astype(v_regions.dtype), vh,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, r, t, c_v).astype(v_regions.dtype)


def bi_level_routing_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    num_heads: int,
    regions_per_side: int,
    topk: int,
    scale: float,
) -> jax.Array:
    """Naive BRA on (B, H, W, C) maps: route, gather the top-k regions' K/V, dense attention.

    ``topk`` is already resolved (1..S*S). Returns (B, H, W, C_v) in ``v.dtype``.
    """
    _, height, width, _ = q.shape
    s = regions_per_side
    index = None if topk == s * s else route_regions(q, k, s, topk, scale)
    out = region_attention_reference(
        to_regions(q, s), to_regions(k, s), to_regions(v, s), index, num_heads=num_heads, scale=scale
    )
    return from_regions(out, s, height, width)
