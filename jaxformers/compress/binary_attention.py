"""The binarized attention cores of ``MultiHeadAttention(binary=recipe)`` (see ``compress.binary``).

q, k, v (B, L, H, D) are the outputs of the binarized projections (pre-binarization; BiBERT's DMD
distils their Gram matrices), x (B, L, E) the layer input (BiPFT's estimators read it).

- ``"bool"`` (BiBERT Bi-Attention): q, k, v → sign; S = Q_b K_bᵀ/√d (+ bias), masked positions
  −10000 (BERT's additive mask); dropout on S; P = 1[S > 0] (``bool_ste``, no softmax); out = P V_b.
- ``"elastic"`` (BiPFT): q, k, v → sign(·)·α each (elastic, lazily initialised α); S = Q_b K_bᵀ +
  q_m k_pᵀ + q_p k_mᵀ + q_p k_pᵀ (five rank-1 linears of x, shared across heads), /√d, masked,
  softmax, dropout; P_b = clip(round(P/α), 0, 1)·α; out = P_b V_b + P_b v_p (v_p broadcast over the
  head dim).
- ``"sab"`` (BiViT): q, k, v → sign; A = Q_b K_bᵀ·scale, dropout, masked; P = softmax-aware
  binarization 1[softmax ≥ ¼·row max] (gradient through the softmax); out = P V_b.
- ``"sign_softmax"`` (the fully binarized baseline): q, k, v → sign; softmax; P = sign(softmax) =
  1 on every unmasked key (the information loss BiBERT's Bi-Attention removes); out = P V_b.

Every Q_b K_bᵀ and P V_b is evaluated on integer codes (``binary_product``), and as XNOR / AND +
popcount when the recipe is packed; both paths share every float operation around them.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.compress import binary_pack as bp
from jaxformers.compress.binarizers import (Binarized, binary_product, bool_ste, elastic_binary, elastic_codes,
                                            elastic_init, elastic_step, sab, sign_ste)
from jaxformers.layers.attention import dot_product_attention, segment_mask
from jaxformers.layers.linear import Dense

_QK = functools.partial(jnp.einsum, "bqhd,bkhd->bhqk", precision=jax.lax.Precision.HIGHEST)
_PV = functools.partial(jnp.einsum, "bhqk,bkhd->bqhd", precision=jax.lax.Precision.HIGHEST)


def float_attention(q, k, v, *, mask=None, bias=None, segment_ids=None, scale=None, dropout_rate=0.0,
                    dropout_rng=None) -> jax.Array:
    """Softmax attention on the float projections (a recipe with ``attention=None``)."""
    return dot_product_attention(q, k, v, mask=mask, bias=bias, segment_ids=segment_ids, scale=scale,
                                 implementation="xla", dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def _dropout(x, rate, rng):
    if rate <= 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _mul(a, b):
    return b if a is None else (a if b is None else a * b)


class BinaryAttention(nn.Module):
    """The recipe's binarized attention (module docstring); parameters: BiPFT's step sizes
    ``clip_query``/``clip_key``/``clip_value``/``clip_attn`` and estimators ``q_p``, ``k_p``, ``q_m``,
    ``k_m``, ``v_p`` (each Dense(embed → 1) with bias; as in the official code, the biases of ``k_p``
    and ``k_m`` add a per-query constant to the scores, which the softmax ignores: their gradient is 0)."""

    recipe: Any

    def _scores(self, qb: Binarized, kb: Binarized) -> jax.Array:
        scale = _mul(qb.scale, kb.scale)
        if self.recipe.packed:
            s = bp.xnor_scores(*bp.pack_ternary(qb.codes), *bp.pack_ternary(kb.codes)).astype(jnp.float32)
            return s if scale is None else s * scale
        return binary_product(_QK, qb.q, kb.q, qb.codes, kb.codes, scale)

    def _context(self, pb: Binarized, vb: Binarized) -> jax.Array:
        """P V for P in {0, 1}·scale (B, H, Lq, Lk) and V ±1·scale (B, Lk, H, D)."""
        scale = _mul(pb.scale, vb.scale)
        if self.recipe.packed:
            out = bp.mask_matmul(bp.pack_bits(pb.codes), *bp.pack_ternary(jnp.transpose(vb.codes, (0, 2, 3, 1))))
            out = out.astype(jnp.float32)
            return out if scale is None else out * scale
        return binary_product(_PV, pb.q, vb.q, pb.codes, vb.codes, scale)

    @nn.compact
    def __call__(self, x, q, k, v, *, mask=None, bias=None, segment_ids=None, scale=None, dropout_rate: float = 0.0,
                 dropout_rng=None) -> jax.Array:
        mode = self.recipe.attention
        head_dim = q.shape[-1]
        if segment_ids is not None:
            seg = segment_mask(segment_ids, segment_ids)
            mask = seg if mask is None else jnp.logical_and(mask, seg)
        rescale = (lambda s: s / math.sqrt(head_dim)) if scale is None else (lambda s: s * scale)  # noqa: E731

        if mode == "elastic":
            step = {}
            for name, t in (("clip_query", q), ("clip_key", k), ("clip_value", v)):
                step[name] = self.param(name, lambda rng, t=t: elastic_init(t))
            qb, kb, vb = (Binarized(elastic_binary(t, step[n]), elastic_codes(t, step[n]), elastic_step(step[n]))
                          for t, n in ((q, "clip_query"), (k, "clip_key"), (v, "clip_value")))
        else:
            window = "clip" if mode == "sign_softmax" else "clip_open"
            qb, kb, vb = (self._sign(t, window) for t in (q, k, v))

        s = self._scores(qb, kb)
        if mode == "elastic" and self.recipe.estimators:
            est = {n: Dense(1, axes=("embed", None), name=n)(x).astype(jnp.float32) for n in ("q_p", "k_p", "q_m", "k_m",
                                                                                             "v_p")}
            low = functools.partial(jnp.einsum, "bqo,bko->bqk")
            s = s + (low(est["q_m"], est["k_p"]) + low(est["q_p"], est["k_m"]) + low(est["q_p"], est["k_p"]))[:, None]
        s = rescale(s)
        if bias is not None:
            s = s + bias.astype(s.dtype)

        if mode == "bool":
            if mask is not None:
                s = jnp.where(mask, s, -10000.0)
            s = _dropout(s, dropout_rate, dropout_rng)
            pb = Binarized(bool_ste(s), (jax.lax.stop_gradient(s) > 0).astype(s.dtype), None)
        elif mode == "sab":
            s = _dropout(s, dropout_rate, dropout_rng)
            if mask is not None:
                s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
            p = sab(s)
            pb = Binarized(p, jax.lax.stop_gradient(p), None)
        else:
            if mask is not None:
                s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
            p = _dropout(jax.nn.softmax(s, axis=-1), dropout_rate, dropout_rng)
            if mode == "elastic":
                alpha = self.param("clip_attn", lambda rng: elastic_init(p, signed=False))
                pb = Binarized(elastic_binary(p, alpha, False), elastic_codes(p, alpha, False), elastic_step(alpha))
            else:  # sign_softmax: sign(p) = 1 wherever a key is visible
                keep = jnp.ones_like(p) if mask is None else jnp.broadcast_to(mask, p.shape).astype(p.dtype)
                pb = Binarized(sign_ste(p) * keep, keep, None)

        out = self._context(pb, vb)
        if mode == "elastic" and self.recipe.estimators:
            out = out + jnp.einsum("bhqk,bko->bqho", pb.q, est["v_p"])
        return out.astype(v.dtype)

    @staticmethod
    def _sign(t, window) -> Binarized:
        from jaxformers.compress.binarizers import straight_through

        codes = jnp.sign(jax.lax.stop_gradient(t))
        return Binarized(straight_through(codes, t, window), codes, None)
