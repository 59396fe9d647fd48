"""Block-sparse flash attention in Pallas for ``local_global_attention``: forward, dQ and dK/dV.

Layout and schedule (FlashAttention-2 style):

- Grid (query block, batch, head) for the forward and dQ kernels; each program keeps its query
  tile resident and walks only the key blocks that ``blocks.index_table`` lists for it, with an
  online softmax (base-2 exponentials, float32 accumulators). "Full" blocks (every pair allowed)
  run without computing a mask; "partial" blocks compute the element mask from positions and
  segment ids (``mask.allowed``), the same definition the reference uses.
- The forward pass saves the base-2 logsumexp per query; the backward recomputes probabilities
  from it. dK/dV runs on grid (key block, batch, head) over the transposed table, so every output
  tile is written by exactly one program (no atomics).
- Any length: q/k/v are zero-padded to the block multiple and padding positions get segment id 0,
  which masks them; head dims are padded to a power of two (zeros change no dot product).
- Queries with no allowed key (padding) produce zeros and a +inf logsumexp (zero gradients).
- The backward's delta = rowsum(out * dOut) is taken from the output in its own dtype, as
  FlashAttention does (also in the Mosaic GPU and TPU kernels): in bf16, rows whose softmax is
  nearly one-hot over very few keys get dQ/dK off by several percent of their largest entry.
- Global tokens attend to, and are attended by, the whole sequence: rather than let the programs
  holding them walk every block alone (the others visit a few), global query rows are computed
  by a dense pass (the reference over n x L rows), and in the backward the dK/dV of global keys
  by a dense Lq x n pass (``_global_key_grads``); the kernels treat both as local tokens.
- Grouped-query attention: the k/v index map shares a kv head among ``rep`` query heads; dK/dV are
  computed per query head and summed.

Backends: the kernels use only ops that the Pallas Triton (GPU) lowering supports (``pl.ds``
slices of refs, scalar reads from a flat int32 table, ``jnp.dot``, 2-D iotas, ``fori_loop`` with
dynamic bounds); the tests lower them for CUDA from a CPU host and run them in interpret mode on
CPU. They have not run on a GPU yet; they compile for an A100, H100, B200 and L4 without one
(``benchmarks/compile_check.py``), with tiles sized to the GPU's shared memory and, for float32, to
the dots' precision (:func:`triton_tiles`; exact float32 dots hold their operands in registers).
With ``backend="tpu"`` the same wrapper (padding, global tokens, GQA sums, custom VJP) drives the TPU
kernels of ``tpu_kernel.py``, whose layout rules these kernels do not follow; unpacked TPU calls take
``splash_tpu.py``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxformers.kernels.gpu_kernel import (exact_float32_dots, gpu_shared_memory_bytes, resolve_gpu_kernel,
                                          triton_compiler_params, triton_shared_memory_budget)
from jaxformers.kernels.local_global.blocks import (TRITON_REQUEST_RATIO, BlockSizes, k_major_table, padded_head_dim,
                                                    q_major_table, static_segments, triton_blocks)
from jaxformers.kernels.local_global.mask import MaskSpec, allowed, segments_allowed
from jaxformers.kernels.local_global.tiles import LOG2_E, MASK_VALUE, dot, dot_nt, dot_tn, walk
from jaxformers.kernels.local_global.reference import local_global_attention_reference

@dataclasses.dataclass(frozen=True)
class _Config:
    spec: MaskSpec
    scale: float
    blocks: BlockSizes
    rep: int  # query heads per kv head
    interpret: bool | object  # or interpret-mode parameters (TPU: pltpu.InterpretParams)
    backend: str
    gpu_kernel: str = "triton"  # "triton" or "mosaic" (Hopper kernels, mosaic_gpu.py)
    lengths: tuple[int, int] = (0, 0)  # (Lq, Lk) before padding


def _masked_logits(spec, s, q_start, k_start, q_seg, k_seg):
    """Applies the element mask to a (bq, bk) logit tile whose corner is (q_start, k_start)."""
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    ok = allowed(spec, q_pos, k_pos) & segments_allowed(q_seg[:, None], k_seg[None, :])
    return jnp.where(ok, s, MASK_VALUE)


def _forward_kernel(table_ref, q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                    cfg: _Config, stride: int, n_q: int, per_batch: bool):
    block_q, block_k = cfg.blocks.block_q, cfg.blocks.block_k
    qb, b = pl.program_id(0), pl.program_id(1)
    row = ((b if per_batch else 0) * n_q + qb) * stride
    q = q_ref[...]
    q_seg = q_seg_ref[...]
    c = cfg.scale * LOG2_E

    def body(kb, carry, masked):
        m, l, acc = carry
        start = pl.multiple_of(kb * block_k, block_k)
        s = dot_nt(q, k_ref[pl.ds(start, block_k), :]) * c
        if masked:
            s = _masked_logits(cfg.spec, s, qb * block_q, start, q_seg, k_seg_ref[pl.ds(start, block_k)])
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = v_ref[pl.ds(start, block_k), :]
        acc = acc * correction[:, None] + dot(p.astype(v.dtype), v)
        return m_new, l * correction + jnp.sum(p, axis=1), acc

    init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32))
    m, l, acc = walk(table_ref, row, body, init)
    empty = m < 0.5 * MASK_VALUE  # no allowed key in the whole row (padding query)
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = jnp.where(empty[:, None], 0.0, acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(safe_l))


def _dq_kernel(table_ref, q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: _Config, stride: int, n_q: int, per_batch: bool):
    block_q, block_k = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    qb, b = pl.program_id(0), pl.program_id(1)
    row = ((b if per_batch else 0) * n_q + qb) * stride
    q, do, q_seg = q_ref[...], do_ref[...], q_seg_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    c = cfg.scale * LOG2_E

    def body(kb, dq, masked):
        start = pl.multiple_of(kb * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        s = dot_nt(q, k) * c
        if masked:
            s = _masked_logits(cfg.spec, s, qb * block_q, start, q_seg, k_seg_ref[pl.ds(start, block_k)])
        p = jnp.exp2(s - lse[:, None])
        dp = dot_nt(do, v_ref[pl.ds(start, block_k), :])
        ds = p * (dp - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = walk(table_ref, row, body, jnp.zeros(q_ref.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                *, cfg: _Config, stride: int, n_k: int, per_batch: bool):
    block_q, block_k = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    kb, b = pl.program_id(0), pl.program_id(1)
    row = ((b if per_batch else 0) * n_k + kb) * stride
    k, v, k_seg = k_ref[...], v_ref[...], k_seg_ref[...]
    c = cfg.scale * LOG2_E

    def body(qb, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(qb * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), :]
        do = do_ref[pl.ds(start, block_q), :]
        s = dot_nt(q, k) * c
        if masked:
            s = _masked_logits(cfg.spec, s, start, kb * block_k, q_seg_ref[pl.ds(start, block_q)], k_seg)
        p = jnp.exp2(s - lse_ref[pl.ds(start, block_q)][:, None])
        dv = dv + dot_tn(p.astype(do.dtype), do)
        dp = dot_nt(do, v)
        ds = p * (dp - delta_ref[pl.ds(start, block_q)][:, None])
        return dk + dot_tn(ds.astype(q.dtype), q), dv

    init = (jnp.zeros(k_ref.shape, jnp.float32), jnp.zeros(v_ref.shape, jnp.float32))
    dk, dv = walk(table_ref, row, body, init)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _table_spec(cfg: _Config) -> pl.BlockSpec:
    return pl.BlockSpec()  # the whole flat table, read by scalar loads


def _call(kernel, cfg: _Config, grid, in_specs, out_specs, out_shape, name):
    params = None
    if cfg.backend == "gpu" and not cfg.interpret:
        width = in_specs[3].block_shape[-1]
        params = triton_compiler_params(num_warps=4 if width <= 64 else 8, num_stages=2)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=params, interpret=cfg.interpret, name=name)


def _global_key_grads(cfg: _Config, n: int, q, k, v, q_seg, k_seg, lse, delta, d_out):
    """dK, dV of the first n (global) keys by a dense (Lq x n) pass in plain jnp.

    Every query may see a global key (up to causality and segments), so the dK/dV program owning
    it would walk every query block alone; this pass replaces that long program. Uses the saved
    base-2 logsumexp, like the kernels; returns float32 (B, n, Hq, D) and (B, n, Hq, Dv).
    """
    rep = cfg.rep
    k_g, v_g = (jnp.repeat(t[:, :n], rep, axis=2) if rep > 1 else t[:, :n] for t in (k, v))
    order = allowed(MaskSpec(causal=cfg.spec.causal, chunk_size=cfg.spec.chunk_size),
                    jnp.arange(q.shape[1])[:, None], jnp.arange(n)[None, :])
    mask = (order[None] & segments_allowed(q_seg[:, :, None], k_seg[:, None, :n]))[:, None]  # (B|1, 1, Lq, n)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k_g, preferred_element_type=jnp.float32) * (cfg.scale * LOG2_E)
    p = jnp.where(mask, jnp.exp2(s - lse[..., None]), 0.0)
    d_v = jnp.einsum("bhqk,bqhd->bkhd", p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v_g, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None])
    d_k = jnp.einsum("bhqk,bqhd->bkhd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32) * cfg.scale
    return d_k, d_v


def _segments(cfg: _Config, q, k, q_seg, k_seg):
    """The (B or 1, padded length) int32 segment rows, 0 on padding. Without segment ids (None) they
    follow from the lengths: numpy, so that the block tables are built while tracing
    (``blocks.index_table``)."""
    if q_seg is not None:
        return q_seg, k_seg
    return static_segments(cfg.lengths[0], q.shape[1]), static_segments(cfg.lengths[1], k.shape[1])


def _forward(cfg: _Config, q, k, v, q_seg, k_seg):
    q_seg, k_seg = _segments(cfg, q, k, q_seg, k_seg)
    if cfg.backend == "tpu":
        from jaxformers.kernels.local_global import tpu_kernel

        return tpu_kernel.forward(cfg.spec, cfg.scale, q, k, v, q_seg, k_seg, interpret=cfg.interpret)
    if cfg.gpu_kernel == "mosaic":
        from jaxformers.kernels.local_global import mosaic_gpu

        return mosaic_gpu.forward(cfg.spec, cfg.scale, q, k, v, q_seg, k_seg, interpret=cfg.interpret)
    batch, q_len, heads, dim = q.shape
    k_len, dim_v = k.shape[1], v.shape[-1]
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    table, stride = q_major_table(cfg.spec, q_seg, k_seg, bq, bk)
    per_batch = q_seg.shape[0] > 1
    rep = cfg.rep
    grid = (q_len // bq, batch, heads)
    seg_b = (lambda b: b) if per_batch else (lambda b: 0)
    kernel = functools.partial(_forward_kernel, cfg=cfg, stride=stride, n_q=q_len // bq, per_batch=per_batch)
    in_specs = [
        _table_spec(cfg),
        pl.BlockSpec((None, bq), lambda i, b, h: (seg_b(b), i)),
        pl.BlockSpec((None, k_len), lambda i, b, h: (seg_b(b), 0)),
        pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, k_len, None, dim), lambda i, b, h: (b, 0, h // rep, 0)),
        pl.BlockSpec((None, k_len, None, dim_v), lambda i, b, h: (b, 0, h // rep, 0)),
    ]
    out_specs = [pl.BlockSpec((None, bq, None, dim_v), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))]
    out_shape = [jax.ShapeDtypeStruct((batch, q_len, heads, dim_v), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)]
    out, lse = _call(kernel, cfg, grid, in_specs, out_specs, out_shape, "local_global_fwd")(
        table, q_seg, k_seg, q, k, v)
    return out, lse


def _backward(cfg: _Config, q, k, v, q_seg, k_seg, out, lse, d_out):
    q_seg, k_seg = _segments(cfg, q, k, q_seg, k_seg)
    batch, k_len, kv_heads = k.shape[:3]
    dim, dim_v, rep = q.shape[-1], v.shape[-1], cfg.rep
    # Global keys (their queries already split off) get a dense side pass: the dK/dV kernel then
    # treats them as local keys, so no program walks every query block.
    n_global = min(cfg.spec.global_tokens, k_len) if not (cfg.spec.is_dense or cfg.spec.global_queries) else 0
    kv_spec = dataclasses.replace(cfg.spec, global_tokens=0) if n_global else cfg.spec
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
    if cfg.backend == "tpu":
        from jaxformers.kernels.local_global import tpu_kernel

        dq, dk, dv = tpu_kernel.backward(cfg.spec, kv_spec, cfg.scale, q, k, v, q_seg, k_seg, lse, delta, d_out,
                                         interpret=cfg.interpret)
    elif cfg.gpu_kernel == "mosaic":
        from jaxformers.kernels.local_global import mosaic_gpu

        dq, dk, dv = mosaic_gpu.backward(cfg.spec, kv_spec, cfg.scale, q, k, v, q_seg, k_seg, lse, delta, d_out,
                                         interpret=cfg.interpret)
    else:
        dq, dk, dv = _triton_backward(cfg, kv_spec, q, k, v, q_seg, k_seg, lse, delta, d_out,
                                      f32_dkv=rep > 1 or bool(n_global))
    if n_global:
        dk_g, dv_g = _global_key_grads(cfg, n_global, q, k, v, q_seg, k_seg, lse, delta, d_out)
        dk, dv = dk.at[:, :n_global].set(dk_g.astype(dk.dtype)), dv.at[:, :n_global].set(dv_g.astype(dv.dtype))
    if rep > 1:  # dK/dV were computed per query head
        dk = dk.astype(jnp.float32).reshape(batch, k_len, kv_heads, rep, dim).sum(3)
        dv = dv.astype(jnp.float32).reshape(batch, k_len, kv_heads, rep, dim_v).sum(3)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


def _triton_backward(cfg: _Config, kv_spec: MaskSpec, q, k, v, q_seg, k_seg, lse, delta, d_out, *, f32_dkv: bool):
    """dQ and per-query-head dK/dV by the Pallas (Triton) kernels."""
    batch, q_len, heads, dim = q.shape
    k_len, dim_v = k.shape[1], v.shape[-1]
    bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    q_major, q_stride = q_major_table(cfg.spec, q_seg, k_seg, bq, bk)
    k_major, k_stride = k_major_table(kv_spec, q_seg, k_seg, bq, bk)
    kv_cfg = dataclasses.replace(cfg, spec=kv_spec)
    per_batch = q_seg.shape[0] > 1
    seg_b = (lambda b: b) if per_batch else (lambda b: 0)
    rep = cfg.rep

    dq_kernel = functools.partial(_dq_kernel, cfg=cfg, stride=q_stride, n_q=q_len // bq, per_batch=per_batch)
    dq = _call(dq_kernel, cfg, (q_len // bq, batch, heads), [
        _table_spec(cfg),
        pl.BlockSpec((None, bq), lambda i, b, h: (seg_b(b), i)),
        pl.BlockSpec((None, k_len), lambda i, b, h: (seg_b(b), 0)),
        pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, k_len, None, dim), lambda i, b, h: (b, 0, h // rep, 0)),
        pl.BlockSpec((None, k_len, None, dim_v), lambda i, b, h: (b, 0, h // rep, 0)),
        pl.BlockSpec((None, bq, None, dim_v), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
    ], pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
        jax.ShapeDtypeStruct(q.shape, q.dtype), "local_global_dq")(
        q_major, q_seg, k_seg, q, k, v, d_out, lse, delta)

    acc_dtype = jnp.float32 if f32_dkv else k.dtype
    dkv_kernel = functools.partial(_dkv_kernel, cfg=kv_cfg, stride=k_stride, n_k=k_len // bk, per_batch=per_batch)
    dk, dv = _call(dkv_kernel, cfg, (k_len // bk, batch, heads), [
        _table_spec(cfg),
        pl.BlockSpec((None, q_len), lambda j, b, h: (seg_b(b), 0)),
        pl.BlockSpec((None, bk), lambda j, b, h: (seg_b(b), j)),
        pl.BlockSpec((None, q_len, None, dim), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, bk, None, dim), lambda j, b, h: (b, j, h // rep, 0)),
        pl.BlockSpec((None, bk, None, dim_v), lambda j, b, h: (b, j, h // rep, 0)),
        pl.BlockSpec((None, q_len, None, dim_v), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, None, q_len), lambda j, b, h: (b, h, 0)),
        pl.BlockSpec((None, None, q_len), lambda j, b, h: (b, h, 0)),
    ], [pl.BlockSpec((None, bk, None, dim), lambda j, b, h: (b, j, h, 0)),
        pl.BlockSpec((None, bk, None, dim_v), lambda j, b, h: (b, j, h, 0))],
        [jax.ShapeDtypeStruct((batch, k_len, heads, dim), acc_dtype),
         jax.ShapeDtypeStruct((batch, k_len, heads, dim_v), acc_dtype)], "local_global_dkv")(
        k_major, q_seg, k_seg, q, k, v, d_out, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, q_seg, k_seg):
    return _forward(cfg, q, k, v, q_seg, k_seg)[0]


def _attention_fwd(cfg, q, k, v, q_seg, k_seg):
    out, lse = _forward(cfg, q, k, v, q_seg, k_seg)
    return out, (q, k, v, q_seg, k_seg, out, lse)


def _attention_bwd(cfg, residuals, d_out):
    q, k, v, q_seg, k_seg, out, lse = residuals
    dq, dk, dv = _backward(cfg, q, k, v, q_seg, k_seg, out, lse, d_out)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def pick_gpu_kernel(choice: str | None, backend: str, q, k, v) -> str:
    """Resolves ``gpu_kernel`` (see ``jaxformers.kernels.gpu_kernel``) for these inputs."""
    def fits():
        from jaxformers.kernels.local_global import mosaic_gpu

        return mosaic_gpu.supported(q, k, v)

    return resolve_gpu_kernel(choice, backend=backend, fits=fits, requirement=(
        "bfloat16/float16 q, k, v with one head dim of 32, 64 or 128; "
        f"got {q.dtype} head dims {q.shape[-1]}/{v.shape[-1]}"))


def triton_tiles(q, k, v) -> BlockSizes | None:
    """The compiled Triton kernels' tiles for these inputs on JAX's default GPU, sized to its shared
    memory and to the dots' precision (``blocks.triton_blocks``); None when not even the smallest fit."""
    dim = max(padded_head_dim(q.shape[-1]), padded_head_dim(v.shape[-1]))
    dtype = jnp.result_type(q, k, v)
    return triton_blocks(dtype.itemsize, dim, triton_shared_memory_budget(TRITON_REQUEST_RATIO),
                         exact_float32=exact_float32_dots(dtype))


