"""Plain-jnp local + global attention: the test oracle and the ``implementation="xla"`` path.

A masked softmax in float32 with the mask from ``mask.allowed`` (the one definition). Two layouts:

- Group-structured specs (``group_size`` set, no global tokens; any window, causal or chunk rule and
  segment ids): no pair crosses a group, so the sequence is cut into groups of ``g`` positions
  (B, ⌈L/g⌉, g, H, D), the tail padded and masked, and each group attends within itself. Memory
  O(B·H·L·g); the result equals the full-mask computation (same allowed keys per query).
- Everything else builds the full (B, Lq, Lk) mask (``mask.dense_mask``): O(B·H·Lq·Lk) memory,
  fine as a reference and for short sequences; the Pallas kernel skips masked blocks.

Queries with no allowed key (padding, segment id 0) return zeros, not NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformers.kernels.local_global.mask import MaskSpec, allowed, dense_mask, segments_allowed


def _masked_attention(q, k, v, mask, scale: float):
    """softmax(q kᵀ · scale, masked) v over any leading axes: q (..., Lq, H, D), k/v (..., Lk, H, D),
    ``mask`` broadcastable to (..., H, Lq, Lk). Rows without an allowed key give zeros."""
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(row_max)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("...hqk,...khd->...qhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def is_group_structured(spec: MaskSpec) -> bool:
    """True when no allowed pair crosses a ``group_size`` boundary (global tokens would)."""
    return spec.group_size is not None and spec.global_tokens == 0


def _grouped_attention(q, k, v, spec: MaskSpec, segment_ids, kv_segment_ids, scale: float):
    """Self-attention (Lq == Lk) of a group-structured spec, one group of g positions at a time."""
    batch, length = q.shape[:2]
    size = min(spec.group_size, length)  # a single group shorter than g needs no padding
    groups = -(-length // size)
    pad = groups * size - length

    def to_groups(t):  # (B, L, ...) -> (B, T, g, ...), zero-padded at the tail
        t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        return t.reshape((batch, groups, size) + t.shape[2:])

    pos = jnp.arange(groups * size).reshape(groups, size)  # absolute positions: window/chunk rules hold
    q_pos, k_pos = pos[:, :, None], pos[:, None, :]
    mask = (allowed(spec, q_pos, k_pos) & (k_pos < length))[None]  # (1, T, g, g); padded keys never seen
    if segment_ids is not None:
        q_seg = to_groups(segment_ids)  # padding gets segment 0
        k_seg = to_groups(segment_ids if kv_segment_ids is None else kv_segment_ids)
        mask = mask & segments_allowed(q_seg[:, :, :, None], k_seg[:, :, None, :])  # (B, T, g, g)
    out = _masked_attention(to_groups(q), to_groups(k), to_groups(v), mask[:, :, None], scale)
    return out.reshape((batch, groups * size) + out.shape[3:])[:, :length]


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
    q_len, k_len = q.shape[1], k.shape[1]
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k = jnp.repeat(k, rep, axis=2)
        v = jnp.repeat(v, rep, axis=2)
    if is_group_structured(spec) and q_len == k_len:
        return _grouped_attention(q, k, v, spec, segment_ids, kv_segment_ids, scale)
    mask = dense_mask(spec, q_len, k_len, segment_ids, kv_segment_ids)[:, None]  # (B|1, 1, Lq, Lk)
    return _masked_attention(q, k, v, mask, scale)
