"""BiPer's networks: CIFAR ResNet-20 and VGG-Small, and ImageNet ResNet-18/34, with BiPer convolutions.

Paper: "BiPer: Binary Neural Networks using a Periodic Function", Vargas, Jacome, Hinojosa, Arguello,
CVPR 2024, arXiv 2404.01278. Official code: edmav4/BiPer (``cifar10/models_cifar/resnet.py``
``resnet20_1w1a``, ``vgg.py`` ``vgg_small_1w1a``; ``modules/binarized_modules.py``), based on ReCU.

The binarized convolution is ``jaxformers.compress.binary.BinaryConv`` under the ``binary`` field
(default ``BIPER``: stage-2 weights sign(sin(ωW)) with ω = 20, ApproxSign inputs a / std(a) in
training, a learnable per-channel output scale α); ``binary=None`` builds the same network with float
convolutions, ``binary=BIPER.replace(stage=1)`` the stage-1 network (sin(ωW) real weights).
Train with ``compress.binary.biper_penalty`` (τ·Σ mean sin²(ωW)) added to the cross-entropy.

What stays float, as in the official code: the first convolution, every BatchNorm, the classifier
(and ResNet-20's BatchNorm1d before it). ResNet-20 (He et al. 2016's CIFAR net): 3×3 stem to 16
channels, three stages of three basic blocks (16, 32, 64 channels), each block
x → hardtanh(BN(conv1(x)) + shortcut(x)) → hardtanh(BN(conv2(·)) + ·) (a shortcut per convolution,
as the official ``BasicBlock_1w1a``), option-A shortcuts (2×2 average pooling and zero channel
padding), global average pooling, BatchNorm1d, linear. VGG-Small: conv0 (float, 128) then five
binarized 3×3 convolutions (128, 256, 256, 512, 512) with max pooling after the 1st, 3rd and 5th,
each conv → [pool] → BN → hardtanh, then a linear layer on the flattened 4×4×512 map.

ImageNet ResNet-18/34 (``biper_resnet18`` / ``biper_resnet34``) are ``jaxformers.models.resnet.ResNet``
(timm's names and layout, so timm's float checkpoints load with its converter) with ``conv=BIPER.conv``
(the residual branches' 3×3 convolutions binarized; stem, 1×1 shortcuts and fc float, as the official
code) and ``act=hardtanh``: timm's parameters + one α per binarized output channel (11,689,512 + 3,840
= 11,693,352 for ResNet-18, the README's 11.69M; 21,797,672 + 7,296 = 21,804,968 for ResNet-34,
21.81M). Deviation for these: the official ImageNet model is Bi-Real-style (a shortcut around each
convolution, a BatchNorm1d before fc); ours keeps timm's BasicBlock so that the float ResNets'
checkpoints and parity carry over.

Parameter counts: ResNet-20 269,850 float + 672 α = 270,522 (the README's 0.27M); VGG-Small
4,660,106 + 1,664 α = 4,661,770 (4.66M). Deviations: the CIFAR code's unused ``beta`` (ones,
requires_grad=False) is not created; NHWC layout (the flattening order before VGG's classifier is
H, W, C instead of C, H, W).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.compress.binary import BIPER
from jaxformers.layers import BatchNorm, Conv, Dense, check_image
from jaxformers.layers.features import FeatureBackbone, check_output, select_output
from jaxformers.models.resnet import ResNet, convert_timm_resnet
from jaxformers.registry import ModelInfo, register_model


def hardtanh(x: jax.Array) -> jax.Array:
    return jnp.clip(x, -1.0, 1.0)


def _conv(binary, features, stride, name, dtype, param_dtype):
    if binary is None:
        return Conv(features, (3, 3), strides=stride, padding=1, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.kaiming_normal(), name=name)
    return binary.conv(features, (3, 3), strides=stride, padding=1, dtype=dtype, param_dtype=param_dtype, name=name)


def _call(conv, x, train):
    return conv(x) if isinstance(conv, nn.Conv) else conv(x, train=train)


class CifarBasicBlock(nn.Module):
    """BiPer's ``BasicBlock_1w1a`` (hardtanh, a shortcut around each convolution, option-A downsampling)."""

    planes: int
    stride: int = 1
    binary: Any = BIPER
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = _call(_conv(self.binary, self.planes, self.stride, "conv1", **kw), x, train)
        out = BatchNorm(train=train, name="bn1", **kw)(out)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = nn.avg_pool(x, (2, 2), (2, 2))
            pad = 0 if self.planes == x.shape[-1] else self.planes // 4
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (pad, pad)))
        out = hardtanh(out + shortcut)
        y = _call(_conv(self.binary, self.planes, 1, "conv2", **kw), out, train)
        return hardtanh(BatchNorm(train=train, name="bn2", **kw)(y) + out)


