"""TPU path of ``local_global_attention``: JAX's splash attention with our mask as a computable mask.

Splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) is the block-sparse flash
attention for TPU that ships with JAX: it preprocesses the mask per block on the host (skipping
empty blocks through scalar-prefetched tables, the TPU idiom) and has forward and backward
kernels. We hand it our mask definition (``mask.allowed``) as a ``_ComputableMask``, so the mask
is computed inside the kernel from positions rather than loaded, and segment ids as its
``SegmentIds``.

Glue around it: q is pre-scaled (splash has no scale argument), lengths are zero-padded to a
multiple of the block size (padding gets segment id 0), the layout goes (B, L, H, D) ->
(B, H, L, D) and splash is vmapped over the batch. Splash lets padding (segment 0) attend to
padding, so padding queries are zeroed afterwards (every query sees at least itself, so no row is
empty and the backward stays finite).

Known gap: splash decides which blocks to skip from the static mask alone (window, groups,
causal/chunks, global tokens, worked out on the host at trace time); segment ids are runtime data
that it applies element by element. So on TPU a packed batch does not skip the blocks that share
no segment, and padding still costs compute. Packed calls therefore take our own TPU kernels
(``tpu_kernel.py``, driven by the runtime block table through scalar prefetch) when they fit;
splash serves the unpacked calls (``api.tpu_route``).

Lowering for TPU is checked from CPU in the tests (``jax.export``); it has not been run on a TPU
in this project yet.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from jaxformers.kernels.local_global.mask import MaskSpec, allowed


class _SpecMask(mask_lib._ComputableMask):  # splash's documented extension point for lazy masks
    """Our MaskSpec as a splash computable mask (positions -> allowed), hashable for splash's caches."""

    def __init__(self, spec: MaskSpec, shape: tuple[int, int]):
        self.spec = spec
        super().__init__(shape, functools.partial(allowed, spec))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.shape == other.shape and self.spec == other.spec

    def __hash__(self) -> int:
        return hash((type(self), self.shape, self.spec))


@functools.lru_cache(maxsize=64)
def _kernel(spec: MaskSpec, heads: int, q_len: int, k_len: int, block: int, interpret: bool):
    mask = mask_lib.MultiHeadMask([_SpecMask(spec, (q_len, k_len))] * heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def local_global_attention_splash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: MaskSpec,
    *,
    segment_ids: jax.Array | None,
    scale: float,
    block: int = 128,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as ``local_global_attention_pallas``; q (B, Lq, H, D), k/v (B, Lk, Hkv, D)."""
    batch, q_len, heads, _ = q.shape
    k_len = k.shape[1]
    q_pad, k_pad = -q_len % block, -k_len % block
    if segment_ids is None:
        q_seg = jnp.ones((batch, q_len), jnp.int32)
        k_seg = jnp.ones((batch, k_len), jnp.int32)
    else:
        q_seg = k_seg = segment_ids.astype(jnp.int32)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, q_pad)))
    k_seg = jnp.pad(k_seg, ((0, 0), (0, k_pad)))
    to_heads_major = lambda t, pad: jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    qt = to_heads_major(q * jnp.asarray(scale, q.dtype), q_pad)
    kt, vt = to_heads_major(k, k_pad), to_heads_major(v, k_pad)
    kernel = _kernel(spec, heads, q_len + q_pad, k_len + k_pad, block, bool(interpret))
    out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(q=qs, kv=ks)))(
        qt, kt, vt, q_seg, k_seg)
    out = out.transpose(0, 2, 1, 3)[:, :q_len]
    valid = (q_seg[:, :q_len] != 0)[:, :, None, None]
    return jnp.where(valid, out, 0).astype(q.dtype)
