"""Dense and convolution layers whose parameters carry logical axis names.

Every parameter of jaxformers is born with names from ``jaxformers.sharding`` (``embed``, ``mlp``,
``heads``, ``kv``, ``vocab``, ``conv_in``, ``conv_out``...), so the mesh rules decide where it lives.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from jaxformers.sharding import shard_kernel

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
    """NHWC ``nn.Conv`` with kernel axes (None, None, in, out); ``padding`` int means symmetric.
    Grouped (e.g. depthwise) convolutions go through :func:`grouped_conv_general_dilated`."""
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
        conv_general_dilated=grouped_conv_general_dilated if feature_group_count > 1 else None,
        kernel_init=logical(kernel_init, spatial + tuple(axes)),
        bias_init=logical(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


def grouped_conv_general_dilated(lhs, rhs, window_strides, padding, *, dimension_numbers=None, **kwargs):
    """``lax.conv_general_dilated`` for grouped convolutions that trains right under a device mesh.

    XLA's SPMD partitioner gets the kernel gradient of a grouped convolution wrong when the input is
    split over some mesh axes and replicated over others: it also sums over the replicas (a depthwise
    kernel's gradient came out 2x too large on a data x fsdp x tensor mesh with the batch over data x
    fsdp, 4x with the batch over data of data x tensor; jax 0.10.2 and 0.12, on CPU, and the
    partitioning is the same for every backend). Under an active mesh the convolution therefore runs
    per batch shard in ``shard_map`` (``jaxformers.sharding.shard_kernel``), replicated over the other
    axes (a grouped convolution is cheap; splitting its groups over tensor would leave the output
    split by channels, a layout the rest of a model does not expect); no mesh: plain
    ``lax.conv_general_dilated``."""
    conv = functools.partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                             dimension_numbers=dimension_numbers, **kwargs)
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    batch = lambda ndim, dim: tuple("batch" if d == dim else None for d in range(ndim))  # noqa: E731
    return shard_kernel(conv, (batch(lhs.ndim, dims.lhs_spec[0]), (None,) * rhs.ndim),
                        batch(lhs.ndim, dims.out_spec[0]))(lhs, rhs)
