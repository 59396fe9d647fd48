"""CrossViT: a two-branch (small and large patch) vision transformer fused by CLS cross-attention.

Paper: "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification",
Chen, Fan, Panda, ICCV 2021, arXiv 2103.14899. Official code: IBM/CrossViT (Apache-2.0); the
variants, names and parameter names follow timm's ``crossvit.py`` so its ``.in1k`` checkpoints (and
IBM's originals, whose ``pos_embed.0`` keys are accepted too) convert one to one.

Architecture (paper Table 1, timm): the image goes to two branches. The small-patch branch sees the
full image (patch 12 at 240 px, 400 tokens); the large-patch branch sees it bicubically resized by
``img_scale`` (224/240, patch 16, 196 tokens). Each branch has its own CLS token and learned
positions. K = 3 multi-scale encoders each run N = 1 block on the small and M blocks on the large
branch, then fuse: each branch's CLS is projected to the other branch's width (LN -> GELU -> Linear,
``projs``), attends as the only query over the other branch's patch tokens (pre-LN cross attention,
residual on the CLS only, no MLP), and is projected back (``revert_projs``). The head is one linear
layer per branch on its normed CLS; the two logits are averaged. Dagger (``†``) variants replace
each linear patch embedding with three convolutions (``multi_conv``).

Parameter counts are timm's (the checkpoints' truth); the paper's Tables 2/4 round differently:
tiny 7.01M (paper 6.9), small 26.86M (26.7), base 105.03M (104.7), 9 8.55M (8.6), 15 27.53M
(27.4), 18 43.27M (43.3), 9† 8.78M (8.8), 15† 28.21M (28.2), 15†@408 28.50M (28.5),
18† 44.27M (44.3), 18†@408 44.61M (44.6). ``ModelInfo.params_m`` holds the paper's numbers.
timm renamed the paper's *_224 / *_384 to *_240 / *_408 (the small branch's real input size).

Deviations from timm:
- Images are NHWC. The large-branch resize is torch's bicubic (A = -0.75, half-pixel centres, edge
  clamping, no antialias) written as two small matrices, so outputs match timm to float32 rounding.
- The classifier heads start at zero (house style, as in ``vit.py``); timm draws them at random.
- ``forward_features`` (the project's dense-feature contract) gives each branch's final normed patch
  tokens as a map keyed by the branch's effective stride (12 and 17); timm's per-block
  ``forward_intermediates`` are not exposed. Position tables of checkpoints are resampled to another ``img_size``
  (antialiased bicubic, as timm's ``resample_abs_pos_embed``); timm itself refuses other sizes for
  CrossViT checkpoints (``fixed_input_size``).
"""
from __future__ import annotations

import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import (StateDict, conv2d, dense_params, fit_pos_embed, heads_in, heads_out, norm_params,
                                       qkv_fused, timm_block)
from jaxformers.layers import (ConvStem, Dense, DropPath, LayerNorm, MultiHeadAttention, PatchEmbed, TransformerBlock,
                               check_image, gelu, logical, maybe_remat, to_2tuple, trunc_normal)
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

ACT = ("act_batch", "act_len", "act_embed")

# The dagger stem per patch size: (kernel, stride, padding) of its three convolutions.
DAGGER_STEMS = {
    12: ((7, 4, 3), (3, 3, 0), (3, 1, 1)),
    16: ((7, 4, 3), (3, 2, 1), (3, 2, 1)),
}


# ---------------------------------------------------------------------------------------------
# torch-compatible bicubic resize (the large branch's input)


def bicubic_weights(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """(out_size, in_size) matrix of ``torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False)`` along one axis: Keys cubic with A = -0.75, half-pixel centres, taps clamped
    to the border, no antialiasing."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    # torch's float32 arithmetic: a float32 scale, the source position as one fused multiply-add
    # rounded to float32, float32 coefficients (this matters: positions near 127 have float32 ulps of
    # 8e-6, enough to move outputs by 1e-4)
    f32 = np.float32
    a = f32(a)
    scale = float(f32(in_size) / f32(out_size))
    w = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = f32(scale * (o + 0.5) - 0.5)
        base = math.floor(src)
        t = src - f32(base)
        coeffs = (far(t + f32(1)), near(t), near(f32(1) - t), far(f32(2) - t))
        for j, c in enumerate(coeffs):
            w[o, min(max(base - 1 + j, 0), in_size - 1)] += c
    return w


def resize_bicubic(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC images resized to ``size`` exactly as torch's bicubic ``interpolate`` (see
    ``bicubic_weights``): two small matmuls, separable over height and width."""
    h, w = x.shape[1:3]
    wh = jnp.asarray(bicubic_weights(h, size[0]), x.dtype)
    ww = jnp.asarray(bicubic_weights(w, size[1]), x.dtype)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", wh, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", ww, x, precision=hi)


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


