"""Bipartite (Hungarian) matching of predictions to targets.

``hungarian_match(cost, valid)`` solves one assignment per image with
``scipy.optimize.linear_sum_assignment`` on the host, called from traced code through
``jax.pure_callback`` (so it runs inside ``jit``, ``vmap`` and under a mesh; the cost is
gradient-free). Targets marked invalid (padding slots) take no part; NaN/inf costs are replaced by
the largest float so that such pairs are chosen only when nothing else is left (as transformers'
Mask2Former matcher does).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _assign_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    cost = np.asarray(cost, np.float64)
    valid = np.asarray(valid, bool)
    lead = cost.shape[:-2]
    q, s = cost.shape[-2:]
    flat_cost = cost.reshape(-1, q, s)
    flat_valid = np.broadcast_to(valid, lead + (s,)).reshape(-1, s)
    out = np.full(flat_valid.shape, -1, np.int32)
    big = np.finfo(np.float64).max / 4
    for i in range(flat_cost.shape[0]):
        cols = np.flatnonzero(flat_valid[i])
        if cols.size == 0:
            continue
        c = np.nan_to_num(flat_cost[i][:, cols], nan=big, posinf=big, neginf=big)
        rows, picked = linear_sum_assignment(c)
        out[i, cols[picked]] = rows
    return out.reshape(lead + (s,))


def hungarian_match(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """cost (..., Q, S) for query q taking target s; valid (..., S) -> (..., S) int32: the query
    matched to each valid target (-1 for invalid targets). Each query takes at most one target;
    with more valid targets than queries the extra targets stay -1."""
    if cost.shape[:-2] != valid.shape[:-1] or cost.shape[-1] != valid.shape[-1]:
        raise ValueError(f"cost (..., Q, S) {cost.shape} and valid (..., S) {valid.shape} disagree")
    cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
    out = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
    return jax.pure_callback(_assign_host, out, cost, valid, vmap_method="broadcast_all")


def matched_query_targets(assign: jax.Array, num_queries: int, values: jax.Array, fill) -> jax.Array:
    """(B, Q) array holding ``values[b, s]`` at the query matched to target s, ``fill`` elsewhere."""
    b, s = assign.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
    cols = jnp.where(assign >= 0, assign, num_queries)  # unmatched -> out of bounds, dropped
    base = jnp.full((b, num_queries), fill, values.dtype)
    return base.at[rows, cols].set(values, mode="drop")
