"""ViT-CoMer: a plain ViT with a multi-receptive-field CNN pyramid for dense prediction.

Paper: "ViT-CoMer: Vision Transformer with Convolutional Multi-scale Feature Interaction for Dense
Predictions", Xia et al., CVPR 2024, arXiv 2403.07392. Official code: Traffic-X/ViT-CoMer
(``segmentation/mmseg_custom/models/backbones/{vit_comer.py, comer_modules.py, base/vit.py}``,
configs ``segmentation/configs/ade20k/upernet_vit_comer_{tiny,small,base}_512_160k_ade20k.py``).
Parameter names follow the official modules so its checkpoints convert key for key
(``jaxformers/models/vit_comer_convert.py``).

Architecture (the official code, whose wiring we reproduce exactly):

- The ViT is DeiT (patch 16, pre-norm blocks of ``jaxformers.layers.TransformerBlock`` with
  LayerScale ``gamma1``/``gamma2`` initialised to 1, no class token used, no final norm). Its
  224-px position table (class slot kept, unused) is resized to the input's patch grid with torch's
  bicubic ``interpolate`` (A = -0.75, no antialiasing), as the official ``_get_pos_embed``.
- SPM (``spm``): a CNN stem (3x3 s2, 3x3, 3x3 convs + BN + ReLU, 3x3 s2 max-pool; ``conv_inplane``
  channels) and three 3x3 s2 conv + BN + ReLU stages give maps at strides 4, 8, 16, 32; 1x1 convs
  project each to the ViT width. The stride 8/16/32 maps (plus a learned ``level_embed``) form the
  CNN feature ``c`` (16n : 4n : n tokens for n = H/32 * W/32); the stride-4 map waits for the end.
- Four CTI blocks (``interactions_i``), one per group of ViT blocks (``interaction_indexes``, default
  [[0, 2], [3, 5], [6, 8], [9, 11]]): ``c = MRFP(c)`` (Linear to ``dim_ratio`` x width -> per scale
  the hidden channels split in halves through depthwise 3x3 and 5x5 convs, concatenated, BN, GELU,
  separate weights per scale -> GELU -> Linear back; not residual); the ViT tokens are added to the
  stride-16 part of ``c``; CTI-toV: multi-scale deformable self-attention over the three levels of
  ``c`` (queries and values ``c``, reference points on every level) + ConvFFN, its three levels
  resampled to stride 16 (bilinear x0.5, x1, x2) and summed into the ViT tokens, scaled by ``gamma``
  (zero at init); the group's ViT blocks; CTI-toC: the ViT tokens added to the stride-16 part of
  ``c``, then a ``MultiscaleExtractor`` (deformable self-attention over ``c``'s three levels +
  ConvFFN). The last CTI block has four extra ``Extractor_CTI`` steps (``use_extra_cti``).
- Output: the stride-4 map + a 2x2 stride-2 transposed conv of the stride-8 part of ``c``; each of
  the four maps plus the corresponding CTI block's ViT output (bilinearly resized: x4, x2, x1, x0.5);
  BatchNorm each (``norm1``..``norm4``). ``forward_features`` gives ``{4, 8, 16, 32}`` NHWC maps.

Multi-scale deformable attention is the shared ``jaxformers.layers.deformable.MSDeformAttn`` with
its ``ratio`` (value channels ``int(width * deform_ratio)``). The dense head is UperNet
(``jaxformers/models/upernet.py``); ``upernet_vit_comer_{tiny,small,base}`` are registered there.

Quirks of the official code reproduced on purpose: in CTI-toC and the extra CTI steps the
extractor's residual stream starts from the *normalised* CNN feature (``cfinter(query=
query_norm(c), feat=feat_norm(c))`` then ``query + attn``), so ``c`` passes through two LayerNorms
(the step's and the extractor's) before its deformable attention; MRFP applies GELU twice (inside
each scale's branch after the BN, and after the concatenation); CTI-toV's attention output has no
residual of its own before the ConvFFN (``c1 = attn; c1 = c1 + ffn(norm(c1))``); every CTI drop
path uses the model's full ``drop_path_rate`` (not the per-block linear rule).

Deviations: SyncBatchNorm is plain BatchNorm (``batch_stats``; under a data-parallel mesh the batch
statistics are computed over the global batch by XLA). Images must be multiples of 32 (the CNN's
stride-32 level and the 16:4:1 token split need it). ``__call__`` returns the global average of the
stride-32 map (``num_classes=0``, the default) or a linear classifier on it, for the backbone
contract; the paper's models are the UperNet segmenters.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers import (BatchNorm, Conv, Dense, DropPath, LayerNorm, PatchEmbed, TransformerBlock, check_image,
                               check_image_strides, logical, trunc_normal)
from jaxformers.layers.deformable import MSDeformAttn, reference_points
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.layers.interpolate import resize_bilinear
from jaxformers.layers.mlp import gelu
from jaxformers.models.crossvit import resize_bicubic
from jaxformers.models.vit_comer_convert import convert_vit_comer
from jaxformers.registry import ModelInfo, register_model

STRIDES = (4, 8, 16, 32)
LEVELS = (8, 16, 32)  # the strides of the CNN feature c the interactions attend over


def conv_init(groups: int = 1):
    """The official ``_init_weights`` for convs: N(0, sqrt(2 / fan_out)), fan_out = k*k*out/groups."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out = shape
        return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (kh * kw * out / groups))

    return init