# ---------------------------------------------------------------------------------------------
# Modules


class ClsProjection(nn.Module):
    """LN -> GELU -> Linear on a CLS token, from one branch's width to ``features`` (timm's
    ``projs`` / ``revert_projs`` Sequential: ``norm`` is index 0, ``fc`` index 2)."""

    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = gelu(LayerNorm(1e-6, name="norm", **kw)(x))
        return Dense(self.features, axes=("embed", None), name="fc", **kw)(x)


class CrossAttentionBlock(nn.Module):
    """CLS-only cross attention: ``x[:, :1] + DropPath(Attn(q=LN(x)[:, :1], kv=LN(x)))``.

    Returns just the updated CLS token (B, 1, D); there is no MLP (timm ``CrossAttentionBlock``).
    """

    num_heads: int
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
        y = LayerNorm(1e-6, name="norm1", **kw)(x)
        y = MultiHeadAttention(self.num_heads, qkv_bias=self.qkv_bias, attention_dropout=self.attention_dropout,
                               proj_dropout=self.dropout, attention_impl=self.attention_impl, name="attn",
                               **kw)(y[:, :1], kv=y, train=train)
        return x[:, :1] + DropPath(self.drop_path)(y, train=train)


class MultiScaleBlock(nn.Module):
    """One multi-scale encoder: per-branch transformer blocks, then CLS cross-attention fusion.

    ``depth`` is timm's per-encoder config: blocks per branch, then the fusion depth (0 = timm's
    "backward compatible" single cross-attention block per branch, the layout of every released
    checkpoint). ``drop_path`` holds this encoder's slice of the global stochastic-depth schedule.
    """

    embed_dim: tuple[int, ...]
    depth: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]
    drop_path: tuple[float, ...]
    qkv_bias: bool = True
    attention_dropout: float = 0.0
    dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xs: tuple[jax.Array, ...], train: bool = False) -> tuple[jax.Array, ...]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(self.embed_dim)
        block = maybe_remat(TransformerBlock, self.remat)
        fusion_block = maybe_remat(CrossAttentionBlock, self.remat)
        outs = []
        for d in range(n):
            x = xs[d]
            for i in range(self.depth[d]):
                x = block(self.num_heads[d], self.mlp_ratio[d], self.qkv_bias, self.drop_path[i],
                          self.attention_dropout, self.dropout, attention_impl=self.attention_impl,
                          name=f"blocks_{d}_{i}", **kw)(x, train)
            outs.append(x)

        fused = []
        for d in range(n):
            other = (d + 1) % n
            cls = ClsProjection(self.embed_dim[other], name=f"projs_{d}", **kw)(outs[d][:, :1])
            tokens = jnp.concatenate([cls, outs[other][:, 1:]], axis=1)
            for j in range(max(self.depth[-1], 1)):
                name = f"fusion_{d}" if self.depth[-1] == 0 else f"fusion_{d}_{j}"
                tokens = fusion_block(self.num_heads[other], self.qkv_bias, self.drop_path[-1],
                                      self.attention_dropout, self.dropout, attention_impl=self.attention_impl,
                                      name=name, **kw)(tokens, train)
            cls = ClsProjection(self.embed_dim[d], name=f"revert_projs_{d}", **kw)(tokens[:, :1])
            fused.append(constrain(jnp.concatenate([cls, outs[d][:, 1:]], axis=1), ACT))
        return tuple(fused)


