"""kMaX-DeepLab: k-means mask transformer for panoptic segmentation.

Paper: "kMaX-DeepLab: k-means Mask Transformer", Yu et al., ECCV 2022, arXiv 2207.04044. Official
code: google-research/deeplab2 (TensorFlow, the original) and bytedance/kmax-deeplab (PyTorch
re-implementation, Apache-2.0), whose module names and numerics this file follows (the converter
``convert_official_kmax`` in ``kmax_deeplab_convert.py`` maps its state dicts; the PQ-style criterion
is ``jaxformers/segmentation/kmax_loss.py``, the ``kmax`` criterion of ``train/tasks_seg.py``).

Architecture (``configs/coco/panoptic_segmentation/kmax_*.yaml``):
- Backbone: any jaxformers backbone with the ``{4, 8, 16, 32}`` NHWC ``forward_features`` contract
  (ResNet-50, ConvNeXt-T/S/B/L).
- Pixel decoder: a channels LayerNorm on each backbone level, then stride 32 -> 4 stages of
  [1, 5, 1, 1] blocks of types [axial, axial, bottleneck, bottleneck] with base widths
  [512, 256, 128, 64] (outputs 4x wider); each later stage starts by fusing the previous output
  (GELU -> 1x1 ConvBN -> bilinear resize) with the next backbone level (GELU -> 1x1 ConvBN). Axial
  attention: 8 heads along the height, then along the width, with relative position encodings for
  queries, keys and values (span 255), BatchNorm on qkv, on the three similarity terms and on the
  two retrieved terms.
- Transformer decoder: 128 cluster centres (256 channels) refined by [2, 2, 2] kMaX layers on the
  stride 32, 16, 8 maps: k-means cross-attention (each pixel assigned to the cluster of highest
  mask logit, a detached one-hot argmax over clusters; clusters updated by the *sum* of their
  pixels' values), query self-attention, FFN 2048; every layer predicts classes and masks; a final
  prediction reads the stride-4 map. "Linear" layers are 1x1 convolutions with BatchNorm (BN
  everywhere, eps 1e-3, momentum 0.01), GELU activations, residual branches' last BN initialised
  to 0.
- Predictor: pixel head (depthwise 5x5 ConvBN-GELU, 1x1 -> 256 ConvBN-GELU, 1x1 -> 128 ConvBN)
  L2-normalised; mask kernels 1x1 ConvBN 256 -> 128; mask logits = pixel . kernel -> BatchNorm(1,
  init 0.1); class logits 1x1 conv -> C + 1 with a bias towards "void" (log((C) * 0.9 / 0.1)).
- Auxiliary semantic head (training only): ASPP (rates 6/12/18) on the stride-32 backbone map and
  DeepLabV3+ fusion with the stride-8 (64 ch) and stride-4 (32 ch) maps, C + 1 classes; 256 channels
  (``aux_semantic_channels``: narrower for small models; its depthwise 5x5 convolutions' kernel
  gradients are dense convolutions on XLA's CPU backend, the most expensive part of a small model's
  training step there).

Outputs: ``pred_logits`` (B, N, C+1), ``pred_masks`` (B, N, H/4, W/4), ``pixel_feature`` (B, H/4,
W/4, 128); with ``train=True`` also ``aux_outputs`` (the 6 layer predictions, masks and pixel
features resized to stride 4, stacked on a leading axis) and ``aux_semantic_pred`` (B, H/4, W/4, C+1).

``bn_momentum`` (Flax convention, default 0.99 = the official PyTorch 0.01) sets every BatchNorm's
running-average momentum (smaller values for short runs on small data).

Deviations: panoptic inference uses the shared ``jaxformers.segmentation.panoptic_inference`` on
mask probabilities softmaxed over the queries (``kmax_probs``) with the task's thresholds, not the
official post-processing (per-pixel argmax over queries with class thresholds 0.7 / 0.5 and pixel
confidence 0.4). Image sides are multiples of 32 (every stride divides them) instead of the official
32k + 1 crops, so resizing uses ``align_corners=False`` (the official code's choice for even sizes)
and the ConvNeXt backbone needs no zero padding; drop path as in the official code.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers import DropPath, LayerNorm, check_image, logical
from jaxformers.layers.interpolate import resize_bilinear
from jaxformers.layers.linear import grouped_conv_general_dilated
from jaxformers.models.mask2former import check_features
from jaxformers.registry import ModelInfo, create_model, register_model

MAX_SPAN = 255
_gelu = lambda x: nn.gelu(x, approximate=False)  # noqa: E731


def _resize(x: jax.Array, size: tuple[int, int], align_corners: bool) -> jax.Array:
    """Bilinear resize (NHWC). The official code aligns corners exactly when the source (or, for its
    auxiliary outputs, the target) width is odd, as its 32k + 1 crops make every map odd."""
    return resize_bilinear(x, tuple(size), align_corners=align_corners)


def _trunc(std: float):
    return nn.initializers.truncated_normal(std)


def batch_norm(train: bool, name: str | None = None, init: float = 1.0, dtype=None, param_dtype=jnp.float32,
               bn_momentum: float = 0.99):
    """The official SyncBN: eps 1e-3, PyTorch momentum 0.01 (Flax ``bn_momentum`` 0.99), scale initialised
    to ``init``."""
    return nn.BatchNorm(use_running_average=not train, momentum=bn_momentum, epsilon=1e-3, dtype=dtype,
                        param_dtype=param_dtype, name=name,
                        scale_init=logical(nn.initializers.constant(init), ("conv_out",)),
                        bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)))


class ConvBN(nn.Module):
    """Conv (k x k, groups, dilation; 1x1 on (B, N, C) query arrays when ``one_d``) -> BatchNorm -> GELU
    (``norm`` / ``act`` switch them off), the official ``ConvBN``."""

    features: int
    kernel: int = 1
    groups: int = 1
    dilation: int = 1
    use_bias: bool = False
    norm: bool = True
    act: bool = False
    norm_init: float = 1.0
    init_std: float | None = None  # None: He (std sqrt(2 / in_channels)); 0: Xavier uniform
    one_d: bool = False
    bn_momentum: float = 0.99
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cin = x.shape[-1]
        if self.init_std is None:
            init = _trunc(math.sqrt(2.0 / cin))
        elif self.init_std == 0:
            init = nn.initializers.xavier_uniform()
        else:
            init = _trunc(self.init_std)
        k = self.kernel
        pad = self.dilation * (k // 2)
        conv = nn.Conv(self.features, (k, k), padding=[(pad, pad)] * 2, kernel_dilation=self.dilation,
                       feature_group_count=self.groups, use_bias=self.use_bias, dtype=self.dtype,
                       param_dtype=self.param_dtype,
                       conv_general_dilated=grouped_conv_general_dilated if self.groups > 1 else None,
                       kernel_init=logical(init, (None, None, "conv_in", "conv_out")),
                       bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)), name="conv")
        x = conv(x[:, :, None, :]).squeeze(2) if self.one_d else conv(x)
        if self.norm:
            x = batch_norm(train, "norm", self.norm_init, self.dtype, self.param_dtype, self.bn_momentum)(x)
        return _gelu(x) if self.act else x


def relative_distance(length: int) -> np.ndarray:
    """(L, L) row of the relative-position table for key m seen from query l: m - l + MAX_SPAN - 1."""
    if length > MAX_SPAN:
        raise ValueError(f"axial attention spans at most {MAX_SPAN} positions, got a side of {length}")
    return (np.arange(length)[None, :] - np.arange(length)[:, None] + MAX_SPAN - 1).astype(np.int32)


class AxialAttention(nn.Module):
    """Multi-head attention along one axis of (B, L, C) rows with relative position encodings on
    queries, keys and values and BatchNorm on qkv, on the similarity terms and on the outputs."""

    key_depth: int
    value_depth: int
    num_heads: int = 8
    bn_momentum: float = 0.99
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        n, length, cin = x.shape
        h, kd, vd = self.num_heads, self.key_depth, self.value_depth
        if kd % h or vd % h:
            raise ValueError(f"axial attention key/value depths {kd}/{vd} are not divisible by {h} heads")
        qkv = ConvBN(2 * kd + vd, norm=False, init_std=cin ** -0.5, one_d=True, name="qkv_transform", **kw)(x, train)
        qkv = batch_norm(train, "bn_qkv", **kw)(qkv)
        q = qkv[..., :kd].reshape(n, length, h, kd // h)
        k = qkv[..., kd:2 * kd].reshape(n, length, h, kd // h)
        v = qkv[..., 2 * kd:].reshape(n, length, h, vd // h)
        idx = relative_distance(length)

        def rpe(name, depth):
            table = self.param(name, logical(_trunc(1.0), (None, None)), (2 * MAX_SPAN - 1, depth), self.param_dtype)
            return table[idx]  # (L, L, depth)

        content = jnp.einsum("blhd,bmhd->blmh", q, k)
        q_rpe = jnp.einsum("blhd,lmd->blmh", q, rpe("query_rpe", kd // h))
        k_rpe = jnp.einsum("bmhd,lmd->blmh", k, rpe("key_rpe", kd // h))
        sim = jnp.concatenate([content, q_rpe, k_rpe], -1)  # (B, L, L, 3H): BN over the 3H channels
        sim = batch_norm(train, "bn_similarity", **kw)(sim).reshape(n, length, length, 3, h).sum(3)
        weights = jax.nn.softmax(sim.astype(jnp.float32), axis=2).astype(v.dtype)  # over keys m
        out_content = jnp.einsum("blmh,bmhd->blhd", weights, v).reshape(n, length, vd)
        out_rpe = jnp.einsum("blmh,lmd->blhd", weights, rpe("value_rpe", vd // h)).reshape(n, length, vd)
        out = jnp.concatenate([out_content, out_rpe], -1)
        out = batch_norm(train, "bn_output", **kw)(out).reshape(n, length, 2, vd).sum(2)
        return out


class AxialAttention2D(nn.Module):
    """Axial attention along the height, then along the width, of a NHWC map."""

    filters: int
    num_heads: int = 8
    key_expansion: float = 1.0
    value_expansion: float = 2.0
    bn_momentum: float = 0.99
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        b, height, width, _ = x.shape
        kd, vd = int(round(self.filters * self.key_expansion)), int(round(self.filters * self.value_expansion))
        cols = x.transpose(0, 2, 1, 3).reshape(b * width, height, -1)
        cols = AxialAttention(kd, vd, self.num_heads, name="height_axis", **kw)(cols, train)
        rows = cols.reshape(b, width, height, vd).transpose(0, 2, 1, 3).reshape(b * height, width, vd)
        rows = AxialAttention(kd, vd, self.num_heads, name="width_axis", **kw)(rows, train)
        return rows.reshape(b, height, width, vd)


class SingleBlock(nn.Module):
    """GELU -> (1x1 ConvBN-GELU -> axial attention -> GELU | 3x3 ConvBN-GELU) -> 1x1 ConvBN (init 0),
    plus the (projected) shortcut of the GELU'd input."""

    filters: tuple[int, int, int]
    block_type: str
    drop_path: float = 0.0
    bn_momentum: float = 0.99
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        f0, f1, f2 = self.filters
        x = _gelu(x)
        shortcut = x if x.shape[-1] == f2 else ConvBN(f2, name="shortcut", **kw)(x, train)
        y = ConvBN(f0, act=True, name="conv1_bn_act", **kw)(x, train)
        if self.block_type == "axial":
            y = _gelu(AxialAttention2D(f1, name="attention", **kw)(y, train))
        elif self.block_type == "bottleneck":
            y = ConvBN(f1, 3, act=True, name="conv2_bn_act", **kw)(y, train)
        else:
            raise ValueError(f"block_type must be 'axial' or 'bottleneck', got {self.block_type!r}")
        y = ConvBN(f2, norm_init=0.0, name="conv3_bn", **kw)(y, train)
        return DropPath(self.drop_path)(y, train=train) + shortcut