def flatten(maps: Sequence[jax.Array]) -> jax.Array:
    """NHWC maps -> (B, sum of H*W, C), row-major, in order (the official token layout of c)."""
    return jnp.concatenate([m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps], axis=1)


def unflatten(tokens: jax.Array, shapes: Sequence[tuple[int, int]]) -> list[jax.Array]:
    out, start = [], 0
    for h, w in shapes:
        out.append(tokens[:, start:start + h * w].reshape(tokens.shape[0], h, w, tokens.shape[-1]))
        start += h * w
    return out


def _shapes(maps: Sequence[jax.Array]) -> list[tuple[int, int]]:
    return [tuple(m.shape[1:3]) for m in maps]


class ConvFFN(nn.Module):
    """fc1 -> depthwise 3x3 (one kernel for all three levels) -> GELU -> dropout -> fc2 -> dropout, over
    the three maps of c (official ``ConvFFN`` + ``DWConv``)."""

    hidden: int
    dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = maps[0].shape[-1]
        fc1 = Dense(self.hidden, axes=("embed", "mlp"), name="fc1", **kw)
        dw = Conv(self.hidden, (3, 3), padding=1, feature_group_count=self.hidden, axes=(None, "mlp"),
                  kernel_init=conv_init(self.hidden), name="dwconv", **kw)
        fc2 = Dense(dim, axes=("mlp", "embed"), name="fc2", **kw)
        drop = nn.Dropout(self.dropout)
        return [drop(fc2(drop(gelu(dw(fc1(m))), deterministic=not train)), deterministic=not train) for m in maps]


