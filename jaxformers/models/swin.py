"""Swin Transformer: hierarchical vision transformer with shifted windows.

Paper: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", Liu et al., ICCV
2021, arXiv 2103.14030. Official code: microsoft/Swin-Transformer (MIT). Parameter names follow
timm's ``swin_transformer.py`` (timm 1.0), so timm checkpoints (and the official ones, whose patch
merging sits at the end of a stage) convert one to one (``convert_timm_swin``); the registered
names and parameter counts are timm's.

Architecture (timm / official classification code):
- Patch embedding: conv 4x4 stride 4 -> LayerNorm. Stage i > 0 starts with patch merging (2x2
  neighbours -> LayerNorm(4C) -> Linear 4C -> 2C, no bias).
- Blocks alternate W-MSA and SW-MSA (shift = window // 2) with a learned relative position bias
  (``jaxformers.layers.window``); MLP ratio 4, exact GELU, LayerNorm eps 1e-5 everywhere.
- Head: LayerNorm -> global average pool -> Linear.

Windows follow timm's rule for the model's ``img_size``: a window larger than a stage's map
shrinks to it (per axis) and that axis is not shifted (so the relative-position tables of such
stages are smaller, as in timm). Inputs of another size run with those windows, zero-padded to a
multiple of the window.

Dense prediction: ``forward_features`` returns ``{4: ..., 8: ..., 16: ..., 32: ...}``, the NHWC
output of each stage keyed by its stride (the contract every jaxformers backbone follows for dense
heads). ``always_partition=True`` gives the detection/segmentation Swin of the official
Swin-Transformer-Object-Detection / Mask2Former code and Hugging Face's ``SwinBackbone``: windows
never shrink, maps are padded to a multiple of the window after the norm and then shifted;
``out_norms=True`` adds one LayerNorm per stage output (``out_norm0``..``out_norm3``, the official
``norm{i}`` / Hugging Face ``hidden_states_norms``) in place of the final norm.

Binarized (``binary=BIVIT``, ``jaxformers.compress.binary``; *BiViT: Extremely Compressed Binary
Vision Transformers*, arXiv 2211.07091): every window block's q/k/v and output projections, its MLP
and its attention probabilities (softmax-aware binarization after the relative position bias and the
shift mask) are binarized as in ViT/DeiT; the patch embedding, the patch-merging reductions, the
norms, the relative position tables and the head stay float (as the patch embedding and the head of
BiViT's ViT). ``binary=None`` (the default) is the float Swin, checkpoints unchanged.

Deviations: height and width must be multiples of 32 (patch 4 x three merges), so every stride
of the feature pyramid divides the image exactly (timm pads odd maps instead).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, conv2d, heads_out, linear, qkv_fused
from jaxformers.layers import Dense, LayerNorm, PatchEmbed, check_image, maybe_remat, to_2tuple
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.window import PatchMerging, SwinBlock, effective_window
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.registry import ModelInfo, register_model


class SwinStage(nn.Module):
    """Patch merging (unless ``downsample`` is False) then ``depth`` Swin blocks, shifted every second."""

    dim: int
    depth: int
    num_heads: int
    windows: tuple[tuple[tuple[int, int], tuple[int, int]], ...]  # (window, shift) per block
    downsample: bool
    pad_first: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_paths: tuple[float, ...] = ()
    attention_dropout: float = 0.0
    dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    binary: Any = None  # jaxformers.compress.binary.BinaryRecipe for the blocks (see SwinTransformer.binary)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.downsample:
            x = PatchMerging(self.dim, name="downsample", **kw)(x)
        block = maybe_remat(SwinBlock, self.remat)
        for j in range(self.depth):
            window, shift = self.windows[j]
            x = block(self.num_heads, window, shift, self.pad_first, self.mlp_ratio, self.qkv_bias,
                      self.drop_paths[j] if self.drop_paths else 0.0, self.attention_dropout, self.dropout,
                      self.attention_impl, name=f"blocks_{j}", binary=self.binary, **kw)(x, train)
        return x


class SwinTransformer(FeatureBackbone):
    """Swin: patch embedding, four stages of (shifted) window blocks with patch merging, LN-pool head."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    always_partition: bool = False
    out_norms: bool = False
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    binary: Any = None  # jaxformers.compress.binary.BinaryRecipe (BIVIT): binarized window blocks

    @property
    def stride(self) -> int:
        return self.patch_size * 2 ** (len(self.depths) - 1)

    @property
    def widths(self) -> list[int]:
        return [self.embed_dim * 2 ** i for i in range(len(self.depths))]

    def stage_windows(self) -> list[tuple[tuple[tuple[int, int], tuple[int, int]], ...]]:
        """(window, shift) of every block of every stage, from ``img_size`` (timm's rule)."""
        grid = [-(-s // self.patch_size) for s in to_2tuple(self.img_size)]
        win = (self.window_size, self.window_size)
        out = []
        for i, depth in enumerate(self.depths):
            if i > 0:
                grid = [-(-g // 2) for g in grid]
            blocks = []
            for j in range(depth):
                shift = (win[0] // 2, win[1] // 2) if j % 2 else (0, 0)
                blocks.append(effective_window(tuple(grid), win, shift, self.always_partition))
            out.append(tuple(blocks))
        return out

    def _check(self, x: jax.Array) -> None:
        if not (len(self.depths) == len(self.num_heads)):
            raise ValueError(f"depths and num_heads need one entry per stage; got {self.depths}, {self.num_heads}")
        h, w = check_image(x, in_chans=self.in_chans)
        if h % self.stride or w % self.stride:
            raise ValueError(f"x is {h}x{w}, but Swin needs height and width divisible by {self.stride} (patch "
                             f"{self.patch_size} x {len(self.depths) - 1} patch merges), so that every stride of its "
                             f"feature pyramid divides the image")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes) (the pooled features when ``num_classes`` is 0); ``output`` selects the
        dense-feature contract's other outputs (``jaxformers.layers.features``): ``forward_features``
        gives the stage outputs ``{4: ..., 8: ..., 16: ..., 32: ...}`` (NHWC), ``pre_logits`` the
        pooled, normalised (B, C) the head reads."""
        check_output(output, "Swin")
        self._check(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(self.embed_dim, self.patch_size, self.in_chans, flatten=False, use_norm=True, norm_eps=1e-5,
                       name="patch_embed", **kw)(x)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        windows = self.stage_windows()
        features, n = {}, 0
        for i, depth in enumerate(self.depths):
            x = SwinStage(self.widths[i], depth, self.num_heads[i], windows[i], i > 0, self.always_partition,
                          self.mlp_ratio, self.qkv_bias, tuple(float(r) for r in rates[n:n + depth]),
                          self.attn_drop_rate, self.drop_rate, self.attention_impl, self.remat, name=f"layers_{i}",
                          binary=self.binary, **kw)(x, train)
            n += depth
            stride = self.patch_size * 2 ** i
            features[stride] = LayerNorm(1e-5, name=f"out_norm{i}", **kw)(x) if self.out_norms else x
        if output == "features":  # dense heads read the maps; the classifier's norm and head are not built
            return features
        if self.out_norms:
            pooled = features[stride].mean(axis=(1, 2))
        else:
            pooled = LayerNorm(1e-5, name="norm", **kw)(x).mean(axis=(1, 2))
        logits = pooled
        if self.num_classes:
            y = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
            logits = Dense(self.num_classes, axes=("embed", "classes"), name="head", **kw)(y)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# timm checkpoint converter


def _timm_keys(sd: StateDict) -> dict[str, str]:
    """Our name -> checkpoint key: official checkpoints merge patches at the end of a stage and call
    the classifier ``head``; timm merges at the start of the next and calls it ``head.fc``."""
    old = "layers.0.downsample.reduction.weight" in sd
    names = {}
    for k in sd.keys():
        if "relative_position_index" in k or "attn_mask" in k:
            sd.skip(k)
            continue
        new = k
        if old:
            new = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", new)
            new = new.replace("head.", "head.fc.")
        names[new] = k
    return names


def convert_timm_swin(sd: StateDict, model: SwinTransformer, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """timm (or official) ``SwinTransformer`` state dict -> our flat ``params/...`` variables."""
    keys = _timm_keys(sd)

    def get(name):
        return sd[keys.get(name, name)]

    out = {"params/patch_embed/proj/kernel": conv2d(get("patch_embed.proj.weight")),
           "params/patch_embed/proj/bias": get("patch_embed.proj.bias"),
           "params/patch_embed/norm/scale": get("patch_embed.norm.weight"),
           "params/patch_embed/norm/bias": get("patch_embed.norm.bias")}
    if not model.out_norms:
        out["params/norm/scale"], out["params/norm/bias"] = get("norm.weight"), get("norm.bias")
    if model.num_classes and "head.fc.weight" in keys:
        out["params/head/kernel"] = linear(get("head.fc.weight"))
        out["params/head/bias"] = get("head.fc.bias")
    sd.skip(*(keys[k] for k in ("head.fc.weight", "head.fc.bias") if k in keys))
    for i, depth in enumerate(model.depths):
        t, o = f"layers.{i}.", f"params/layers_{i}/"
        if i > 0:
            out.update({o + "downsample/norm/scale": get(t + "downsample.norm.weight"),
                        o + "downsample/norm/bias": get(t + "downsample.norm.bias"),
                        o + "downsample/reduction/kernel": linear(get(t + "downsample.reduction.weight"))})
        out.update(swin_block_params(get, f"{t}blocks.", f"{o}blocks_", depth, model.num_heads[i]))
    return out


def swin_block_params(get, t: str, o: str, depth: int, num_heads: int) -> dict[str, np.ndarray]:
    """timm ``SwinTransformerBlock`` ``{t}{j}.*`` -> our ``SwinBlock`` ``{o}{j}/...`` for j < depth."""
    out = {}
    for j in range(depth):
        a, b = f"{t}{j}.", f"{o}{j}/"
        out.update({
            b + "norm1/scale": get(a + "norm1.weight"), b + "norm1/bias": get(a + "norm1.bias"),
            b + "norm2/scale": get(a + "norm2.weight"), b + "norm2/bias": get(a + "norm2.bias"),
            b + "attn/relative_position_bias_table": get(a + "attn.relative_position_bias_table"),
            b + "attn/mha/qkv/kernel": qkv_fused(get(a + "attn.qkv.weight"), num_heads),
            b + "attn/mha/qkv/bias": qkv_fused(get(a + "attn.qkv.bias"), num_heads),
            b + "attn/mha/proj/kernel": heads_out(get(a + "attn.proj.weight"), num_heads),
            b + "attn/mha/proj/bias": get(a + "attn.proj.bias"),
            b + "mlp/fc1/kernel": linear(get(a + "mlp.fc1.weight")), b + "mlp/fc1/bias": get(a + "mlp.fc1.bias"),
            b + "mlp/fc2/kernel": linear(get(a + "mlp.fc2.weight")), b + "mlp/fc2/bias": get(a + "mlp.fc2.bias"),
        })
    return out


# ---------------------------------------------------------------------------------------------
# Variants (timm names). Params: timm's count (1000 classes); FLOPs and top-1: the paper's Table 1.

VARIANTS = {
    "swin_tiny_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base_patch4_window7_224": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_base_patch4_window12_384": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                                          window_size=12, img_size=384),
    "swin_large_patch4_window12_384": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                                           window_size=12, img_size=384),
}

# timm 1.0's parameter counts (1000 classes).
TIMM_PARAMS = {
    "swin_tiny_patch4_window7_224": 28_288_354,
    "swin_small_patch4_window7_224": 49_606_258,
    "swin_base_patch4_window7_224": 87_768_224,
    "swin_base_patch4_window12_384": 87_903_584,
    "swin_large_patch4_window12_384": 196_735_516,
}


def _info(name: str, flops_g: float | None, top1: float | None) -> ModelInfo:
    size = VARIANTS[name].get("img_size", 224)
    return ModelInfo(paper="Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
                     arxiv="2103.14030", repo="microsoft/Swin-Transformer", input_size=(size, size, 3),
                     params_m=round(TIMM_PARAMS[name] / 1e6, 2), flops_g=flops_g, top1=top1,
                     converter=convert_timm_swin)


def _build(name: str, overrides: dict[str, Any]) -> SwinTransformer:
    return SwinTransformer(**{**VARIANTS[name], **overrides})


@register_model(_info("swin_tiny_patch4_window7_224", 4.5, 81.3))
def swin_tiny_patch4_window7_224(**overrides: Any) -> SwinTransformer:
    """Swin-T (ImageNet-1k, 224)."""
    return _build("swin_tiny_patch4_window7_224", overrides)


@register_model(_info("swin_small_patch4_window7_224", 8.7, 83.0))
def swin_small_patch4_window7_224(**overrides: Any) -> SwinTransformer:
    """Swin-S (ImageNet-1k, 224)."""
    return _build("swin_small_patch4_window7_224", overrides)


@register_model(_info("swin_base_patch4_window7_224", 15.4, 83.5))
def swin_base_patch4_window7_224(**overrides: Any) -> SwinTransformer:
    """Swin-B (224; the paper's 83.5 is ImageNet-1k training, timm's weights are 22k-pretrained)."""
    return _build("swin_base_patch4_window7_224", overrides)


@register_model(_info("swin_base_patch4_window12_384", 47.0, 84.5))
def swin_base_patch4_window12_384(**overrides: Any) -> SwinTransformer:
    """Swin-B at 384 with 12x12 windows."""
    return _build("swin_base_patch4_window12_384", overrides)


@register_model(_info("swin_large_patch4_window12_384", 103.9, 87.3))
def swin_large_patch4_window12_384(**overrides: Any) -> SwinTransformer:
    """Swin-L at 384 with 12x12 windows (ImageNet-22k pre-trained; top-1 after 1k fine-tuning)."""
    return _build("swin_large_patch4_window12_384", overrides)
