"""Plain-jnp local + global attention: the test oracle and the ``implementation="xla"`` path.

Builds the full boolean mask (``mask.dense_mask``) and runs a masked softmax in float32. Memory is
O(B·H·Lq·Lk): fine as a reference and for short sequences; the Pallas kernel skips masked blocks.
Queries with no allowed key (padding, segment id 0) return zeros, not NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformers.kernels.local_global.mask import MaskSpec, dense_mask


def local_global_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: MaskSpec,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float,
) -> jax.Array:
    """softmax(q kᵀ · scale, masked by ``spec`` and segments) v; q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D).

    ``segment_ids`` (B, Lq) label the queries and ``kv_segment_ids`` (B, Lk, default: the same)
    the keys; query i and key j sit at positions i and j. Hq must be a multiple of Hkv
    (grouped-query attention shares each kv head among Hq/Hkv heads).
    """
    batch, q_len, q_heads, _ = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    rep = q_heads // kv_heads
    if rep > 1:
        k = jnp.repeat(k, rep, axis=2)
        v = jnp.repeat(v, rep, axis=2)
    mask = dense_mask(spec, q_len, k_len, segment_ids, kv_segment_ids)[:, None]  # (B|1, 1, Lq, Lk)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(row_max)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
