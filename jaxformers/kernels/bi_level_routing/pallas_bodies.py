"""The three Pallas kernel bodies of bi-level routing attention, shared by every backend.

``forward_kernel`` (online softmax over the routed regions), ``dq_kernel`` (same routing) and
``dkv_kernel`` (inverse routing) see refs whose layout ``KernelConfig`` describes; launching,
layouts and the custom VJP live in ``pallas_kernel.py``. The shared path (one routed region per
step) uses only ops both Pallas' Triton (GPU) and Mosaic (TPU) lowerings accept: 2-D tiles,
``dot_general`` with f32 accumulation, ``fori_loop`` (also with dynamic bounds), scalar reads of
the routing tables. The GPU-only path (``kv_step``/``q_step`` > 1) adds vector-indexed gathers.

Every layout keeps a region's heads side by side on the minor (lane) axis, ``(T, heads * d)``, so
head dims below 128 do not each pad a TPU tile's 128 lanes. A head's tile is a slice of lanes; Mosaic
slices lanes at static offsets only, so on TPU the heads are a Python loop (unrolled) inside the
loop over regions.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["KernelConfig", "forward_kernel", "dq_kernel", "dkv_kernel"]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static (hashable) description of one kernel launch."""

    num_heads: int
    scale: float
    topk: int
    num_regions: int  # R (real)
    regions_padded: int  # R_pad, a multiple of both region block sizes
    tokens: int  # T (real)
    tokens_padded: int
    query_regions: int
    kv_regions: int
    kv_step: int  # routed key regions gathered per online-softmax step (forward, dQ); 1 on TPU
    q_step: int  # consumer query regions gathered per step (dK/dV); 1 on TPU
    topk_padded: int  # topk rounded up to kv_step (the routing table's padded width)
    layout: str  # "tpu" | "gpu"
    direct: bool  # kernels read/write the NHWC maps in place (no layout copies)
    regions_per_side: int  # S
    region_h: int
    region_w: int
    interpret: bool | object  # or a pltpu.InterpretParams (TPU interpret mode)
    poison: bool  # debug: outputs start as NaN so unwritten elements show up


# ----------------------------------------------------------------------------- in-kernel math
def _dot(a, b, contract_b: int, cfg: KernelConfig):
    """f32 ``a @ b`` (contract_b=0) or ``a @ b.T`` (contract_b=1) on 2-D tiles.

    Triton's ``tl.dot`` needs every side >= 16; smaller tiles (1x1 .. 2x2 regions) use a broadcast
    multiply and a reduction instead, which every backend lowers.
    """
    m, kdim = a.shape
    n = b.shape[1 - contract_b]
    if cfg.layout == "gpu" and min(m, n, kdim) < 16:
        a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
        if contract_b == 1:
            return jnp.sum(a32[:, None, :] * b32[None, :, :], axis=2)
        return jnp.sum(a32[:, :, None] * b32[None, :, :], axis=1)
    # Default precision, as the reference's einsums: jax's default matmul precision (TF32 tensor cores
    # for float32 on GPU, unless ``jax.default_matmul_precision("float32")`` asks for more).
    return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _route_mask(cfg: KernelConfig, shape, axis: int, step):
    """Valid keys along ``axis`` of a score tile holding routed step ``step`` (``kv_step`` regions of
    T_pad tokens each): real routes (< topk) and real tokens (< T). None when all are valid."""
    check_routes, check_tokens = cfg.topk_padded != cfg.topk, cfg.tokens_padded != cfg.tokens
    if not (check_routes or check_tokens):
        return None
    route, token = _div_mod(jax.lax.broadcasted_iota(jnp.int32, shape, axis), cfg.tokens_padded)
    valid = token < cfg.tokens if check_tokens else None
    if check_routes:
        real = step * cfg.kv_step + route < cfg.topk
        valid = real if valid is None else valid & real
    return valid


def _div_mod(i, n: int):
    """Quotient and remainder of a non-negative loop index (truncating ``lax`` ops: ``//`` and ``%``
    on traced ints add sign fix-ups the Triton lowering rejects)."""
    return jax.lax.div(i, n), jax.lax.rem(i, n)


def _batch_of_resident(cfg: KernelConfig):
    """Index of the current image in a resident (whole-image) ref: blocked on TPU, whole on GPU."""
    return 0 if cfg.layout == "tpu" else pl.program_id(0)


def _each_region_head(cfg: KernelConfig, count: int, body) -> None:
    """Calls ``body(r, h)`` for regions ``r < count`` and heads ``h``: a loop over both on GPU; on
    TPU a loop over regions with the heads unrolled (their tiles are lane slices at static offsets)."""
    if cfg.layout == "tpu":
        def one_region(r, carry):
            for h in range(cfg.num_heads):
                body(r, h)
            return carry

        jax.lax.fori_loop(0, count, one_region, 0)
        return

    def one_region_head(i, carry):
        body(*_div_mod(i, cfg.num_heads))
        return carry

    jax.lax.fori_loop(0, count * cfg.num_heads, one_region_head, 0)


