"""Segment Anything (SAM) building blocks: the ViT image encoder, the prompt encoder and the two-way
transformer of the mask decoder, reused by prompt-driven segmenters (``jaxformers.models.sam_unet``).

Paper: "Segment Anything", Kirillov et al., ICCV 2023, arXiv 2304.02643. Official code:
facebookresearch/segment-anything (``segment_anything/modeling/{image_encoder, prompt_encoder,
transformer, common}.py``); the ViT backbone is ViTDet's (Li et al., "Exploring Plain Vision
Transformer Backbones for Object Detection", arXiv 2203.16527).

- ``SamImageEncoder`` (``ImageEncoderViT``): conv patch embedding (patch 16) + an absolute position
  table of the pretraining grid, ``depth`` pre-norm blocks (LayerNorm eps 1e-6, GELU MLP ratio 4) with
  windowed attention (``window_size``; the map is zero-padded after ``norm1`` to a multiple of the
  window, as SAM) except at ``global_attn_indexes``, every attention with the decomposed relative
  position bias of its window / grid (``MultiHeadAttention(rel_pos=...)``), then the neck: 1x1 conv ->
  LayerNorm2d -> 3x3 conv -> LayerNorm2d (``out_chans``, no conv bias). Its pieces are methods
  (``embed``, ``block``, ``neck``) so a host model can add its own features between blocks.
- ``SamPromptEncoder``: points, boxes (two corner tokens) and a dense mask prompt; coordinates go through
  random Fourier features (``PositionEmbeddingRandom``: a fixed Gaussian (2, C/2) matrix, kept in the
  ``buffers`` collection as SAM keeps it in a buffer) plus learnt point-type embeddings.
- ``TwoWayTransformer``: SAM's decoder transformer (token self-attention, token->image and
  image->token cross-attention with internal width halved, ReLU MLP, post-norm LayerNorms eps 1e-5).
  All attention goes through ``jaxformers.layers.MultiHeadAttention`` (``separate_qkv`` with a
  separate value input, as SAM's ``Attention(q, k, v)``).

Layout: images and maps are NHWC; SAM's LayerNorm2d is a LayerNorm over the channel axis.
Deviations: the random Fourier matrix is drawn from the init key (SAM: ``torch.randn`` at build time);
the relative position tables are not interpolated to other sizes (SAM's ``get_rel_pos`` can): the
encoder takes exactly ``img_size`` inputs and says so otherwise.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers import Conv, LayerNorm, Mlp, MultiHeadAttention, check_image, logical
from jaxformers.convert.common import StateDict, conv2d, dense_params, heads_out, norm_params, qkv_fused
from jaxformers.layers.window import window_partition, window_reverse
from jaxformers.sharding import constrain

MAP_AXES = ("act_batch", None, None, "act_embed")


def LayerNorm2d(name: str | None = None, epsilon: float = 1e-6) -> nn.LayerNorm:
    """SAM's ``LayerNorm2d`` (normalise over channels) on NHWC maps."""
    return LayerNorm(epsilon, axis_name="conv_out", name=name)


class ConvTranspose2x2(nn.Module):
    """``torch.nn.ConvTranspose2d(kernel_size=2, stride=2)`` on NHWC: every input pixel becomes a 2x2 block,
    out[2i + a, 2j + c] = x[i, j] @ kernel[:, a, c] + bias. Kernel (in, 2, 2, out) (torch's (in, out, 2, 2)
    transposed)."""

    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        kernel = self.param("kernel", logical(nn.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                                              in_axis=0, out_axis=(1, 2, 3)),
                                              ("conv_in", None, None, "conv_out")),
                            (cin, 2, 2, self.features), self.param_dtype)
        bias = self.param("bias", logical(nn.initializers.zeros_init(), ("conv_out",)), (self.features,),
                          self.param_dtype)
        b, h, w, _ = x.shape
        y = jnp.einsum("bhwi,iaco->bhawco", x, kernel.astype(x.dtype)).reshape(b, 2 * h, 2 * w, self.features)
        return y + bias.astype(y.dtype)


