"""SVT: the Scattering Vision Transformer (SVT-H-S / B / L).

Paper: "Scattering Vision Transformer: Spectral Mixing Matters", Badri N. Patro, Vijay S.
Agneeswaran, NeurIPS 2023, arXiv 2311.01310. Official code: badripatro/svt (``svt.py``,
``configs/svt/svt_{s,b,l}.py``, ``loss/cross_entropy.py``); parameter names follow it so its state
dicts convert one to one (``convert_svt``).

Architecture (the official ``SVT`` class, ``svt_s/b/l``):

- Stem (stage 1, stride 4): conv 7x7 s2 -> BN -> ReLU -> (conv 3x3 -> BN -> ReLU) x 2 (no biases,
  ``stem_hidden_dim`` wide) -> conv 3x3 s2 (bias) -> LayerNorm. Stages 2-4 start with conv 3x3 s2
  + LayerNorm. LayerNorms use eps 1e-6.
- Blocks: x + DropPath(mixer(LN(x))), x + DropPath(FFN(LN(x))), FFN = fc1 -> depthwise 3x3 ->
  GELU -> fc2 (PVTv2's). The mixer of stage 1 (``alpha = 1`` in the official code:
  ``num_scatter_stages``) is the **scattering / spectral gating network** (``SVT_channel_mixing``):
  a level-1 DTCWT with ``near_sym_b`` filters (``jaxformers.layers.wavelets``); the undecimated
  lowpass is multiplied elementwise by a learned (H, W, C) weight (``complex_weight_ll``), the six
  complex highpass orientations go through a 2-layer complex MLP over channels split into 4
  blocks, written as Einstein multiplications ``einsum('...bd,bdk->...bk')`` (real and imaginary
  parts: (a + ib)(W_r + iW_i), ReLU after the first layer, biases), then the inverse DTCWT.
  Stages 2-4 use multi-head self-attention with separate ``q`` and ``kv`` projections (the
  official ``sr_ratios`` are passed but unused: no spatial reduction).
- Each stage but the last ends with a LayerNorm (``norm1..3``). After stage 4 the mean of the
  tokens is prepended as a class token and one class-attention block (``post_network``: the class
  token attends to all tokens, then an MLP; CaiT's) updates it; ``norm4`` normalises all tokens.
- Heads: ``head`` on the class token and, with ``token_label=True`` (the released SVT-H models,
  trained with token labelling, Jiang et al., "All Tokens Matter", arXiv 2104.10858), ``aux_head`` on
  every patch token. Inference logits = head(cls) + 0.5 * max over tokens of aux_head(tokens), as
  the official ``forward`` in eval mode.

Training with token labels: ``model.apply(v, x, train=True, token_labels=True, rngs={"dropout": k})``
returns a :class:`TokenLabelOutput` (class logits, per-token logits (B, h, w, K), the MixToken box)
with the official MixToken (a random box, in units of 8 stage-1 tokens, swapped with the flipped
batch after the stem and swapped back on the per-token logits); :func:`token_label_loss` is the
official ``TokenLabelCrossEntropy`` (class weight 1.0, dense weight 0.5 as ``main.py``'s defaults).
Without dense token labels (the official runs used NFNet-F6 top-5 maps of ImageNet, not shipped)
every token's target is the image label, which is what that loss does for plain labels.

Dense-feature contract (``jaxformers.layers.features``): ``forward_features`` gives
``{4: norm1(stage 1), 8: norm2(stage 2), 16: norm3(stage 3), 32: norm4(stage-4 patch tokens)}``, the
maps the next stage (or the heads) read; ``pre_logits`` the normed class token (B, D).

Deviations from the official code: images are NHWC. The official mixer only defines its weights for
widths 64, 96, 128 and 192 at 224 px; ours sizes ``complex_weight_ll`` from the model's ``img_size``
(stage-1 resolution img_size / 4) and takes any width divisible by 4 (``num_blocks``), so the model
is built for one input size like a ViT with a position table. ``__call__`` without
``token_labels`` gives the inference logits in training mode as well (classification tasks train
them with cross-entropy); the dense labels of the paper's recipe need ``token_labels=True``.
Parameter counts equal the official code's (22,052,592 / 32,878,544 / 54,594,000 with the
token-label head, 1000 classes).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import (StateDict, batch_norm_params, conv2d, dense_params, heads_in, heads_out,
                                       norm_params, qkv_fused)
from jaxformers.layers import BatchNorm, Conv, Dense, DropPath, LayerNorm, Mlp, MultiHeadAttention, check_image, gelu
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.layers.linear import logical
from jaxformers.layers.wavelets import biort_filters, dtcwt_forward, dtcwt_inverse, qshift_filters
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

MAP_AXES = ("act_batch", None, None, "act_embed")
# official _init_weights: conv weights N(0, sqrt(2 / fan_out)), fan_out = k*k*out/groups
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
MIX_TOKEN_SCALE = 8  # stage-1 tokens per final token along each side (official ``pooling_scale``)


class SpectralGatingNetwork(nn.Module):
    """The scattering mixer (official ``SVT_channel_mixing``) on an NHWC map (B, H, W, C): DTCWT level 1,
    lowpass * ``complex_weight_ll`` (H, W, C), highpass through the complex Einstein-multiplication MLP
    over ``num_blocks`` channel blocks, inverse DTCWT. Runs in float32 (as the official ``x.float()``)."""

    num_blocks: int = 4
    biort: str = "near_sym_b"
    qshift: str = "qshift_b"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if c % self.num_blocks:
            raise ValueError(f"the spectral gating network splits channels into num_blocks={self.num_blocks}; "
                             f"width {c} is not divisible by it")
        if h % 2 or w % 2:
            raise ValueError(f"the spectral gating network needs an even map size; got {h}x{w}")
        nb, bs = self.num_blocks, c // self.num_blocks
        init = nn.initializers.normal(0.02)
        ll = self.param("complex_weight_ll", logical(init, (None, None, "embed")), (h, w, c), self.param_dtype)
        w1 = self.param("complex_weight_lh_1", logical(init, (None,) * 4), (2, nb, bs, bs), self.param_dtype)
        w2 = self.param("complex_weight_lh_2", logical(init, (None,) * 4), (2, nb, bs, bs), self.param_dtype)
        b1 = self.param("complex_weight_lh_b1", logical(init, (None,) * 3), (2, nb, bs), self.param_dtype)
        b2 = self.param("complex_weight_lh_b2", logical(init, (None,) * 3), (2, nb, bs), self.param_dtype)
        dtype = x.dtype
        low, (high,) = dtcwt_forward(x.astype(jnp.float32), 1, self.biort, self.qshift)
        low = low * ll.astype(jnp.float32)
        re = high[..., 0].reshape(b, h // 2, w // 2, 6, nb, bs)
        im = high[..., 1].reshape(b, h // 2, w // 2, 6, nb, bs)

        def mul(a, weight):  # the paper's Einstein multiplication, per channel block
            return jnp.einsum("...bd,bdk->...bk", a, weight.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)

        re1 = nn.relu(mul(re, w1[0]) - mul(im, w1[1]) + b1[0])
        im1 = nn.relu(mul(re, w1[1]) + mul(im, w1[0]) + b1[1])
        re2 = mul(re1, w2[0]) - mul(im1, w2[1]) + b2[0]
        im2 = mul(re1, w2[1]) + mul(im1, w2[0]) + b2[1]
        high = jnp.stack([re2, im2], axis=-1).reshape(b, h // 2, w // 2, 6, c, 2)
        return dtcwt_inverse(low, [high], self.biort, self.qshift).astype(dtype)


class DepthwiseConvMlp(nn.Module):
    """PVTv2's FFN (official ``PVT2FFN``): fc1 -> depthwise 3x3 (``dwconv``) -> GELU -> fc2, on NHWC maps."""

    hidden_features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c, hidden = x.shape[-1], self.hidden_features
        x = Dense(hidden, axes=("embed", "mlp"), name="fc1", **kw)(x)
        x = Conv(hidden, (3, 3), padding=1, feature_group_count=hidden, axes=(None, "mlp"), kernel_init=CONV_INIT,
                 name="dwconv", **kw)(x)
        x = gelu(x)
        return Dense(c, axes=("mlp", "embed"), name="fc2", **kw)(x)


