"""The three Pallas kernel bodies of bi-level routing attention, shared by every backend.

``forward_kernel`` (online softmax over the routed regions), ``dq_kernel`` (same routing) and
``dkv_kernel`` (inverse routing) see refs whose layout ``KernelConfig`` describes; launching,
layouts and the custom VJP live in ``pallas_kernel.py``. Only ops that both Pallas' Triton (GPU)
and Mosaic (TPU) lowerings accept are used: 2-D tiles, ``dot_general`` with f32 accumulation,
``fori_loop`` (also with dynamic bounds), scalar reads of the routing tables.
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
    layout: str  # "tpu" | "gpu"
    direct: bool  # GPU: kernels read/write the NHWC maps in place (no layout copies)
    regions_per_side: int  # S
    region_h: int
    region_w: int
    interpret: bool
    poison: bool  # debug: outputs start as NaN so unwritten elements show up
    exact_f32: bool  # float32 inputs: full-precision dots


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
    precision = jax.lax.Precision.HIGHEST if cfg.exact_f32 else None
    return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _key_mask(cfg: KernelConfig, shape, axis: int):
    """True where the key token along ``axis`` is real (not T padding); None when there is none."""
    if cfg.tokens == cfg.tokens_padded:
        return None
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis) < cfg.tokens


def _div_mod(i, n: int):
    """Quotient and remainder of a non-negative loop index (truncating ``lax`` ops: ``//`` and ``%``
    on traced ints add sign fix-ups the Triton lowering rejects)."""
    return jax.lax.div(i, n), jax.lax.rem(i, n)


def _batch_of_resident(cfg: KernelConfig):
    """Index of the current image in a resident (whole-image) ref: blocked on TPU, whole on GPU."""
    return 0 if cfg.layout == "tpu" else pl.program_id(0)


def _get(cfg: KernelConfig, ref, where, head):
    """The (T_pad, d) tile of one region and head; ``where`` = (image index in ref, region index).

    Blocked layouts index ``ref[image, region, head]``; the direct layout cuts the region's
    ``region_h x region_w`` window and the head's channels out of the NHWC map in place."""
    image, region = where
    if not cfg.direct:
        return ref[image, region, head]
    row, col = _div_mod(region, cfg.regions_per_side)
    d = ref.shape[-1] // cfg.num_heads
    tile = ref[image, pl.ds(row * cfg.region_h, cfg.region_h), pl.ds(col * cfg.region_w, cfg.region_w),
               pl.ds(head * d, d)]
    return tile.reshape(cfg.tokens, d)


def _set(cfg: KernelConfig, ref, where, head, value):
    """Writes one (T_pad, d) region/head tile (see :func:`_get`)."""
    image, region = where
    value = value.astype(ref.dtype)
    if not cfg.direct:
        ref[image, region, head] = value
        return
    row, col = _div_mod(region, cfg.regions_per_side)
    d = ref.shape[-1] // cfg.num_heads
    ref[image, pl.ds(row * cfg.region_h, cfg.region_h), pl.ds(col * cfg.region_w, cfg.region_w),
        pl.ds(head * d, d)] = value.reshape(cfg.region_h, cfg.region_w, d)


def _own(cfg: KernelConfig, image, local, region):
    """Where-tuple of this program's own (blocked) tile: its block slot, or its place in the map.

    ``image`` is ``pl.program_id(0)`` read at the kernel's top level (interpret mode cannot
    evaluate ``program_id`` inside loop bodies)."""
    return (image, region) if cfg.direct else (0, local)


