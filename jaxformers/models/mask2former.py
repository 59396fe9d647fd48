"""Mask2Former: masked-attention mask transformer for universal image segmentation.

Paper: "Masked-attention Mask Transformer for Universal Image Segmentation", Cheng et al., CVPR
2022, arXiv 2112.01527. Official code: facebookresearch/Mask2Former (MIT; detectron2). The module
layout, numerics and output names follow Hugging Face's ``Mask2FormerForUniversalSegmentation``
(transformers 5), so ``jaxformers.from_pretrained(dir)`` reads its directories and
``jaxformers.save_pretrained`` writes ones it loads (``mask2former_convert.py``).

Architecture (the official configs, ``Base-COCO-PanopticSegmentation.yaml`` + ``maskformer2_*``):
- Backbone: any jaxformers backbone whose ``forward_features`` returns ``{4, 8, 16, 32}`` NHWC maps
  (``backbone`` names a registered model, ``backbone_overrides`` its config). The Swin configs use
  the detection Swin (``always_partition=True``, ``out_norms=True``: fixed windows, padded and
  shifted at every resolution, one LayerNorm per output, as the official D2 Swin and HF's
  ``SwinBackbone``).
- Pixel decoder (``MSDeformAttnPixelDecoder``): 1x1 conv + GroupNorm(32) projections of the stride
  32/16/8 maps to ``feature_size``, sine position embeddings + a learned level embedding, 6 post-norm
  deformable encoder layers (8 heads, 4 points, 3 levels, FFN 1024, ReLU), then an FPN step to stride
  4 (1x1 lateral conv + GN, bilinear upsampling, 3x3 conv + GN + ReLU) and a 1x1 mask projection.
- Transformer decoder: 100 learned queries (features + positions), ``decoder_layers - 1`` post-norm
  layers of masked cross-attention (to the stride 32, 16, 8 maps in turn; keys carry sine positions
  and level embeddings; a query sees only where its previous mask prediction is > 0.5, or
  everywhere if that mask is empty) -> self-attention -> FFN 2048 (ReLU); a prediction (shared
  LayerNorm -> class Linear (C+1) and 3-layer MLP mask embedding . per-pixel mask features) after
  the learned queries and after every layer (deep supervision).

Outputs (HF names and layouts): ``class_queries_logits`` (B, Q, C+1) and ``masks_queries_logits``
(B, Q, H/4, W/4); with ``train=True`` (or ``output_auxiliary_logits=True``) also
``auxiliary_logits``, the earlier predictions stacked: class (L-1, B, Q, C+1), masks (L-1, B, Q,
H/4, W/4). Losses, matching and panoptic/semantic inference: ``jaxformers.segmentation``.

Early exit (ECO-M2F, "Efficient Transformer Encoders for Mask2Former-style models", Yao et al.,
arXiv 2404.15244; official code GYeow/ECO-M2F, ``mask2former/modeling/pixel_decoder/gating.py`` and
``msdeformattn.py``): ``num_gates=G`` > 0 adds the gating network ``GatingFunction`` (mean over the
stride-32 encoder input tokens, before any encoder layer -> Linear(D -> G), bias 0-init; 1,285
parameters at D 256, G 5) to the pixel decoder; each image then leaves the encoder after
``argmax(gate) + encoder_layers - G + 1`` layers (2..6 for the official 6 layers and 5 gates, whose
config calls the 4 gated layers ``NUM_GATES: 4``). The official encoder takes one argmax over the
flattened (B, G) gate tensor, which is only correct for batch 1; here every image gets its own exit
(``select_exits``): under ``jit`` all layers run and each image keeps the output of its own exit
layer, called eagerly only the layers up to the batch's deepest exit run; ``encoder_layers=k`` runs
exactly k layers (the FLOPs of an exit). Outputs then add ``gate_logits`` (B, G) and
``encoder_exit`` (B,). Targets, gate loss and per-exit PQ: ``jaxformers.compress.eco_m2f``. Hugging
Face directories carry no gate (``num_gates=0``).

Deviations: none in the math. Parameter counts: HF's count includes the Swin backbone's final
LayerNorm, which ``SwinBackbone`` builds but never uses (2 x the last width); we do not build it
(the official D2 Swin has none): Swin-T / 133 classes has 47,435,264 parameters here and 47,436,800
in HF. Images must be multiples of 32 (every stride of the pyramid divides the image).

ResNet-50 variants (``mask2former_r50_coco_panoptic``, ``mask2former_r50_ade20k_semantic``): the
timm-named ``resnet50`` (``jaxformers/models/resnet.py``) under the same heads; 44,036,998
parameters for 133 classes, equal to transformers' ``Mask2FormerForUniversalSegmentation`` with a
``ResNetConfig`` ResNet-50 backbone (run on CPU with random weights, transformers 5). The official
detectron2 backbone uses FrozenBN (``Base-COCO-PanopticSegmentation.yaml`` sets no ``NORM``), whose
53,120 scale / shift values are buffers, not parameters, there; here they are BatchNorm parameters
(freeze them, and use the running statistics, to fine-tune as the official recipe). Hugging Face
directories of these variants are not read or written (the converter maps Swin backbones only).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.hf import register_hf_family
from jaxformers.layers import Conv, Dense, LayerNorm, MultiHeadAttention, check_image, logical
from jaxformers.layers.deformable import MSDeformAttn, reference_points
from jaxformers.layers.interpolate import resize_bilinear
from jaxformers.models import mask2former_convert
from jaxformers.registry import ModelInfo, create_model, register_model
from jaxformers.sharding import constrain

STRIDES = (4, 8, 16, 32)


def sine_position_embedding(height: int, width: int, num_feats: int, temperature: float = 10000.0,
                            scale: float = 2 * math.pi) -> np.ndarray:
    """(H, W, 2 * num_feats) DETR sine embedding with normalised coordinates: [y features, x features],
    each interleaving sin (even) and cos (odd) channels."""
    eps = 1e-6
    y = np.arange(1, height + 1, dtype=np.float32) / (height + eps) * scale
    x = np.arange(1, width + 1, dtype=np.float32) / (width + eps) * scale
    dim_t = temperature ** (2 * (np.arange(num_feats) // 2) / num_feats)
    py, px = y[:, None] / dim_t, x[:, None] / dim_t  # (H, F), (W, F)

    def interleave(p):
        return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], axis=2).reshape(p.shape[0], -1)

    py, px = interleave(py), interleave(px)
    pos = np.concatenate([np.broadcast_to(py[:, None], (height, width, num_feats)),
                          np.broadcast_to(px[None], (height, width, num_feats))], -1)
    return pos.astype(np.float32)


def group_norm(name: str | None = None, dtype=None, param_dtype=jnp.float32) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-5) over NHWC channels (torch ``nn.GroupNorm(32, C)``)."""
    return nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=logical(nn.initializers.ones_init(), ("conv_out",)),
                        bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)))