class MRFP(nn.Module):
    """Multi-receptive-field feature pyramid: fc1 -> per level [dw3x3 | dw5x5 on the two channel
    halves, BN, GELU] -> GELU -> dropout -> fc2 -> dropout (official ``MRFP`` + ``MultiDWConv``)."""

    hidden: int
    dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.hidden % 2:
            raise ValueError(f"MRFP splits its hidden channels in halves; hidden={self.hidden} must be even "
                             f"(width * dim_ratio)")
        dim, half = maps[0].shape[-1], self.hidden // 2
        fc1 = Dense(self.hidden, axes=("embed", "mlp"), name="fc1", **kw)
        fc2 = Dense(dim, axes=("mlp", "embed"), name="fc2", **kw)
        drop = nn.Dropout(self.dropout)
        out = []
        for level, m in enumerate(maps):
            y = fc1(m)
            a = Conv(half, (3, 3), padding=1, feature_group_count=half, axes=(None, "mlp"),
                     kernel_init=conv_init(half), name=f"dwconv{2 * level + 1}", **kw)(y[..., :half])
            b = Conv(half, (5, 5), padding=2, feature_group_count=half, axes=(None, "mlp"),
                     kernel_init=conv_init(half), name=f"dwconv{2 * level + 2}", **kw)(y[..., half:])
            y = jnp.concatenate([a, b], axis=-1)
            y = gelu(BatchNorm(train=train, axis_name="mlp", name=f"bn{level + 1}", **kw)(y))
            y = drop(gelu(y), deterministic=not train)
            out.append(drop(fc2(y), deterministic=not train))
        return out


class MultiscaleExtractor(nn.Module):
    """query + MSDeformAttn(LN(query), LN(feat)) over the three levels (reference points on every
    level), then + DropPath(ConvFFN(LN(.))) (official ``MultiscaleExtractor``)."""

    num_heads: int
    n_points: int = 4
    deform_ratio: float = 1.0
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query: Sequence[jax.Array], feat: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shapes, dim = _shapes(query), query[0].shape[-1]
        q = flatten(query)
        ref = reference_points(shapes, q.shape[0])
        attn = MSDeformAttn(dim, n_levels=len(shapes), n_heads=self.num_heads, n_points=self.n_points,
                            ratio=self.deform_ratio, name="attn", **kw)(
            LayerNorm(1e-6, name="query_norm", **kw)(q), ref, LayerNorm(1e-6, name="feat_norm", **kw)(flatten(feat)),
            shapes)
        maps = unflatten(q + attn, shapes)
        if self.with_cffn:
            normed = list(map(LayerNorm(1e-6, name="ffn_norm", **kw), maps))
            ffn = ConvFFN(int(dim * self.cffn_ratio), self.dropout, name="ffn", **kw)(normed, train)
            maps = [m + DropPath(self.drop_path)(f, train=train) for m, f in zip(maps, ffn)]
        return maps


class CTIToV(nn.Module):
    """CNN -> ViT: deformable self-attention over c's three levels + ConvFFN, the levels resampled to
    stride 16 and summed into the ViT tokens, scaled by ``gamma`` (official ``CTI_toV``)."""

    num_heads: int
    n_points: int = 4
    deform_ratio: float = 1.0
    cffn_ratio: float = 0.25
    init_values: float = 0.0
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: Sequence[jax.Array], train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shapes, dim = _shapes(c), x.shape[-1]
        flat = flatten(c)
        attn = MSDeformAttn(dim, n_levels=len(shapes), n_heads=self.num_heads, n_points=self.n_points,
                            ratio=self.deform_ratio, name="attn", **kw)(
            LayerNorm(1e-6, name="query_norm", **kw)(flat), reference_points(shapes, flat.shape[0]),
            LayerNorm(1e-6, name="feat_norm", **kw)(flat), shapes)
        maps = unflatten(attn, shapes)
        normed = list(map(LayerNorm(1e-6, name="ffn_norm", **kw), maps))
        ffn = ConvFFN(int(dim * self.cffn_ratio), self.dropout, name="ffn", **kw)(normed, train)
        maps = [m + DropPath(self.drop_path)(f, train=train) for m, f in zip(maps, ffn)]
        h, w = shapes[1]
        total = sum(resize_bilinear(m, (h, w)) for m in maps)
        gamma = self.param("gamma", logical(nn.initializers.constant(self.init_values), ("embed",)), (dim,),
                           self.param_dtype)
        return x + gamma.astype(x.dtype) * total.reshape(x.shape)


