"""DuoFormer: ResNet-50 multi-scale features as tokens, scale attention inside each patch, then patch attention.

Paper: "DuoFormer: Leveraging Hierarchical Representations by Local and Global Attention Vision
Transformer", Xiaoya Tang, Bodong Zhang, Man Minh Ho, Beatrice S. Knudsen, Tolga Tasdizen, MIDL 2025,
arXiv 2506.12982 (official repository named by the paper: github.com/xiaoyatang/DuoFormer). The code
this file follows line by line is the authors' release github.com/AliSerwat/duoformer_TCGA, files
``models/model.py`` (``MyModel``: backbone, channel projectors, index tables, token assembly),
``models/projection_head.py`` (``Projection``, ``Channel_Projector_*``), ``models/multiscale_attn.py``
(``MultiScaleAttention``, ``MultiscaleBlock``) and ``models/multi_vision_transformer.py``
(``MultiscaleTransformer``, the "separate order" forward).

Wiring (``DuoFormer.__call__``), for a 224 x 224 image:

1. Backbone: torchvision ResNet-50 without pool and fc (our :class:`jaxformers.models.resnet.ResNet`, same
   layout), frozen by default as the official ``freeze=True`` (``jax.lax.stop_gradient`` on its outputs: no
   gradient reaches it; its BatchNorms still follow ``train`` like the official ``model.train()``). Stage
   outputs at strides 4 / 8 / 16 / 32 (256 / 512 / 1024 / 2048 channels, 56 / 28 / 14 / 7 wide). An
   optimizer with decoupled weight decay (AdamW) would still shrink the frozen weights: keep ``backbone``
   out of its decay (the training CLI: add ``"backbone"`` to ``optimizer.no_decay_names``; a zero
   gradient then gives a zero Adam update) or mask it out of the optimizer.
2. Scale token (the official ``Channel_Projector_*``): stride 4 -> two 3x3 stride-2 convs and a 2x2 max-pool;
   stride 8 -> one 3x3 stride-2 conv and a max-pool; stride 16 -> a max-pool; stride 32 as is; concatenated
   (3840 channels) and four 3x3 conv -> BN -> ReLU layers to ``embed_dim`` (768 in the official code,
   where it is hard-coded). One token per stride-32 cell. ``scale_token="learned"`` replaces it with one
   learned token shared by all patches (the ``scale_token="random"`` option of the authors'
   ``models/model_wo_extra_params.py``).
3. Tokens: a 1x1 conv (with bias) per used stage to ``embed_dim`` (``Projection.proj_heads{3,2,1,0}``),
   then the per-patch index tables (:func:`patch_index_tables`): a patch is one stride-32 cell; it gathers
   1 token at stride 32, its 2x2 children at stride 16, 4x4 at stride 8, 8x8 at stride 4. ``scales``
   = 2 / 3 / 4 uses the first 2 / 3 / 4 of those, so a patch has 1 + (1 + 4 [+ 16 [+ 64]]) = 6 / 22 / 86
   tokens, the scale token first. The stride-16 table lists the 2x2 children column by column
   ((0,0), (1,0), (0,1), (1,1)) while the stride-8 and stride-4 tables go row by row: the official
   tables, reproduced (the order matters to the learned per-token position embedding).
4. Scale attention: a learned (1, 1, S, D) position embedding, then ``depth`` pre-norm transformer blocks
   (LayerScale ``init_values``, MLP ratio 4, GELU) whose attention runs inside each patch over its S
   tokens, with the official scale 2 * embed_dim ** -0.5 (``MultiScaleAttention.scale``; not the usual
   head_dim ** -0.5), through the shared :class:`~jaxformers.layers.MultiHeadAttention` (``scale=``).
5. Patch attention: [CLS] + the first token of every patch (the scale token after scale attention), plus a
   learned (1, 1 + patches, D) position embedding, go through the patch attentions of the blocks: a bare
   multi-head attention (no norm, residual or MLP; ``PatchBlock``'s docstring: "Remove all Layer Scale,
   MLP projection and residual connection"), with the same 2 * embed_dim ** -0.5 scale (the official
   ``MultiScaleAttention`` overwrites ``self.scale`` for both passes). Each block's patch attention has
   its own weights (the official ``attn.qkv`` / ``attn.proj``; the scale pass uses ``qkv1`` / ``proj1``).
6. Head: LayerNorm of the [CLS] output, Linear.

Reproduced quirk (``chain_patch_attention=False``, the default): the official loop feeds block 0's
patch-attention output to *every* later block without updating it (``cls_token =
self.blocks[i].forward_change_order_attn2(x)`` never reassigns ``x``), so the result is block
``depth - 1``'s attention of block 0's output; the patch attentions of blocks 1 .. depth - 2 are computed
and discarded (their weights get no gradient). ``chain_patch_attention=True`` gives the evidently
intended chain (each block's patch attention reads the previous one's output). With ``depth=1`` the
official code would pass the raw [CLS] parameter to the head; here block 0's output is used.

Defaults (registered variants ``duoformer_{2,3,4}scale_r50``): depth 12, width 768, 12 heads, input 224
(the authors' ``main_toy.py``; ``build_model``'s 256 / 384 widths do not run: the projection width must
equal the transformer's, and the scale token is 768 wide), LayerScale 1e-5, attention and projection
dropout 0.1, frozen backbone (``build_model`` / ``MyModel``), 100 classes (``build_model``).

Deviations: images are NHWC and may be any multiple of 32 (``img_size``: the patch position table has
(H/32)(W/32) + 1 rows; the official code hard-codes 7 x 7 patches). The official ``MultiscaleTransformer``
subclasses timm's ``VisionTransformer`` and so also holds a 32x32 patch embedding (3 -> 768) it never
calls; it is not built here (2,360,064 parameters fewer; ``convert_official_duoformer`` skips it). The
official ``MyModel.forward`` projects only strides 16 and 32 (``self.projection({"2": .., "3": ..})``), so
its 3- and 4-scale forward fails with a KeyError; here every used stage is projected, as the authors'
``model_wo_extra_params.py`` does. Initialisation follows the official where it is stated (position
tables trunc-normal 0.036 / 0.02, [CLS] normal 1e-6, He-normal projections), otherwise the project's
defaults (truncated normal 0.02 Dense kernels, LeCun-normal convolutions).
"""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import (StateDict, batch_norm_params, conv2d, dense_params, heads_out, norm_params,
                                       qkv_fused)
