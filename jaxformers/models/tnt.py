"""TNT: Transformer in Transformer: an inner transformer over pixels inside each patch, an outer one
over patches.

Paper: "Transformer in Transformer", Han, Xiao, Wu, Guo, Xu, Wang, NeurIPS 2021, arXiv 2103.00112.
Official code: huawei-noah/Efficient-AI-Backbones ``tnt_pytorch`` (Apache-2.0, formerly
CV-Backbones). Variants, structure and parameter names follow timm's ``tnt.py`` so its ``.in1k``
checkpoints convert one to one; the official release's key names (``outer_tokens``, ``inner_pos``,
``inner_attn``...) are accepted as well.

Architecture (timm, official): each 16x16 patch is cut out of the image and embedded by a 7x7
stride-4 convolution (zero padding at the patch border) into a 4x4 grid of "words" of width
``inner_dim``; one word position table ``pixel_pos`` (4x4xC) is shared by every patch. The
flattened words of a patch make its initial "sentence" token (LN -> Linear -> LN), then a CLS token
and patch positions are added. Each block runs the inner transformer on the words (pre-LN MHSA and
an MLP of ratio 4), adds ``Linear(LN(words of the patch))`` (LN after it too) to every patch token
but not to the CLS, then runs the outer transformer on the patch tokens. Head: LN -> CLS -> Linear.
All LayerNorms use torch's default eps 1e-5. ``legacy=True`` is timm's ``tnt_s_legacy_patch16_224``
layout: the convolution runs over the whole image before the words are cut, and the inner->outer
projection is LN(inner_dim) -> Linear with bias, without the trailing LN.

Parameter counts (timm = the checkpoints): TNT-S 23,768,584 (paper 23.8M), TNT-B 65,428,680 (paper
65.6M; the paper's count differs from its released code), TNT-S legacy 23,755,336.

Deviations from timm:
- Images are NHWC; ``pixel_pos`` is stored (1, 4, 4, C) instead of (1, C, 4, 4).
- timm's attention has separate ``qk`` and ``v`` linears (no bias); the converter concatenates them
  into the fused ``qkv`` layout of the shared ``MultiHeadAttention``, which computes the same thing.
- The classifier head starts at zero (house style).
- ``forward_features`` (the project's dense-feature contract) gives two maps: the last block's
  pixel words laid out on the image (stride ``first_stride`` = 4: word (i, j) of patch (r, c) is
  pixel block (4r + i, 4c + j)) and the normed patch tokens (stride 16). timm's per-block
  ``forward_intermediates`` are not exposed.
- Patch position tables are resampled for another ``img_size`` as timm's ``checkpoint_filter_fn``
  does (antialiased bicubic).
"""
from __future__ import annotations

import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, conv2d, dense_params, fit_pos_embed, heads_out, norm_params, qkv_fused
from jaxformers.layers import (Conv, Dense, LayerNorm, TransformerBlock, check_image, logical, maybe_remat, to_2tuple,
                               trunc_normal)
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

ACT = ("act_batch", "act_len", "act_embed")
EPS = 1e-5  # timm's TNT uses nn.LayerNorm with torch's default eps


class TNTBlock(nn.Module):
    """Inner transformer on words, words -> patch tokens (CLS skipped), outer transformer.

    Called on ``(pixel_tokens (B*N, words, C_in), patch_tokens (B, 1 + N, D))``; returns both.
    ``inner`` / ``outer`` are the shared ``TransformerBlock`` (timm names ``norm_in`` / ``attn_in`` /
    ``norm_mlp_in`` / ``mlp_in`` and ``norm_out`` / ``attn_out`` / ``norm_mlp`` / ``mlp``).
    """

    num_heads_inner: int
    num_heads_outer: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    drop_path: float = 0.0
    attention_dropout: float = 0.0
    dropout: float = 0.0
    legacy: bool = False
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xs: tuple[jax.Array, jax.Array], train: bool = False) -> tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(qkv_bias=self.qkv_bias, drop_path=self.drop_path, attention_dropout=self.attention_dropout,
                      dropout=self.dropout, norm_eps=EPS, attention_impl=self.attention_impl, **kw)
        pixels, patches = xs
        pixels = TransformerBlock(self.num_heads_inner, 4.0, name="inner", **common)(pixels, train)
        b, n1, dim = patches.shape
        if self.legacy:
            words = LayerNorm(EPS, name="norm1_proj", **kw)(pixels).reshape(b, n1 - 1, -1)
            words = Dense(dim, axes=(None, "embed"), name="proj", **kw)(words)
        else:
            words = LayerNorm(EPS, axis_name=None, name="norm1_proj", **kw)(pixels.reshape(b, n1 - 1, -1))
            words = Dense(dim, axes=(None, "embed"), use_bias=False, name="proj", **kw)(words)
            words = LayerNorm(EPS, name="norm2_proj", **kw)(words)
        patches = jnp.concatenate([patches[:, :1], patches[:, 1:] + words.astype(patches.dtype)], axis=1)
        patches = TransformerBlock(self.num_heads_outer, self.mlp_ratio, name="outer", **common)(patches, train)
        return pixels, constrain(patches, ACT)