class CTIToC(nn.Module):
    """ViT -> CNN: the ViT tokens added to c's stride-16 level, (optionally + ConvFFN, the extra CTI
    steps), then a ``MultiscaleExtractor`` from LN(c) (official ``CTI_toC`` / ``Extractor_CTI``)."""

    num_heads: int
    n_points: int = 4
    deform_ratio: float = 1.0
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    own_ffn: bool = False  # Extractor_CTI: a ConvFFN on c before the extractor
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, c: Sequence[jax.Array], x: jax.Array, train: bool = False) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = [c[0], c[1] + x.reshape(c[1].shape), c[2]]
        dim = x.shape[-1]
        if self.own_ffn and self.with_cffn:
            normed = list(map(LayerNorm(1e-6, name="ffn_norm", **kw), c))
            ffn = ConvFFN(int(dim * self.cffn_ratio), self.dropout, name="ffn", **kw)(normed, train)
            c = [m + DropPath(self.drop_path)(f, train=train) for m, f in zip(c, ffn)]
        query = list(map(LayerNorm(1e-6, name="query_norm", **kw), c))
        feat = list(map(LayerNorm(1e-6, name="feat_norm", **kw), c))
        return MultiscaleExtractor(self.num_heads, self.n_points, self.deform_ratio, self.with_cffn, self.cffn_ratio,
                                   self.dropout, self.drop_path, name="cfinter", **kw)(query, feat, train)


class SPM(nn.Module):
    """The spatial pyramid CNN: stem (three 3x3 convs, max-pool) and three 3x3 s2 stages, each conv +
    BN + ReLU, 1x1 projections to the ViT width: maps at strides 4, 8, 16, 32 (official ``CNN``)."""

    inplanes: int = 64
    embed_dim: int = 384
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def conv_bn(y, width, stride, name):
            y = Conv(width, (3, 3), strides=stride, padding=1, use_bias=False, kernel_init=conv_init(),
                     name=f"{name}_conv", **kw)(y)
            return nn.relu(BatchNorm(train=train, name=f"{name}_bn", **kw)(y))

        p = self.inplanes
        y = conv_bn(x, p, 2, "stem_0")
        y = conv_bn(y, p, 1, "stem_1")
        y = conv_bn(y, p, 1, "stem_2")
        c1 = nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        c2 = conv_bn(c1, 2 * p, 2, "conv2")
        c3 = conv_bn(c2, 4 * p, 2, "conv3")
        c4 = conv_bn(c3, 4 * p, 2, "conv4")
        return [Conv(self.embed_dim, (1, 1), axes=("conv_in", "embed"), kernel_init=conv_init(), name=f"fc{i + 1}",
                     **kw)(c) for i, c in enumerate((c1, c2, c3, c4))]


class CTIBlock(nn.Module):
    """One interaction: MRFP, CTI-toV, (the ViT blocks run by the caller), CTI-toC and, in the last
    block, the four extra CTI steps (official ``CTIBlock``)."""

    embed_dim: int
    num_heads: int
    n_points: int = 4
    deform_ratio: float = 1.0
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    init_values: float = 0.0
    dim_ratio: float = 6.0
    extra_cti: bool = False
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(num_heads=self.num_heads, n_points=self.n_points, deform_ratio=self.deform_ratio,
                      cffn_ratio=self.cffn_ratio, dropout=self.dropout, drop_path=self.drop_path, **kw)
        self.cti_tov = CTIToV(init_values=self.init_values, **common)
        self.cti_toc = CTIToC(with_cffn=self.with_cffn, **common)
        self.extra_ctis = [CTIToC(with_cffn=self.with_cffn, own_ffn=True, **common)
                           for _ in range(4 if self.extra_cti else 0)]
        self.mrfp = MRFP(int(self.embed_dim * self.dim_ratio), self.dropout, **kw)

    def to_vit(self, x: jax.Array, c: Sequence[jax.Array], train: bool = False):
        """(x, c) -> (x after CTI-toV, c after MRFP + x)."""
        c = self.mrfp(c, train)
        c = [c[0], c[1] + x.reshape(c[1].shape), c[2]]
        return self.cti_tov(x, c, train), c

    def to_cnn(self, c: Sequence[jax.Array], x: jax.Array, train: bool = False) -> list[jax.Array]:
        c = self.cti_toc(c, x, train)
        for cti in self.extra_ctis:
            c = cti(c, x, train)
        return c


