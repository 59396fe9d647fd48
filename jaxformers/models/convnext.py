"""ConvNeXt: a pure convolutional network modernised after the vision transformers.

Paper: "A ConvNet for the 2020s", Liu et al., CVPR 2022, arXiv 2201.03545. Official code:
facebookresearch/ConvNeXt (MIT). Parameter names follow timm's ``convnext.py`` (timm 1.0), so timm
checkpoints convert one to one and the official ones through the same renaming timm applies
(``convert_timm_convnext``); registered names and parameter counts are timm's.

Architecture: stem conv 4x4 stride 4 -> LayerNorm; four stages, each but the first starting with
LayerNorm -> conv 2x2 stride 2; blocks: depthwise conv 7x7 -> LayerNorm -> Linear 4C -> GELU ->
Linear C -> layer scale (init 1e-6) -> drop path -> residual. Head: global average pool ->
LayerNorm -> Linear. LayerNorm eps 1e-6 everywhere.

Dense prediction: ``forward_features`` returns ``{4: ..., 8: ..., 16: ..., 32: ...}``, the NHWC
output of each stage keyed by its stride (no extra norms: kMaX-DeepLab reads the raw stage
outputs). Deviation: height and width must be multiples of 32, so that every stride divides the
image (kMaX-DeepLab's official backbone zero-pads its 32k+1 crops instead; multiple-of-32 inputs
need no padding).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, conv2d, linear
from jaxformers.layers import Conv, Dense, DropPath, LayerNorm, LayerScale, Mlp, check_image, maybe_remat
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

MAP_AXES = ("act_batch", None, None, "act_embed")


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> LN -> MLP (4x, GELU) -> layer scale -> drop path, plus the input (timm names
    ``conv_dw``, ``norm``, ``mlp``, ``gamma``)."""

    kernel_size: int = 7
    mlp_ratio: float = 4.0
    layer_scale_init: float | None = 1e-6
    drop_path: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        k = self.kernel_size
        y = Conv(dim, (k, k), padding=k // 2, feature_group_count=dim, axes=(None, "conv_out"), name="conv_dw",
                 **kw)(x)
        y = LayerNorm(1e-6, name="norm", **kw)(y)
        y = Mlp(int(self.mlp_ratio * dim), name="mlp", **kw)(y, train=train)
        if self.layer_scale_init is not None:
            y = LayerScale(self.layer_scale_init, param_dtype=self.param_dtype, name="ls")(y)
        return constrain(x + DropPath(self.drop_path)(y, train=train), MAP_AXES)