def local_global_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: MaskSpec,
    *,
    segment_ids: jax.Array | None = None,
    scale: float,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
    gpu_kernel: str | None = None,
) -> jax.Array:
    """The Pallas path of ``local_global_attention`` (inputs already validated by the API).

    ``block_sizes`` defaults to ``BlockSizes()`` (the compiled Triton kernels: :func:`triton_tiles`,
    smaller for float32 and for head dims whose tiles exceed the GPU's shared memory) shrunk to the
    sequence; ``interpret`` defaults to True off GPU/TPU. ``backend`` ("gpu" | "tpu" |
    "cpu", default: JAX's default backend) picks the kernels and lowering; naming "gpu" or "tpu" lets
    ``jax.export`` lower for that platform from a CPU host, and ``backend="tpu", interpret=True`` runs
    the TPU kernels in Pallas' TPU interpret mode (``interpret`` may also be a
    ``pltpu.InterpretParams``). ``gpu_kernel`` picks the kernels: "triton", "mosaic" (Hopper;
    bf16/f16, head dim 32, 64 or 128; in Mosaic GPU interpret mode off GPU), "auto" (Mosaic on a
    Hopper GPU when the inputs suit it, else Triton) or None (the process default,
    ``jaxformers.kernels.gpu_kernel``).
    """
    backend = backend or jax.default_backend()
    n_global = min(spec.global_tokens, q.shape[1])
    if n_global and not spec.is_dense and spec.global_queries:
        local = local_global_attention_pallas(
            q, k, v, dataclasses.replace(spec, global_queries=False), segment_ids=segment_ids, scale=scale,
            block_sizes=block_sizes, interpret=interpret, backend=backend, gpu_kernel=gpu_kernel)
        # The first n queries see every key (up to causality and segments): a dense n x L pass.
        rows = local_global_attention_reference(
            q[:, :n_global], k, v, spec, scale=scale, segment_ids=None if segment_ids is None else segment_ids[:, :n_global],
            kv_segment_ids=segment_ids)
        return jnp.concatenate([rows, local[:, n_global:]], axis=1)
    if interpret is None:
        interpret = backend not in ("gpu", "tpu")
    if backend == "tpu" and interpret is True:  # the TPU kernels run in TPU interpret mode off TPU
        from jax.experimental.pallas import tpu as pltpu

        interpret = pltpu.InterpretParams()
    batch, q_len, heads, dim = q.shape
    k_len, kv_heads, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    gpu_kernel = pick_gpu_kernel(gpu_kernel, backend, q, k, v)
    if block_sizes is None and backend == "gpu" and not interpret and gpu_kernel == "triton":
        block_sizes = triton_tiles(q, k, v)  # float32 and large head dims take smaller tiles
        if block_sizes is None:
            raise ValueError(
                f"local_global_attention(implementation='pallas'): head dims {dim}/{dim_v} in "
                f"{jnp.result_type(q, k, v)} take too much shared memory (this GPU has "
                f"{gpu_shared_memory_bytes() >> 10} KiB per block) or registers even in 16x16 Triton tiles; use "
                "implementation='xla' (or 'auto', which falls back to it)")
    blocks = (block_sizes or BlockSizes()).fitted(q_len, k_len)
    cfg = _Config(spec=spec, scale=float(scale), blocks=blocks, rep=heads // kv_heads, interpret=interpret,
                  backend=backend, gpu_kernel=gpu_kernel, lengths=(q_len, k_len))
    q_multiple, k_multiple = blocks.q_multiple, blocks.k_multiple
    if backend == "tpu":
        from jaxformers.kernels.local_global.tpu_kernel import BLOCK

        q_multiple, k_multiple = max(q_multiple, BLOCK), max(k_multiple, BLOCK)
    elif gpu_kernel == "mosaic":
        from jaxformers.kernels.local_global.mosaic_gpu import MosaicBlocks

        q_multiple, k_multiple = max(q_multiple, MosaicBlocks().tile), max(k_multiple, MosaicBlocks().tile)
    q_pad = -q_len % q_multiple
    k_pad = -k_len % k_multiple
    d_pad, dv_pad = padded_head_dim(dim) - dim, padded_head_dim(dim_v) - dim_v
    qp = jnp.pad(q, ((0, 0), (0, q_pad), (0, 0), (0, d_pad)))
    kp = jnp.pad(k, ((0, 0), (0, k_pad), (0, 0), (0, d_pad)))
    vp = jnp.pad(v, ((0, 0), (0, k_pad), (0, 0), (0, dv_pad)))
    q_seg = k_seg = None  # static: see _segments
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        q_seg, k_seg = (jnp.pad(seg, ((0, 0), (0, pad))) for pad in (q_pad, k_pad))
    out = _attention(cfg, qp, kp, vp, q_seg, k_seg)
    return out[:, :q_len, :, :dim_v]