def torch_linear_init(fan_in: int):
    """torch.nn.Linear / Embedding-free default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# ---------------------------------------------------------------------------------------------
# Image encoder


class SamBlock(nn.Module):
    """ViTDet / SAM block: x + attn(norm1(x)) (windowed when ``window_size`` > 0, else global over the
    grid), then x + mlp(norm2(x)). Input and output (B, h, w, C)."""

    num_heads: int
    mlp_ratio: float = 4.0
    window_size: int = 0
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = LayerNorm(1e-6, name="norm1")(x)
        if self.window_size > 0:
            ws = self.window_size
            ph, pw = (-h) % ws, (-w) % ws
            y = jnp.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))  # after norm1: padded tokens are exact zeros
            y = window_partition(y, (ws, ws))
            grid = (ws, ws)
        else:
            grid = (h, w)
        n = y.shape[0]
        y = MultiHeadAttention(self.num_heads, qkv_bias=self.qkv_bias, rel_pos=grid, name="attn")(
            y.reshape(n, grid[0] * grid[1], c)).reshape(n, *grid, c)
        if self.window_size > 0:
            y = window_reverse(y, grid, h + ph, w + pw)[:, :h, :w]
        x = constrain(x + y, MAP_AXES)
        return constrain(x + Mlp(int(c * self.mlp_ratio), name="mlp")(LayerNorm(1e-6, name="norm2")(x)), MAP_AXES)


class SamImageEncoder(nn.Module):
    """SAM's ViT image encoder (``ImageEncoderViT``): ``__call__`` = ``neck(blocks(embed(x)))``; a host
    model may run ``embed``, ``block(i, ...)`` and ``neck`` itself to add features between blocks."""

    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    window_size: int = 14
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def setup(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise ValueError(f"global_attn_indexes {tuple(self.global_attn_indexes)} must lie in "
                             f"[0, depth={self.depth})")
        self.patch_embed = Conv(self.embed_dim, (self.patch_size, self.patch_size), strides=self.patch_size,
                                padding="VALID", axes=("conv_in", "embed"), name="patch_embed")
        self.pos_embed = self.param("pos_embed", logical(nn.initializers.zeros_init(), (None, None, None, "embed")),
                                    (1, self.grid, self.grid, self.embed_dim))
        self.blocks = [SamBlock(self.num_heads, self.mlp_ratio,
                                0 if i in self.global_attn_indexes else self.window_size, name=f"blocks_{i}")
                       for i in range(self.depth)]
        self.neck_0 = Conv(self.out_chans, (1, 1), use_bias=False, axes=("embed", "conv_out"), name="neck_0")
        self.neck_1 = LayerNorm2d("neck_1")
        self.neck_2 = Conv(self.out_chans, (3, 3), padding=1, use_bias=False, name="neck_2")
        self.neck_3 = LayerNorm2d("neck_3")

    def check_input(self, x: jax.Array) -> None:
        check_image(x, in_chans=self.in_chans)
        if tuple(x.shape[1:3]) != (self.img_size, self.img_size):
            raise ValueError(f"SAM's image encoder here takes {self.img_size}x{self.img_size} images (its position "
                             f"embedding is a {self.grid}x{self.grid} grid of {self.patch_size}-pixel patches); got "
                             f"{x.shape[1]}x{x.shape[2]}: resize or pad the image to {self.img_size}")

    def embed(self, x: jax.Array) -> jax.Array:
        """(B, S, S, in_chans) -> (B, S/p, S/p, embed_dim): patch embedding + absolute positions."""
        self.check_input(x)
        return constrain(self.patch_embed(x) + self.pos_embed.astype(x.dtype), MAP_AXES)

    def block(self, i: int, x: jax.Array) -> jax.Array:
        return self.blocks[i](x)

    def neck(self, x: jax.Array) -> jax.Array:
        """(B, h, w, embed_dim) -> (B, h, w, out_chans): the image embedding."""
        return self.neck_3(self.neck_2(self.neck_1(self.neck_0(x))))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.embed(x)
        for i in range(self.depth):
            x = self.block(i, x)
        return self.neck(x)


# ---------------------------------------------------------------------------------------------
# Prompt encoder


def random_fourier_features(coords: jax.Array, gaussian: jax.Array) -> jax.Array:
    """SAM's ``PositionEmbeddingRandom._pe_encoding``: coords in [0, 1] (..., 2) as (x, y) ->
    [sin(2 pi (2c - 1) G), cos(...)] (..., 2 * G.shape[1])."""
    proj = 2.0 * math.pi * ((2.0 * coords - 1.0) @ gaussian)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class SamPromptEncoder(nn.Module):
    """SAM's ``PromptEncoder``: sparse tokens for points / box corners, a dense embedding for a mask
    prompt (or the learnt ``no_mask_embed`` everywhere), and the dense positional encoding of the image
    embedding grid (``dense_pe``)."""

    embed_dim: int = 256
    image_embedding_size: int = 64
    input_image_size: int = 1024
    mask_in_chans: int = 16

    def setup(self):
        emb = logical(nn.initializers.normal(1.0), (None, "embed"))
        self.point_embeddings = [self.param(f"point_embeddings_{i}", emb, (1, self.embed_dim)) for i in range(4)]
        self.not_a_point_embed = self.param("not_a_point_embed", emb, (1, self.embed_dim))
        self.no_mask_embed = self.param("no_mask_embed", emb, (1, self.embed_dim))
        self.gaussian = self.variable("buffers", "positional_encoding_gaussian_matrix",
                                      lambda: jax.random.normal(self.make_rng("params"), (2, self.embed_dim // 2)))
        c = self.mask_in_chans
        self.mask_downscaling_0 = Conv(c // 4, (2, 2), strides=2, padding="VALID", name="mask_downscaling_0")
        self.mask_downscaling_1 = LayerNorm2d("mask_downscaling_1")
        self.mask_downscaling_3 = Conv(c, (2, 2), strides=2, padding="VALID", name="mask_downscaling_3")
        self.mask_downscaling_4 = LayerNorm2d("mask_downscaling_4")
        self.mask_downscaling_6 = Conv(self.embed_dim, (1, 1), name="mask_downscaling_6")

    def pe(self, coords01: jax.Array) -> jax.Array:
        return random_fourier_features(coords01.astype(jnp.float32), self.gaussian.value.astype(jnp.float32))

    def dense_pe(self) -> jax.Array:
        """(g, g, embed_dim): the encoding of the image-embedding grid's pixel centres."""
        g = self.image_embedding_size
        centres = (jnp.arange(g, dtype=jnp.float32) + 0.5) / g
        xy = jnp.stack(jnp.meshgrid(centres, centres, indexing="xy"), axis=-1)  # (g, g, 2) as (x, y)
        return self.pe(xy)

    def embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """(N, P, 2) pixel (x, y) and (N, P) labels (1 foreground, 0 background, -1 padding) -> (N, P[+1], C)."""
        points = points.astype(jnp.float32) + 0.5
        if pad:
            points = jnp.concatenate([points, jnp.zeros((points.shape[0], 1, 2), points.dtype)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((labels.shape[0], 1), labels.dtype)], axis=1)
        emb = self.pe(points / self.input_image_size)
        lab = labels[..., None]
        emb = jnp.where(lab == -1, self.not_a_point_embed, emb)
        emb = emb + jnp.where(lab == 0, self.point_embeddings[0], 0.0)
        emb = emb + jnp.where(lab == 1, self.point_embeddings[1], 0.0)
        return emb

    def embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """(N, 4) pixel boxes (x0, y0, x1, y1) -> (N, 2, C): the two corner tokens."""
        corners = (boxes.astype(jnp.float32) + 0.5).reshape(-1, 2, 2) / self.input_image_size
        emb = self.pe(corners)
        return emb + jnp.concatenate([self.point_embeddings[2], self.point_embeddings[3]], axis=0)[None]

    def embed_masks(self, masks: jax.Array) -> jax.Array:
        """(N, 4g, 4g) mask logits -> (N, g, g, C)."""
        x = masks[..., None].astype(jnp.float32)
        x = nn.gelu(self.mask_downscaling_1(self.mask_downscaling_0(x)), approximate=False)
        x = nn.gelu(self.mask_downscaling_4(self.mask_downscaling_3(x)), approximate=False)
        return self.mask_downscaling_6(x)

    def __call__(self, n: int, points: tuple[jax.Array, jax.Array] | None = None, boxes: jax.Array | None = None,
                 masks: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Sparse (n, T, C) and dense (n, g, g, C) embeddings of n prompts; T = points (+1 padding point
        without a box) + 2 per box, 0 without either."""
        sparse = jnp.zeros((n, 0, self.embed_dim), jnp.float32)
        if points is not None:
            sparse = jnp.concatenate([sparse, self.embed_points(*points, pad=boxes is None)], axis=1)
        elif self.is_initializing():  # the point-type parameters exist whether or not points are given
            self.embed_points(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1), jnp.int32), pad=True)
        if boxes is not None:
            sparse = jnp.concatenate([sparse, self.embed_boxes(boxes)], axis=1)
        g = self.image_embedding_size
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            if self.is_initializing():
                self.embed_masks(jnp.zeros((1, 4 * g, 4 * g)))
            dense = jnp.broadcast_to(self.no_mask_embed.reshape(1, 1, 1, -1), (n, g, g, self.embed_dim))
        return sparse, dense


# ---------------------------------------------------------------------------------------------
# Two-way transformer (mask decoder)


def _attention(num_heads: int, dim: int, downsample: int, name: str) -> MultiHeadAttention:
    internal = dim // downsample
    if internal % num_heads:
        raise ValueError(f"the decoder's attention width {internal} must be divisible by num_heads={num_heads}")
    return MultiHeadAttention(num_heads, head_dim=internal // num_heads, out_features=dim, separate_qkv=True, name=name)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image cross-attention, ReLU MLP, image->token cross-attention, each
    followed by a LayerNorm (eps 1e-5); positions added to queries and keys, never to values."""

    num_heads: int
    mlp_dim: int
    downsample: int = 2
    skip_first_layer_pe: bool = False

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe):
        dim = queries.shape[-1]
        if self.skip_first_layer_pe:
            queries = _attention(self.num_heads, dim, 1, "self_attn")(queries, queries, value=queries)
        else:
            q = queries + query_pe
            queries = queries + _attention(self.num_heads, dim, 1, "self_attn")(q, q, value=queries)
        queries = LayerNorm(1e-5, name="norm1")(queries)
        q, k = queries + query_pe, keys + key_pe
        token_to_image = _attention(self.num_heads, dim, self.downsample, "cross_attn_token_to_image")
        queries = queries + token_to_image(q, k, value=keys)
        queries = LayerNorm(1e-5, name="norm2")(queries)
        queries = queries + Mlp(self.mlp_dim, activation=nn.relu, name="mlp")(queries)
        queries = LayerNorm(1e-5, name="norm3")(queries)
        q, k = queries + query_pe, keys + key_pe
        keys = keys + _attention(self.num_heads, dim, self.downsample, "cross_attn_image_to_token")(k, q, value=queries)
        return queries, LayerNorm(1e-5, name="norm4")(keys)


