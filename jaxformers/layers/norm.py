"""Normalisation layers with logical axis names on their parameters."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxformers.layers.linear import logical


def LayerNorm(
    epsilon: float = 1e-6,
    *,
    axis_name: str | None = "embed",
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str | None = None,
) -> nn.LayerNorm:
    """LayerNorm over the last axis. timm's ViT family uses eps 1e-6, BERT 1e-12, torch's default 1e-5."""
    return nn.LayerNorm(
        epsilon=epsilon,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nn.initializers.ones_init(), (axis_name,)),
        bias_init=logical(nn.initializers.zeros_init(), (axis_name,)),
        name=name,
    )


def RMSNorm(epsilon: float = 1e-6, *, axis_name: str | None = "embed", dtype: Any = None,
            param_dtype: Any = jnp.float32, name: str | None = None) -> nn.RMSNorm:
    """RMSNorm over the last axis."""
    return nn.RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                      scale_init=logical(nn.initializers.ones_init(), (axis_name,)), name=name)


def BatchNorm(
    *,
    train: bool,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    axis_name: str | None = "conv_out",
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    scale_init=nn.initializers.ones_init(),
    name: str | None = None,
) -> nn.BatchNorm:
    """BatchNorm over NHWC channels; statistics live in the ``batch_stats`` collection.

    ``momentum`` is Flax's (weight of the old statistic): PyTorch's momentum 0.1 is Flax's 0.9.
    ``scale_init``: e.g. zeros for the last BN of a residual branch (timm's ``zero_init_last``).
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(scale_init, (axis_name,)),
        bias_init=logical(nn.initializers.zeros_init(), (axis_name,)),
        name=name,
    )
