"""Public entry point of bi-level routing attention (BiFormer's BRA, arXiv 2303.08810).

``bi_level_routing_attention(q, k, v, num_heads=..., regions_per_side=S, topk=k)`` cuts the (H, W)
map into S x S regions, routes every query region to the ``topk`` key regions with the largest
region-mean affinity (shared by all heads, no gradient through the routing), and lets each query
token attend to all tokens of its routed regions. See ``reference.py`` for the exact algorithm.

Implementations:

- ``"xla"``: the reference (gather of the routed regions' K/V + dense attention), runs everywhere.
- ``"pallas"``: the fused kernel (``pallas_kernel.py``): online softmax over the routed regions,
  K/V read in place by region index (no gathered copies), backward kernels through a custom VJP
  (dQ by the same routing, dK/dV by inverse routing). On a Hopper GPU, bf16/f16 maps whose regions
  hold a multiple of 64 tokens, or 1..32 tokens dividing 64 (per-token routing bit masks), take the
  Mosaic GPU kernels instead (``mosaic_gpu.py``: TMA, wgmma).
  On CPU it runs in interpret mode (slow; tests).
  Under an active mesh (``jaxformers.sharding.activate`` or ``jax.set_mesh``) the kernels run per
  device in ``shard_map``: each device its batch shard (data x fsdp) and its heads (tensor), where
  those divide, routed by the routing of all heads; XLA cannot partition a kernel call itself (on a
  TPU it would not compile).
- ``"auto"``: Pallas on GPU/TPU, the reference elsewhere (and on TPU for maps whose per-image
  resident blocks would not fit VMEM, see ``pallas_kernel.tpu_vmem_bytes``; on a GPU, for calls the
  Mosaic GPU kernels do not take, where the Triton ones cannot run: a jax without the deprecated
  Pallas Triton backend, a GPU older than Ampere (T4, V100), regions too large for the GPU's shared
  memory, see ``pallas_kernel.triton_fits`` and ``jaxformers.kernels.gpu_kernel``).

Also exported for models, benchmarks and notebooks: :func:`route_regions` (the routing indices),
:func:`to_regions` / :func:`from_regions` (layout helpers), :func:`attention_cost` (FLOPs and
least bytes), :data:`BIFORMER_STAGE_SHAPES` (the benchmark shapes of ``benchmarks/ANCHORS.md``) and
:func:`make_inputs` (random q, k, v for one of them).
"""
from __future__ import annotations

import functools
import operator
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.kernels.bi_level_routing.reference import (
    bi_level_routing_attention_reference,
    from_regions,
    to_regions,
)
from jaxformers.kernels.bi_level_routing.reference import route_regions as _route_regions
from jaxformers.kernels.gpu_kernel import gpu_kernel_choice, triton_unsupported
from jaxformers.sharding import shard_kernel

__all__ = [
    "bi_level_routing_attention",
    "route_regions",
    "resolve_topk",
    "resolve_scale",
    "to_regions",
    "from_regions",
    "attention_cost",
    "make_inputs",
    "BraShape",
    "BIFORMER_STAGE_SHAPES",
]

Implementation = Literal["auto", "pallas", "xla"]
IMPLEMENTATIONS = ("auto", "pallas", "xla")


class BraShape(NamedTuple):
    """One benchmark shape: (batch, height, width, channels, num_heads, regions_per_side, topk)."""

    batch: int
    height: int
    width: int
    channels: int
    num_heads: int
    regions_per_side: int
    topk: int


# The four BiFormer shapes of benchmarks/ANCHORS.md (head dim 32, q/k/v all `channels` wide).
BIFORMER_STAGE_SHAPES: tuple[BraShape, ...] = (
    BraShape(128, 56, 56, 64, 2, 7, 1),
    BraShape(128, 28, 28, 128, 4, 7, 4),
    BraShape(128, 14, 14, 256, 8, 7, 16),
    BraShape(16, 128, 128, 64, 2, 16, 4),
)


