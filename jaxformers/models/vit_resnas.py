"""ViT-ResNAS: multi-stage ViTs with residual spatial reduction, found by weight-sharing NAS.

Paper: "Searching for Efficient Multi-Stage Vision Transformers", Yi-Lun Liao, Sertac Karaman,
Vivienne Sze, arXiv 2109.00642. Official code: yilunliao/vit-search (``nets/vit_sr_supernet.py``
``FlexibleDistillVisionTransformerSR``, ``nets/supernet_blocks.py``, ``nets/patch_conv.py``,
``nets/masked_layer_norm.py``, ``nets/channel_drop.py``, ``token_mixup.py``,
``supernet_config/sr_tiny_mh.py``, ``scripts/vit-sr-nas/{searched_net,super_net}/*.sh``). Parameter
names follow the official model so its state dicts convert one to one (``convert_vit_resnas``).

A network is written in the official **network_def** encoding, parsed by :func:`parse_network_def`:

- ``(4, C)``: convolutional patch embedding (``PatchConvEmbed``): 3x3 s2 conv-BN-ReLU to 24
  channels, two more 3x3 conv-BN-ReLU with a residual over them, then a 7x7 stride-7 conv to C
  (14x14 patches: a 16x16 grid at 224 px); ``(5, C, mid)`` the same with ``mid`` channels; ``(0, C)``
  a plain 14x14 patch convolution. A class token and a learned position table follow.
- ``(1, (C, heads, head_dim), (C, hidden), exists)``: a pre-norm transformer block whose attention
  has ``heads`` heads of ``head_dim`` (not C / heads) and whose MLP is ``hidden`` wide;
  ``exists = 0`` is a skipped block (``BypassBlock``, no parameters).
- ``(3, C_in, C_out)``: **residual spatial reduction** (``SpatialReductionPatchEmbedding``): LN,
  then a 3x3 stride-2 conv (padding 1) on the patch grid plus a new position table, and a Linear
  C_in -> C_out on the class token; the residual path average-pools the grid 2x2, keeps the class
  token, and zero-pads channels C_in -> C_out; the two are summed. 16x16 -> 8x8 -> 4x4 tokens.
- ``(2, C, classes)``: final LN, ``cls_head`` on the class token; with ``patch_output`` (the
  released ``*_patch_output`` models) also ``patch_head`` on every final token, trained with the
  shifted patch-token mixup (:func:`patch_token_mixup`, :func:`patch_token_loss`).

The searched Tiny / Small / Medium networks are registered with the network_defs of the official
``scripts/vit-sr-nas/searched_net`` scripts (41,498,552 / 64,605,108 / 97,323,672 parameters with the
patch head, as the official code counts them).

**Weight-sharing supernet.** The same module trains as a supernet: ``subnet=`` (from
:func:`sample_subnets`) gives, per example, the kept embedding width of each stage, heads and MLP
width of each block, and whether each block runs; the official ``ChannelDrop`` masks keep the first
k channels (heads, hidden units), ``MaskedLayerNorm`` normalises over the kept channels, and
examples are split into sub-batches of ``example_per_arch`` that share one sampled architecture
(each layer's width drawn independently, uniform over its choices, as each official ChannelDrop
permutes its own list). ``SearchSpace`` holds the choices (``SEARCH_SPACES["sr_tiny_mh"]`` is the
official ``supernet_config/sr_tiny_mh.py`` for the supernet ``SUPERNET_DEFS["sr_tiny_mh"]``);
:func:`subnet_network_def` turns a sampled architecture into the network_def of a standalone model,
:func:`count_macs` counts its multiply-accumulates, and :func:`evolutionary_search` runs the
official search loop (random initial population, mutation, crossover, top-k parents, a MAC
budget) over any scoring function, e.g. the supernet's held-out accuracy with inherited weights
(``python -m train.vit_resnas_search --config train/configs/vit_resnas_search.py`` runs the whole pipeline
at digit scale).

Dense-feature contract: ``forward_features`` gives the patch tokens at the end of each stage as
maps ``{14: stage 1, 28: stage 2, 56: stage 3 after the final norm}`` (16x16, 8x8, 4x4 at 224 px).

Deviations: images are NHWC. MaskedLayerNorm's gradient comes from autodiff of its forward
formula (the official writes a custom backward for the same function). The official rewiring of
channels by magnitude during supernet warm-up (``Block.rewiring``) and progressive widening are
left to the caller (``sample_choices=k`` / ``sample_subnets(num_choices=k)`` restrict draws to the widest k
choices of each layer, for the official warm-up).
The official code builds with ``.cuda()`` in ``SpatialReductionPatchEmbedding``; ours runs anywhere.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import (StateDict, batch_norm_params, conv2d, dense_params, heads_out, norm_params,
                                       qkv_fused)
from jaxformers.layers import BatchNorm, Conv, Dense, DropPath, MultiHeadAttention, check_image, gelu
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.layers.linear import logical
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

EMBED, TRANSFORMER, HEAD, REDUCTION, CONV_EMBED, FLEX_CONV_EMBED = 0, 1, 2, 3, 4, 5
PATCH_SIZE = 14
TOKEN_AXES = ("act_batch", "act_len", "act_embed")


# ---------------------------------------------------------------------------------------------
# network_def


def parse_network_def(spec: str | Sequence) -> tuple:
    """A network_def (the official string or nested tuples) as nested tuples, checked: an embedding first,
    a head last, transformer and reduction layers between with consistent widths."""
    net = ast.literal_eval(spec) if isinstance(spec, str) else spec

    def tup(x):
        return tuple(tup(v) for v in x) if isinstance(x, (list, tuple)) else x

    net = tup(net)
    if len(net) < 2 or net[0][0] not in (EMBED, CONV_EMBED, FLEX_CONV_EMBED) or net[-1][0] != HEAD:
        raise ValueError("network_def must start with a patch embedding (0, C) / (4, C) / (5, C, mid) and end with a "
                         f"head (2, C, classes); got {str(net)[:120]}")
    width = net[0][1]
    for i, layer in enumerate(net[1:-1], start=1):
        if layer[0] == TRANSFORMER:
            (c_attn, heads, head_dim), (c_mlp, hidden), _ = layer[1:]
            if not c_attn == c_mlp == width or min(heads, head_dim, hidden) < 1:
                raise ValueError(f"network_def layer {i} {layer}: a transformer block must be {width} wide (the current "
                                 "embedding width) with heads, head_dim and hidden >= 1")
        elif layer[0] == REDUCTION:
            if layer[1] != width or layer[2] < width:
                raise ValueError(f"network_def layer {i} {layer}: a spatial reduction takes the current width {width} "
                                 "and cannot narrow it (zero-padded residual)")
            width = layer[2]
        else:
            raise ValueError(f"network_def layer {i} {layer}: type {layer[0]} is not a transformer block (1) or a "
                             "spatial reduction (3)")
    if net[-1][1] != width:
        raise ValueError(f"network_def head {net[-1]} reads width {net[-1][1]} but the last stage is {width} wide")
    return net


def count_macs(network_def: str | Sequence, img_size: int = 224, num_classes: int | None = None) -> int:
    """Multiply-accumulates of one image through the network (convolutions, linears and the two attention
    products; norms, softmax and activations not counted), for MAC budgets in the search."""
    net = parse_network_def(network_def)
    grid = img_size // PATCH_SIZE
    embed = net[0]
    c = embed[1]
    if embed[0] == EMBED:
        macs = (grid * grid) * PATCH_SIZE * PATCH_SIZE * 3 * c
    else:
        mid = embed[2] if embed[0] == FLEX_CONV_EMBED else 24
        half = img_size // 2
        macs = half * half * 9 * (3 * mid + 2 * mid * mid) + grid * grid * 49 * mid * c
    for layer in net[1:-1]:
        n = grid * grid + 1
        if layer[0] == TRANSFORMER and layer[3]:
            (_, heads, head_dim), (_, hidden), _ = layer[1:]
            inner = heads * head_dim
            macs += n * c * inner * 4 + 2 * n * n * inner + 2 * n * c * hidden
        elif layer[0] == REDUCTION:
            grid //= 2
            macs += grid * grid * 9 * layer[1] * layer[2] + layer[1] * layer[2]
            c = layer[2]
    k = num_classes if num_classes is not None else net[-1][2]
    return int(macs + c * k)


# ---------------------------------------------------------------------------------------------
# Layers


def masked_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, mask: jax.Array | None,
                      eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis; with ``mask`` (B, 1, C) bool (the kept channels, a prefix), statistics
    over the kept channels only (x is zero elsewhere) and the output masked (official MaskedLayerNorm)."""
    x32 = x.astype(jnp.float32)
    if mask is None:
        mu = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mu).mean(-1, keepdims=True)
        return ((x32 - mu) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)
    inv_kept = x.shape[-1] / jnp.maximum(mask.sum(-1, keepdims=True), 1).astype(jnp.float32)
    mu = x32.mean(-1, keepdims=True) * inv_kept
    var = jnp.square(x32).mean(-1, keepdims=True) * inv_kept - jnp.square(mu)
    y = (x32 - mu) * jax.lax.rsqrt(var + eps) * scale + bias
    return (y * mask).astype(x.dtype)