# ----------------------------------------------------------------------------- kernels
def forward_kernel(table_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: KernelConfig):
    b, group = pl.program_id(0), pl.program_id(1)
    kv_b = _batch_of_resident(cfg)
    tp = cfg.tokens_padded

    def one_region_head(i, _):
        r, h = _div_mod(i, cfg.num_heads)
        region = group * cfg.query_regions + r
        q = _get(cfg, q_ref, _own(cfg, b, r, region), h)
        d_v = v_ref.shape[-1] // cfg.num_heads if cfg.direct else v_ref.shape[-1]

        def one_routed_region(t, carry):
            m, l, acc = carry
            kv_region = table_ref[b, region, t]
            k = _get(cfg, k_ref, (kv_b, kv_region), h)
            v = _get(cfg, v_ref, (kv_b, kv_region), h)
            s = _dot(q, k, 1, cfg) * cfg.scale
            mask = _key_mask(cfg, s.shape, 1)
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
        m, l, acc = jax.lax.fori_loop(0, cfg.topk, one_routed_region, init)
        _set(cfg, o_ref, _own(cfg, b, r, region), h, acc / l)
        lse_ref[0, r, h] = m + jnp.log(l)
        return 0

    jax.lax.fori_loop(0, cfg.query_regions * cfg.num_heads, one_region_head, 0)


def dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: KernelConfig):
    b, group = pl.program_id(0), pl.program_id(1)
    kv_b = _batch_of_resident(cfg)

    def one_region_head(i, _):
        r, h = _div_mod(i, cfg.num_heads)
        region = group * cfg.query_regions + r
        q, do = _get(cfg, q_ref, _own(cfg, b, r, region), h), _get(cfg, do_ref, _own(cfg, b, r, region), h)
        lse, delta = lse_ref[0, r, h], delta_ref[0, r, h]  # (T_pad, 1) columns

        def one_routed_region(t, dq):
            kv_region = table_ref[b, region, t]
            k = _get(cfg, k_ref, (kv_b, kv_region), h)
            v = _get(cfg, v_ref, (kv_b, kv_region), h)
            p = jnp.exp(_dot(q, k, 1, cfg) * cfg.scale - lse)
            mask = _key_mask(cfg, p.shape, 1)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            ds = p * (_dot(do, v, 1, cfg) - delta)
            return dq + _dot(ds.astype(k.dtype), k, 0, cfg)

        dq = jax.lax.fori_loop(0, cfg.topk, one_routed_region, jnp.zeros(q.shape, jnp.float32))
        _set(cfg, dq_ref, _own(cfg, b, r, region), h, dq * cfg.scale)
        return 0

    jax.lax.fori_loop(0, cfg.query_regions * cfg.num_heads, one_region_head, 0)


def dkv_kernel(rows_ref, offsets_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref,
                *, cfg: KernelConfig):
    b, group = pl.program_id(0), pl.program_id(1)
    q_b = _batch_of_resident(cfg)

    def one_region_head(i, _):
        r, h = _div_mod(i, cfg.num_heads)
        region = group * cfg.kv_regions + r
        k, v = _get(cfg, k_ref, _own(cfg, b, r, region), h), _get(cfg, v_ref, _own(cfg, b, r, region), h)

        def one_consumer(e, carry):
            dk, dv = carry
            q_region = rows_ref[b, e]
            q, do = _get(cfg, q_ref, (q_b, q_region), h), _get(cfg, do_ref, (q_b, q_region), h)
            lse, delta = lse_ref[q_b, q_region, h], delta_ref[q_b, q_region, h]  # (1, T_pad) rows
            # Key-major throughout (p transposed), so no in-kernel transposes are needed.
            p_t = jnp.exp(_dot(k, q, 1, cfg) * cfg.scale - lse)  # (keys, queries)
            mask = _key_mask(cfg, p_t.shape, 0)
            if mask is not None:
                p_t = jnp.where(mask, p_t, 0.0)
            dv = dv + _dot(p_t.astype(do.dtype), do, 0, cfg)
            ds_t = p_t * (_dot(v, do, 1, cfg) - delta)
            return dk + _dot(ds_t.astype(q.dtype), q, 0, cfg), dv

        init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        dk, dv = jax.lax.fori_loop(offsets_ref[b, region], offsets_ref[b, region + 1], one_consumer, init)
        _set(cfg, dk_ref, _own(cfg, b, r, region), h, dk * cfg.scale)
        _set(cfg, dv_ref, _own(cfg, b, r, region), h, dv)
        return 0

    jax.lax.fori_loop(0, cfg.kv_regions * cfg.num_heads, one_region_head, 0)
