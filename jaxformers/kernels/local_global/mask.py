"""Which query/key pairs may attend: the one definition shared by the reference and the kernels.

A pair (query position i, key position j) of one row is allowed when all of these hold::

    structure(i, j) = (local(i, j) or i < global_tokens or j < global_tokens)
    local(i, j)     = (i - left <= j <= i + right)  [window=(left, right); None = unlimited side]
                      and (i // group_size == j // group_size)          [group_size]
    order(i, j)     = j <= i                                            [causal]
                      or j // chunk_size <= i // chunk_size             [causal + chunk_size]
    segments(i, j)  = seg[i] == seg[j] != 0                             [segment_ids; 0 = padding]
    allowed         = structure and order and segments

Global tokens lift the window and group restrictions, never causality nor segment boundaries.
Positions are row positions (packed sequences share one position axis).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _as_int(value, name: str, minimum: int, alternatives: str = "") -> int:
    """A Python int >= minimum (numpy ints accepted), else a ValueError naming the option."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} {alternatives}".rstrip() + f"; got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static (shape-independent) part of a local + global attention mask."""

    window: tuple[int | None, int | None] | None = None
    global_tokens: int = 0
    group_size: int | None = None
    causal: bool = False
    chunk_size: int | None = None
    # Internal: False makes the first ``global_tokens`` queries follow the local rules (their keys
    # stay global). The Pallas path computes those dense rows separately, so that no kernel program
    # has to walk the whole sequence alone.
    global_queries: bool = True

    @property
    def is_dense(self) -> bool:
        """True when the spec restricts nothing (plain attention, up to segments/padding)."""
        return not self.causal and self.group_size is None and (
            self.window is None or self.window == (None, None))

    def __post_init__(self):
        w = self.window
        if w is not None:
            if not isinstance(w, (tuple, list)) or len(w) != 2:
                raise ValueError(f"window must be None or a pair (left, right) of ints >= 0 or None; got {w!r}")
            sides = tuple(None if n is None else _as_int(n, f"window {side} extent", 0, "or None (unlimited)")
                          for side, n in zip(("left", "right"), w))
            object.__setattr__(self, "window", sides)
        object.__setattr__(self, "global_tokens", _as_int(self.global_tokens, "global_tokens", 0))
        for name in ("group_size", "chunk_size"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _as_int(getattr(self, name), name, 1, "or None"))
        if self.chunk_size is not None and not self.causal:
            raise ValueError("chunk_size selects chunk-causal attention and needs causal=True; "
                             f"got chunk_size={self.chunk_size}, causal=False")


def _div(pos, n: int):
    """pos // n for positions >= 0; truncating ``lax.div`` on jax values (floor division lowers
    through ``sign``, which some Pallas lowerings handle poorly), ``//`` on numpy arrays."""
    return pos // n if isinstance(pos, (np.ndarray, np.integer, int)) else lax.div(pos, jnp.asarray(n, pos.dtype))


def allowed(spec: MaskSpec, q_pos, k_pos):
    """Boolean structure-and-order mask for broadcastable int position arrays (no segments).

    Uses only operators, so it works on numpy arrays, jnp arrays and inside Pallas kernels alike.
    """
    local = (q_pos >= 0) & (k_pos >= 0)  # all True, broadcast to the pair shape
    if spec.window is not None:
        left, right = spec.window
        if left is not None:
            local = local & (k_pos >= q_pos - left)
        if right is not None:
            local = local & (k_pos <= q_pos + right)
    if spec.group_size is not None:
        local = local & (_div(q_pos, spec.group_size) == _div(k_pos, spec.group_size))
    if spec.global_tokens:
        local = local | (k_pos < spec.global_tokens)
        if spec.global_queries:
            local = local | (q_pos < spec.global_tokens)
    if spec.causal:
        if spec.chunk_size is None:
            local = local & (k_pos <= q_pos)
        else:
            local = local & (_div(k_pos, spec.chunk_size) <= _div(q_pos, spec.chunk_size))
    return local


def segments_allowed(q_seg: jax.Array, k_seg: jax.Array) -> jax.Array:
    """Same non-zero segment (0 marks padding, which attends to nothing and is never attended)."""
    return (q_seg == k_seg) & (k_seg != 0)


def dense_mask(spec: MaskSpec, q_len: int, k_len: int, segment_ids: jax.Array | None = None,
               kv_segment_ids: jax.Array | None = None) -> jax.Array:
    """The full (B or 1, Lq, Lk) boolean mask; readable, O(L²) memory: for the reference and tests.

    ``segment_ids`` (B, Lq) label the queries, ``kv_segment_ids`` (B, Lk; default: the same) the keys.
    """
    q_pos = jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(k_len)[None, :]
    mask = allowed(spec, q_pos, k_pos)[None]
    if segment_ids is not None:
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & segments_allowed(segment_ids[:, :, None], kv_segment_ids[:, None, :])
    return mask
