"""Ranking metrics for retrieval evaluation: MRR@k, nDCG@k, recall@k (jnp, jit-friendly).

``scores`` (Q, D) rank documents per query (higher = better); ``relevance`` (Q, D) holds graded
(or binary) relevance, 0 = not relevant. Gains are linear (BEIR / pytrec_eval convention), ties
keep document order. Queries without a relevant document are left out of the averages;
``reduce=False`` returns the per-query values (Q,) instead (for sums over eval batches).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _ranked_relevance(scores: jax.Array, relevance: jax.Array, k: int) -> jax.Array:
    if scores.shape != relevance.shape or scores.ndim != 2:
        raise ValueError(f"scores and relevance must both be (queries, documents); got {scores.shape} and "
                         f"{relevance.shape}")
    k = min(k, scores.shape[1])
    _, top = jax.lax.top_k(scores.astype(jnp.float32), k)
    return jnp.take_along_axis(relevance.astype(jnp.float32), top, axis=1)  # (Q, k)


def _mean_over_answerable(values: jax.Array, relevance: jax.Array, reduce: bool = True) -> jax.Array:
    if not reduce:
        return values
    has = (relevance > 0).any(axis=1)
    return jnp.sum(jnp.where(has, values, 0.0)) / jnp.maximum(has.sum(), 1)


def mrr_at_k(scores: jax.Array, relevance: jax.Array, k: int = 10, *, reduce: bool = True) -> jax.Array:
    """Mean reciprocal rank of the first relevant document within the top ``k`` (0 if none)."""
    ranked = _ranked_relevance(scores, relevance, k) > 0
    ranks = jnp.arange(1, ranked.shape[1] + 1, dtype=jnp.float32)
    rr = jnp.max(jnp.where(ranked, 1.0 / ranks, 0.0), axis=1)
    return _mean_over_answerable(rr, relevance, reduce)


def ndcg_at_k(scores: jax.Array, relevance: jax.Array, k: int = 10, *, reduce: bool = True) -> jax.Array:
    """Normalised discounted cumulative gain: sum rel_i / log2(i + 1) over the top ``k``, divided
    by the same sum for the ideal ordering."""
    ranked = _ranked_relevance(scores, relevance, k)
    discounts = 1.0 / jnp.log2(jnp.arange(2, ranked.shape[1] + 2, dtype=jnp.float32))
    dcg = (ranked * discounts).sum(axis=1)
    ideal = -jnp.sort(-relevance.astype(jnp.float32), axis=1)[:, :ranked.shape[1]]
    idcg = (ideal * discounts).sum(axis=1)
    return _mean_over_answerable(dcg / jnp.maximum(idcg, 1e-12), relevance, reduce)


def recall_at_k(scores: jax.Array, relevance: jax.Array, k: int = 10, *, reduce: bool = True) -> jax.Array:
    """Fraction of a query's relevant documents found in its top ``k``."""
    found = (_ranked_relevance(scores, relevance, k) > 0).sum(axis=1)
    total = (relevance > 0).sum(axis=1)
    return _mean_over_answerable(found / jnp.maximum(total, 1), relevance, reduce)


def retrieval_metrics(scores: jax.Array, relevance: jax.Array | None = None, *, k: int = 10,
                      recall_ks: Sequence[int] = (1, 5, 10)) -> dict[str, jax.Array]:
    """``mrr@k``, ``ndcg@k`` and ``recall@k'`` for each k' in ``recall_ks``. ``relevance`` defaults
    to the identity (query i's positive is document i: in-batch retrieval)."""
    if relevance is None:
        if scores.shape[0] != scores.shape[1]:
            raise ValueError(f"without relevance, scores must be square (in-batch pairs); got {scores.shape}")
        relevance = jnp.eye(scores.shape[0], dtype=jnp.float32)
    out = {f"mrr@{k}": mrr_at_k(scores, relevance, k), f"ndcg@{k}": ndcg_at_k(scores, relevance, k)}
    out.update({f"recall@{r}": recall_at_k(scores, relevance, r) for r in recall_ks})
    return out
