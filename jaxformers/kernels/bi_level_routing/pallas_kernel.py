"""Fused Pallas kernels for bi-level routing attention: forward, dQ and dK/dV, with a custom VJP.

This module plans layouts, launches the kernels per backend and wires the custom VJP; the kernel
bodies themselves are in ``pallas_bodies.py``.

What the naive version does badly: it gathers ``topk`` copies of K and V per query region into HBM
and runs separate softmax passes. Here nothing is gathered:

- Layout. On GPU, when region sides and head dims are powers of two (all BiFormer stages: 8x8,
  4x4, 2x2, 1x1 regions, head dim 32), the kernels read and write the NHWC maps IN PLACE: a region's
  (h, w, d) window of one head is one strided tile load, so no layout copies are made at all
  ("direct" layout). On TPU the same holds for regions a multiple of 8 tokens wide (BiFormer's
  stage 1; a routed region's rows start at a dynamic sublane offset, which Mosaic takes at
  multiples of 8), a program then owning one row of regions. Otherwise the wrapper
  rearranges q/k/v once (one fused XLA copy, as the reference does) into region-major blocks
  ``(B, R_pad, T_pad, heads * d_pad)``; R = S*S regions, T = tokens per region, a region's heads
  side by side on the minor axis (a head is a slice of it), so BiFormer's head dim 32 does not pad
  TPU tiles' 128 lanes four times over. T (and on GPU the head dims) are padded there (padded keys
  are masked), so any region size works (3x3 tokens, ...).
- Forward (grid = (batch, query-region groups)): one program owns ``query_regions`` query regions
  and ALL their heads (on TPU small regions are stacked, ~128 query tokens per program, to amortise
  the per-step cost; on GPU one region per program keeps the grid wide). K and V of the whole image
  are the program's "resident" operand, and each routed region's (T, d) tile is read in place by
  its index from the routing table inside the kernel (as paged attention reads pages). Online
  softmax over the ``topk`` routed regions; the log-sum-exp is saved for backward.
- Backward: dQ by the same routing (recompute p from the saved log-sum-exp); dK/dV by inverse
  routing: a CSR table (per image: the query regions that chose each key region, sorted by key
  region, plus offsets) lets each key region's program loop over exactly its consumers. No program
  writes another's output, so no atomics and no k-fold copies.

Backends:

- TPU (Mosaic): ``PrefetchScalarGridSpec`` prefetches the routing tables into SMEM, flattened
  (SMEM pads a multi-dimensional array's last two dims to (8, 128) words); the image's
  K/V block index depends only on the batch index, so Pallas fetches it once per image (HBM reads
  of K/V = one pass, the memory floor) and the kernel indexes routed regions in VMEM. Batches whose
  tables would overflow SMEM are split into chunks. T padded to a multiple of 8. The resident
  blocks must fit VMEM (:func:`tpu_vmem_bytes`; the BiFormer stage shapes of ``benchmarks/ANCHORS.md``
  need 2-5 MiB per image, its 128x128 map with S=16 ~22 MiB; with a 128-lane tile per head of 32
  channels they needed 7-15 MiB and ~41 MiB). Resident blocks are double-buffered (the next
  image's fetched during this one) or, where two copies exceed the budget (a v4's 12 MiB and the
  128x128 map), single (a pause per image); ``"auto"`` falls back to the reference when even one
  copy does not fit. Heads are unrolled in the kernels (Mosaic slices lanes at static offsets only).
- GPU (Triton lowering; on a Hopper GPU, bf16/f16 maps whose regions hold a multiple of 64 tokens,
  or 1..32 tokens dividing 64, go to the Mosaic GPU path instead, ``mosaic_gpu.py``, see
  ``gpu_kernel``): no scalar prefetch;
  the tables and K/V are whole-array refs read at routed offsets from inside the kernel. Each
  online-softmax step gathers several routed regions into one key tile with a vector-indexed load
  (``regions_per_step``, up to 8 KiB of keys and 8192 scores: 16 regions of 2x2 tokens at
  BiFormer's stage 3, 2 of 8x8 tokens in bf16), so small regions do not serialise into many tiny
  dependent steps, and no kernel spills registers (ptxas for an H100, ``compile_check.py``); dK/dV
  gathers its consumer query regions the same way. K/V come straight from global memory
  (L2-cached); no copies are written.
  Triton needs power-of-two tiles: T and head dims are padded to powers of two where needed, and
  products with a side < 16 use a broadcast-multiply-reduce instead of ``tl.dot``.
- Precision: the kernels' dots take jax's default matmul precision, as the reference's einsums do
  (float32 inputs: TF32 tensor cores on GPU, unless ``jax.default_matmul_precision("float32")``
  asks for exact dots, which Triton multiplies on CUDA cores with the operands in registers: then
  dK/dV spills ~13 KB per thread at 8x8-token regions, dQ and the forward up to 0.8 KB, A100/H100;
  unlike the local/global kernels' tiles, a whole region is one tile here and cannot shrink).
  The backward's delta = rowsum(out * dOut) is taken from the output in its own dtype, as
  FlashAttention does: in bf16, where a token's softmax is nearly one-hot (a few keys, large logits)
  dQ/dK can then be off by several percent of their largest entry (a region of 2 tokens at head
  dim 128 measured ~10%; float32 inputs are exact).
- CPU: the same kernel bodies in interpret mode, with the GPU layout by default (tests also run the
  TPU layout and grid spec, and both the direct and blocked GPU layouts, in interpret mode).

Verified without an accelerator only: numerics in interpret mode (also Pallas' TPU interpret mode),
lowering through Pallas' Triton and Mosaic rules (tests/kernels/test_bi_level_routing.py), and
deviceless compilation for an H100 and TPU v4/v5e/v5p/v6e (``benchmarks/compile_check.py``). Speed
is unmeasured.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxformers.kernels.bi_level_routing.pallas_bodies import KernelConfig, dkv_kernel, dq_kernel, forward_kernel
from jaxformers.kernels.bi_level_routing.reference import from_regions, route_regions, to_regions
from jaxformers.kernels.gpu_kernel import resolve_gpu_kernel, triton_compiler_params, triton_shared_memory_budget
from jaxformers.kernels.tpu_limits import SMEM_TABLE_BUDGET_BYTES, vmem_budget_bytes, vmem_limit_bytes

__all__ = ["BlockSizes", "bi_level_routing_attention_pallas", "default_layout", "inverse_routing",
           "tpu_fits", "tpu_vmem_bytes"]

_TARGET_QUERY_TOKENS = 128  # TPU: query tokens per program when stacking small regions
_GPU_STEP_KEY_BYTES = 8192  # GPU: bytes of keys (x head dim) gathered per online-softmax step
_GPU_STEP_SCORES = 8192  # GPU: queries x keys in a step's score tile (float32: 64 per thread at 4 warps)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Regions per program (forward/dQ and dK/dV) and, on GPU, routed regions gathered per step.

    None picks per backend (``_pick_regions_per_program``, ``_pick_regions_per_step``)."""

    query_regions: int | None = None  # forward and dQ programs (blocked layouts)
    kv_regions: int | None = None  # dK/dV programs (blocked layouts)
    regions_per_step: int | None = None  # GPU: a power of two; TPU: always 1


