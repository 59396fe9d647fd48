"""The block-sparse, warp-specialised pipeline that the Hopper (Mosaic GPU) kernels share.

One CUDA block per (head, tile, batch row) runs ``warpgroups`` compute warpgroups (2, or 1 when
consecutive row blocks visit different lists) and one memory warpgroup. Each compute warpgroup
owns ``tile_rows`` rows of the tile (the wgmma M dimension) and keeps its *resident*
operands (e.g. the query rows) in shared memory; the memory warpgroup walks the tile's row of
``blocks.index_table`` and streams the *streamed* operands of every listed block (e.g. K, V and
their segment ids) through a ring of ``stages`` shared-memory slots, with TMA copies. Per slot,
one barrier says "all copies landed" and one says "the compute warpgroups are done with it".
The compute warpgroups run ``step`` over the full blocks (no element mask), then the partial
ones, and ``finish`` turns their carry into output tiles, which go back to global memory by TMA.
The compute warpgroups ask for 240 registers and the memory warpgroup gives most of its own up
(``setmaxnreg``); jax 0.12 compiles Mosaic GPU kernels separably, and ptxas then ignores that
(C7504): every thread keeps 65536 / threads (168 with two compute warpgroups), and the
head-dim-128 dK/dV kernel spills (``benchmarks/RESULTS.md``, eighth session; ``compile_check``
prints these notes).

Operands are addressed by kind: ``"tokens"`` (B, L, H, D) tensors (tile (rows, D), swizzled for
wgmma; ``kv=True`` reads head ``h // rep``), ``"per_head"`` (B, H, L) float vectors such as the
logsumexp, ``"per_row"`` (B or 1, L) segment ids, ``"words"`` (B, W, L) int32 bit words per row
(BRA's routing masks; a (W, rows) tile).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ACC = plgpu.Layout.WGMMA
ROWS = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
COLS = plgpu.Layout.WGMMA.reduce(0)  # one value per column


@dataclasses.dataclass(frozen=True)
class Operand:
    kind: str  # "tokens" | "per_head" | "per_row" | "words"
    kv: bool = False


def interpret_params(**options):
    """Mosaic GPU interpret mode (CPU simulation of shared memory, barriers, TMA and wgmma);
    ``options`` are ``InterpretGPUParams`` fields, e.g. ``detect_races=True``."""
    try:
        params = plgpu.InterpretGPUParams
    except AttributeError:  # jax < 0.11 keeps it private
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params(**options)


def load(ref, layout):
    """A vector load from shared memory in ``layout`` (jax < 0.11 takes an index argument)."""
    if "idx" in inspect.signature(plgpu.load).parameters:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def full(value, shape, layout):
    return plgpu.layout_cast(jnp.full(shape, value, jnp.float32), layout)


def mma(a, b, shape) -> jax.Array:
    """a @ b with float32 accumulation into a fresh (M, N) accumulator; ``a`` is a shared-memory
    ref or a register array, ``b`` a shared-memory ref (``.transpose((1, 0))`` for a ᵀ)."""
    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def mma_into(acc: jax.Array, a, b) -> jax.Array:
    """acc + a @ b, with wgmma accumulating into ``acc`` itself: no second accumulator in registers
    beside it (with head dim 128 the dK/dV kernel's two accumulators spilled 688 B that way)."""
    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(scope)(plgpu.ACC.init(acc))


def _mma_transforms(dtype, width: int):
    """The swizzled tiling that wgmma and TMA agree on for 16-bit tiles ``width`` elements wide:
    128-byte swizzle, or the row's bytes when narrower (64 for head dim 32)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(128, width * itemsize)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _smem(op: Operand, count: int, rows: int, aval) -> Any:
    if op.kind == "tokens":
        return plgpu.SMEM((count, rows, aval.shape[-1]), aval.dtype, transforms=_mma_transforms(aval.dtype, aval.shape[-1]))
    if op.kind == "words":
        return plgpu.SMEM((count, aval.shape[1], rows), aval.dtype)
    return plgpu.SMEM((count, rows), aval.dtype)


def _index(op: Operand, aval, start, rows: int, *, b, head, kv_head):
    window = pl.ds(start, rows)
    if op.kind == "tokens":
        return b, window, kv_head if op.kv else head
    if op.kind == "per_head":
        return b, head, window
    if op.kind == "words":
        return b, slice(None), window
    return (b if aval.shape[0] > 1 else 0), window  # per_row: (B, L), or (1, L) shared by the batch


def block_sparse_call(*, grid: tuple[int, int, int], operands: Sequence[tuple[jax.Array, Operand]], resident: Sequence[int],
                      streamed: Sequence[int], outputs: Sequence[tuple[jax.ShapeDtypeStruct, Operand, int | None]],
                      table: jax.Array, stride: int, tile_rows: int, block_rows: int, stages: int, rep: int,
                      per_batch: bool, init: Callable, step: Callable, finish: Callable, stage_dtype, interpret,
                      warpgroups: int, name: str):
    """Runs the pipeline (see the module docstring) on grid (heads, tiles, batch); returns the outputs.

    - ``resident``/``streamed``: indices into ``operands``; resident tiles cover the warpgroup's
      own ``tile_rows`` rows (tile t, warpgroup w: rows ``(2t + w) * tile_rows ...``), streamed
      ones ``block_rows`` rows at ``table entry * block_rows``. Table row r serves tile r of
      ``warpgroups * tile_rows`` rows (the table has a block of rows per batch row when
      ``per_batch``; ``per_row`` operands of batch 1 are shared by the whole batch).
    - ``outputs``: (shape, operand kind, resident index whose shared memory to reuse or None).
    - ``init(res) -> carry``; ``step(res, blk, own_start, block_start, masked, carry, accumulate)
      -> carry``; ``finish(res, carry) -> output tiles``. ``res``/``blk`` map operand indices to
      this warpgroup's / this slot's shared-memory refs; ``accumulate(acc, x, b)`` is ``acc + x @
      b`` for a float32 register tile ``x`` (cast to ``stage_dtype``) and a shared-memory ``b``:
      wgmma accumulating in place (:func:`mma_into`) on the GPU; in interpret mode, whose wgmma
      reads A from shared memory only and takes no accumulator input, ``x`` is staged through shared
      memory and the product added.
    - ``name``: the kernel's name in profiles and in Mosaic GPU's compiler dumps.
    """
    tiles = grid[1]
    arrays = [a for a, _ in operands]
    n_in, n_out = len(arrays), len(outputs)
    fresh_outputs = [i for i, (_, _, reuse) in enumerate(outputs) if reuse is None]

    def kernel(table_ref, *refs):
        in_refs, out_refs, scoped = refs[:n_in], refs[n_in:n_in + n_out], refs[n_in + n_out]
        (res_smem, blk_smem, out_smem, stage), (res_ready, blk_ready), blk_free = scoped
        head, tile, b = lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("batch")
        wg = lax.axis_index("wg")
        where = dict(b=b, head=head, kv_head=lax.div(head, jnp.int32(rep)))
        row = ((b if per_batch else 0) * tiles + tile) * stride
        n_full = table_ref[row]
        n_visit = n_full + table_ref[row + 1]

        @pl.when(wg < warpgroups)
        def _compute():
            plgpu.set_max_registers(240, action="increase")
            own_start = (tile * warpgroups + wg) * tile_rows
            res = {i: smem.at[wg] for i, smem in zip(resident, res_smem)}
            for i in resident:
                plgpu.copy_gmem_to_smem(in_refs[i].at[_index(operands[i][1], arrays[i], own_start, tile_rows, **where)],
                                        res[i], res_ready.at[wg])
            plgpu.barrier_wait(res_ready.at[wg])

            def accumulate(acc, x, b):
                if stage is None:
                    return mma_into(acc, x.astype(stage_dtype), b)
                stage.at[wg][...] = x.astype(stage_dtype)
                plgpu.commit_smem()
                return acc + mma(stage.at[wg], b, acc.shape)

            def visit(t, carry, masked: bool):
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(blk_ready.at[slot])
                blk = {i: smem.at[slot] for i, smem in zip(streamed, blk_smem)}
                carry = step(res, blk, own_start, table_ref[row + 2 + t] * block_rows, masked, carry, accumulate)
                plgpu.barrier_arrive(blk_free.at[slot])
                return carry

            carry = lax.fori_loop(0, n_full, functools.partial(visit, masked=False), init(res))
            carry = lax.fori_loop(n_full, n_visit, functools.partial(visit, masked=True), carry)
            tiles_out = finish(res, carry)
            targets = []
            for o, (value, (_, op, reuse)) in enumerate(zip(tiles_out, outputs)):
                target = res[reuse] if reuse is not None else out_smem[fresh_outputs.index(o)].at[wg]
                target[...] = value.astype(target.dtype)
                targets.append(target)
            plgpu.commit_smem()
            for target, out_ref, (_, op, _) in zip(targets, out_refs, outputs):
                plgpu.copy_smem_to_gmem(target, out_ref.at[_index(op, out_ref, own_start, tile_rows, **where)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == warpgroups)
        def _memory():
            plgpu.set_max_registers(24, action="decrease")

            # Visit t reuses the slot of visit t - stages once the compute warpgroups are done with it.
            # The last ``stages`` steps only wait (no fetch): the memory warpgroup then observes every
            # phase of every barrier it waits on, which jax 0.11's interpreter checks at deallocation.
            @pl.loop(0, n_visit + stages)
            def _fetch(t):
                slot = lax.rem(t, stages)

                @pl.when((t >= stages) & (t - stages < n_visit))
                def _():
                    plgpu.barrier_wait(blk_free.at[slot])

                @pl.when(t < n_visit)
                def _():
                    start = table_ref[row + 2 + t] * block_rows
                    for i, smem in zip(streamed, blk_smem):
                        plgpu.copy_gmem_to_smem(
                            in_refs[i].at[_index(operands[i][1], arrays[i], start, block_rows, **where)],
                            smem.at[slot], blk_ready.at[slot])

    def entry(table_ref, *refs):
        smem = ([_smem(operands[i][1], warpgroups, tile_rows, arrays[i]) for i in resident],
                [_smem(operands[i][1], stages, block_rows, arrays[i]) for i in streamed],
                [_smem(outputs[o][1], warpgroups, tile_rows, outputs[o][0]) for o in fresh_outputs],
                plgpu.SMEM((warpgroups, tile_rows, block_rows), stage_dtype,
                           transforms=_mma_transforms(stage_dtype, block_rows)) if interpret else None)
        ready = (plgpu.Barrier(num_arrivals=len(resident), num_barriers=warpgroups),
                 plgpu.Barrier(num_arrivals=len(streamed), num_barriers=stages))
        free = plgpu.Barrier(num_arrivals=warpgroups, num_barriers=stages)
        pl.run_scoped(lambda *scoped: kernel(table_ref, *refs, scoped), smem, ready, free, collective_axes="wg")

    entry.__name__ = entry.__qualname__ = name

    call = plgpu.kernel(
        entry, out_type=tuple(shape for shape, _, _ in outputs), grid=grid,
        grid_names=("heads", "tiles", "batch"), num_threads=warpgroups + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret is True else (interpret or None))
    return call(table, *arrays)
