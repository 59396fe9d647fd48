"""``local_global_attention``: sliding windows + global tokens + groups + packed segments, one call.

The mask semantics are defined once in ``jaxformers.kernels.local_global.mask`` (see its docstring).
Implementations:

- ``"xla"``: ``reference.py`` (plain jnp: group-structured specs attend group by group, O(L·g)
  memory; every other spec builds the full mask, O(L²)).
- ``"pallas"``: on GPU (and CPU, in Pallas interpret mode: slow, for tests) our flash-style
  block-sparse kernels, forward and backward, skipping key blocks that hold no allowed pair:
  on a Hopper GPU for bf16/f16 and head dim 32, 64 or 128 the Mosaic GPU kernels (``mosaic_gpu.py``:
  TMA, wgmma, warp specialisation), else the Triton ones (``pallas_kernel.py``). On TPU, packed
  calls (``segment_ids`` given) take our TPU kernels (``tpu_kernel.py``: block tables from the
  segment ids, so segment-disjoint blocks are skipped) when they fit, the rest JAX's splash
  attention driven by the same mask (``splash_tpu.py``; see :func:`tpu_route`).
- ``"auto"``: Pallas on GPU/TPU, the reference elsewhere; also on a GPU for calls the Mosaic GPU
  kernels do not take where the Triton ones cannot run: a jax without the deprecated Pallas Triton
  backend, a GPU older than Ampere (T4, V100), head dims whose tiles exceed the GPU's shared memory
  (see ``jaxformers.kernels.gpu_kernel``).

Under an active mesh (``jaxformers.sharding.activate`` or ``jax.set_mesh``) the Pallas and splash
paths run per device in ``shard_map`` (``jaxformers.sharding.shard_kernel``): each device attends
its batch shard (data x fsdp) and its heads (tensor), where those divide; XLA cannot partition a
kernel call itself (on a TPU it would not compile).

``segment_ids_from_cu_seqlens`` converts FlashAttention-style cumulative lengths to segment ids.
"""
from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from jaxformers.kernels.gpu_kernel import gpu_kernel_choice, triton_unsupported
from jaxformers.kernels.local_global.mask import MaskSpec
from jaxformers.sharding import shard_kernel
from jaxformers.kernels.local_global.reference import local_global_attention_reference

Implementation = Literal["auto", "pallas", "xla"]
IMPLEMENTATIONS = ("auto", "pallas", "xla")


