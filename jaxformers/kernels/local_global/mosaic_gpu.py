"""Hopper (sm90) forward kernel of ``local_global_attention`` in Pallas Mosaic GPU.

The same block-sparse schedule as ``pallas_kernel.py`` (the Triton kernels), written for the
Hopper features that the Triton lowering cannot reach: TMA copies into swizzled shared memory,
warpgroup MMAs (``wgmma``) and warp specialisation.

- One CUDA block per (head, query tile of 2 x ``block_q`` rows, batch row); three warpgroups:
  two compute warpgroups own ``block_q`` query rows each, one memory warpgroup streams the
  listed K/V blocks through a ring of ``stages`` shared-memory slots. The query tile and the key
  blocks it visits come from ``blocks.index_table`` (built at the tile's granularity, so both
  compute warpgroups walk the same list: full blocks first, without an element mask, then the
  partial ones with the mask of ``mask.allowed`` and the segment ids read straight from global
  memory).
- Online softmax in base 2 with float32 accumulators; the base-2 logsumexp it saves is the one
  the Triton backward kernels consume, so ``pallas_kernel`` pairs this forward with them.
- Queries with no allowed key (padding) produce zeros and a +inf logsumexp, as in the Triton path.

Supported: bfloat16/float16 inputs, head dim (of q, k and v alike) a multiple of 64 up to 256.
``pallas_kernel`` sends anything else to the Triton kernel. The tests run this kernel in
Mosaic GPU interpret mode on CPU (which simulates shared memory, barriers, TMA and races) and
lower it for CUDA from a CPU host; it has not been compiled by ptxas nor timed on a GPU yet.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxformers.kernels.local_global.blocks import block_kinds, index_table
from jaxformers.kernels.local_global.mask import MaskSpec, allowed

LOG2_E = math.log2(math.e)
_COMPUTE_WARPGROUPS = 2


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Rows per compute warpgroup (the wgmma M, a multiple of 64), keys per block, ring depth."""

    block_q: int = 64
    block_k: int = 64
    stages: int = 2

    def __post_init__(self):
        if self.block_q % 64 or self.block_k % 64 or not 1 <= self.stages <= 4:
            raise ValueError(f"MosaicBlocks needs block_q and block_k multiples of 64 and 1..4 stages; got {self}")

    @property
    def tile_q(self) -> int:
        return _COMPUTE_WARPGROUPS * self.block_q


