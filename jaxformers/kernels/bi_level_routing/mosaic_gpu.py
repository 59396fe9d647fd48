"""Hopper (Mosaic GPU) path of bi-level routing attention: the routed regions become the visited
blocks of the local/global Mosaic GPU kernels (``jaxformers.kernels.local_global.mosaic_gpu``).

The maps go region-major once (q, k, v: (B, S²·T, heads, d), T tokens per region, as the
reference's ``to_regions`` lays them out, padded to whole 64-row blocks) and the routing becomes
visit tables of 64-token blocks: each query block walks the key blocks its regions routed to,
each key block, in the backward, the query blocks whose regions chose it (inverse routing). The
shared pipeline runs with one compute warpgroup per 64 query rows (neighbouring blocks route
differently, hence different lists). Nothing is gathered: K/V blocks are streamed by TMA from
their place in the region-major maps. Unlike the Triton and TPU kernels (all heads of a region in
one program): here a CUDA block serves one head, since
each head's tiles are separate wgmma operands anyway; the grid (heads x blocks x batch, e.g.
8 x 4 x 128 at stage 3) stays wide, and the routing table is read once per block.

- Regions of a multiple of 64 tokens (BiFormer's 8x8 regions: stage 1 at 224², the 128² map
  with S = 16): a block lies in one region, every visited pair is allowed, so no element mask is
  ever computed.
- Smaller regions of 1..32 tokens (powers of two: the 4x4 and 2x2 regions of stages 2 and 3, 1x1
  regions of a last stage that routes), stacked: a 64-row block holds
  64/T whole regions, a query block visits the union of the key blocks its regions routed to, and
  a per-row routing bit mask
  (``local_global.mosaic_gpu.Route``: for each query token, one bit per key region, and the
  transpose for the dK/dV kernel) masks the pairs of other regions inside a visited block. That
  spends wgmma work on masked pairs (a query block of stage 3 sees the whole 14x14 map of 196
  tokens = 4 blocks, 16 of 49 regions routed) in exchange for full-size tensor-core tiles and
  one schedule for every region size; blocks where every pair is routed skip the mask.
- Regions of a size that neither divides nor is a multiple of 64 (3x3 tokens, ...) stay on the
  Triton kernels (``pallas_kernel.py``), as do float32 inputs.

Compared with the Triton path, which reads the NHWC maps in place, this one pays for the
region-major copies of q, k, v and the output. By arithmetic (not measured), BiFormer's BRA is
memory-bound on an H100: at stage 1 (B=128, 56², 64 channels, bf16) the FLOPs take ~16 us at
400 TFLOP/s while one pass over a map (51 MB) takes ~20 us at 2.5 TB/s. The kernel itself moves
about 4 map passes (q, k, v, out) plus the routing's 2 (region means of q and k); the copies add
8 (read and write of q, k, v and out), so this path may run near 2x the Triton path's time unless
the Triton kernels are far from bandwidth. ``"auto"`` still picks this path on Hopper (the Triton
lowering is deprecated upstream); ``benchmarks/kernels.py --only bra`` times both
side by side, which has not happened yet (the tests run this path in Mosaic GPU interpret mode on
CPU and lower it for CUDA). Reading NHWC in place by TMA would need a region row per copy of at
least 8 tokens (the 8-row swizzle tile): possible for 8x8 regions, not for 4x4 or 2x2.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxformers.kernels.bi_level_routing.reference import from_regions, route_regions, to_regions
from jaxformers.kernels.local_global import mosaic_gpu as lg
from jaxformers.kernels.local_global.mask import MaskSpec

_BLOCKS = lg.MosaicBlocks(block=64, warpgroups=1)


def _tokens_per_region(height: int, width: int, regions_per_side: int) -> int:
    return (height // regions_per_side) * (width // regions_per_side)


def region_sizes_supported(tokens: int) -> bool:
    """Regions of a multiple of 64 tokens, or of 1..32 tokens that divide 64."""
    return tokens % 64 == 0 or 64 % tokens == 0


def supported(q: jax.Array, k: jax.Array, v: jax.Array, *, num_heads: int, regions_per_side: int) -> bool:
    """bf16/f16, one head dim of 32, 64 or 128 for q/k and v, and a region size that
    :func:`region_sizes_supported` accepts."""
    _, height, width, channels = q.shape
    heads_view = jax.ShapeDtypeStruct((1, 1, num_heads, channels // num_heads), q.dtype)
    v_view = jax.ShapeDtypeStruct((1, 1, num_heads, v.shape[-1] // num_heads), v.dtype)
    return (region_sizes_supported(_tokens_per_region(height, width, regions_per_side)) and k.dtype == q.dtype
            and lg.supported(heads_view, heads_view, v_view))


def _routed(index: jax.Array, regions: int) -> jax.Array:
    """(B, R, R) bool: query region r routed to key region c."""
    batch = index.shape[0]
    return jnp.zeros((batch, regions, regions), bool).at[
        jnp.arange(batch)[:, None, None], jnp.arange(regions)[None, :, None], index].set(True)


def _visit_tables(routed: jax.Array, tokens: int, topk: int, num_blocks: int):
    """Visit tables (``local_global.mosaic_gpu.visit_tables``) of 64-token blocks over a (B, R, R)
    routing of regions of ``tokens`` tokens, region-major and padded to ``num_blocks`` blocks."""
    block = _BLOCKS.block
    if tokens % block == 0:  # a block lies in one region: visited pairs are all allowed
        per_region = tokens // block
        per_block = routed.repeat(per_region, axis=1).repeat(per_region, axis=2)
        return lg.visit_tables(per_block, per_block, topk * per_region, num_blocks)
    group = block // tokens  # whole regions per block; padding regions route nowhere
    pad = num_blocks * group - routed.shape[1]
    pairs = jnp.pad(routed, ((0, 0), (0, pad), (0, pad))).reshape(-1, num_blocks, group, num_blocks, group)
    any_, full_ = pairs.any(axis=(2, 4)), pairs.all(axis=(2, 4))
    return lg.visit_tables(any_, full_, min(num_blocks, topk * group), num_blocks)


def _route_words(routed: jax.Array, tokens: int, length: int) -> lg.Route:
    """The per-token routing bit masks of regions of ``tokens`` (< 64) tokens (``lg.Route``)."""
    batch, regions, _ = routed.shape
    words = -(-(length // tokens) // 32)  # every block's words exist (2 per block for 1-token regions)
    weights = jnp.left_shift(jnp.uint32(1), jnp.arange(32, dtype=jnp.uint32))

    def pack(rows):  # (B, R, R) bool -> (B, W, R·T padded to length) int32 bit words over the last axis
        bits = jnp.pad(rows, ((0, 0), (0, 0), (0, words * 32 - regions))).reshape(batch, regions, words, 32)
        packed = jnp.sum(bits.astype(jnp.uint32) * weights, axis=-1, dtype=jnp.uint32)  # (B, R, W)
        per_token = jnp.repeat(packed, tokens, axis=1)
        per_token = jnp.pad(per_token, ((0, 0), (0, length - regions * tokens), (0, 0)))
        return lax.bitcast_convert_type(per_token, jnp.int32).transpose(0, 2, 1)

    return lg.Route(pack(routed), pack(jnp.swapaxes(routed, 1, 2)), tokens.bit_length() - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _attend(scale, interpret, strides, shift, q, k, v, q_table, k_table, words):
    return _forward(scale, interpret, strides, shift, q, k, v, q_table, words)[0]


def _route(shift, words):
    """The routing bit masks (``shift``: log2 tokens per region; None for whole-block regions)."""
    return None if shift is None else lg.Route(*words, shift)


def _forward(scale, interpret, strides, shift, q, k, v, q_table, words):
    ones = jnp.ones((1, q.shape[1]), jnp.int32)
    return lg.forward(MaskSpec(), scale, q, k, v, ones, ones, blocks=_BLOCKS, interpret=interpret,
                      table=(q_table, strides[0], True), route=_route(shift, words))


def _attend_fwd(scale, interpret, strides, shift, q, k, v, q_table, k_table, words):
    out, lse = _forward(scale, interpret, strides, shift, q, k, v, q_table, words)
    return out, (q, k, v, out, lse, q_table, k_table, words)


def _attend_bwd(scale, interpret, strides, shift, residuals, d_out):
    q, k, v, out, lse, q_table, k_table, words = residuals
    ones = jnp.ones((1, q.shape[1]), jnp.int32)
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
    dq, dk, dv = lg.backward(MaskSpec(), MaskSpec(), scale, q, k, v, ones, ones, lse, delta, d_out.astype(q.dtype),
                             blocks=_BLOCKS, interpret=interpret,
                             tables=((q_table, strides[0], True), (k_table, strides[1], True)),
                             route=_route(shift, words))
    return dq, dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def bi_level_routing_attention_mosaic(q, k, v, *, num_heads: int, regions_per_side: int, topk: int, scale: float,
                                      interpret=False, index: jax.Array | None = None) -> jax.Array:
    """BRA on validated NHWC inputs that :func:`supported` accepts; differentiable in q, k, v.
    ``index``: the routing when the caller computed it (over more heads); default: from q, k."""
    batch, height, width, _ = q.shape
    s = regions_per_side
    tokens = _tokens_per_region(height, width, s)
    regions = s * s
    length = -(-regions * tokens // _BLOCKS.block) * _BLOCKS.block
    routed = _routed(route_regions(q, k, s, topk, scale) if index is None else index, regions)
    (q_table, q_stride, _), (k_table, k_stride, _) = _visit_tables(routed, tokens, topk, length // _BLOCKS.block)
    shift, words = None, None
    if tokens % _BLOCKS.block:  # regions smaller than a block: partial blocks need the routing bits
        route = _route_words(routed, tokens, length)
        shift, words = route.shift, (route.q_words, route.k_words)

    def tokens_layout(x):  # (B, H, W, C) -> (B, S²·T padded, heads, d), regions row-major
        x = to_regions(x, s).reshape(batch, regions * tokens, num_heads, x.shape[-1] // num_heads)
        return jnp.pad(x, ((0, 0), (0, length - regions * tokens), (0, 0), (0, 0)))

    out = _attend(float(scale), interpret, (q_stride, k_stride), shift, *(tokens_layout(x) for x in (q, k, v)), q_table,
                  k_table, words)
    out = out[:, :regions * tokens].reshape(batch, regions, tokens, v.shape[-1])
    return from_regions(out, s, height, width)