class TwoWayTransformer(nn.Module):
    """SAM's ``TwoWayTransformer``: ``depth`` two-way blocks, then a final token->image attention + LayerNorm.
    image (N, g, g, C), image_pe (N or 1, g, g, C), tokens (N, T, C) -> (tokens (N, T, C), image (N, g*g, C))."""

    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    downsample: int = 2

    @nn.compact
    def __call__(self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        n, h, w, c = image.shape
        keys = image.reshape(n, h * w, c)
        key_pe = jnp.broadcast_to(image_pe.reshape(-1, h * w, c), keys.shape)
        queries = tokens
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(self.num_heads, self.mlp_dim, self.downsample, i == 0,
                                                 name=f"layers_{i}")(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        final = _attention(self.num_heads, c, self.downsample, "final_attn_token_to_image")
        queries = queries + final(q, k, value=keys)
        return LayerNorm(1e-5, name="norm_final_attn")(queries), keys


class MLP(nn.Module):
    """SAM's (MaskFormer's) ``MLP``: ``num_layers`` Linear layers with ReLU between (``layers_i``)."""

    hidden_dim: int
    output_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.output_dim if last else self.hidden_dim, name=f"layers_{i}",
                         kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "mlp")),
                         bias_init=logical(nn.initializers.zeros_init(), ("mlp",)))(x)
            if not last:
                x = nn.relu(x)
        return x


