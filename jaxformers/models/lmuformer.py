"""LMUFormer and Spiking LMUFormer: Legendre Memory Units with convolutional patch embedding.

Paper: "LMUFormer: Low Complexity Yet Powerful Spiking Model With Legendre Memory Units", Liu, Datta, Li,
Beerel, ICLR 2024, arXiv 2402.04882. Official code: zeyuliu1037/LMUFormer (``src/lmu_rnn.py``:
``lmu_rnn_conv1d`` and ``slmu_rnn_ms_conv1d``; ``src/blocks/{lmu_cell, lmu, conv1d_embedding, mlp}.py``;
Speech Commands V2 config ``src/gsc.yml``).

A sequence (B, L, C) (128 frames of 128 mel bins for Speech Commands; an image is read as its pixels in
raster order, optionally under a fixed permutation: psMNIST) goes through
- a convolutional embedding without downsampling: non-spiking ``Tokenizer`` 4 x [Conv1d k3 -> ReLU -> BN]
  plus a k3 "relative position" conv added as a residual; spiking ``Conv1d4EBMs`` Conv -> BN -> LIF ->
  ... -> Conv, plus rpe_conv(LIF(BN(x))) added;
- ``depth`` blocks x + Mixer(x); x + ConvFFN(x) (no norms, no drop path): the mixer is an ``LMUCell``
  (memory = width, θ = seq_len = 128) then a 1x1 conv + BN; the spiking mixer (``SLMUMs``) first
  applies BN + LIF (threshold 0.5), uses a memory of 2 x width and BN + LIF on u, m and h. ConvFFN is
  1x1 conv -> BN -> GELU -> 1x1 conv -> BN -> ReLU (spiking: BN -> LIF -> conv, twice);
- a per-step linear head (spiking: after BN + LIF) averaged over time. ``output="all_seq"`` gives the
  streaming predictions: at step t the head of the running mean of the features up to t (the
  official ``test_mode="all_seq"``), whose accuracy shows how early the model knows.

``memory="recurrent"`` computes the LMU memories step by step instead of by FFT; both give the same
outputs (tests). Initialisation as the official code: Linear layers truncated normal (0.02) with zero
bias, convolutions PyTorch's default, BatchNorm 1/0. Deviations: the Speech Commands data pipeline
(SpecAugment, mixup, noise) is not included; the spiking neurons use spikingjelly's LIF in plain JAX
(``jaxformers.layers.lmu.lif``) instead of its CuPy kernel; the convolutional embedding looks one frame
ahead (k3, padding 1) as in the official code, so streaming has a one-frame latency.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers import BatchNorm, logical
from jaxformers.layers.lmu import LMUCell, lif
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

Output = Literal["logits", "all_seq", "features"]


def _torch_uniform(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class _Parts(nn.Module):
    """Shared constructors (PyTorch-initialised convs, BatchNorm, LIF) for the LMUFormer modules."""

    spiking: bool = False
    tau: float = 2.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def conv(self, x, features, kernel, name, bias=True):
        init = _torch_uniform(x.shape[-1] * kernel)
        return nn.Conv(features, (kernel,), padding=kernel // 2, use_bias=bias, dtype=self.dtype,
                       param_dtype=self.param_dtype, kernel_init=logical(init, (None, "conv_in", "conv_out")),
                       bias_init=logical(init, ("conv_out",)), name=name)(x)

    def bn(self, x, name, train):
        return BatchNorm(train=train, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)

    def lif(self, x, v_threshold=1.0):
        return lif(x, tau=self.tau, v_threshold=v_threshold)


class ConvEmbedding(_Parts):
    """``Tokenizer`` (non-spiking) or ``Conv1d4EBMs`` (spiking): (B, L, C_in) -> (B, L, D)."""

    embed_dim: int = 256

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = self.embed_dim
        if not self.spiking:
            for i in range(4):
                x = self.bn(jax.nn.relu(self.conv(x, d, 3, f"conv_{i}", bias=False)), f"bn_{i}", train)
            return x + self.conv(x, d, 3, "rpe_conv", bias=False)
        x = self.conv(x, d, 3, "proj_conv", bias=False)
        for i in range(1, 4):
            x = self.conv(self.lif(self.bn(x, f"proj_bn{'' if i == 1 else i - 1}", train)), d, 3, f"proj_conv{i}",
                          bias=False)
        rpe = self.conv(self.lif(self.bn(x, "proj_bn3", train)), d, 3, "rpe_conv", bias=False)
        return x + rpe


class LMUMixer(_Parts):
    """``LMU`` / ``SLMUMs``: the LMU cell over the sequence, then a 1x1 conv and BN."""

    memory_size: int = 256
    theta: float = 128.0
    seq_len: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, memory: str = "fft") -> jax.Array:
        if self.spiking:
            x = self.lif(self.bn(x, "prev_bn", train), v_threshold=0.5)
        h = LMUCell(x.shape[-1], self.memory_size, self.theta, self.seq_len, self.spiking, self.tau,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="lmu")(x, train=train, memory=memory)
        return self.bn(self.conv(h, x.shape[-1], 1, "proj_conv"), "proj_bn", train)


class ConvFFN(_Parts):
    """``ConvFFN`` (1x1 conv, BN, GELU, 1x1 conv, BN, ReLU) or ``ConvFFNMs`` (BN, LIF, conv, twice)."""

    hidden: int = 1024

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        if self.spiking:
            x = self.conv(self.lif(self.bn(x, "fc1_bn", train)), self.hidden, 1, "fc1_conv")
            return self.conv(self.lif(self.bn(x, "fc2_bn", train)), d, 1, "fc2_conv")
        x = jax.nn.gelu(self.bn(self.conv(x, self.hidden, 1, "fc1_conv"), "fc1_bn", train), approximate=False)
        return jax.nn.relu(self.bn(self.conv(x, d, 1, "fc2_conv"), "fc2_bn", train))


class LMUFormer(nn.Module):
    """LMUFormer (``spiking=False``, official ``lmu_rnn_conv1d``) or Spiking LMUFormer (``spiking=True``,
    ``slmu_rnn_ms_conv1d``). Input (B, L, C) frames, or (B, H, W, C) images read in raster order
    (permuted with ``pixel_permutation_seed``: psMNIST)."""

    num_classes: int = 35
    in_chans: int = 128
    embed_dim: int = 256
    depth: int = 1
    mlp_ratio: float = 4.0
    memory_size: int | None = None  # None: embed_dim (2 x embed_dim when spiking), as the official blocks
    theta: float = 128.0
    seq_len: int = 128
    spiking: bool = False
    tau: float = 2.0
    pixel_permutation_seed: int | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def example_inputs(self, batch_size: int = 1) -> tuple[jax.Array]:
        return (jnp.zeros((batch_size, self.seq_len, self.in_chans), jnp.float32),)

    def _as_sequence(self, x: jax.Array) -> jax.Array:
        if x.ndim == 4:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            if self.pixel_permutation_seed is not None:
                x = x[:, np.random.default_rng(self.pixel_permutation_seed).permutation(x.shape[1])]
        if x.ndim != 3 or x.shape[-1] != self.in_chans:
            raise ValueError(f"LMUFormer takes (batch, length, {self.in_chans}) sequences or (batch, H, W, "
                             f"{self.in_chans}) images; got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"LMUFormer takes float inputs; got {x.dtype}")
        return x

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits", memory: str = "fft"):
        if output not in ("logits", "all_seq", "features"):
            raise ValueError(f"output must be 'logits', 'all_seq' or 'features'; got {output!r}")
        x = self._as_sequence(x)
        kw = dict(spiking=self.spiking, tau=self.tau, dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.embed_dim
        memory_size = self.memory_size or (2 * d if self.spiking else d)
        x = ConvEmbedding(embed_dim=d, name="patch_embed", **kw)(x, train)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        for i in range(self.depth):
            x = x + LMUMixer(memory_size=memory_size, theta=self.theta, seq_len=self.seq_len, name=f"block_{i}_attn",
                             **kw)(x, train, memory)
            x = x + ConvFFN(hidden=int(d * self.mlp_ratio), name=f"block_{i}_mlp", **kw)(x, train)
        if self.spiking:
            x = lif(BatchNorm(train=train, dtype=self.dtype, param_dtype=self.param_dtype, name="head_bn")(x),
                    tau=self.tau)
        if output == "features":
            return x
        head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=logical(nn.initializers.truncated_normal(0.02), ("embed", "classes")),
                        bias_init=logical(nn.initializers.zeros_init(), ("classes",)), name="head")
        if output == "all_seq":
            steps = jnp.arange(1, x.shape[1] + 1, dtype=jnp.float32)[None, :, None]
            return head(jnp.cumsum(x.astype(jnp.float32), axis=1) / steps).astype(jnp.float32)
        return head(x).astype(jnp.float32).mean(axis=1)


# ---------------------------------------------------------------------------------------------
# Variants: Google Speech Commands V2, 35 classes (src/gsc.yml: dim 256, one block, 128 mel x 128 frames).
# Parameters counted from the official modules' shapes; top-1 from the README table.

_GSC = dict(num_classes=35, in_chans=128, embed_dim=256, depth=1, mlp_ratio=4.0, theta=128.0, seq_len=128)


def _info(params_m: float, top1: float) -> ModelInfo:
    return ModelInfo(paper="LMUFormer: Low Complexity Yet Powerful Spiking Model With Legendre Memory Units",
                     arxiv="2402.04882", repo="zeyuliu1037/LMUFormer", input_size=(128, 128), params_m=params_m,
                     top1=top1)


@register_model(_info(1.621796, 96.53))
def lmuformer_gsc(**overrides: Any) -> LMUFormer:
    """LMUFormer for Speech Commands V2 (35 classes): 128 frames x 128 mel bins."""
    return LMUFormer(**{**_GSC, **overrides})


@register_model(_info(1.689894, 96.12))
def spiking_lmuformer_gsc(**overrides: Any) -> LMUFormer:
    """Spiking LMUFormer for Speech Commands V2 (the official ``slmu_rnn_ms_conv1d``)."""
    return LMUFormer(**{**_GSC, "spiking": True, **overrides})
