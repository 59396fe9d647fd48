"""Binarized transformers and CNNs: BiBERT, BiPFT, BiViT, BiPer, and a real bit-packed inference path.

Papers:
- *BiBERT: Accurate Fully Binarized BERT*, Qin et al., ICLR 2022, arXiv 2203.06390 (htqin/BiBERT);
- *BiPFT: Binary Pre-trained Foundation Transformer with Low-rank Estimation of Binarization
  Residual Polynomials*, Xing et al., AAAI 2024, arXiv 2312.08937 (Xingrun-Xing/BiPFT);
- *BiViT: Extremely Compressed Binary Vision Transformers*, He et al., ICCV 2023, arXiv 2211.07091
  (ThisisBillhe/BiViT, the softmax-aware binarization code);
- *BiPer: Binary Neural Networks using a Periodic Function*, Vargas et al., CVPR 2024,
  arXiv 2404.01278 (edmav4/BiPer).

A model is binarized by a field, never by a forked model file: ``Bert(..., binary=BIBERT)``,
``VisionTransformer(..., binary=BIVIT)`` (and ``SwinTransformer``), the BiPer CIFAR nets' ``binary=BIPER``, and timm's ResNet
through its convolution seam ``ResNet(..., conv=BIPER.conv)`` (``binarize(module, recipe)`` sets
whichever applies). The field holds a
:class:`BinaryRecipe` (which binarizer each tensor gets); the shared layers ask it for their
binarized form (``MultiHeadAttention``, ``Mlp``, the BERT embeddings and pooler, ResNet blocks).
Parameter names stay the float model's (``kernel``, ``bias``, ``embedding``), so a float checkpoint
loads into a binarized host and :func:`calibrate` adds the recipe's extra parameters, initialised
from data like the official first forward (BiPFT's α = 2·mean|x|, BiViT's s = rowmean|W|).

What is binary and what stays float, per recipe (the official code decides):

========  =====================================================================================
recipe    binarized (weights W, inputs A)                          float
========  =====================================================================================
BIBERT    word embedding (rowmean|W|·sign(W − rowmean W)); Q/K/V/O, FFN1/2 and the pooler dense
          (same weights, A = sign(x)); Q, K, V re-binarized by sign; Bi-Attention P = 1[QKᵀ/√d > 0]
          (no softmax); P·V on binary V                              position/type embeddings,
                                                                     LayerNorms, biases, classifier
BIPFT     word embedding BWN per row; all linears BWN per matrix on elastic inputs sign(x + b)·α
          (b: learnable shift per input feature); Q/K/V elastic signed, probabilities elastic
          unsigned after softmax; five rank-1 estimators of the binarization residual; modified
          pooler tanh(LN(dense(h)) + h)                              as BIBERT + MLM/NSP heads
BIVIT     q/k/v and out projections s⊙sign(W − rowmean W) (s learnable per row); MLP linears
          rowmean|W|·sign(W − rowmean W); inputs and q, k, v sign; softmax-aware binarization
          of the attention probabilities                             patch embedding, norms, head
BIPER     3×3 convolutions in the blocks: stage 1 sin(ωW), stage 2 sign(sin(ωW)), ω = 20;
          inputs ApproxSign(a / std(a)) (the normalisation in training only); output ·α per
          channel (learnable)                                        stem, downsample, BN, fc
SIGN_STE  the baseline: every tensor BIBERT binarizes, with plain sign STEs (W: rowmean|W|·sign(W));
          attention: softmax, then sign of the probabilities (BiBERT's "fully binarized baseline");
          convolutions: rowmean|W|·sign(W) per output channel on sign(x) inputs (XNOR-Net style)
========  =====================================================================================

Packed inference: :func:`pack` turns every binarized weight into uint32 bit planes (+ its float
scale) and returns a module whose binary linears, convolutions and attention products run as XNOR +
``lax.population_count`` (``binary_pack``); its outputs equal the float simulation bit for bit,
because the simulation itself evaluates every binary product on the integer codes
(``binarizers.binary_product``) and both paths share every float operation after it.

Deliberate deviations (the official code otherwise decides):
- A weight's sign(0) is +1 (torch.sign gives 0; a measure-zero event, see ``binarizers``); activations
  follow torch.sign exactly (0 stays 0: the packed path carries a nonzero bit plane).
- BiBERT's unused parameters (``scale`` of each QuantizeLinear, ``gate`` of the output blocks) are
  not created: the forward never reads them, so a binarized host has exactly the float host's count.
- A fused q/k/v kernel keeps one kernel; its three slices get separate scales, shifts and step sizes,
  exactly the official separate ``query``/``key``/``value`` linears.
- BiPFT's estimators are shared across heads for any head count (the official code hard-codes
  ``expand(-1, 12, ...)``; broadcasting over heads is the same for 12).
- BiPer's CIFAR ``beta`` (ones, requires_grad=False, never read) is not created.
- The tied MLM decoder reads the float word embeddings (as the official BiPFT, whose decoder is tied
  to the float Parameter); the packed model has no float table and refuses ``attend``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxformers.compress import binary_pack as bp
from jaxformers.compress.binary_attention import BinaryAttention, float_attention
from jaxformers.compress.binarizers import (Binarized, approx_sign, binary_product, bool_ste, bwn,
                                            bwn_parts, elastic_binary, elastic_codes, elastic_init, elastic_step,
                                            row_binary_parts, sab, sign_ste, sine_sign, sine_weight,
                                            straight_through, weight_sign)
from jaxformers.layers.linear import logical, trunc_normal

__all__ = [
    "BinaryRecipe", "BIBERT", "BIPFT", "BIVIT", "BIPER", "SIGN_STE", "BinaryDense", "BinaryConv", "BinaryEmbed",
    "binarize", "calibrate", "pack", "packed_nbytes", "binary_layers", "biper_penalty", "biper_tau",
    "sign_ste", "bool_ste", "approx_sign", "sine_sign", "sine_weight", "bwn", "elastic_binary", "elastic_init", "sab",
    "weight_sign", "binary_product", "straight_through",
]

WEIGHT_MODES = ("bibert", "bivit", "adaptive", "sign", "bwn")
ACTIVATION_MODES = ("sign", "sign_open", "elastic", "approx_sign", None)
ATTENTION_MODES = ("bool", "elastic", "sab", "sign_softmax", None)
CONV_WEIGHT_MODES = ("sine",) + WEIGHT_MODES
LAZY_SCALES = ("act_scale", "weight_scale", "clip_query", "clip_key", "clip_value", "clip_attn")


@dataclasses.dataclass(frozen=True)
class BinaryRecipe:
    """Which binarizer each tensor of a model gets (see the module docstring's table).

    ``weight``: the linears' weights (``WEIGHT_MODES``); ``attention_weight``: the q/k/v/out
    projections' (None = ``weight``); ``activation``: the linears' inputs (``ACTIVATION_MODES``; None
    = float inputs, 1-bit weights only); ``shift``: BiPFT's learnable per-feature shift added before an
    input is binarized; ``embedding``: the word embedding (None = float); ``attention``: the attention
    core (``ATTENTION_MODES``; None = float softmax attention on float q, k, v); ``estimators``:
    BiPFT's rank-1 residual estimators; ``pooler``: "binary" (binarized dense + tanh), "bipft"
    (tanh(LN(dense(h)) + h)) or "float"; ``conv_weight`` / ``conv_activation``: binarized
    convolutions (BiPer: "sine" weights, "approx_sign" inputs); ``omega``, ``stage``: BiPer's frequency
    and training stage (1: sin(ωW) real weights, 2: sign(sin(ωW))); ``normalize_conv_input``: BiPer's
    training-time a / std(a); ``packed``: the model runs on bit-packed weights (set by :func:`pack`).
    """

    name: str = "custom"
    weight: str = "bibert"
    attention_weight: str | None = None
    activation: str | None = "sign"
    shift: bool = False
    embedding: str | None = None
    attention: str | None = None
    estimators: bool = False
    pooler: str = "binary"
    conv_weight: str = "sine"
    conv_activation: str | None = "approx_sign"
    omega: float = 20.0
    stage: int = 2
    normalize_conv_input: bool = True
    packed: bool = False

    def __post_init__(self):
        checks = (("weight", self.weight, WEIGHT_MODES), ("attention_weight", self.attention_weight, WEIGHT_MODES + (None,)),
                  ("activation", self.activation, ACTIVATION_MODES),
                  ("embedding", self.embedding, ("bibert", "bwn", "sign", None)),
                  ("attention", self.attention, ATTENTION_MODES), ("pooler", self.pooler, ("binary", "bipft", "float")),
                  ("conv_weight", self.conv_weight, CONV_WEIGHT_MODES),
                  ("conv_activation", self.conv_activation, ACTIVATION_MODES), ("stage", self.stage, (1, 2)))
        for field, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"BinaryRecipe.{field} must be one of {allowed}, got {value!r}")
        if self.estimators and self.attention != "elastic":
            raise ValueError("BiPFT's rank-1 estimators (estimators=True) need attention='elastic'")

    def replace(self, **changes) -> "BinaryRecipe":
        return dataclasses.replace(self, **changes)

    def weight_for(self, role: str) -> str:
        return self.attention_weight or self.weight if role == "attention" else self.weight

    # -------------------------------------------------------------- what the shared layers call
    def dense(self, features, *, axes=("embed", "mlp"), axis=-1, use_bias: bool = True, dtype=None,
              param_dtype=jnp.float32, kernel_init=trunc_normal(0.02), bias_init=nn.initializers.zeros_init(),
              name: str | None = None, role: str = "mlp") -> "BinaryDense":
        """The binarized form of ``layers.Dense`` / ``nn.DenseGeneral`` (same arguments, ``axes`` the
        kernel's logical names); ``role``: "attention" (q/k/v/out projections), "mlp" or "pooler"."""
        return BinaryDense(features, recipe=self, role=role, axis=axis, axes=tuple(axes), use_bias=use_bias,
                           dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
                           name=name)

    def embed(self, num_embeddings: int, features: int, *, dtype=None, param_dtype=jnp.float32,
              embedding_init=nn.initializers.normal(0.02), name: str | None = None) -> nn.Module:
        """The word embedding: ``BinaryEmbed`` when ``embedding`` is set, else ``nn.Embed``."""
        if self.embedding is None:
            return nn.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
                            embedding_init=embedding_init, name=name)
        return BinaryEmbed(num_embeddings, features, recipe=self, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=embedding_init, name=name)

    def conv(self, features: int, kernel_size: Sequence[int], *, strides=1, padding: Any = "SAME",
             use_bias: bool = False, dtype=None, param_dtype=jnp.float32,
             kernel_init=nn.initializers.kaiming_normal(), name: str | None = None) -> "BinaryConv":
        """The binarized form of ``layers.Conv`` (NHWC; call it as ``conv(x, train=...)``)."""
        return BinaryConv(features, tuple(kernel_size), recipe=self, strides=strides, padding=padding,
                          use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, name=name)

    def attention_core(self, x, q, k, v, **kwargs) -> jax.Array:
        """The attention of ``MultiHeadAttention(binary=...)`` on its projections q, k, v (B, L, H, D)
        and its input x: the recipe's binarized attention (a child ``bi_attention`` holding its
        parameters), or float softmax attention when ``attention`` is None."""
        if self.attention is None:
            return float_attention(q, k, v, **kwargs)
        return BinaryAttention(self, name="bi_attention")(x, q, k, v, **kwargs)


BIBERT = BinaryRecipe("bibert", weight="bibert", activation="sign", embedding="bibert", attention="bool")
BIPFT = BinaryRecipe("bipft", weight="bwn", activation="elastic", shift=True, embedding="bwn", attention="elastic",
                     estimators=True, pooler="bipft")
BIVIT = BinaryRecipe("bivit", weight="bivit", attention_weight="adaptive", activation="sign_open", attention="sab")
BIPER = BinaryRecipe("biper", conv_weight="sine", conv_activation="approx_sign", omega=20.0, stage=2)
SIGN_STE = BinaryRecipe("sign_ste", weight="sign", activation="sign", embedding="sign", attention="sign_softmax",
                        conv_weight="sign", conv_activation="sign")


# ------------------------------------------------------------------------------------------------
# binarizing a kernel and an input

def binarize_input(x: jax.Array, mode: str | None, alpha: jax.Array | None = None) -> Binarized:
    """``x`` binarized by ``mode`` (``ACTIVATION_MODES``): q (with the gradient), codes, scale."""
    sx = lax.stop_gradient(x)
    if mode == "sign":
        return Binarized(sign_ste(x), jnp.sign(sx), None)
    if mode == "sign_open":
        return Binarized(straight_through(jnp.sign(sx), x, "clip_open"), jnp.sign(sx), None)
    if mode == "approx_sign":
        return Binarized(approx_sign(x), jnp.sign(sx), None)
    if mode == "elastic":
        return Binarized(elastic_binary(x, alpha, True), elastic_codes(x, alpha), elastic_step(alpha).astype(x.dtype))
    if mode is None:
        return Binarized(x, x, None)
    raise ValueError(f"unknown activation binarizer {mode!r}")


def binarize_kernel(kernel: jax.Array, mode: str, n_in: int, group_axis: int | None = None,
                    learned_scale: jax.Array | None = None) -> Binarized:
    """A kernel (in..., out...) binarized by ``mode`` (``WEIGHT_MODES``): row modes take one scale per
    output unit (the mean over the ``n_in`` input axes); "bwn" one per matrix (``group_axis``, if set,
    indexes separate matrices). The scale comes back in the output's shape (input axes dropped)."""
    if mode == "bwn":
        axes = tuple(a for a in range(kernel.ndim) if a != group_axis)
        b = bwn_parts(kernel, axes, axes)
    else:
        if learned_scale is not None:
            learned_scale = learned_scale.reshape((1,) * n_in + learned_scale.shape)
        b = row_binary_parts(kernel, tuple(range(n_in)), mode, learned_scale)
    return Binarized(b.q, b.codes, b.scale.reshape(b.scale.shape[n_in:]))


def _contract(a, w, n_in: int):
    return lax.dot_general(a, w, ((tuple(range(a.ndim - n_in, a.ndim)), tuple(range(n_in))), ((), ())),
                           precision=lax.Precision.HIGHEST)


def _mul(scale_a, scale_b):
    return scale_b if scale_a is None else (scale_a if scale_b is None else scale_a * scale_b)


def _scalar_init(fn):
    return lambda rng, *args: fn()


# ------------------------------------------------------------------------------------------------
# layers

class BinaryDense(nn.Module):
    """A binarized ``nn.DenseGeneral`` over the trailing ``axis`` dims: y = (A_b ⊗ W_b)·s + bias.

    ``features``: int or tuple; ``axes``: the kernel's logical names (input axes then output axes). A
    leading output axis without a logical name (the 3 of a fused q/k/v kernel (embed, 3, heads, kv))
    indexes separate matrices: each gets its own layerwise scale, shift and step size, as the official
    separate linears do. Parameters: ``kernel``, ``bias`` (the float layer's), plus ``shift`` (BiPFT),
    ``act_scale`` (elastic α), ``weight_scale`` (BiViT's learnable s). Packed (``recipe.packed``):
    ``kernel_bits`` uint32 (outputs, ceil(inputs/32)) and ``kernel_scale`` replace the kernel.
    """

    features: int | Sequence[int]
    recipe: BinaryRecipe
    role: str = "mlp"
    axis: int | Sequence[int] = -1
    axes: tuple[str | None, ...] = ("embed", "mlp")
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = trunc_normal(0.02)
    bias_init: Callable = nn.initializers.zeros_init()

    def layout(self, ndim: int):
        """(features, n_in, grouped) for an input of rank ``ndim``."""
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        n_in = len(axis)
        if sorted(a % ndim for a in axis) != list(range(ndim - n_in, ndim)):
            raise ValueError(f"BinaryDense contracts the trailing input axes; got axis={self.axis} for rank {ndim}")
        if len(self.axes) != n_in + len(features):
            raise ValueError(f"axes {self.axes} must name the {n_in} input and {len(features)} output axes")
        grouped = len(features) == 3 and self.axes[n_in] is None
        return features, n_in, grouped

    def scale_shape(self, features, grouped):
        if self.recipe.weight_for(self.role) == "bwn":
            return (features[0],) + (1,) * (len(features) - 1) if grouped else ()
        return features

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        recipe = self.recipe
        features, n_in, grouped = self.layout(x.ndim)
        in_shape, in_names = x.shape[-n_in:], self.axes[:n_in]
        wmode, amode = recipe.weight_for(self.role), recipe.activation
        groups = features[0] if grouped else 1
        per_group = grouped and (recipe.shift or amode == "elastic")
        gshape, gnames = ((groups,), (None,)) if per_group else ((), ())
        inputs = [x] * groups
        if recipe.shift:
            shift = self.param("shift", logical(nn.initializers.zeros_init(), gnames + in_names), gshape + in_shape,
                               self.param_dtype)
            inputs = [x + (shift[g] if per_group else shift).astype(x.dtype) for g in range(groups)]
        alpha = None
        if amode == "elastic":
            init = (lambda: jnp.stack([elastic_init(t) for t in inputs])) if per_group else (lambda: elastic_init(inputs[0]))
            alpha = self.param("act_scale", logical(_scalar_init(init), gnames))
        if recipe.packed:
            n, outputs = math.prod(in_shape), math.prod(features)
            bits = self.param("kernel_bits", nn.initializers.zeros_init(), (outputs, bp.num_words(n)), jnp.uint32)
            wscale = self.param("kernel_scale", nn.initializers.ones_init(), self.scale_shape(features, grouped),
                                self.param_dtype)
            weight = None
        else:
            kernel = self.param("kernel", logical(self.kernel_init, self.axes), in_shape + features, self.param_dtype)
            learned = None
            if wmode == "adaptive":
                learned = self.param("weight_scale", logical(_scalar_init(
                    lambda: jnp.mean(jnp.abs(kernel), axis=tuple(range(n_in)))), self.axes[n_in:]))
            weight = binarize_kernel(kernel, wmode, n_in, n_in if grouped else None, learned)
        outs = []
        for g in range(groups):
            xb = binarize_input(inputs[g], amode, alpha[g] if per_group else alpha)
            sel = (lambda t: t[(slice(None),) * n_in + (g,)]) if grouped else (lambda t: t)  # noqa: E731
            if weight is None:
                rows = bits.reshape(groups, -1, bits.shape[-1])[g] if grouped else bits
                ws = wscale[g] if grouped else wscale
                outs.append(self._packed_product(xb, rows, ws, in_shape, features[1:] if grouped else features))
            else:
                ws = weight.scale[g] if grouped else weight.scale
                outs.append(binary_product(functools.partial(_contract, n_in=n_in), xb.q, sel(weight.q), xb.codes,
                                           sel(weight.codes), _mul(xb.scale, ws)))
        y = jnp.stack(outs, axis=x.ndim - n_in) if grouped else outs[0]
        if self.use_bias:
            bias = self.param("bias", logical(self.bias_init, self.axes[n_in:]), features, self.param_dtype)
            y = y + bias
        return y.astype(self.dtype or jnp.result_type(x.dtype, self.param_dtype))

    def _packed_product(self, xb: Binarized, rows, wscale, in_shape, out_shape):
        batch = xb.codes.shape[: xb.codes.ndim - len(in_shape)]
        n = math.prod(in_shape)
        scale = _mul(xb.scale, wscale)
        if self.recipe.activation is None:  # float inputs, 1-bit weights
            wc = bp.unpack_bits(rows, n).T.reshape(in_shape + out_shape)
            return binary_product(functools.partial(_contract, n_in=len(in_shape)), xb.q, wc, xb.codes, wc, scale)
        dots = bp.xnor_matmul(*bp.pack_ternary(xb.codes.reshape(batch + (n,))), rows)
        return dots.astype(jnp.float32).reshape(batch + out_shape) * scale

    def packed_params(self, params: dict) -> dict:
        """This layer's packed parameters from its float ones (see :func:`pack`)."""
        kernel = jnp.asarray(params["kernel"])
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        n_in = kernel.ndim - len(features)
        grouped = len(features) == 3 and self.axes[n_in] is None
        wb = _jit_binarize_kernel(kernel, self.recipe.weight_for(self.role), n_in, n_in if grouped else None,
                                  params.get("weight_scale"))
        codes = wb.codes.reshape(math.prod(kernel.shape[:n_in]), -1).T
        rest = {k: v for k, v in params.items() if k not in ("kernel", "weight_scale")}
        return {**rest, "kernel_bits": bp.pack_bits(codes),
                "kernel_scale": wb.scale.reshape(self.scale_shape(features, grouped)).astype(kernel.dtype)}


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _jit_binarize_kernel(kernel, mode, n_in, group_axis, learned):
    b = binarize_kernel(kernel, mode, n_in, group_axis, learned)
    return Binarized(b.codes, b.codes, b.scale)


class BinaryEmbed(nn.Module):
    """A binarized word embedding (``nn.Embed``'s ``embedding`` parameter, rows binarized by
    ``recipe.embedding``: "bibert" rowmean|W|·sign(W − rowmean W), "bwn" ‖W_r‖₁/n·sign(W_r − mean W),
    "sign" rowmean|W|·sign(W)). ``attend`` (a tied decoder) reads the float table, as the official
    tied decoders do. Packed: ``embedding_bits`` (vocab, ceil(features/32)) and ``embedding_scale``."""

    num_embeddings: int
    features: int
    recipe: BinaryRecipe
    dtype: Any = None
    param_dtype: Any = jnp.float32
    embedding_init: Callable = nn.initializers.normal(0.02)

    def setup(self):
        if self.recipe.packed:
            self.bits = self.param("embedding_bits", nn.initializers.zeros_init(),
                                   (self.num_embeddings, bp.num_words(self.features)), jnp.uint32)
            self.scale = self.param("embedding_scale", nn.initializers.ones_init(), (self.num_embeddings, 1),
                                    self.param_dtype)
        else:
            self.embedding = self.param("embedding", logical(self.embedding_init, ("vocab", "embed")),
                                        (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        dtype = self.dtype or self.param_dtype
        if self.recipe.packed:
            codes = bp.unpack_bits(jnp.take(self.bits, ids, axis=0), self.features, self.param_dtype)
            return (codes * jnp.take(self.scale, ids, axis=0)).astype(dtype)
        return jnp.take(binarize_table(self.embedding, self.recipe.embedding).q, ids, axis=0).astype(dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        if self.recipe.packed:
            raise ValueError("the packed word embedding holds only bits: a tied decoder (MLM head) reads the float "
                             "table; pack a model without an MLM head (head=None, 'embedding', 'classification'...)")
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        return jnp.dot(x.astype(dtype), self.embedding.astype(dtype).T)

    def packed_params(self, params: dict) -> dict:
        b = _jit_table(jnp.asarray(params["embedding"]), self.recipe.embedding)
        return {"embedding_bits": bp.pack_bits(b.codes), "embedding_scale": b.scale}


def binarize_table(table: jax.Array, mode: str) -> Binarized:
    """An embedding table (vocab, features) binarized row by row (see ``BinaryEmbed``)."""
    if mode == "bwn":  # BiPFT embed_layerwise=False: per-row L1 scale, whole-table mean
        b = bwn_parts(table, scale_axes=(1,), center_axes=None)
        return b
    return row_binary_parts(table, (1,), mode)


@functools.partial(jax.jit, static_argnums=(1,))
def _jit_table(table, mode):
    b = binarize_table(table, mode)
    return Binarized(b.codes, b.codes, b.scale)


class BinaryConv(nn.Module):
    """A binarized NHWC convolution: out = conv(A_b, W_b)·s (+ bias).

    BiPer (``recipe.conv_weight="sine"``): W_b = sin(ωW) (stage 1, real) or sign(sin(ωW)) (stage 2,
    gradient ω·cos(ωW)); A_b = ApproxSign(a / √(var(a) + 1e-5)) with the per-sample unbiased variance
    over (H, W, C) in training only (it changes no sign, only the gradient scale); s = ``alpha``, a
    learnable per-channel scale initialised uniform in [0, 1) (``torch.rand``). Other weight modes take
    their own scale (per output channel / per kernel) and no ``alpha``. Packed: ``kernel_bits``
    (out, kh·kw, ceil(in/32)) (+ ``kernel_scale``) replace the kernel."""

    features: int
    kernel_size: tuple[int, int]
    recipe: BinaryRecipe
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.kaiming_normal()
    takes_train = True  # ResNet's conv seam calls it as conv(x, train=train)

    def _geometry(self, x_shape):
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        padding = self.padding
        if isinstance(padding, int):
            padding = [(padding, padding)] * 2
        elif isinstance(padding, str):
            padding = lax.padtype_to_pads(x_shape[1:3], self.kernel_size, strides, padding)
        return strides, [tuple(p) for p in padding]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"BinaryConv takes NHWC images (B, H, W, C); got shape {x.shape}")
        recipe, cin = self.recipe, x.shape[-1]
        strides, padding = self._geometry(x.shape)
        sine = recipe.conv_weight == "sine"
        if sine and recipe.normalize_conv_input and train:
            x = x / jnp.sqrt(jnp.var(x, axis=(1, 2, 3), ddof=1, keepdims=True) + 1e-5)
        xb = binarize_input(x, recipe.conv_activation)
        op = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=padding,
                               dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)
        if recipe.packed:
            if recipe.conv_activation is None:
                raise ValueError("packed convolutions need binary inputs (conv_activation set)")
            taps = self.kernel_size[0] * self.kernel_size[1]
            bits = self.param("kernel_bits", nn.initializers.zeros_init(), (self.features, taps, bp.num_words(cin)),
                              jnp.uint32)
            wscale = None if sine else self.param("kernel_scale", nn.initializers.ones_init(),
                                                  self._scale_shape(), self.param_dtype)
            y = bp.xnor_conv(*bp.pack_ternary(xb.codes), bits, self.kernel_size, strides, padding).astype(jnp.float32)
            scale = _mul(xb.scale, wscale)
            y = y if scale is None else y * scale
        else:
            kernel = self.param("kernel", logical(self.kernel_init, (None, None, "conv_in", "conv_out")),
                                self.kernel_size + (cin, self.features), self.param_dtype)
            wb = self._binarize(kernel)
            y = binary_product(op, xb.q, wb.q, xb.codes, wb.codes, _mul(xb.scale, wb.scale))
        if sine:
            alpha = self.param("alpha", logical(nn.initializers.uniform(1.0), ("conv_out",)), (self.features,),
                               self.param_dtype)
            y = y * alpha
        if self.use_bias:
            y = y + self.param("bias", logical(nn.initializers.zeros_init(), ("conv_out",)), (self.features,),
                               self.param_dtype)
        return y.astype(self.dtype or jnp.result_type(x.dtype, self.param_dtype))

    def _scale_shape(self):
        return () if self.recipe.conv_weight == "bwn" else (self.features,)

    def _binarize(self, kernel) -> Binarized:
        recipe = self.recipe
        if recipe.conv_weight == "sine":
            if recipe.stage == 1:
                w = sine_weight(kernel, recipe.omega)
                return Binarized(w, w, None)
            return Binarized(sine_sign(kernel, recipe.omega), weight_sign(jnp.sin(recipe.omega * lax.stop_gradient(kernel))),
                             None)
        return binarize_kernel(kernel, recipe.conv_weight, 3)

    def packed_params(self, params: dict) -> dict:
        recipe = self.recipe
        if recipe.conv_weight == "sine" and recipe.stage == 1:
            raise ValueError("BiPer stage-1 weights are real-valued (sin(ωW)); train or convert to stage 2 "
                             "(recipe.replace(stage=2)) before packing")
        kernel = jnp.asarray(params["kernel"])
        if recipe.conv_weight == "sine":
            codes, scale = weight_sign(jnp.sin(recipe.omega * kernel)), None
        else:
            b = _jit_binarize_kernel(kernel, recipe.conv_weight, 3, None, None)
            codes, scale = b.codes, b.scale
        kh, kw, cin, cout = kernel.shape
        bits = bp.pack_bits(jnp.transpose(codes, (3, 0, 1, 2)).reshape(cout, kh * kw, cin))
        out = {k: v for k, v in params.items() if k != "kernel"}
        out["kernel_bits"] = bits
        if scale is not None:
            out["kernel_scale"] = scale.reshape(self._scale_shape()).astype(kernel.dtype)
        return out


BINARY_LAYERS = (BinaryDense, BinaryConv, BinaryEmbed)


# ------------------------------------------------------------------------------------------------
# whole-model transforms

def _recipe_fields(module: nn.Module) -> dict[str, tuple[BinaryRecipe, str | None]]:
    """Fields holding a recipe, or one of its factories (ResNet's ``conv=BIPER.conv`` seam):
    name -> (recipe, the factory's name or None)."""
    out = {}
    for f in dataclasses.fields(module):
        value = getattr(module, f.name, None)
        if isinstance(value, BinaryRecipe):
            out[f.name] = (value, None)
        elif isinstance(getattr(value, "__self__", None), BinaryRecipe):
            out[f.name] = (value.__self__, value.__name__)
    return out


def binarize(module: nn.Module, recipe: BinaryRecipe) -> nn.Module:
    """``module`` with its ``binary`` field set to ``recipe`` (the models and layers that have a binary
    form: Bert, VisionTransformer, the BiPer CIFAR nets, MultiHeadAttention, Mlp, TransformerBlock...)."""
    if not isinstance(recipe, BinaryRecipe):
        raise TypeError(f"recipe must be a BinaryRecipe (BIBERT, BIPFT, BIVIT, BIPER, SIGN_STE...), got {recipe!r}")
    fields = {f.name for f in dataclasses.fields(module)}
    if "binary" not in fields and "conv" in fields and type(module).__name__ == "ResNet":
        return module.clone(conv=recipe.conv)  # ResNet's seam: the residual branches' convolutions
    if "binary" not in fields:
        raise TypeError(f"{type(module).__name__} has no binary form (no 'binary' field): the binarizable modules are "
                        "Bert, VisionTransformer, SwinTransformer, ResNet (its conv seam), ResNetCifar, VGGSmall and "
                        "the layers MultiHeadAttention, Mlp, TransformerBlock, SwinBlock")
    return module.clone(binary=recipe)


def binary_layers(module: nn.Module, variables: Any, *inputs, **kwargs) -> dict[tuple[str, ...], nn.Module]:
    """The binarized layers ``module`` calls on ``inputs`` (default: ``registry.example_inputs``),
    keyed by their parameter path; traced with ``jax.eval_shape`` (nothing computed)."""
    if not inputs:
        from jaxformers.registry import example_inputs

        inputs = example_inputs(module, 1)
    found: dict[tuple[str, ...], nn.Module] = {}

    def record(next_fun, args, kw, context):
        if isinstance(context.module, BINARY_LAYERS) and context.method_name == "__call__":
            found[tuple(context.module.scope.path)] = context.module
        return next_fun(*args, **kw)

    def run(v):
        with nn.intercept_methods(record):
            return module.apply(v, *inputs, **kwargs)

    jax.eval_shape(run, variables)
    return found


def pack(module: nn.Module, variables: Any, *inputs, **kwargs) -> tuple[nn.Module, dict]:
    """``(packed_module, packed_variables)``: every binarized weight as uint32 bit planes plus its
    scale, the rest unchanged; the packed module's binary linears, convolutions and attention products
    run as XNOR + popcount and give the float simulation's outputs bit for bit. ``inputs`` (default:
    the model's example inputs) only trace which layers the model calls."""
    recipes = _recipe_fields(module)
    if not recipes:
        raise ValueError(f"{type(module).__name__} is not binarized: it has no BinaryRecipe field; build it with "
                         f"binary=BIBERT / BIPFT / BIVIT / BIPER (jaxformers.compress.binary) before packing")
    if any(r.packed for r, _ in recipes.values()):
        raise ValueError(f"{type(module).__name__} is already packed")
    layers = binary_layers(module, variables, *inputs, **kwargs)
    if not layers:
        raise ValueError(f"{type(module).__name__} calls no binarized layer on these inputs; nothing to pack")
    params = _copy_tree(nn.unbox(variables["params"]))
    for path, layer in sorted(layers.items()):
        node = params
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = layer.packed_params(node[path[-1]])
    packed = module.clone(**{name: r.replace(packed=True) if method is None else getattr(r.replace(packed=True), method)
                             for name, (r, method) in recipes.items()})
    return packed, {**variables, "params": params}


def _copy_tree(tree):
    return {k: _copy_tree(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def packed_nbytes(variables: Any) -> int:
    """Bytes of the ``params`` (bit planes at 4 bytes a word, everything else at its float width)."""
    return bp.nbytes(nn.unbox(variables["params"]))


def calibrate(module: nn.Module, variables: Any, *args, rng: jax.Array | None = None, **kwargs) -> dict:
    """``variables`` completed for a binarized ``module``: parameters it lacks (a float checkpoint
    loaded into a binarized host: shifts, estimators, BiPFT's pooler norm) are initialised, and the
    data-initialised scales (elastic α = 2·mean|x| / 4·mean|p|, BiViT's s = rowmean|W|) are (re)taken
    on this forward, as the official first forward does. ``args`` / ``kwargs`` go to ``apply``."""

    def strip(tree):
        return {k: strip(v) for k, v in tree.items() if k not in LAZY_SCALES} if hasattr(tree, "items") else tree

    params = strip(nn.unbox(variables["params"]))
    rest = {k: v for k, v in variables.items() if k != "params"}
    rng = jax.random.key(0) if rng is None else rng
    _, new = jax.jit(lambda p, *a: module.apply({**rest, "params": p}, *a, mutable=["params"], rngs={"params": rng},
                                                **kwargs))(params, *args)
    return {**variables, "params": nn.unbox(new["params"])}


# ------------------------------------------------------------------------------------------------
# BiPer's training extras

def biper_penalty(params: Any, paths: Sequence[tuple[str, ...]], omega: float = 20.0, tau: float = 1.0) -> jax.Array:
    """τ·Σ_layers mean(sin²(ωW)) = τ·Σ mean(0.5 − 0.5·cos(2ωW)) over the kernels at ``paths`` (the
    BinaryConv layers, e.g. ``binary_layers(module, variables).keys()``): BiPer's regularizer, which
    pulls weights toward the square wave's plateaus."""
    total = jnp.zeros((), jnp.float32)
    for path in paths:
        node = params
        for key in path:
            node = node[key]
        w = node["kernel"]
        total = total + jnp.mean(0.5 - 0.5 * jnp.cos(2.0 * omega * w))
    return tau * total


def biper_tau(epoch: float, epochs: float, tau_min: float, tau_max: float) -> float:
    """BiPer's ``cpt_tau``: A·e^(epoch/epochs) + B rising from tau_min (epoch 0) to tau_max (the end)."""
    a = (tau_max - tau_min) / (math.e - 1)
    return float(a * math.exp(epoch / epochs) + tau_min - a)

