"""CSWin Transformer: cross-shaped window self-attention.

Paper: "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows",
Dong et al., CVPR 2022, arXiv 2107.00652. Official code: microsoft/CSWin-Transformer
(``models/cswin.py``, MIT license). Parameter names and layouts are chosen so the released ``.pth``
checkpoints convert one to one (see ``convert_official_cswin``).

Architecture (as in the official code):
- Stem: conv 7x7 stride 4 padding 2 -> LayerNorm. Between stages: conv 3x3 stride 2 (C -> 2C) -> LN.
- Block: x + Attn(LN(x)), x + MLP(LN(x)) (ratio 4, GELU). One fused ``qkv`` (bias) projection;
  the first half of the heads attends inside vertical stripes (full height x ``split_size``), the
  second half inside horizontal stripes (``split_size`` x full width); both halves concatenated,
  then ``proj``. Scale head_dim**-0.5.
- LePE: a 3x3 depthwise conv on V of each branch, applied inside each stripe window (zero padding
  at the stripe borders, exactly like the official per-window conv), added to attention @ V.
- Full attention (one branch, all heads, one LePE over the whole map) in the last stage, and in any
  stage whose resolution at ``img_size`` equals its stripe width (the official ``last_stage`` rule).
- Head: LN -> mean over tokens -> Linear.
- LayerNorm eps 1e-5 (the official code uses ``nn.LayerNorm`` defaults).

Deviations (deliberate):
- Activations are NHWC maps throughout (the official code keeps (B, L, C) tokens); the math is the
  same. Non-square inputs are accepted (vertical stripes are H x sw, horizontal ones sw x W).
- The branch layout of each stage (two stripe branches or full attention) is fixed by ``img_size``
  as in the official code; other input sizes run with that layout, stripes laid over the actual
  resolution. Height and width must be multiples of 32 (stem stride 4 x three merges) and each
  stripe stage's resolution a multiple of its stripe width; anything else raises a ValueError.
- Parameter counts are the official code's exact counts. The paper/README round them: CSWin-T has
  22.32M parameters in the official code against "23M" in the README table; S 34.64M ("35M"),
  B 77.38M ("78M"), L 173.26M ("173M").
- ``drop_rate`` is the MLP dropout (the official ``proj_drop`` module is built but never applied).

Checkpoints: ``jaxformers.load_pretrained("cswin_tiny_224", "cswin_tiny_224.pth")``. The official
training script saves ``state_dict`` and ``state_dict_ema`` and evaluates the EMA weights (its
``--model-ema`` defaults to on); ``load_pretrained`` takes ``state_dict`` unless asked for the EMA
weights with ``checkpoint_key="state_dict_ema"``. The ImageNet-22K CSWin-L file
(``cswin_large_22k_224.pth``) loads with ``num_classes=21841``.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, conv2d, heads_out, linear, qkv_fused
from jaxformers.layers import (Conv, Dense, DropPath, LayerNorm, LePE, Mlp, check_image, dot_product_attention,
                               logical, maybe_remat, to_2tuple, trunc_normal)
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.layers.window import window_partition as to_windows, window_reverse as from_windows
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

MAP_AXES = ("act_batch", None, None, "act_embed")
TOTAL_STRIDE = 32


# ---------------------------------------------------------------------------------------------
# The core op: attention inside non-overlapping (stripe) windows


def stripe_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: tuple[int, int],
                     scale: float | None = None, implementation: AttentionImpl = "xla",
                     dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Softmax attention restricted to non-overlapping ``window`` = (height, width) rectangles.

    q, k, v: (B, H, W, heads, head_dim) maps -> (B, H, W, heads, head_dim). A vertical stripe of
    width sw is ``window=(H, sw)``, a horizontal one ``(sw, W)``, full attention ``(H, W)``.
    """
    height, width = q.shape[1:3]
    wh, ww = window
    if height % wh or width % ww:
        raise ValueError(f"a {height}x{width} map cannot be cut into {wh}x{ww} stripe windows")
    qw, kw, vw = (to_windows(t, window) for t in (q, k, v))
    flat = lambda t: t.reshape((t.shape[0], wh * ww) + t.shape[3:])  # noqa: E731
    out = dot_product_attention(flat(qw), flat(kw), flat(vw), scale=scale, implementation=implementation,
                                dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return from_windows(out.reshape(qw.shape[:3] + out.shape[2:]), window, height, width)


# ---------------------------------------------------------------------------------------------
# Modules


class ConvLayerNorm(nn.Module):
    """Conv (``kernel_size``, ``stride``, ``padding``) -> LayerNorm: CSWin's stem and merge blocks."""

    features: int
    kernel_size: int
    stride: int
    padding: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        x = Conv(self.features, (k, k), strides=self.stride, padding=self.padding,
                 dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        x = LayerNorm(1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        return constrain(x, MAP_AXES)


class CSWinBlock(nn.Module):
    """Cross-shaped window attention block (``full_attention`` for the last-stage rule)."""

    num_heads: int
    split_size: int
    full_attention: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    attention_dropout: float = 0.0
    dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, height, width, dim = x.shape
        h = self.num_heads
        if dim % h:
            raise ValueError(f"CSWin block width {dim} is not divisible by num_heads={h}")
        d = dim // h
        y = LayerNorm(1e-5, name="norm1", **kw)(x)
        qkv = nn.DenseGeneral((3, h, d), use_bias=self.qkv_bias, name="qkv",
                              kernel_init=logical(trunc_normal(0.02), ("embed", None, "heads", "kv")),
                              bias_init=logical(nn.initializers.zeros_init(), (None, "heads", "kv")), **kw)(y)
        qkv = constrain(qkv, ("act_batch", None, None, None, "act_heads", None))
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        if self.full_attention:
            branches = [(0, h, (height, width))]
        else:
            if h % 2:
                raise ValueError(f"CSWin stripe attention splits the heads in two halves; num_heads={h} is odd")
            sw = self.split_size
            if height % sw or width % sw:
                raise ValueError(f"CSWin stage resolution {height}x{width} is not divisible by its stripe width "
                                 f"split_size={sw}; use an image side that is a multiple of {TOTAL_STRIDE} whose "
                                 f"stage resolutions are multiples of the stripe widths (e.g. 224 or 384)")
            branches = [(0, h // 2, (height, sw)), (h // 2, h, (sw, width))]
        rate = self.attention_dropout if train else 0.0
        outs = []
        for i, (lo, hi, window) in enumerate(branches):
            vb = v[..., lo:hi, :]
            out = stripe_attention(q[..., lo:hi, :], k[..., lo:hi, :], vb, window=window, scale=d ** -0.5,
                                   implementation=self.attention_impl, dropout_rate=rate,
                                   dropout_rng=self.make_rng("dropout") if rate > 0.0 else None)
            # LePE inside each stripe window: channels of the branch are (head, head_dim) flattened.
            vw = to_windows(vb.reshape(vb.shape[:3] + (-1,)), window)
            lepe = from_windows(LePE(3, name=f"lepe_{i}", **kw)(vw), window, height, width)
            outs.append(out + lepe.reshape(out.shape))
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-2)
        out = nn.DenseGeneral(dim, axis=(-2, -1), name="proj",
                              kernel_init=logical(trunc_normal(0.02), ("heads", "kv", "embed")),
                              bias_init=logical(nn.initializers.zeros_init(), ("embed",)), **kw)(out)
        x = x + DropPath(self.drop_path)(out, train=train)
        y = LayerNorm(1e-5, name="norm2", **kw)(x)
        y = Mlp(int(dim * self.mlp_ratio), dropout=self.dropout, name="mlp", **kw)(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        return constrain(x, MAP_AXES)


class CSWinTransformer(FeatureBackbone):
    """CSWin: conv stem, four stages of cross-shaped window blocks with conv merges, LN-mean head."""

    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 64
    depth: Sequence[int] = (1, 2, 21, 1)
    num_heads: Sequence[int] = (2, 4, 8, 16)
    split_size: Sequence[int] = (1, 2, 7, 7)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def stage_layout(self) -> list[bool]:
        """Per stage: True when it uses full attention (last stage, or resolution == stripe width
        at ``img_size``), the official ``last_stage`` rule."""
        ih, iw = to_2tuple(self.img_size)
        full = []
        for i, sw in enumerate(self.split_size):
            f = 4 * 2 ** i
            full.append(i == len(self.depth) - 1 or (ih // f == sw and iw // f == sw))
        return full

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes); ``output`` selects the dense-feature contract's other outputs
        (``jaxformers.layers.features``): ``forward_features`` gives the four stage outputs
        ``{4: ..., 8: ..., 16: ..., 32: ...}`` (NHWC), ``pre_logits`` the pooled (B, D) after the final norm."""
        check_output(output, "CSWinTransformer")
        if not (len(self.depth) == len(self.num_heads) == len(self.split_size) == 4):
            raise ValueError(f"depth, num_heads and split_size need 4 entries (one per stage); got {self.depth}, "
                             f"{self.num_heads}, {self.split_size}")
        h, w = check_image(x, in_chans=self.in_chans)
        if h % TOTAL_STRIDE or w % TOTAL_STRIDE:
            raise ValueError(f"x is {h}x{w}, but CSWin needs height and width divisible by {TOTAL_STRIDE} "
                             f"(stem stride 4 x three stride-2 merges), e.g. 224 or 384")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvLayerNorm(self.embed_dim, 7, 4, 2, name="stem", **kw)(x)
        block_cls = maybe_remat(CSWinBlock, self.remat)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depth))
        layout = self.stage_layout()
        features = {}
        dim, n = self.embed_dim, 0
        for s in range(4):
            if s > 0:
                dim *= 2
                x = ConvLayerNorm(dim, 3, 2, 1, name=f"merge{s}", **kw)(x)
            for j in range(self.depth[s]):
                x = block_cls(self.num_heads[s], self.split_size[s], layout[s], self.mlp_ratio, self.qkv_bias,
                              float(rates[n]), self.attn_drop_rate, self.drop_rate, self.attention_impl,
                              name=f"stage{s + 1}_{j}", **kw)(x, train)
                n += 1
            features[4 * 2 ** s] = x
        if output == "features":
            return features
        x = LayerNorm(1e-5, name="norm", **kw)(x)
        pooled = x.mean(axis=(1, 2))
        logits = pooled
        if self.num_classes:
            logits = Dense(self.num_classes, axes=("embed", "classes"), name="head", **kw)(pooled)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# Official checkpoint converter (microsoft/CSWin-Transformer ``CSWinTransformer`` state dict)


def convert_official_cswin(sd: StateDict, model: CSWinTransformer, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Official CSWin state dict (``stage1_conv_embed.*``, ``stage{s}.{j}.*``, ``merge{s}.*``, ``norm``,
    ``head``) -> our flat ``params/...`` variables."""
    out = {
        "params/stem/conv/kernel": conv2d(sd["stage1_conv_embed.0.weight"]),
        "params/stem/conv/bias": sd["stage1_conv_embed.0.bias"],
        "params/stem/norm/scale": sd["stage1_conv_embed.2.weight"],
        "params/stem/norm/bias": sd["stage1_conv_embed.2.bias"],
        "params/norm/scale": sd["norm.weight"],
        "params/norm/bias": sd["norm.bias"],
    }
    if model.num_classes and "head.weight" in sd:
        out["params/head/kernel"] = linear(sd["head.weight"])
        out["params/head/bias"] = sd["head.bias"]
    sd.skip("head.weight", "head.bias")
    layout = model.stage_layout()
    for s in range(4):
        if s > 0:
            t, o = f"merge{s}.", f"params/merge{s}/"
            out.update({o + "conv/kernel": conv2d(sd[t + "conv.weight"]), o + "conv/bias": sd[t + "conv.bias"],
                        o + "norm/scale": sd[t + "norm.weight"], o + "norm/bias": sd[t + "norm.bias"]})
        h = model.num_heads[s]
        for j in range(model.depth[s]):
            t, o = f"stage{s + 1}.{j}.", f"params/stage{s + 1}_{j}/"
            out.update({
                o + "norm1/scale": sd[t + "norm1.weight"], o + "norm1/bias": sd[t + "norm1.bias"],
                o + "qkv/kernel": qkv_fused(sd[t + "qkv.weight"], h),
                o + "proj/kernel": heads_out(sd[t + "proj.weight"], h), o + "proj/bias": sd[t + "proj.bias"],
                o + "norm2/scale": sd[t + "norm2.weight"], o + "norm2/bias": sd[t + "norm2.bias"],
                o + "mlp/fc1/kernel": linear(sd[t + "mlp.fc1.weight"]), o + "mlp/fc1/bias": sd[t + "mlp.fc1.bias"],
                o + "mlp/fc2/kernel": linear(sd[t + "mlp.fc2.weight"]), o + "mlp/fc2/bias": sd[t + "mlp.fc2.bias"],
            })
            if model.qkv_bias:
                out[o + "qkv/bias"] = qkv_fused(sd[t + "qkv.bias"], h)
            for b in range(1 if layout[s] else 2):
                out[o + f"lepe_{b}/conv/kernel"] = conv2d(sd[t + f"attns.{b}.get_v.weight"])
                out[o + f"lepe_{b}/conv/bias"] = sd[t + f"attns.{b}.get_v.bias"]
    return out


# ---------------------------------------------------------------------------------------------
# Variants (official names in the comments). Params: exact count of the official code.

VARIANTS = {
    "cswin_tiny_224": dict(embed_dim=64, depth=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7)),
    "cswin_small_224": dict(embed_dim=64, depth=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7)),
    "cswin_base_224": dict(embed_dim=96, depth=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), split_size=(1, 2, 7, 7)),
    "cswin_base_384": dict(embed_dim=96, depth=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), split_size=(1, 2, 12, 12),
                           img_size=384),
    "cswin_large_224": dict(embed_dim=144, depth=(2, 4, 32, 2), num_heads=(6, 12, 24, 24), split_size=(1, 2, 7, 7)),
    "cswin_large_384": dict(embed_dim=144, depth=(2, 4, 32, 2), num_heads=(6, 12, 24, 24),
                            split_size=(1, 2, 12, 12), img_size=384),
}

# Exact parameter counts of the official implementation (1000 classes).
OFFICIAL_PARAMS = {
    "cswin_tiny_224": 22_320_552,
    "cswin_small_224": 34_643_304,
    "cswin_base_224": 77_382_184,
    "cswin_base_384": 77_382_184,
    "cswin_large_224": 173_262_664,
    "cswin_large_384": 173_262_664,
}


def _info(name: str, flops_g: float, top1: float) -> ModelInfo:
    size = VARIANTS[name].get("img_size", 224)
    return ModelInfo(paper="CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows",
                     arxiv="2107.00652", repo="microsoft/CSWin-Transformer", input_size=(size, size, 3),
                     params_m=round(OFFICIAL_PARAMS[name] / 1e6, 2), flops_g=flops_g, top1=top1,
                     converter=convert_official_cswin)


def _build(name: str, overrides: dict[str, Any]) -> CSWinTransformer:
    return CSWinTransformer(**{**VARIANTS[name], **overrides})


@register_model(_info("cswin_tiny_224", 4.3, 82.8))
def cswin_tiny_224(**overrides: Any) -> CSWinTransformer:
    """CSWin-T (official ``CSWin_64_12211_tiny_224``)."""
    return _build("cswin_tiny_224", overrides)


@register_model(_info("cswin_small_224", 6.9, 83.6))
def cswin_small_224(**overrides: Any) -> CSWinTransformer:
    """CSWin-S (official ``CSWin_64_24322_small_224``)."""
    return _build("cswin_small_224", overrides)


@register_model(_info("cswin_base_224", 15.0, 84.2))
def cswin_base_224(**overrides: Any) -> CSWinTransformer:
    """CSWin-B (official ``CSWin_96_24322_base_224``)."""
    return _build("cswin_base_224", overrides)


@register_model(_info("cswin_base_384", 47.0, 85.5))
def cswin_base_384(**overrides: Any) -> CSWinTransformer:
    """CSWin-B at 384 (official ``CSWin_96_24322_base_384``, stripe width 12 in stages 3-4)."""
    return _build("cswin_base_384", overrides)


@register_model(_info("cswin_large_224", 31.5, 86.5))
def cswin_large_224(**overrides: Any) -> CSWinTransformer:
    """CSWin-L, ImageNet-22K pre-trained (official ``CSWin_144_24322_large_224``; 24 heads in stage 4)."""
    return _build("cswin_large_224", overrides)


@register_model(_info("cswin_large_384", 96.8, 87.5))
def cswin_large_384(**overrides: Any) -> CSWinTransformer:
    """CSWin-L at 384 (official ``CSWin_144_24322_large_384``)."""
    return _build("cswin_large_384", overrides)
