"""Image to token stems: the linear patch embedding and a stack-of-convolutions stem."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers.checks import check_image
from jaxformers.layers.linear import Conv
from jaxformers.layers.norm import LayerNorm


def to_2tuple(x: int | Sequence[int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> linear projection (a strided conv, ViT's stem).

    Input NHWC (B, H, W, C); output (B, H/p * W/p, D) when ``flatten`` else (B, H/p, W/p, D).
    ``img_size`` (when set) is enforced, for models with a fixed position table.
    """

    embed_dim: int
    patch_size: int | Sequence[int] = 16
    in_chans: int = 3
    img_size: int | Sequence[int] | None = None
    flatten: bool = True
    use_norm: bool = False
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = to_2tuple(self.patch_size)
        check_image(x, in_chans=self.in_chans, img_size=self.img_size, divisible_by=p)
        x = Conv(self.embed_dim, p, strides=p, padding="VALID", use_bias=self.use_bias,
                 axes=(None, "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        if self.flatten:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.use_norm:
            x = LayerNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        return x


class ConvStem(nn.Module):
    """A stack of convolutions (e.g. CrossViT's dagger stem, BiFormer's stem), NHWC in and out.

    Layer i is Conv(``channels[i]``, ``kernel_sizes[i]``, ``strides[i]``, ``paddings[i]``), followed
    by BatchNorm when ``batch_norm`` and by ``activation`` except after the last layer (unless
    ``final_activation``). Param names: ``conv{i}`` and ``bn{i}``.
    """

    channels: Sequence[int]
    kernel_sizes: Sequence[int]
    strides: Sequence[int]
    paddings: Sequence[int]
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    batch_norm: bool = False
    final_activation: bool = False
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        from jaxformers.layers.norm import BatchNorm

        n = len(self.channels)
        for i, (c, k, s, p) in enumerate(zip(self.channels, self.kernel_sizes, self.strides, self.paddings)):
            x = Conv(c, (k, k), strides=s, padding=p, use_bias=self.use_bias, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=f"conv{i}")(x)
            if self.batch_norm:
                x = BatchNorm(train=train, dtype=self.dtype, param_dtype=self.param_dtype, name=f"bn{i}")(x)
            if i < n - 1 or self.final_activation:
                x = self.activation(x)
        return x
