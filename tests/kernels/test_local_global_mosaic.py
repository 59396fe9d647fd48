"""The Hopper (Mosaic GPU) kernels of local_global_attention, forward and backward: run in Mosaic GPU
interpret mode on CPU (simulated shared memory, TMA, barriers and wgmma; jax >= 0.11) against the
reference, with race detection; lowered for CUDA from this CPU host; and the kernel choice."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.kernels.local_global import mosaic_gpu
from jaxformers.kernels.local_global.mask import MaskSpec, dense_mask
from jaxformers.kernels.local_global.pallas_kernel import local_global_attention_pallas
from jaxformers.kernels.local_global.reference import local_global_attention_reference
from tests.helpers import needs_mosaic_gpu_interpreter, packed_segments


def _inputs(batch, length, heads, kv_heads, dim, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (batch, length, h, dim), jnp.float32).astype(jnp.bfloat16)
                 for key, h in zip(keys, (heads, kv_heads, kv_heads)))


def _reference_lse(spec, q, k, seg, scale):
    """Base-2 logsumexp per (batch, head, query) over the allowed keys (+inf where none)."""
    rep = q.shape[2] // k.shape[2]
    k = jnp.repeat(k.astype(jnp.float32), rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * scale / np.log(2.0)
    mask = dense_mask(spec, q.shape[1], k.shape[1], seg)[:, None]
    lse = jax.nn.logsumexp(jnp.where(mask, s * np.log(2.0), -jnp.inf), axis=-1) / np.log(2.0)
    return jnp.where(jnp.isfinite(lse), lse, jnp.inf)


CASES = {
    "window": (dict(window=(40, 70)), 1, 256, 2, 2, 64, False),
    "window-global-odd-length": (dict(window=(16, 16), global_tokens=5), 1, 200, 2, 2, 64, False),
    "group-causal-d128": (dict(group_size=64, causal=True), 1, 256, 2, 2, 128, False),
    "packed-gqa": (dict(), 2, 192, 4, 2, 64, True),
    "chunk-causal-window": (dict(window=(96, None), causal=True, chunk_size=32), 1, 256, 2, 1, 64, False),
    "window-d32": (dict(window=(50, 20)), 1, 128, 2, 2, 32, False),
}


@needs_mosaic_gpu_interpreter
@pytest.mark.parametrize("name", list(CASES))
def test_mosaic_forward_matches_reference(name):
    case, batch, length, heads, kv_heads, dim, packed = CASES[name]
    spec = MaskSpec(**case)
    q, k, v = _inputs(batch, length, heads, kv_heads, dim)
    seg = packed_segments(batch, length) if packed else None
    scale = dim ** -0.5
    got = local_global_attention_pallas(q, k, v, spec, segment_ids=seg, scale=scale, gpu_kernel="mosaic")
    want = local_global_attention_reference(*(t.astype(jnp.float32) for t in (q, k, v)), spec,
                                            segment_ids=seg, scale=scale)
    assert got.shape == q.shape and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2, rtol=2e-2)
    if seg is not None:  # padding queries return exact zeros
        assert not np.any(np.asarray(got, np.float32)[np.asarray(seg) == 0])


@needs_mosaic_gpu_interpreter
def test_mosaic_kernel_logsumexp_and_no_races():
    """The saved base-2 logsumexp (what the backward kernels consume) and the interpreter's race
    detector over the forward and both backward kernels, on a packed batch with padding (empty
    query rows: zeros and +inf)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as interp

    spec = MaskSpec(window=(64, 32))
    q, k, v = _inputs(1, 256, 2, 2, 64, seed=1)
    seg = packed_segments(1, 256)
    params = mosaic_gpu.interpret_params(detect_races=True)
    out, lse = mosaic_gpu.forward(spec, 0.125, q, k, v, seg, seg, interpret=params)
    assert not interp.get_races().races_found
    want = _reference_lse(spec, q, k, seg, 0.125)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want), rtol=1e-2, atol=2e-2)
    assert np.all(np.isinf(np.asarray(lse)[:, :, np.asarray(seg[0]) == 0]))
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), q.astype(jnp.float32))
    grads = mosaic_gpu.backward(spec, spec, 0.125, q, k, v, seg, seg, lse, delta, q, interpret=params)
    assert not interp.get_races().races_found
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


