"""P2AT: pyramid pooling axial transformer for real-time semantic segmentation.

Paper: "P2AT: Pyramid Pooling Axial Transformer for Real-time Semantic Segmentation", Elhassan et al.,
Expert Systems with Applications 2024, arXiv 2310.15025. Official code: mohamedac29/P2AT
(``models/P2AT.py``, ``models/common_blocks.py``, ``builders/model_builder.py``, ``losses/criterion.py``,
``configs/camvid/*.yaml``), whose module names and numerics this file follows; the converter
``convert_official_p2at`` (``jaxformers/models/p2at_convert.py``) maps its state dicts key for key.

Variants (``builders/model_builder.py``): ``p2at_s`` / ``p2at_m`` / ``p2at_l`` on ResNet-18 / 34 / 50
(``jaxformers/models/resnet.py``, the torchvision layout: ImageNet variables from
``jaxformers.load_pretrained("resnet18", path)`` go under ``backbone``; the ``fc`` layer is not
used), 19 classes by default. Parameters: 12,736,019 / 22,844,179 /
25,276,435 in the inference build (the official ``is_train=False``), 12,812,729 / 22,920,889 /
25,353,145 with the two auxiliary heads (``aux_heads=True``, the official training build).

Architecture (all maps NHWC; strides of the ResNet stages 4, 8, 16, 32):
- ``feature_reducer``: 1x1 ConvBlock (conv, BN, PReLU) of the stride-32 map to ``dim`` = 64.
- ``deep_feature_processor`` (SSA block): 2 blocks of x + P2A2(x), x + Mlp(x); Mlp = 1x1 conv
  (4 x dim), depthwise 3x3 (bias), ReLU, 1x1 conv.
- P2A2, pyramid-pooling axial attention (8 heads, key dim 16, value dim 32): the detail branch
  (LFI: 1x1 Conv-BN, then 3x3 Conv-BN with a residual) and the pyramid pooling (P2: 1x1 ConvBlock,
  three *cascaded* stride-1 average pools of sizes 3, 5, 7 (zero padding counted), a grouped 3x3
  ConvBlock with ``dim`` groups over their concatenation, times the 1x1 output); q, k, v are 1x1
  convolutions of the pooled map. Axial: q, k, v averaged over the width give one token per row,
  averaged over the height one per column; q and k get learned position tables (length 16, linearly
  resampled to the number of rows / columns); softmax attention along the rows and along the
  columns separately (``jaxformers.layers.dot_product_attention``); the row result goes through a
  1x1 ConvBlock with BN + PReLU, the column result through a plain 1x1 convolution (the official
  asymmetry, kept); row + column broadcast over the map, + v, 1x1 ConvBlock to ``dim``, times the
  detail branch.
- Decoder: three ConvNeXt-like DecoderBlocks (depthwise 3/5/7 + BN, Linear 4x, Hardswish, Linear,
  layer scale 1e-6, residual); two BiF fusions (LFR on the lower map d: global and sigmoid-gated
  local 1x1 branches; SFU on the upper map u: ConvBlock times a softmax over channels; 1x1 Conv-BN on
  the skip s; out = Conv-BN(cat[d, u, s]) + s u + sigmoid(s d), at d's resolution); GCE (global
  average pool, 3x3 conv, per-channel scale + bias, 7x7 ConvBlock, added to the map); FDR refinement
  (3x3 ConvBlocks) with two 3x3 ConvBlock fusions of the upsampled decoder outputs; SegHead
  (BN-ReLU-3x3-BN-ReLU-1x1). Logits are resized to the input with ``align_corners=True``.
- Training build: ``aux_seg_head1`` (after the stride-8 BiF) and ``aux_seg_head2`` (after the
  stride-4 BiF), outputs ``(aux1, logits, aux2)`` in the official order.

Reproduced quirk of the official code: the pyramid pooling concatenates ``[pool1, pool1, pool3]``: its
first pooled map twice, while the second (the 5x5 pool, computed because the third pools it again)
is never used. ``pyramid="official"`` (default) computes exactly that, so official checkpoints give
the official outputs; ``pyramid="intended"`` concatenates ``[pool1, pool2, pool3]`` as the paper
describes the pyramid (same parameters; a model of its own, official weights were not trained for
it).

Calls: ``model.apply(v, x)`` -> (B, H, W, num_classes) logits; with ``aux_heads=True``,
``model.apply(v, x, train=True, mutable=["batch_stats"])`` returns ``((aux1, logits, aux2),
updates)`` (``aux=`` overrides when the auxiliary outputs are returned; they need ``aux_heads``).
Loss: :func:`p2at_loss` = 0.4 x cross-entropy of each auxiliary output + 1.0 x OHEM cross-entropy
(``jaxformers.segmentation.ohem_cross_entropy``, threshold 0.9, at least 131,072 pixels kept: the
CamVid configs' ``LOSS`` section) of the final logits.

Deviations: images are NHWC. Height and width must be multiples of 32 (the official code also runs
sizes such as CamVid's 720 x 960 because its fusions resize; pad those to 736 x 960). The official
training script is PIDNet's (its ``FullModel`` sends ``[aux1, logits]`` to the criterion with
``BALANCE_WEIGHTS = [0.4, 1.0]`` and the third output to a boundary loss meant for PIDNet's boundary
head, and it imports modules the repository lacks); here the second auxiliary head gets the auxiliary
weight 0.4 with plain cross-entropy, and the auxiliary cross-entropy averages over the labelled
pixels. Parameters start from Flax's initialisers (the official code uses PyTorch's defaults; the
PReLU slopes 0.25, the position tables N(0, 1), the layer scales 1e-6 and the GCE scale 1 / bias 0
are as official); the backbone's last BN of each block starts at 1 (torchvision's default), not at 0.
"""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers import BatchNorm, Conv, Dense, check_image, dot_product_attention, logical
from jaxformers.layers.interpolate import resize_bilinear
from jaxformers.models.p2at_convert import convert_official_p2at
from jaxformers.registry import ModelInfo, create_model, register_model
from jaxformers.segmentation.semantic import ohem_cross_entropy, semantic_cross_entropy
from jaxformers.segmentation.targets import VOID