class KMaXPixelDecoder(nn.Module):
    """Stride 32 -> 4 block groups with resized fusion of each backbone level (see the module docstring).
    Returns the stage outputs at strides 32, 16, 8, 4."""

    dec_layers: Sequence[int] = (1, 5, 1, 1)
    dec_channels: Sequence[int] = (512, 256, 128, 64)
    layer_types: Sequence[str] = ("axial", "axial", "bottleneck", "bottleneck")
    drop_path: float = 0.0
    bn_momentum: float = 0.99
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict[int, jax.Array], train: bool = False) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        strides = (32, 16, 8, 4)
        outs = []
        x = None
        for i, s in enumerate(strides):
            level = LayerNorm(1e-6, axis_name="conv_out", name=f"in_norm_{i}", dtype=self.dtype,
                              param_dtype=self.param_dtype)(features[s])
            base = self.dec_channels[i]
            if i == 0:
                x = level
            else:  # resized fuse of the previous stage (low resolution) with this level
                low = ConvBN(base, name=f"fuse_{i}_low", **kw)(_gelu(x), train) if x.shape[-1] != base else x
                low = _resize(low, level.shape[1:3], align_corners=x.shape[2] % 2 == 1)
                high = ConvBN(base, name=f"fuse_{i}_high", **kw)(_gelu(level), train) if level.shape[-1] != base \
                    else level
                x = low + high
            kind = self.layer_types[i]
            filters = (2 * base, base, 4 * base) if kind == "axial" else (base, base, 4 * base)
            for j in range(self.dec_layers[i]):
                x = SingleBlock(filters, kind, self.drop_path, name=f"stage_{i}_block_{j}", **kw)(x, train)
            outs.append(x)
        return outs


