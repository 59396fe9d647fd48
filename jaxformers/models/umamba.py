"""U-Mamba (U-Mamba_Enc, 2-D): an nnU-Net-style residual U-Net whose encoder stages end in a Mamba layer.

Paper: "U-Mamba: Enhancing Long-range Dependency for Biomedical Image Segmentation", Ma, Li & Wang, 2024,
arXiv 2401.04722. Official code: bowang-lab/U-Mamba, ``umamba/nnunetv2/nets/UMambaEnc_2d.py`` (``UMambaEnc``,
``ResidualMambaEncoder``, ``UNetResDecoder``, ``MambaLayer``, ``BasicResBlock``) with
``BasicBlockD`` from the ``dynamic_network_architectures`` package (nnU-Net's building blocks).

Architecture (as the official 2-D code builds it; NHWC here):

- stem: a residual block (``BasicResBlock``: conv-IN-LeakyReLU, conv-IN, plus a 1x1 conv skip, then
  LeakyReLU) to ``features[0]`` channels, then ``blocks[0] - 1`` ``BasicBlockD`` (same, identity skip);
- stage s: a strided ``BasicResBlock`` (stride ``strides[s]``, 1x1-conv skip) and ``blocks[s] - 1``
  ``BasicBlockD``; stages s with ``s % 2 != n_stages % 2`` (so the last stage always) end in a
  ``MambaLayer``: LayerNorm then the Mamba mixer over the flattened map, **without** a residual. A stage
  whose map has no more pixels than channels (decided from ``img_size``, the nnU-Net patch size) runs
  the mixer over the channels as tokens (d_model = H·W) instead of over the pixels. The official
  ``UMambaEnc`` forces one block in the deeper half of the encoder (stages ≥ ceil(n/2)) and in decoder
  stages ≥ ceil(n/2) - 1 (the same rules here: ``encoder_blocks`` / ``decoder_blocks_per_stage``);
- decoder: per level, nearest upsampling by the stride then a 1x1 conv (``UpsampleLayer``), concatenation
  with the encoder map of that resolution (all but the last level: the official decoder never reads the
  full-resolution skip), a ``BasicResBlock`` and ``decoder_blocks - 1`` ``BasicBlockD``, and a 1x1
  segmentation conv (every level with ``output="deep_supervision"``, the last one otherwise).

Instance norm (affine, eps 1e-5), LeakyReLU 0.01, convolutions with bias and He-normal init
(nnU-Net's ``InitWeights_He(1e-2)``); the Mamba mixer is ``jaxformers.models.mamba.MambaMixer`` with
``mamba_ssm.Mamba``'s defaults (d_state 16, d_conv 4, expand 2, dt_rank ceil(d/16), no out_proj rescale).
``forward_features`` gives the encoder's stage outputs keyed by their stride ({1, 2, 4, ...}: the
nnU-Net configs start at stride 1). ``__call__`` gives per-pixel logits (B, H, W, num_classes) for
``jaxformers.segmentation.semantic_cross_entropy``. Deviations: none in the architecture; the nnU-Net
training recipe (plans, augmentation, Dice + CE with deep supervision) is not part of the model.

``convert_umamba`` maps an official ``UMambaEnc`` state dict (``encoder.stem.0.conv1.weight``,
``encoder.stages.{s}.{j}.conv1.conv.weight`` for nnU-Net's ``BasicBlockD``,
``encoder.mamba_layers.{s}.mamba.in_proj.weight``, ``decoder.upsample_layers.{s}.conv.weight``,
``decoder.seg_layers.{s}.weight``, ...) to our variables (``key_table`` lists every row).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

import numpy as np

from jaxformers.convert.common import StateDict, conv2d
from jaxformers.layers import Conv, LayerNorm, to_2tuple
from jaxformers.models.mamba import MambaMixer, _MixerConfig
from jaxformers.models.mamba_convert import mixer_rows, to_ours
from jaxformers.registry import ModelInfo, register_model

__all__ = ["UMambaEnc", "channel_token_stages", "convert_umamba", "key_table", "decoder_blocks_per_stage", "encoder_blocks", "mamba_stages"]

_HE = nn.initializers.variance_scaling(2.0 / (1 + 1e-2 ** 2), "fan_in", "normal")  # kaiming_normal_(a=1e-2)


def _as_list(v: int | Sequence[int], n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(x) for x in v]


def encoder_blocks(blocks: int | Sequence[int], n_stages: int) -> list[int]:
    """Residual blocks per encoder stage as the official ``UMambaEnc`` sets them (deeper half: 1)."""
    out = _as_list(blocks, n_stages)
    for s in range(math.ceil(n_stages / 2), n_stages):
        out[s] = 1
    return out


def decoder_blocks_per_stage(blocks: int | Sequence[int], n_stages: int) -> list[int]:
    """Residual blocks per decoder stage (lowest resolution first) as the official ``UMambaEnc`` sets them."""
    out = _as_list(blocks, n_stages - 1)
    for s in range(math.ceil((n_stages - 1) / 2 + 0.5), n_stages - 1):
        out[s] = 1
    return out


def mamba_stages(n_stages: int) -> list[bool]:
    """Which encoder stages end in a Mamba layer (alternating, always the last)."""
    return [bool(s % 2) ^ bool(n_stages % 2) for s in range(n_stages)]


def channel_token_stages(img_size: tuple[int, int], features: Sequence[int], strides: Sequence[int]) -> list[bool]:
    """Stages whose map (at ``img_size``) has no more pixels than channels: their Mamba reads channels as tokens."""
    h, w = img_size
    out = []
    for f, s in zip(features, strides):
        h, w = h // s, w // s
        out.append(h * w <= f)
    return out


def _instance_norm(name: str) -> nn.GroupNorm:
    """InstanceNorm2d(affine=True, eps=1e-5): one group per channel."""
    return nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5, name=name)


class ResBlock(nn.Module):
    """``BasicResBlock`` (``skip_conv``: 1x1-conv skip, the stage's first block) or ``BasicBlockD``
    (identity skip): conv-IN-LeakyReLU, conv-IN, + skip, LeakyReLU."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    skip_conv: bool = True

    @nn.compact
    def __call__(self, x):
        k, p = self.kernel_size, self.kernel_size // 2
        y = Conv(self.features, (k, k), strides=self.stride, padding=p, kernel_init=_HE, name="conv1")(x)
        y = nn.leaky_relu(_instance_norm("norm1")(y), 0.01)
        y = _instance_norm("norm2")(Conv(self.features, (k, k), padding=p, kernel_init=_HE, name="conv2")(y))
        if self.skip_conv:
            x = Conv(self.features, (1, 1), strides=self.stride, padding=0, kernel_init=_HE, name="conv3")(x)
        elif x.shape[-1] != self.features or self.stride != 1:
            raise ValueError("an identity-skip block keeps the channels and the resolution")
        return nn.leaky_relu(y + x, 0.01)


class MambaLayer(nn.Module):
    """LayerNorm + Mamba over the flattened map (pixels as tokens, or channels as tokens); no residual."""

    channel_token: bool
    config: _MixerConfig

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        if self.channel_token:
            tokens = tokens.transpose(0, 2, 1)  # (B, C, H·W): d_model = H·W
        out, _ = MambaMixer(self.config, name="mamba")(LayerNorm(1e-5, name="norm")(tokens))
        if self.channel_token:
            out = out.transpose(0, 2, 1)
        return out.reshape(b, h, w, c)


class UMambaEnc(nn.Module):
    """U-Mamba_Enc for 2-D images (see the module docstring). ``img_size`` is the training patch size
    that fixes which stages mix channels as tokens (their d_model is H·W): other sizes work when those
    stages keep their pixel count, and raise a clear error otherwise."""

    num_classes: int = 6
    in_chans: int = 3
    img_size: int | tuple[int, int] = 256
    features: Sequence[int] = (32, 64, 128, 256, 512, 512, 512)
    strides: Sequence[int] = (1, 2, 2, 2, 2, 2, 2)
    blocks: int | Sequence[int] = 2
    decoder_blocks: int | Sequence[int] = 2
    kernel_size: int = 3
    state_size: int = 16
    conv_kernel: int = 4
    expand: int = 2
    scan: str = "associative"
    chunk_size: int = 256
    # the official constructor's switch: __call__ returns every decoder level's logits (full resolution first)
    deep_supervision: bool = False

    def _check(self) -> None:
        if len(self.strides) != len(self.features):
            raise ValueError(f"strides ({len(self.strides)}) and features ({len(self.features)}) need one entry "
                             f"per stage")
        if any(int(s) < 2 for s in self.strides[1:]):
            raise ValueError(f"every stage after the first downsamples (stride >= 2); got strides {self.strides}")

    def _mixer_config(self, d: int) -> _MixerConfig:
        return _MixerConfig(self.state_size, self.expand, self.conv_kernel, -(-d // 16), False, True, 1e-3, 0.1,
                            1e-4, 1.0, "random", 1.0, self.scan, self.chunk_size)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False,
                 output: Literal["logits", "features", "deep_supervision"] = "logits"):
        """Per-pixel logits (B, H, W, num_classes); ``output="features"``: ``{stride: stage output}``;
        ``"deep_supervision"`` (or ``deep_supervision=True``): the logits of every decoder level, full
        resolution first (nnU-Net's deep-supervision loss reads them)."""
        if self.deep_supervision and output == "logits":
            output = "deep_supervision"
        del train  # no dropout / batch statistics in U-Mamba
        self._check()
        if output not in ("logits", "features", "deep_supervision"):
            raise ValueError(f"output must be 'logits', 'features' or 'deep_supervision'; got {output!r}")
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ValueError(f"UMambaEnc takes NHWC images with {self.in_chans} channels; got shape {x.shape}")
        n = len(self.features)
        total = math.prod(self.strides)
        if x.shape[1] % total or x.shape[2] % total:
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not divisible by the total stride {total}")
        blocks = encoder_blocks(self.blocks, n)
        dec_blocks = decoder_blocks_per_stage(self.decoder_blocks, n)
        with_mamba = mamba_stages(n)
        channel_token = channel_token_stages(to_2tuple(self.img_size), self.features, self.strides)
        k = self.kernel_size
        x = ResBlock(self.features[0], k, name="stem_0")(x)
        for j in range(1, blocks[0]):
            x = ResBlock(self.features[0], k, skip_conv=False, name=f"stem_{j}")(x)
        skips, stride = {}, 1
        for s in range(n):
            x = ResBlock(self.features[s], k, self.strides[s], name=f"stages_{s}_0")(x)
            for j in range(1, blocks[s]):
                x = ResBlock(self.features[s], k, skip_conv=False, name=f"stages_{s}_{j}")(x)
            if with_mamba[s]:
                d = x.shape[1] * x.shape[2] if channel_token[s] else self.features[s]
                if channel_token[s]:
                    h, w = to_2tuple(self.img_size)
                    expected = (h // math.prod(self.strides[:s + 1])) * (w // math.prod(self.strides[:s + 1]))
                    if d != expected:
                        raise ValueError(f"stage {s} mixes channels as tokens with d_model = H·W = {expected} (fixed "
                                         f"by img_size={self.img_size}); this input gives {d} pixels there")
                x = MambaLayer(channel_token[s], self._mixer_config(d), name=f"mamba_layers_{s}")(x)
            stride *= self.strides[s]
            skips[stride] = x
        if output == "features":
            return skips
        maps = list(skips.values())
        low, seg = maps[-1], []
        for s in range(n - 1):
            skip_ch = self.features[-(s + 2)]
            up = self.strides[-(s + 1)]
            y = jnp.repeat(jnp.repeat(low, up, axis=1), up, axis=2)  # nearest upsampling by the stride
            y = Conv(skip_ch, (1, 1), padding=0, kernel_init=_HE, name=f"decoder_upsample_{s}")(y)
            if s < n - 2:
                y = jnp.concatenate([y, maps[-(s + 2)]], axis=-1)
            y = ResBlock(skip_ch, k, name=f"decoder_stages_{s}_0")(y)
            for j in range(1, dec_blocks[s]):
                y = ResBlock(skip_ch, k, skip_conv=False, name=f"decoder_stages_{s}_{j}")(y)
            # every level has its segmentation conv (the official model holds them all; deep supervision reads them)
            seg.append(Conv(self.num_classes, (1, 1), padding=0, kernel_init=_HE, name=f"decoder_seg_{s}")(y))
            low = y
        return seg[::-1] if output == "deep_supervision" else seg[-1]

    def forward_features(self, x: jax.Array, *, train: bool = False) -> dict[int, jax.Array]:
        """``{stride: (B, H // stride, W // stride, C)}``: the encoder's stage outputs (after their Mamba layers)."""
        return self(x, train=train, output="features")


# ---------------------------------------------------------------------------------------------
# Official checkpoint converter

Row = tuple[str, str, str]


def _block_rows(o: str, t: str, first: bool) -> list[Row]:
    """One ``BasicResBlock`` (``first``: conv1/norm1/conv2/norm2/conv3 modules) or ``BasicBlockD``
    (``conv1.conv``, ``conv1.norm``, ``conv2.conv``, ``conv2.norm``)."""
    rows: list[Row] = []
    for i in (1, 2):
        conv, norm = (f"conv{i}", f"norm{i}") if first else (f"conv{i}.conv", f"conv{i}.norm")
        rows += [(f"{o}conv{i}/kernel", f"{t}{conv}.weight", "conv2d"), (f"{o}conv{i}/bias", f"{t}{conv}.bias", "copy"),
                 (f"{o}norm{i}/scale", f"{t}{norm}.weight", "copy"), (f"{o}norm{i}/bias", f"{t}{norm}.bias", "copy")]
    if first:
        rows += [(f"{o}conv3/kernel", f"{t}conv3.weight", "conv2d"), (f"{o}conv3/bias", f"{t}conv3.bias", "copy")]
    return rows


def key_table(model: UMambaEnc) -> list[Row]:
    """(our flat path, the official key, transform) for every parameter of ``model``."""
    n = len(model.features)
    blocks, dec_blocks = encoder_blocks(model.blocks, n), decoder_blocks_per_stage(model.decoder_blocks, n)
    rows: list[Row] = []
    for j in range(blocks[0]):
        rows += _block_rows(f"params/stem_{j}/", f"encoder.stem.{j}.", j == 0)
    for s, mamba in enumerate(mamba_stages(n)):
        for j in range(blocks[s]):
            rows += _block_rows(f"params/stages_{s}_{j}/", f"encoder.stages.{s}.{j}.", j == 0)
        if mamba:
            o, t = f"params/mamba_layers_{s}/", f"encoder.mamba_layers.{s}."
            rows += [(o + "norm/scale", t + "norm.weight", "copy"), (o + "norm/bias", t + "norm.bias", "copy")]
            rows += mixer_rows(o + "mamba/", t + "mamba.")
    for s in range(n - 1):
        rows += [(f"params/decoder_upsample_{s}/kernel", f"decoder.upsample_layers.{s}.conv.weight", "conv2d"),
                 (f"params/decoder_upsample_{s}/bias", f"decoder.upsample_layers.{s}.conv.bias", "copy"),
                 (f"params/decoder_seg_{s}/kernel", f"decoder.seg_layers.{s}.weight", "conv2d"),
                 (f"params/decoder_seg_{s}/bias", f"decoder.seg_layers.{s}.bias", "copy")]
        for j in range(dec_blocks[s]):
            rows += _block_rows(f"params/decoder_stages_{s}_{j}/", f"decoder.stages.{s}.{j}.", j == 0)
    return rows


def convert_umamba(sd: StateDict, model: UMambaEnc, expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """An official ``UMambaEnc`` state dict (torch layouts) -> our flat ``params/...`` variables."""
    del expected
    return {o: conv2d(np.asarray(sd[t])) if kind == "conv2d" else to_ours(np.asarray(sd[t]), kind)
            for o, t, kind in key_table(model)}


@register_model(ModelInfo(paper="U-Mamba: Enhancing Long-range Dependency for Biomedical Image Segmentation",
                          arxiv="2401.04722", repo="bowang-lab/U-Mamba", input_size=(256, 256, 1), params_m=46.41,
                          task="semantic segmentation", metric="DSC",
                          converter=convert_umamba))
def umamba_enc_2d(**overrides: Any) -> UMambaEnc:
    """U-Mamba_Enc 2-D with nnU-Net's default 2-D plan for a 256x256 patch: 7 stages of 32 ... 512 channels
    (capped at 512), strides 1, 2, ..., 2, two blocks per stage; one input channel, 14 classes (override
    ``num_classes`` / ``in_chans`` / ``img_size`` for a data set's plan)."""
    cfg = {"num_classes": 14, "in_chans": 1, "img_size": 256}
    cfg.update(overrides)
    return UMambaEnc(**cfg)
