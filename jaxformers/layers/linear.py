"""Dense and convolution layers whose parameters carry logical axis names.

Every parameter of jaxformers is born with names from ``jaxformers.sharding`` (``embed``, ``mlp``,
``heads``, ``kv``, ``vocab``, ``conv_in``, ``conv_out``...), so the mesh rules decide where it lives.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

trunc_normal = nn.initializers.truncated_normal


def logical(init, names: Sequence[str | None]):
    """``init`` whose parameter carries the logical axis ``names``."""
    return nn.with_logical_partitioning(init, tuple(names))


def Dense(
    features: int,
    *,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
    use_bias: bool = True,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
    kernel_init=trunc_normal(0.02),
    bias_init=nn.initializers.zeros_init(),
    name: str | None = None,
) -> nn.Dense:
    """``nn.Dense`` with kernel axes ``axes`` = (input, output) and bias axis ``axes[1]``."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(kernel_init, axes),
        bias_init=logical(bias_init, axes[1:]),
        name=name,
    )


def Conv(
    features: int,
    kernel_size: Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Any = "SAME",
    feature_group_count: int = 1,
    use_bias: bool = True,
    axes: tuple[str | None, str | None] = ("conv_in", "conv_out"),
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
    kernel_init=nn.initializers.lecun_normal(),
    name: str | None = None,
) -> nn.Conv:
    """NHWC ``nn.Conv`` with kernel axes (None, None, in, out); ``padding`` int means symmetric."""
    if isinstance(padding, int):
        padding = [(padding, padding)] * len(kernel_size)
    spatial = (None,) * len(kernel_size)
    return nn.Conv(
        features,
        tuple(kernel_size),
        strides=strides,
        padding=padding,
        feature_group_count=feature_group_count,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(kernel_init, spatial + tuple(axes)),
        bias_init=logical(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )
