"""1-bit binarizers with the official straight-through gradients, as ``jax.custom_vjp`` functions.

Each function is the JAX form of an official PyTorch ``autograd.Function`` (file named per function);
tests compare forwards and gradients with those functions where the official code imports on CPU.

=========================  =====================================  =====================================
function                   forward                                gradient (cotangent g)
=========================  =====================================  =====================================
``sign_ste(x)``            sign(x)                                g·1[|x| ≤ 1]  (BiBERT QuantizeLinear)
``bool_ste(x)``            1[x > 0]                               g·1[|x| < 1]  (BiBERT ZMeanBinaryQuantizer)
``approx_sign(x)``         sign(x)                                g·max(0, 2 − |2x|)  (Bi-Real / BiPer)
``sine_sign(w, omega)``    sign(sin(ωw))                          g·ω·cos(ωw)  (BiPer stage 2)
``bwn(w, ...)``            sign(w − mean(w))·‖w‖₁/n               g  (BiPFT BwnQuantizer)
``elastic_binary(x, α)``   sign(x)·α  /  clip(round(x/α), 0, 1)·α  g·1[Qn ≤ x/α ≤ Qp], LSQ α gradient
``sab(scores)``            1[p ≥ ¼·max_row p], p = softmax        straight through to p (BiViT SAB)
=========================  =====================================  =====================================

Activations follow torch.sign: sign(0) = 0 (exact zeros do occur: a BiPFT attention row whose
probabilities all round to 0 gives a zero context vector), so an input code is ternary, and the packed
path (``binary_pack``) carries a nonzero bit plane next to the sign plane. Weights are strictly two-valued
(``weight_sign``: w ≥ 0 → +1), one bit each; a weight exactly equal to its row mean is a measure-zero
event (torch.sign would give 0 there), and a row that is all equal has scale mean|w| = 0 either way.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

EPS = 1e-5  # BiPFT's lower bound on a learnable step size α


def weight_sign(x: jax.Array) -> jax.Array:
    """+1 where x ≥ 0, −1 elsewhere (in x's dtype): a weight's 1-bit code (see the module docstring)."""
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# one straight-through primitive: forward ``value``, backward the window's mask times g onto ``x``

def _window(kind: str, x: jax.Array) -> jax.Array:
    if kind == "clip":  # torch.clamp(x, -1, 1): gradient 1 on the closed interval
        return (jnp.abs(x) <= 1).astype(x.dtype)
    if kind == "clip_open":  # BinaryQuantizer: zero where x >= 1 or x <= -1
        return (jnp.abs(x) < 1).astype(x.dtype)
    if kind == "approx_sign":
        return jnp.maximum(0.0, 2.0 - jnp.abs(2.0 * x)).astype(x.dtype)
    if kind == "identity":
        return jnp.ones_like(x)
    raise ValueError(f"unknown straight-through window {kind!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def straight_through(value: jax.Array, x: jax.Array, window: str) -> jax.Array:
    """``value`` forward; backward the cotangent times ``window``'s mask of ``x`` goes to ``x``
    (``value`` gets none). window: "clip" 1[|x| ≤ 1], "clip_open" 1[|x| < 1], "approx_sign"
    max(0, 2 − |2x|), "identity" 1."""
    return value


def _st_fwd(value, x, window):
    return value, x


def _st_bwd(window, x, g):
    return jnp.zeros_like(g), (g * _window(window, x)).astype(x.dtype)


straight_through.defvjp(_st_fwd, _st_bwd)


# ------------------------------------------------------------------------------------------------
# activation binarizers

def sign_ste(x: jax.Array) -> jax.Array:
    """sign(x), gradient g·1[|x| ≤ 1] (BiBERT's clipped straight-through estimator)."""
    return straight_through(jnp.sign(jax.lax.stop_gradient(x)), x, "clip")


def bool_ste(x: jax.Array) -> jax.Array:
    """1[x > 0] in {0, 1}, gradient g·1[|x| < 1] (BiBERT's Bi-Attention ``ZMeanBinaryQuantizer``)."""
    return straight_through((jax.lax.stop_gradient(x) > 0).astype(x.dtype), x, "clip_open")


def approx_sign(x: jax.Array) -> jax.Array:
    """sign(x), gradient g·max(0, 2 − |2x|) (Bi-Real Net's ApproxSign; BiPer ``BinaryQuantize_a``)."""
    return straight_through(jnp.sign(jax.lax.stop_gradient(x)), x, "approx_sign")


def sine_sign(w: jax.Array, omega: float) -> jax.Array:
    """sign(sin(ωw)) (a square wave), gradient g·ω·cos(ωw): BiPer's stage-2 weights (identity STE
    through sign, then the sine's derivative)."""
    s = jnp.sin(omega * w)
    return straight_through(weight_sign(jax.lax.stop_gradient(s)), s, "identity")


def sine_weight(w: jax.Array, omega: float) -> jax.Array:
    """sin(ωw): BiPer's stage-1 (real-valued) weights."""
    return jnp.sin(omega * w)


def sab(scores: jax.Array, threshold: float = 0.25) -> jax.Array:
    """BiViT's softmax-aware binarization: p = softmax(scores, -1), forward 1[p ≥ threshold·max_row p]
    in {0, 1} (ties give 1, as the official ``attn < thresh → 0``), gradient straight through to p
    (``B.detach() − P.detach() + P``)."""
    p = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    sp = jax.lax.stop_gradient(p)
    b = (sp >= threshold * jnp.max(sp, axis=-1, keepdims=True)).astype(p.dtype)
    return straight_through(b, p, "identity").astype(scores.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def elastic_binary(x: jax.Array, alpha: jax.Array, signed: bool = True) -> jax.Array:
    """BiPFT's elastic 1-bit quantizer (``ElasticQuantBinarizerSigned`` / ``...Unsigned``, LSQ-style)
    with a learnable step size α (a scalar, clamped below at 1e-5):

    - signed: sign(x)·α; gradients g·1[−1 ≤ x/α ≤ 1] to x and Σ sign(x)·g / √numel to α;
    - unsigned (attention probabilities): clip(round(x/α), 0, 1)·α; gradients g·1[0 ≤ x/α ≤ 1] to x
      and Σ (1[x/α > 1] + 1[0 ≤ x/α ≤ 1]·(round(x/α) − x/α))·g / √numel to α.

    ``elastic_init(x, signed)`` is the official lazy initial α."""
    a = jnp.where(alpha > EPS, alpha, EPS).astype(x.dtype)
    codes = jnp.sign(x) if signed else jnp.clip(jnp.round(x / a), 0, 1)
    return codes * a


def _elastic_fwd(x, alpha, signed):
    return elastic_binary(x, alpha, signed), (x, alpha)


def _elastic_bwd(signed, res, g):
    x, alpha = res
    a = jnp.where(alpha > EPS, alpha, EPS).astype(x.dtype)
    q = x / a
    lo, hi = (-1.0, 1.0) if signed else (0.0, 1.0)
    small, big = q < lo, q > hi
    middle = ~(small | big)
    scale = 1.0 / math.sqrt(x.size)
    if signed:
        ga = jnp.sum(jnp.sign(x) * g) * scale
    else:
        ga = jnp.sum((jnp.where(small, lo, 0.0) + jnp.where(big, hi, 0.0) + jnp.where(middle, jnp.round(q) - q, 0.0))
                     * g) * scale
    ga = jnp.where(alpha > EPS, ga, 0.0)
    return jnp.where(middle, g, 0.0).astype(x.dtype), jnp.broadcast_to(ga, jnp.shape(alpha)).astype(jnp.result_type(alpha))


elastic_binary.defvjp(_elastic_fwd, _elastic_bwd)


def elastic_init(x: jax.Array, signed: bool = True) -> jax.Array:
    """BiPFT's lazy initial step size, taken on the first forward: 2·mean|x| (signed) or 4·mean|x|
    (unsigned) (``AlphaInit.initialize_wrapper`` with Qp forced to 1)."""
    return (2.0 if signed else 4.0) * jnp.mean(jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32)))


def elastic_codes(x: jax.Array, alpha: jax.Array, signed: bool = True) -> jax.Array:
    """The integer codes of ``elastic_binary`` (±1 signed, {0, 1} unsigned), without gradient."""
    x = jax.lax.stop_gradient(x)
    if signed:
        return jnp.sign(x)
    a = jnp.where(alpha > EPS, alpha, EPS).astype(x.dtype)
    return jnp.clip(jnp.round(x / a), 0, 1)


def elastic_step(alpha: jax.Array) -> jax.Array:
    """The step size ``elastic_binary`` multiplies the codes by (α clamped below at 1e-5)."""
    return jax.lax.stop_gradient(jnp.where(alpha > EPS, alpha, EPS))


# ------------------------------------------------------------------------------------------------
# weight binarizers: each returns the quantized weight q (with the official gradient), its codes
# (±1, no gradient) and its scale (no gradient; q = codes·scale up to the broadcast)

class Binarized(NamedTuple):
    """A binarized tensor: ``q`` (= codes·scale, carries the official gradient), ``codes`` (±1 or
    {0, 1}, no gradient) and ``scale`` (no gradient; None = 1), broadcastable to ``q``."""

    q: jax.Array
    codes: jax.Array
    scale: jax.Array | None


def _axes(ndim: int, axes: Sequence[int] | None) -> tuple[int, ...]:
    return tuple(range(ndim)) if axes is None else tuple(a % ndim for a in axes)


def fixed_order_mean(x: jax.Array, axes: Sequence[int] | None = None) -> jax.Array:
    """The mean over ``axes`` (kept as size 1) summed in a fixed pairwise order (halves added
    elementwise), so that it rounds the same wherever XLA places it: a reduce's summation order is
    XLA's choice and changes with fusion, which would let the scale the packed model stores differ by
    one ulp from the one the simulation computes in its graph."""
    axes = _axes(x.ndim, axes)
    kept = tuple(a for a in range(x.ndim) if a not in axes)
    n = math.prod(x.shape[a] for a in axes)
    flat = jnp.transpose(x, axes + kept).reshape((n,) + tuple(x.shape[a] for a in kept))
    size = 1 << max(n - 1, 0).bit_length()
    flat = jnp.pad(flat, [(0, size - n)] + [(0, 0)] * len(kept))
    while flat.shape[0] > 1:
        half = flat.shape[0] // 2
        flat = flat[:half] + flat[half:]
    out = flat[0] / n
    return out.reshape(tuple(1 if a in axes else x.shape[a] for a in range(x.ndim)))


def bwn(w: jax.Array, scale_axes: Sequence[int] | None = None, center_axes: Sequence[int] | None = None) -> jax.Array:
    """Binary Weight Network (BiPFT ``BwnQuantizer``): sign(w − mean(w))·‖w‖₁/n with the identity
    gradient. ``scale_axes``: the axes the L1 scale averages over (None: the whole matrix, BiPFT's
    layerwise linears; the input axes: one scale per row, BiPFT's word embedding); the mean is over
    ``center_axes`` (None: the whole matrix, as the official code does even per row)."""
    return bwn_parts(w, scale_axes, center_axes).q


def bwn_parts(w, scale_axes=None, center_axes=None) -> Binarized:
    sw = jax.lax.stop_gradient(w)
    codes = weight_sign(sw - fixed_order_mean(sw, center_axes))
    scale = fixed_order_mean(jnp.abs(sw), scale_axes)
    return Binarized(straight_through(codes * scale, w, "identity"), codes, scale)


def row_binary_parts(w: jax.Array, in_axes: Sequence[int], mode: str = "bibert",
                     learned_scale: jax.Array | None = None) -> Binarized:
    """Row-wise binarized weights, a row = one output unit (the mean over ``in_axes``):

    - "bibert" (BiBERT ``QuantizeLinear`` / ``QuantizeEmbedding``): c = w − rowmean(w),
      q = rowmean|w|·sign(c) with the scale detached; gradient 1[|c| ≤ 1] onto c (then through the
      centering), *not* multiplied by the scale;
    - "bivit" (BiViT ``BinaryLinear_STE``): the same q, gradient scale·1[|c| < 1] onto c;
    - "adaptive" (BiViT ``BinaryLinear_adapscaling``): q = s·sign(c) with s = ``learned_scale``, a
      parameter (gradients to s and, as "bivit", to w);
    - "sign" (the plain sign-STE baseline): q = rowmean|w|·sign(w), gradient scale·1[|w| ≤ 1].
    """
    in_axes = _axes(w.ndim, in_axes)
    sw = jax.lax.stop_gradient(w)
    scale = fixed_order_mean(jnp.abs(sw), in_axes)
    if mode == "sign":
        codes = weight_sign(sw)
        return Binarized(scale * straight_through(codes, w, "clip"), codes, scale)
    c = w - fixed_order_mean(w, in_axes)
    codes = weight_sign(jax.lax.stop_gradient(c))
    if mode == "bibert":
        return Binarized(straight_through(codes * scale, c, "clip"), codes, scale)
    if mode == "bivit":
        return Binarized(scale * straight_through(codes, c, "clip_open"), codes, scale)
    if mode == "adaptive":
        if learned_scale is None:
            raise ValueError("mode='adaptive' needs learned_scale (the learnable per-row scale)")
        return Binarized(learned_scale * straight_through(codes, c, "clip_open"), codes,
                         jax.lax.stop_gradient(learned_scale))
    raise ValueError(f"unknown row binarization mode {mode!r}; expected 'bibert', 'bivit', 'adaptive' or 'sign'")


# ------------------------------------------------------------------------------------------------
# the bilinear product of two binarized tensors, evaluated exactly on their integer codes

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def binary_product(op, xq, wq, xc, wc, scale):
    """``op(xq, wq)`` (a bilinear op: matmul, einsum, convolution) evaluated as ``op(xc, wc)·scale``
    on the integer codes in float32 (exact: integer sums below 2²⁴), so that the packed XNOR-popcount
    path gives the same numbers bit for bit; gradients are ``op``'s at (xq, wq), so each binarizer's
    own straight-through rule applies (``xq = xc·sx``, ``wq = wc·sw``, ``scale = sx·sw`` broadcast to
    the output; ``scale`` None = 1)."""
    out = op(xc.astype(jnp.float32), wc.astype(jnp.float32))
    return out if scale is None else out * scale


def _bp_fwd(op, xq, wq, xc, wc, scale):
    return binary_product(op, xq, wq, xc, wc, scale), (xq, wq, xc, wc, scale)


def _bp_bwd(op, res, g):
    xq, wq, xc, wc, scale = res
    _, vjp = jax.vjp(op, xq, wq)
    gx, gw = vjp(g.astype(jnp.result_type(xq, wq)))
    zero = lambda t: None if t is None else jnp.zeros_like(t)  # noqa: E731
    return gx, gw, zero(xc), zero(wc), zero(scale)


binary_product.defvjp(_bp_fwd, _bp_bwd)