from jaxformers.layers import BatchNorm, Conv, Dense, LayerNorm, MultiHeadAttention, check_image
from jaxformers.layers.block import TransformerBlock
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.layers.linear import logical, trunc_normal
from jaxformers.models.resnet import ResNet, convert_timm_resnet
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

STRIDES = (32, 16, 8, 4)  # scale k of a patch reads stride STRIDES[k]: 1, 4, 16, 64 tokens
HE_FAN_IN = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # torch kaiming_normal_ defaults


def tokens_per_patch(scales: int) -> int:
    """Tokens in one patch for ``scales`` scales, the scale token included: 6 / 22 / 86 for 2 / 3 / 4."""
    return 1 + sum(4 ** k for k in range(scales))


def patch_index_tables(grid_h: int, grid_w: int, scales: int = 4) -> list[np.ndarray]:
    """The official per-patch index tables for a (grid_h, grid_w) grid of stride-32 patches (7 x 7 at 224).

    Entry k (stride ``STRIDES[k]``) is an int32 (grid_h * grid_w, 4 ** k) array: row p = r * grid_w + c
    lists the row-major flat indices, in the stride-``STRIDES[k]`` map of (grid_h * 2**k, grid_w * 2**k)
    cells, of the cells that patch (r, c) covers. Stride 16 lists its 2x2 cells column by column
    ((0,0), (1,0), (0,1), (1,1)); strides 8 and 4 go row by row (``MyModel.__init__`` in
    ``models/model.py``)."""
    if scales not in (1, 2, 3, 4):
        raise ValueError(f"scales must be 1..4 (strides {STRIDES}); got {scales}")
    r, c = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    r, c = r.reshape(-1, 1), c.reshape(-1, 1)
    tables = []
    for k in range(scales):
        f, width = 2 ** k, grid_w * 2 ** k
        dr, dc = np.meshgrid(np.arange(f), np.arange(f), indexing="ij")
        if k == 1:
            dr, dc = dr.T, dc.T  # column by column, as the official stride-16 table
        tables.append(((f * r + dr.reshape(1, -1)) * width + f * c + dc.reshape(1, -1)).astype(np.int32))
    return tables


def gather_patch_tokens(maps: dict[int, jax.Array], scales: int) -> jax.Array:
    """(B, P, 1 + 4 + ..., D) tokens of every stride-32 patch from NHWC projected maps keyed by stride."""
    b, gh, gw, d = maps[32].shape
    parts = []
    for k, table in enumerate(patch_index_tables(gh, gw, scales)):
        m = maps[STRIDES[k]]
        parts.append(m.reshape(b, -1, d)[:, jnp.asarray(table), :])  # (B, P, 4**k, D)
    return jnp.concatenate(parts, axis=2)


