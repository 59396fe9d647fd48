"""UperNet: a pyramid-pooling + FPN semantic segmentation head over any jaxformers backbone.

Paper: "Unified Perceptual Parsing for Scene Understanding", Xiao et al., ECCV 2018, arXiv
1807.10221. The head follows mmsegmentation's ``UPerHead`` and its auxiliary ``FCNHead``
(open-mmlab/mmsegmentation 0.x ``mmseg/models/decode_heads/{uper_head,psp_head,fcn_head}.py``) as
configured in ``configs/_base_/models/upernet_r50.py``, the base of the official ViT-CoMer ADE20K
configs (Traffic-X/ViT-CoMer ``segmentation/configs/ade20k/upernet_vit_comer_*_512_160k_ade20k.py``):

- ``decode_head`` (UPerHead, ``channels`` 512): PPM on the stride-32 map (adaptive average pools of
  1, 2, 3, 6 cells, each 1x1 conv + BN + ReLU, bilinearly upsampled back) -> concatenated with the
  map -> 3x3 conv + BN + ReLU (``bottleneck``); 1x1 conv + BN + ReLU laterals of the other maps;
  top-down sums (bilinear upsampling, ``align_corners=False``); 3x3 conv + BN + ReLU on each summed
  map but the top; all upsampled to stride 4, concatenated, 3x3 conv + BN + ReLU
  (``fpn_bottleneck``); dropout 0.1; 1x1 ``conv_seg`` to the classes.
- ``auxiliary_head`` (FCNHead on the stride-16 map): 3x3 conv (256) + BN + ReLU, dropout 0.1, 1x1
  ``conv_seg``. mmsegmentation weighs its cross-entropy 0.4 (``upernet_loss``). Its parameters are
  part of the model (and of the papers' parameter counts); it is computed only when training.

``UperNet(backbone=<any FeatureBackbone module>, num_classes=...)`` works over every jaxformers
backbone whose ``forward_features`` gives the ``in_strides`` maps (default 4, 8, 16, 32: ResNet, Swin,
ConvNeXt, BiFormer, CSWin, ViT-CoMer; ``backbone_overrides`` of the registered segmenters configure
their ViT-CoMer). ``__call__`` returns the stride-4 logits (B, H/4, W/4, classes); with
``train=True`` an ``UperNetOutput(logits, aux_logits)`` (aux at stride 16). mmsegmentation resizes
the logits to the image for the loss and at inference (``jaxformers.segmentation.semantic_cross_entropy``
/ ``semantic_prediction`` do the same).

Registered: ``upernet_vit_comer_{tiny,small,base}`` (ViT-CoMer, arXiv 2403.07392, ADE20K 512 px,
150 classes; ``top1`` holds the single-scale mIoU). Deviations: SyncBN is BatchNorm.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers import BatchNorm, Conv, check_image, check_image_strides, check_pyramid
from jaxformers.layers.interpolate import resize_bilinear
from jaxformers.models.vit_comer import VARIANTS as COMER_VARIANTS
from jaxformers.models.vit_comer import ViTCoMer
from jaxformers.models.vit_comer_convert import convert_vit_comer
from jaxformers.registry import ModelInfo, register_model
from jaxformers.segmentation.semantic import semantic_cross_entropy


class UperNetOutput(NamedTuple):
    """Training outputs: the decode head's stride-4 logits and the auxiliary head's stride-16 logits."""

    logits: jax.Array
    aux_logits: jax.Array


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """NHWC ``torch.nn.AdaptiveAvgPool2d(size)``: cell i averages rows floor(i*H/s) .. ceil((i+1)*H/s)."""

    def matrix(n):
        m = np.zeros((size, n), np.float32)
        for i in range(size):
            lo, hi = (i * n) // size, math.ceil((i + 1) * n / size)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return jnp.asarray(m, x.dtype)

    x = jnp.einsum("oh,bhwc->bowc", matrix(x.shape[1]), x)
    return jnp.einsum("pw,bowc->bopc", matrix(x.shape[2]), x)


def _conv_init(key, shape, dtype=jnp.float32):
    """mmcv ``ConvModule``'s kaiming init (fan_out, ReLU gain)."""
    kh, kw, _, out = shape
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (kh * kw * out))


class ConvModule(nn.Module):
    """mmcv ``ConvModule``: conv (no bias) -> BatchNorm -> ReLU; names ``conv`` and ``bn``."""

    features: int
    kernel: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.features, (self.kernel, self.kernel), padding=self.kernel // 2, use_bias=False,
                 kernel_init=_conv_init, name="conv", **kw)(x)
        return nn.relu(BatchNorm(train=train, name="bn", **kw)(x))


def _classifier(x, num_classes, dropout, train, kw):
    x = nn.Dropout(dropout)(x, deterministic=not train)
    return Conv(num_classes, (1, 1), axes=("conv_in", "classes"), kernel_init=nn.initializers.normal(0.01),
                name="conv_seg", **kw)(x)


