"""Block sparsity for the local + global kernel: which key blocks each query block must visit.

For every pair (query block, key block) we decide from block-level bounds alone whether the pair
holds *no* allowed element (skip), *only* allowed elements (visit without computing a mask: "full"),
or some (visit with the element mask: "partial"). Window, group, causal/chunk and global tokens
give the bounds from positions; packed segments from per-block min/max of the non-zero ids. The
tests are conservative: a skipped block truly has no allowed pair, a "full" block truly has only
allowed pairs; anything uncertain is "partial".

The result is a flat int32 index table (flat so that both the Triton and Mosaic lowerings can read
scalars from it): for row r = (batch, outer block), ``table[r*T] = n_full``, ``table[r*T+1] =
n_partial`` and ``table[r*T+2 : r*T+2+n_full+n_partial]`` lists the inner blocks, full ones first,
each group in increasing order. The forward and dQ kernels iterate key blocks per query block; the
dK/dV kernel uses the transposed table (query blocks per key block).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.kernels.local_global.mask import MaskSpec

_BIG = np.int32(2**30)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16) of the forward and backward kernels along Lq and Lk."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 16; got {value!r}")

    def fitted(self, q_len: int, k_len: int) -> "BlockSizes":
        """Shrinks blocks that exceed the (power-of-two rounded) sequence lengths."""
        def fit(block: int, length: int) -> int:
            return min(block, max(16, int(pl_next_pow2(length))))
        return BlockSizes(fit(self.block_q, q_len), fit(self.block_k, k_len),
                          fit(self.block_q_bwd, q_len), fit(self.block_k_bwd, k_len))

    @property
    def q_multiple(self) -> int:
        return max(self.block_q, self.block_q_bwd)

    @property
    def k_multiple(self) -> int:
        return max(self.block_k, self.block_k_bwd)


# Default Triton tiles for float32 inputs, whose tiles take twice the registers of bf16 ones: ptxas
# spilled the default 128x64 forward and 64x64 backward tiles (an A100's dK/dV kernel ~16 KB per
# thread, an H100's 68-700 B); these compile without spills for A100, H100 and B200, head dims 64, 128.
FLOAT32_GPU_BLOCKS = BlockSizes(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=32)

# Tiles for exact float32 dots (``gpu_kernel.exact_float32_dots``: jax's default matmul precision
# "float32"/"highest"), which Triton multiplies with FMA products whose operands sit in registers: at
# FLOAT32_GPU_BLOCKS ptxas spilled ~25 KB per thread in the forward kernel and 1-5 KB in dK/dV (A100,
# H100; head dims 64, 128). These spill nothing at head dims <= 64 (A100, H100, B200, L4); the dK/dV
# kernel still spills 0.2-0.4 KB at head dim 128 and 2-4 KB at 256, the forward none.
EXACT_FLOAT32_GPU_BLOCKS = BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=16)

# How much more shared memory than :func:`triton_shared_memory` (fitted on an A100) XLA's Triton asked
# for the same tiles, by major compute capability (jax 0.11.2, compiled for each GPU with too little
# shared memory, whose error names the request; head dims 32-256, tiles 16-128, bf16 and float32):
# up to 1.62x on an H100, 1.71x on a B200; at most 1.0x on an L4 (8.9) and an RTX PRO 6000 (12.0).
TRITON_REQUEST_RATIO = {9: 1.65, 10: 1.75}

# Smaller Triton tiles, tried in order where a GPU's shared memory does not hold the defaults.
_FORWARD_TILES = ((128, 64), (64, 64), (64, 32), (32, 32), (32, 16), (16, 16))
_BACKWARD_TILES = ((64, 64), (64, 32), (32, 32), (32, 16), (16, 16))


def triton_shared_memory(kernel: str, block_q: int, block_k: int, dim: int, itemsize: int) -> int:
    """Bytes of shared memory XLA's Triton asks for one of our Triton kernels ("fwd", "dq", "dkv")
    with these tiles and padded head dim: an upper bound fitted to what jax 0.11.2 requested over
    head dims 32-256, tiles 16-128 and bf16/float32 (compiled for a GPU with too little shared memory,
    whose error names the request; at most 35% over, mostly under 15%)."""
    e, d = itemsize, dim
    if kernel == "fwd":
        need = e * d * (2 * block_q + 5 * block_k) // 2
    elif kernel == "dq":
        need = e * d * (4 * block_q + 5 * block_k) // 2
    elif kernel == "dkv":
        need = e * d * (2 * block_q + (4 if e < 4 else 2) * block_k) + e * block_q * block_k
    else:
        raise ValueError(f"kernel must be 'fwd', 'dq' or 'dkv'; got {kernel!r}")
    return need + 1024


def triton_blocks(itemsize: int, dim: int, budget: int, exact_float32: bool = False) -> BlockSizes | None:
    """The Triton kernels' tiles for padded head dim ``dim`` where their shared memory estimates may
    reach ``budget`` bytes (``gpu_kernel.triton_shared_memory_budget``): the defaults (``BlockSizes()``;
    float32: ``FLOAT32_GPU_BLOCKS``, or ``EXACT_FLOAT32_GPU_BLOCKS`` for ``exact_float32`` dots) where
    they fit, else the largest smaller ones that do (:func:`triton_shared_memory`); None when not even
    16x16 tiles fit.

    Registers bound the tiles too: a tile row of ``dim`` elements takes at most 32 KiB per forward tile
    and 16 KiB per backward tile (the defaults at head dim 128). At head dim 256 larger tiles made
    ptxas spill up to 11 KB per thread in the dK/dV kernel (``compile_check.py`` for an A100)."""
    first = (EXACT_FLOAT32_GPU_BLOCKS if exact_float32 else FLOAT32_GPU_BLOCKS) if itemsize >= 4 else BlockSizes()

    def largest(tiles, first_tile, kernels, tile_bytes):
        tiles = tiles[tiles.index(first_tile):]
        return next((t for t in tiles if max(t) * dim * itemsize <= tile_bytes and all(
            triton_shared_memory(k, *t, dim, itemsize) <= budget for k in kernels)), None)

    forward = largest(_FORWARD_TILES, (first.block_q, first.block_k), ("fwd",), 32 << 10)
    backward = largest(_BACKWARD_TILES, (first.block_q_bwd, first.block_k_bwd), ("dq", "dkv"), 16 << 10)
    if forward is None or backward is None:
        return None
    return BlockSizes(*forward, *backward)


def pl_next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def static_segments(length: int, padded: int) -> np.ndarray:
    """The (1, padded) segment row of ``length`` tokens without segment ids: ones, then 0 on padding.
    As numpy, it makes the block tables numpy too (built while tracing, see :func:`index_table`)."""
    return (np.arange(padded) < length).astype(np.int32)[None]


def _xp(*arrays):
    """numpy where every array is a numpy array, else jax.numpy."""
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def _block_segments(seg, block: int):
    """Per block: min and max of the non-zero ids (BIG/-BIG if none) and whether any id is 0."""
    xp = _xp(seg)
    b, length = seg.shape
    blocks = seg.reshape(b, length // block, block)
    nonzero = blocks != 0
    lo = xp.min(xp.where(nonzero, blocks, _BIG), axis=-1)
    hi = xp.max(xp.where(nonzero, blocks, -_BIG), axis=-1)
    return lo, hi, xp.any(~nonzero, axis=-1)


def block_kinds(spec: MaskSpec, q_seg, k_seg, block_q: int, block_k: int):
    """(any, full, max_k_blocks, max_q_blocks): ``any``/``full`` are (B or 1, nq, nk) booleans (some /
    all pairs of the block allowed); the two ints are static bounds on the visited key blocks per
    query block and query blocks per key block (from positions alone, before segments).

    ``q_seg``/``k_seg`` are (B or 1, padded length) int32 with 0 on padding positions; where both are
    numpy arrays (:func:`static_segments`) so are ``any`` and ``full``.
    """
    xp = _xp(q_seg, k_seg)
    nq, nk = q_seg.shape[1] // block_q, k_seg.shape[1] // block_k
    qs = (np.arange(nq) * block_q)[:, None]
    qe = qs + block_q - 1
    ks = (np.arange(nk) * block_k)[None, :]
    ke = ks + block_k - 1
    any_local = np.ones((nq, nk), bool)
    full_local = np.ones((nq, nk), bool)
    if spec.window is not None:
        left, right = spec.window
        if left is not None:
            any_local &= ke >= qs - left
            full_local &= ks >= qe - left
        if right is not None:
            any_local &= ks <= qe + right
            full_local &= ke <= qs + right
    if spec.group_size is not None:
        g = spec.group_size
        any_local &= (qs // g <= ke // g) & (ks // g <= qe // g)
        full_local &= (qs // g == qe // g) & (ks // g == ke // g) & (qs // g == ks // g)
    n = spec.global_tokens
    gq = spec.global_queries
    any_struct = any_local | ((qs < n) & gq) | (ks < n)
    full_struct = full_local | ((qe < n) & gq) | (ke < n)
    if spec.causal:
        c = spec.chunk_size or 1
        any_struct &= ks // c <= qe // c
        full_struct &= ke // c <= qs // c
    q_lo, q_hi, q_zero = _block_segments(q_seg, block_q)
    k_lo, k_hi, k_zero = _block_segments(k_seg, block_k)
    q_lo, q_hi, q_zero = q_lo[:, :, None], q_hi[:, :, None], q_zero[:, :, None]
    k_lo, k_hi, k_zero = k_lo[:, None, :], k_hi[:, None, :], k_zero[:, None, :]
    seg_any = (q_lo <= k_hi) & (k_lo <= q_hi)
    seg_full = ~q_zero & ~k_zero & (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    any_ = xp.asarray(any_struct)[None] & seg_any
    full = xp.asarray(full_struct)[None] & seg_full & any_
    return any_, full, max(1, int(any_struct.sum(1).max())), max(1, int(any_struct.sum(0).max()))


def index_table(any_, full, width: int) -> tuple[jax.Array | np.ndarray, int]:
    """Flat int32 table (see module docstring) over the last axis of (Bt, n_outer, n_inner) masks.

    ``width`` bounds the number of visited inner blocks of any row (a static bound, so rows only
    hold that many entries; those past a row's visited blocks are 0). Returns (table, row_stride T);
    the length is padded to a power of two. numpy masks (no segment ids) give a numpy table, built
    while tracing without a sort: as jax.numpy on constants, XLA folded it while compiling, seconds
    per table at long sequences (L = 16384 in 16-token tiles: ~7 s). jax masks give one computed at
    run time.
    """
    bt, n_outer, n_inner = any_.shape
    if _xp(any_, full) is np:
        full, part = full.reshape(-1, n_inner), (any_ & ~full).reshape(-1, n_inner)
        n_full, n_part = full.sum(1, dtype=np.int32), part.sum(1, dtype=np.int32)
        rows = np.zeros((full.shape[0], width + 2), np.int32)
        rows[:, 0], rows[:, 1] = n_full, n_part
        for mask, counts, before in ((full, n_full, np.zeros_like(n_full)), (part, n_part, n_full)):
            row, col = np.nonzero(mask)  # row-major: each row's blocks in increasing order
            start = np.cumsum(counts) - counts
            rows[row, 2 + before[row] + np.arange(row.size) - start[row]] = col
        flat = rows.reshape(-1)
    else:
        kind = jnp.where(full, 0, jnp.where(any_, 1, 2)).astype(jnp.int32)
        order = jnp.argsort(kind * n_inner + jnp.arange(n_inner, dtype=jnp.int32), axis=-1)[..., :width]
        n_full = jnp.sum(full, axis=-1, dtype=jnp.int32)[..., None]
        n_part = jnp.sum(any_ & ~full, axis=-1, dtype=jnp.int32)[..., None]
        order = jnp.where(jnp.arange(width) < n_full + n_part, order.astype(jnp.int32), 0)
        flat = jnp.concatenate([n_full, n_part, order], axis=-1).reshape(-1)
    size = pl_next_pow2(flat.shape[0])
    return _xp(flat).pad(flat, (0, size - flat.shape[0])), width + 2


def q_major_table(spec: MaskSpec, q_seg: jax.Array, k_seg: jax.Array, block_q: int, block_k: int):
    """(table, stride): the key blocks each query block visits (forward and dQ kernels)."""
    any_, full, k_width, _ = block_kinds(spec, q_seg, k_seg, block_q, block_k)
    return index_table(any_, full, k_width)


def k_major_table(spec: MaskSpec, q_seg: jax.Array, k_seg: jax.Array, block_q: int, block_k: int):
    """(table, stride): the query blocks each key block visits (dK/dV kernels)."""
    any_, full, _, q_width = block_kinds(spec, q_seg, k_seg, block_q, block_k)
    return index_table(any_.swapaxes(1, 2), full.swapaxes(1, 2), q_width)


def visited_fraction(any_: jax.Array) -> float:
    """Fraction of (query block, key block) pairs the kernels visit (for benchmarks / reports)."""
    return float(jnp.mean(any_.astype(jnp.float32)))


def padded_head_dim(dim: int) -> int:
    """The head dim the kernels see: the next power of two >= 16 (zero padding changes no dot product)."""
    return pl_next_pow2(max(dim, 16))