def _get(cfg: KernelConfig, ref, where, head):
    """The (T_pad, d) tile of one region and head; ``where`` = (image index in ref, region index).

    Blocked layouts ``(B, R_pad, T_pad, heads * d)`` slice the head's lanes of ``ref[image,
    region]``; the direct layout cuts the region's ``region_h x region_w`` window and the head's
    channels out of the NHWC map in place."""
    image, region = where
    d = ref.shape[-1] // cfg.num_heads
    if not cfg.direct:
        return ref[image, region, :, pl.ds(head * d, d)]
    row, col = _div_mod(region, cfg.regions_per_side)
    tile = ref[image, pl.ds(row * cfg.region_h, cfg.region_h), pl.ds(col * cfg.region_w, cfg.region_w),
               pl.ds(head * d, d)]
    return tile.reshape(cfg.tokens, d)


def _set(cfg: KernelConfig, ref, where, head, value):
    """Writes one (T_pad, d) region/head tile (see :func:`_get`)."""
    image, region = where
    value = value.astype(ref.dtype)
    d = ref.shape[-1] // cfg.num_heads
    if not cfg.direct:
        ref[image, region, :, pl.ds(head * d, d)] = value
        return
    row, col = _div_mod(region, cfg.regions_per_side)
    ref[image, pl.ds(row * cfg.region_h, cfg.region_h), pl.ds(col * cfg.region_w, cfg.region_w),
        pl.ds(head * d, d)] = value.reshape(cfg.region_h, cfg.region_w, d)


def _gather(cfg: KernelConfig, ref, image, regions, tokens, head):
    """(n, d) rows of one head: token ``tokens[i]`` of region ``regions[i]`` (int vectors of length n).

    A gather of whole routed regions in one load (vector-indexed ref read: GPU and interpret mode),
    so a program handles several small regions per step instead of many tiny tiles."""
    d = ref.shape[-1] // cfg.num_heads
    if not cfg.direct:
        return ref[image, regions, tokens, pl.ds(head * d, d)]
    row, col = _div_mod(regions, cfg.regions_per_side)
    token_row, token_col = _div_mod(tokens, cfg.region_w)
    return ref[image, row * cfg.region_h + token_row, col * cfg.region_w + token_col, pl.ds(head * d, d)]


def _routed(cfg: KernelConfig, table_ref, k_ref, v_ref, b, kv_b, region, step, head):
    """K and V tiles (kv_step * T_pad, d) of routed step ``step`` of query region ``region``."""
    if cfg.kv_step == 1:  # one routed region: a plain tile (the TPU path)
        kv_region = table_ref[b, region, step]
        return _get(cfg, k_ref, (kv_b, kv_region), head), _get(cfg, v_ref, (kv_b, kv_region), head)
    route, token = _div_mod(jax.lax.broadcasted_iota(jnp.int32, (cfg.kv_step * cfg.tokens_padded,), 0),
                            cfg.tokens_padded)
    regions = table_ref[b, region, step * cfg.kv_step + route]
    return (_gather(cfg, k_ref, kv_b, regions, token, head), _gather(cfg, v_ref, kv_b, regions, token, head))


def _stat_column(region, head):
    """Index of the (T_pad, 1) log-sum-exp or delta column of one region and head in a block of
    statistics ``(B, R_pad, T_pad, heads)``: the forward writes it, dQ reads it."""
    return 0, region, slice(None), pl.ds(head, 1)


def _consumers(cfg: KernelConfig, rows_ref, q_ref, do_ref, lse_ref, delta_ref, b, q_b, first, head):
    """q, dO (q_step * T_pad, d) and log-sum-exp, delta rows (1, q_step * T_pad) of the consumer
    query regions listed at ``rows[first : first + q_step]``. The statistics come as rows here,
    ``(B, R_pad, 1, heads * T_pad)``: one region's heads side by side."""
    tp = cfg.tokens_padded
    if cfg.q_step == 1:
        q_region = rows_ref[b, first]
        lanes = pl.ds(head * tp, tp)
        return (_get(cfg, q_ref, (q_b, q_region), head), _get(cfg, do_ref, (q_b, q_region), head),
                lse_ref[q_b, q_region, :, lanes], delta_ref[q_b, q_region, :, lanes])
    n = cfg.q_step * tp
    entry, token = _div_mod(jax.lax.broadcasted_iota(jnp.int32, (n,), 0), tp)
    regions, lanes = rows_ref[b, first + entry], head * tp + token
    return (_gather(cfg, q_ref, q_b, regions, token, head), _gather(cfg, do_ref, q_b, regions, token, head),
            lse_ref[q_b, regions, 0, lanes].reshape(1, n), delta_ref[q_b, regions, 0, lanes].reshape(1, n))


def _own(cfg: KernelConfig, image, local, region):
    """Where-tuple of this program's own tile: its slot in the program's block (region blocks; on
    TPU's direct layout the block is one row of regions of the map, so slot = column), or its place
    in the whole map (GPU's direct layout).

    ``image`` is ``pl.program_id(0)`` read at the kernel's top level (interpret mode cannot
    evaluate ``program_id`` inside loop bodies)."""
    return (image, region) if cfg.direct and cfg.layout == "gpu" else (0, local)


