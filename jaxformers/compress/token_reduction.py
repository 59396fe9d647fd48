"""Token reduction as a token matrix: X' = T X (Token Transforming), with pruning and ToMe as special cases.

Papers:
- "Token Transforming: A Unified and Training-Free Token Compression Framework for Vision
  Transformer Acceleration", Zeng, Yu, Kong, Tang, arXiv 2506.05709 (2025). No official code was
  found; the choices below are ours where the abstract leaves them open (listed under Choices).
- "Token Merging: Your ViT but Faster" (ToMe), Bolya et al., ICLR 2023, arXiv 2210.09461, official
  code facebookresearch/ToMe (``tome/merge.py``, ``tome/patch/timm.py``): reproduced exactly (live
  parity test against the official patch of a timm ViT).

The framework: a reduction at layer i maps the N tokens X (with sizes s, the number of input
patches each token stands for, 1 at the start) to N' = N - r tokens through a non-negative matrix
T (N' x N): ``X' = T (s * X) / (T s)`` and ``s' = T s`` (size-weighted averages). Then

- **pruning** is T with one-hot rows (each kept token keeps itself; the others are dropped):
  ``method="prune"``, kept tokens by [CLS] attention (EViT-style scoring);
- **merging (ToMe)** is many-to-one: each source token enters exactly one row. ``method="tome"``
  builds ToMe's bipartite soft matching: alternate tokens form sets A and B, each A token's most
  similar B token (cosine of the keys averaged over heads) is its edge, the r best edges merge,
  the [CLS] token (and DeiT's distillation token) is never merged, r is capped at half the
  unprotected tokens as the official code caps it, and the output order is the official one
  (unmerged A tokens, then B; the distillation token second);
- **Token Transforming** (``method="transform"``) is many-to-many: the N' informative tokens (highest
  [CLS] attention, averaged over heads) keep themselves, and every one of the r discarded tokens is
  spread over *all* kept tokens with weights ``softmax_j(cos(k_d, k_j) / temperature)``, so no
  token's information is dropped and nothing needs re-training.

Every reduction sits between a block's attention and its MLP (as in ToMe) and, with
``proportional_attention`` (default on, as ToMe for off-the-shelf models), later attention layers
add ``log(s)`` to their logits so a merged token counts as many tokens. The schedule ``r`` is the
number of tokens removed per layer: one int for every layer, ToMe's ``(r, inflection)`` pair, or an
explicit per-layer sequence; the shapes are static (fixed counts), so reduced models run under
``jit`` and shard like the host.

Use: ``create_model("deit_small_patch16_224", token_reduction=token_reduction("transform", r=8))``.
The same variables apply (reductions have no parameters). :func:`transform_matrix` returns the T of
a layer for inspection; :func:`apply_transform` applies any T.

Choices (Token Transforming, no official code): informative tokens by [CLS] attention of the
layer (mean attention received over all queries for models without a [CLS] token); the
similarity is the cosine of the keys averaged over heads (ToMe's metric); the discarded tokens
distribute over all kept non-prefix tokens (dense T rows); temperature 0.1 by default (our
measurement on the digits benchmark, ``benchmarks/efficiency.py``); the [CLS] / distillation
tokens are kept and receive nothing. Global average pooling after a reduction weights tokens by
their sizes (ToMe averages merged tokens unweighted; with ``global_pool="token"``, the DeiT
default, the two agree).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Sequence

import jax
import jax.numpy as jnp

__all__ = ["METHODS", "TokenReduction", "TokenMerging", "token_reduction", "parse_schedule", "apply_transform",
           "transform_matrix", "tome_matching", "informative_scores"]

METHODS = ("transform", "tome", "prune")


class TokenReduction:
    """The hooks ``VisionTransformer`` calls: ``before_block`` (between blocks, may create submodules
    on the host module) and ``block_reducer`` (inside block i, between attention and MLP)."""

    proportional_attention: bool = False

    def validate(self, depth: int) -> None:
        """Called once by the host with its depth: raise a clear error for a mismatched schedule."""

    def before_block(self, module: Any, i: int, x: jax.Array, size: jax.Array, *, train: bool):
        return x, size

    def block_reducer(self, i: int, num_prefix_tokens: int):
        return None


def parse_schedule(r: int | tuple | Sequence[int], depth: int) -> list[int]:
    """Tokens removed per layer. ``int``: that many every layer; ``(r, inflection)``: ToMe's
    schedule (``tome.utils.parse_r``: -1 decreasing, 0 constant, +1 increasing); a list / tuple of
    ints of length ``depth``: explicit."""
    if isinstance(r, bool):
        raise TypeError("r must be an int, (r, inflection) or a per-layer sequence of ints")
    if isinstance(r, int):
        r, inflect = r, 0.0
    elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        r, inflect = r
    else:
        sched = [int(v) for v in r]
        if len(sched) != depth:
            raise ValueError(f"the per-layer schedule has {len(sched)} entries but the model has {depth} blocks")
        if min(sched) < 0:
            raise ValueError(f"token counts to remove must be >= 0; got {sched}")
        return sched
    if r < 0:
        raise ValueError(f"r (tokens removed per layer) must be >= 0, got {r}")
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / max(depth - 1, 1)
    return [int(lo + step * i) for i in range(depth)]


def _normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def informative_scores(q: jax.Array, k: jax.Array, size: jax.Array | None, class_token: bool,
                       proportional: bool) -> jax.Array:
    """(B, N) attention each token receives: from [CLS] (``class_token``) or averaged over all
    queries, averaged over heads; q, k (B, N, H, D)."""
    scale = q.shape[-1] ** -0.5
    queries = q[:, :1] if class_token else q
    logits = jnp.einsum("bqhd,bkhd->bhqk", queries, k, preferred_element_type=jnp.float32) * scale
    if proportional and size is not None:
        logits = logits + jnp.log(size)[:, None, None, :]
    return jax.nn.softmax(logits, axis=-1).mean(axis=(1, 2))


def tome_matching(metric: jax.Array, r: int, class_token: bool, distill_token: bool):
    """ToMe's bipartite soft matching (official ``bipartite_soft_matching``) on metric (B, N, C):
    (unm_idx (B, Na - r), src_idx (B, r), dst_idx (B, r)) into the A (even) / B (odd) token sets."""
    metric = jax.lax.stop_gradient(_normalize(metric.astype(jnp.float32)))
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = jnp.einsum("bic,bjc->bij", a, b)
    if class_token:
        scores = scores.at[:, 0, :].set(-jnp.inf)
    if distill_token:
        scores = scores.at[:, :, 0].set(-jnp.inf)
    node_max, node_idx = scores.max(axis=-1), scores.argmax(axis=-1)
    edge_idx = jnp.argsort(-node_max, axis=-1, stable=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = jnp.take_along_axis(node_idx, src_idx, axis=1)
    if class_token:
        unm_idx = jnp.sort(unm_idx, axis=1)
    return unm_idx, src_idx, dst_idx


def _tome_merge(x, size, metric, r, class_token, distill_token):
    unm_idx, src_idx, dst_idx = tome_matching(metric, r, class_token, distill_token)

    def merge_sum(t):
        src, dst = t[:, ::2], t[:, 1::2]
        unm = jnp.take_along_axis(src, unm_idx[..., None], axis=1)
        src = jnp.take_along_axis(src, src_idx[..., None], axis=1)
        dst = jax.vmap(lambda d, i, s: d.at[i].add(s))(dst, dst_idx, src)
        if distill_token:
            return jnp.concatenate([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], axis=1)
        return jnp.concatenate([unm, dst], axis=1)

    s = size[..., None].astype(x.dtype)
    weighted, new_size = merge_sum(x * s), merge_sum(s)
    return weighted / new_size, new_size[..., 0].astype(size.dtype)


def _keep_indices(scores, num_prefix, keep):
    """Prefix tokens, then the ``keep`` highest-scoring other tokens in their original order."""
    top = jax.lax.top_k(scores[:, num_prefix:], keep)[1]
    kept = jnp.sort(top, axis=1) + num_prefix
    prefix = jnp.broadcast_to(jnp.arange(num_prefix), (scores.shape[0], num_prefix))
    return jnp.concatenate([prefix, kept], axis=1)


def _dropped_indices(kept, n):
    """The complement of ``kept`` (B, K) in range(n), ascending: (B, n - K)."""
    mask = jnp.ones((kept.shape[0], n), bool).at[jnp.arange(kept.shape[0])[:, None], kept].set(False)
    order = jnp.argsort(~mask, axis=1, stable=True)  # True (dropped) first, ascending index
    return order[:, : n - kept.shape[1]]


def _transform_weights(metric, kept, dropped, num_prefix, temperature):
    """(B, r, N') spread of every dropped token over the kept non-prefix tokens (prefix columns 0)."""
    m = _normalize(metric.astype(jnp.float32))
    md = jnp.take_along_axis(m, dropped[..., None], axis=1)
    mk = jnp.take_along_axis(m, kept[..., None], axis=1)
    sim = jnp.einsum("brc,bkc->brk", md, mk) / temperature
    sim = sim.at[:, :, :num_prefix].set(-jnp.inf)
    return jax.lax.stop_gradient(jax.nn.softmax(sim, axis=-1))


def apply_transform(x: jax.Array, size: jax.Array, T: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``X' = T (s X) / (T s)``, ``s' = T s`` for x (B, N, C), size (B, N), T (B, N', N)."""
    new_size = jnp.einsum("bkn,bn->bk", T, size.astype(jnp.float32))
    out = jnp.einsum("bkn,bnc->bkc", T, x.astype(jnp.float32) * size[..., None]) / new_size[..., None]
    return out.astype(x.dtype), new_size.astype(size.dtype)


@dataclasses.dataclass(frozen=True)
class TokenMerging(TokenReduction):
    """Pruning / ToMe / Token Transforming with a per-layer schedule (see the module docstring).
    Build with :func:`token_reduction`."""

    method: str = "transform"
    r: Any = 0
    temperature: float = 0.1
    proportional_attention: bool = True
    class_token: bool = True
    distill_token: bool = False

    def schedule(self, depth: int) -> list[int]:
        return parse_schedule(self.r, depth)

    def validate(self, depth: int) -> None:
        self.schedule(depth)

    def block_reducer(self, i: int, num_prefix_tokens: int):
        return _Reducer(self, i, num_prefix_tokens)

    def plan(self, i: int, r: int, n: int, num_prefix: int) -> int:
        """Tokens actually removed at layer i from n tokens (ToMe caps r; the others must leave a token)."""
        if self.method == "tome":
            return max(0, min(r, (n - num_prefix) // 2))
        if r > n - num_prefix - 1:
            raise ValueError(f"token reduction ({self.method}) at layer {i} would remove {r} of {n - num_prefix} "
                             f"patch tokens, leaving fewer than one per image; lower its r (at most "
                             f"{n - num_prefix - 1} here)")
        return r

    def transform_matrix(self, x, size, q, k, r, num_prefix):
        """T (B, N - r, N) of this reduction on a block's tokens (for inspection and tests)."""
        b, n = x.shape[:2]
        metric = k.mean(axis=2)
        if self.method == "tome":
            unm_idx, src_idx, dst_idx = tome_matching(metric, r, self.class_token, self.distill_token)
            na, nb = (n + 1) // 2, n // 2
            # Output row of every A token (even positions): its place among the unmerged, or its B partner.
            set_rows = jax.vmap(lambda t, i, v: t.at[i].set(v))
            rows_a = set_rows(jnp.zeros((b, na), jnp.int32), unm_idx, jnp.broadcast_to(jnp.arange(na - r), unm_idx.shape))
            rows_a = set_rows(rows_a, src_idx, na - r + dst_idx)
            rows_b = jnp.broadcast_to(na - r + jnp.arange(nb), (b, nb))
            rows = jnp.zeros((b, n), jnp.int32).at[:, ::2].set(rows_a).at[:, 1::2].set(rows_b)
            if self.distill_token:  # official order: unm[0], dst[0], unm[1:], dst[1:]
                order = jnp.concatenate([jnp.array([0, na - r]), jnp.arange(1, na - r), jnp.arange(na - r + 1, n - r)])
                rows = jnp.argsort(order)[rows]
            return jax.nn.one_hot(rows, n - r, axis=1, dtype=jnp.float32)
        scores = informative_scores(q, k, size, self.class_token, self.proportional_attention)
        kept = _keep_indices(scores, num_prefix, n - num_prefix - r)
        T = jax.nn.one_hot(kept, n, dtype=jnp.float32)
        if self.method == "transform":
            dropped = _dropped_indices(kept, n)
            w = _transform_weights(metric, kept, dropped, num_prefix, self.temperature)  # (B, r, N')
            T = T + jnp.einsum("brk,brn->bkn", w, jax.nn.one_hot(dropped, n, dtype=jnp.float32))
        return T

    def reduce(self, x, size, q, k, r, num_prefix):
        """The reduction itself (gathers and small matmuls, no N' x N matrix)."""
        metric = k.mean(axis=2)
        if self.method == "tome":
            return _tome_merge(x, size, metric, r, self.class_token, self.distill_token)
        scores = informative_scores(q, k, size, self.class_token, self.proportional_attention)
        n = x.shape[1]
        kept = _keep_indices(scores, num_prefix, n - num_prefix - r)
        xk = jnp.take_along_axis(x, kept[..., None], axis=1)
        sk = jnp.take_along_axis(size, kept, axis=1)
        if self.method == "prune":
            return xk, sk
        dropped = _dropped_indices(kept, n)
        w = _transform_weights(metric, kept, dropped, num_prefix, self.temperature)  # (B, r, N')
        sd = jnp.take_along_axis(size, dropped, axis=1).astype(jnp.float32)
        xd = jnp.take_along_axis(x, dropped[..., None], axis=1).astype(jnp.float32)
        add_s = jnp.einsum("brk,br->bk", w, sd)
        add_x = jnp.einsum("brk,brc->bkc", w, xd * sd[..., None])
        new_size = sk.astype(jnp.float32) + add_s
        out = (xk.astype(jnp.float32) * sk[..., None] + add_x) / new_size[..., None]
        return out.astype(x.dtype), new_size.astype(size.dtype)


@dataclasses.dataclass(frozen=True)
class _Reducer:
    """Layer i's reduction, as the block calls it: ``(x, size, q, k) -> (x, size)``."""

    config: TokenMerging
    layer: int
    num_prefix: int

    def __call__(self, x, size, q, k):
        cfg = self.config
        r = cfg.r if isinstance(cfg.r, int) else int(cfg.r[self.layer])
        r = cfg.plan(self.layer, r, x.shape[1], self.num_prefix)
        if r == 0:
            return x, size
        return cfg.reduce(x, size, q, k, r, self.num_prefix)


def token_reduction(method: str = "transform", r: int | tuple | Sequence[int] = 8, *, depth: int | None = None,
                    temperature: float = 0.1, proportional_attention: bool = True, class_token: bool = True,
                    distill_token: bool = False) -> TokenMerging:
    """A token reduction for ``VisionTransformer(token_reduction=...)``.

    ``method``: ``"transform"`` (Token Transforming), ``"tome"`` (ToMe), ``"prune"`` ([CLS]-attention
    pruning). ``r``: tokens removed per layer (int), ToMe's ``(r, inflection)`` (then give ``depth``),
    or a per-layer sequence. ``class_token`` / ``distill_token`` describe the host (DeiT distilled:
    both True); they are protected from merging."""
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown token reduction method {method!r}{hint} (choose from {METHODS})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        if depth is None:
            raise ValueError("an (r, inflection) schedule needs depth= (the number of blocks)")
        r = tuple(parse_schedule(r, depth))
    elif not isinstance(r, int):
        r = tuple(parse_schedule(list(r), depth if depth is not None else len(list(r))))
    else:
        parse_schedule(r, 1)
    return TokenMerging(method=method, r=r, temperature=float(temperature),
                        proportional_attention=proportional_attention, class_token=class_token,
                        distill_token=distill_token)


def transform_matrix(reduction: TokenMerging, x: jax.Array, size: jax.Array, q: jax.Array, k: jax.Array,
                     r: int, num_prefix: int) -> jax.Array:
    """T (B, N - r, N) that ``reduction`` applies to tokens x with sizes ``size`` and a block's q, k."""
    return reduction.transform_matrix(x, size, q, k, reduction.plan(0, r, x.shape[1], num_prefix), num_prefix)