class ResNetCifar(FeatureBackbone):
    """CIFAR ResNet-(6n+2) with BiPer convolutions (n = ``blocks`` per stage; 3 = ResNet-20);
    ``forward_features``: the three stages' outputs at strides 1, 2, 4."""

    blocks: int = 3
    num_classes: int = 10
    img_size: int = 32
    in_chans: int = 3
    binary: Any = BIPER
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: str = "logits"):
        check_output(output, "biper_resnet20")
        check_image(x, in_chans=self.in_chans)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=nn.initializers.kaiming_normal(), name="conv1",
                 **kw)(x)
        x = hardtanh(BatchNorm(train=train, name="bn1", **kw)(x))
        features = {}
        for s, planes in enumerate((16, 32, 64)):
            for b in range(self.blocks):
                x = CifarBasicBlock(planes, 2 if s and not b else 1, self.binary, name=f"layer{s + 1}_{b}", **kw)(x, train)
            features[2 ** s] = x
        if output == "features":
            return features
        pooled = BatchNorm(train=train, axis_name="embed", name="bn2", **kw)(x.mean(axis=(1, 2)))
        logits = Dense(self.num_classes, axes=("embed", "classes"), name="linear", **kw)(pooled)
        return select_output(output, features, pooled, logits)


class VGGSmall(FeatureBackbone):
    """BiPer's ``vgg_small_1w1a``: a float 3×3 stem then five binarized 3×3 convolutions;
    ``forward_features``: the maps after each pooling, at strides 2, 4, 8; pre-logits: the flattened map."""

    num_classes: int = 10
    img_size: int = 32
    in_chans: int = 3
    binary: Any = BIPER
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: str = "logits"):
        check_output(output, "biper_vgg_small")
        check_image(x, in_chans=self.in_chans, divisible_by=8)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(128, (3, 3), padding=1, use_bias=False, kernel_init=nn.initializers.kaiming_normal(), name="conv0",
                 **kw)(x)
        x = hardtanh(BatchNorm(train=train, name="bn0", **kw)(x))
        features = {}
        for i, (planes, pool) in enumerate(((128, True), (256, False), (256, True), (512, False), (512, True)), start=1):
            x = _call(_conv(self.binary, planes, 1, f"conv{i}", **kw), x, train)
            if pool:
                x = nn.max_pool(x, (2, 2), (2, 2))
            x = hardtanh(BatchNorm(train=train, name=f"bn{i}", **kw)(x))
            if pool:
                features[2 ** len(features) * 2] = x
        if output == "features":
            return features
        flat = x.reshape(x.shape[0], -1)
        logits = Dense(self.num_classes, axes=("embed", "classes"), name="fc", **kw)(flat)
        return select_output(output, features, flat, logits)


def _info(params_m, top1, input_size=(32, 32, 3), converter=None):
    return ModelInfo(paper="BiPer: Binary Neural Networks using a Periodic Function", arxiv="2404.01278",
                     repo="edmav4/BiPer", input_size=input_size, params_m=params_m, top1=top1, converter=converter)


@register_model(_info(0.270522, 86.98))
def biper_resnet20(**overrides: Any) -> ResNetCifar:
    """BiPer ResNet-20 for CIFAR-10 (stage 2, ω = 20): 270,522 parameters; CIFAR-10 top-1 86.98 (README)."""
    return ResNetCifar(**{"blocks": 3, **overrides})


@register_model(_info(4.661770, 92.46))
def biper_vgg_small(**overrides: Any) -> VGGSmall:
    """BiPer VGG-Small for CIFAR-10: 4,661,770 parameters; CIFAR-10 top-1 92.46 (README)."""
    return VGGSmall(**overrides)


@register_model(_info(11.693352, 61.40, (224, 224, 3), convert_timm_resnet))
def biper_resnet18(**overrides: Any) -> ResNet:
    """BiPer ResNet-18 (ImageNet, stage 2, ω = 20): timm's resnet18 with BiPer branch convolutions and
    hardtanh; 11,693,352 parameters; ImageNet top-1 61.40 (README). Loads timm's float checkpoint."""
    return ResNet(**{"depth": (2, 2, 2, 2), "conv": BIPER.conv, "act": hardtanh, **overrides})


@register_model(_info(21.804968, 65.73, (224, 224, 3), convert_timm_resnet))
def biper_resnet34(**overrides: Any) -> ResNet:
    """BiPer ResNet-34 (ImageNet): 21,804,968 parameters; ImageNet top-1 65.73 (README)."""
    return ResNet(**{"depth": (3, 4, 6, 3), "conv": BIPER.conv, "act": hardtanh, **overrides})