def make_inputs(shape: BraShape, dtype=jnp.bfloat16, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random (q, k, v) maps of one benchmark shape (q, k and v all ``shape.channels`` wide)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    dims = (shape.batch, shape.height, shape.width, shape.channels)
    q, k, v = (jax.random.normal(key, dims, jnp.float32).astype(dtype) for key in keys)
    return q, k, v


def resolve_topk(topk: int, regions_per_side: int) -> int:
    """``topk`` as a count in 1..S*S (``-1`` means all regions); raises ValueError otherwise."""
    num_regions = regions_per_side * regions_per_side
    try:
        if isinstance(topk, bool):
            raise TypeError
        topk = operator.index(topk)
    except TypeError:
        raise TypeError(f"topk must be an int (1..{num_regions}, or -1 for all regions); got {topk!r}") from None
    if topk == -1:
        return num_regions
    if not 1 <= topk <= num_regions:
        raise ValueError(f"topk must be in 1..{num_regions} (regions_per_side={regions_per_side} gives "
                         f"{num_regions} regions) or -1 for all regions; got topk={topk}")
    return topk


def resolve_scale(scale: float | None, qk_channels: int, num_heads: int, upstream_compatible: bool) -> float:
    """The logit scale: ``scale`` if given; else ``qk_channels ** -0.5`` in upstream mode (the
    official code scales by the FULL qk dim), else ``head_dim ** -0.5``."""
    if scale is not None:
        return float(scale)
    return float(qk_channels if upstream_compatible else qk_channels // num_heads) ** -0.5


def _check_inputs(q, k, v, num_heads: int, regions_per_side: int) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 4:
            raise ValueError(f"{name} must be a (batch, height, width, channels) map; got shape {shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point (float32/bfloat16/float16); got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (batch, height, width, qk_channels); got "
                         f"q {q.shape} and k {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must share (batch, height, width) with q and k; got v {v.shape} and q {q.shape}")
    for name, value in (("num_heads", num_heads), ("regions_per_side", regions_per_side)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    for name, c in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
        if c % num_heads:
            raise ValueError(f"{name} channels ({c}) must be divisible by num_heads ({num_heads})")
    _, height, width, _ = q.shape
    if height % regions_per_side or width % regions_per_side:
        raise ValueError(f"height and width ({height}x{width}) must be divisible by regions_per_side "
                         f"({regions_per_side}); pad the map first (BiFormer asserts the same)")


def route_regions(
    q: jax.Array,
    k: jax.Array,
    regions_per_side: int,
    topk: int,
    *,
    scale: float = 1.0,
) -> jax.Array:
    """(B, S*S, topk) int32: for each query region (row-major), the key regions it attends to.

    Exactly the routing :func:`bi_level_routing_attention` uses (region means of q and k, affinity,
    top-k; no gradient). ``topk=-1`` or ``S*S`` returns every region in order.
    """
    if k.shape != q.shape or q.ndim != 4:
        raise ValueError(f"q and k must be equal (batch, height, width, channels) maps; got {q.shape}, {k.shape}")
    if q.shape[1] % regions_per_side or q.shape[2] % regions_per_side:
        raise ValueError(f"height and width ({q.shape[1]}x{q.shape[2]}) must be divisible by "
                         f"regions_per_side ({regions_per_side})")
    return _route_regions(q, k, regions_per_side, resolve_topk(topk, regions_per_side), scale)


def attention_cost(
    batch: int, height: int, width: int, qk_channels: int, v_channels: int, regions_per_side: int,
    topk: int, itemsize: int = 2,
) -> dict[str, float]:
    """FLOPs (2 per multiply-add, QK^T and PV) and least bytes (q, k, v read once, out written once)."""
    topk = resolve_topk(topk, regions_per_side)
    tokens = height * width
    keys_per_query = topk * tokens // (regions_per_side * regions_per_side)
    flops = 2.0 * batch * tokens * keys_per_query * (qk_channels + v_channels)
    least_bytes = float(batch * tokens * (2 * qk_channels + 2 * v_channels) * itemsize)
    return {"flops": flops, "bytes": least_bytes}


def _auto_implementation(q, k, v, num_heads: int, regions_per_side: int, topk: int, gpu_kernel: str) -> str:
    """Pallas on GPU where the Mosaic GPU kernels take the call or the Triton ones can run it (this jax
    and GPU have Triton; the tiles fit the GPU's shared memory), and on TPU when one image's resident
    blocks fit VMEM; the reference elsewhere."""
    backend = jax.default_backend()
    if backend == "gpu":
        from jaxformers.kernels.bi_level_routing.pallas_kernel import triton_fits, uses_mosaic_gpu

        if uses_mosaic_gpu(gpu_kernel, q, k, v, num_heads, regions_per_side, None):
            return "pallas"
        ok = triton_unsupported() is None and triton_fits(q, k, v, num_heads=num_heads,
                                                           regions_per_side=regions_per_side, topk=topk)
        return "pallas" if ok else "xla"
    if backend == "tpu":
        from jaxformers.kernels.bi_level_routing.pallas_kernel import tpu_fits

        fits = tpu_fits(q.shape, v.shape, q.dtype, num_heads=num_heads, regions_per_side=regions_per_side,
                        topk=topk)
        return "pallas" if fits else "xla"
    return "xla"


def bi_level_routing_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    num_heads: int,
    regions_per_side: int,
    topk: int,
    scale: float | None = None,
    upstream_compatible: bool = False,
    implementation: Implementation = "auto",
    gpu_kernel: str | None = None,
) -> jax.Array:
    """Bi-level routing attention on NHWC maps: (B, H, W, C_qk) x2, (B, H, W, C_v) -> (B, H, W, C_v).

    Args:
      q, k: queries and keys, ``C_qk`` channels (``num_heads`` heads of ``C_qk / num_heads``).
      v: values, ``C_v`` channels (may differ from ``C_qk``, as in BiFormer).
      num_heads: heads; the routing is shared by all of them.
      regions_per_side: S (the official ``n_win``); H and W must be divisible by it.
      topk: routed regions per query region, 1..S*S; ``-1`` (or S*S) is full attention.
      scale: logit scale; default ``head_dim ** -0.5``, or ``C_qk ** -0.5`` when
        ``upstream_compatible`` (the official code's scale, needed for checkpoint parity).
      implementation: ``"auto"`` | ``"pallas"`` | ``"xla"`` (see the module docstring).
      gpu_kernel: which Pallas kernels run on a GPU: ``"auto"`` (the Hopper/Mosaic GPU kernels on an
        H100/H200 when the inputs suit them, else Triton), ``"triton"`` or ``"mosaic"``; None (default)
        takes ``$JAXFORMERS_GPU_KERNEL``, else ``"auto"`` (see ``jaxformers.kernels.gpu_kernel``).

    float32 inputs: the kernels' dots follow jax's default matmul precision, as the reference's do:
    on an NVIDIA GPU TF32 tensor cores, unless ``jax.default_matmul_precision("float32")`` (or
    ``"highest"``) asks for exact float32, which the GPU computes on CUDA cores, several times slower.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
    _check_inputs(q, k, v, num_heads, regions_per_side)
    gpu_kernel = gpu_kernel_choice(gpu_kernel)
    num_heads, regions_per_side = int(num_heads), int(regions_per_side)
    topk = resolve_topk(topk, regions_per_side)
    scale = resolve_scale(scale, q.shape[-1], num_heads, upstream_compatible)
    if implementation == "auto":
        implementation = _auto_implementation(q, k, v, num_heads, regions_per_side, topk, gpu_kernel)
    if implementation == "xla":
        return bi_level_routing_attention_reference(
            q, k, v, num_heads=num_heads, regions_per_side=regions_per_side, topk=topk, scale=scale
        )
    return _pallas(q, k, v, num_heads=num_heads, regions_per_side=regions_per_side, topk=topk, scale=scale,
                   gpu_kernel=gpu_kernel)


@functools.partial(jax.jit, static_argnames=("num_heads", "regions_per_side", "topk", "scale", "gpu_kernel"))
def _pallas(q, k, v, *, num_heads, regions_per_side, topk, scale, gpu_kernel):
    """The Pallas path under one jit: a model's same-shaped blocks share one trace and one lowering of
    their kernels (BiFormer-T's train step lowers 12 Pallas kernels instead of 42), and an eager call
    runs as one program. The routing sees every head (under a mesh XLA sums the region affinities
    over the devices holding the heads); the kernels run per batch shard and head shard."""
    from jaxformers.kernels.bi_level_routing.pallas_kernel import bi_level_routing_attention_pallas

    index = _route_regions(q, k, regions_per_side, topk, scale)
    head_dim = q.shape[-1] // num_heads

    def kernel(q, k, v, index):  # one device's examples and heads (channels of whole heads)
        return bi_level_routing_attention_pallas(q, k, v, num_heads=q.shape[-1] // head_dim,
                                                 regions_per_side=regions_per_side, topk=topk, scale=scale,
                                                 gpu_kernel=gpu_kernel, index=index)

    maps = ("batch", None, None, "heads")
    return shard_kernel(kernel, (maps, maps, maps, ("batch",)), maps, units={"heads": num_heads})(q, k, v, index)