# ----------------------------------------------------------------------------- kernels
def forward_kernel(table_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: KernelConfig):
    b, group = pl.program_id(0), pl.program_id(1)
    kv_b = _batch_of_resident(cfg)
    tp = cfg.tokens_padded

    def one_region_head(r, h):
        region = group * cfg.query_regions + r
        q = _get(cfg, q_ref, _own(cfg, b, r, region), h)
        d_v = v_ref.shape[-1] // cfg.num_heads

        def one_step(step, carry):
            m, l, acc = carry
            k, v = _routed(cfg, table_ref, k_ref, v_ref, b, kv_b, region, step, h)
            s = _dot(q, k, 1, cfg) * cfg.scale
            mask = _route_mask(cfg, s.shape, 1, step)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new)
            l = l * correction + jnp.sum(p, axis=1, keepdims=True)
            acc = acc * correction + _dot(p.astype(v.dtype), v, 0, cfg)
            return m_new, l, acc

        init = (jnp.full((tp, 1), -jnp.inf, jnp.float32), jnp.zeros((tp, 1), jnp.float32),
                jnp.zeros((tp, d_v), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, cfg.topk_padded // cfg.kv_step, one_step, init)
        _set(cfg, o_ref, _own(cfg, b, r, region), h, acc / l)
        lse_ref[_stat_column(r, h)] = m + jnp.log(l)

    _each_region_head(cfg, cfg.query_regions, one_region_head)


def dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: KernelConfig):
    b, group = pl.program_id(0), pl.program_id(1)
    kv_b = _batch_of_resident(cfg)

    def one_region_head(r, h):
        region = group * cfg.query_regions + r
        q, do = _get(cfg, q_ref, _own(cfg, b, r, region), h), _get(cfg, do_ref, _own(cfg, b, r, region), h)
        lse, delta = lse_ref[_stat_column(r, h)], delta_ref[_stat_column(r, h)]

        def one_step(step, dq):
            k, v = _routed(cfg, table_ref, k_ref, v_ref, b, kv_b, region, step, h)
            p = jnp.exp(_dot(q, k, 1, cfg) * cfg.scale - lse)
            mask = _route_mask(cfg, p.shape, 1, step)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            ds = p * (_dot(do, v, 1, cfg) - delta)
            return dq + _dot(ds.astype(k.dtype), k, 0, cfg)

        dq = jax.lax.fori_loop(0, cfg.topk_padded // cfg.kv_step, one_step, jnp.zeros(q.shape, jnp.float32))
        _set(cfg, dq_ref, _own(cfg, b, r, region), h, dq * cfg.scale)

    _each_region_head(cfg, cfg.query_regions, one_region_head)


def dkv_kernel(rows_ref, offsets_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref,
               *, cfg: KernelConfig):
    b, group = pl.program_id(0), pl.program_id(1)
    q_b = _batch_of_resident(cfg)

    def one_region_head(r, h):
        region = group * cfg.kv_regions + r
        k, v = _get(cfg, k_ref, _own(cfg, b, r, region), h), _get(cfg, v_ref, _own(cfg, b, r, region), h)
        first, end = offsets_ref[b, region], offsets_ref[b, region + 1]

        def one_step(step, carry):
            dk, dv = carry
            entry = first + step * cfg.q_step
            q, do, lse, delta = _consumers(cfg, rows_ref, q_ref, do_ref, lse_ref, delta_ref, b, q_b, entry, h)
            # Key-major throughout (p transposed), so no in-kernel transposes are needed.
            p_t = jnp.exp(_dot(k, q, 1, cfg) * cfg.scale - lse)  # (keys, consumer queries)
            mask = None
            if cfg.tokens_padded != cfg.tokens:  # padded key tokens of this region
                mask = jax.lax.broadcasted_iota(jnp.int32, p_t.shape, 0) < cfg.tokens
            if cfg.q_step > 1:  # the last step's gathered entries past this region's list
                listed = entry + _div_mod(jax.lax.broadcasted_iota(jnp.int32, p_t.shape, 1),
                                          cfg.tokens_padded)[0] < end
                mask = listed if mask is None else mask & listed
            if mask is not None:
                p_t = jnp.where(mask, p_t, 0.0)
            dv = dv + _dot(p_t.astype(do.dtype), do, 0, cfg)
            ds_t = p_t * (_dot(v, do, 1, cfg) - delta)
            return dk + _dot(ds_t.astype(q.dtype), q, 0, cfg), dv

        init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        steps = jax.lax.div(end - first + cfg.q_step - 1, cfg.q_step)
        dk, dv = jax.lax.fori_loop(0, steps, one_step, init)
        _set(cfg, dk_ref, _own(cfg, b, r, region), h, dk * cfg.scale)
        _set(cfg, dv_ref, _own(cfg, b, r, region), h, dv)

    _each_region_head(cfg, cfg.kv_regions, one_region_head)
