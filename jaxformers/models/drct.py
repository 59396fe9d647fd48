"""DRCT: Dense-residual-connected Swin Transformer for single-image super-resolution.

Paper: "DRCT: Saving Image Super-resolution away from Information Bottleneck", Hsu, Liao and Lin,
CVPR 2024 workshops (NTIRE), arXiv 2404.00722. Official code: ming053l/DRCT (MIT),
``drct/archs/DRCT_arch.py`` (the network), ``drct/models/drct_model.py`` (reflect padding at test
time) and ``options/train/train_DRCT*_SRx*.yml`` (the configs registered here). Parameter names
follow the official state dict, so its checkpoints convert key for key (``convert_official_drct``);
the released ``.pth`` files (BasicSR) hold the weights under ``params`` (or ``params_ema``):
``jaxformers.load_pretrained("drct_x4", "DRCT_SRx4.pth", checkpoint_key="params")``.

Architecture (as ``DRCT_arch.py`` builds it):

- Input: RGB in [0, 1] (NHWC here), minus the DIV2K mean (0.4488, 0.4371, 0.4040) (zero for other
  channel counts), times ``img_range``; the output is divided by ``img_range`` and the mean added back.
- Shallow features: 3x3 conv ``conv_first`` to ``embed_dim``; LayerNorm ``patch_embed.norm`` on the
  tokens (patch size 1: no projection).
- Deep features: ``len(depths)`` residual dense groups (RDG). Each RDG holds **five** Swin blocks
  ``swin1``..``swin5`` whatever ``depths`` says (the official code only uses ``depths`` for the
  number of groups and the stochastic-depth slice), densely connected: block k (k = 1..5) reads the
  concatenation [x, x1, ..., x_{k-1}] of width ``embed_dim + (k-1) gc``, a 1x1 conv ``adjust{k}``
  maps its output to ``gc`` growth channels followed by LeakyReLU(0.2) (k < 5), or back to
  ``embed_dim`` without activation (k = 5); the group returns 0.2 x5 + x. Block k has
  ``num_heads - (width mod num_heads)`` heads (block 1: ``num_heads``), shift 0 / window//2
  alternating (0, w/2, 0, w/2, 0), MLP ratio ``mlp_ratio`` for blocks 1-3 and 1 for blocks 4-5; all
  five blocks use the first stochastic-depth rate of the group's slice of linspace(0,
  ``drop_path_rate``, sum(depths)). For DRCT (embed 180, gc 32, 6 heads) the widths are
  180/212/244/276/308 with 6/4/2/6/4 heads.
- Swin blocks: ``jaxformers.layers.window.SwinBlock`` (LN, (shifted) window attention with a
  relative position bias and the -100 shift mask, through the shared ``MultiHeadAttention``; LN,
  GELU MLP). As in the official block, a window not smaller than the map at the model's
  ``img_size`` shrinks to it and is not shifted (``effective_window``).
- Final LayerNorm ``norm``, 3x3 ``conv_after_body`` (``resi_connection='1conv'``; ``'identity'``
  drops it) plus the shallow features, then the pixel-shuffle upsampler: 3x3 conv to 64 + LeakyReLU
  (slope 0.01, torch's default), (3x3 conv to 4*64, pixel shuffle 2) per factor 2 (x2, x4) or
  (3x3 conv to 9*64, pixel shuffle 3) for x3, 3x3 ``conv_last`` to RGB.

Inputs whose height or width is not a multiple of the window are reflect-padded at the bottom/right
to the next multiple and the output cropped back to ``scale`` times the input (what the official
``DRCTModel.test`` does around the network); ``pad_to_window=False`` instead rejects such inputs
with a clear error (the bare network, e.g. to train on crops that are multiples of the window).

Registered variants (the official training configs): ``drct_x2``/``drct_x3``/``drct_x4`` (embed 180,
6 RDGs, 6 heads, window 16, MLP ratio 2, gc 32, img_size 64) and ``drct_l_x4`` (12 RDGs). Parameter
counts equal the official code's (14,139,579 for DRCT x4, 27,580,719 for DRCT-L x4).

Deviations / notes:
- The official constructor accepts ``compress_ratio``, ``squeeze_factor``, ``conv_scale`` and
  ``overlap_ratio`` (inherited from HAT's configs, present in every yml) and never uses them; they
  are not fields here. ``ape`` (absolute position embedding, off in every config) and the
  ``upsampler=''`` branch (which returns the normalised input unchanged) are not implemented;
  ``patch_norm`` is always on, as in every config; ``qk_scale`` is always head_dim ** -0.5.
- Widths whose derived head count does not divide them fail in the official reshape; here the
  model raises a ``ValueError`` naming the block, width and head count when it is built.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, conv2d
from jaxformers.layers import Conv, LayerNorm, check_image
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.window import SwinBlock, effective_window
from jaxformers.models.swin import swin_block_params
from jaxformers.registry import ModelInfo, register_model

RGB_MEAN = (0.4488, 0.4371, 0.4040)
NUM_FEAT = 64  # channels of the pixel-shuffle upsampler (fixed in the official code)
BLOCKS = 5  # Swin blocks per residual dense group


def rdg_blocks(dim: int, num_heads: int, gc: int, mlp_ratio: float) -> list[tuple[int, int, float]]:
    """(width, heads, MLP ratio) of the five Swin blocks of one RDG, derived as ``DRCT_arch.RDG`` does."""
    out = []
    for k in range(BLOCKS):
        width = dim + k * gc
        heads = num_heads if k == 0 else num_heads - width % num_heads
        out.append((width, heads, mlp_ratio if k < 3 else 1.0))
    return out


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """NHWC ``torch.nn.PixelShuffle(r)``: channel c * r * r + i * r + j -> pixel (h * r + i, w * r + j)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c // (r * r))