PYRAMIDS = ("official", "intended")


def _bn(train: bool, name: str, kw: dict) -> nn.Module:
    return BatchNorm(train=train, name=name, **kw)


class PReLU(nn.Module):
    """Per-channel PReLU (``torch.nn.PReLU(channels)``, slopes start at 0.25)."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.param("weight", logical(nn.initializers.constant(0.25), ("conv_out",)), (x.shape[-1],),
                       self.param_dtype)
        return jnp.where(x >= 0, x, a.astype(x.dtype) * x)


class ConvBlock(nn.Module):
    """The official ConvBlock: conv (no bias unless ``bias``) [-> BN -> PReLU when ``bn_act``]."""

    features: int
    kernel: int = 1
    groups: int = 1
    bn_act: bool = False
    bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.features, (self.kernel, self.kernel), padding=self.kernel // 2, feature_group_count=self.groups,
                 use_bias=self.bias, name="conv", **kw)(x)
        if self.bn_act:
            x = PReLU(self.param_dtype, name="act")(_bn(train, "bn", kw)(x))
        return x


class PositionalEmbedding(nn.Module):
    """A learned (1, dim, length) table (official layout) linearly resampled (``align_corners=False``)
    to the N tokens of x (B, N, dim) and added."""

    length: int = 16
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        table = self.param("pos_embed", logical(nn.initializers.normal(1.0), (None, "embed", None)),
                           (1, x.shape[-1], self.length), self.param_dtype)
        table = resize_bilinear(table.transpose(0, 2, 1)[:, :, None, :], (x.shape[1], 1))[:, :, 0]
        return x + table.astype(x.dtype)


class LFI(nn.Module):
    """Local feature injection (``LFImodule``): r = Conv-BN 1x1 (x); Conv-BN 3x3 (r) + r."""

    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        r = _bn(train, "conv1_1", kw)(ConvBlock(self.features, 1, name="conv1_0", **kw)(x))
        return _bn(train, "conv2_1", kw)(ConvBlock(self.features, 3, name="conv2_0", **kw)(r)) + r


class P2Module(nn.Module):
    """Pyramid pooling: 1x1 ConvBlock, cascaded average pools 3/5/7, grouped 3x3 ConvBlock over their
    concatenation ([p1, p1, p3] as official, or [p1, p2, p3]: module docstring), times the 1x1 map."""

    features: int
    pyramid: str = "official"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvBlock(self.features, 1, bn_act=True, name="conv1", **kw)(x, train)
        pools, p = [], x
        for k in (3, 5, 7):  # stride 1, zero padding k // 2 counted in the mean (count_include_pad)
            p = nn.avg_pool(p, (k, k), strides=(1, 1), padding=((k // 2, k // 2),) * 2, count_include_pad=True)
            pools.append(p)
        chosen = [pools[0], pools[0], pools[2]] if self.pyramid == "official" else pools
        y = ConvBlock(self.features, 3, groups=self.features, bn_act=True, name="conv2", **kw)(
            jnp.concatenate(chosen, -1), train)
        return y * x


class P2A2(nn.Module):
    """Pyramid-pooling axial attention (``P2A2Module``; module docstring)."""

    dim: int = 64
    key_dim: int = 16
    num_heads: int = 8
    attn_ratio: float = 2.0
    pos_len: int = 16
    pyramid: str = "official"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, _ = x.shape
        nh, kd, dv = self.num_heads, self.key_dim, int(self.attn_ratio * self.key_dim)
        details = LFI(self.dim, name="details_enhancer", **kw)(x, train)
        pooled = P2Module(self.dim, self.pyramid, name="pool_feats_processor", **kw)(x, train)
        q = ConvBlock(nh * kd, name="to_q", **kw)(pooled)
        k = ConvBlock(nh * kd, name="to_k", **kw)(pooled)
        v = ConvBlock(nh * dv, name="to_v", **kw)(pooled)

        def axial(axis: int, which: str) -> jax.Array:  # tokens: the mean over the other spatial axis
            qa, ka, va = (t.mean(axis) for t in (q, k, v))  # (B, N, C)
            qa = PositionalEmbedding(self.pos_len, self.param_dtype, name=f"pos_emb_{which}_q")(qa)
            ka = PositionalEmbedding(self.pos_len, self.param_dtype, name=f"pos_emb_{which}_k")(ka)
            n = qa.shape[1]
            out = dot_product_attention(qa.reshape(b, n, nh, kd), ka.reshape(b, n, nh, kd), va.reshape(b, n, nh, dv),
                                        scale=kd ** -0.5)
            return out.reshape(b, n, nh * dv)

        row = axial(2, "row")[:, :, None]  # (B, H, 1, nh * dv)
        row = ConvBlock(nh * dv, bn_act=True, name="proj_encode_row", **kw)(row, train)
        col = axial(1, "column")[:, None]  # (B, 1, W, nh * dv)
        col = ConvBlock(nh * dv, name="proj_encode_column", **kw)(col)
        y = ConvBlock(self.dim, bn_act=True, name="proj", **kw)(v + (row + col), train)
        return y * details


class Mlp(nn.Module):
    """1x1 conv to ``hidden``, depthwise 3x3 (bias), ReLU, 1x1 conv back (the official ``Mlp``)."""

    hidden: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = ConvBlock(self.hidden, name="fc1", **kw)(x)
        y = nn.relu(Conv(self.hidden, (3, 3), padding=1, feature_group_count=self.hidden, name="dwconv", **kw)(y))
        return ConvBlock(x.shape[-1], name="fc2", **kw)(y)


class AttentionBlock(nn.Module):
    """x + P2A2(x), then x + Mlp(x) (1x1 conv, depthwise 3x3 with bias, ReLU, 1x1 conv)."""

    dim: int = 64
    key_dim: int = 16
    num_heads: int = 8
    attn_ratio: float = 2.0
    mlp_ratio: float = 4.0
    pos_len: int = 16
    pyramid: str = "official"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + P2A2(self.dim, self.key_dim, self.num_heads, self.attn_ratio, self.pos_len, self.pyramid, name="attn",
                     **kw)(x, train)
        return x + Mlp(int(self.dim * self.mlp_ratio), name="mlp", **kw)(x)


class SSABlock(nn.Module):
    """``layers`` AttentionBlocks (``transformer_layers_i``)."""

    layers: int = 2
    block: dict | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.layers):
            x = AttentionBlock(**(self.block or {}), dtype=self.dtype, param_dtype=self.param_dtype,
                               name=f"transformer_layers_{i}")(x, train)
        return x


class DecoderBlock(nn.Module):
    """x + gamma * Linear(Hardswish(Linear_4x(BN(depthwise kxk (x))))), gamma from 1e-6."""

    dim: int = 64
    kernel: int = 3
    expansion: int = 4
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = Conv(self.dim, (self.kernel, self.kernel), padding=self.kernel // 2, feature_group_count=self.dim,
                 name="dwconv_0", **kw)(x)
        y = _bn(train, "dwconv_1", kw)(y)
        y = jax.nn.hard_swish(Dense(self.dim * self.expansion, axes=("embed", "mlp"), name="pwconv1_0", **kw)(y))
        y = Dense(self.dim, axes=("mlp", "embed"), name="pwconv2", **kw)(y)
        gamma = self.param("gamma", logical(nn.initializers.constant(1e-6), ("embed",)), (self.dim,),
                           self.param_dtype)
        return x + gamma.astype(y.dtype) * y


class LFR(nn.Module):
    """Local feature refinement: x1 = ConvBlock(x); fuse(conv2(mean(x1)) + sigmoid(conv3(x1)))."""

    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvBlock(self.features, bn_act=True, name="conv1", **kw)(x, train)
        glob = ConvBlock(self.features, name="conv2", **kw)(x.mean((1, 2), keepdims=True))  # 1x1 conv commutes with broadcast
        local = jax.nn.sigmoid(ConvBlock(self.features, name="conv3", **kw)(x))
        return ConvBlock(self.features, name="fuse", **kw)(glob + local)


class SFU(nn.Module):
    """Spatial feature upsampling: ConvBlock(x) * softmax over channels of a 1x1 conv (bias) of x."""

    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        feat = ConvBlock(self.features, bn_act=True, name="conv1", **kw)(x, train)
        return feat * jax.nn.softmax(ConvBlock(self.features, bias=True, name="conv2", **kw)(x), axis=-1)


class BiF(nn.Module):
    """Bidirectional fusion of a lower map ``xd``, a skip map ``xs`` and an upper map ``xu``, at xd's size."""

    features: int = 64
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xd: jax.Array, xs: jax.Array, xu: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = LFR(self.features, name="down_feat", **kw)(xd, train)
        u = SFU(self.features, name="up_feat", **kw)(xu, train)
        s = _bn(train, "st_feat_1", kw)(ConvBlock(self.features, name="st_feat_0", **kw)(xs))
        s = resize_bilinear(s, d.shape[1:3])
        u = resize_bilinear(u, s.shape[1:3])
        fuse = _bn(train, "fuse_1", kw)(ConvBlock(self.features, name="fuse_0", **kw)(jnp.concatenate([d, u, s], -1)))
        return fuse + s * u + jax.nn.sigmoid(s * d)