def check_features(features: Any, strides=STRIDES, what: str = "backbone") -> None:
    """The dense-head contract: a dict of NHWC maps keyed by int stride."""
    if not isinstance(features, Mapping) or not all(s in features for s in strides):
        keys = sorted(features) if isinstance(features, Mapping) else type(features).__name__
        raise ValueError(f"the {what}'s forward_features must return {{stride: NHWC map}} with strides {strides}; "
                         f"got {keys}")
    for s in strides:
        if getattr(features[s], "ndim", 0) != 4:
            raise ValueError(f"{what} feature map at stride {s} must be NHWC (rank 4); got shape "
                             f"{getattr(features[s], 'shape', None)}")


class DeformableEncoderLayer(nn.Module):
    """x = LN(x + MSDeformAttn(x + pos, x)); x = LN(x + FFN(x)) (post-norm, ReLU)."""

    d_model: int
    n_heads: int
    n_levels: int
    n_points: int
    ffn_dim: int
    dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, pos, ref, spatial_shapes, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = lambda t: nn.Dropout(self.dropout)(t, deterministic=not train)  # noqa: E731
        y = MSDeformAttn(self.d_model, self.n_levels, self.n_heads, self.n_points, name="self_attn", **kw)(
            x + pos, ref, x, spatial_shapes)
        x = LayerNorm(1e-5, name="self_attn_norm", **kw)(x + drop(y))
        y = drop(nn.relu(Dense(self.ffn_dim, axes=("embed", "mlp"), name="fc1", **kw)(x)))
        y = Dense(self.d_model, axes=("mlp", "embed"), name="fc2", **kw)(y)
        return LayerNorm(1e-5, name="final_norm", **kw)(x + drop(y))