class CrossViT(FeatureBackbone):
    """CrossViT (timm ``CrossVit``): two patch branches, multi-scale encoders, averaged heads."""

    img_size: int | tuple[int, int] = 240
    img_scale: tuple[float, ...] = (1.0, 224 / 240)
    patch_size: tuple[int, ...] = (12, 16)
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: tuple[int, ...] = (192, 384)
    depth: tuple[tuple[int, ...], ...] = ((1, 4, 0), (1, 4, 0), (1, 4, 0))
    num_heads: tuple[int, ...] = (6, 6)
    mlp_ratio: tuple[float, ...] = (4.0, 4.0, 1.0)
    multi_conv: bool = False
    crop_scale: bool = False
    qkv_bias: bool = True
    global_pool: Literal["token", "avg"] = "token"
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # Accept lists from users (timm style); Linen fields must be hashable. A single img_scale
        # number applies to every branch (timm's to_2tuple).
        if isinstance(self.img_scale, (int, float)):
            object.__setattr__(self, "img_scale", (float(self.img_scale),) * len(self.patch_size))
        for f in ("img_scale", "patch_size", "embed_dim", "num_heads", "mlp_ratio"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        object.__setattr__(self, "depth", tuple(tuple(c) for c in self.depth))
        if not isinstance(self.img_size, int):
            object.__setattr__(self, "img_size", tuple(self.img_size))
        super().__post_init__()

    # -- geometry ------------------------------------------------------------------------------

    @property
    def num_branches(self) -> int:
        return len(self.patch_size)

    @property
    def img_size_scaled(self) -> list[tuple[int, int]]:
        """Each branch's input size: ``int(img_size * img_scale[i])``, as timm computes it."""
        size = to_2tuple(self.img_size)
        return [tuple(int(s * sc) for s in size) for sc in self.img_scale]

    @property
    def grid_sizes(self) -> list[tuple[int, int]]:
        """Each branch's token grid (the position table's shape): scaled size // patch size."""
        return [(s[0] // p, s[1] // p) for s, p in zip(self.img_size_scaled, self.patch_size)]

    @property
    def feature_strides(self) -> tuple[int, ...]:
        """Each branch's effective stride on the input image, ``round(patch_size / img_scale)``: the
        key of its map in ``forward_features`` (12 and 17 = round(16 x 240 / 224) for the registered
        variants; the large branch's map is 14x14 = 240 // 17 at 240 px)."""
        return tuple(int(round(p / sc)) for p, sc in zip(self.patch_size, self.img_scale))

    def _validate(self) -> None:
        n = self.num_branches
        for name in ("embed_dim", "num_heads", "img_scale"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}={getattr(self, name)} needs one entry per branch "
                                 f"(patch_size={self.patch_size} has {n})")
        if len(self.mlp_ratio) < n:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} needs at least one entry per branch ({n})")
        if len(set(self.feature_strides)) != n:
            raise ValueError(f"branches with patch_size={self.patch_size} and img_scale={self.img_scale} have the "
                             f"same effective stride {self.feature_strides}; forward_features keys each branch's map "
                             f"by its stride, so the branches need different ones")
        for cfg in self.depth:
            if len(cfg) != n + 1 or min(cfg[:-1]) < 1 or cfg[-1] < 0:
                raise ValueError(f"each depth entry must be (blocks per branch >= 1 ..., fusion depth >= 0) "
                                 f"with {n + 1} numbers; got {cfg}")
        for (h, w), p, (gh, gw) in zip(self.img_size_scaled, self.patch_size, self.grid_sizes):
            if gh < 1 or gw < 1:
                raise ValueError(f"img_size={self.img_size} gives a {h}x{w} branch input, smaller than its "
                                 f"patch size {p}")
            if self.multi_conv:
                if p not in DAGGER_STEMS:
                    raise ValueError(f"multi_conv (dagger) stems exist for patch sizes {sorted(DAGGER_STEMS)}, "
                                     f"got {p}")
                oh, ow = h, w
                for k, s, pad in DAGGER_STEMS[p]:
                    oh, ow = _conv_out(oh, k, s, pad), _conv_out(ow, k, s, pad)
                if (oh, ow) != (gh, gw):
                    raise ValueError(f"img_size={self.img_size}: the patch-{p} dagger stem maps the {h}x{w} "
                                     f"branch input to a {oh}x{ow} grid but the position table is {gh}x{gw}; "
                                     f"use an img_size whose branch inputs are multiples of {p}")

    # -- forward -------------------------------------------------------------------------------

    def _embed(self, x: jax.Array, branch: int, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        size, p, dim = self.img_size_scaled[branch], self.patch_size[branch], self.embed_dim[branch]
        gh, gw = self.grid_sizes[branch]
        if x.shape[1:3] != size:
            if self.crop_scale and size[0] <= x.shape[1] and size[1] <= x.shape[2]:
                top, left = int(round((x.shape[1] - size[0]) / 2.0)), int(round((x.shape[2] - size[1]) / 2.0))
                x = x[:, top:top + size[0], left:left + size[1]]
            else:
                x = resize_bicubic(x, size)
        if self.multi_conv:
            (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = DAGGER_STEMS[p]
            x = ConvStem((dim // 4, dim // 2, dim), (k0, k1, k2), (s0, s1, s2), (p0, p1, p2),
                         name=f"patch_embed_{branch}", **kw)(x, train=train)
            x = x.reshape(x.shape[0], -1, dim)
        else:  # a strided conv drops the rows and columns past the last whole patch, as in torch
            x = PatchEmbed(dim, p, self.in_chans, name=f"patch_embed_{branch}", **kw)(x[:, :gh * p, :gw * p])
        b = x.shape[0]
        init = logical(trunc_normal(0.02), (None, None, "embed"))
        cls = self.param(f"cls_token_{branch}", init, (1, 1, dim), self.param_dtype)
        pos = self.param(f"pos_embed_{branch}", init, (1, 1 + gh * gw, dim), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, dim)), x], axis=1)
        x = x + pos.astype(x.dtype)
        x = nn.Dropout(self.pos_drop_rate)(x, deterministic=not train)
        return constrain(x, ACT)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes): the mean of the branches' heads. ``output`` selects the dense-feature
        contract's other outputs (``jaxformers.layers.features``): ``forward_features`` gives each
        branch's normed patch tokens as a (B, h, w, D) map keyed by its effective stride
        (``feature_strides``: 12 and 17 for the registered variants), ``pre_logits`` the pooled
        branches concatenated (B, sum D), timm's ``pre_logits``."""
        check_output(output, "CrossViT")
        self._validate()
        check_image(x, in_chans=self.in_chans, img_size=self.img_size)
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        xs = tuple(self._embed(x, i, train) for i in range(self.num_branches))

        # timm's stochastic-depth schedule: linear over sum(depth[-2:]) per encoder, sliced per encoder.
        total = sum(sum(cfg[-2:]) for cfg in self.depth)
        rates = [float(r) for r in np.linspace(0.0, self.drop_path_rate, total)]
        ptr = 0
        for k, cfg in enumerate(self.depth):
            cur = max(cfg[:-1]) + cfg[-1]
            xs = MultiScaleBlock(self.embed_dim, cfg, self.num_heads, self.mlp_ratio, tuple(rates[ptr:ptr + cur]),
                                 self.qkv_bias, self.attn_drop_rate, self.proj_drop_rate, self.attention_impl,
                                 self.remat, name=f"blocks_{k}", **kw)(xs, train)
            ptr += cur

        xs = tuple(LayerNorm(1e-6, name=f"norm_{i}", **kw)(t) for i, t in enumerate(xs))
        features = {s: t[:, 1:].reshape(x.shape[0], gh, gw, -1)
                    for s, t, (gh, gw) in zip(self.feature_strides, xs, self.grid_sizes)}
        if output == "features":
            return features
        pooled = [t[:, 1:].mean(axis=1) if self.global_pool == "avg" else t[:, 0] for t in xs]
        pre_logits = jnp.concatenate(pooled, axis=-1)
        pooled = [nn.Dropout(self.drop_rate)(p, deterministic=not train) for p in pooled]
        if self.num_classes:
            heads = [Dense(self.num_classes, axes=("embed", "classes"), kernel_init=nn.initializers.zeros_init(),
                           name=f"head_{i}", **kw)(p) for i, p in enumerate(pooled)]
            logits = jnp.mean(jnp.stack(heads, axis=0), axis=0)
        else:
            logits = jnp.concatenate(pooled, axis=-1)
        return select_output(output, features, pre_logits, logits)