def supported(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether this kernel handles these inputs (else the Triton kernel does)."""
    dims = {q.shape[-1], k.shape[-1], v.shape[-1]}
    return (len(dims) == 1 and dims.pop() in (64, 128, 192, 256)
            and q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16))


def interpret_params(**options):
    """Mosaic GPU interpret mode (CPU simulation of shared memory, barriers, TMA and wgmma);
    ``options`` are ``InterpretGPUParams`` fields, e.g. ``detect_races=True``."""
    try:
        params = plgpu.InterpretGPUParams
    except AttributeError:  # jax < 0.11 keeps it private
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params(**options)


def _load(ref, layout):
    """A vector load from SMEM in ``layout`` (jax < 0.11 takes an index argument)."""
    if "idx" in inspect.signature(plgpu.load).parameters:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _layout_full(value, shape, layout):
    return plgpu.layout_cast(jnp.full(shape, value, jnp.float32), layout)


def forward(spec: MaskSpec, scale: float, q, k, v, q_seg, k_seg, *, blocks: MosaicBlocks = MosaicBlocks(),
            interpret=False):
    """(out, base-2 logsumexp (B, H, Lq)) for padded inputs.

    q (B, Lq, H, D) with Lq a multiple of ``blocks.tile_q``; k, v (B, Lk, Hkv, D) with Lk a
    multiple of ``blocks.block_k``; q_seg/k_seg (B or 1, L) int32 with 0 on padding positions.
    ``interpret``: False (compile for the GPU), True or ``interpret_params(...)`` (run on the CPU).
    """
    batch, q_len, heads, dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    bq, bk, stages = blocks.block_q, blocks.block_k, blocks.stages
    tile_q = blocks.tile_q
    if q_len % tile_q or k_len % bk:
        raise ValueError(f"padded lengths must be multiples of {tile_q} (q) and {bk} (k); got {q_len}, {k_len}")
    rep = heads // kv_heads
    any_, full, width, _ = block_kinds(spec, q_seg, k_seg, tile_q, bk)
    table, stride = index_table(any_, full, width)
    n_tiles = q_len // tile_q
    per_batch = q_seg.shape[0] > 1
    dtype = q.dtype
    c = float(scale) * LOG2_E
    mask_value = -0.7 * float(jnp.finfo(jnp.float32).max)
    acc_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)

    def kernel(table_ref, q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped):
        (q_smem2, k_smem, v_smem, lse_smem2, q_seg_smem2, k_seg_smem, p_smem), ready, (k_free, v_free) = scoped
        k_ready, v_ready, k_seg_ready, q_ready, q_seg_ready = ready
        head, tile, b = lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("batch")
        wg = lax.axis_index("wg")
        seg_row = b if per_batch else 0
        row = (seg_row * n_tiles + tile) * stride
        n_full = table_ref[row]
        n_visit = n_full + table_ref[row + 1]

        @pl.when(wg < _COMPUTE_WARPGROUPS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
            q_start = tile * tile_q + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_start, bq), head], q_smem, q_ready.at[wg])
            plgpu.copy_gmem_to_smem(q_seg_ref.at[seg_row, pl.ds(q_start, bq)], q_seg_smem2.at[wg],
                                    q_seg_ready.at[wg])
            plgpu.barrier_wait(q_seg_ready.at[wg])
            q_seg = _load(q_seg_smem2.at[wg], row_layout)
            plgpu.barrier_wait(q_ready.at[wg])

            def step(t, carry, masked: bool):
                m, l, acc = carry
                slot = lax.rem(t, stages)
                kb = table_ref[row + 2 + t]
                plgpu.barrier_wait(k_ready.at[slot])

                def qk_scope(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(qk_scope, plgpu.ACC((bq, bk), jnp.float32)) * c
                plgpu.barrier_wait(k_seg_ready.at[slot])  # every step, to keep the barrier phases in step
                if masked:
                    k_start = kb * bk
                    q_pos = q_start + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=acc_layout)
                    k_pos = k_start + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=acc_layout)
                    k_seg = _load(k_seg_smem.at[slot], col_layout)
                    same = (lax.broadcast_in_dim(q_seg, (bq, bk), [0]) == lax.broadcast_in_dim(k_seg, (bq, bk), [1]))
                    ok = allowed(spec, q_pos, k_pos) & same & (lax.broadcast_in_dim(k_seg, (bq, bk), [1]) != 0)
                    s = jnp.where(ok, s, mask_value)
                plgpu.barrier_arrive(k_free.at[slot])  # K and its segment ids of this slot are read
                m_new = jnp.maximum(m, s.max(axis=1))
                correction = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l = l * correction + p.sum(axis=1)
                plgpu.barrier_wait(v_ready.at[slot])

                if interpret:  # the interpreter's wgmma reads its A operand from a ref only
                    p_smem.at[wg][...] = p.astype(dtype)
                    plgpu.commit_smem()
                    p_operand = p_smem.at[wg]
                else:
                    p_operand = p.astype(dtype)

                def pv_scope(acc_ref):
                    plgpu.wgmma(acc_ref, p_operand, v_smem.at[slot])
                    return acc_ref[...]

                # A fresh accumulator plus a register add (instead of seeding the wgmma with ``acc``
                # through ``run_state``): the form that Mosaic GPU interpret mode can also run.
                pv = pl.run_scoped(pv_scope, plgpu.ACC((bq, dim), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                return m_new, l, acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + pv

            carry = (_layout_full(-jnp.inf, (bq,), row_layout), _layout_full(0.0, (bq,), row_layout),
                     _layout_full(0.0, (bq, dim), acc_layout))
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
            m, l, acc = lax.fori_loop(n_full, n_visit, functools.partial(step, masked=True), carry)
            empty = m < 0.5 * mask_value  # no allowed key in the whole row (padding query)
            safe_l = jnp.where(empty, 1.0, l)
            out = acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])
            out = jnp.where(lax.broadcast_in_dim(empty, acc.shape, [0]), 0.0, out)
            q_smem[...] = out.astype(dtype)  # the query tile's buffer holds the output tile
            lse_smem[...] = jnp.where(empty, jnp.inf, m + jnp.log2(safe_l))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(q_start, bq), head])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, head, pl.ds(q_start, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WARPGROUPS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, jnp.int32(rep))

            @pl.loop(0, n_visit)
            def _fetch(t):
                slot = lax.rem(t, stages)
                k_start = table_ref[row + 2 + t] * bk
                src = (b, pl.ds(k_start, bk), kv_head)

                @pl.when(t >= stages)  # the slot's previous block must be consumed by both warpgroups
                def _():
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])

                plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(k_seg_ref.at[seg_row, pl.ds(k_start, bk)], k_seg_smem.at[slot],
                                        k_seg_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_ready.at[slot])

    def entry(table_ref, q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        swizzle = 128
        transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                      plgpu.SwizzleTransform(swizzle))
        smem = (plgpu.SMEM((_COMPUTE_WARPGROUPS, bq, dim), dtype, transforms=transforms),
                plgpu.SMEM((stages, bk, dim), dtype, transforms=transforms),
                plgpu.SMEM((stages, bk, dim), dtype, transforms=transforms),
                plgpu.SMEM((_COMPUTE_WARPGROUPS, bq), jnp.float32),
                plgpu.SMEM((_COMPUTE_WARPGROUPS, bq), jnp.int32),
                plgpu.SMEM((stages, bk), jnp.int32),
                plgpu.SMEM((_COMPUTE_WARPGROUPS, bq, bk), dtype, transforms=transforms) if interpret else None)
        ready = (plgpu.Barrier(num_barriers=stages),) * 3 + (plgpu.Barrier(num_barriers=_COMPUTE_WARPGROUPS),) * 2
        free = (plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS, num_barriers=stages),) * 2
        pl.run_scoped(lambda *scoped: kernel(table_ref, q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, o_ref,
                                             lse_ref, scoped),
                      smem, ready, free, collective_axes="wg")

    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32))
    call = plgpu.kernel(
        entry, out_type=out_type, grid=(heads, n_tiles, batch), grid_names=("heads", "tiles", "batch"),
        num_threads=_COMPUTE_WARPGROUPS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret is True else (interpret or None))
    return call(table, q_seg, k_seg, q, k, v)