class ConvNeXt(FeatureBackbone):
    """ConvNeXt: patchify stem, four stages of ConvNeXt blocks with strided-conv downsampling,
    pool -> LN -> Linear head."""

    in_chans: int = 3
    num_classes: int = 1000
    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    kernel_size: int = 7
    layer_scale_init: float | None = 1e-6
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def stride(self) -> int:
        return 4 * 2 ** (len(self.depths) - 1)

    @property
    def widths(self) -> list[int]:
        return list(self.dims)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes) (the pooled features when ``num_classes`` is 0); ``output`` selects the
        dense-feature contract's other outputs (``jaxformers.layers.features``): ``forward_features``
        gives the stage outputs ``{4: ..., 8: ..., 16: ..., 32: ...}`` (NHWC), ``pre_logits`` the
        pooled, normalised (B, C) the head reads."""
        check_output(output, "ConvNeXt")
        if len(self.depths) != len(self.dims):
            raise ValueError(f"depths and dims need one entry per stage; got {self.depths}, {self.dims}")
        h, w = check_image(x, in_chans=self.in_chans)
        if h % self.stride or w % self.stride:
            raise ValueError(f"x is {h}x{w}, but ConvNeXt needs height and width divisible by {self.stride} "
                             f"(stem stride 4 x {len(self.depths) - 1} stride-2 downsamplings), so that every "
                             f"stride of its feature pyramid divides the image")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.dims[0], (4, 4), strides=4, padding="VALID", axes=(None, "conv_out"), name="stem_conv", **kw)(x)
        x = LayerNorm(1e-6, name="stem_norm", **kw)(x)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        block = maybe_remat(ConvNeXtBlock, self.remat)
        features, n = {}, 0
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if i > 0:
                x = LayerNorm(1e-6, name=f"stages_{i}_downsample_norm", **kw)(x)
                x = Conv(dim, (2, 2), strides=2, padding="VALID", name=f"stages_{i}_downsample_conv", **kw)(x)
            for j in range(depth):
                x = block(self.kernel_size, 4.0, self.layer_scale_init, float(rates[n]), name=f"stages_{i}_blocks_{j}",
                          **kw)(x, train)
                n += 1
            features[4 * 2 ** i] = x
        if output == "features":  # dense heads read the maps; the classifier's norm and head are not built
            return features
        pooled = LayerNorm(1e-6, name="head_norm", **kw)(x.mean(axis=(1, 2)))
        logits = pooled
        if self.num_classes:
            y = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
            logits = Dense(self.num_classes, axes=("embed", "classes"), name="head_fc", **kw)(y)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# timm / official checkpoint converter

_OFFICIAL = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}


def _timm_names(sd: StateDict) -> dict[str, str]:
    """timm name -> checkpoint key (official ``downsample_layers`` / ``dwconv`` / ``pwconv`` checkpoints
    are renamed as timm's ``checkpoint_filter_fn`` does)."""
    if "stem.0.weight" in sd:
        return {k: k for k in sd.keys()}
    names = {}
    for k in sd.keys():
        new = k.replace("downsample_layers.0.", "stem.")
        for i in range(1, 4):
            new = new.replace(f"downsample_layers.{i}.", f"stages.{i}.downsample.")
        parts = new.split(".")
        if parts[0] == "stages" and parts[2] != "downsample":
            parts.insert(2, "blocks")
        new = ".".join(parts)
        for a, b in _OFFICIAL.items():
            new = new.replace(f".{a}.", f".{b}.")
        if new.startswith("norm."):
            new = "head." + new
        if new.startswith("head.weight") or new.startswith("head.bias"):
            new = new.replace("head.", "head.fc.")
        names[new] = k
    return names


def convert_timm_convnext(sd: StateDict, model: ConvNeXt, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """timm (or official) ``ConvNeXt`` state dict -> our flat ``params/...`` variables."""
    names = _timm_names(sd)

    def get(name):
        return sd[names.get(name, name)]

    def norm(t, o):
        return {f"params/{o}/scale": get(t + ".weight"), f"params/{o}/bias": get(t + ".bias")}

    def conv(t, o):
        return {f"params/{o}/kernel": conv2d(get(t + ".weight")), f"params/{o}/bias": get(t + ".bias")}

    out = {**conv("stem.0", "stem_conv"), **norm("stem.1", "stem_norm")}
    if "head.norm.weight" in names or "params/head_norm/scale" in expected:  # dense backbones have none
        out.update(norm("head.norm", "head_norm"))
    if model.num_classes and "head.fc.weight" in names:
        out.update({"params/head_fc/kernel": linear(get("head.fc.weight")), "params/head_fc/bias": get("head.fc.bias")})
    sd.skip(*(names[k] for k in ("head.fc.weight", "head.fc.bias") if k in names))
    for i, depth in enumerate(model.depths):
        if i > 0:
            out.update({**norm(f"stages.{i}.downsample.0", f"stages_{i}_downsample_norm"),
                        **conv(f"stages.{i}.downsample.1", f"stages_{i}_downsample_conv")})
        for j in range(depth):
            t, o = f"stages.{i}.blocks.{j}", f"stages_{i}_blocks_{j}"
            out.update({**conv(t + ".conv_dw", o + "/conv_dw"), **norm(t + ".norm", o + "/norm")})
            for fc in ("fc1", "fc2"):
                out[f"params/{o}/mlp/{fc}/kernel"] = linear(get(f"{t}.mlp.{fc}.weight"))
                out[f"params/{o}/mlp/{fc}/bias"] = get(f"{t}.mlp.{fc}.bias")
            if model.layer_scale_init is not None:
                out[f"params/{o}/ls/gamma"] = get(t + ".gamma")
    return out


# ---------------------------------------------------------------------------------------------
# Variants (timm names). Params: timm's count (1000 classes); FLOPs and top-1: the paper's Table 1
# (ImageNet-1k training at 224).

VARIANTS = {
    "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "convnext_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
}

TIMM_PARAMS = {
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    "convnext_large": 197_767_336,
}


def _info(name: str, flops_g: float, top1: float) -> ModelInfo:
    return ModelInfo(paper="A ConvNet for the 2020s", arxiv="2201.03545", repo="facebookresearch/ConvNeXt",
                     input_size=(224, 224, 3), params_m=round(TIMM_PARAMS[name] / 1e6, 2), flops_g=flops_g,
                     top1=top1, converter=convert_timm_convnext)


def _build(name: str, overrides: dict[str, Any]) -> ConvNeXt:
    return ConvNeXt(**{**VARIANTS[name], **overrides})


@register_model(_info("convnext_tiny", 4.5, 82.1))
def convnext_tiny(**overrides: Any) -> ConvNeXt:
    """ConvNeXt-T."""
    return _build("convnext_tiny", overrides)


@register_model(_info("convnext_small", 8.7, 83.1))
def convnext_small(**overrides: Any) -> ConvNeXt:
    """ConvNeXt-S."""
    return _build("convnext_small", overrides)


@register_model(_info("convnext_base", 15.4, 83.8))
def convnext_base(**overrides: Any) -> ConvNeXt:
    """ConvNeXt-B."""
    return _build("convnext_base", overrides)


@register_model(_info("convnext_large", 34.4, 84.3))
def convnext_large(**overrides: Any) -> ConvNeXt:
    """ConvNeXt-L."""
    return _build("convnext_large", overrides)