def _check_inputs(q, k, v, segment_ids, spec: MaskSpec) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        shape = getattr(t, "shape", None)
        if shape is None or len(shape) != 4:
            raise ValueError(f"{name} must have shape (batch, length, heads, head_dim) like "
                             f"jax.nn.dot_product_attention; got shape {shape}")
        if not jnp.issubdtype(t.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point (float32/bfloat16/float16); got {t.dtype}")
    if q.shape[0] != k.shape[0] or v.shape[0] != k.shape[0]:
        raise ValueError(f"q, k, v must share the batch size; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must share (batch, length, heads); got {k.shape} and {v.shape}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share head_dim; got {q.shape[3]} and {k.shape[3]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]}) "
                         "(grouped-query attention)")
    if q.shape[1] != k.shape[1] and (not spec.is_dense or segment_ids is not None):
        raise ValueError(f"window, group_size, causal and segment_ids need self-attention lengths "
                         f"(q length == k length); got q length {q.shape[1]}, k length {k.shape[1]}")
    if segment_ids is not None:
        shape = getattr(segment_ids, "shape", None)
        if shape != q.shape[:2]:
            raise ValueError(f"segment_ids must be (batch, length) = {q.shape[:2]}; got shape {shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must be integers (0 = padding); got dtype {segment_ids.dtype}")


def segment_ids_from_cu_seqlens(cu_seqlens: jax.Array, length: int) -> jax.Array:
    """(B, L) segment ids from cumulative sequence lengths (the FlashAttention varlen convention).

    ``cu_seqlens`` is (n+1,) or (B, n+1), non-decreasing, starting at 0: sequence s of a row spans
    positions ``cu_seqlens[s] .. cu_seqlens[s+1]-1`` and gets id s+1; positions from
    ``cu_seqlens[-1]`` on are padding (0). Repeat the last offset to give rows fewer sequences.
    """
    cu = jnp.asarray(cu_seqlens)
    if cu.ndim not in (1, 2) or cu.shape[-1] < 2 or not jnp.issubdtype(cu.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens must be integer offsets of shape (n+1,) or (batch, n+1) with n >= 1; "
                         f"got shape {cu.shape}, dtype {cu.dtype}")
    cu = jnp.atleast_2d(cu)
    pos = jnp.arange(length)
    ids = jnp.sum(pos[None, :, None] >= cu[:, None, 1:], axis=-1) + 1  # sequences that ended before
    return jnp.where(pos[None, :] < cu[:, -1:], ids, 0).astype(jnp.int32)


def tpu_route(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> str:
    """Which TPU kernels run a ``"pallas"`` call: ``"tpu_kernel"`` (ours: skips blocks by segments)
    for packed calls within :func:`tpu_kernel.fits`, else ``"splash"`` (whose blocks are skipped
    by the static mask only, and which is JAX's tuned kernel for the unpacked case)."""
    from jaxformers.kernels.local_global import tpu_kernel

    if segment_ids is None:
        return "splash"
    ok = tpu_kernel.fits(q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], q.dtype.itemsize)
    return "tpu_kernel" if ok else "splash"


def _auto_implementation(q, k, v, gpu_kernel: str) -> str:
    """Pallas on TPU, and on GPU where the Mosaic GPU kernels take the call or the Triton ones can run
    it (this jax and GPU have Triton; the tiles fit the GPU's shared memory); the reference elsewhere."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "pallas"
    if backend == "gpu":
        from jaxformers.kernels.local_global.pallas_kernel import pick_gpu_kernel, triton_tiles

        if pick_gpu_kernel(gpu_kernel, backend, q, k, v) == "mosaic":
            return "pallas"
        return "pallas" if triton_unsupported() is None and triton_tiles(q, k, v) is not None else "xla"
    return "xla"


def local_global_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: tuple[int | None, int | None] | None = None,
    global_tokens: int = 0,
    group_size: int | None = None,
    segment_ids: jax.Array | None = None,
    causal: bool = False,
    chunk_size: int | None = None,
    scale: float | None = None,
    implementation: Implementation = "auto",
    gpu_kernel: str | None = None,
) -> jax.Array:
    """Masked softmax attention; q (B, Lq, H, D), k and v (B, Lk, Hkv, D) -> (B, Lq, H, D) in q's dtype.

    Args:
      window: ``(left, right)``: query i sees keys i-left .. i+right (bidirectional sliding window;
        a side may be None = unlimited). None = no window.
      global_tokens: the first n positions of each row attend to everything and are attended by
        everything (Longformer-style global attention; still causal and within segments).
      group_size: block-diagonal groups of g consecutive positions (FIT's local layers).
      segment_ids: (B, L) ints; tokens attend only within their segment, 0 marks padding (padding
        queries return zeros).
      causal: key j is visible to query i only if j <= i.
      chunk_size: with causal, chunk-causal: i sees every key of its own and earlier chunks of
        ``chunk_size`` positions (FIT's autoregressive global layers).
      scale: logit scale, default head_dim ** -0.5.
      implementation: ``"auto"`` (Pallas on GPU/TPU, else XLA), ``"pallas"`` or ``"xla"``.
      gpu_kernel: which Pallas kernels run on a GPU: ``"auto"`` (the Hopper/Mosaic GPU kernels on an
        H100/H200 when the inputs suit them, else Triton), ``"triton"`` or ``"mosaic"``; None (default)
        takes ``$JAXFORMERS_GPU_KERNEL``, else ``"auto"`` (see ``jaxformers.kernels.gpu_kernel``).

    All restrictions combine by AND; global tokens lift window and group limits only. With no
    option this is dense attention (and with ``segment_ids`` packed variable-length attention).
    Hq may be a multiple of Hkv (grouped-query attention).

    float32 inputs: the kernels' dots follow jax's default matmul precision, as the reference's do:
    on an NVIDIA GPU TF32 tensor cores, unless ``jax.default_matmul_precision("float32")`` (or
    ``"highest"``) asks for exact float32, which the GPU computes on CUDA cores, several times slower.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
    spec = MaskSpec(window=tuple(window) if isinstance(window, list) else window,
                    global_tokens=global_tokens, group_size=group_size, causal=causal, chunk_size=chunk_size)
    _check_inputs(q, k, v, segment_ids, spec)
    gpu_kernel = gpu_kernel_choice(gpu_kernel)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if implementation == "auto":
        implementation = _auto_implementation(q, k, v, gpu_kernel)
    if implementation == "xla":
        return local_global_attention_reference(q, k, v, spec, segment_ids=segment_ids, scale=scale)
    backend = jax.default_backend()
    if backend == "tpu" and tpu_route(q, k, v, segment_ids) == "splash":
        kernel = functools.partial(_splash, spec=spec, scale=scale)
    else:
        kernel = functools.partial(_pallas, spec=spec, scale=scale, gpu_kernel=gpu_kernel,
                                   backend="tpu" if backend == "tpu" else None)
    # Under an active mesh each device runs its batch shard and its heads (the kernel call itself
    # cannot be partitioned).
    seq = ("batch", None, "heads", None)
    if segment_ids is None:
        return shard_kernel(kernel, (seq, seq, seq), seq)(q, k, v)
    return shard_kernel(kernel, (seq, seq, seq, ("batch", None)), seq)(q, k, v, segment_ids)


def _splash(q, k, v, *segment_ids, spec, scale):
    from jaxformers.kernels.local_global.splash_tpu import local_global_attention_splash

    return local_global_attention_splash(q, k, v, spec, segment_ids=segment_ids[0] if segment_ids else None,
                                         scale=scale)


@functools.partial(jax.jit, static_argnames=("spec", "scale", "gpu_kernel", "backend"))
def _pallas(q, k, v, *segment_ids, spec, scale, gpu_kernel, backend):
    """The Pallas path under one jit: a model's same-shaped layers share one trace and one lowering of
    their kernels, and an eager call runs as one program."""
    from jaxformers.kernels.local_global.pallas_kernel import local_global_attention_pallas

    return local_global_attention_pallas(q, k, v, spec, segment_ids=segment_ids[0] if segment_ids else None,
                                         scale=scale, gpu_kernel=gpu_kernel, backend=backend)
