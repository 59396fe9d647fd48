"""Hopper (sm90) kernels of ``local_global_attention`` in Pallas Mosaic GPU: forward, dQ, dK/dV.

The same block-sparse schedule as ``pallas_kernel.py`` (the Triton kernels), written for the
Hopper features that the Triton lowering cannot reach: TMA copies into swizzled shared memory,
warpgroup MMAs (``wgmma``) and warp specialisation (``mosaic_pipeline.py``: two compute
warpgroups of 64 rows each, one memory warpgroup streaming the blocks that ``blocks.index_table``
lists, through a ring of shared-memory slots).

- Forward: per (head, tile of 128 queries, batch row), K/V blocks streamed; online softmax in
  base 2 with float32 accumulators; saves the base-2 logsumexp (the Triton path's convention, so
  either backward can follow either forward). Full blocks run without an element mask; partial
  ones apply ``mask.allowed`` and the segment ids. Queries with no allowed key (padding) produce
  zeros and a +inf logsumexp.
- dQ: per query tile, K/V blocks streamed; P recomputed from the logsumexp.
- dK/dV: per (query head, tile of 128 keys), the query-side blocks (Q, dO, logsumexp, delta,
  segment ids) streamed over the transposed table; computes Sᵀ = K Qᵀ directly, so every
  wgmma takes its B operand from shared memory as stored. With grouped-query attention each
  query head writes its own dK/dV (in the input dtype) and ``pallas_kernel`` sums them.
- BRA (``bi_level_routing/mosaic_gpu.py``) walks its own visit tables and, for regions smaller
  than a block, masks partial blocks by per-row routing bit words (:class:`Route`) instead of
  the window/segment rules.

Supported: bfloat16/float16 inputs, head dim (of q, k and v alike) 32, 64 or 128. ``pallas_kernel``
sends anything else to the Triton kernels. The tests run these kernels in Mosaic GPU interpret
mode on CPU (which simulates shared memory, barriers, TMA and wgmma, with a race detector) and
lower them for CUDA from a CPU host; ``benchmarks/compile_check.py`` compiles them for an H100
(ptxas: no spills at head dims 32-128); they have not been timed on a GPU yet. Interpret mode
differs in one place: its wgmma reads the A operand from shared memory only and takes no
accumulator input, so there the probability tiles are staged through shared memory and each
product is added to its accumulator (on the GPU wgmma accumulates in place).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxformers.kernels.local_global import mosaic_pipeline as mp
from jaxformers.kernels.local_global.blocks import index_table, k_major_table, q_major_table
from jaxformers.kernels.local_global.mask import MaskSpec, allowed
from jaxformers.kernels.local_global.tiles import LOG2_E, MASK_VALUE

TOKENS, KV_TOKENS = mp.Operand("tokens"), mp.Operand("tokens", kv=True)
PER_HEAD, PER_ROW, BIT_WORDS = mp.Operand("per_head"), mp.Operand("per_row"), mp.Operand("words")
interpret_params = mp.interpret_params


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Rows per compute warpgroup and per streamed block (multiples of 64), ring depth, and compute
    warpgroups per CUDA block (2; 1 when consecutive 64-row blocks visit different lists)."""

    block: int = 64
    stages: int = 2
    warpgroups: int = 2

    def __post_init__(self):
        if self.block % 64 or not 1 <= self.stages <= 4 or self.warpgroups not in (1, 2):
            raise ValueError("MosaicBlocks needs a block that is a multiple of 64, 1..4 stages and 1 or 2 "
                             f"warpgroups; got {self}")

    @property
    def tile(self) -> int:
        """Rows of one CUDA block (all compute warpgroups): the padding multiple of q and k."""
        return self.warpgroups * self.block


@dataclasses.dataclass(frozen=True)
class Route:
    """Region-level routing as the element mask of partial blocks (bi-level routing attention with
    regions smaller than a block): a query may see a key iff the query's region routed to the key's.

    Rows of q and k are region-major, ``2**shift`` tokens per region (shift 0..5, so a 64-row block
    holds whole regions; its regions' bits lie in one word, or two for 1-token regions, where the
    words must extend to 2 per block). ``q_words`` (B, W, Lq) int32: bit j of
    word w of query row i is set iff i's region routed to key region 32w + j; ``k_words`` (B, W, Lk),
    the transpose: bit j of word w of key row i is set iff query region 32w + j routed to i's region.
    Padding rows have no bits. The segment ids and ``MaskSpec`` are ignored where a route is given.
    """

    q_words: jax.Array
    k_words: jax.Array
    shift: int

    def __post_init__(self):
        if not 0 <= self.shift <= 5:
            raise ValueError(f"Route needs 1..32 tokens per region (shift 0..5); got shift {self.shift}")