GRAD_CASES = {
    "window-global": (dict(window=(32, 32), global_tokens=3), 1, 128, 2, 2, 64, False),
    "packed-gqa-causal": (dict(causal=True), 2, 256, 4, 2, 64, True),
    "group-d128-odd": (dict(group_size=48), 1, 200, 2, 2, 128, False),
}


@needs_mosaic_gpu_interpreter
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_mosaic_gradients_match_reference(name):
    """dQ, dK, dV of the Mosaic kernels (forward, dQ and dK/dV) equal the reference's."""
    case, batch, length, heads, kv_heads, dim, packed = GRAD_CASES[name]
    spec = MaskSpec(**case)
    q, k, v = _inputs(batch, length, heads, kv_heads, dim, seed=2)
    seg = packed_segments(batch, length) if packed else None

    def loss(fn, *qkv):
        return jnp.sum(fn(*qkv).astype(jnp.float32) * jnp.cos(jnp.arange(dim, dtype=jnp.float32)))

    kernel = functools.partial(local_global_attention_pallas, spec=spec, segment_ids=seg, scale=0.125,
                               gpu_kernel="mosaic")
    reference = functools.partial(local_global_attention_reference, spec=spec, segment_ids=seg, scale=0.125)
    got = jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2))(q, k, v)
    f32 = tuple(t.astype(jnp.float32) for t in (q, k, v))
    want = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2))(*f32)
    for g, w in zip(got, want):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(w) / scale, atol=3e-2)


def test_mosaic_kernel_lowers_for_cuda():
    """Forward, dQ and dK/dV lower for a CUDA device from this CPU host: runs the Mosaic GPU layout
    inference and lowering. Compiling (ptxas) and running need a Hopper GPU."""
    spec = MaskSpec(window=(64, 64), global_tokens=3)
    shape = jax.ShapeDtypeStruct((2, 300, 4, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

    def step(q, k, v, seg):
        out, vjp = jax.vjp(lambda *a: local_global_attention_pallas(
            *a, spec, segment_ids=seg, scale=0.125, interpret=False, backend="gpu", gpu_kernel="mosaic"), q, k, v)
        return out, vjp(out)

    text = jax.jit(step).trace(shape, shape, shape, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 3 and "triton" not in text


def test_mosaic_kernel_choice_and_errors():
    q, k, v = _inputs(1, 128, 2, 2, 64)
    assert mosaic_gpu.supported(q, k, v)
    assert not mosaic_gpu.supported(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    assert mosaic_gpu.supported(q[..., :32], k[..., :32], v[..., :32])
    assert not mosaic_gpu.supported(q[..., :48], k[..., :48], v[..., :48])
    assert not mosaic_gpu.supported(q, k, v[..., :32].repeat(4, axis=-1))  # head dim 128 for v only
    with pytest.raises(ValueError, match="bfloat16/float16"):
        local_global_attention_pallas(q.astype(jnp.float32), k, v, MaskSpec(), scale=0.125, gpu_kernel="mosaic")
    with pytest.raises(ValueError, match="gpu_kernel must be one of"):
        local_global_attention_pallas(q, k, v, MaskSpec(), scale=0.125, gpu_kernel="cuda")
    for bad in (dict(block=48), dict(warpgroups=3), dict(stages=0)):
        with pytest.raises(ValueError, match="multiple of 64, 1..4 stages and 1 or 2 warpgroups"):
            mosaic_gpu.MosaicBlocks(**bad)
    # Off a Hopper GPU "auto" keeps the Triton kernel (here in interpret mode), which still matches.
    from jaxformers.kernels.local_global import pallas_kernel

    assert pallas_kernel.pick_gpu_kernel("auto", "cpu", q, k, v) == "triton"
    assert pallas_kernel.pick_gpu_kernel("auto", "gpu", q, k, v[..., :48]) == "triton"