class SVTBlock(nn.Module):
    """x + DropPath(mixer(LN(x))), x + DropPath(FFN(LN(x))) on an NHWC map; the mixer is the spectral
    gating network (``scatter=True``) or multi-head self-attention with ``q`` / ``kv`` projections."""

    num_heads: int
    mlp_ratio: float
    scatter: bool
    drop_path: float = 0.0
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = LayerNorm(1e-6, name="norm1", **kw)(x)
        if self.scatter:
            y = SpectralGatingNetwork(param_dtype=self.param_dtype, name="attn")(y)
        else:
            t = y.reshape(b, h * w, c)
            y = MultiHeadAttention(self.num_heads, attention_impl=self.attention_impl, name="attn", **kw)(t, t)
            y = y.reshape(b, h, w, c)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = DepthwiseConvMlp(int(c * self.mlp_ratio), name="mlp", **kw)(LayerNorm(1e-6, name="norm2", **kw)(x))
        x = x + DropPath(self.drop_path)(y, train=train)
        return constrain(x, MAP_AXES)


class ClassAttentionBlock(nn.Module):
    """CaiT's class-attention block (official ``ClassBlock``): the class token (first) attends to all
    tokens, then an MLP on the class token; the other tokens pass unchanged."""

    num_heads: int
    mlp_ratio: float
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cls = x[:, :1]
        y = LayerNorm(1e-6, name="norm1", **kw)(x)
        cls = cls + MultiHeadAttention(self.num_heads, name="attn", **kw)(y[:, :1], y)
        cls = cls + Mlp(int(x.shape[-1] * self.mlp_ratio), name="mlp", **kw)(LayerNorm(1e-6, name="norm2", **kw)(cls))
        return jnp.concatenate([cls, x[:, 1:]], axis=1)