class KMaXPredictor(nn.Module):
    """Pixel head (L2-normalised 128-d pixel features), mask kernels, class head with a void bias."""

    num_classes: int  # including void
    bn_momentum: float = 0.99
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mask_embeddings, class_embeddings, pixel_feature, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        c = pixel_feature.shape[-1]
        p = ConvBN(c, 5, groups=c, act=True, init_std=0, name="pixel_conv0", **kw)(pixel_feature, train)
        p = ConvBN(256, act=True, name="pixel_conv1", **kw)(p, train)
        p = ConvBN(128, use_bias=True, init_std=0.01, name="pixel_last", **kw)(p, train)
        p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
        cls = ConvBN(self.num_classes, use_bias=True, norm=False, init_std=0.01, one_d=True, name="class_head",
                     **kw)(class_embeddings, train)
        void_bias = math.log((self.num_classes - 1) * 0.9 / 0.1)
        cls = cls + jnp.zeros(self.num_classes, cls.dtype).at[-1].set(void_bias)
        kernel = ConvBN(128, one_d=True, name="mask_head", **kw)(mask_embeddings, train)
        masks = jnp.einsum("bhwc,bnc->bnhw", p, kernel)
        masks = batch_norm(train, "mask_bn", 0.1, **kw)(masks[..., None])[..., 0]
        return cls, masks, p