class GatingFunction(nn.Module):
    """ECO-M2F's gate: average of the tokens (B, N, D) -> Linear(D -> num_gates) with a 0-init bias
    (official ``GatingFunction``: AdaptiveAvgPool1d + Linear)."""

    num_gates: int = 5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        return Dense(self.num_gates, axes=("embed", None), name="head", dtype=self.dtype,
                     param_dtype=self.param_dtype)(jnp.mean(tokens, axis=1))


def select_exits(gate_logits: jax.Array, encoder_layers: int) -> jax.Array:
    """Per-image number of encoder layers to run, (B,) int32: ``argmax(gate_logits, -1) + encoder_layers
    - G + 1`` for gate logits (B, G) (the official 6 layers, 5 gates: 2..6). The official code's
    ``gates.argmax()`` flattens the batch, which is right only for batch 1."""
    g = gate_logits.shape[-1]
    if not 1 <= g <= encoder_layers:
        raise ValueError(f"{g} gates need 1..encoder_layers={encoder_layers} of them")
    return (jnp.argmax(gate_logits, axis=-1) + encoder_layers - g + 1).astype(jnp.int32)


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder over strides 32/16/8 plus an FPN step to stride 4.

    Returns (mask_features (B, H/4, W/4, mask_dim), [maps at strides 32, 16, 8] (B, h, w, D),
    encoder input tokens of the first (stride-32) level (B, h*w, D), the gate's input in ECO-M2F,
    and the gate logits (B, num_gates) or None). With ``num_gates`` and no ``num_layers`` every image
    leaves the encoder at its gate's exit (``select_exits``)."""

    feature_size: int = 256
    mask_feature_size: int = 256
    encoder_layers: int = 6
    encoder_ffn_dim: int = 1024
    num_heads: int = 8
    n_points: int = 4
    common_stride: int = 4
    dropout: float = 0.0
    num_gates: int = 0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.common_stride != 4:
            raise ValueError(f"common_stride must be 4 (one FPN step from stride 8 to the backbone's stride 4); "
                             f"got {self.common_stride}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.feature_size
        xavier = nn.initializers.xavier_uniform()
        self.input_proj = [Conv(d, (1, 1), kernel_init=xavier, **kw) for _ in range(3)]
        self.input_norm = [group_norm(**kw) for _ in range(3)]
        self.level_embed = self.param("level_embed", logical(nn.initializers.normal(1.0), (None, "embed")), (3, d),
                                      self.param_dtype)
        self.layers = [DeformableEncoderLayer(d, self.num_heads, 3, self.n_points, self.encoder_ffn_dim,
                                               self.dropout, **kw) for _ in range(self.encoder_layers)]
        self.lateral = Conv(d, (1, 1), use_bias=False, **kw)
        self.lateral_norm = group_norm(**kw)
        self.output = Conv(d, (3, 3), padding=1, use_bias=False, **kw)
        self.output_norm = group_norm(**kw)
        self.mask_projection = Conv(self.mask_feature_size, (1, 1), **kw)
        if self.num_gates:
            if not 1 <= self.num_gates <= self.encoder_layers:
                raise ValueError(f"num_gates={self.num_gates} must be in 1..encoder_layers={self.encoder_layers}")
            self.gate = GatingFunction(self.num_gates, **kw)

    def encoder_inputs(self, features: Mapping[int, jax.Array]):
        """Projected, flattened stride-32/16/8 tokens (B, S, D), their positions (B, S, D) and shapes."""
        tokens, pos, shapes = [], [], []
        for i, s in enumerate((32, 16, 8)):
            f = self.input_norm[i](self.input_proj[i](features[s]))
            b, h, w, d = f.shape
            shapes.append((h, w))
            tokens.append(f.reshape(b, h * w, d))
            p = jnp.asarray(sine_position_embedding(h, w, d // 2)).reshape(h * w, d) + self.level_embed[i]
            pos.append(jnp.broadcast_to(p.astype(f.dtype), (b, h * w, d)))
        return jnp.concatenate(tokens, 1), jnp.concatenate(pos, 1), tuple(shapes)

    def __call__(self, features: Mapping[int, jax.Array], train: bool = False, num_layers: int | None = None):
        x, pos, shapes = self.encoder_inputs(features)
        first_level = x[:, :shapes[0][0] * shapes[0][1]]
        ref = reference_points(shapes, x.shape[0]).astype(x.dtype)
        gate_logits = self.gate(first_level) if self.num_gates else None
        if gate_logits is None or num_layers is not None:
            for layer in self.layers[:num_layers]:
                x = layer(x, pos, ref, shapes, train)
        else:
            exits = select_exits(gate_logits, self.encoder_layers)
            depth = self.encoder_layers
            if not isinstance(exits, jax.core.Tracer) and not self.is_initializing():
                depth = int(jnp.max(exits))  # eager: nothing past the batch's deepest exit runs
            out = x
            for i, layer in enumerate(self.layers[:depth], 1):
                x = layer(x, pos, ref, shapes, train)
                if i >= self.encoder_layers - self.num_gates + 1:
                    out = jnp.where((exits == i)[:, None, None], x, out)
            x = out
        b, d = x.shape[0], x.shape[-1]
        outs, start = [], 0
        for h, w in shapes:
            outs.append(x[:, start:start + h * w].reshape(b, h, w, d))
            start += h * w
        lateral = self.lateral_norm(self.lateral(features[4]))
        y = lateral + resize_bilinear(outs[-1], lateral.shape[1:3])
        y = nn.relu(self.output_norm(self.output(y)))
        return self.mask_projection(y), outs, first_level, gate_logits


class MaskedAttentionDecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, post-norm (or pre-norm with ``pre_norm``)."""

    hidden_dim: int
    num_heads: int
    dim_feedforward: int
    dropout: float = 0.0
    pre_norm: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, query_pos, memory, memory_pos, mask, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = lambda t: nn.Dropout(self.dropout)(t, deterministic=not train)  # noqa: E731
        xavier = nn.initializers.xavier_uniform()
        norms = [LayerNorm(1e-5, name=n, **kw) for n in ("cross_attn_norm", "self_attn_norm", "final_norm")]
        pre = (lambda i, t: norms[i](t)) if self.pre_norm else (lambda i, t: t)  # noqa: E731
        post = (lambda i, t: t) if self.pre_norm else (lambda i, t: norms[i](t))  # noqa: E731
        attn = dict(separate_qkv=True, attention_dropout=self.dropout, **kw)
        y = pre(0, x)
        y = MultiHeadAttention(self.num_heads, name="cross_attn", **attn)(y + query_pos, memory + memory_pos,
                                                                          value=memory, mask=mask, train=train)
        x = post(0, x + drop(y))
        y = pre(1, x)
        y = MultiHeadAttention(self.num_heads, name="self_attn", **attn)(y + query_pos, value=y, train=train)
        x = post(1, x + drop(y))
        y = pre(2, x)
        y = drop(nn.relu(Dense(self.dim_feedforward, axes=("embed", "mlp"), kernel_init=xavier, name="fc1", **kw)(y)))
        y = Dense(self.hidden_dim, axes=("mlp", "embed"), kernel_init=xavier, name="fc2", **kw)(y)
        return post(2, x + drop(y))


class MaskedTransformerDecoder(nn.Module):
    """Mask2Former's ``MultiScaleMaskedTransformerDecoder``: learned queries refined by ``decoder_layers
    - 1`` masked-attention layers over the three pixel-decoder scales in turn, with a class + mask
    prediction before the first layer and after every layer."""

    num_classes: int
    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    dim_feedforward: int = 2048
    decoder_layers: int = 10
    mask_feature_size: int = 256
    pre_norm: bool = False
    enforce_input_projection: bool = False
    dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, multi_scale: list[jax.Array], mask_features: jax.Array, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.hidden_dim
        b = mask_features.shape[0]
        memories, positions, sizes = [], [], []
        level_embed = self.param("level_embed", logical(nn.initializers.normal(1.0), (None, "embed")), (3, d),
                                 self.param_dtype)
        for i, f in enumerate(multi_scale):
            if f.shape[-1] != d or self.enforce_input_projection:
                f = Conv(d, (1, 1), kernel_init=nn.initializers.xavier_uniform(), name=f"input_proj_{i}", **kw)(f)
            h, w = f.shape[1:3]
            sizes.append((h, w))
            memories.append(f.reshape(b, h * w, d) + level_embed[i].astype(f.dtype))
            pos = jnp.asarray(sine_position_embedding(h, w, d // 2)).reshape(h * w, d).astype(f.dtype)
            positions.append(jnp.broadcast_to(pos, (b, h * w, d)))
        emb = nn.initializers.normal(1.0)
        query_feat = self.param("query_feat", logical(emb, (None, "embed")), (self.num_queries, d), self.param_dtype)
        query_pos = self.param("query_embed", logical(emb, (None, "embed")), (self.num_queries, d), self.param_dtype)
        x = jnp.broadcast_to(query_feat.astype(mask_features.dtype), (b, self.num_queries, d))
        qpos = jnp.broadcast_to(query_pos.astype(mask_features.dtype), (b, self.num_queries, d))
        norm = LayerNorm(1e-5, name="decoder_norm", **kw)
        classifier = Dense(self.num_classes + 1, axes=("embed", "classes"), name="class_predictor", **kw)
        axes = (("embed", "mlp"), ("mlp", "embed"), ("embed", None))
        mask_mlp = [Dense(d if i < 2 else self.mask_feature_size, axes=axes[i], name=f"mask_embed_{i}", **kw)
                    for i in range(3)]

        def predict(h, target_size):
            h = norm(h)
            cls = classifier(h)
            e = h
            for i, layer in enumerate(mask_mlp):
                e = layer(e)
                e = nn.relu(e) if i < 2 else e
            masks = jnp.einsum("bqc,bhwc->bqhw", e, mask_features)
            small = resize_bilinear(masks.transpose(0, 2, 3, 1), target_size)  # (B, h, w, Q)
            blocked = jax.lax.stop_gradient(jax.nn.sigmoid(small) < 0.5).reshape(b, -1, self.num_queries)
            blocked = blocked.transpose(0, 2, 1)  # (B, Q, hw): True = not attended
            blocked = blocked & ~jnp.all(blocked, axis=-1, keepdims=True)  # an empty mask attends everywhere
            return cls, masks, ~blocked[:, None]

        classes, masks = [], []
        cls, m, attend = predict(x, sizes[0])
        classes.append(cls)
        masks.append(m)
        for i in range(self.decoder_layers - 1):
            lvl = i % 3
            x = MaskedAttentionDecoderLayer(d, self.num_heads, self.dim_feedforward, self.dropout, self.pre_norm,
                                            name=f"layers_{i}", **kw)(x, qpos, memories[lvl], positions[lvl], attend,
                                                                      train)
            cls, m, attend = predict(x, sizes[(i + 1) % 3])
            classes.append(cls)
            masks.append(m)
        return classes, masks


class Mask2Former(nn.Module):
    """Backbone -> multi-scale deformable pixel decoder -> masked-attention transformer decoder."""

    num_classes: int = 133
    backbone: str = "swin_tiny_patch4_window7_224"
    backbone_overrides: Any = None
    img_size: int | tuple[int, int] = 384
    in_chans: int = 3
    feature_size: int = 256
    mask_feature_size: int = 256
    hidden_dim: int = 256
    encoder_layers: int = 6
    encoder_ffn_dim: int = 1024
    decoder_layers: int = 10
    num_heads: int = 8
    dim_feedforward: int = 2048
    num_queries: int = 100
    n_points: int = 4
    common_stride: int = 4
    pre_norm: bool = False
    enforce_input_projection: bool = False
    dropout: float = 0.0
    output_auxiliary_logits: bool = False
    num_gates: int = 0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def _run(self, x: jax.Array, train: bool, encoder_layers: int | None, tokens_only: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        overrides = dict(self.backbone_overrides or {})
        overrides.setdefault("num_classes", 0)
        backbone = create_model(self.backbone, **{**kw, **overrides}).clone(parent=self, name="backbone")
        pixel_decoder = MSDeformAttnPixelDecoder(
            self.feature_size, self.mask_feature_size, self.encoder_layers, self.encoder_ffn_dim, self.num_heads,
            self.n_points, self.common_stride, self.dropout, self.num_gates, name="pixel_decoder", **kw)
        check_image(x, in_chans=self.in_chans, divisible_by=32)
        features = backbone.forward_features(x, train=train)
        check_features(features, what=f"backbone {self.backbone!r}")
        if encoder_layers is not None and not 0 <= encoder_layers <= self.encoder_layers:
            raise ValueError(f"encoder_layers={encoder_layers}: the pixel decoder has {self.encoder_layers} layers")
        if tokens_only:
            tokens, _, shapes = pixel_decoder.encoder_inputs(features)
            return tokens[:, :shapes[0][0] * shapes[0][1]]
        mask_features, multi_scale, _, gate_logits = pixel_decoder(features, train, encoder_layers)
        mask_features = constrain(mask_features, ("act_batch", None, None, None))
        classes, masks = MaskedTransformerDecoder(
            self.num_classes, self.hidden_dim, self.num_queries, self.num_heads, self.dim_feedforward,
            self.decoder_layers, self.mask_feature_size, self.pre_norm, self.enforce_input_projection, self.dropout,
            name="transformer_decoder", **kw)(multi_scale, mask_features, train)
        out = {"class_queries_logits": classes[-1], "masks_queries_logits": masks[-1]}
        if gate_logits is not None:
            out["gate_logits"] = gate_logits
            out["encoder_exit"] = (select_exits(gate_logits, self.encoder_layers) if encoder_layers is None else
                                   jnp.full(gate_logits.shape[:1], encoder_layers, jnp.int32))
        if (train or self.output_auxiliary_logits) and len(classes) > 1:  # decoder_layers=1: no earlier ones
            out["auxiliary_logits"] = {"class_queries_logits": jnp.stack(classes[:-1]),
                                       "masks_queries_logits": jnp.stack(masks[:-1])}
        return out

    def __call__(self, x: jax.Array, *, train: bool = False, encoder_layers: int | None = None) -> dict[str, Any]:
        """``{"class_queries_logits": (B, Q, C+1), "masks_queries_logits": (B, Q, H/4, W/4)}`` plus
        ``auxiliary_logits`` (the earlier predictions, stacked) in training or with
        ``output_auxiliary_logits``. ``encoder_layers`` runs only the first k deformable encoder
        layers (early exit, ECO-M2F); with ``num_gates`` and no ``encoder_layers`` each image exits
        where its gate says and ``gate_logits`` (B, G) / ``encoder_exit`` (B,) are added."""
        return self._run(x, train, encoder_layers, False)

    def encoder_tokens(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """``apply(..., method="encoder_tokens")``: the first-level (stride 32) encoder input tokens
        (B, h*w, D) before any encoder layer (ECO-M2F's gate input)."""
        return self._run(x, train, None, True)


# ---------------------------------------------------------------------------------------------
# Variants: the official COCO panoptic configs (133 classes). Backbones: timm-named Swin / ResNet.

_SWIN_DENSE = dict(always_partition=True, out_norms=True)
VARIANTS = {
    "mask2former_swin_tiny_coco_panoptic": dict(
        backbone="swin_tiny_patch4_window7_224", backbone_overrides=dict(_SWIN_DENSE, drop_path_rate=0.3)),
    "mask2former_swin_small_coco_panoptic": dict(
        backbone="swin_small_patch4_window7_224", backbone_overrides=dict(_SWIN_DENSE, drop_path_rate=0.3)),
    "mask2former_swin_base_384_coco_panoptic": dict(
        backbone="swin_base_patch4_window12_384", backbone_overrides=dict(_SWIN_DENSE, drop_path_rate=0.3)),
    # maskformer2_R50_bs16_50ep.yaml (COCO panoptic) and maskformer2_R50_bs16_160k.yaml (ADE20K semantic,
    # 150 classes, 512 px crops): the same heads on the timm ResNet-50.
    "mask2former_r50_coco_panoptic": dict(backbone="resnet50", backbone_overrides={}),
    "mask2former_r50_ade20k_semantic": dict(backbone="resnet50", backbone_overrides={}, num_classes=150),
}


def _info(pq: float, params_m: float, size: int = 384, task: str = "panoptic segmentation",
          metric: str = "PQ") -> ModelInfo:
    return ModelInfo(paper="Masked-attention Mask Transformer for Universal Image Segmentation", arxiv="2112.01527",
                     repo="facebookresearch/Mask2Former", input_size=(size, size, 3), params_m=params_m, top1=pq,
                     task=task, metric=metric)


def _build(name: str, overrides: dict[str, Any]) -> Mask2Former:
    """The variant's config; ``backbone_overrides`` add to the variant's unless ``backbone`` is replaced."""
    cfg, overrides = dict(VARIANTS[name]), dict(overrides)
    if overrides.get("backbone", cfg["backbone"]) != cfg["backbone"]:
        cfg["backbone_overrides"] = {}
    cfg["backbone_overrides"] = {**cfg["backbone_overrides"], **dict(overrides.pop("backbone_overrides", None) or {})}
    return Mask2Former(**{**cfg, **overrides})


@register_model(_info(53.2, 47.44))
def mask2former_swin_tiny_coco_panoptic(**overrides: Any) -> Mask2Former:
    """Mask2Former Swin-T, COCO panoptic (PQ 53.2; ``top1`` holds the PQ)."""
    return _build("mask2former_swin_tiny_coco_panoptic", overrides)


@register_model(_info(54.6, 68.75))
def mask2former_swin_small_coco_panoptic(**overrides: Any) -> Mask2Former:
    """Mask2Former Swin-S, COCO panoptic (PQ 54.6)."""
    return _build("mask2former_swin_small_coco_panoptic", overrides)


@register_model(_info(55.1, 106.92))
def mask2former_swin_base_384_coco_panoptic(**overrides: Any) -> Mask2Former:
    """Mask2Former Swin-B (384, ImageNet-1k), COCO panoptic (PQ 55.1)."""
    return _build("mask2former_swin_base_384_coco_panoptic", overrides)


@register_model(_info(51.9, 44.04))
def mask2former_r50_coco_panoptic(**overrides: Any) -> Mask2Former:
    """Mask2Former ResNet-50, COCO panoptic (PQ 51.9)."""
    return _build("mask2former_r50_coco_panoptic", overrides)


@register_model(_info(47.2, 44.04, size=512, task="semantic segmentation", metric="mIoU"))
def mask2former_r50_ade20k_semantic(**overrides: Any) -> Mask2Former:
    """Mask2Former ResNet-50, ADE20K semantic segmentation (150 classes, mIoU 47.2 single scale;
    ``top1`` holds the mIoU)."""
    return _build("mask2former_r50_ade20k_semantic", overrides)


# ---------------------------------------------------------------------------------------------
# Hugging Face directories (model_type "mask2former")


def from_pretrained(path, *, strict: bool = True, mesh: Any = None, rules: Any = None,
                    **overrides: Any) -> tuple[Mask2Former, dict]:
    """``(module, variables)`` from a HF ``Mask2FormerForUniversalSegmentation`` directory (Swin
    backbone). ``jaxformers.from_pretrained(dir)`` comes here for model_type "mask2former"; ``overrides``
    replace module fields (e.g. ``num_classes`` with ``strict=False`` to fine-tune on other classes)."""
    path = pathlib.Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    fields = mask2former_convert.fields_from_config(config, os.fspath(path / "config.json"))
    module = Mask2Former(**{**fields, **overrides})
    return module, mask2former_convert.load_directory(module, path, strict=strict, mesh=mesh, rules=rules)


def save_pretrained(module: Mask2Former, variables: Any, path, *, id2label: dict | None = None) -> pathlib.Path:
    """Writes ``config.json`` + ``model.safetensors`` that transformers' ``Mask2FormerForUniversalSegmentation``
    loads (Swin backbones with ``always_partition=True, out_norms=True``)."""
    return mask2former_convert.save_directory(module, variables, path, id2label=id2label)


register_hf_family("mask2former", module_type=Mask2Former, load=from_pretrained, save=save_pretrained)