# ---------------------------------------------------------------------------------------------
# timm / IBM checkpoint converter


def _get(sd: StateDict, *keys: str) -> np.ndarray:
    """The first of ``keys`` present (timm writes ``pos_embed_0``, IBM's originals ``pos_embed.0``)."""
    for k in keys:
        if k in sd:
            return sd[k]
    return sd[keys[0]]  # raises a KeyError naming the timm key


def _cross_attention(sd: StateDict, t: str, o: str, h: int) -> dict[str, np.ndarray]:
    """timm ``CrossAttentionBlock`` (separate wq / wk / wv) -> norm1 + MultiHeadAttention q / kv."""
    out = {**norm_params(sd, t + "norm1", o + "norm1"),
           o + "attn/q/kernel": heads_in(sd[t + "attn.wq.weight"], h),
           o + "attn/kv/kernel": qkv_fused(np.concatenate([sd[t + "attn.wk.weight"], sd[t + "attn.wv.weight"]]),
                                           h, parts=2),
           o + "attn/proj/kernel": heads_out(sd[t + "attn.proj.weight"], h),
           o + "attn/proj/bias": sd[t + "attn.proj.bias"]}
    if t + "attn.wq.bias" in sd:
        out[o + "attn/q/bias"] = heads_in(sd[t + "attn.wq.bias"], h)
        out[o + "attn/kv/bias"] = qkv_fused(np.concatenate([sd[t + "attn.wk.bias"], sd[t + "attn.wv.bias"]]),
                                            h, parts=2)
    return out