class ViTCoMer(FeatureBackbone):
    """ViT-CoMer backbone (module docstring): ``forward_features`` -> ``{4, 8, 16, 32}`` NHWC maps of
    ``embed_dim`` channels; ``__call__`` -> the pooled stride-32 map (or a linear head's logits)."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_size: int = 16
    in_chans: int = 3
    img_size: int = 512  # the default input (any multiple of 32 works)
    pretrain_size: int = 224  # the position table's grid is pretrain_size // patch_size
    conv_inplane: int = 64
    n_points: int = 4
    deform_num_heads: int = 6
    deform_ratio: float = 1.0
    init_values: float = 0.0
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    dim_ratio: float = 6.0
    interaction_indexes: Sequence[Sequence[int]] = ((0, 2), (3, 5), (6, 8), (9, 11))
    use_extra_cti: bool = True
    add_vit_feature: bool = True
    layer_scale: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    num_classes: int = 0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _check_config(self):
        if self.patch_size != 16:
            raise ValueError(f"ViT-CoMer's interactions put the ViT tokens at stride 16; patch_size must be 16, "
                             f"got {self.patch_size}")
        idx = [tuple(int(v) for v in pair) for pair in self.interaction_indexes]
        flat = [i for a, b in idx for i in range(a, b + 1)]
        if any(len(p) != 2 or p[0] > p[1] for p in idx) or flat != list(range(self.depth)):
            raise ValueError(f"interaction_indexes {idx} must be [first, last] block ranges that cover blocks "
                             f"0..{self.depth - 1} in order (e.g. [[0, 2], [3, 5], [6, 8], [9, 11]] for depth 12)")
        if self.add_vit_feature and len(idx) != 4:
            raise ValueError(f"add_vit_feature adds one CTI block's ViT output to each of the 4 output maps: "
                             f"interaction_indexes must have 4 groups, got {len(idx)}")
        return idx

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        check_output(output, "ViTCoMer")
        idx = self._check_config()
        check_image(x, in_chans=self.in_chans)
        height, width = check_image_strides(x, STRIDES, who="ViTCoMer")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, dim = x.shape[0], self.embed_dim
        h, w = height // 16, width // 16

        c1, c2, c3, c4 = SPM(self.conv_inplane, dim, name="spm", **kw)(x, train)
        level = self.param("level_embed", logical(nn.initializers.normal(1.0), (None, "embed")), (3, dim),
                           self.param_dtype).astype(c2.dtype)
        c = [c2 + level[0], c3 + level[1], c4 + level[2]]

        tokens = PatchEmbed(dim, self.patch_size, self.in_chans, name="patch_embed", **kw)(x)
        g = self.pretrain_size // self.patch_size
        pos = self.param("pos_embed", logical(trunc_normal(0.02), (None, None, "embed")), (1, 1 + g * g, dim),
                         self.param_dtype)
        pos = pos[:, 1:].reshape(1, g, g, dim)
        if (g, g) != (h, w):
            pos = resize_bicubic(pos, (h, w))
        tokens = tokens + pos.reshape(1, h * w, dim).astype(tokens.dtype)
        tokens = nn.Dropout(self.drop_rate)(tokens, deterministic=not train)

        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        blocks = [TransformerBlock(self.num_heads, self.mlp_ratio, self.qkv_bias, float(rates[i]), self.attn_drop_rate,
                                   self.drop_rate, 1.0 if self.layer_scale else None, name=f"blocks_{i}", **kw)
                  for i in range(self.depth)]
        outs = []
        for i, (first, last) in enumerate(idx):
            layer = CTIBlock(dim, self.deform_num_heads, self.n_points, self.deform_ratio, self.with_cffn, self.cffn_ratio,
                             self.init_values, self.dim_ratio, self.use_extra_cti and i == len(idx) - 1,
                             self.drop_rate, self.drop_path_rate, name=f"interactions_{i}", **kw)
            tokens, c = layer.to_vit(tokens, c, train)
            for blk in blocks[first:last + 1]:
                tokens = blk(tokens, train)
            c = layer.to_cnn(c, tokens, train)
            outs.append(tokens.reshape(b, h, w, dim))

        up = nn.ConvTranspose(dim, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True,
                              kernel_init=logical(conv_init(), (None, None, "embed", "conv_in")),
                              bias_init=logical(nn.initializers.zeros_init(), ("embed",)), name="up", **kw)
        maps = [up(c[0]) + c1, *c]
        if self.add_vit_feature:
            maps = [m + resize_bilinear(o, m.shape[1:3]) for m, o in zip(maps, outs)]
        features = {s: BatchNorm(train=train, axis_name="embed", name=f"norm{i + 1}", **kw)(m)
                    for i, (s, m) in enumerate(zip(STRIDES, maps))}
        if output == "features":
            return features
        pooled = features[32].mean(axis=(1, 2))
        logits = pooled
        if self.num_classes:
            logits = Dense(self.num_classes, axes=("embed", "classes"), kernel_init=nn.initializers.zeros_init(),
                           name="head", **kw)(pooled)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# Variants: the official ADE20K configs (params_m: the official ViTCoMer backbone's count) (DeiT-T/S/B, patch 16, conv_inplane 64, 4 points, cffn 0.25,
# interaction indexes [[0, 2], [3, 5], [6, 8], [9, 11]], extra CTI, init_values 0).

VARIANTS = {
    "vit_comer_tiny": dict(embed_dim=192, depth=12, num_heads=3, deform_num_heads=6, deform_ratio=1.0,
                           dim_ratio=6.0, drop_path_rate=0.1),
    "vit_comer_small": dict(embed_dim=384, depth=12, num_heads=6, deform_num_heads=6, deform_ratio=1.0,
                            dim_ratio=1.5, drop_path_rate=0.2),
    "vit_comer_base": dict(embed_dim=768, depth=12, num_heads=12, deform_num_heads=12, deform_ratio=0.5,
                           dim_ratio=1.0, drop_path_rate=0.3),
}


def _info(params_m=None):
    return ModelInfo(paper="ViT-CoMer: Vision Transformer with Convolutional Multi-scale Feature Interaction for "
                           "Dense Predictions", arxiv="2403.07392", repo="Traffic-X/ViT-CoMer", input_size=(512, 512, 3),
                     params_m=params_m, converter=convert_vit_comer, task="feature extraction",
                     metric="none")


@register_model(_info(10.62))
def vit_comer_tiny(**overrides: Any) -> ViTCoMer:
    """ViT-CoMer-T backbone (DeiT-T; ``upernet_vit_comer_tiny`` is the ADE20K segmenter)."""
    return ViTCoMer(**{**VARIANTS["vit_comer_tiny"], **overrides})


@register_model(_info(31.28))
def vit_comer_small(**overrides: Any) -> ViTCoMer:
    """ViT-CoMer-S backbone (DeiT-S)."""
    return ViTCoMer(**{**VARIANTS["vit_comer_small"], **overrides})


@register_model(_info(110.60))
def vit_comer_base(**overrides: Any) -> ViTCoMer:
    """ViT-CoMer-B backbone (DeiT-B)."""
    return ViTCoMer(**{**VARIANTS["vit_comer_base"], **overrides})
