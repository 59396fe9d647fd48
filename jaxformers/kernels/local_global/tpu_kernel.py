"""TPU (Pallas Mosaic) kernels of ``local_global_attention`` driven by the runtime block tables:
forward, dQ and dK/dV.

Why not only splash attention (``splash_tpu.py``): splash decides which blocks to skip from the
static mask, worked out on the host at trace time; segment ids are runtime data it applies element
by element. These kernels walk the block table that ``blocks.index_table`` builds from the mask
spec AND the segment ids on the device (the GPU kernels' tables), so a packed batch skips every
block pair that shares no segment and padding costs nothing (packed variable-length attention). ``api.local_global_attention`` sends packed calls (``segment_ids``
given) here on TPU and the rest to splash.

TPU idioms (the same as the BRA TPU kernels): the flat int32 table is scalar-prefetched into SMEM
(``PrefetchScalarGridSpec``); the grid is (batch, head, block) with the block axis innermost, and
the operand that a program walks (K/V for the forward and dQ, Q/dO/logsumexp/delta for dK/dV) is
one whole row per (batch, head), whose block index does not change along the block axis, so it
is fetched into VMEM once per row (HBM reads at the memory floor) and the visited 128-row blocks
are sliced there. Layouts keep every block's last two dims (8, 128)-legal: tokens head-major
(B, H, L, D); segment ids as columns (Bs, L, 1) and rows (Bs, 1, L) (one reshape apart), the
logsumexp and delta likewise, so no kernel transposes anything: dK/dV computes Sᵀ = K Qᵀ with
the query-side vectors as rows. Blocks are 128 x 128; the forward saves a base-2 logsumexp
(the GPU kernels' convention).

``local_global_attention_pallas(..., backend="tpu")`` pads, handles global tokens and GQA sums
around these kernels exactly as for the GPU kernels. :func:`fits` bounds the SMEM table and the
resident VMEM rows; calls beyond it take splash. Verified without a TPU: Pallas' TPU interpret
mode on CPU (simulated SMEM/VMEM, DMAs, race detector) against the reference, and lowering through
Pallas' Mosaic rules; never compiled by libtpu nor timed on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxformers.kernels.local_global.blocks import k_major_table, padded_head_dim, q_major_table
from jaxformers.kernels.local_global.mask import MaskSpec, allowed, segments_allowed
from jaxformers.kernels.local_global.tiles import LOG2_E, MASK_VALUE, dot, dot_nt, walk
from jaxformers.kernels.tpu_limits import SMEM_TABLE_BUDGET_BYTES, vmem_budget_bytes, vmem_limit_bytes

BLOCK = 128


def fits(batch_rows: int, q_len: int, k_len: int, dim: int, dim_v: int, itemsize: int) -> bool:
    """Whether a call's lengths and head dims, once padded as the wrapper pads them, stay within the
    SMEM table and this TPU's resident-VMEM budget (``tpu_limits``; the worst case: every block
    visited; ``batch_rows`` = rows of segment ids)."""
    n_q, n_k = -(-q_len // BLOCK), -(-k_len // BLOCK)
    q_len, k_len = n_q * BLOCK, n_k * BLOCK
    table = 4 * batch_rows * max(n_q * (n_k + 2), n_k * (n_q + 2))
    # VMEM pads the lane (last) dim to 128
    width = sum(-(-padded_head_dim(d) // 128) * 128 for d in (dim, dim_v))
    rows = 2 * max(k_len * width * itemsize + 8 * k_len * 4,  # forward / dQ: K, V, key segment row
                   q_len * width * itemsize + 3 * 8 * q_len * 4)  # dK/dV: Q, dO; lse, delta, segment rows
    return table <= SMEM_TABLE_BUDGET_BYTES and rows + (8 << 20) <= vmem_budget_bytes()


def _mask(spec: MaskSpec, s, row_start, col_start, row_seg, col_seg, queries_are_rows: bool):
    rows = row_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    cols = col_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    q_pos, k_pos, q_seg, k_seg = ((rows, cols, row_seg, col_seg) if queries_are_rows
                                  else (cols, rows, col_seg, row_seg))
    return jnp.where(allowed(spec, q_pos, k_pos) & segments_allowed(q_seg, k_seg), s, MASK_VALUE)


def _forward_kernel(table_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, o_ref, lse_ref, *, spec, c, stride, n_q,
                    per_batch):
    b, i = pl.program_id(0), pl.program_id(2)
    row = ((b if per_batch else 0) * n_q + i) * stride
    q, q_seg = q_ref[...], q_seg_ref[...]  # (bq, D), (bq, 1)

    def body(kb, carry, masked):
        m, l, acc = carry
        start = pl.multiple_of(kb * BLOCK, BLOCK)
        s = dot_nt(q, k_ref[pl.ds(start, BLOCK), :]) * c
        if masked:
            s = _mask(spec, s, i * BLOCK, start, q_seg, k_seg_ref[:, pl.ds(start, BLOCK)], True)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new)
        v = v_ref[pl.ds(start, BLOCK), :]
        return m_new, l * correction + jnp.sum(p, axis=1, keepdims=True), acc * correction + dot(p.astype(v.dtype), v)

    init = (jnp.full((BLOCK, 1), -jnp.inf, jnp.float32), jnp.zeros((BLOCK, 1), jnp.float32),
            jnp.zeros((BLOCK, v_ref.shape[-1]), jnp.float32))
    m, l, acc = walk(table_ref, row, body, init)
    empty = m < 0.5 * MASK_VALUE  # no allowed key in the whole row (padding query)
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = jnp.where(empty, 0.0, acc / safe_l).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(safe_l))


def _dq_kernel(table_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, dq_ref, *, spec, c,
               scale, stride, n_q, per_batch):
    b, i = pl.program_id(0), pl.program_id(2)
    row = ((b if per_batch else 0) * n_q + i) * stride
    q, do, q_seg, lse, delta = q_ref[...], do_ref[...], q_seg_ref[...], lse_ref[...], delta_ref[...]

    def body(kb, dq, masked):
        start = pl.multiple_of(kb * BLOCK, BLOCK)
        k = k_ref[pl.ds(start, BLOCK), :]
        s = dot_nt(q, k) * c
        if masked:
            s = _mask(spec, s, i * BLOCK, start, q_seg, k_seg_ref[:, pl.ds(start, BLOCK)], True)
        p = jnp.exp2(s - lse)
        ds = p * (dot_nt(do, v_ref[pl.ds(start, BLOCK), :]) - delta)
        return dq + dot(ds.astype(k.dtype), k)

    dq = walk(table_ref, row, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, k_ref, v_ref, k_seg_ref, q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, dk_ref, dv_ref, *,
                spec, c, scale, stride, n_k, per_batch):
    b, j = pl.program_id(0), pl.program_id(2)
    row = ((b if per_batch else 0) * n_k + j) * stride
    k, v, k_seg = k_ref[...], v_ref[...], k_seg_ref[...]  # (bk, D), (bk, Dv), (bk, 1)

    def body(qb, carry, masked):  # tiles are (keys, queries): no transposes
        dk, dv = carry
        start = pl.multiple_of(qb * BLOCK, BLOCK)
        q, do = q_ref[pl.ds(start, BLOCK), :], do_ref[pl.ds(start, BLOCK), :]
        s_t = dot_nt(k, q) * c
        if masked:
            s_t = _mask(spec, s_t, j * BLOCK, start, k_seg, q_seg_ref[:, pl.ds(start, BLOCK)], False)
        p_t = jnp.exp2(s_t - lse_ref[:, pl.ds(start, BLOCK)])
        dv = dv + dot(p_t.astype(do.dtype), do)
        ds_t = p_t * (dot_nt(v, do) - delta_ref[:, pl.ds(start, BLOCK)])
        return dk + dot(ds_t.astype(q.dtype), q), dv

    dk, dv = walk(table_ref, row, body, (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, table, grid, in_specs, out_specs, out_shape, interpret, name, operands):
    from jax.experimental.pallas import tpu as pltpu

    def padded_bytes(shape):  # a block in VMEM: (8, 128)-tiled, at most 4 bytes an element
        return -(-shape[-2] // 8) * 8 * -(-shape[-1] // 128) * 128 * 4

    block_bytes = sum(padded_bytes(s.block_shape) for s in [*in_specs, *out_specs])
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                  vmem_limit_bytes=vmem_limit_bytes(2 * block_bytes))
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs)
    return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, compiler_params=params,
                          interpret=interpret or False, name=name)(table, *operands)


def _heads_major(x):
    return x.transpose(0, 2, 1, 3)  # (B, L, H, D) -> (B, H, L, D)


def _columns_and_rows(seg):
    return seg[:, :, None], seg[:, None, :]  # (Bs, L, 1), (Bs, 1, L): one reshape apart


def _check(q, k):
    if q.shape[1] % BLOCK or k.shape[1] % BLOCK:
        raise ValueError(f"padded lengths must be multiples of {BLOCK}; got q {q.shape[1]}, k {k.shape[1]}")


def forward(spec: MaskSpec, scale: float, q, k, v, q_seg, k_seg, *, interpret=False):
    """(out (B, Lq, H, Dv), base-2 logsumexp (B, H, Lq)) for padded inputs (lengths multiples of 128;
    q (B, Lq, H, D), k/v (B, Lk, Hkv, D), q_seg/k_seg (B or 1, L) int32, 0 on padding).
    ``interpret``: False, or a ``pltpu.InterpretParams`` (TPU interpret mode on CPU)."""
    _check(q, k)
    batch, q_len, heads, dim = q.shape
    k_len, rep, dim_v = k.shape[1], heads // k.shape[2], v.shape[-1]
    per_batch = q_seg.shape[0] > 1
    seg_b = (lambda b: b) if per_batch else (lambda b: 0)
    table, stride = q_major_table(spec, q_seg, k_seg, BLOCK, BLOCK)
    kernel = functools.partial(_forward_kernel, spec=spec, c=float(scale) * LOG2_E, stride=stride,
                               n_q=q_len // BLOCK, per_batch=per_batch)
    q_col, _ = _columns_and_rows(q_seg)
    _, k_row = _columns_and_rows(k_seg)
    out, lse = _call(kernel, table, (batch, heads, q_len // BLOCK), [
        pl.BlockSpec((None, None, BLOCK, dim), lambda b, h, i, t: (b, h, i, 0)),
        pl.BlockSpec((None, None, k_len, dim), lambda b, h, i, t: (b, lax.div(h, rep), 0, 0)),
        pl.BlockSpec((None, None, k_len, dim_v), lambda b, h, i, t: (b, lax.div(h, rep), 0, 0)),
        pl.BlockSpec((None, BLOCK, 1), lambda b, h, i, t: (seg_b(b), i, 0)),
        pl.BlockSpec((None, 1, k_len), lambda b, h, i, t: (seg_b(b), 0, 0)),
    ], [pl.BlockSpec((None, None, BLOCK, dim_v), lambda b, h, i, t: (b, h, i, 0)),
        pl.BlockSpec((None, None, BLOCK, 1), lambda b, h, i, t: (b, h, i, 0))],
        [jax.ShapeDtypeStruct((batch, heads, q_len, dim_v), q.dtype),
         jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32)], interpret, "local_global_tpu_fwd",
        [_heads_major(q), _heads_major(k), _heads_major(v), q_col, k_row])
    return _heads_major(out), lse[..., 0]


def backward(spec: MaskSpec, kv_spec: MaskSpec, scale: float, q, k, v, q_seg, k_seg, lse, delta, d_out, *,
             interpret=False):
    """(dq, dk, dv); dk, dv per query head (B, Lk, H, D) in k's dtype (the caller sums GQA groups).
    ``lse`` (the forward's base-2 logsumexp) and ``delta`` = rowsum(out * d_out) are (B, H, Lq) f32;
    ``kv_spec`` is the mask the dK/dV kernel walks (see ``pallas_kernel._backward``)."""
    _check(q, k)
    batch, q_len, heads, dim = q.shape
    k_len, rep, dim_v = k.shape[1], heads // k.shape[2], v.shape[-1]
    per_batch = q_seg.shape[0] > 1
    seg_b = (lambda b: b) if per_batch else (lambda b: 0)
    c = float(scale) * LOG2_E
    qh, kh, vh, doh = (_heads_major(x) for x in (q, k, v, d_out))
    q_col, q_row = _columns_and_rows(q_seg)
    k_col, k_row = _columns_and_rows(k_seg)

    table, stride = q_major_table(spec, q_seg, k_seg, BLOCK, BLOCK)
    kernel = functools.partial(_dq_kernel, spec=spec, c=c, scale=float(scale), stride=stride, n_q=q_len // BLOCK,
                               per_batch=per_batch)
    own = lambda d: pl.BlockSpec((None, None, BLOCK, d), lambda b, h, i, t: (b, h, i, 0))  # noqa: E731
    (dq,) = _call(kernel, table, (batch, heads, q_len // BLOCK), [
        own(dim), own(dim_v), own(1), own(1),
        pl.BlockSpec((None, None, k_len, dim), lambda b, h, i, t: (b, lax.div(h, rep), 0, 0)),
        pl.BlockSpec((None, None, k_len, dim_v), lambda b, h, i, t: (b, lax.div(h, rep), 0, 0)),
        pl.BlockSpec((None, BLOCK, 1), lambda b, h, i, t: (seg_b(b), i, 0)),
        pl.BlockSpec((None, 1, k_len), lambda b, h, i, t: (seg_b(b), 0, 0)),
    ], [own(dim)], [jax.ShapeDtypeStruct(qh.shape, q.dtype)], interpret, "local_global_tpu_dq",
        [qh, doh, lse[..., None], delta[..., None], kh, vh, q_col, k_row])

    table, stride = k_major_table(kv_spec, q_seg, k_seg, BLOCK, BLOCK)
    kernel = functools.partial(_dkv_kernel, spec=kv_spec, c=c, scale=float(scale), stride=stride,
                               n_k=k_len // BLOCK, per_batch=per_batch)
    whole_row = lambda d: pl.BlockSpec((None, None, q_len, d), lambda b, h, j, t: (b, h, 0, 0))  # noqa: E731
    vector_row = pl.BlockSpec((None, None, 1, q_len), lambda b, h, j, t: (b, h, 0, 0))
    dk, dv = _call(kernel, table, (batch, heads, k_len // BLOCK), [
        pl.BlockSpec((None, None, BLOCK, dim), lambda b, h, j, t: (b, lax.div(h, rep), j, 0)),
        pl.BlockSpec((None, None, BLOCK, dim_v), lambda b, h, j, t: (b, lax.div(h, rep), j, 0)),
        pl.BlockSpec((None, BLOCK, 1), lambda b, h, j, t: (seg_b(b), j, 0)),
        whole_row(dim), whole_row(dim_v), vector_row, vector_row,
        pl.BlockSpec((None, 1, q_len), lambda b, h, j, t: (seg_b(b), 0, 0)),
    ], [pl.BlockSpec((None, None, BLOCK, dim), lambda b, h, j, t: (b, h, j, 0)),
        pl.BlockSpec((None, None, BLOCK, dim_v), lambda b, h, j, t: (b, h, j, 0))],
        [jax.ShapeDtypeStruct((batch, heads, k_len, dim), k.dtype),
         jax.ShapeDtypeStruct((batch, heads, k_len, dim_v), v.dtype)], interpret, "local_global_tpu_dkv",
        [kh, vh, k_col, qh, doh, lse[:, :, None, :], delta[:, :, None, :], q_row])
    return _heads_major(dq), _heads_major(dk), _heads_major(dv)