def convert_timm_crossvit(sd: StateDict, model: CrossViT, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """timm ``CrossVit`` (or IBM's original) state dict -> our flat ``params/...`` variables.

    Position tables are resampled when ``model.img_size`` differs from the checkpoint's."""
    out: dict[str, np.ndarray] = {}
    n = model.num_branches
    for i in range(n):
        p = f"params/patch_embed_{i}/"
        out[f"params/cls_token_{i}"] = _get(sd, f"cls_token_{i}", f"cls_token.{i}")
        out[f"params/pos_embed_{i}"] = fit_pos_embed(_get(sd, f"pos_embed_{i}", f"pos_embed.{i}"),
                                                     model.grid_sizes[i], 1)
        if model.multi_conv:
            for j, idx in enumerate((0, 2, 4)):
                out[p + f"conv{j}/kernel"] = conv2d(sd[f"patch_embed.{i}.proj.{idx}.weight"])
                out[p + f"conv{j}/bias"] = sd[f"patch_embed.{i}.proj.{idx}.bias"]
        else:
            out[p + "proj/kernel"] = conv2d(sd[f"patch_embed.{i}.proj.weight"])
            out[p + "proj/bias"] = sd[f"patch_embed.{i}.proj.bias"]
        out.update(norm_params(sd, f"norm.{i}", f"params/norm_{i}"))
        if model.num_classes and f"head.{i}.weight" in sd:
            out.update(dense_params(sd, f"head.{i}", f"params/head_{i}"))
        sd.skip(f"head.{i}.weight", f"head.{i}.bias")
    for k, cfg in enumerate(model.depth):
        t, o = f"blocks.{k}.", f"params/blocks_{k}/"
        for d in range(n):
            other = (d + 1) % n
            for j in range(cfg[d]):
                out.update(timm_block(sd, f"{t}blocks.{d}.{j}.", f"{o}blocks_{d}_{j}/", model.num_heads[d]))
            out.update(norm_params(sd, f"{t}projs.{d}.0", f"{o}projs_{d}/norm"))
            out.update(dense_params(sd, f"{t}projs.{d}.2", f"{o}projs_{d}/fc"))
            out.update(norm_params(sd, f"{t}revert_projs.{d}.0", f"{o}revert_projs_{d}/norm"))
            out.update(dense_params(sd, f"{t}revert_projs.{d}.2", f"{o}revert_projs_{d}/fc"))
            if cfg[-1] == 0:
                out.update(_cross_attention(sd, f"{t}fusion.{d}.", f"{o}fusion_{d}/", model.num_heads[other]))
            for j in range(cfg[-1]):
                out.update(_cross_attention(sd, f"{t}fusion.{d}.{j}.", f"{o}fusion_{d}_{j}/",
                                            model.num_heads[other]))
    return out


# ---------------------------------------------------------------------------------------------
# Variants (timm names). params_m / flops_g / top1: the paper's Tables 2 and 4 (ImageNet-1k).


def _cfg(dims, heads, large_depth, ratio, dagger=False, img=240):
    return dict(img_size=img, img_scale=(1.0, (224 if img == 240 else 384) / img), patch_size=(12, 16),
                embed_dim=dims, depth=((1, large_depth, 0),) * 3, num_heads=(heads, heads),
                mlp_ratio=(ratio, ratio, 1.0), multi_conv=dagger)


VARIANTS: dict[str, dict[str, Any]] = {
    "crossvit_tiny_240": _cfg((96, 192), 3, 4, 4.0),
    "crossvit_small_240": _cfg((192, 384), 6, 4, 4.0),
    "crossvit_base_240": _cfg((384, 768), 12, 4, 4.0),
    "crossvit_9_240": _cfg((128, 256), 4, 3, 3.0),
    "crossvit_15_240": _cfg((192, 384), 6, 5, 3.0),
    "crossvit_18_240": _cfg((224, 448), 7, 6, 3.0),
    "crossvit_9_dagger_240": _cfg((128, 256), 4, 3, 3.0, True),
    "crossvit_15_dagger_240": _cfg((192, 384), 6, 5, 3.0, True),
    "crossvit_15_dagger_408": _cfg((192, 384), 6, 5, 3.0, True, 408),
    "crossvit_18_dagger_240": _cfg((224, 448), 7, 6, 3.0, True),
    "crossvit_18_dagger_408": _cfg((224, 448), 7, 6, 3.0, True, 408),
}


def _info(params_m, flops_g, top1, img=240):
    return ModelInfo(paper="CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification",
                     arxiv="2103.14899", repo="IBM/CrossViT", input_size=(img, img, 3), params_m=params_m,
                     flops_g=flops_g, top1=top1, converter=convert_timm_crossvit)


def _make(name: str, overrides: dict[str, Any]) -> CrossViT:
    return CrossViT(**{**VARIANTS[name], **overrides})


@register_model(_info(6.9, 1.6, 73.4))
def crossvit_tiny_240(**overrides: Any) -> CrossViT:
    return _make("crossvit_tiny_240", overrides)


@register_model(_info(26.7, 5.6, 81.0))
def crossvit_small_240(**overrides: Any) -> CrossViT:
    return _make("crossvit_small_240", overrides)


@register_model(_info(104.7, 21.2, 82.2))
def crossvit_base_240(**overrides: Any) -> CrossViT:
    return _make("crossvit_base_240", overrides)


@register_model(_info(8.6, 1.8, 73.9))
def crossvit_9_240(**overrides: Any) -> CrossViT:
    return _make("crossvit_9_240", overrides)


@register_model(_info(27.4, 5.8, 81.5))
def crossvit_15_240(**overrides: Any) -> CrossViT:
    return _make("crossvit_15_240", overrides)


@register_model(_info(43.3, 9.0, 82.5))
def crossvit_18_240(**overrides: Any) -> CrossViT:
    return _make("crossvit_18_240", overrides)


@register_model(_info(8.8, 2.0, 77.1))
def crossvit_9_dagger_240(**overrides: Any) -> CrossViT:
    return _make("crossvit_9_dagger_240", overrides)


@register_model(_info(28.2, 6.1, 82.3))
def crossvit_15_dagger_240(**overrides: Any) -> CrossViT:
    return _make("crossvit_15_dagger_240", overrides)


@register_model(_info(28.5, 21.4, 83.5, img=408))
def crossvit_15_dagger_408(**overrides: Any) -> CrossViT:
    return _make("crossvit_15_dagger_408", overrides)


@register_model(_info(44.3, 9.5, 82.8))
def crossvit_18_dagger_240(**overrides: Any) -> CrossViT:
    return _make("crossvit_18_dagger_240", overrides)


@register_model(_info(44.6, 32.4, 83.9, img=408))
def crossvit_18_dagger_408(**overrides: Any) -> CrossViT:
    return _make("crossvit_18_dagger_408", overrides)
