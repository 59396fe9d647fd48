"""Hopper (Mosaic GPU) path of bi-level routing attention: the routed regions become the visited
blocks of the local/global Mosaic GPU kernels (``jaxformers.kernels.local_global.mosaic_gpu``).

When a region holds a multiple of 64 tokens (BiFormer's 8x8 regions: stage 1 at 224², and the
128² map with S = 16), a region is a whole number of 64-row wgmma blocks. The maps go
region-major once (q, k, v: (B, S²·T, heads, d), as the reference's ``to_regions`` lays them
out), the routing becomes a visit table (each query block walks the blocks of its ``topk`` routed
regions; each key block, in the backward, the query blocks whose regions chose it: inverse
routing), and the shared pipeline runs with one compute warpgroup per 64 query rows (two
consecutive blocks may belong to different regions, hence different lists). Every visited pair
is allowed, so no element mask is ever computed; nothing is gathered, K/V blocks are streamed by
TMA from their place in the region-major maps.

Compared with the Triton path (``pallas_kernel.py``), which reads the NHWC maps in place, this
one pays for the region-major copies of q, k, v and the output; it wins where wgmma does. Both
have to be timed on a Hopper GPU (``benchmarks/kernels.py --only bra``), which has not happened
yet: the tests run it in Mosaic GPU interpret mode on CPU and lower it for CUDA.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxformers.kernels.bi_level_routing.reference import from_regions, route_regions, to_regions
from jaxformers.kernels.local_global import mosaic_gpu as lg
from jaxformers.kernels.local_global.mask import MaskSpec

_BLOCKS = lg.MosaicBlocks(block=64, warpgroups=1)


def supported(q: jax.Array, k: jax.Array, v: jax.Array, *, num_heads: int, regions_per_side: int) -> bool:
    """bf16/f16, one head dim of 32, 64 or 128 for q/k and v, and regions of a multiple of 64 tokens."""
    _, height, width, channels = q.shape
    tokens = (height // regions_per_side) * (width // regions_per_side)
    heads_view = jax.ShapeDtypeStruct((1, 1, num_heads, channels // num_heads), q.dtype)
    v_view = jax.ShapeDtypeStruct((1, 1, num_heads, v.shape[-1] // num_heads), v.dtype)
    return tokens % 64 == 0 and k.dtype == q.dtype and lg.supported(heads_view, heads_view, v_view)


def _visit_tables(index: jax.Array, blocks_per_region: int):
    """Visit tables (``local_global.mosaic_gpu.visit_tables``) of a (B, R, topk) routing."""
    batch, regions, topk = index.shape
    routed = jnp.zeros((batch, regions, regions), bool).at[
        jnp.arange(batch)[:, None, None], jnp.arange(regions)[None, :, None], index].set(True)
    per_block = routed.repeat(blocks_per_region, axis=1).repeat(blocks_per_region, axis=2)  # (B, R·m, R·m)
    return lg.visit_tables(per_block, per_block, topk * blocks_per_region, regions * blocks_per_region)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attend(scale, interpret, strides, q, k, v, q_table, k_table):
    return _forward(scale, interpret, strides, q, k, v, q_table)[0]


def _forward(scale, interpret, strides, q, k, v, q_table):
    ones = jnp.ones((1, q.shape[1]), jnp.int32)
    return lg.forward(MaskSpec(), scale, q, k, v, ones, ones, blocks=_BLOCKS, interpret=interpret,
                      table=(q_table, strides[0], True))


def _attend_fwd(scale, interpret, strides, q, k, v, q_table, k_table):
    out, lse = _forward(scale, interpret, strides, q, k, v, q_table)
    return out, (q, k, v, out, lse, q_table, k_table)


def _attend_bwd(scale, interpret, strides, residuals, d_out):
    q, k, v, out, lse, q_table, k_table = residuals
    ones = jnp.ones((1, q.shape[1]), jnp.int32)
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
    dq, dk, dv = lg.backward(MaskSpec(), MaskSpec(), scale, q, k, v, ones, ones, lse, delta, d_out.astype(q.dtype),
                             blocks=_BLOCKS, interpret=interpret,
                             tables=((q_table, strides[0], True), (k_table, strides[1], True)))
    return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def bi_level_routing_attention_mosaic(q, k, v, *, num_heads: int, regions_per_side: int, topk: int, scale: float,
                                      interpret=False) -> jax.Array:
    """BRA on validated NHWC inputs that :func:`supported` accepts; differentiable in q, k, v."""
    batch, height, width, _ = q.shape
    s = regions_per_side
    tokens = (height // s) * (width // s)
    index = route_regions(q, k, s, topk, scale)
    (q_table, q_stride, _), (k_table, k_stride, _) = _visit_tables(index, tokens // _BLOCKS.block)

    def tokens_layout(x):  # (B, H, W, C) -> (B, S²·T, heads, d), regions row-major
        return to_regions(x, s).reshape(batch, s * s * tokens, num_heads, x.shape[-1] // num_heads)

    out = _attend(float(scale), interpret, (q_stride, k_stride), *(tokens_layout(x) for x in (q, k, v)),
                  q_table, k_table)
    return from_regions(out.reshape(batch, s * s, tokens, v.shape[-1]), s, height, width)