class UPerHead(nn.Module):
    """mmsegmentation ``UPerHead`` over a stride-ordered list of NHWC maps (module docstring)."""

    num_classes: int
    channels: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[jax.Array], train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        top = maps[-1]
        pooled = [top]
        for i, s in enumerate(self.pool_scales):
            y = ConvModule(self.channels, 1, name=f"psp_modules_{i}", **kw)(adaptive_avg_pool(top, s), train)
            pooled.append(resize_bilinear(y, top.shape[1:3]))
        laterals = [ConvModule(self.channels, 1, name=f"lateral_convs_{i}", **kw)(m, train)
                    for i, m in enumerate(maps[:-1])]
        laterals.append(ConvModule(self.channels, 3, name="bottleneck", **kw)(jnp.concatenate(pooled, -1), train))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
        outs = [ConvModule(self.channels, 3, name=f"fpn_convs_{i}", **kw)(laterals[i], train)
                for i in range(len(laterals) - 1)] + [laterals[-1]]
        size = outs[0].shape[1:3]
        y = jnp.concatenate([resize_bilinear(o, size) for o in outs], -1)
        y = ConvModule(self.channels, 3, name="fpn_bottleneck", **kw)(y, train)
        return _classifier(y, self.num_classes, self.dropout, train, kw)


class FCNHead(nn.Module):
    """mmsegmentation ``FCNHead`` (``num_convs`` 3x3 ConvModules, no input concat) -> dropout -> 1x1."""

    num_classes: int
    channels: int = 256
    num_convs: int = 1
    dropout: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_convs):
            x = ConvModule(self.channels, 3, name=f"convs_{i}", **kw)(x, train)
        return _classifier(x, self.num_classes, self.dropout, train, kw)


class UperNet(nn.Module):
    """A backbone's feature pyramid -> UPerHead (+ FCN auxiliary head) -> per-pixel class logits."""

    backbone: nn.Module  # any FeatureBackbone (e.g. jaxformers.create_model("resnet50"))
    num_classes: int = 150
    in_strides: Sequence[int] = (4, 8, 16, 32)
    channels: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    aux_head: bool = True
    aux_stride: int = 16
    aux_channels: int = 256
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def example_inputs(self, batch_size: int = 1) -> tuple[jax.Array]:
        size = getattr(self.backbone, "img_size", 512)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (jnp.zeros((batch_size, h, w, getattr(self.backbone, "in_chans", 3)), jnp.float32),)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_aux: bool = False):
        """(B, H, W, C) images -> (B, H/4, W/4, classes) logits (first ``in_strides`` entry), or with
        ``train`` / ``return_aux`` an ``UperNetOutput`` with the auxiliary head's logits too."""
        strides = tuple(self.in_strides)
        check_image(x, in_chans=getattr(self.backbone, "in_chans", x.shape[-1] if x.ndim == 4 else 3))
        hw = check_image_strides(x, strides, who="UperNet")
        if self.aux_head and self.aux_stride not in strides:
            raise ValueError(f"UperNet: aux_stride={self.aux_stride} is not among in_strides {strides}")
        feats = self.backbone(x, train=train, output="features")
        maps = check_pyramid(feats, strides, who="UperNet", image_hw=hw)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        logits = UPerHead(self.num_classes, self.channels, tuple(self.pool_scales), self.dropout, name="decode_head",
                          **kw)([maps[s] for s in strides], train)
        if not self.aux_head or not (train or return_aux or self.is_initializing()):
            return logits
        aux = FCNHead(self.num_classes, self.aux_channels, 1, self.dropout, name="auxiliary_head",
                      **kw)(maps[self.aux_stride], train)
        return UperNetOutput(logits, aux) if (train or return_aux) else logits


def upernet_loss(outputs: Any, labels: jax.Array, aux_weight: float = 0.4, ignore_index: int = 255) -> jax.Array:
    """mmsegmentation's UperNet objective: cross-entropy of the decode head's logits + ``aux_weight`` x
    that of the auxiliary head's (both resized to the labels; ``ignore_index`` pixels ignored). Takes the
    logits array alone, too (then only the first term)."""
    if isinstance(outputs, UperNetOutput):
        return (semantic_cross_entropy(outputs.logits, labels, ignore_index)
                + aux_weight * semantic_cross_entropy(outputs.aux_logits, labels, ignore_index))
    return semantic_cross_entropy(outputs, labels, ignore_index)


# ---------------------------------------------------------------------------------------------
# ViT-CoMer + UperNet on ADE20K (150 classes, 512 x 512): params (M) and single-scale mIoU from the
# official README.


def _info(params_m: float, miou: float) -> ModelInfo:
    return ModelInfo(paper="ViT-CoMer: Vision Transformer with Convolutional Multi-scale Feature Interaction for "
                           "Dense Predictions (UperNet head)", arxiv="2403.07392", repo="Traffic-X/ViT-CoMer",
                     input_size=(512, 512, 3), params_m=params_m, top1=miou, converter=convert_vit_comer,
                     task="semantic segmentation", metric="mIoU")


def _build(variant: str, overrides: dict[str, Any]) -> UperNet:
    overrides = dict(overrides)
    backbone = ViTCoMer(**{**COMER_VARIANTS[variant], **dict(overrides.pop("backbone_overrides", None) or {})})
    return UperNet(**{"backbone": backbone, "num_classes": 150, **overrides})


@register_model(_info(38.7, 43.5))
def upernet_vit_comer_tiny(**overrides: Any) -> UperNet:
    """UperNet + ViT-CoMer-T, ADE20K (mIoU 43.5)."""
    return _build("vit_comer_tiny", overrides)


@register_model(_info(61.4, 46.5))
def upernet_vit_comer_small(**overrides: Any) -> UperNet:
    """UperNet + ViT-CoMer-S, ADE20K (mIoU 46.5)."""
    return _build("vit_comer_small", overrides)


@register_model(_info(144.7, 48.8))
def upernet_vit_comer_base(**overrides: Any) -> UperNet:
    """UperNet + ViT-CoMer-B, ADE20K (mIoU 48.8)."""
    return _build("vit_comer_base", overrides)
