"""Plain-jnp local + global attention: the test oracle and the ``implementation="xla"`` path.

A masked softmax in float32 with the mask from ``mask.allowed`` (the one definition). Three layouts:

- Group-structured specs (``group_size`` set, no global tokens; any window, causal or chunk rule and
  segment ids): no pair crosses a group, so the sequence is cut into groups of ``g`` positions
  (B, ⌈L/g⌉, g, H, D), the tail padded and masked, and each group attends within itself. Memory
  O(B·H·L·g); the result equals the full-mask computation (same allowed keys per query).
- Banded specs (a finite window on both sides, self-attention, longer than three window blocks):
  the sequence is cut into blocks of c = max(left, right) positions; a query block attends to its
  own and its two neighbouring key blocks (which hold every key its window reaches) plus the first
  ``global_tokens`` keys as extra columns (taken out of the band, so each key counts once), and the
  global query rows attend densely (G x L). Memory O(B·H·L·(3c + G)): linear in the length and the
  window (Longformer's sliding chunks), so long-document training runs on this path too.
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


def is_banded(spec: MaskSpec, q_len: int, k_len: int) -> bool:
    """True when the banded layout applies and is smaller than the full mask: a finite window on
    both sides, self-attention lengths, and three window blocks plus the global columns < L."""
    if spec.window is None or None in spec.window or q_len != k_len:
        return False
    block = max(spec.window[0], spec.window[1], 1)
    return 3 * block + min(spec.global_tokens, k_len) < k_len


def _banded_attention(q, k, v, spec: MaskSpec, segment_ids, scale: float):
    """Self-attention of a spec with a finite window, one query block of c = max(left, right)
    positions against its three neighbouring key blocks plus the global key columns."""
    batch, length = q.shape[:2]
    block = max(spec.window[0], spec.window[1], 1)
    blocks = -(-length // block)
    pad = blocks * block - length
    n_global = min(spec.global_tokens, length)

    def pad_len(t, before, after):
        return jnp.pad(t, [(0, 0), (before, after)] + [(0, 0)] * (t.ndim - 2))

    q_pos = jnp.arange(blocks)[:, None] * block + jnp.arange(block)[None, :]  # (n, c)
    window = q_pos[:, :1] + jnp.arange(3 * block)[None, :]  # (n, 3c): indices into the keys padded by c
    k_pos = window - block  # absolute key positions of the band
    g_pos = jnp.arange(n_global)
    band = allowed(spec, q_pos[:, :, None], k_pos[:, None, :]) & ((k_pos >= n_global) & (k_pos < length))[:, None, :]
    cols = allowed(spec, q_pos[:, :, None], g_pos[None, None, :])  # (n, c, G): the global keys, once
    mask = jnp.concatenate([cols, band], axis=-1)[None]  # (1, n, c, G + 3c)
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        q_seg = pad_len(seg, 0, pad).reshape(batch, blocks, block)
        k_seg = jnp.concatenate([jnp.broadcast_to(seg[:, None, :n_global], (batch, blocks, n_global)),
                                 pad_len(seg, block, pad + block)[:, window]], axis=-1)
        mask = mask & segments_allowed(q_seg[:, :, :, None], k_seg[:, :, None, :])

    def keys(t):  # (B, L, H, D) -> (B, n, G + 3c, H, D)
        glob = jnp.broadcast_to(t[:, None, :n_global], (batch, blocks) + t[:, :n_global].shape[1:])
        return jnp.concatenate([glob, pad_len(t, block, pad + block)[:, window]], axis=2)

    qb = pad_len(q, 0, pad).reshape((batch, blocks, block) + q.shape[2:])
    out = _masked_attention(qb, keys(k), keys(v), mask[:, :, None], scale)
    out = out.reshape((batch, blocks * block) + out.shape[3:])[:, :length]
    if n_global and spec.global_queries:  # the global queries see every key: a dense G x L pass
        seg = None if segment_ids is None else segment_ids
        rows_mask = dense_mask(spec, n_global, length, None if seg is None else seg[:, :n_global], seg)[:, None]
        rows = _masked_attention(q[:, :n_global], k, v, rows_mask, scale)
        out = jnp.concatenate([rows, out[:, n_global:]], axis=1)
    return out


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
    if kv_segment_ids is None and is_banded(spec, q_len, k_len):
        return _banded_attention(q, k, v, spec, segment_ids, scale)
    mask = dense_mask(spec, q_len, k_len, segment_ids, kv_segment_ids)[:, None]  # (B|1, 1, Lq, Lk)
    return _masked_attention(q, k, v, mask, scale)