class KMaXLayer(nn.Module):
    """One kMaX transformer layer: k-means cross-attention, query self-attention, FFN."""

    num_classes: int  # including void
    base_filters: int = 128
    num_heads: int = 8
    bottleneck_expansion: float = 2.0
    key_expansion: float = 1.0
    value_expansion: float = 2.0
    ffn_dim: int = 2048
    drop_path: float = 0.0
    bn_momentum: float = 0.99
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_feature, query_feature, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        b, height, width, _ = pixel_feature.shape
        d = query_feature.shape[-1]
        bottleneck = int(round(self.base_filters * self.bottleneck_expansion))
        kd = int(round(self.base_filters * self.key_expansion))
        vd = int(round(self.base_filters * self.value_expansion))
        std = bottleneck ** -0.5
        pixel_space = ConvBN(bottleneck, act=True, name="pixel_conv1", **kw)(_gelu(pixel_feature), train)
        query_space = ConvBN(bottleneck, act=True, one_d=True, name="query_conv1", **kw)(query_feature, train)
        pixel_value = ConvBN(vd, init_std=std, name="pixel_v", **kw)(pixel_space, train).reshape(b, -1, vd)
        cls, masks, pix = KMaXPredictor(self.num_classes, name="predictor", **kw)(query_space, query_space,
                                                                                   pixel_space, train)
        update = kmeans_update(masks.reshape(b, masks.shape[1], -1), pixel_value)
        update = batch_norm(train, "kmeans_bn", **kw)(update)
        update = ConvBN(d, norm_init=0.0, one_d=True, name="kmeans_conv3", **kw)(update, train)
        query_feature = query_feature + DropPath(self.drop_path)(update, train=train)

        qkv = ConvBN(2 * kd + vd, init_std=std, one_d=True, name="query_qkv", **kw)(query_space, train)
        h = self.num_heads
        q = qkv[..., :kd].reshape(b, -1, h, kd // h)
        k = qkv[..., kd:2 * kd].reshape(b, -1, h, kd // h)
        v = qkv[..., 2 * kd:].reshape(b, -1, h, vd // h)
        sim = batch_norm(train, "attn_bn_similarity", **kw)(jnp.einsum("blhd,bmhd->blmh", q, k))
        weights = jax.nn.softmax(sim.astype(jnp.float32), axis=2).astype(v.dtype)
        attn = jnp.einsum("blmh,bmhd->blhd", weights, v).reshape(b, -1, vd)
        attn = _gelu(batch_norm(train, "attn_bn_output", **kw)(attn))
        attn = ConvBN(d, norm_init=0.0, one_d=True, name="query_conv3", **kw)(attn, train)
        query_feature = _gelu(query_feature + DropPath(self.drop_path)(attn, train=train))

        ffn = ConvBN(self.ffn_dim, act=True, one_d=True, name="ffn_conv1", **kw)(query_feature, train)
        ffn = ConvBN(d, norm_init=0.0, one_d=True, name="ffn_conv2", **kw)(ffn, train)
        query_feature = _gelu(query_feature + DropPath(self.drop_path)(ffn, train=train))
        return query_feature, (cls, masks, pix)


def kmeans_update(mask_logits: jax.Array, pixel_value: jax.Array) -> jax.Array:
    """k-means cross-attention: every pixel joins the cluster of its highest mask logit (a hard,
    gradient-free assignment), and each cluster receives the *sum* of its pixels' values.

    mask_logits (B, N, HW), pixel_value (B, HW, C) -> (B, N, C) (float32, as the official code)."""
    assign = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(mask_logits), axis=1), mask_logits.shape[1],
                            dtype=jnp.float32, axis=1)  # (B, N, HW)
    return jnp.einsum("bnm,bmc->bnc", assign, pixel_value.astype(jnp.float32)).astype(pixel_value.dtype)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3, image pooling; concat -> 1x1 (all ConvBN-GELU)."""

    features: int = 256
    rates: tuple[int, int, int] = (6, 12, 18)
    dropout: float = 0.1
    bn_momentum: float = 0.99
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        f = self.features
        outs = [ConvBN(f, act=True, name="conv0", **kw)(x, train)]
        outs += [ConvBN(f, 3, dilation=r, act=True, name=f"conv{i + 1}", **kw)(x, train)
                 for i, r in enumerate(self.rates)]
        pooled = ConvBN(f, act=True, name="pool", **kw)(x.mean((1, 2), keepdims=True), train)
        outs.append(jnp.broadcast_to(pooled, outs[0].shape))
        y = ConvBN(f, act=True, name="proj", **kw)(jnp.concatenate(outs, -1), train)
        return nn.Dropout(self.dropout)(y, deterministic=not train)


class SemanticPredictor(nn.Module):
    """Auxiliary semantic head: ASPP on stride 32, DeepLabV3+ fusion with stride 8 (64 ch) and 4 (32 ch)."""

    num_classes: int  # including void
    channels: int = 256
    bn_momentum: float = 0.99
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, os8, os4, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        c = self.channels
        x = ASPP(c, name="aspp", **kw)(x, train)
        for name, low, ch in (("os8", os8, 64), ("os4", os4, 32)):
            low = ConvBN(ch, act=True, name=f"{name}_projection", **kw)(low, train)
            x = jnp.concatenate([_resize(x, low.shape[1:3], align_corners=x.shape[2] % 2 == 1), low], -1)
            x = ConvBN(x.shape[-1], 5, groups=x.shape[-1], act=True, init_std=0, name=f"{name}_fusion0", **kw)(x, train)
            x = ConvBN(c, act=True, name=f"{name}_fusion1", **kw)(x, train)
        x = ConvBN(c, 5, groups=c, act=True, init_std=0, name="head_conv0", **kw)(x, train)
        x = ConvBN(c, act=True, name="head_conv1", **kw)(x, train)
        return ConvBN(self.num_classes, use_bias=True, norm=False, init_std=0.01, name="head_final", **kw)(x, train)


class KMaXDeepLab(nn.Module):
    """Backbone -> kMaX pixel decoder -> kMaX transformer decoder (+ auxiliary semantic head)."""

    num_classes: int = 133
    backbone: str = "resnet50"
    backbone_overrides: Any = None
    img_size: int | tuple[int, int] = 1280
    in_chans: int = 3
    dec_layers: Sequence[int] = (1, 5, 1, 1)
    dec_channels: Sequence[int] = (512, 256, 128, 64)
    layer_types: Sequence[str] = ("axial", "axial", "bottleneck", "bottleneck")
    pixel_drop_path: float = 0.0
    trans_dec_layers: Sequence[int] = (2, 2, 2)
    num_queries: int = 128
    query_dim: int = 256
    base_filters: int = 128
    num_heads: int = 8
    ffn_dim: int = 2048
    trans_drop_path: float = 0.2
    aux_semantic: bool = True
    aux_semantic_channels: int = 256
    bn_momentum: float = 0.99
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, features: dict[int, jax.Array] | None = None
                 ) -> dict[str, Any]:
        """The predictions for images ``x`` (NHWC); ``features`` (the backbone's ``{4, 8, 16, 32}`` maps)
        skip the backbone."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        check_image(x, in_chans=self.in_chans, divisible_by=32)
        overrides = dict(self.backbone_overrides or {})
        overrides.setdefault("num_classes", 0)
        backbone = create_model(self.backbone, dtype=self.dtype, param_dtype=self.param_dtype, **overrides)
        backbone = backbone.clone(parent=self, name="backbone")
        if features is None or self.is_initializing():
            features = backbone.forward_features(x, train=train)
        check_features(features, what=f"backbone {self.backbone!r}")
        outs = KMaXPixelDecoder(self.dec_layers, self.dec_channels, self.layer_types, self.pixel_drop_path,
                                name="pixel_decoder", **kw)(features, train)
        b = x.shape[0]
        c1 = self.num_classes + 1
        centers = self.param("cluster_centers", logical(_trunc(1.0), ("embed", None)),
                             (self.query_dim, self.num_queries), self.param_dtype)
        query = jnp.broadcast_to(centers.T.astype(outs[0].dtype), (b, self.num_queries, self.query_dim))
        preds = []
        n = 0
        for level in range(3):
            for _ in range(self.trans_dec_layers[level]):
                query, pred = KMaXLayer(c1, self.base_filters, self.num_heads, ffn_dim=self.ffn_dim,
                                        drop_path=self.trans_drop_path, name=f"kmax_layers_{n}", **kw)(
                    outs[level], query, train)
                preds.append(pred)
                n += 1
        class_emb = ConvBN(self.query_dim, act=True, one_d=True, name="class_embedding_projection", **kw)(query, train)
        mask_emb = ConvBN(self.query_dim, act=True, one_d=True, name="mask_embedding_projection", **kw)(query, train)
        cls, masks, pix = KMaXPredictor(c1, name="predictor", **kw)(mask_emb, class_emb, outs[3], train)
        out = {"pred_logits": cls, "pred_masks": masks, "pixel_feature": pix}
        if train:
            size, align = masks.shape[2:], masks.shape[2] % 2 == 1
            out["aux_outputs"] = {
                "pred_logits": jnp.stack([p[0] for p in preds]),
                "pred_masks": jnp.stack([_resize(p[1].transpose(0, 2, 3, 1), size, align).transpose(0, 3, 1, 2)
                                         for p in preds]),
                "pixel_feature": jnp.stack([_resize(p[2], size, align) for p in preds])}
        if self.aux_semantic and (train or self.is_initializing()):  # built at init: part of the official model
            semantic = SemanticPredictor(c1, self.aux_semantic_channels, name="aux_semantic", **kw)(
                features[32], features[8], features[4], train)
            if train:
                out["aux_semantic_pred"] = semantic
        return out


# ---------------------------------------------------------------------------------------------
# Variants (the official COCO configs, 133 classes; PQ of the PyTorch re-implementation's README)

VARIANTS = {
    "kmax_deeplab_r50_coco": dict(backbone="resnet50"),
    "kmax_deeplab_convnext_tiny_coco": dict(backbone="convnext_tiny", backbone_overrides=dict(drop_path_rate=0.3)),
    "kmax_deeplab_convnext_small_coco": dict(backbone="convnext_small", backbone_overrides=dict(drop_path_rate=0.4)),
    "kmax_deeplab_convnext_base_coco": dict(backbone="convnext_base", backbone_overrides=dict(drop_path_rate=0.5)),
    "kmax_deeplab_convnext_large_coco": dict(backbone="convnext_large", backbone_overrides=dict(drop_path_rate=0.6)),
}


def _build(name: str, overrides: dict[str, Any]) -> KMaXDeepLab:
    cfg, overrides = dict(VARIANTS[name]), dict(overrides)
    if overrides.get("backbone", cfg["backbone"]) != cfg["backbone"]:
        cfg["backbone_overrides"] = {}
    cfg["backbone_overrides"] = {**cfg.get("backbone_overrides", {}),
                                 **dict(overrides.pop("backbone_overrides", None) or {})}
    return KMaXDeepLab(**{**cfg, **overrides})


def _info(pq: float) -> ModelInfo:
    return ModelInfo(paper="kMaX-DeepLab: k-means Mask Transformer", arxiv="2207.04044",
                     repo="bytedance/kmax-deeplab", input_size=(1280, 1280, 3), top1=pq,
                     task="panoptic segmentation", metric="PQ")


@register_model(_info(53.3))
def kmax_deeplab_r50_coco(**overrides: Any) -> KMaXDeepLab:
    """kMaX-DeepLab ResNet-50, COCO panoptic (PQ 53.3; ``top1`` holds the PQ)."""
    return _build("kmax_deeplab_r50_coco", overrides)


@register_model(_info(55.5))
def kmax_deeplab_convnext_tiny_coco(**overrides: Any) -> KMaXDeepLab:
    """kMaX-DeepLab ConvNeXt-T, COCO panoptic (PQ 55.5)."""
    return _build("kmax_deeplab_convnext_tiny_coco", overrides)


@register_model(_info(56.7))
def kmax_deeplab_convnext_small_coco(**overrides: Any) -> KMaXDeepLab:
    """kMaX-DeepLab ConvNeXt-S, COCO panoptic (PQ 56.7)."""
    return _build("kmax_deeplab_convnext_small_coco", overrides)


@register_model(_info(57.2))
def kmax_deeplab_convnext_base_coco(**overrides: Any) -> KMaXDeepLab:
    """kMaX-DeepLab ConvNeXt-B, COCO panoptic (PQ 57.2)."""
    return _build("kmax_deeplab_convnext_base_coco", overrides)


@register_model(_info(57.9))
def kmax_deeplab_convnext_large_coco(**overrides: Any) -> KMaXDeepLab:
    """kMaX-DeepLab ConvNeXt-L, COCO panoptic (PQ 57.9)."""
    return _build("kmax_deeplab_convnext_large_coco", overrides)