class TNT(FeatureBackbone):
    """Transformer in Transformer (timm ``TNT``)."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: Literal["token", "avg"] = "token"
    embed_dim: int = 384
    inner_dim: int = 24
    depth: int = 12
    num_heads_inner: int = 4
    num_heads_outer: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    first_stride: int = 4
    legacy: bool = False
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = to_2tuple(self.img_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def word_grid(self) -> tuple[int, int]:
        """Words per patch side: ceil(patch_size / first_stride) (4x4 for TNT-S/B)."""
        w = math.ceil(self.patch_size / self.first_stride)
        return w, w

    def _validate(self) -> None:
        gh, gw = self.grid_size
        if gh < 1 or gw < 1:
            raise ValueError(f"img_size={self.img_size} is smaller than patch_size={self.patch_size}")
        if self.legacy and self.patch_size % self.first_stride:
            raise ValueError(f"legacy TNT needs patch_size divisible by first_stride, got {self.patch_size} "
                             f"and {self.first_stride}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")

    def _pixel_embed(self, x: jax.Array) -> jax.Array:
        """NHWC image -> words (B*N, wh*ww, inner_dim), with ``pixel_pos`` added."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p, (gh, gw), (wh, ww) = self.patch_size, self.grid_size, self.word_grid
        b, c = x.shape[0], x.shape[-1]
        x = x[:, :gh * p, :gw * p]  # like torch's Unfold, drop pixels past the last whole patch
        conv = Conv(self.inner_dim, (7, 7), strides=self.first_stride, padding=3, axes=(None, "embed"),
                    name="pixel_embed_proj", **kw)
        if self.legacy:  # convolve the whole image, then cut each patch's words
            x = conv(x)[:, :gh * wh, :gw * ww]
            x = x.reshape(b, gh, wh, gw, ww, self.inner_dim).transpose(0, 1, 3, 2, 4, 5)
        else:  # cut the patches, then convolve each one on its own (zero padding at its border)
            x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * gh * gw, p, p, c)
            x = conv(x)
        x = x.reshape(b * gh * gw, wh, ww, self.inner_dim)
        pos = self.param("pixel_pos", logical(trunc_normal(0.02), (None, None, None, "embed")),
                         (1, wh, ww, self.inner_dim), self.param_dtype)
        x = x + pos.astype(x.dtype)
        return x.reshape(b * gh * gw, wh * ww, self.inner_dim)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes); ``output`` selects the dense-feature contract's other outputs
        (``jaxformers.layers.features``): ``forward_features`` gives ``{first_stride: the last
        block's pixel words as a (B, h * wh, w * ww, inner_dim) map, patch_size: the normed patch
        tokens as (B, h, w, D)}`` ({4, 16} for TNT-S/B; the word map only when ``first_stride``
        divides ``patch_size``, so that each word covers ``first_stride`` pixels), ``pre_logits`` the
        pooled (B, D)."""
        check_output(output, "TNT")
        self._validate()
        check_image(x, in_chans=self.in_chans, img_size=self.img_size)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        b = x.shape[0]
        gh, gw = self.grid_size
        pixels = constrain(self._pixel_embed(x), ACT)
        patches = LayerNorm(EPS, axis_name=None, name="norm1_proj", **kw)(pixels.reshape(b, gh * gw, -1))
        patches = Dense(self.embed_dim, axes=(None, "embed"), name="proj", **kw)(patches)
        patches = LayerNorm(EPS, name="norm2_proj", **kw)(patches)
        cls = self.param("cls_token", logical(trunc_normal(0.02), (None, None, "embed")), (1, 1, self.embed_dim),
                         self.param_dtype)
        pos = self.param("patch_pos", logical(trunc_normal(0.02), (None, None, "embed")),
                         (1, 1 + gh * gw, self.embed_dim), self.param_dtype)
        patches = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, self.embed_dim)), patches], 1)
        patches = patches + pos.astype(patches.dtype)
        patches = nn.Dropout(self.pos_drop_rate)(patches, deterministic=not train)
        patches = constrain(patches, ACT)

        block = maybe_remat(TNTBlock, self.remat)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            pixels, patches = block(self.num_heads_inner, self.num_heads_outer, self.mlp_ratio, self.qkv_bias,
                                    float(rates[i]), self.attn_drop_rate, self.proj_drop_rate, self.legacy,
                                    self.attention_impl, name=f"blocks_{i}", **kw)((pixels, patches), train)
        patches = LayerNorm(EPS, name="norm", **kw)(patches)
        features = {int(self.patch_size): patches[:, 1:].reshape(b, gh, gw, -1)}
        (wh, ww), stride = self.word_grid, self.first_stride
        if self.patch_size % stride == 0 and stride != self.patch_size:
            words = pixels.reshape(b, gh, gw, wh, ww, -1).transpose(0, 1, 3, 2, 4, 5)
            features = {int(stride): words.reshape(b, gh * wh, gw * ww, -1), **features}
        if output == "features":
            return features
        pooled = patches[:, 1:].mean(axis=1) if self.global_pool == "avg" else patches[:, 0]
        logits = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if self.num_classes:
            logits = Dense(self.num_classes, axes=("embed", "classes"), kernel_init=nn.initializers.zeros_init(),
                           name="head", **kw)(logits)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# timm / official checkpoint converter

# The official release's names -> timm's (the order matters: timm's checkpoint_filter_fn order).
_OFFICIAL_RENAMES = (
    ("outer_pos", "patch_pos"), ("inner_pos", "pixel_pos"), ("patch_embed", "pixel_embed"),
    ("proj_norm1", "norm1_proj"), ("proj_norm2", "norm2_proj"), ("inner_norm1", "norm_in"),
    ("inner_attn", "attn_in"), ("inner_norm2", "norm_mlp_in"), ("inner_mlp", "mlp_in"),
    ("outer_norm1", "norm_out"), ("outer_attn", "attn_out"), ("outer_norm2", "norm_mlp"), ("outer_mlp", "mlp"),
)


class _Renamed:
    """A view of a StateDict under timm's key names (for the official release's checkpoints)."""

    def __init__(self, sd: StateDict):
        self.sd = sd
        self.names = {}
        for k in sd.keys():
            t = k
            for old, new in _OFFICIAL_RENAMES:
                t = t.replace(old, new)
            self.names[t] = k

    def __contains__(self, key: str) -> bool:
        return key in self.names

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.names:
            return self.sd[key]  # raises a KeyError naming the key
        return self.sd[self.names[key]]


def _attention(sd, t: str, o: str, h: int) -> dict[str, np.ndarray]:
    """timm TNT ``Attention`` (``qk`` (2*H*D, E) and ``v`` (H*D, E), no bias) -> fused ``qkv``."""
    out = {o + "qkv/kernel": qkv_fused(np.concatenate([sd[t + "qk.weight"], sd[t + "v.weight"]]), h),
           o + "proj/kernel": heads_out(sd[t + "proj.weight"], h), o + "proj/bias": sd[t + "proj.bias"]}
    if t + "qk.bias" in sd:
        out[o + "qkv/bias"] = qkv_fused(np.concatenate([sd[t + "qk.bias"], sd[t + "v.bias"]]), h)
    return out


def convert_timm_tnt(sd: StateDict, model: TNT, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """timm ``TNT`` (or the official release's) state dict -> our flat ``params/...`` variables."""
    official = "patch_pos" not in sd
    sd.skip("outer_tokens")
    src = _Renamed(sd) if official else sd

    def norm(t, o):
        return norm_params(src, t, f"params/{o}")

    def dense(t, o):
        return dense_params(src, t, f"params/{o}")

    wh, ww = model.word_grid
    pixel_pos = np.asarray(src["pixel_pos"])
    if pixel_pos.ndim == 3:  # official: (1, words, C)
        pixel_pos = pixel_pos.reshape(1, wh, ww, -1)
    else:  # timm: (1, C, wh, ww)
        pixel_pos = pixel_pos.transpose(0, 2, 3, 1)
    out = {
        "params/pixel_embed_proj/kernel": conv2d(src["pixel_embed.proj.weight"]),
        "params/pixel_embed_proj/bias": src["pixel_embed.proj.bias"],
        "params/pixel_pos": pixel_pos,
        "params/cls_token": src["cls_token"],
        "params/patch_pos": fit_pos_embed(src["patch_pos"], model.grid_size, 1),
        **norm("norm1_proj", "norm1_proj"), **dense("proj", "proj"), **norm("norm2_proj", "norm2_proj"),
        **norm("norm", "norm"),
    }
    if model.num_classes and "head.weight" in src:
        out.update(dense("head", "head"))
    sd.skip(*(sd_key for sd_key in sd.keys() if sd_key.startswith("head.")))
    for i in range(model.depth):
        t, o = f"blocks.{i}.", f"blocks_{i}/"
        for part, (n_in, attn, n_mlp, mlp, heads) in {
            "inner": ("norm_in", "attn_in", "norm_mlp_in", "mlp_in", model.num_heads_inner),
            "outer": ("norm_out", "attn_out", "norm_mlp", "mlp", model.num_heads_outer),
        }.items():
            p = f"{o}{part}/"
            out.update(norm(t + n_in, p + "norm1"))
            out.update({f"params/{k}": v for k, v in _attention(src, f"{t}{attn}.", p + "attn/", heads).items()})
            out.update(norm(t + n_mlp, p + "norm2"))
            out.update(dense(f"{t}{mlp}.fc1", p + "mlp/fc1"))
            out.update(dense(f"{t}{mlp}.fc2", p + "mlp/fc2"))
        out.update(norm(t + "norm1_proj", o + "norm1_proj"))
        out.update(dense(t + "proj", o + "proj"))
        if not model.legacy:
            out.update(norm(t + "norm2_proj", o + "norm2_proj"))
    return out


# ---------------------------------------------------------------------------------------------
# Variants (timm names). params_m / flops_g / top1: the official README table (ImageNet-1k, 224).

VARIANTS: dict[str, dict[str, Any]] = {
    "tnt_s_patch16_224": dict(embed_dim=384, inner_dim=24, depth=12, num_heads_outer=6),
    "tnt_b_patch16_224": dict(embed_dim=640, inner_dim=40, depth=12, num_heads_outer=10),
    "tnt_s_legacy_patch16_224": dict(embed_dim=384, inner_dim=24, depth=12, num_heads_outer=6, legacy=True),
}


def _info(params_m, flops_g, top1):
    return ModelInfo(paper="Transformer in Transformer (TNT)", arxiv="2103.00112",
                     repo="huawei-noah/Efficient-AI-Backbones", input_size=(224, 224, 3), params_m=params_m,
                     flops_g=flops_g, top1=top1, converter=convert_timm_tnt)


@register_model(_info(23.8, 5.2, 81.5))
def tnt_s_patch16_224(**overrides: Any) -> TNT:
    return TNT(**{**VARIANTS["tnt_s_patch16_224"], **overrides})


@register_model(_info(65.6, 14.1, 82.9))
def tnt_b_patch16_224(**overrides: Any) -> TNT:
    return TNT(**{**VARIANTS["tnt_b_patch16_224"], **overrides})


@register_model(_info(23.8, 5.2, 81.3))
def tnt_s_legacy_patch16_224(**overrides: Any) -> TNT:
    """The first TNT-S release (arXiv v1 numbers: 81.3 top-1), timm's legacy layout."""
    return TNT(**{**VARIANTS["tnt_s_legacy_patch16_224"], **overrides})