class RDG(nn.Module):
    """Residual dense group: five densely concatenated Swin blocks with 1x1 ``adjust`` convs; 0.2 x5 + x."""

    num_heads: int
    gc: int
    window: tuple[int, int]
    shift: tuple[int, int]
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    attention_dropout: float = 0.0
    dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        feats = [x]
        for k, (_, heads, ratio) in enumerate(rdg_blocks(dim, self.num_heads, self.gc, self.mlp_ratio)):
            y = SwinBlock(heads, self.window, self.shift if k % 2 else (0, 0), mlp_ratio=ratio, qkv_bias=self.qkv_bias,
                          drop_path=self.drop_path, attention_dropout=self.attention_dropout, dropout=self.dropout,
                          attention_impl=self.attention_impl, name=f"swin{k + 1}", **kw)(
                              jnp.concatenate(feats, -1) if k else x, train)
            y = Conv(self.gc if k < BLOCKS - 1 else dim, (1, 1), padding=0, name=f"adjust{k + 1}", **kw)(y)
            if k < BLOCKS - 1:
                feats.append(nn.leaky_relu(y, 0.2))
        return y * 0.2 + x


class DRCT(nn.Module):
    """DRCT super-resolution network: (B, H, W, in_chans) in [0, 1] -> (B, scale H, scale W, in_chans)."""

    upscale: int = 4
    img_size: int = 64
    in_chans: int = 3
    embed_dim: int = 180
    depths: Sequence[int] = (6, 6, 6, 6, 6, 6)
    num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6)
    window_size: int = 16
    mlp_ratio: float = 2.0
    gc: int = 32
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    img_range: float = 1.0
    resi_connection: Literal["1conv", "identity"] = "1conv"
    pad_to_window: bool = True
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def window_and_shift(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The blocks' window and shift at ``img_size`` (the official shrinking rule)."""
        w = self.window_size
        return effective_window((self.img_size, self.img_size), (w, w), (w // 2, w // 2), False)

    def _check_config(self) -> None:
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths and num_heads need one entry per RDG; got {self.depths}, {self.num_heads}")
        if self.upscale != 3 and (self.upscale < 2 or self.upscale & (self.upscale - 1)):
            raise ValueError(f"upscale {self.upscale} is not supported: DRCT's pixel-shuffle upsampler takes 2^n or 3")
        if self.resi_connection not in ("1conv", "identity"):
            raise ValueError(f"resi_connection must be '1conv' or 'identity', got {self.resi_connection!r}")
        for i, h in enumerate(self.num_heads):
            for k, (width, heads, _) in enumerate(rdg_blocks(self.embed_dim, h, self.gc, self.mlp_ratio)):
                if heads <= 0 or width % heads:
                    raise ValueError(f"RDG {i} block swin{k + 1}: width {width} (embed_dim {self.embed_dim} + {k} x "
                                     f"gc {self.gc}) is not divisible by its {heads} heads (num_heads {h} - width "
                                     f"mod num_heads); choose embed_dim, gc and num_heads so that it is")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        self._check_config()
        h, w = check_image(x, in_chans=self.in_chans, what="low-resolution image")
        window, shift = self.window_and_shift()
        pad_h, pad_w = (-h) % window[0], (-w) % window[1]
        if (pad_h or pad_w) and not self.pad_to_window:
            raise ValueError(f"x is {h}x{w}, but with pad_to_window=False DRCT needs height and width divisible by "
                             f"its window {window[0]}x{window[1]}; pad the image (reflect, as the official test "
                             f"code) or build the model with pad_to_window=True")
        if pad_h or pad_w:
            x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mean = jnp.asarray(RGB_MEAN if self.in_chans == 3 else (0.0,) * self.in_chans, x.dtype)
        x = (x - mean) * self.img_range

        x = Conv(self.embed_dim, (3, 3), padding=1, name="conv_first", **kw)(x)
        y = LayerNorm(1e-5, name="patch_norm", **kw)(x)
        y = nn.Dropout(self.drop_rate)(y, deterministic=not train)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        for i, heads in enumerate(self.num_heads):
            y = RDG(heads, self.gc, window, shift, self.mlp_ratio, self.qkv_bias, float(rates[sum(self.depths[:i])]),
                    self.attn_drop_rate, self.drop_rate, self.attention_impl, name=f"layers_{i}", **kw)(y, train)
        y = LayerNorm(1e-5, name="norm", **kw)(y)
        if self.resi_connection == "1conv":
            y = Conv(self.embed_dim, (3, 3), padding=1, name="conv_after_body", **kw)(y)
        x = y + x

        x = nn.leaky_relu(Conv(NUM_FEAT, (3, 3), padding=1, name="conv_before_upsample", **kw)(x), 0.01)
        factors = [3] if self.upscale == 3 else [2] * (self.upscale.bit_length() - 1)
        for j, r in enumerate(factors):
            x = pixel_shuffle(Conv(r * r * NUM_FEAT, (3, 3), padding=1, name=f"upsample_{j}", **kw)(x), r)
        x = Conv(self.in_chans, (3, 3), padding=1, name="conv_last", **kw)(x)
        x = x / self.img_range + mean
        return x[:, :h * self.upscale, :w * self.upscale]


# ---------------------------------------------------------------------------------------------
# Official checkpoint converter (ming053l/DRCT ``DRCT_arch.DRCT.state_dict()``)


def convert_official_drct(sd: StateDict, model: DRCT, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Official DRCT state dict -> our flat ``params/...``. Buffers (``relative_position_index``,
    ``attn_mask``) are recomputed, so they are skipped. The upsampler's ``upsample.{2j}`` convs are our
    ``upsample_{j}``."""
    for k in list(sd.keys()):
        if k.endswith(("relative_position_index", "attn_mask")):
            sd.skip(k)
    out: dict[str, np.ndarray] = {}

    def conv(t: str, o: str) -> None:
        out[f"params/{o}/kernel"] = conv2d(sd[f"{t}.weight"])
        out[f"params/{o}/bias"] = sd[f"{t}.bias"]

    def norm(t: str, o: str) -> None:
        out[f"params/{o}/scale"], out[f"params/{o}/bias"] = sd[f"{t}.weight"], sd[f"{t}.bias"]

    conv("conv_first", "conv_first")
    norm("patch_embed.norm", "patch_norm")
    norm("norm", "norm")
    if model.resi_connection == "1conv":
        conv("conv_after_body", "conv_after_body")
    conv("conv_before_upsample.0", "conv_before_upsample")
    factors = 1 if model.upscale == 3 else model.upscale.bit_length() - 1
    for j in range(factors):
        conv(f"upsample.{2 * j}", f"upsample_{j}")
    conv("conv_last", "conv_last")
    for i, h in enumerate(model.num_heads):
        for k, (_, heads, _) in enumerate(rdg_blocks(model.embed_dim, h, model.gc, model.mlp_ratio)):
            t = f"layers.{i}.swin{k + 1}."
            block = swin_block_params(lambda name, t=t: sd[t + name[len("b.0."):]], "b.", "o_", 1, heads)
            out.update({f"params/layers_{i}/swin{k + 1}/" + key[len("o_0/"):]: v for key, v in block.items()})
            conv(f"layers.{i}.adjust{k + 1}", f"layers_{i}/adjust{k + 1}")
    return out


# ---------------------------------------------------------------------------------------------
# Variants (the official training configs; counts run from the official code)

VARIANTS = {
    "drct_x2": dict(upscale=2),
    "drct_x3": dict(upscale=3),
    "drct_x4": dict(upscale=4),
    "drct_l_x4": dict(upscale=4, depths=(6,) * 12, num_heads=(6,) * 12),
}
# Set5 x4 PSNR (dB, Y channel, border crop 4) of the official README's table.
SET5_PSNR = {"drct_x4": 33.11, "drct_l_x4": 33.37}


def _info(name: str, params: float) -> ModelInfo:
    return ModelInfo(paper="DRCT: Saving Image Super-resolution away from Information Bottleneck", arxiv="2404.00722",
                     repo="ming053l/DRCT", input_size=(64, 64, 3), params_m=params, top1=SET5_PSNR.get(name),
                     converter=convert_official_drct, task="super-resolution", metric="PSNR")


def _build(name: str, overrides: dict[str, Any]) -> DRCT:
    return DRCT(**{**VARIANTS[name], **overrides})


@register_model(_info("drct_x2", 13.99))
def drct_x2(**overrides: Any) -> DRCT:
    """DRCT x2."""
    return _build("drct_x2", overrides)


@register_model(_info("drct_x3", 14.18))
def drct_x3(**overrides: Any) -> DRCT:
    """DRCT x3."""
    return _build("drct_x3", overrides)


@register_model(_info("drct_x4", 14.14))
def drct_x4(**overrides: Any) -> DRCT:
    """DRCT x4 (``top1`` holds Set5 PSNR, dB)."""
    return _build("drct_x4", overrides)


@register_model(_info("drct_l_x4", 27.58))
def drct_l_x4(**overrides: Any) -> DRCT:
    """DRCT-L x4 (``top1`` holds Set5 PSNR, dB)."""
    return _build("drct_l_x4", overrides)
