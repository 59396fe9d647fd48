"""SAM-UNet: a frozen SAM ViT-B image encoder with a parallel, trainable ResNet branch and a
multi-scale (HQ-SAM-style) mask decoder, for box-prompted medical image segmentation.

Paper: "SAM-UNet: Enhancing Zero-Shot Segmentation of SAM for Universal Medical Images", Yang et al.,
arXiv 2408.09886. Official code: Hhankyangg/sam-unet (``sam_unet/models/{sam_unet_model, wrapped,
resnet, build_sam_unet}.py``, the vendored ``segment_anything`` with ``vit_b_256`` in ``build_sam.py``
and ``Reshaper`` in ``modeling/common.py``; loss in ``sam_unet/utils/loss.py``). The SAM pieces are
``jaxformers.models.sam`` (Segment Anything, arXiv 2304.02643).

Wiring (as ``SAM_UNET.train_forward``):
- ResNet branch: torchvision ResNet-34 or -50 without pooling/fc (here ``jaxformers.models.resnet.ResNet``,
  same layout) gives the stride 4, 8, 16, 32 stage maps.
- SAM ViT-B at 256 px (embed 768, depth 12, heads 12, patch 16 -> 16x16 tokens, window 14, global
  blocks 2, 5, 8, 11), frozen. Before global block i (i = 0..3) the ResNet stage-i map goes through
  ``Reshaper`` i (stride-matched: 3x3 stride-2 conv -> LayerNorm2d -> GELU per halving, or 2x2
  transposed conv -> LayerNorm2d -> GELU per doubling, then a 1x1 conv to 768) and is added to the tokens.
- After global blocks 0, 1, 2 a bridge (ConvT 2x -> LayerNorm2d -> GELU -> ConvT 2x to 32 channels,
  64x64) is taken (global block i feeds ``adapters_bridge_{2 - i}``); the neck gives the 256-channel
  image embedding, ``embedding_encoder`` (the same ConvT stack, 256 -> 64 -> 32) lifts it to 64x64
  and the three bridges are added: the multi-scale feature.
- Prompt encoder (SAM's, trainable): boxes (and optional points / a mask prompt).
- Mask decoder: one learnt ``med_token`` and the prompt tokens through SAM's two-way transformer; the
  transformer's image output is upscaled (SAM's ``output_upscaling``), refined by
  ``embedding_maskfeature`` (3x3 conv -> LayerNorm2d -> GELU -> 3x3 conv) plus the multi-scale
  feature, and dotted with ``hf_mlp(med_token output)``: the 64x64 mask logits, bilinearly resized
  (``align_corners=False``) to the input size.

Frozen encoder: ``split_frozen`` / ``join_frozen`` split the params into the trainable part and the
frozen SAM image encoder; differentiate and build the optimizer state over the trainable part only
(``jaxformers.models.sam_unet.frozen_train_step`` is such a step), so no gradient and no optimizer
state exist for the encoder. Counts (official, ran): ``sam_unet_res34`` 116,019,884 parameters, of which
29,347,244 trainable; ``sam_unet_res50`` 138,428,204 / 51,755,564.

Inputs: NHWC images normalised as SAM (pixel values 0..255 minus mean (123.675, 116.28, 103.53), over
std (58.395, 57.12, 57.375)) of exactly ``img_size`` (the encoder's position table); boxes in input
pixels (x0, y0, x1, y1), (B, 4) or (B, M, 4) for M prompts per image. Returns a dict: ``masks`` (B, M, H, W)
logits at the input size, ``low_res_logits`` (B, M, H/4, W/4) and, with ``iou_head=True``, ``iou`` (B, M).

Loss: ``jaxformers.segmentation.sam_unet_loss`` = 20 focal (gamma 2, alpha 0.25) + dice (smooth 1) +
MSE(predicted IoU, soft IoU), the official ``FocalDiceloss_IoULoss``.

Deviations / choices:
- The official decoder has no IoU head (the vendored ``MaskDecoder`` keeps only the transformer and
  ``output_upscaling``), and its training script optimises ``focal + 20 * dice`` (``FocalDiceloss``)
  rather than the IoU loss class. ``iou_head=True`` (off by default, so the counts and outputs are the
  official ones) adds SAM's IoU token and its 3-layer IoU-prediction MLP (256 -> 256 -> 1): the token
  is prepended to the decoder's tokens and predicts the mask's IoU, which the MSE term of
  ``sam_unet_loss`` trains.
- Convolutions start from Flax's defaults (the official Reshapers use He-normal fan-out, the ResNet
  torchvision's init; timm's ``zero_init_last`` here): only the initialisation differs.
- Boxes are checked (inside the image, x0 <= x1, y0 <= y1) when concrete; under ``jit`` they cannot be.
- With ``iou_head=True`` an official checkpoint loads with ``strict=False`` (the IoU token and head keep
  fresh values: the official model has none).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.convert.common import StateDict, conv2d, dense_params, heads_in, heads_out, norm_params
from jaxformers.layers import Conv, gelu, logical
from jaxformers.layers.interpolate import resize_bilinear
from jaxformers.models.resnet import ResNet, convert_timm_resnet
from jaxformers.models.sam import (MLP, ConvTranspose2x2, LayerNorm2d, SamImageEncoder, SamPromptEncoder,
                                   TwoWayTransformer, convert_sam_image_encoder)
from jaxformers.registry import ModelInfo, register_model

FROZEN = ("image_encoder",)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Reshaper(nn.Module):
    """The official ``Reshaper``: a (B, s_in, s_in, c_in) map to (B, s_out, s_out, c_out) by log2(s_in/s_out)
    stride-2 3x3 convs doubling the channels or log2(s_out/s_in) 2x2 transposed convs halving them, each
    followed by LayerNorm2d + GELU, then a 1x1 conv. Layers are named by the official Sequential index."""

    size_out: int
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size_in, c = x.shape[1], x.shape[-1]
        ratio = max(size_in, self.size_out) / min(size_in, self.size_out)
        n = round(math.log2(ratio))
        if 2 ** n != ratio:
            raise ValueError(f"Reshaper maps {size_in}x{size_in} to {self.size_out}x{self.size_out}: the sizes must "
                             f"differ by a power of two")
        k = 0
        for _ in range(n):
            if size_in > self.size_out:
                c *= 2
                x = Conv(c, (3, 3), strides=2, padding=1, name=f"layers_{k}")(x)
            else:
                c //= 2
                x = ConvTranspose2x2(c, name=f"layers_{k}")(x)
            x = gelu(LayerNorm2d(f"layers_{k + 1}")(x))
            k += 3
        return Conv(self.features, (1, 1), name=f"layers_{k}")(x)


class UpscaleStack(nn.Module):
    """ConvT 2x -> LayerNorm2d -> GELU -> ConvT 2x (the bridges and ``embedding_encoder``); named
    ``layers_0``, ``layers_1``, ``layers_3`` as the official Sequential; ``final_gelu``: SAM's
    ``output_upscaling`` ends with a GELU."""

    hidden: int
    features: int
    final_gelu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(LayerNorm2d("layers_1")(ConvTranspose2x2(self.hidden, name="layers_0")(x)))
        x = ConvTranspose2x2(self.features, name="layers_3")(x)
        return gelu(x) if self.final_gelu else x


class SamUNetMaskDecoder(nn.Module):
    """The official ``SAMMaskDecoderWrapper_Med`` (+ SAM's transformer and ``output_upscaling``)."""

    transformer_dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    iou_head: bool = False

    @nn.compact
    def __call__(self, image_embeddings, image_pe, sparse, dense, multi_scale):
        """image_embeddings (N, g, g, C) (one per prompt), image_pe (g, g, C), sparse (N, T, C),
        dense (N, g, g, C), multi_scale (N, 4g, 4g, C/8) -> mask logits (N, 4g, 4g) [, iou (N,)]."""
        c = self.transformer_dim
        emb = logical(nn.initializers.normal(1.0), (None, "embed"))
        tokens = [self.param("med_token", emb, (1, c))]
        if self.iou_head:
            tokens.insert(0, self.param("iou_token", emb, (1, c)))
        n = sparse.shape[0]
        tokens = jnp.concatenate([jnp.broadcast_to(jnp.concatenate(tokens)[None], (n, len(tokens), c)), sparse], axis=1)
        src = image_embeddings + dense
        transformer = TwoWayTransformer(self.depth, self.num_heads, self.mlp_dim, name="transformer")
        hs, src = transformer(src, image_pe[None], tokens)
        g = image_embeddings.shape[1]
        up = UpscaleStack(c // 4, c // 8, final_gelu=True, name="output_upscaling")(src.reshape(n, g, g, c))
        x = Conv(c // 4, (3, 3), padding=1, name="embedding_maskfeature_0")(up)
        x = gelu(LayerNorm2d("embedding_maskfeature_1")(x))
        feature = Conv(c // 8, (3, 3), padding=1, name="embedding_maskfeature_3")(x) + multi_scale
        med = hs[:, 1 if self.iou_head else 0]
        hyper = MLP(c, c // 8, 3, name="hf_mlp")(med)
        masks = jnp.einsum("nc,nhwc->nhw", hyper, feature)
        if not self.iou_head:
            return masks, None
        return masks, MLP(c, 1, 3, name="iou_prediction_head")(hs[:, 0])[:, 0]


def _concrete(x) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_boxes(boxes: jax.Array, size: int) -> None:
    """Clear errors for boxes that are not (..., 4) (x0, y0, x1, y1) pixel boxes inside a size x size image."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (batch, 4) or (batch, prompts, 4) as (x0, y0, x1, y1); "
                         f"got shape {boxes.shape}")
    b = _concrete(boxes)
    if b is None:
        return
    bad = ~((b[..., 0] >= 0) & (b[..., 1] >= 0) & (b[..., 2] <= size) & (b[..., 3] <= size)
            & (b[..., 0] <= b[..., 2]) & (b[..., 1] <= b[..., 3]))
    if bad.any():
        first = b[tuple(np.argwhere(bad)[0])]
        raise ValueError(f"box prompts must lie inside the {size}x{size} input as (x0, y0, x1, y1) pixels with "
                         f"0 <= x0 <= x1 <= {size} and 0 <= y0 <= y1 <= {size}; {int(bad.sum())} do not, e.g. "
                         f"{first.tolist()}")


class SamUNet(nn.Module):
    """SAM-UNet (module docstring). ``resnet_block`` / ``resnet_depth`` / ``resnet_channels`` pick the branch
    (ResNet-34: basic (3, 4, 6, 3); ResNet-50: bottleneck (3, 4, 6, 3)); the encoder fields are SAM's."""

    img_size: int = 256
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    resnet_block: str = "basic"
    resnet_depth: Sequence[int] = (3, 4, 6, 3)
    resnet_channels: Sequence[int] = (64, 128, 256, 512)
    iou_head: bool = False
    in_chans: int = 3

    def example_inputs(self, batch_size: int = 1):
        boxes = jnp.tile(jnp.asarray([[0.0, 0.0, self.img_size / 2, self.img_size / 2]]), (batch_size, 1))
        return jnp.zeros((batch_size, self.img_size, self.img_size, self.in_chans), jnp.float32), boxes

    def _validate(self) -> None:
        indexes = list(self.global_attn_indexes)
        if len(indexes) != 4 or indexes != sorted(set(indexes)):
            raise ValueError(f"SAM-UNet adds one ResNet stage before each of 4 global blocks: global_attn_indexes must "
                             f"be 4 increasing block indexes; got {tuple(self.global_attn_indexes)}")
        if self.img_size % 32 or (self.img_size // self.patch_size) & (self.img_size // self.patch_size - 1):
            raise ValueError(f"img_size {self.img_size} must be a multiple of 32 with a power-of-two patch grid")

    @nn.compact
    def __call__(self, images: jax.Array, boxes: jax.Array | None = None, *, points: Any = None,
                 mask_inputs: jax.Array | None = None, train: bool = False) -> dict[str, jax.Array]:
        """images (B, S, S, 3); boxes (B, 4) or (B, M, 4); points ((B, M, P, 2) (x, y) pixels, (B, M, P) labels
        1 / 0 / -1); mask_inputs (B, M, S/4, S/4) logits. ``train``: the ResNet's BatchNorm uses batch
        statistics (``mutable=["batch_stats"]``)."""
        self._validate()
        encoder = SamImageEncoder(self.img_size, self.patch_size, self.in_chans, self.embed_dim, self.depth,
                                  self.num_heads, self.mlp_ratio, self.prompt_dim, self.window_size,
                                  tuple(self.global_attn_indexes), name="image_encoder")
        encoder.check_input(images)
        b, grid = images.shape[0], self.img_size // self.patch_size
        m = 1
        if boxes is not None:
            check_boxes(boxes, self.img_size)
            boxes = boxes[:, None] if boxes.ndim == 2 else boxes
            if boxes.ndim != 3 or boxes.shape[0] != b:
                raise ValueError(f"boxes must be (batch={b}, 4) or (batch={b}, prompts, 4); got shape {boxes.shape}")
            m = boxes.shape[1]
        if points is not None:
            coords, labels = points
            if coords.ndim != 4 or coords.shape[0] != b or coords.shape[-1] != 2 or labels.shape != coords.shape[:3]:
                raise ValueError(f"points must be coords (B, M, P, 2) and labels (B, M, P); got {coords.shape}, "
                                 f"{labels.shape}")
            if boxes is not None and coords.shape[1] != m:
                raise ValueError(f"points give {coords.shape[1]} prompts per image but boxes {m}")
            m = coords.shape[1]
        if mask_inputs is not None:
            if mask_inputs.shape[0] != b or mask_inputs.shape[2:] != (4 * grid, 4 * grid):
                raise ValueError(f"mask_inputs must be (batch={b}, prompts, {4 * grid}, {4 * grid}); "
                                 f"got {mask_inputs.shape}")
            if (boxes is not None or points is not None) and mask_inputs.shape[1] != m:
                raise ValueError(f"mask_inputs give {mask_inputs.shape[1]} prompts per image but boxes / points {m}")
            m = mask_inputs.shape[1]

        resnet = ResNet(self.resnet_block, tuple(self.resnet_depth), tuple(self.resnet_channels), num_classes=0,
                        in_chans=self.in_chans, name="resnet")
        stages = resnet(images, train=train, output="features")
        x = encoder.embed(images)
        bridges = [None] * 3
        start = 0
        for i, g in enumerate(self.global_attn_indexes):
            for j in range(start, g):
                x = encoder.block(j, x)
            x = x + Reshaper(grid, self.embed_dim, name=f"adapters_in_{i}")(stages[4 * 2 ** i])
            x = encoder.block(g, x)
            if i < 3:
                bridges[2 - i] = UpscaleStack(self.prompt_dim, self.prompt_dim // 8, name=f"adapters_bridge_{2 - i}")(x)
            start = g + 1
        for j in range(start, self.depth):
            x = encoder.block(j, x)
        embedding = encoder.neck(x)  # (B, g, g, prompt_dim)
        multi_scale = UpscaleStack(self.prompt_dim // 4, self.prompt_dim // 8, name="embedding_encoder")(embedding)
        multi_scale = multi_scale + bridges[0] + bridges[1] + bridges[2]

        prompt = SamPromptEncoder(self.prompt_dim, grid, self.img_size, self.mask_in_chans, name="prompt_encoder")

        def flat(t):  # (B, M, ...) -> (B * M, ...): every prompt decoded on its own
            return None if t is None else t.reshape((b * m,) + t.shape[2:])

        pts = None if points is None else (flat(points[0]), flat(points[1]))
        sparse, dense = prompt(b * m, pts, flat(boxes), flat(mask_inputs))

        def rep(t):
            return jnp.repeat(t, m, axis=0)

        decoder = SamUNetMaskDecoder(self.prompt_dim, self.decoder_depth, self.decoder_heads, self.decoder_mlp_dim,
                                     self.iou_head, name="mask_decoder")
        low, iou = decoder(rep(embedding), prompt.dense_pe(), sparse, dense, rep(multi_scale))
        low = low.reshape(b, m, *low.shape[1:])
        masks = resize_bilinear(low.transpose(0, 2, 3, 1), (self.img_size, self.img_size)).transpose(0, 3, 1, 2)
        out = {"masks": masks, "low_res_logits": low}
        if iou is not None:
            out["iou"] = iou.reshape(b, m)
        return out


# ---------------------------------------------------------------------------------------------
# The frozen encoder: trainable / frozen split and a training step over the trainable part only


def split_frozen(params: Any, frozen: Sequence[str] = FROZEN) -> tuple[dict, dict]:
    """(trainable, frozen): the top-level ``params`` entries named in ``frozen`` (default: the SAM image
    encoder) go to the second dict. Build the optimizer with ``tx.init(trainable)``."""
    missing = [k for k in frozen if k not in params]
    if missing:
        raise KeyError(f"no top-level params {missing} to freeze; have {sorted(params)}")
    return ({k: v for k, v in params.items() if k not in frozen}, {k: v for k, v in params.items() if k in frozen})


def join_frozen(trainable: dict, frozen: dict) -> dict:
    """Inverse of ``split_frozen``."""
    return {**trainable, **frozen}


def frozen_train_step(model: SamUNet, tx: optax.GradientTransformation, loss_fn):
    """``step(trainable, frozen, rest, opt_state, images, boxes, targets) -> (trainable, rest, opt_state, loss)``:
    one optimizer step of ``loss_fn(outputs, targets)`` differentiated with respect to ``trainable`` only
    (the frozen params enter as constants: no gradient is computed for them, ``opt_state`` covers only the
    trainable ones); ``rest`` holds ``batch_stats``, updated in training mode. Wrap it in ``jax.jit``."""

    def step(trainable, frozen, rest, opt_state, images, boxes, targets):
        def objective(p):
            out, updates = model.apply({"params": join_frozen(p, frozen), **rest}, images, boxes, train=True,
                                       mutable=["batch_stats"])
            return loss_fn(out, targets), updates

        (loss, updates), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        new, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, new), {**rest, **updates}, opt_state, loss

    return step


# ---------------------------------------------------------------------------------------------
# Official checkpoint converter (Hhankyangg/sam-unet state dict)


def _conv(sd, t, o, out, bias=True):
    out[f"params/{o}/kernel"] = conv2d(sd[t + ".weight"])
    if bias:
        out[f"params/{o}/bias"] = sd[t + ".bias"]


def _convt(sd, t, o, out):
    out[f"params/{o}/kernel"] = np.ascontiguousarray(sd[t + ".weight"].transpose(0, 2, 3, 1))
    out[f"params/{o}/bias"] = sd[t + ".bias"]


def _norm(sd, t, o, out):
    out.update({f"params/{k}": v for k, v in norm_params(sd, t, o).items()})


def _mha(sd, t, o, heads, out):
    for a, b in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
        out[f"params/{o}/{b}/kernel"] = heads_in(sd[f"{t}.{a}.weight"], heads)
        out[f"params/{o}/{b}/bias"] = heads_in(sd[f"{t}.{a}.bias"], heads)
    out[f"params/{o}/proj/kernel"] = heads_out(sd[f"{t}.out_proj.weight"], heads)
    out[f"params/{o}/proj/bias"] = sd[f"{t}.out_proj.bias"]


def _dense(sd, t, o, out):
    out.update({f"params/{k}": v for k, v in dense_params(sd, t, o).items()})


class _Prefixed:
    """A view of a StateDict under a key prefix, with the official ResNet names mapped to timm's."""

    def __init__(self, sd: StateDict, prefix: str):
        self.sd, self.prefix = sd, prefix

    def _key(self, k: str) -> str:
        if k.startswith("conv1."):
            return self.prefix + "stage0.0." + k[len("conv1."):]
        if k.startswith("bn1."):
            return self.prefix + "stage0.1." + k[len("bn1."):]
        if k.startswith("layer"):
            return self.prefix + "stage" + k[len("layer"):]
        return self.prefix + k

    def __getitem__(self, k):
        return self.sd[self._key(k)]

    def __contains__(self, k):
        return self._key(k) in self.sd

    def skip(self, *keys):
        self.sd.skip(*(self._key(k) for k in keys if self._key(k) in self.sd))


def convert_official_sam_unet(sd: StateDict, model: SamUNet, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The official ``SAM_UNET`` state dict (``image_encoder.sam_img_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``, ``resnet.stage*``, ``adapters_in.*``, ``adapters_bridge.*``, ``embedding_encoder.*``)
    -> our flat ``params/...``, ``batch_stats/...`` and ``buffers/...`` variables."""
    out = convert_sam_image_encoder(sd, "image_encoder.sam_img_encoder.", "params/image_encoder/", model.depth,
                                    model.num_heads)
    p, op = "prompt_encoder.sam_prompt_encoder.", "prompt_encoder/"
    out[f"buffers/{op}positional_encoding_gaussian_matrix"] = sd[p + "pe_layer.positional_encoding_gaussian_matrix"]
    for i in range(4):
        out[f"params/{op}point_embeddings_{i}"] = sd[f"{p}point_embeddings.{i}.weight"]
    out[f"params/{op}not_a_point_embed"] = sd[p + "not_a_point_embed.weight"]
    out[f"params/{op}no_mask_embed"] = sd[p + "no_mask_embed.weight"]
    for k in (0, 3, 6):
        _conv(sd, f"{p}mask_downscaling.{k}", f"{op}mask_downscaling_{k}", out)
    for k in (1, 4):
        _norm(sd, f"{p}mask_downscaling.{k}", f"{op}mask_downscaling_{k}", out)

    d, od = "mask_decoder.", "mask_decoder/"
    tr, otr = d + "sam_mask_decoder.transformer.", od + "transformer/"
    heads = model.decoder_heads
    for i in range(model.decoder_depth):
        t, o = f"{tr}layers.{i}.", f"{otr}layers_{i}/"
        for name in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            _mha(sd, t + name, o + name, heads, out)
        for k in range(1, 5):
            _norm(sd, f"{t}norm{k}", f"{o}norm{k}", out)
        _dense(sd, t + "mlp.lin1", o + "mlp/fc1", out)
        _dense(sd, t + "mlp.lin2", o + "mlp/fc2", out)
    _mha(sd, tr + "final_attn_token_to_image", otr + "final_attn_token_to_image", heads, out)
    _norm(sd, tr + "norm_final_attn", otr + "norm_final_attn", out)
    up = d + "sam_mask_decoder.output_upscaling."
    _convt(sd, up + "0", od + "output_upscaling/layers_0", out)
    _norm(sd, up + "1", od + "output_upscaling/layers_1", out)
    _convt(sd, up + "3", od + "output_upscaling/layers_3", out)
    out[f"params/{od}med_token"] = sd[d + "med_token.weight"]
    for k in range(3):
        _dense(sd, f"{d}hf_mlp.layers.{k}", f"{od}hf_mlp/layers_{k}", out)
    _conv(sd, d + "embedding_maskfeature.0", od + "embedding_maskfeature_0", out)
    _norm(sd, d + "embedding_maskfeature.1", od + "embedding_maskfeature_1", out)
    _conv(sd, d + "embedding_maskfeature.3", od + "embedding_maskfeature_3", out)

    resnet = ResNet(model.resnet_block, tuple(model.resnet_depth), tuple(model.resnet_channels), num_classes=0)
    rn_expected = {"params/" + k[len("params/resnet/"):]: v for k, v in expected.items()
                   if k.startswith("params/resnet/")}
    rn = convert_timm_resnet(_Prefixed(sd, "resnet."), resnet, rn_expected)
    for k, v in rn.items():
        col, rest = k.split("/", 1)
        out[f"{col}/resnet/{rest}"] = v

    for i in range(4):
        t, o = f"adapters_in.{i}.reshaper.", f"adapters_in_{i}/"
        layers = sorted({int(k[len(t):].split(".")[0]) for k in sd.keys() if k.startswith(t)})
        for k in layers:
            key = f"{t}{k}"
            w = sd[key + ".weight"]
            if w.ndim == 1:
                _norm(sd, key, f"{o}layers_{k}", out)
            elif tuple(expected.get(f"params/{o}layers_{k}/kernel", ()))[1:3] == (2, 2):  # ours: (in, 2, 2, out)
                _convt(sd, key, f"{o}layers_{k}", out)
            else:
                _conv(sd, key, f"{o}layers_{k}", out)
    for i in range(3):
        t, o = f"adapters_bridge.{i}.", f"adapters_bridge_{i}/"
        _convt(sd, t + "0", o + "layers_0", out)
        _norm(sd, t + "1", o + "layers_1", out)
        _convt(sd, t + "3", o + "layers_3", out)
    _convt(sd, "embedding_encoder.0", "embedding_encoder/layers_0", out)
    _norm(sd, "embedding_encoder.1", "embedding_encoder/layers_1", out)
    _convt(sd, "embedding_encoder.3", "embedding_encoder/layers_3", out)
    return out


# ---------------------------------------------------------------------------------------------
# Variants

RES34 = dict(resnet_block="basic", resnet_depth=(3, 4, 6, 3), resnet_channels=(64, 128, 256, 512))
RES50 = dict(resnet_block="bottleneck", resnet_depth=(3, 4, 6, 3), resnet_channels=(64, 128, 256, 512))
OFFICIAL_PARAMS = {"sam_unet_res34": (116_019_884, 29_347_244), "sam_unet_res50": (138_428_204, 51_755_564)}


def _info(name: str) -> ModelInfo:
    return ModelInfo(paper="SAM-UNet: Enhancing Zero-Shot Segmentation of SAM for Universal Medical Images",
                     arxiv="2408.09886", repo="Hhankyangg/sam-unet", input_size=(256, 256, 3),
                     params_m=round(OFFICIAL_PARAMS[name][0] / 1e6, 2),
                     converter=convert_official_sam_unet, task="prompted segmentation", metric="DSC")


@register_model(_info("sam_unet_res34"))
def sam_unet_res34(**overrides: Any) -> SamUNet:
    """SAM-UNet with a ResNet-34 branch (29.3M of 116.0M parameters trainable)."""
    return SamUNet(**{**RES34, **overrides})


@register_model(_info("sam_unet_res50"))
def sam_unet_res50(**overrides: Any) -> SamUNet:
    """SAM-UNet with a ResNet-50 branch (51.8M of 138.4M parameters trainable)."""
    return SamUNet(**{**RES50, **overrides})


__all__ = ["SamUNet", "Reshaper", "split_frozen", "join_frozen", "frozen_train_step", "convert_official_sam_unet",
           "sam_unet_res34", "sam_unet_res50", "check_boxes"]