class TokenLabelOutput(NamedTuple):
    """What a token-labelling training step reads: class logits (B, K), per-token logits (B, h, w, K)
    (MixToken undone), and the MixToken box (x1, y1, x2, y2) in token units (all zero: no mixing)."""

    logits: jax.Array
    token_logits: jax.Array
    box: jax.Array


def mix_token_box(rng: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """The official ``rand_bbox`` for MixToken: lam ~ Beta(1, 1), a box of side floor(side * sqrt(1 - lam))
    centred at a uniform random token, clipped to the grid; (x1, y1, x2, y2) int32, x along the height."""
    k_lam, k_x, k_y = jax.random.split(rng, 3)
    lam = jax.random.uniform(k_lam)
    cut = jnp.sqrt(1.0 - lam)
    sizes = jnp.asarray(grid, jnp.float32)
    half = jnp.floor(sizes * cut).astype(jnp.int32) // 2
    centre = jnp.stack([jax.random.randint(k_x, (), 0, grid[0]), jax.random.randint(k_y, (), 0, grid[1])])
    lo = jnp.clip(centre - half, 0, jnp.asarray(grid))
    hi = jnp.clip(centre + half, 0, jnp.asarray(grid))
    return jnp.stack([lo[0], lo[1], hi[0], hi[1]]).astype(jnp.int32)


def _box_mask(box: jax.Array, grid: tuple[int, int], scale: int) -> jax.Array:
    """(H, W) bool: inside ``box`` (token units) on a map ``scale`` times finer than the token grid."""
    rows = jnp.arange(grid[0] * scale) // scale
    cols = jnp.arange(grid[1] * scale) // scale
    return (((rows >= box[0]) & (rows < box[2]))[:, None] & ((cols >= box[1]) & (cols < box[3]))[None, :])


def token_label_loss(out: TokenLabelOutput, labels: jax.Array, dense_labels: jax.Array | None = None, *,
                     cls_weight: float = 1.0, dense_weight: float = 0.5) -> jax.Array:
    """The official ``TokenLabelCrossEntropy``: soft-target cross-entropy of the class logits against
    ``labels`` (B, K) (mixed with the flipped batch by the MixToken area, lam = 1 - box area / tokens) plus
    ``dense_weight`` x that of every token's logits against ``dense_labels`` (B, h, w, K), or the image
    label when there are no dense labels."""
    b, h, w, k = out.token_logits.shape
    if labels.shape != (b, k):
        raise ValueError(f"labels must be soft targets (batch, classes) = {(b, k)}; got {labels.shape}")
    if dense_labels is None:
        dense_labels = jnp.broadcast_to(labels[:, None, None, :], (b, h, w, k))
    elif dense_labels.shape != (b, h, w, k):
        raise ValueError(f"dense_labels must be (batch, {h}, {w}, {k}) like the token logits; got {dense_labels.shape}")
    x1, y1, x2, y2 = out.box
    lam = 1.0 - ((x2 - x1) * (y2 - y1)).astype(jnp.float32) / (h * w)
    target = lam * labels + (1.0 - lam) * labels[::-1]

    def ce(logits, t):
        return jnp.mean(jnp.sum(-t * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1))

    return cls_weight * ce(out.logits, target) + dense_weight * ce(out.token_logits, dense_labels)


class SVT(FeatureBackbone):
    """Scattering Vision Transformer: conv stem, 4 stages (spectral gating in the first
    ``num_scatter_stages``, attention after), class-attention head, optional token-label head."""

    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    stem_hidden_dim: int = 32
    embed_dims: Sequence[int] = (64, 128, 320, 448)
    num_heads: Sequence[int] = (2, 4, 10, 14)
    mlp_ratios: Sequence[float] = (8, 8, 4, 4)
    depth: Sequence[int] = (3, 4, 6, 3)
    num_scatter_stages: int = 1
    token_label: bool = True
    drop_path_rate: float = 0.0
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def num_features(self) -> int:
        return self.embed_dims[-1]

    def _validate(self) -> tuple[int, int]:
        if not (len(self.embed_dims) == len(self.num_heads) == len(self.mlp_ratios) == len(self.depth) == 4):
            raise ValueError(f"embed_dims, num_heads, mlp_ratios and depth need 4 entries (one per stage); got "
                             f"{self.embed_dims}, {self.num_heads}, {self.mlp_ratios}, {self.depth}")
        h, w = (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)
        if h % 32 or w % 32:
            raise ValueError(f"SVT needs img_size divisible by 32 (4 stages of stride 2 after a stride-4 stem, even "
                             f"maps for the wavelet transform); got {h}x{w}")
        return h, w

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits", token_labels: bool = False):
        """Logits (B, num_classes): head(cls) [+ 0.5 * max_tokens aux_head(tokens) with ``token_label``];
        ``output`` selects the dense-feature contract's other outputs (module docstring). With
        ``token_labels=True`` returns a :class:`TokenLabelOutput` (MixToken in training: rng ``dropout``)."""
        check_output(output, "SVT")
        img = self._validate()
        check_image(x, in_chans=self.in_chans, img_size=img)
        if token_labels and not (self.token_label and self.num_classes):
            raise ValueError("token_labels=True needs a model built with token_label=True and num_classes > 0")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = x.shape[0]
        hid = self.stem_hidden_dim
        for i, s in enumerate((2, 1, 1)):
            x = Conv(hid, (7, 7) if i == 0 else (3, 3), strides=s, padding=3 if i == 0 else 1, use_bias=False,
                     kernel_init=CONV_INIT, name=f"patch_embed1_conv{i}", **kw)(x)
            x = nn.relu(BatchNorm(train=train, name=f"patch_embed1_bn{i}", **kw)(x))
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depth))
        features, n, box = {}, 0, jnp.zeros((4,), jnp.int32)
        grid = None
        for s in range(4):
            x = Conv(self.embed_dims[s], (3, 3), strides=2, padding=1, kernel_init=CONV_INIT,
                     name=f"patch_embed{s + 1}_proj", **kw)(x)
            x = LayerNorm(1e-6, name=f"patch_embed{s + 1}_norm", **kw)(x)
            if s == 0 and token_labels:
                grid = (x.shape[1] // MIX_TOKEN_SCALE, x.shape[2] // MIX_TOKEN_SCALE)
                if train:
                    box = mix_token_box(self.make_rng("dropout"), grid)
                    x = jnp.where(_box_mask(box, grid, MIX_TOKEN_SCALE)[None, :, :, None], x[::-1], x)
            for j in range(self.depth[s]):
                x = SVTBlock(self.num_heads[s], self.mlp_ratios[s], s < self.num_scatter_stages, float(rates[n]),
                             self.attention_impl, name=f"block{s + 1}_{j}", **kw)(x, train)
                n += 1
            if s < 3:
                x = LayerNorm(1e-6, name=f"norm{s + 1}", **kw)(x)
                features[4 * 2 ** s] = x
        _, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        tokens = ClassAttentionBlock(self.num_heads[-1], self.mlp_ratios[-1], name="post_network_0", **kw)(tokens)
        tokens = LayerNorm(1e-6, name="norm4", **kw)(tokens)
        features[32] = tokens[:, 1:].reshape(b, h, w, c)
        if output == "features":
            return features
        pooled = tokens[:, 0]
        logits = pooled
        if self.num_classes:
            dense = dict(axes=("embed", "classes"), **kw)
            logits = Dense(self.num_classes, name="head", **dense)(pooled)
            if self.token_label:
                aux = Dense(self.num_classes, name="aux_head", **dense)(features[32])
                if token_labels:
                    if train:
                        aux = jnp.where(_box_mask(box, grid, 1)[None, :, :, None], aux[::-1], aux)
                    return TokenLabelOutput(logits, aux, box)
                logits = logits + 0.5 * aux.max(axis=(1, 2))
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# Official checkpoint converter (badripatro/svt ``SVT.state_dict()``)


def _check_filters(sd: StateDict, prefix: str) -> None:
    """The DTCWT buffers of an official mixer (``xfm``, ``ifm``) must be the near_sym_b / qshift_b taps we use."""
    ours = {**{f"xfm.{k}": v for k, v in biort_filters("near_sym_b").items() if k.startswith("h")},
            **{f"ifm.{k}": v for k, v in biort_filters("near_sym_b").items() if k.startswith("g")},
            **{f"xfm.{k}": v for k, v in qshift_filters("qshift_b").items() if k.startswith("h")},
            **{f"ifm.{k}": v for k, v in qshift_filters("qshift_b").items() if k.startswith("g")}}
    for name, taps in ours.items():
        key = prefix + name
        if key in sd:
            got = np.asarray(sd[key]).reshape(-1)[::-1]  # stored reversed (pytorch_wavelets' prep_filt)
            if got.shape != taps.shape or not np.allclose(got, taps, atol=1e-6):
                raise ValueError(f"checkpoint buffer {key} holds other wavelet filters than near_sym_b / qshift_b")


def convert_svt(sd: StateDict, model: SVT, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Official ``SVT`` state dict -> our flat ``params/...`` and ``batch_stats/...`` variables."""
    out = {}
    for i, t in enumerate(("0", "3", "6")):
        out[f"params/patch_embed1_conv{i}/kernel"] = conv2d(sd[f"patch_embed1.conv.{t}.weight"])
        out.update(batch_norm_params(sd, f"patch_embed1.conv.{int(t) + 1}", f"patch_embed1_bn{i}"))
    for s in range(4):
        p = f"patch_embed{s + 1}"
        out[f"params/{p}_proj/kernel"] = conv2d(sd[f"{p}.proj.weight"])
        out[f"params/{p}_proj/bias"] = sd[f"{p}.proj.bias"]
        out.update(norm_params(sd, f"{p}.norm", f"params/{p}_norm"))
        heads = model.num_heads[s]
        for j in range(model.depth[s]):
            t, o = f"block{s + 1}.{j}.", f"params/block{s + 1}_{j}/"
            for norm in ("norm1", "norm2"):
                out.update(norm_params(sd, t + norm, o + norm))
            if s < model.num_scatter_stages:
                out[o + "attn/complex_weight_ll"] = np.ascontiguousarray(
                    sd[t + "attn.complex_weight_ll"].transpose(1, 2, 0))
                for name in ("lh_1", "lh_2", "lh_b1", "lh_b2"):
                    out[o + f"attn/complex_weight_{name}"] = sd[t + f"attn.complex_weight_{name}"]
                _check_filters(sd, t + "attn.")
                sd.skip(*(k for k in sd.keys() if k.startswith((t + "attn.xfm.", t + "attn.ifm."))))
            else:
                out.update(_attention(sd, t + "attn", o + "attn", heads))
            out.update(dense_params(sd, t + "mlp.fc1", o + "mlp/fc1"))
            out.update(dense_params(sd, t + "mlp.fc2", o + "mlp/fc2"))
            out[o + "mlp/dwconv/kernel"] = conv2d(sd[t + "mlp.dwconv.dwconv.weight"])
            out[o + "mlp/dwconv/bias"] = sd[t + "mlp.dwconv.dwconv.bias"]
        out.update(norm_params(sd, f"norm{s + 1}", f"params/norm{s + 1}"))
    t, o = "post_network.0.", "params/post_network_0/"
    out.update(norm_params(sd, t + "norm1", o + "norm1"))
    out.update(norm_params(sd, t + "norm2", o + "norm2"))
    out.update(_attention(sd, t + "attn", o + "attn", model.num_heads[-1]))
    out.update(dense_params(sd, t + "mlp.fc1", o + "mlp/fc1"))
    out.update(dense_params(sd, t + "mlp.fc2", o + "mlp/fc2"))
    for head in ("head", "aux_head"):
        if f"params/{head}/kernel" in expected:
            out.update(dense_params(sd, head, f"params/{head}"))
        sd.skip(f"{head}.weight", f"{head}.bias")
    return out


def _attention(sd: StateDict, t: str, o: str, heads: int) -> dict[str, np.ndarray]:
    """Official ``q`` / ``kv`` / ``proj`` Linears -> our MultiHeadAttention (cross-attention layout)."""
    return {o + "/q/kernel": heads_in(sd[t + ".q.weight"], heads), o + "/q/bias": heads_in(sd[t + ".q.bias"], heads),
            o + "/kv/kernel": qkv_fused(sd[t + ".kv.weight"], heads, parts=2),
            o + "/kv/bias": qkv_fused(sd[t + ".kv.bias"], heads, parts=2),
            o + "/proj/kernel": heads_out(sd[t + ".proj.weight"], heads), o + "/proj/bias": sd[t + ".proj.bias"]}


# ---------------------------------------------------------------------------------------------
# Variants (official ``svt_s/b/l``). Params: the official code's count with the token-label head
# (1000 classes); GFLOPs and top-1 (224 px, ImageNet-1k, token labelling): the official README.

VARIANTS = {
    "svt_h_s": dict(stem_hidden_dim=32, embed_dims=(64, 128, 320, 448), num_heads=(2, 4, 10, 14), depth=(3, 4, 6, 3)),
    "svt_h_b": dict(stem_hidden_dim=64, embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16), depth=(3, 4, 12, 3)),
    "svt_h_l": dict(stem_hidden_dim=64, embed_dims=(96, 192, 384, 512), num_heads=(3, 6, 12, 16), depth=(3, 6, 18, 3)),
}
OFFICIAL_PARAMS = {"svt_h_s": 22_052_592, "svt_h_b": 32_878_544, "svt_h_l": 54_594_000}


def _info(name: str, flops_g: float, top1: float) -> ModelInfo:
    return ModelInfo(paper="Scattering Vision Transformer: Spectral Mixing Matters", arxiv="2311.01310",
                     repo="badripatro/svt", input_size=(224, 224, 3), params_m=round(OFFICIAL_PARAMS[name] / 1e6, 2),
                     flops_g=flops_g, top1=top1, converter=convert_svt)


@register_model(_info("svt_h_s", 3.9, 84.2))
def svt_h_s(**overrides: Any) -> SVT:
    """SVT-H-S: widths 64/128/320/448, depths 3/4/6/3."""
    return SVT(**{**VARIANTS["svt_h_s"], **overrides})


@register_model(_info("svt_h_b", 6.3, 85.2))
def svt_h_b(**overrides: Any) -> SVT:
    """SVT-H-B: widths 64/128/320/512, depths 3/4/12/3."""
    return SVT(**{**VARIANTS["svt_h_b"], **overrides})


@register_model(_info("svt_h_l", 12.7, 85.7))
def svt_h_l(**overrides: Any) -> SVT:
    """SVT-H-L: widths 96/192/384/512, depths 3/6/18/3."""
    return SVT(**{**VARIANTS["svt_h_l"], **overrides})