class ScaleTokenProjector(nn.Module):
    """The official channel projectors (``Channel_Projector_layer1/2/3`` and ``Channel_Projector_All``):
    one ``features``-wide token per stride-32 cell from all four stages, (B, H/32, W/32, features)."""

    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, maps: dict[int, jax.Array], train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def down(x, name):
            return Conv(x.shape[-1], (3, 3), strides=2, padding=1, kernel_init=HE_FAN_IN, name=name, **kw)(x)

        def pool(x):
            return nn.max_pool(x, (2, 2), strides=(2, 2))

        s4 = pool(down(down(maps[4], "proj1_conv1"), "proj1_conv2"))
        s8 = pool(down(maps[8], "proj2_conv1"))
        x = jnp.concatenate([s4, s8, pool(maps[16]), maps[32]], axis=-1)
        for i in range(4):
            x = Conv(self.features, (3, 3), padding=1, name=f"fuse{i}_conv", **kw)(x)
            x = nn.relu(BatchNorm(train=train, name=f"fuse{i}_bn", **kw)(x))
        return x


class DuoFormer(FeatureBackbone):
    """DuoFormer (module docstring): ResNet-50 stage features as multi-scale patch tokens, scale attention
    within each patch, patch attention over [CLS] + the patches' first tokens, a linear head."""

    scales: int = 4
    depth: int = 12
    embed_dim: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    init_values: float | None = 1e-5
    attn_drop_rate: float = 0.1
    drop_rate: float = 0.1
    num_classes: int = 100
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    freeze_backbone: bool = True
    scale_token: Literal["channel", "learned"] = "channel"
    chain_patch_attention: bool = False
    backbone_depth: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50
    backbone_channels: tuple[int, ...] = (64, 128, 256, 512)
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def num_features(self) -> int:
        return self.embed_dim

    def _grid(self) -> tuple[int, int]:
        h, w = (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)
        if h % 32 or w % 32 or h < 32 or w < 32:
            raise ValueError(f"DuoFormer: img_size must be a multiple of 32 (one patch per stride-32 cell); "
                             f"got {self.img_size}")
        return h // 32, w // 32

    def _validate(self) -> None:
        if self.scales not in (2, 3, 4):
            raise ValueError(f"DuoFormer: scales must be 2, 3 or 4 (strides {STRIDES[:4]}); got {self.scales}")
        if self.scale_token not in ("channel", "learned"):
            raise ValueError(f"DuoFormer: scale_token must be 'channel' or 'learned'; got {self.scale_token!r}")
        if self.depth < 1:
            raise ValueError(f"DuoFormer: depth must be >= 1; got {self.depth}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"DuoFormer: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes) of an NHWC image batch of ``img_size``; ``output="features"`` gives the
        backbone's stage maps ``{4, 8, 16, 32}`` (what the tokens are made of), ``"pre_logits"`` the normed
        [CLS] (B, embed_dim). In training mode BatchNorm uses batch statistics (``mutable=["batch_stats"]``)."""
        check_output(output, "DuoFormer")
        self._validate()
        grid = self._grid()
        check_image(x, in_chans=self.in_chans, img_size=self.img_size, divisible_by=32)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.embed_dim
        features = ResNet(block="bottleneck", depth=self.backbone_depth, channels=self.backbone_channels,
                          in_chans=self.in_chans, num_classes=0, zero_init_last=False, name="backbone",
                          **kw)(x, train=train, output="features")
        if self.freeze_backbone:
            features = jax.lax.stop_gradient(features)
        if output == "features":
            return features
        b = x.shape[0]
        num_patches = grid[0] * grid[1]

        maps = {s: Conv(d, (1, 1), padding=0, kernel_init=HE_FAN_IN, name=f"proj_s{s}", **kw)(features[s])
                for s in STRIDES[:self.scales]}
        tokens = gather_patch_tokens(maps, self.scales)  # (B, P, S - 1, D)
        if self.scale_token == "channel":
            first = ScaleTokenProjector(d, name="scale_token", **kw)(features, train).reshape(b, num_patches, 1, d)
        else:
            table = self.param("scale_token", logical(nn.initializers.normal(0.036), (None, None, None, "embed")),
                               (1, 1, 1, d), self.param_dtype)
            first = jnp.broadcast_to(table.astype(tokens.dtype), (b, num_patches, 1, d))
        tokens = jnp.concatenate([first.astype(tokens.dtype), tokens], axis=2)
        s = tokens.shape[2]
        pos_scale = self.param("pos_embed_for_scale", logical(trunc_normal(0.036), (None, None, None, "embed")),
                               (1, 1, s, d), self.param_dtype)
        tokens = (tokens + pos_scale.astype(tokens.dtype)).reshape(b * num_patches, s, d)
        tokens = constrain(tokens, ("act_batch", "act_len", "act_embed"))

        scale = 2.0 * d ** -0.5  # the official MultiScaleAttention.scale, both passes
        for i in range(self.depth):
            tokens = TransformerBlock(self.num_heads, self.mlp_ratio, qkv_bias=True,
                                      attention_dropout=self.attn_drop_rate, dropout=self.drop_rate,
                                      layer_scale_init=self.init_values, scale=scale, name=f"scale_blocks_{i}",
                                      **kw)(tokens, train)
        firsts = tokens.reshape(b, num_patches, s, d)[:, :, 0, :]

        cls = self.param("cls_token", logical(nn.initializers.normal(1e-6), (None, None, "embed")), (1, 1, d),
                         self.param_dtype)
        pos = self.param("pos_embed", logical(trunc_normal(0.02), (None, None, "embed")), (1, num_patches + 1, d),
                         self.param_dtype)
        seq = jnp.concatenate([jnp.broadcast_to(cls.astype(firsts.dtype), (b, 1, d)), firsts], axis=1)
        seq = seq + pos.astype(seq.dtype)

        def patch_attention(i, y):
            return MultiHeadAttention(self.num_heads, scale=scale, attention_dropout=self.attn_drop_rate,
                                      proj_dropout=self.drop_rate, name=f"patch_attn_{i}", **kw)(y, train=train)

        first_out = out = patch_attention(0, seq)
        for i in range(1, self.depth):
            out = patch_attention(i, out if self.chain_patch_attention else first_out)
        pooled = LayerNorm(1e-6, name="norm", **kw)(out[:, 0])
        logits = Dense(self.num_classes, axes=("embed", "classes"), name="head", **kw)(pooled) if self.num_classes \
            else pooled
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# Converter: the official MyModel state dict (models/model.py) -> our variables


def _official_resnet(sd: StateDict) -> StateDict:
    """``resnet_projector.{0,1,4..7}.*`` (an ``nn.Sequential`` of torchvision's children) under the
    torchvision names ``convert_timm_resnet`` reads (``conv1``, ``bn1``, ``layer1..4``)."""
    names = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
    renamed = {}
    for key in list(sd.keys()):
        if key.startswith("resnet_projector."):
            head, rest = key[len("resnet_projector."):].split(".", 1)
            renamed[f"{names[head]}.{rest}"] = sd[key]
    return StateDict(renamed)


def convert_official_duoformer(sd: StateDict, model: DuoFormer, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The official ``MyModel`` (AliSerwat/duoformer_TCGA ``models/model.py``) state dict -> our flat
    ``params/...`` and ``batch_stats/...``. The unused timm patch embedding
    (``vision_transformer.patch_embed.*``) is skipped (module docstring)."""
    h = model.num_heads
    if model.scale_token != "channel":
        raise ValueError("the official MyModel checkpoints carry the channel scale token: convert into "
                         f"scale_token='channel', not {model.scale_token!r}")
    backbone = ResNet(block="bottleneck", depth=model.backbone_depth, channels=model.backbone_channels, num_classes=0)
    inner = {k.replace("/backbone/", "/", 1): v for k, v in expected.items() if "/backbone/" in k}
    trunk = convert_timm_resnet(_official_resnet(sd), backbone, inner)
    out = {k.replace("/", "/backbone/", 1): v for k, v in trunk.items()}
    for k in range(model.scales):
        out.update({f"params/proj_s{STRIDES[k]}/kernel": conv2d(sd[f"projection.proj_heads{3 - k}.weight"]),
                    f"params/proj_s{STRIDES[k]}/bias": sd[f"projection.proj_heads{3 - k}.bias"]})
    # the channel projectors (Channel_Projector_layer1/2, Channel_Projector_All)
    for ours, theirs in (("proj1_conv1", "chann_proj1.conv1"), ("proj1_conv2", "chann_proj1.conv2"),
                         ("proj2_conv1", "chann_proj2.conv1")):
        out[f"params/scale_token/{ours}/kernel"] = conv2d(sd[f"{theirs}.weight"])
        out[f"params/scale_token/{ours}/bias"] = sd[f"{theirs}.bias"]
    for i in range(4):
        t = f"chann_proj_all.nConvs.{i}."
        out[f"params/scale_token/fuse{i}_conv/kernel"] = conv2d(sd[t + "conv.weight"])
        out[f"params/scale_token/fuse{i}_conv/bias"] = sd[t + "conv.bias"]
        out.update(batch_norm_params(sd, t + "norm", f"scale_token/fuse{i}_bn"))
    v = "vision_transformer."
    out["params/cls_token"] = sd[v + "cls_token"]
    out["params/pos_embed"] = sd[v + "pos_embed"]
    out["params/pos_embed_for_scale"] = sd[v + "pos_embed_for_scale"]
    for i in range(model.depth):
        t, o = f"{v}blocks.{i}.", f"params/scale_blocks_{i}/"
        out.update({**norm_params(sd, t + "norm1", o + "norm1"), **norm_params(sd, t + "norm2", o + "norm2"),
                    **dense_params(sd, t + "mlp.fc1", o + "mlp/fc1"), **dense_params(sd, t + "mlp.fc2", o + "mlp/fc2")})
        out[o + "attn/qkv/kernel"] = qkv_fused(sd[t + "attn.qkv1.weight"], h)
        out[o + "attn/qkv/bias"] = qkv_fused(sd[t + "attn.qkv1.bias"], h)
        out[o + "attn/proj/kernel"] = heads_out(sd[t + "attn.proj1.weight"], h)
        out[o + "attn/proj/bias"] = sd[t + "attn.proj1.bias"]
        for ls in ("ls1", "ls2"):
            if f"{t}{ls}.gamma" in sd:
                out[f"{o}{ls}/gamma"] = sd[f"{t}{ls}.gamma"]
        p = f"params/patch_attn_{i}/"
        out[p + "qkv/kernel"] = qkv_fused(sd[t + "attn.qkv.weight"], h)
        out[p + "qkv/bias"] = qkv_fused(sd[t + "attn.qkv.bias"], h)
        out[p + "proj/kernel"] = heads_out(sd[t + "attn.proj.weight"], h)
        out[p + "proj/bias"] = sd[t + "attn.proj.bias"]
    out.update(norm_params(sd, v + "norm", "params/norm"))
    if model.num_classes:
        out.update(dense_params(sd, v + "head", "params/head"))
    sd.skip(v + "patch_embed.proj.weight", v + "patch_embed.proj.bias")
    return out


# ---------------------------------------------------------------------------------------------
# Variants. Params: the official MyModel's count (pretrained=False, depth 12, 768 wide, 100 classes) less
# its unused 2,360,064-parameter patch embedding; trainable = without the frozen ResNet-50 trunk.


OFFICIAL_PARAMS = {2: 185_428_900, 3: 185_835_172, 4: 186_081_700}  # 161.9M / 162.3M / 162.6M trainable


def _info(scales: int) -> ModelInfo:
    return ModelInfo(paper="DuoFormer: Leveraging Hierarchical Representations by Local and Global Attention "
                           "Vision Transformer", arxiv="2506.12982", repo="AliSerwat/duoformer_TCGA",
                     input_size=(224, 224, 3), params_m=round(OFFICIAL_PARAMS[scales] / 1e6, 2),
                     converter=convert_official_duoformer)


def _make(scales: int, overrides: dict[str, Any]) -> DuoFormer:
    return DuoFormer(**{"scales": scales, **overrides})


@register_model(_info(2))
def duoformer_2scale_r50(**overrides: Any) -> DuoFormer:
    """DuoFormer, 2 scales (strides 32, 16: 6 tokens per patch), ResNet-50, frozen backbone."""
    return _make(2, overrides)


@register_model(_info(3))
def duoformer_3scale_r50(**overrides: Any) -> DuoFormer:
    """DuoFormer, 3 scales (strides 32, 16, 8: 22 tokens per patch), ResNet-50, frozen backbone."""
    return _make(3, overrides)


@register_model(_info(4))
def duoformer_4scale_r50(**overrides: Any) -> DuoFormer:
    """DuoFormer, 4 scales (strides 32, 16, 8, 4: 86 tokens per patch), ResNet-50, frozen backbone."""
    return _make(4, overrides)