def default_layout() -> str:
    """Kernel layout of the current backend: "tpu" on TPU, else "gpu" (also used in interpret mode)."""
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pick_regions_per_program(num_regions: int, tokens_padded: int, requested: int | None, layout: str) -> int:
    """Query (or key) regions one program handles, looping over them.

    TPU runs grid steps one after another (~0.35 us each), so small regions are stacked until a
    program holds ~128 query tokens, choosing the count that pads R least. On GPU programs run in
    parallel and stacking would only serialise work, so the default is one region per program.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"regions per program must be >= 1; got {requested}")
        return min(requested, num_regions)
    if layout == "gpu":
        return 1
    cap = max(1, min(num_regions, _TARGET_QUERY_TOKENS // tokens_padded))
    candidates = range(max(1, (cap + 1) // 2), cap + 1)
    return min(candidates, key=lambda n: (_round_up(num_regions, n) - num_regions, -n))


# How much more shared memory than :func:`triton_shared_memory` (fitted on an A100) XLA's Triton asked
# for the same kernels, by major compute capability (jax 0.11.2, measured the same way, regions of
# 4-256 tokens, head dims 64-256, the regions per step the kernels pick): up to 1.11x on an H100,
# 1.55x on a B200 (bf16 dK/dV; float32 1.11x); at most 0.98x on an L4 (8.9) and an RTX PRO 6000 (12.0).
TRITON_REQUEST_RATIO = {9: 1.15, 10: 1.6}


def triton_shared_memory(tokens_padded: int, regions_per_step: int, head_dim: int, itemsize: int) -> int:
    """Bytes of shared memory XLA's Triton asks for the largest of our three GPU kernels (dQ or dK/dV)
    with regions of ``tokens_padded`` tokens gathered ``regions_per_step`` at a time: an upper bound
    fitted to what jax 0.11.2 requested for an A100 over 1-256 tokens, head dims 32-256, 1-4 regions
    per step, bf16 and float32 (compiled for a GPU with too little shared memory, whose error names
    the request; at most 35% over the largest request where that exceeds 16 KiB; regions under 16 tokens
    take a broadcast product that needs almost none). A region is one query tile, so this does
    not shrink with the step; steps of more than one region are small (``_pick_regions_per_step``)."""
    e, t, d = itemsize, tokens_padded, head_dim
    return e * d * t * (4 + 5 * regions_per_step) // 2 + 4096


def _pick_regions_per_step(topk: int, tokens_padded: int, head_dim: int, itemsize: int, requested: int | None,
                           layout: str) -> int:
    """Routed regions one GPU step gathers into a single key tile (the TPU path reads one region per
    step: Mosaic has no vector-indexed loads). Small regions are batched up to 8 KiB of keys (4096
    bf16 elements) so a 2x2-token region does not cost a whole dependent load-and-dot round trip,
    and at most 8192 scores per step (a region's queries x the gathered keys): with more, ptxas
    spills the dK/dV and dQ kernels' tiles to local memory (8x8-token regions at top-4 did with 4
    regions per step). A power of two."""
    if layout != "gpu":
        if requested not in (None, 1):
            raise ValueError(f"regions_per_step must be 1 on the TPU layout; got {requested}")
        return 1
    if requested is not None:
        if requested < 1 or requested & (requested - 1):
            raise ValueError(f"regions_per_step must be a power of two; got {requested}")
        return requested
    per_step = min(_GPU_STEP_KEY_BYTES // (itemsize * tokens_padded * head_dim),
                   _GPU_STEP_SCORES // (tokens_padded * tokens_padded))
    return max(1, min(_next_pow2(topk), per_step))


# ----------------------------------------------------------------------------- launching
def _block_rows(cfg: KernelConfig, blocked, regions_per_program: int):
    """Entries of an operand's axis 1 in one block: a group of regions (region blocks), the map rows
    of one row of regions (``blocked="rows"``: TPU's direct layout), or None: resident (whole image)."""
    if not blocked:
        return None
    return cfg.region_h if blocked == "rows" else regions_per_program


def _tpu_vmem_bytes(cfg: KernelConfig, operands, outputs, regions_per_program: int, resident_buffers: int = 2) -> int:
    """VMEM of the blocks of one TPU launch (arguments as :func:`_launch`'s), with (8 x 128) tile
    padding: own blocks are double-buffered, resident ones in ``resident_buffers``."""
    total = 0
    for x, blocked in operands + outputs:
        rows, itemsize = _block_rows(cfg, blocked, regions_per_program), jnp.dtype(x.dtype).itemsize
        lead = math.prod(x.shape[2:-2]) * (x.shape[1] if rows is None else rows)
        sublanes = _round_up(x.shape[-2], 8 * max(1, 4 // itemsize))
        buffers = resident_buffers if rows is None else 2
        total += buffers * lead * sublanes * _round_up(x.shape[-1], 128) * itemsize
    return total


@dataclasses.dataclass(frozen=True)
class _FlatTable:
    """A flattened int32 table (TPU SMEM) indexed like the array it was: ``t[b, r, j]`` with scalars."""

    ref: object
    shape: tuple[int, ...]

    def __getitem__(self, index):
        flat = 0
        for i, n in zip(index, self.shape):
            flat = flat * n + i
        return self.ref[flat]


def _launch(kernel, cfg: KernelConfig, tables, operands, outputs, regions_per_program: int):
    """Runs ``kernel`` over grid (batch, R_pad / regions_per_program).

    ``tables``: int32 routing tables (scalar-prefetched on TPU, whole-array refs elsewhere).
    ``operands`` and ``outputs``: (array or ShapeDtypeStruct, blocked) pairs. Blocked ones are
    (B, R_pad, ...) arrays tiled by region groups, or with ``blocked="rows"`` (TPU's direct
    layout) NHWC maps tiled by rows of regions; the others are "resident" (the whole image; on GPU
    the whole array), which is also how GPU's direct layout passes its NHWC maps.
    """
    batch = operands[0][0].shape[0]
    tpu = cfg.layout == "tpu"
    table_bytes_per_image = sum(4 * math.prod(t.shape[1:]) for t in tables)
    if tpu and batch * table_bytes_per_image > SMEM_TABLE_BUDGET_BYTES:
        chunk = max(1, SMEM_TABLE_BUDGET_BYTES // table_bytes_per_image)
        parts = [
            _launch(kernel, cfg, [t[i:i + chunk] for t in tables],
                    [(x[i:i + chunk], blk) for x, blk in operands],
                    [(jax.ShapeDtypeStruct((min(chunk, batch - i),) + o.shape[1:], o.dtype), blk)
                     for o, blk in outputs],
                    regions_per_program)
            for i in range(0, batch, chunk)
        ]
        return [jnp.concatenate(p, axis=0) for p in zip(*parts)]

    resident_buffers = 2
    if tpu:  # the next image's resident blocks are fetched during this one, or, when two copies
        # would not fit VMEM, after it (one copy: a pause per image rather than the XLA path)
        vmem = _tpu_vmem_bytes(cfg, operands, outputs, regions_per_program)
        if vmem > vmem_budget_bytes():
            resident_buffers, vmem = 1, _tpu_vmem_bytes(cfg, operands, outputs, regions_per_program, 1)
        if vmem > vmem_budget_bytes():
            raise ValueError(f"bi_level_routing_attention(implementation='pallas') needs ~{vmem >> 20} MiB of "
                             f"TPU VMEM per image for this map; use implementation='xla' for maps this large")

    def blocked_spec(shape, blocked):
        tail = len(shape) - 2
        rows = _block_rows(cfg, blocked, regions_per_program)
        return pl.BlockSpec((1, rows) + tuple(shape[2:]), lambda b, g, *_: (b, g) + (0,) * tail)

    def resident_spec(shape):
        if tpu:  # the block index depends on the image only: fetched once per image
            return pl.BlockSpec((1,) + tuple(shape[1:]), lambda b, g, *_: (b,) + (0,) * (len(shape) - 1),
                                pipeline_mode=pl.Buffered(resident_buffers))
        return pl.BlockSpec()  # whole array; the kernel indexes the image itself

    in_specs = [blocked_spec(x.shape, blk) if blk else resident_spec(x.shape) for x, blk in operands]
    out_specs = [blocked_spec(o.shape, blk) if blk else resident_spec(o.shape) for o, blk in outputs]
    outputs = [o for o, _ in outputs]
    args = [x for x, _ in operands]
    aliases = {}
    if cfg.poison:  # outputs start as NaN: anything the kernel fails to write stays NaN
        first = len(tables) + len(args)
        aliases = {first + i: i for i in range(len(outputs))}
        args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in outputs]
        in_specs += out_specs
        n_in = len(tables) + len(operands)
        body = functools.partial(kernel, cfg=cfg)

        def kernel_fn(*refs):
            return body(*refs[:n_in], *refs[n_in + len(outputs):])
    else:
        kernel_fn = functools.partial(kernel, cfg=cfg)

    grid = (batch, cfg.regions_padded // regions_per_program)
    name = "bra_" + kernel.__name__.removesuffix("_kernel")  # names the kernel in profiles and compiler dumps
    if tpu:  # SMEM pads an array's last two dims to (8, 128) words: flat tables, read through _FlatTable
        shapes, tables = [t.shape for t in tables], [t.reshape(-1) for t in tables]
        with_flat_tables = kernel_fn

        def kernel_fn(*refs):
            return with_flat_tables(*map(_FlatTable, refs, shapes), *refs[len(shapes):])

        from jax.experimental.pallas import tpu as pltpu

        grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(tables), grid=grid,
                                                 in_specs=in_specs, out_specs=out_specs)
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                      vmem_limit_bytes=vmem_limit_bytes(vmem))
        call = pl.pallas_call(kernel_fn, out_shape=outputs, grid_spec=grid_spec, compiler_params=params,
                              input_output_aliases=aliases, interpret=cfg.interpret, name=name)
    else:
        params = None if cfg.interpret else triton_compiler_params(num_warps=4, num_stages=2)
        call = pl.pallas_call(kernel_fn, out_shape=outputs, grid=grid,
                              in_specs=[pl.BlockSpec() for _ in tables] + in_specs, out_specs=out_specs,
                              compiler_params=params, input_output_aliases=aliases, interpret=cfg.interpret,
                              name=name)
    return call(*tables, *args)


def _own_blocks(cfg: KernelConfig):
    """How a program's own q/o (dK/dV: k/v) tiles reach it: region blocks (True), one row of regions
    of the NHWC map ("rows", TPU's direct layout) or the whole map (False, GPU's direct layout)."""
    if not cfg.direct:
        return True
    return "rows" if cfg.layout == "tpu" else False


def _like(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _as_rows(stats):
    """Statistics (B, R_pad, T_pad, heads) as rows (B, R_pad, 1, heads * T_pad), a region's heads side
    by side: dK/dV keeps a whole image's resident without (8, 128)-padded column tiles in TPU VMEM."""
    return stats.transpose(0, 1, 3, 2).reshape(stats.shape[:2] + (1, -1))


# The three launches' operands and outputs ((array or ShapeDtypeStruct, blocked) pairs, see
# :func:`_launch`) and regions per program; ``tpu_vmem_bytes`` plans with the same lists from shapes.
def _stats(cfg: KernelConfig, batch: int):
    """Per-token, per-head statistics (log-sum-exp, delta): (B, R_pad, T_pad, heads) float32."""
    return jax.ShapeDtypeStruct((batch, cfg.regions_padded, cfg.tokens_padded, cfg.num_heads), jnp.float32)


def _forward_io(cfg: KernelConfig, q, k, v):
    own = _own_blocks(cfg)
    return ([(q, own), (k, False), (v, False)],
            [(_like(v), own), (_stats(cfg, q.shape[0]), True)],  # log-sum-exp, a column per tile
            cfg.query_regions)


def _dq_io(cfg: KernelConfig, q, k, v, do, lse, delta):
    own = _own_blocks(cfg)
    return ([(q, own), (k, False), (v, False), (do, own), (lse, True), (delta, True)],
            [(_like(q), own)], cfg.query_regions)


def _dkv_io(cfg: KernelConfig, q, k, v, do, lse_rows, delta_rows):
    own = _own_blocks(cfg)
    return ([(q, False), (do, False), (lse_rows, False), (delta_rows, False), (k, own), (v, own)],
            [(_like(k), own), (_like(v), own)], cfg.kv_regions)


def _forward(cfg: KernelConfig, q, k, v, table):
    o, lse = _launch(forward_kernel, cfg, [table], *_forward_io(cfg, q, k, v))
    return o, lse


def _delta(cfg: KernelConfig, o, do):
    """Row sums of dO * O per token and head, in the statistics layout (B, R_pad, T_pad, heads)."""
    prod = do.astype(jnp.float32) * o.astype(jnp.float32)
    per_head = prod.reshape(prod.shape[:-1] + (cfg.num_heads, -1)).sum(-1)
    if not cfg.direct:
        return per_head
    delta = to_regions(per_head, cfg.regions_per_side)
    return jnp.pad(delta, ((0, 0), (0, cfg.regions_padded - cfg.num_regions), (0, 0), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg: KernelConfig, q, k, v, table, rows, offsets):
    return _forward(cfg, q, k, v, table)[0]


def _attend_fwd(cfg, q, k, v, table, rows, offsets):
    o, lse = _forward(cfg, q, k, v, table)
    return o, (q, k, v, table, rows, offsets, o, lse)


def _attend_bwd(cfg, residuals, do):
    q, k, v, table, rows, offsets, o, lse = residuals
    delta = _delta(cfg, o, do)
    (dq,) = _launch(dq_kernel, cfg, [table], *_dq_io(cfg, q, k, v, do, lse, delta))
    dk, dv = _launch(dkv_kernel, cfg, [rows, offsets], *_dkv_io(cfg, q, k, v, do, _as_rows(lse), _as_rows(delta)))
    return dq, dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def inverse_routing(index: jax.Array, regions_padded: int) -> tuple[jax.Array, jax.Array]:
    """CSR form of "which query regions chose key region j" from ``index`` (B, R, topk).

    Returns ``rows`` (B, R*topk): query regions sorted by the key region they chose, and
    ``offsets`` (B, regions_padded + 1): key region j's consumers are ``rows[offsets[j]:offsets[j+1]]``.
    A query region picks a key region at most once, so each consumer appears once per key region.
    """
    b, r, topk = index.shape
    flat = index.reshape(b, r * topk)
    order = jnp.argsort(flat, axis=1, stable=True)
    rows = (order // topk).astype(jnp.int32)
    counts = jax.vmap(lambda f: jnp.bincount(f, length=regions_padded))(flat)
    offsets = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(counts, axis=1).astype(jnp.int32)], axis=1)
    return rows, offsets


def _to_blocks(x, s: int, num_heads: int, r_pad: int, t_pad: int, d_pad: int):
    """(B, H, W, C) -> (B, R_pad, T_pad, heads * d_pad), zero padded."""
    xr = to_regions(x, s)
    b, r, t, c = xr.shape
    xr = xr.reshape(b, r, t, num_heads, c // num_heads)
    xr = jnp.pad(xr, ((0, 0), (0, r_pad - r), (0, t_pad - t), (0, 0), (0, d_pad - c // num_heads)))
    return xr.reshape(b, r_pad, t_pad, num_heads * d_pad)


def _kernel_layout(cfg: KernelConfig, d_pad: int, x):
    """One (B, H, W, C) map as the kernels take it: in place (direct layouts) or as region blocks."""
    if cfg.direct:
        return x
    return _to_blocks(x, cfg.regions_per_side, cfg.num_heads, cfg.regions_padded, cfg.tokens_padded, d_pad)


def _from_blocks(xb, s: int, height: int, width: int, r: int, t: int, num_heads: int, d: int):
    b, _, t_pad, c_pad = xb.shape
    x = xb.reshape(b, -1, t_pad, num_heads, c_pad // num_heads)[:, :r, :t, :, :d]
    return from_regions(x.reshape(b, r, t, num_heads * d), s, height, width)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _plan(q_shape, v_shape, dtype, *, num_heads: int, regions_per_side: int, topk: int, scale: float,
          block_sizes: BlockSizes | None, layout: str, interpret, poison: bool,
          direct: bool | None = None):
    """The static launch configuration and padded head dims (d_qk_pad, d_v_pad) for one call.

    ``direct`` (default: whenever possible) makes the kernels read the NHWC maps in place. On GPU
    that needs power-of-two region sides and head dims (Triton tiles; BiFormer's 8x8, 4x4, 2x2 and
    1x1 regions with head dim 32 all qualify) and a program takes one region. On TPU it needs
    regions a multiple of 8 tokens wide (a routed region's rows start at a dynamic sublane offset,
    which Mosaic takes at multiples of 8; BiFormer's stage 1 and larger maps' 8x8 and 16x16 regions)
    and a program takes one row of regions. Block sizes then do not apply."""
    block_sizes = block_sizes or BlockSizes()
    if layout not in ("gpu", "tpu"):
        raise ValueError(f"layout must be 'gpu' or 'tpu'; got {layout!r}")
    s = regions_per_side
    _, height, width, c_qk = q_shape
    region_h, region_w = height // s, width // s
    num_regions, tokens = s * s, region_h * region_w
    d_qk, d_v = c_qk // num_heads, v_shape[-1] // num_heads
    if layout == "gpu":
        direct_ok, need = all(_is_pow2(n) for n in (region_h, region_w, d_qk, d_v)), \
            "power-of-two region sides and head dims on the GPU layout"
    else:
        direct_ok, need = region_w % 8 == 0, "regions a multiple of 8 tokens wide on the TPU layout"
    if direct and not direct_ok:
        raise ValueError(f"the direct NHWC layout needs {need}; got regions {region_h}x{region_w}, "
                         f"head dims {d_qk}/{d_v}")
    direct = direct_ok if direct is None else direct
    if layout == "gpu":
        t_pad, dqk_pad, dv_pad = _next_pow2(tokens), _next_pow2(d_qk), _next_pow2(d_v)
    else:
        t_pad, dqk_pad, dv_pad = _round_up(tokens, 8), d_qk, d_v
    if direct:
        rq = rkv = 1 if layout == "gpu" else s
    else:
        rq = _pick_regions_per_program(num_regions, t_pad, block_sizes.query_regions, layout)
        rkv = _pick_regions_per_program(num_regions, t_pad, block_sizes.kv_regions, layout)
    step = _pick_regions_per_step(topk, t_pad, max(dqk_pad, dv_pad), jnp.dtype(dtype).itemsize,
                                  block_sizes.regions_per_step, layout)
    cfg = KernelConfig(num_heads=num_heads, scale=float(scale), topk=topk, num_regions=num_regions,
                  regions_padded=_round_up(num_regions, math.lcm(rq, rkv)), tokens=tokens,
                  tokens_padded=t_pad, query_regions=rq, kv_regions=rkv, kv_step=step, q_step=step,
                  topk_padded=_round_up(topk, step), layout=layout, direct=direct,
                  regions_per_side=s, region_h=region_h, region_w=region_w, interpret=interpret,
                  poison=poison)
    return cfg, dqk_pad, dv_pad


def tpu_vmem_bytes(q_shape, v_shape, dtype, *, num_heads: int, regions_per_side: int, topk: int,
                   block_sizes: BlockSizes | None = None, resident_buffers: int = 2) -> int:
    """Largest VMEM footprint (bytes) of the three TPU kernels (forward, dQ, dK/dV) for one call.

    The TPU kernels keep one image's K/V (forward, dQ) or q/dO/statistics (dK/dV) resident in VMEM,
    in two buffers (the next image's fetched during this one) or, where two do not fit the budget,
    one (``resident_buffers=1``); ``"auto"`` falls back to the reference on TPU when even one does
    not fit."""
    cfg, dqk_pad, dv_pad = _plan(q_shape, v_shape, dtype, num_heads=num_heads, regions_per_side=regions_per_side,
                                 topk=topk, scale=1.0, block_sizes=block_sizes, layout="tpu", interpret=False,
                                 poison=False)
    image = lambda shape: jax.ShapeDtypeStruct((1,) + tuple(shape[1:]), dtype)  # noqa: E731
    q = jax.eval_shape(functools.partial(_kernel_layout, cfg, dqk_pad), image(q_shape))
    v = jax.eval_shape(functools.partial(_kernel_layout, cfg, dv_pad), image(v_shape))
    lse = _stats(cfg, 1)
    rows = jax.eval_shape(_as_rows, lse)
    launches = (_forward_io(cfg, q, q, v), _dq_io(cfg, q, q, v, v, lse, lse), _dkv_io(cfg, q, q, v, v, rows, rows))
    return max(_tpu_vmem_bytes(cfg, *io, resident_buffers) for io in launches)


def tpu_fits(q_shape, v_shape, dtype, **kw) -> bool:
    """True when the TPU kernels fit the VMEM budget (:func:`tpu_vmem_bytes`, one resident buffer)."""
    return tpu_vmem_bytes(q_shape, v_shape, dtype, resident_buffers=1, **kw) <= vmem_budget_bytes()


def triton_fits(q, k, v, *, num_heads: int, regions_per_side: int, topk: int) -> bool:
    """Whether the Triton kernels' tiles for these maps fit the shared memory of JAX's default GPU
    (:func:`triton_shared_memory` against ``gpu_kernel.triton_shared_memory_budget``): a query tile
    holds a whole region, so large regions with large head dims (e.g. 16x16 tokens at head dim 64 in
    float32) need more than an A10/L4/RTX GPU's 99 KiB."""
    dtype = jnp.result_type(q, k, v)
    plan = _plan(q.shape, v.shape, dtype, num_heads=num_heads, regions_per_side=regions_per_side, topk=topk,
                 scale=1.0, block_sizes=None, layout="gpu", interpret=False, poison=False)
    return _triton_need(*plan, jnp.dtype(dtype).itemsize) <= triton_shared_memory_budget(TRITON_REQUEST_RATIO)


def _triton_need(cfg: KernelConfig, dqk_pad: int, dv_pad: int, itemsize: int) -> int:
    """:func:`triton_shared_memory` of a planned GPU-layout call."""
    return triton_shared_memory(cfg.tokens_padded, cfg.kv_step, max(dqk_pad, dv_pad), itemsize)


def uses_mosaic_gpu(choice: str | None, q, k, v, num_heads: int, regions_per_side: int, layout: str | None) -> bool:
    """Resolves ``gpu_kernel`` (see ``jaxformers.kernels.gpu_kernel``): whether this call takes the
    Mosaic GPU path (``mosaic_gpu.py``). An explicit TPU layout never does."""
    def fits():
        from jaxformers.kernels.bi_level_routing import mosaic_gpu

        return mosaic_gpu.supported(q, k, v, num_heads=num_heads, regions_per_side=regions_per_side)

    backend = "tpu" if (layout or default_layout()) == "tpu" else jax.default_backend()
    return resolve_gpu_kernel(choice, backend=backend, fits=fits, requirement=(
        "bfloat16/float16 q, k, v, one head dim of 32, 64 or 128 and regions of a multiple of 64 tokens "
        "or of 1..32 tokens dividing 64; "
        f"got {q.dtype}, q/k/v channels {q.shape[-1]}/{v.shape[-1]} over {num_heads} heads, regions of "
        f"{q.shape[1] // regions_per_side}x{q.shape[2] // regions_per_side} tokens")) == "mosaic"


def bi_level_routing_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    num_heads: int,
    regions_per_side: int,
    topk: int,
    scale: float,
    block_sizes: BlockSizes | None = None,
    layout: str | None = None,
    interpret: bool | object | None = None,
    poison: bool = False,
    direct: bool | None = None,
    gpu_kernel: str | None = None,
    index: jax.Array | None = None,
) -> jax.Array:
    """The fused kernel on validated NHWC inputs (``topk`` in 1..S*S, ``scale`` resolved).

    Call it through :func:`jaxformers.kernels.bi_level_routing_attention`. ``layout`` ("gpu" |
    "tpu") and ``interpret`` default to the current backend (interpret on CPU; ``interpret`` may also be
    a ``pltpu.InterpretParams`` with the TPU layout, TPU interpret mode); ``direct`` picks the
    in-place NHWC tiles of the GPU layout (default: when the shapes allow, see ``_plan``);
    ``poison`` makes outputs start as NaN (tests). Differentiable in q, k and v (kernel backward,
    custom VJP). ``gpu_kernel``: "triton" (the kernels here), "mosaic" (``mosaic_gpu.py``: Hopper,
    regions of a multiple of 64 tokens or of 1..32 tokens dividing 64, bf16/f16; Mosaic GPU interpret
    mode off GPU), "auto" (Mosaic on a Hopper GPU when the inputs suit it) or None (the process
    default, ``jaxformers.kernels.gpu_kernel``). ``index``: the routing (``route_regions``), when the
    caller computed it over more heads than these (the public op under a mesh); default: from q, k.
    """
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "tpu")
    if uses_mosaic_gpu(gpu_kernel, q, k, v, num_heads, regions_per_side, layout):
        from jaxformers.kernels.bi_level_routing.mosaic_gpu import bi_level_routing_attention_mosaic

        return bi_level_routing_attention_mosaic(q, k, v, num_heads=num_heads, regions_per_side=regions_per_side,
                                                 topk=topk, scale=scale, interpret=interpret, index=index)
    out_dtype = v.dtype
    q, k, v = (x.astype(jnp.result_type(q, k, v)) for x in (q, k, v))  # one dtype inside the kernels
    cfg, dqk_pad, dv_pad = _plan(q.shape, v.shape, q.dtype, num_heads=num_heads,
                                 regions_per_side=regions_per_side, topk=topk, scale=scale,
                                 block_sizes=block_sizes, layout=layout or default_layout(),
                                 interpret=interpret, poison=poison, direct=direct)
    if cfg.layout == "gpu" and interpret is False:  # compiled Triton kernels: their tiles must fit shared memory
        need = _triton_need(cfg, dqk_pad, dv_pad, q.dtype.itemsize)
        if need > triton_shared_memory_budget(TRITON_REQUEST_RATIO):
            raise ValueError(
                f"bi_level_routing_attention(implementation='pallas'): regions of {cfg.region_h}x{cfg.region_w} "
                f"tokens at head dim {q.shape[-1] // num_heads} in {q.dtype} need ~{need >> 10} KiB of shared "
                "memory per Triton kernel, more than this GPU holds; use implementation='xla' (or 'auto', which "
                "falls back to it), or more regions")
    s = regions_per_side
    _, height, width, _ = q.shape
    r, r_pad = cfg.num_regions, cfg.regions_padded
    index = route_regions(q, k, s, topk, scale) if index is None else index
    # Padded query regions and routes point at region 0; the kernels mask padded routes.
    table = jnp.pad(index, ((0, 0), (0, r_pad - r), (0, cfg.topk_padded - topk)))
    rows, offsets = inverse_routing(index, r_pad)
    rows = jnp.pad(rows, ((0, 0), (0, cfg.q_step)))  # room for the last gathered step
    qk = functools.partial(_kernel_layout, cfg, dqk_pad)
    ob = _attend(cfg, qk(q), qk(k), _kernel_layout(cfg, dv_pad, v), table, rows, offsets)
    if cfg.direct:
        return ob.astype(out_dtype)
    return _from_blocks(ob, s, height, width, r, cfg.tokens, num_heads, v.shape[-1] // num_heads).astype(out_dtype)