class ScaleLayer(nn.Module):
    """Per-channel ``x * weight + bias`` (weight from 1, bias from 0)."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        weight = self.param("weight", logical(nn.initializers.ones_init(), ("conv_out",)), (c,), self.param_dtype)
        bias = self.param("bias", logical(nn.initializers.zeros_init(), ("conv_out",)), (c,), self.param_dtype)
        return x * weight.astype(x.dtype) + bias.astype(x.dtype)


class GCE(nn.Module):
    """Global context enhancer: x + ConvBlock7x7(scale * conv3x3(global mean of x) + bias)."""

    features: int = 64
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        ctx = ConvBlock(c, 3, name="conv1", **kw)(x.mean((1, 2), keepdims=True))
        ctx = ScaleLayer(self.param_dtype, name="bn_scale")(ctx)
        return ConvBlock(self.features, 7, bn_act=True, name="conv2", **kw)(ctx, train) + x


class FDR(nn.Module):
    """Feature decoding and refinement (``FDRModule``): a 3x3 ConvBlock with BN + PReLU (``c2_``)."""

    features: int = 64
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return ConvBlock(self.features, 3, bn_act=True, name="c2_", dtype=self.dtype, param_dtype=self.param_dtype)(
            x, train)


class SegHead(nn.Module):
    """BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv (bias) to the classes."""

    classes: int
    inter: int = 64
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.inter, (3, 3), padding=1, use_bias=False, name="conv1", **kw)(nn.relu(_bn(train, "bn1", kw)(x)))
        return Conv(self.classes, (1, 1), padding=0, axes=("conv_in", "classes"), name="conv2", **kw)(
            nn.relu(_bn(train, "bn2", kw)(x)))


class P2AT(nn.Module):
    """ResNet backbone -> SSA on the stride-32 map -> decoder with BiF / GCE / FDR -> segmentation logits."""

    num_classes: int = 19
    backbone: str = "resnet18"
    backbone_overrides: Any = None
    img_size: int | tuple[int, int] = (1024, 2048)  # Cityscapes (example_inputs); any multiple of 32 runs
    in_chans: int = 3
    dim: int = 64
    key_dim: int = 16
    num_heads: int = 8
    attn_ratio: float = 2.0
    mlp_ratio: float = 4.0
    ssa_layers: int = 2
    pos_len: int = 16
    pyramid: Literal["official", "intended"] = "official"
    aux_heads: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, aux: bool | None = None):
        """Logits (B, H, W, num_classes) for NHWC images ``x``; ``(aux1, logits, aux2)`` when ``aux``
        (default: ``train`` and ``aux_heads``). In training mode BN uses batch statistics:
        ``apply(..., train=True, mutable=["batch_stats"])``."""
        if self.pyramid not in PYRAMIDS:
            raise ValueError(f"P2AT: pyramid must be one of {PYRAMIDS}; got {self.pyramid!r}")
        aux = (train and self.aux_heads) if aux is None else aux
        if aux and not self.aux_heads:
            raise ValueError("P2AT: aux=True needs the training build with its auxiliary heads: create the model "
                             "with aux_heads=True")
        h, w = check_image(x, in_chans=self.in_chans, divisible_by=32)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        overrides = {"zero_init_last": False, **dict(self.backbone_overrides or {}), "num_classes": 0}
        backbone = create_model(self.backbone, in_chans=self.in_chans, **kw, **overrides)
        feats = backbone.clone(parent=self, name="backbone")(x, train=train, output="features")
        x1, x2, x3, x4 = (feats[s] for s in (4, 8, 16, 32))
        d = self.dim
        block = dict(dim=d, key_dim=self.key_dim, num_heads=self.num_heads, attn_ratio=self.attn_ratio,
                     mlp_ratio=self.mlp_ratio, pos_len=self.pos_len, pyramid=self.pyramid)

        y = ConvBlock(d, bn_act=True, name="feature_reducer", **kw)(x4, train)
        y = SSABlock(self.ssa_layers, block, name="deep_feature_processor", **kw)(y, train)
        p1 = DecoderBlock(d, 3, name="P1_decoder", **kw)(y, train)
        b4 = BiF(d, name="BiS4", **kw)(x2, x3, p1, train)
        p2 = DecoderBlock(d, 5, name="P2_decoder", **kw)(GCE(d, name="pool_gce4", **kw)(b4, train), train)
        b3 = BiF(d, name="BiS3", **kw)(x1, x2, p2, train)
        p3 = DecoderBlock(d, 7, name="P3_decoder", **kw)(GCE(d, name="pool_gce3", **kw)(b3, train), train)

        r3 = FDR(d, name="refine3", **kw)(p3, train)
        f = ConvBlock(d, 3, bn_act=True, name="fuse1", **kw)(
            jnp.concatenate([resize_bilinear(p2, r3.shape[1:3]), r3], -1), train)
        r2 = FDR(d, name="refine2", **kw)(f, train)
        f = ConvBlock(d, 3, bn_act=True, name="fuse2", **kw)(
            jnp.concatenate([resize_bilinear(p1, r2.shape[1:3]), r2], -1), train)
        r1 = FDR(d, name="refine1", **kw)(f, train)
        up = lambda t: resize_bilinear(t, (h, w), align_corners=True)  # noqa: E731
        logits = up(SegHead(self.num_classes, d, name="final_seg_head", **kw)(r1, train))
        if self.aux_heads and (aux or self.is_initializing()):  # built at init: part of the training build
            a1 = up(SegHead(self.num_classes, d, name="aux_seg_head1", **kw)(b4, train))
            a2 = up(SegHead(self.num_classes, d, name="aux_seg_head2", **kw)(b3, train))
            if aux:
                return a1, logits, a2
        return logits


def p2at_loss(outputs: Any, labels: jax.Array, *, aux_weight: float = 0.4, threshold: float = 0.9,
              min_kept: int = 131072, ignore_index: int = VOID) -> jax.Array:
    """The P2AT training loss for ``outputs`` = logits or ``(aux1, logits, aux2)`` (B, H, W, C) and
    ``labels`` (B, H, W): ``aux_weight`` x cross-entropy of each auxiliary output + 1.0 x OHEM
    cross-entropy (``threshold``, ``min_kept``: the CamVid configs') of the final logits."""
    if isinstance(outputs, (tuple, list)):
        if len(outputs) != 3:
            raise ValueError(f"p2at_loss takes the logits or P2AT's (aux1, logits, aux2); got {len(outputs)} outputs")
        a1, logits, a2 = outputs
        aux = aux_weight * (semantic_cross_entropy(a1, labels, ignore_index)
                            + semantic_cross_entropy(a2, labels, ignore_index))
    else:
        logits, aux = outputs, 0.0
    return aux + ohem_cross_entropy(logits, labels, threshold=threshold, min_kept=min_kept, ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------------
# Variants (builders/model_builder.py). top1 holds the CamVid test mIoU of the abstract (720 x 960 images).

BACKBONES = {"p2at_s": "resnet18", "p2at_m": "resnet34", "p2at_l": "resnet50"}


def _build(name: str, overrides: dict[str, Any]) -> P2AT:
    return P2AT(**{"backbone": BACKBONES[name], **overrides})


def _info(params_m: float, miou: float) -> ModelInfo:
    return ModelInfo(paper="P2AT: Pyramid Pooling Axial Transformer for Real-time Semantic Segmentation",
                     arxiv="2310.15025", repo="mohamedac29/P2AT", input_size=(1024, 2048, 3), params_m=params_m,
                     top1=miou, converter=convert_official_p2at, task="semantic segmentation", metric="mIoU")


@register_model(_info(12.74, 80.5))
def p2at_s(**overrides: Any) -> P2AT:
    """P2AT-S: ResNet-18 (12,736,019 parameters; 12,812,729 with ``aux_heads=True``), CamVid mIoU 80.5."""
    return _build("p2at_s", overrides)


@register_model(_info(22.84, 81.0))
def p2at_m(**overrides: Any) -> P2AT:
    """P2AT-M: ResNet-34 (22,844,179 parameters; 22,920,889 with ``aux_heads=True``), CamVid mIoU 81.0."""
    return _build("p2at_m", overrides)


@register_model(_info(25.28, 81.1))
def p2at_l(**overrides: Any) -> P2AT:
    """P2AT-L: ResNet-50 (25,276,435 parameters; 25,353,145 with ``aux_heads=True``), CamVid mIoU 81.1."""
    return _build("p2at_l", overrides)
