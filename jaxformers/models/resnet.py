"""ResNet (v1.5, torchvision / timm layout): ResNet-18/34/50/101/152.

Paper: "Deep Residual Learning for Image Recognition", He, Zhang, Ren, Sun, CVPR 2016, arXiv 1512.03385.
Weights and names: timm (huggingface/pytorch-image-models, ``timm/models/resnet.py``); the default
timm weights are "ResNet strikes back" recipes (``resnet18/34/50.a1_in1k``, ``resnet101/152.a1h_in1k``).
Parameter names follow timm's so its state dicts convert one to one (``convert_timm_resnet``):
``jaxformers.load_pretrained("resnet50", "resnet50.pth")`` (BN running statistics go to ``batch_stats``).

Architecture (timm's default ``ResNet``, torchvision's ``resnet*``):
- Stem: conv 7x7 stride 2 (64, no bias) -> BN -> ReLU -> max-pool 3x3 stride 2 (padding 1).
- Four stages of ``depth[i]`` blocks with ``channels[i]`` = 64, 128, 256, 512 planes, the first
  block of stages 2-4 with stride 2 on its 3x3 convolution (ResNet v1.5; the paper's v1 strides the
  first 1x1 of the bottleneck). BasicBlock (18, 34): 3x3 -> BN -> ReLU -> 3x3 -> BN. Bottleneck
  (50, 101, 152): 1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU -> 1x1 (4x planes) -> BN. The shortcut is
  the identity, or conv 1x1 (stride) -> BN where the shape changes. Residual add, then ReLU.
- BatchNorm eps 1e-5, momentum 0.1 (torch; Flax's 0.9). The last BN of each block starts at gamma
  = 0 (``zero_init_last``, timm's default), convolutions at He-normal fan-out as timm.
- Head: global average pool -> (dropout ``drop_rate``) -> Linear ``fc``. Stochastic depth
  ``drop_path_rate`` on each residual branch, linear over all blocks as timm.

Dense-feature contract (``jaxformers.layers.features``): ``forward_features`` gives the four stage
outputs ``{4: layer1, 8: layer2, 16: layer3, 32: layer4}`` (timm's ``features_only=True,
out_indices=(1, 2, 3, 4)``), ``pre_logits`` the pooled (B, C).

Seam for binarized / quantized ResNets (no forked model file): the field ``conv`` is the factory of
every convolution *inside the residual branches* (conv1, conv2 and, for bottlenecks, conv3 of each
block). It is called like ``jaxformers.layers.Conv``::

    conv(features, (k, k), strides=s, padding=p, use_bias=False, kernel_init=..., dtype=..., param_dtype=...,
         name="conv1")

and must return a Linen module mapping NHWC -> NHWC (e.g. a binary convolution that binarizes its
input activations and weights with its own extra parameters); a module whose ``takes_train`` is True
is called as ``conv(x, train=train)``. The stem convolution, the 1x1
shortcut convolutions and ``fc`` stay full precision (the convention of Bi-Real, ReCU and BiPer).
``act`` is the nonlinearity after each BN (ReLU; BiPer's ImageNet ResNets use hardtanh). Param
names do not depend on either field, so a float checkpoint loads into a binarized model with the
same converter.

Deviations from timm: images are NHWC. The ``fc`` layer starts from a truncated normal (std 0.02)
instead of torch's uniform default. timm's options beyond the plain ResNet (deep / avg-down stems,
``avg_down`` shortcuts, grouped ResNeXt convolutions, anti-aliasing, attention blocks) are not built.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, batch_norm_params, conv2d, dense_params
from jaxformers.layers import BatchNorm, Conv, Dense, DropPath, check_image
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

MAP_AXES = ("act_batch", None, None, "act_embed")
# timm: kaiming_normal_(mode="fan_out", nonlinearity="relu") on every convolution.
HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
EXPANSION = {"basic": 1, "bottleneck": 4}


class Shortcut(nn.Module):
    """conv 1x1 (stride) -> BN: the projection shortcut where a block changes shape (timm ``downsample``)."""

    features: int
    strides: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.features, (1, 1), strides=self.strides, padding=0, use_bias=False, kernel_init=HE_FAN_OUT,
                 name="conv", **kw)(x)
        return BatchNorm(train=train, name="bn", **kw)(x)


class ResidualBlock(nn.Module):
    """BasicBlock (``kind="basic"``: 3x3, 3x3) or Bottleneck (``"bottleneck"``: 1x1, 3x3 with the stride,
    1x1 to 4x planes), each convolution followed by BN; residual add, then ``act``.

    Params: ``conv{i}`` / ``bn{i}`` (i = 1, 2[, 3]) and ``downsample`` (a :class:`Shortcut`) where the
    shape changes. ``conv`` builds the branch convolutions (the binarization seam, module docstring)."""

    planes: int
    kind: Literal["basic", "bottleneck"] = "basic"
    strides: int = 1
    drop_path: float = 0.0
    zero_init_last: bool = True
    conv: Callable[..., nn.Module] = Conv
    act: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = self.planes * EXPANSION[self.kind]
        if self.kind == "basic":
            layers = [(self.planes, 3, self.strides), (out, 3, 1)]
        else:
            layers = [(self.planes, 1, 1), (self.planes, 3, self.strides), (out, 1, 1)]
        y = x
        for i, (c, k, s) in enumerate(layers, start=1):
            conv = self.conv(c, (k, k), strides=s, padding=k // 2, use_bias=False, kernel_init=HE_FAN_OUT,
                             name=f"conv{i}", **kw)
            y = conv(y, train=train) if getattr(conv, "takes_train", False) else conv(y)
            last = i == len(layers)
            init = nn.initializers.zeros_init() if last and self.zero_init_last else nn.initializers.ones_init()
            y = BatchNorm(train=train, scale_init=init, name=f"bn{i}", **kw)(y)
            if not last:
                y = self.act(y)
        y = DropPath(self.drop_path)(y, train=train)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out:
            shortcut = Shortcut(out, self.strides, name="downsample", **kw)(x, train)
        return constrain(self.act(y + shortcut), MAP_AXES)


class ResNet(FeatureBackbone):
    """ResNet v1.5 with timm's names: stem, four stages of residual blocks, average pool, ``fc``."""

    block: Literal["basic", "bottleneck"] = "basic"
    depth: Sequence[int] = (2, 2, 2, 2)
    channels: Sequence[int] = (64, 128, 256, 512)
    stem_channels: int = 64  # timm's plain stem is always 64 wide (its stem_width is for deep stems)
    in_chans: int = 3
    num_classes: int = 1000
    img_size: int | tuple[int, int] = 224  # the default input (example_inputs); any size runs
    zero_init_last: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    conv: Callable[..., nn.Module] = Conv
    act: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def num_features(self) -> int:
        return self.channels[-1] * EXPANSION[self.block]

    def _validate(self) -> None:
        if self.block not in EXPANSION:
            raise ValueError(f"block must be 'basic' or 'bottleneck'; got {self.block!r}")
        if not (len(self.depth) == len(self.channels) == 4) or min(self.depth) < 1:
            raise ValueError(f"depth and channels need 4 entries (one per stage), depth >= 1; got depth={self.depth}, "
                             f"channels={self.channels}")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes); ``output`` selects the dense-feature contract's other outputs
        (``jaxformers.layers.features``): ``forward_features`` gives the four stage outputs
        ``{4: ..., 8: ..., 16: ..., 32: ...}`` (NHWC), ``pre_logits`` the pooled (B, C). In training
        mode BN uses batch statistics: ``apply(..., train=True, mutable=["batch_stats"])``."""
        check_output(output, "ResNet")
        self._validate()
        check_image(x, in_chans=self.in_chans)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.stem_channels, (7, 7), strides=2, padding=3, use_bias=False, kernel_init=HE_FAN_OUT, name="conv1",
                 **kw)(x)
        x = self.act(BatchNorm(train=train, name="bn1", **kw)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = constrain(x, MAP_AXES)
        total, n = sum(self.depth), 0
        features = {}
        for s, (blocks, planes) in enumerate(zip(self.depth, self.channels)):
            for j in range(blocks):
                rate = self.drop_path_rate * n / max(total - 1, 1)
                x = ResidualBlock(planes, self.block, 2 if (j == 0 and s > 0) else 1, rate, self.zero_init_last,
                                  self.conv, self.act, name=f"layer{s + 1}_{j}", **kw)(x, train)
                n += 1
            features[4 * 2 ** s] = x
        if output == "features":
            return features
        pooled = x.mean(axis=(1, 2))
        logits = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if self.num_classes:
            logits = Dense(self.num_classes, axes=("embed", "classes"), name="fc", **kw)(logits)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# timm checkpoint converter


def convert_timm_resnet(sd: StateDict, model: ResNet, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """timm (or torchvision) ``ResNet`` state dict (``conv1``, ``bn1``, ``layer{s}.{j}.*``, ``fc``) -> our
    flat ``params/...`` and ``batch_stats/...`` variables."""
    out = {"params/conv1/kernel": conv2d(sd["conv1.weight"]), **batch_norm_params(sd, "bn1", "bn1")}
    convs = 2 if model.block == "basic" else 3
    for s, blocks in enumerate(model.depth):
        for j in range(blocks):
            t, o = f"layer{s + 1}.{j}.", f"layer{s + 1}_{j}/"
            for i in range(1, convs + 1):
                out[f"params/{o}conv{i}/kernel"] = conv2d(sd[f"{t}conv{i}.weight"])
                out.update(batch_norm_params(sd, f"{t}bn{i}", f"{o}bn{i}"))
            if f"params/{o}downsample/conv/kernel" in expected:
                out[f"params/{o}downsample/conv/kernel"] = conv2d(sd[f"{t}downsample.0.weight"])
                out.update(batch_norm_params(sd, f"{t}downsample.1", f"{o}downsample/bn"))
    if model.num_classes and "fc.weight" in sd:
        out.update(dense_params(sd, "fc", "params/fc"))
    sd.skip("fc.weight", "fc.bias")
    return out


# ---------------------------------------------------------------------------------------------
# Variants (timm names). Params: timm's exact counts (1000 classes). GMACs at 224 (timm's model cards).
# top-1: "ResNet strikes back" (arXiv 2110.00476), A1 recipe, 224 test resolution: the recipe of
# timm's a1 weights (resnet101 / resnet152 default to the a1h weights, trained with a variant of it).

VARIANTS = {
    "resnet18": dict(block="basic", depth=(2, 2, 2, 2)),
    "resnet34": dict(block="basic", depth=(3, 4, 6, 3)),
    "resnet50": dict(block="bottleneck", depth=(3, 4, 6, 3)),
    "resnet101": dict(block="bottleneck", depth=(3, 4, 23, 3)),
    "resnet152": dict(block="bottleneck", depth=(3, 8, 36, 3)),
}
TIMM_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
               "resnet152": 60_192_808}


def _info(name: str, flops_g: float, top1: float | None) -> ModelInfo:
    return ModelInfo(paper="Deep Residual Learning for Image Recognition", arxiv="1512.03385",
                     repo="huggingface/pytorch-image-models", input_size=(224, 224, 3),
                     params_m=round(TIMM_PARAMS[name] / 1e6, 2), flops_g=flops_g, top1=top1,
                     converter=convert_timm_resnet)


def _make(name: str, overrides: dict[str, Any]) -> ResNet:
    return ResNet(**{**VARIANTS[name], **overrides})


@register_model(_info("resnet18", 1.8, 71.5))
def resnet18(**overrides: Any) -> ResNet:
    """ResNet-18: BasicBlocks (2, 2, 2, 2)."""
    return _make("resnet18", overrides)


@register_model(_info("resnet34", 3.7, 76.4))
def resnet34(**overrides: Any) -> ResNet:
    """ResNet-34: BasicBlocks (3, 4, 6, 3)."""
    return _make("resnet34", overrides)


@register_model(_info("resnet50", 4.1, 80.4))
def resnet50(**overrides: Any) -> ResNet:
    """ResNet-50: Bottlenecks (3, 4, 6, 3)."""
    return _make("resnet50", overrides)


@register_model(_info("resnet101", 7.8, 81.5))
def resnet101(**overrides: Any) -> ResNet:
    """ResNet-101: Bottlenecks (3, 4, 23, 3)."""
    return _make("resnet101", overrides)


@register_model(_info("resnet152", 11.6, 82.0))
def resnet152(**overrides: Any) -> ResNet:
    """ResNet-152: Bottlenecks (3, 8, 36, 3)."""
    return _make("resnet152", overrides)