class MaskedLayerNorm(nn.Module):
    """LayerNorm (eps 1e-6) that takes the supernet's channel mask (``masked_layer_norm``)."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", logical(nn.initializers.ones_init(), ("embed",)), (c,), self.param_dtype)
        bias = self.param("bias", logical(nn.initializers.zeros_init(), ("embed",)), (c,), self.param_dtype)
        return masked_layer_norm(x, scale, bias, mask)


class ConvBnReLU(nn.Module):
    features: int
    strides: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.features, (3, 3), strides=self.strides, padding=1, use_bias=False, name="conv", **kw)(x)
        return nn.relu(BatchNorm(train=train, name="bn", **kw)(x))


class PatchConvEmbed(nn.Module):
    """Official ``PatchConvEmbed``: conv1 (3x3 s2) -> conv2 -> conv3 (+ residual from conv1) -> ``conv_proj``
    (7x7 stride 7): 14x14 patches. ``mid_chans = 0``: a single 14x14 patch convolution (``proj``)."""

    embed_dim: int
    mid_chans: int = 24
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if not self.mid_chans:
            return Conv(self.embed_dim, (PATCH_SIZE,) * 2, strides=PATCH_SIZE, padding=0, name="proj", **kw)(x)
        x = ConvBnReLU(self.mid_chans, 2, name="conv1", **kw)(x, train)
        y = ConvBnReLU(self.mid_chans, name="conv2", **kw)(x, train)
        y = ConvBnReLU(self.mid_chans, name="conv3", **kw)(y, train)
        half = PATCH_SIZE // 2
        return Conv(self.embed_dim, (half, half), strides=half, padding=0, name="conv_proj", **kw)(x + y)


class Subnet(NamedTuple):
    """Per-example architecture of a supernet forward pass (from :func:`sample_subnets`): kept embedding
    width per stage (num_stages, B), kept heads and MLP width per transformer block (num_blocks, B),
    and whether each block runs (num_blocks, B) bool."""

    embed: jax.Array
    heads: jax.Array
    mlp: jax.Array
    layer: jax.Array


def _prefix_mask(kept: jax.Array, width: int) -> jax.Array:
    """(B,) kept counts -> (B, 1, width) bool keeping the first ``kept`` channels."""
    return (jnp.arange(width)[None, :] < kept[:, None])[:, None, :]


class ResNASBlock(nn.Module):
    """Pre-norm block with ``heads`` x ``head_dim`` attention and a ``hidden``-wide MLP; in a supernet pass the
    attention heads, MLP units, embedding channels and the whole block are masked per example."""

    num_heads: int
    head_dim: int
    hidden: int
    drop_path: float = 0.0
    drop_rate: float = 0.0
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, embed_mask=None, heads=None, hidden=None, keep=None, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        head_mask = None if heads is None else (jnp.arange(self.num_heads)[None] < heads[:, None])
        y = MaskedLayerNorm(self.param_dtype, name="norm1")(x, embed_mask)
        y = MultiHeadAttention(self.num_heads, self.head_dim, proj_dropout=self.drop_rate,
                               attention_impl=self.attention_impl, name="attn", **kw)(y, train=train,
                                                                                     head_mask=head_mask)
        y = DropPath(self.drop_path)(y, train=train)
        mask = embed_mask
        if keep is not None:
            mask = keep[:, None, None] if mask is None else (mask & keep[:, None, None])
        if mask is not None:
            y = y * mask
        x = x + y
        y = MaskedLayerNorm(self.param_dtype, name="norm2")(x, embed_mask)
        y = Dense(self.hidden, axes=("embed", "mlp"), name="mlp_fc1", **kw)(y)
        y = nn.Dropout(self.drop_rate)(gelu(y), deterministic=not train)
        if hidden is not None:
            y = y * _prefix_mask(hidden, self.hidden)
        y = Dense(x.shape[-1], axes=("mlp", "embed"), name="mlp_fc2", **kw)(y)
        y = DropPath(self.drop_path)(nn.Dropout(self.drop_rate)(y, deterministic=not train), train=train)
        if mask is not None:
            y = y * mask
        return constrain(x + y, TOKEN_AXES)


class ResidualSpatialReduction(nn.Module):
    """Official ``SpatialReductionPatchEmbedding``: (LN -> 3x3 s2 conv + position table | LN -> Linear on the
    class token) + (2x2 average-pooled grid | class token), zero-padded C_in -> C_out. Tokens (B, 1 + h*w, C)."""

    out_features: int
    grid: tuple[int, int]
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, embed_mask: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, c = x.shape
        h, w = self.grid
        grid = x[:, 1:].reshape(b, h, w, c)
        residual = jnp.concatenate([x[:, :1], nn.avg_pool(grid, (2, 2), (2, 2)).reshape(b, -1, c)], axis=1)
        residual = jnp.pad(residual, ((0, 0), (0, 0), (0, self.out_features - c)))
        y = MaskedLayerNorm(self.param_dtype, name="norm")(x, embed_mask)
        patches = Conv(self.out_features, (3, 3), strides=2, padding=1, name="patch_reduce", **kw)(
            y[:, 1:].reshape(b, h, w, c))
        patches = patches.reshape(b, -1, self.out_features)
        pos = self.param("pos_embed", logical(nn.initializers.truncated_normal(0.02), (None, None, "embed")),
                         (1, patches.shape[1], self.out_features), self.param_dtype)
        cls = Dense(self.out_features, axes=("embed", "mlp"), name="token_transform", **kw)(y[:, :1])
        return jnp.concatenate([cls, patches + pos.astype(patches.dtype)], axis=1) + residual


class ViTResNAS(FeatureBackbone):
    """Multi-stage ViT described by an official ``network_def`` (module docstring); ``subnet=`` runs it as a
    weight-sharing supernet."""

    network_def: tuple = ()
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    patch_output: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    search_space: str | None = None
    example_per_arch: int = 1
    sample_choices: int | None = None
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def network(self) -> tuple:
        return parse_network_def(self.network_def)

    @property
    def num_features(self) -> int:
        return self.network[-1][1]

    @property
    def num_blocks(self) -> int:
        return sum(1 for layer in self.network if layer[0] == TRANSFORMER)

    @property
    def num_stages(self) -> int:
        return 1 + sum(1 for layer in self.network if layer[0] == REDUCTION)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits", subnet: Subnet | None = None,
                 patch_logits: bool = False):
        """Logits (B, num_classes) from the class token; ``patch_logits=True`` returns (class logits, per-token
        logits (B, tokens, num_classes)) for the patch-token mixup loss; ``subnet`` runs a supernet pass;
        ``output`` selects the dense-feature contract's other outputs (module docstring)."""
        check_output(output, "ViTResNAS")
        net = self.network
        size = (self.img_size,) * 2 if isinstance(self.img_size, int) else tuple(self.img_size)
        stride = PATCH_SIZE * 2 ** (self.num_stages - 1)
        if size[0] % stride or size[1] % stride:
            raise ValueError(f"ViT-ResNAS needs img_size divisible by {stride} (14-px patches halved at each of "
                             f"{self.num_stages - 1} spatial reductions); got {size[0]}x{size[1]}")
        check_image(x, in_chans=self.in_chans, img_size=size)
        if patch_logits and not (self.patch_output and self.num_classes):
            raise ValueError("patch_logits=True needs a model built with patch_output=True and num_classes > 0")
        if subnet is None and train and self.search_space is not None:  # supernet training: sample architectures
            space = SEARCH_SPACES.get(self.search_space)
            if space is None:
                raise ValueError(f"search_space {self.search_space!r} is not one of {sorted(SEARCH_SPACES)}")
            if parse_network_def(space.supernet)[:-1] != net[:-1]:
                raise ValueError(f"search_space {self.search_space!r} belongs to the supernet {space.supernet[:60]}..., "
                                 "not this network_def")
            subnet = sample_subnets(self.make_rng("dropout"), space, x.shape[0], self.example_per_arch,
                                    num_choices=self.sample_choices)
        if subnet is not None:
            self._check_subnet(subnet, x.shape[0])
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = x.shape[0]
        embed = net[0]
        mid = 0 if embed[0] == EMBED else (embed[2] if embed[0] == FLEX_CONV_EMBED else 24)
        x = PatchConvEmbed(embed[1], mid, name="patch_embed", **kw)(x, train)
        grid = x.shape[1:3]
        x = x.reshape(b, -1, embed[1])
        init = logical(nn.initializers.truncated_normal(0.02), (None, None, "embed"))
        cls = self.param("tokens", init, (1, 1, embed[1]), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, embed[1])), x], axis=1)
        x = x + self.param("pos_embed", init, (1, x.shape[1], embed[1]), self.param_dtype).astype(x.dtype)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        stage, block = 0, 0
        embed_mask = None if subnet is None else _prefix_mask(subnet.embed[0], x.shape[-1])
        if embed_mask is not None:
            x = x * embed_mask
        rates = np.linspace(0.0, self.drop_path_rate, max(self.num_blocks, 1))
        features = {}
        for i, layer in enumerate(net[1:-1]):
            name = f"blocks_{i}"
            if layer[0] == TRANSFORMER:
                (_, heads, head_dim), (_, hidden), exists = layer[1:]
                if exists:
                    args = (None, None, None) if subnet is None else (subnet.heads[block], subnet.mlp[block],
                                                                       subnet.layer[block])
                    x = ResNASBlock(heads, head_dim, hidden, float(rates[block]), self.drop_rate, self.attention_impl,
                                    name=name, **kw)(x, embed_mask, *args, train=train)
                block += 1
            else:
                features[PATCH_SIZE * 2 ** stage] = x[:, 1:].reshape(b, *grid, -1)
                x = ResidualSpatialReduction(layer[2], grid, name=name, **kw)(x, embed_mask)
                grid = (grid[0] // 2, grid[1] // 2)
                stage += 1
                if subnet is not None:
                    embed_mask = _prefix_mask(subnet.embed[stage], x.shape[-1])
                    x = x * embed_mask
        x = MaskedLayerNorm(self.param_dtype, name="norm")(x, embed_mask)
        features[PATCH_SIZE * 2 ** stage] = x[:, 1:].reshape(b, *grid, -1)
        if output == "features":
            return features
        pooled = x[:, 0]
        logits = pooled
        if self.num_classes:
            dense = dict(axes=("embed", "classes"), **kw)
            logits = Dense(self.num_classes, name="cls_head", **dense)(pooled)
            if self.patch_output:
                patch = Dense(self.num_classes, name="patch_head", **dense)(x[:, 1:])
                if patch_logits:
                    return logits, patch
        return select_output(output, features, pooled, logits)

    def _check_subnet(self, subnet: Any, batch: int) -> None:
        want = {"embed": (self.num_stages, batch), "heads": (self.num_blocks, batch), "mlp": (self.num_blocks, batch),
                "layer": (self.num_blocks, batch)}
        if not isinstance(subnet, Subnet):
            raise TypeError(f"subnet must be a Subnet (see sample_subnets); got {type(subnet).__name__}")
        for name, shape in want.items():
            got = tuple(getattr(getattr(subnet, name), "shape", ()))
            if got != shape:
                raise ValueError(f"subnet.{name} must be (number of {'stages' if name == 'embed' else 'blocks'}, "
                                 f"batch) = {shape} for this network; got {got}")


# ---------------------------------------------------------------------------------------------
# Training: the shifted patch-token mixup (official token_mixup.SwitchTokenMix)


def _randint(key, low, high):
    """numpy's randint(low, high) with the official ``my_randint`` rule (high = low + 1 when equal)."""
    high = jnp.where(high <= low, low + 1, high)
    return low + jnp.floor(jax.random.uniform(key) * (high - low)).astype(jnp.int32)


def patch_token_mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, patch_len: int = 4,
                      smoothing: float = 0.1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The official ``SwitchTokenMix``: the first half of the batch gets a random box of a
    ``patch_len`` x ``patch_len`` patch grid pasted from a permuted image (token targets follow the pasted
    patches, image targets mix by area), the second half image mixup with lam ~ Beta(0.8, 0.8) (every
    token target = the mixed target). Returns (images, targets (B, K), token targets (B, L*L, K));
    labels smoothed by ``smoothing``."""
    b, h, w, _ = images.shape
    if h % patch_len or w % patch_len:
        raise ValueError(f"images {h}x{w} are not divisible by patch_len={patch_len}")
    half = b // 2
    k_perm1, k_perm2, k_lam, k_h, k_y, k_x, k_mix = jax.random.split(rng, 7)
    onehot = jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + smoothing / num_classes
    area = patch_len * patch_len
    # patch-level half (official _gen_random_bbox: the box sits at the same place in both images)
    perm = jax.random.permutation(k_perm1, half)
    lam = jax.random.beta(k_lam, 1.0, 1.0)
    max_len = jnp.minimum(patch_len, jnp.floor(area * lam).astype(jnp.int32))
    cut_h = _randint(k_h, 1, jnp.maximum(1, max_len - 1))
    cut_w = jnp.floor(area * lam).astype(jnp.int32) // cut_h
    cut_h = jnp.where(cut_w > patch_len, jnp.floor(area * lam).astype(jnp.int32) // patch_len, cut_h)
    cut_w = jnp.minimum(cut_w, patch_len)
    y0 = _randint(k_y, 0, jnp.maximum(0, patch_len - cut_h))
    x0 = _randint(k_x, 0, jnp.maximum(0, patch_len - cut_w))
    rows, cols = jnp.arange(patch_len), jnp.arange(patch_len)
    box = ((rows >= y0) & (rows < y0 + cut_h))[:, None] & ((cols >= x0) & (cols < x0 + cut_w))[None, :]
    ph, pw = h // patch_len, w // patch_len
    pixel_box = jnp.repeat(jnp.repeat(box, ph, 0), pw, 1)[None, :, :, None]
    first = jnp.where(pixel_box, images[:half][perm], images[:half])
    box_lam = 1.0 - jnp.sum(box).astype(jnp.float32) / area
    t1 = onehot[:half] * box_lam + onehot[:half][perm] * (1.0 - box_lam)
    p1 = jnp.where(box.reshape(1, area, 1), onehot[:half][perm][:, None], onehot[:half][:, None])
    # image-level half
    perm2 = jax.random.permutation(k_perm2, b - half)
    mix = jax.random.beta(k_mix, 0.8, 0.8)
    second = images[half:] * mix + images[half:][perm2] * (1.0 - mix)
    t2 = onehot[half:] * mix + onehot[half:][perm2] * (1.0 - mix)
    p2 = jnp.broadcast_to(t2[:, None], (b - half, area, num_classes))
    return (jnp.concatenate([first, second]), jnp.concatenate([t1, t2]), jnp.concatenate([p1, p2]))


def patch_token_loss(cls_logits: jax.Array, patch_logits: jax.Array, targets: jax.Array,
                     patch_targets: jax.Array) -> jax.Array:
    """Soft-target cross-entropy of the class logits plus that of every token (official engine.py, 'seq')."""
    if patch_logits.shape != patch_targets.shape:
        raise ValueError(f"patch logits {patch_logits.shape} and token targets {patch_targets.shape} differ: the "
                         "mixup's patch_len must be the final token grid side")

    def ce(z, t):
        return jnp.mean(jnp.sum(-t * jax.nn.log_softmax(z.astype(jnp.float32), -1), -1))

    return ce(cls_logits, targets) + ce(patch_logits, patch_targets)


# ---------------------------------------------------------------------------------------------
# Search: spaces, sampling, subnet network_defs, evolution


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Width choices of a supernet (the official ``supernet_config``): per stage the embedding widths; per
    transformer block the head counts, MLP widths, and whether it may be skipped."""

    supernet: tuple
    embed: tuple[tuple[int, ...], ...]
    heads: tuple[tuple[int, ...], ...]
    mlp: tuple[tuple[int, ...], ...]
    skippable: tuple[bool, ...]

    def __post_init__(self):
        net = parse_network_def(self.supernet)
        blocks = [layer for layer in net if layer[0] == TRANSFORMER]
        stages = 1 + sum(1 for layer in net if layer[0] == REDUCTION)
        if not (len(self.embed) == stages and len(self.heads) == len(self.mlp) == len(self.skippable) == len(blocks)):
            raise ValueError(f"the search space needs {stages} embedding choice lists and {len(blocks)} head / MLP / "
                             "skip entries (one per block)")
        for j, layer in enumerate(blocks):
            if max(self.heads[j]) != layer[1][1] or max(self.mlp[j]) != layer[2][1]:
                raise ValueError(f"block {j}: the largest choices must be the supernet's own ({layer[1][1]} heads, "
                                 f"{layer[2][1]} hidden)")


def sample_subnets(rng: jax.Array, space: SearchSpace, batch: int, example_per_arch: int,
                   num_choices: int | None = None) -> Subnet:
    """Architectures for a supernet batch: ``batch // example_per_arch`` sub-batches, each with every layer's
    width drawn uniformly (independently per layer) from its choices (the widest ``num_choices`` only, for
    the official warm-up), interleaved over examples as the official ``mask.repeat``. A skippable block is
    dropped with probability 1/2 (the official ``layer`` lists hold the full width twice and 0 twice)."""
    if batch % example_per_arch:
        raise ValueError(f"batch {batch} is not divisible by example_per_arch={example_per_arch}")
    archs = batch // example_per_arch
    keys = iter(jax.random.split(rng, len(space.embed) + 3 * len(space.heads)))

    def draw(choices):
        c = np.sort(np.asarray(choices))[::-1][:num_choices]
        pick = jax.random.choice(next(keys), jnp.asarray(c), (archs,))
        return jnp.tile(pick, example_per_arch)

    embed = jnp.stack([draw(c) for c in space.embed])
    heads = jnp.stack([draw(c) for c in space.heads])
    mlp = jnp.stack([draw(c) for c in space.mlp])
    layer = jnp.stack([jnp.tile(jax.random.bernoulli(next(keys), 0.5, (archs,)) | (not s), example_per_arch)
                       for s in space.skippable])
    return Subnet(embed.astype(jnp.int32), heads.astype(jnp.int32), mlp.astype(jnp.int32), layer)


def subnet_network_def(space: SearchSpace, arch: dict[str, Sequence]) -> tuple:
    """The network_def of one architecture (``arch`` = {"embed": per stage, "heads", "mlp", "layer": per block},
    e.g. one example's column of a :class:`Subnet`): what a standalone model with the inherited weights runs."""
    net = parse_network_def(space.supernet)
    out, stage, block = [], 0, 0
    width = int(arch["embed"][0])
    out.append((net[0][0], width) + tuple(net[0][2:]))
    for layer in net[1:-1]:
        if layer[0] == TRANSFORMER:
            head_dim = layer[1][2]
            out.append((TRANSFORMER, (width, int(arch["heads"][block]), head_dim), (width, int(arch["mlp"][block])),
                        int(bool(arch["layer"][block]))))
            block += 1
        else:
            stage += 1
            new = int(arch["embed"][stage])
            out.append((REDUCTION, width, new))
            width = new
    out.append((HEAD, width, net[-1][2]))
    return tuple(out)


def subnet_params(params: dict, space: SearchSpace, arch: dict[str, Sequence]) -> dict:
    """The supernet's ``params`` sliced to the architecture ``arch`` (weight inheritance): the parameters of a
    standalone ``ViTResNAS(network_def=subnet_network_def(space, arch))``, which then computes what the
    supernet computes under that architecture's masks (first channels, heads and hidden units kept)."""
    net = parse_network_def(space.supernet)
    embed = [int(e) for e in arch["embed"]]
    out = {"patch_embed": dict(params["patch_embed"]), "tokens": params["tokens"][..., :embed[0]],
           "pos_embed": params["pos_embed"][..., :embed[0]]}
    pe = out["patch_embed"]
    for name in ("conv_proj", "proj"):
        if name in pe:
            pe[name] = {"kernel": pe[name]["kernel"][..., :embed[0]], "bias": pe[name]["bias"][:embed[0]]}
    stage, block, c = 0, 0, embed[0]

    def norm(p, width):
        return {"scale": p["scale"][:width], "bias": p["bias"][:width]}

    for i, layer in enumerate(net[1:-1]):
        name = f"blocks_{i}"
        if layer[0] == TRANSFORMER:
            if arch["layer"][block]:
                p, h, k = params[name], int(arch["heads"][block]), int(arch["mlp"][block])
                out[name] = {"norm1": norm(p["norm1"], c), "norm2": norm(p["norm2"], c),
                             "attn": {"qkv": {"kernel": p["attn"]["qkv"]["kernel"][:c, :, :h],
                                              "bias": p["attn"]["qkv"]["bias"][:, :h]},
                                      "proj": {"kernel": p["attn"]["proj"]["kernel"][:h, :, :c],
                                               "bias": p["attn"]["proj"]["bias"][:c]}},
                             "mlp_fc1": {"kernel": p["mlp_fc1"]["kernel"][:c, :k], "bias": p["mlp_fc1"]["bias"][:k]},
                             "mlp_fc2": {"kernel": p["mlp_fc2"]["kernel"][:k, :c], "bias": p["mlp_fc2"]["bias"][:c]}}
            block += 1
        else:
            stage += 1
            new, p = embed[stage], params[name]
            out[name] = {"norm": norm(p["norm"], c), "pos_embed": p["pos_embed"][..., :new],
                         "patch_reduce": {"kernel": p["patch_reduce"]["kernel"][:, :, :c, :new],
                                          "bias": p["patch_reduce"]["bias"][:new]},
                         "token_transform": {"kernel": p["token_transform"]["kernel"][:c, :new],
                                             "bias": p["token_transform"]["bias"][:new]}}
            c = new
    out["norm"] = norm(params["norm"], c)
    for head in ("cls_head", "patch_head"):
        if head in params:
            out[head] = {"kernel": params[head]["kernel"][:c], "bias": params[head]["bias"]}
    return out


def random_arch(rng: np.random.Generator, space: SearchSpace) -> dict[str, list]:
    """One architecture drawn uniformly from ``space`` (NumPy)."""
    return {"embed": [int(rng.choice(c)) for c in space.embed], "heads": [int(rng.choice(c)) for c in space.heads],
            "mlp": [int(rng.choice(c)) for c in space.mlp],
            "layer": [bool(rng.random() < 0.5) or not s for s in space.skippable]}


def evolutionary_search(space: SearchSpace, score: Callable[[dict], float], *, macs_budget: float | None = None,
                        img_size: int = 224, iterations: int = 20, population: int = 500, parents: int = 75,
                        mutations: int = 75, crossovers: int = 75, mutate_prob: float = 0.3,
                        seed: int = 0) -> list[tuple[float, dict]]:
    """The official evolutionary search (``evo_search.py``, ``search_utils/evolver.py``): a random initial
    population within the MAC budget, then per iteration ``mutations`` children of the top ``parents``
    (each layer choice resampled with ``mutate_prob``) and ``crossovers`` children of two parents (each
    layer from either); every candidate over ``macs_budget`` is redrawn. Returns the history sorted by
    score, best first, as (score, arch)."""
    rng = np.random.default_rng(seed)

    def macs(arch):
        return count_macs(subnet_network_def(space, arch), img_size)

    def ok(arch):
        return macs_budget is None or macs(arch) <= macs_budget

    def draw(make, tries=1000):
        for _ in range(tries):
            arch = make()
            if ok(arch):
                return arch
        raise ValueError(f"no architecture within macs_budget={macs_budget} found in {tries} draws")

    history: dict[str, tuple[float, dict]] = {}

    def add(arch):
        key = repr(arch)
        if key not in history:
            history[key] = (float(score(arch)), arch)

    for _ in range(population):
        add(draw(lambda: random_arch(rng, space)))
    for _ in range(iterations):
        top = sorted(history.values(), key=lambda s: -s[0])[:parents]

        def mutate():
            parent = top[rng.integers(len(top))][1]
            fresh = random_arch(rng, space)
            return {k: [f if rng.random() < mutate_prob else p for p, f in zip(parent[k], fresh[k])] for k in parent}

        def cross():
            a, b = (top[i][1] for i in rng.integers(len(top), size=2))
            return {k: [x if rng.random() < 0.5 else y for x, y in zip(a[k], b[k])] for k in a}

        for _ in range(mutations):
            add(draw(mutate))
        for _ in range(crossovers):
            add(draw(cross))
    return sorted(history.values(), key=lambda s: -s[0])


# ---------------------------------------------------------------------------------------------
# Official checkpoint converter (yilunliao/vit-search ``FlexibleDistillVisionTransformerSR.state_dict()``)


def convert_vit_resnas(sd: StateDict, model: ViTResNAS, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Official state dict (``patch_embed``, ``tokens``, ``pos_embed``, ``blocks.{i}``, ``norm``, ``cls_head``,
    ``patch_head``) -> our flat variables."""
    net = model.network
    out = {"params/tokens": sd["tokens"], "params/pos_embed": sd["pos_embed"]}
    if "patch_embed.proj.weight" in sd:
        out.update({"params/patch_embed/proj/kernel": conv2d(sd["patch_embed.proj.weight"]),
                    "params/patch_embed/proj/bias": sd["patch_embed.proj.bias"]})
    else:
        for i in (1, 2, 3):
            out[f"params/patch_embed/conv{i}/conv/kernel"] = conv2d(sd[f"patch_embed.conv{i}.conv.weight"])
            out.update(batch_norm_params(sd, f"patch_embed.conv{i}.bn", f"patch_embed/conv{i}/bn"))
        out["params/patch_embed/conv_proj/kernel"] = conv2d(sd["patch_embed.conv_proj.weight"])
        out["params/patch_embed/conv_proj/bias"] = sd["patch_embed.conv_proj.bias"]
    for i, layer in enumerate(net[1:-1]):
        t, o = f"blocks.{i}.", f"params/blocks_{i}/"
        if layer[0] == TRANSFORMER and layer[3]:
            heads = layer[1][1]
            for norm in ("norm1", "norm2"):
                out.update(norm_params(sd, t + norm, o + norm))
            out[o + "attn/qkv/kernel"] = qkv_fused(sd[t + "attn.qkv.weight"], heads)
            out[o + "attn/qkv/bias"] = qkv_fused(sd[t + "attn.qkv.bias"], heads)
            out[o + "attn/proj/kernel"] = heads_out(sd[t + "attn.proj.weight"], heads)
            out[o + "attn/proj/bias"] = sd[t + "attn.proj.bias"]
            out.update(dense_params(sd, t + "mlp.fc1", o + "mlp_fc1"))
            out.update(dense_params(sd, t + "mlp.fc2", o + "mlp_fc2"))
        elif layer[0] == REDUCTION:
            out.update(norm_params(sd, t + "norm", o + "norm"))
            out[o + "patch_reduce/kernel"] = conv2d(sd[t + "patch_reduce.weight"])
            out[o + "patch_reduce/bias"] = sd[t + "patch_reduce.bias"]
            out.update(dense_params(sd, t + "token_transform", o + "token_transform"))
            out[o + "pos_embed"] = sd[t + "pos_embed"]
    out.update(norm_params(sd, "norm", "params/norm"))
    for head in ("cls_head", "patch_head"):
        if f"params/{head}/kernel" in expected:
            out.update(dense_params(sd, head, f"params/{head}"))
        sd.skip(f"{head}.weight", f"{head}.bias")
    return out


# ---------------------------------------------------------------------------------------------
# Variants: the searched networks (official scripts/vit-sr-nas/searched_net/*.sh, patch-output models);
# params: the official code's count (1000 classes, with patch_head); GMACs: the script names (Small, Medium)
# and our count_macs (Tiny); top-1 (ImageNet-1k, 224 px): the abstract gives Tiny as DeiT-Ti (72.2) + 8.6 and
# Small as DeiT-B's accuracy; no table was read for Small / Medium (None).

SEARCHED_DEFS = {
    "vit_resnas_tiny": "((4, 176), (1, (176, 3, 32), (176, 704), 1), (1, (176, 3, 32), (176, 576), 1), (1, (176, 3, 32), (176, 640), 1), (1, (176, 4, 32), (176, 576), 1), (1, (176, 4, 32), (176, 704), 1), (3, 176, 352), (1, (352, 10, 48), (352, 1408), 1), (1, (352, 8, 48), (352, 1408), 1), (1, (352, 8, 48), (352, 1280), 1), (1, (352, 8, 48), (352, 1408), 1), (1, (352, 10, 48), (352, 1280), 1), (1, (352, 10, 48), (352, 1024), 1), (3, 352, 704), (1, (704, 10, 64), (704, 2560), 1), (1, (704, 10, 64), (704, 1792), 1), (1, (704, 10, 64), (704, 2816), 1), (1, (704, 8, 64), (704, 2816), 1), (1, (704, 8, 64), (704, 2560), 1), (2, 704, 1000))",  # noqa: E501
    "vit_resnas_small": "((4, 220), (1, (220, 5, 32), (220, 880), 1), (1, (220, 5, 32), (220, 880), 1), (1, (220, 7, 32), (220, 800), 1), (1, (220, 5, 32), (220, 720), 1), (1, (220, 5, 32), (220, 720), 1), (1, (220, 5, 32), (220, 720), 1), (3, 220, 440), (1, (440, 10, 48), (440, 1760), 1), (1, (440, 10, 48), (440, 1440), 1), (1, (440, 10, 48), (440, 1920), 1), (1, (440, 10, 48), (440, 1600), 1), (1, (440, 12, 48), (440, 1600), 1), (1, (440, 12, 48), (440, 1440), 1), (3, 440, 880), (1, (880, 16, 64), (880, 3200), 1), (1, (880, 12, 64), (880, 3200), 1), (1, (880, 16, 64), (880, 2880), 1), (1, (880, 12, 64), (880, 2240), 1), (1, (880, 14, 64), (880, 2560), 1), (2, 880, 1000))",  # noqa: E501
    "vit_resnas_medium": "((4, 240), (1, (240, 7, 32), (240, 960), 1), (1, (240, 6, 32), (240, 960), 1), (1, (240, 7, 32), (240, 800), 1), (1, (240, 8, 32), (240, 960), 1), (1, (240, 7, 32), (240, 880), 1), (1, (240, 8, 32), (240, 880), 1), (1, (240, 6, 32), (240, 800), 1), (3, 240, 640), (1, (640, 10, 48), (640, 1120), 1), (1, (640, 14, 48), (640, 1760), 1), (1, (640, 14, 48), (640, 1920), 1), (1, (640, 16, 48), (640, 1760), 1), (1, (640, 14, 48), (640, 1440), 1), (1, (640, 16, 48), (640, 1760), 1), (1, (640, 16, 48), (640, 1920), 1), (3, 640, 880), (1, (880, 16, 64), (880, 3200), 1), (1, (880, 10, 64), (880, 3840), 1), (1, (880, 16, 64), (880, 3840), 1), (1, (880, 12, 64), (880, 3200), 1), (1, (880, 16, 64), (880, 3520), 1), (1, (880, 14, 64), (880, 3520), 1), (2, 880, 1000))",  # noqa: E501
}
OFFICIAL_PARAMS = {"vit_resnas_tiny": 41_498_552, "vit_resnas_small": 64_605_108, "vit_resnas_medium": 97_323_672}

# The supernet of the Tiny search (scripts/vit-sr-nas/super_net/tiny.sh) and its space (supernet_config/sr_tiny_mh.py:
# attention choices there are channels = heads x head_dim; every second block of a stage may be skipped).
SUPERNET_DEFS = {"sr_tiny_mh": "((4, 256), " + ", ".join(
    ["(1, (256, 6, 32), (256, 768), 1)"] * 6 + ["(3, 256, 512)"] + ["(1, (512, 12, 48), (512, 1536), 1)"] * 6
    + ["(3, 512, 1024)"] + ["(1, (1024, 12, 64), (1024, 3072), 1)"] * 6) + ", (2, 1024, 1000))"}


def _sr_tiny_mh() -> SearchSpace:
    heads, mlp, skip = [], [], []
    for attn, hidden, head_dim in (((192, 160, 128, 96), (768, 704, 640, 576, 512, 448, 384), 32),
                                   ((576, 480, 384, 288), (1536, 1408, 1280, 1152, 1024, 896, 768), 48),
                                   ((768, 640, 512, 384), (3072, 2816, 2560, 2304, 2048, 1792, 1536), 64)):
        for j in range(6):
            heads.append(tuple(a // head_dim for a in attn))
            mlp.append(hidden)
            skip.append(j % 2 == 1)
    return SearchSpace(SUPERNET_DEFS["sr_tiny_mh"], embed=((256, 224, 192, 176, 160), (512, 448, 384, 352, 320),
                                                           (1024, 896, 768, 704, 640)),
                       heads=tuple(heads), mlp=tuple(mlp), skippable=tuple(skip))


# A two-stage supernet for 56x56 inputs (4x4 -> 2x2 tokens): the digit-scale search of
# train/configs/vit_resnas_search.py and the tests.
SUPERNET_DEFS["digits"] = ("((5, 32, 8), (1, (32, 4, 8), (32, 64), 1), (1, (32, 4, 8), (32, 64), 1), (3, 32, 64), "
                           "(1, (64, 4, 16), (64, 128), 1), (1, (64, 4, 16), (64, 128), 1), (2, 64, 10))")
SEARCH_SPACES = {"sr_tiny_mh": _sr_tiny_mh(),
                 "digits": SearchSpace(SUPERNET_DEFS["digits"], embed=((32, 24, 16), (64, 48, 32)),
                                       heads=((4, 3, 2),) * 4, mlp=((64, 48, 32),) * 2 + ((128, 96, 64),) * 2,
                                       skippable=(False, True, False, True))}


def _info(name: str, macs_g: float, top1: float | None) -> ModelInfo:
    return ModelInfo(paper="Searching for Efficient Multi-Stage Vision Transformers", arxiv="2109.00642",
                     repo="yilunliao/vit-search", input_size=(224, 224, 3),
                     params_m=round(OFFICIAL_PARAMS[name] / 1e6, 2), flops_g=macs_g, top1=top1,
                     converter=convert_vit_resnas)


def _make(name: str, overrides: dict[str, Any]) -> ViTResNAS:
    return ViTResNAS(**{"network_def": parse_network_def(SEARCHED_DEFS[name]), **overrides})


@register_model(_info("vit_resnas_tiny", 1.8, 80.8))
def vit_resnas_tiny(**overrides: Any) -> ViTResNAS:
    """ViT-ResNAS-Tiny: widths 176/352/704, 5/6/5 blocks."""
    return _make("vit_resnas_tiny", overrides)


@register_model(_info("vit_resnas_small", 2.9, None))
def vit_resnas_small(**overrides: Any) -> ViTResNAS:
    """ViT-ResNAS-Small (2.9 GMACs): widths 220/440/880, 6/6/5 blocks."""
    return _make("vit_resnas_small", overrides)


@register_model(_info("vit_resnas_medium", 4.6, None))
def vit_resnas_medium(**overrides: Any) -> ViTResNAS:
    """ViT-ResNAS-Medium (4.6 GMACs): widths 240/640/880, 7/7/6 blocks."""
    return _make("vit_resnas_medium", overrides)