def supported(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether these kernels handle these inputs (else the Triton kernels do)."""
    dims = {q.shape[-1], k.shape[-1], v.shape[-1]}
    return (len(dims) == 1 and dims.pop() in (32, 64, 128)
            and q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16))


def _logits(spec: MaskSpec, c: float, own, streamed, own_start, block_start, own_seg, block_seg_ref, masked: bool,
            queries_own: bool = True, route=None):
    """Scaled logits of a resident tile against a streamed block, masked when ``masked``.

    ``own``/``streamed`` are the (rows, D) shared-memory tiles; with ``queries_own`` the resident
    tile holds the queries (logits (queries, keys)), else the keys (logits transposed, (keys,
    queries), as the dK/dV kernel wants them). ``own_seg`` holds the resident rows' segment ids
    (row layout), ``block_seg_ref`` the streamed block's (read only when masked). ``route``: the
    resident rows' (W, rows) routing words and ``Route.shift``; then the routing alone masks.
    """
    shape = (own.shape[0], streamed.shape[0])
    s = mp.mma(own, streamed.transpose((1, 0)), shape) * c
    if not masked:
        return s
    if route is not None:
        words_ref, shift = route
        region = block_start >> shift  # the streamed block's first region
        bit = (region & 31) + (_iota(shape, 1) >> shift)  # < 32, or < 64 for 1-token regions
        words = _rows(mp.load(words_ref.at[region >> 5], mp.ROWS), shape)
        if shift == 0:  # 64 regions per block: the second half of the columns reads the next word
            words = jnp.where(bit < 32, words, _rows(mp.load(words_ref.at[(region >> 5) + 1], mp.ROWS), shape))
            bit = bit & 31
        return jnp.where(((words >> bit) & 1) != 0, s, MASK_VALUE)
    own_pos, block_pos = own_start + _iota(shape, 0), block_start + _iota(shape, 1)
    own_seg, block_seg = _rows(own_seg, shape), _cols(mp.load(block_seg_ref, mp.COLS), shape)
    q_pos, k_pos, q_seg, k_seg = ((own_pos, block_pos, own_seg, block_seg) if queries_own
                                  else (block_pos, own_pos, block_seg, own_seg))
    ok = allowed(spec, q_pos, k_pos) & (q_seg == k_seg) & (k_seg != 0)
    return jnp.where(ok, s, MASK_VALUE)


def _iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=mp.ACC)


def _rows(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):
    return lax.broadcast_in_dim(x, shape, [1])


def visit_tables(any_: jax.Array, full_: jax.Array, q_width: int, k_width: int) -> tuple[tuple, tuple]:
    """Visit tables for kernels with ONE compute warpgroup (tile == block), from (B or 1, n, n)
    masks of visited / fully allowed (query block, key block) pairs: (key blocks per query block,
    query blocks per key block), each a (table, stride, per_batch) triple (``per_batch``: one
    block of table rows per batch row). ``q_width``/``k_width`` bound the visited blocks of any
    query block / key block."""
    per_batch = any_.shape[0] > 1
    q_major = (*index_table(any_, full_, q_width), per_batch)
    k_major = (*index_table(jnp.swapaxes(any_, 1, 2), jnp.swapaxes(full_, 1, 2), k_width), per_batch)
    return q_major, k_major


def _q_major(spec: MaskSpec, q_seg, k_seg, blocks: MosaicBlocks):
    """Key blocks per query tile (forward, dQ)."""
    return (*q_major_table(spec, q_seg, k_seg, blocks.tile, blocks.block), max(q_seg.shape[0], k_seg.shape[0]) > 1)


def _k_major(spec: MaskSpec, q_seg, k_seg, blocks: MosaicBlocks):
    """Query blocks per key tile (dK/dV)."""
    return (*k_major_table(spec, q_seg, k_seg, blocks.block, blocks.tile), max(q_seg.shape[0], k_seg.shape[0]) > 1)


def _name(routed: bool, kernel: str) -> str:
    """The kernel's name in profiles and compiler dumps (a given table or route is BRA's routing)."""
    return f"mosaic_{'bra' if routed else 'local_global'}_{kernel}"


def _check(q, k, blocks: MosaicBlocks):
    if q.shape[1] % blocks.tile or k.shape[1] % blocks.tile:
        raise ValueError(f"padded lengths must be multiples of {blocks.tile}; got q {q.shape[1]}, k {k.shape[1]}")


def forward(spec: MaskSpec, scale: float, q, k, v, q_seg, k_seg, *, blocks: MosaicBlocks = MosaicBlocks(),
            interpret=False, table: tuple[jax.Array, int, bool] | None = None, route: Route | None = None):
    """(out, base-2 logsumexp (B, H, Lq)) for padded inputs.

    q (B, Lq, H, D), k, v (B, Lk, Hkv, D), lengths multiples of ``blocks.tile``; q_seg/k_seg
    (B or 1, L) int32 with 0 on padding positions. ``interpret``: False (compile for the GPU),
    True or ``interpret_params(...)`` (run on the CPU). ``table``: the key blocks per query tile to
    walk, a (table, stride, per_batch) triple (see ``visit_tables``), instead of the ones ``spec``
    gives (BRA passes its routing); ``route``: the routing that masks partial blocks instead of
    ``spec`` and the segment ids.
    """
    _check(q, k, blocks)
    batch, q_len, heads, dim = q.shape
    bq = bk = blocks.block
    name = _name(route is not None or table is not None, "fwd")
    table, stride, per_batch = table or _q_major(spec, q_seg, k_seg, blocks)
    c = float(scale) * LOG2_E
    Q, QSEG, K, V, KSEG, WORDS = range(6)

    def init(res):
        return (mp.full(-jnp.inf, (bq,), mp.ROWS), mp.full(0.0, (bq,), mp.ROWS), mp.full(0.0, (bq, dim), mp.ACC),
                mp.load(res[QSEG], mp.ROWS))

    def step(res, blk, q_start, k_start, masked, carry, accumulate):
        m, l, acc, q_seg_rows = carry
        s = _logits(spec, c, res[Q], blk[K], q_start, k_start, q_seg_rows, blk[KSEG], masked,
                    route=route and (res[WORDS], route.shift))
        m_new = jnp.maximum(m, s.max(axis=1))
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s - _rows(m_new, s.shape))
        acc = accumulate(acc * _rows(correction, acc.shape), p, blk[V])
        return m_new, l * correction + p.sum(axis=1), acc, q_seg_rows

    def finish(res, carry):
        m, l, acc, _ = carry
        empty = m < 0.5 * MASK_VALUE  # no allowed key in the whole row (padding query)
        safe_l = jnp.where(empty, 1.0, l)
        out = jnp.where(_rows(empty, acc.shape), 0.0, acc / _rows(safe_l, acc.shape))
        return out, jnp.where(empty, jnp.inf, m + jnp.log2(safe_l))

    return mp.block_sparse_call(
        grid=(heads, q_len // blocks.tile, batch),
        operands=[(q, TOKENS), (q_seg, PER_ROW), (k, KV_TOKENS), (v, KV_TOKENS), (k_seg, PER_ROW)]
        + ([(route.q_words, BIT_WORDS)] if route else []),
        resident=(Q, QSEG) + ((WORDS,) if route else ()), streamed=(K, V, KSEG),
        outputs=[(jax.ShapeDtypeStruct(q.shape, q.dtype), TOKENS, Q),
                 (jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32), PER_HEAD, None)],
        table=table, stride=stride, tile_rows=bq, block_rows=bk, stages=blocks.stages, rep=heads // k.shape[2],
        per_batch=per_batch, init=init, step=step, finish=finish, stage_dtype=q.dtype,
        interpret=interpret, warpgroups=blocks.warpgroups, name=name)


def backward(spec: MaskSpec, kv_spec: MaskSpec, scale: float, q, k, v, q_seg, k_seg, lse, delta, d_out, *,
             blocks: MosaicBlocks = MosaicBlocks(), interpret=False, tables: tuple | None = None,
             route: Route | None = None):
    """(dq, dk, dv) for padded inputs; dk, dv are per query head, (B, Lk, H, D) in k's dtype.

    ``lse`` is the forward's base-2 logsumexp and ``delta`` = rowsum(out * d_out), both (B, H, Lq)
    float32. ``kv_spec`` is the mask the dK/dV kernel walks (``pallas_kernel`` drops the global
    keys from it and computes their gradients by a dense side pass). ``tables``: (key blocks per
    query tile, query blocks per key tile), each a (table, stride, per_batch), instead of the specs';
    ``route`` as in :func:`forward`.
    """
    _check(q, k, blocks)
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    routed = route is not None or tables is not None  # BRA's routing (names the kernels)
    bq = bk = blocks.block
    rep = heads // k.shape[2]
    c = float(scale) * LOG2_E
    common = dict(stages=blocks.stages, rep=rep, stage_dtype=q.dtype, interpret=interpret,
                  tile_rows=bq, block_rows=bk, warpgroups=blocks.warpgroups)
    q_major, k_major = tables or (_q_major(spec, q_seg, k_seg, blocks), _k_major(kv_spec, q_seg, k_seg, blocks))

    # dQ: query tiles resident, K/V blocks streamed.
    Q, DO, LSE, DELTA, QSEG, K, V, KSEG, WORDS = range(9)
    table, stride, per_batch = q_major

    def dq_init(res):
        return (mp.full(0.0, (bq, dim), mp.ACC), mp.load(res[LSE], mp.ROWS), mp.load(res[DELTA], mp.ROWS),
                mp.load(res[QSEG], mp.ROWS))

    def dq_step(res, blk, q_start, k_start, masked, carry, accumulate):
        dq, lse_rows, delta_rows, q_seg_rows = carry
        s = _logits(spec, c, res[Q], blk[K], q_start, k_start, q_seg_rows, blk[KSEG], masked,
                    route=route and (res[WORDS], route.shift))
        p = jnp.exp2(s - _rows(lse_rows, s.shape))
        dp = mp.mma(res[DO], blk[V].transpose((1, 0)), (bq, bk))
        ds = p * (dp - _rows(delta_rows, s.shape))
        return accumulate(dq, ds, blk[K]), lse_rows, delta_rows, q_seg_rows

    (dq,) = mp.block_sparse_call(
        grid=(heads, q_len // blocks.tile, batch),
        operands=[(q, TOKENS), (d_out, TOKENS), (lse, PER_HEAD), (delta, PER_HEAD), (q_seg, PER_ROW),
                  (k, KV_TOKENS), (v, KV_TOKENS), (k_seg, PER_ROW)]
        + ([(route.q_words, BIT_WORDS)] if route else []),
        resident=(Q, DO, LSE, DELTA, QSEG) + ((WORDS,) if route else ()), streamed=(K, V, KSEG),
        outputs=[(jax.ShapeDtypeStruct(q.shape, q.dtype), TOKENS, Q)],
        table=table, stride=stride, per_batch=per_batch, init=dq_init, step=dq_step,
        finish=lambda res, carry: (carry[0] * scale,), name=_name(routed, "dq"), **common)

    # dK/dV: key tiles resident (per query head), query-side blocks streamed; tiles are (keys, queries).
    K, V, KSEG, Q, DO, LSE, DELTA, QSEG, WORDS = range(9)
    table, stride, per_batch = k_major

    def dkv_init(res):
        zeros = mp.full(0.0, (bk, dim), mp.ACC)
        return zeros, zeros, mp.load(res[KSEG], mp.ROWS)

    def dkv_step(res, blk, k_start, q_start, masked, carry, accumulate):
        dk, dv, k_seg_rows = carry
        st = _logits(kv_spec, c, res[K], blk[Q], k_start, q_start, k_seg_rows, blk[QSEG], masked, queries_own=False,
                     route=route and (res[WORDS], route.shift))
        pt = jnp.exp2(st - _cols(mp.load(blk[LSE], mp.COLS), st.shape))
        dv = accumulate(dv, pt, blk[DO])
        dpt = mp.mma(res[V], blk[DO].transpose((1, 0)), (bk, bq))
        dst = pt * (dpt - _cols(mp.load(blk[DELTA], mp.COLS), st.shape))
        return accumulate(dk, dst, blk[Q]), dv, k_seg_rows

    per_head = jax.ShapeDtypeStruct((batch, k_len, heads, dim), k.dtype)
    dk, dv = mp.block_sparse_call(
        grid=(heads, k_len // blocks.tile, batch),
        operands=[(k, KV_TOKENS), (v, KV_TOKENS), (k_seg, PER_ROW), (q, TOKENS), (d_out, TOKENS),
                  (lse, PER_HEAD), (delta, PER_HEAD), (q_seg, PER_ROW)]
        + ([(route.k_words, BIT_WORDS)] if route else []),
        resident=(K, V, KSEG) + ((WORDS,) if route else ()), streamed=(Q, DO, LSE, DELTA, QSEG),
        outputs=[(per_head, TOKENS, K), (per_head, TOKENS, V)],  # written over the K/V tiles
        table=table, stride=stride, per_batch=per_batch, init=dkv_init, step=dkv_step,
        finish=lambda res, carry: (carry[0] * scale, carry[1]), name=_name(routed, "dkv"),
        **common)
    return dq, dk, dv