# ---------------------------------------------------------------------------------------------
# Converter: segment_anything's ImageEncoderViT state dict


def convert_sam_image_encoder(sd: StateDict, t: str, o: str, depth: int, num_heads: int) -> dict:
    """segment_anything ``ImageEncoderViT`` keys under prefix ``t`` (e.g. ``"image_encoder."``) -> our
    ``SamImageEncoder`` variables under ``o`` (e.g. ``"params/image_encoder/"``)."""
    def norm(a, b):
        return norm_params(sd, t + a, o + b)

    out = {o + "patch_embed/kernel": conv2d(sd[t + "patch_embed.proj.weight"]),
           o + "patch_embed/bias": sd[t + "patch_embed.proj.bias"], o + "pos_embed": sd[t + "pos_embed"]}
    for i in range(depth):
        b, ob = f"blocks.{i}.", f"blocks_{i}/"
        out.update(norm(b + "norm1", ob + "norm1"))
        out.update(norm(b + "norm2", ob + "norm2"))
        out[o + ob + "attn/qkv/kernel"] = qkv_fused(sd[t + b + "attn.qkv.weight"], num_heads)
        out[o + ob + "attn/qkv/bias"] = qkv_fused(sd[t + b + "attn.qkv.bias"], num_heads)
        out[o + ob + "attn/proj/kernel"] = heads_out(sd[t + b + "attn.proj.weight"], num_heads)
        out[o + ob + "attn/proj/bias"] = sd[t + b + "attn.proj.bias"]
        out[o + ob + "attn/rel_pos_h"] = sd[t + b + "attn.rel_pos_h"]
        out[o + ob + "attn/rel_pos_w"] = sd[t + b + "attn.rel_pos_w"]
        out.update(dense_params(sd, t + b + "mlp.lin1", o + ob + "mlp/fc1"))
        out.update(dense_params(sd, t + b + "mlp.lin2", o + ob + "mlp/fc2"))
    out[o + "neck_0/kernel"] = conv2d(sd[t + "neck.0.weight"])
    out.update(norm("neck.1", "neck_1"))
    out[o + "neck_2/kernel"] = conv2d(sd[t + "neck.2.weight"])
    out.update(norm("neck.3", "neck_3"))
    return out
