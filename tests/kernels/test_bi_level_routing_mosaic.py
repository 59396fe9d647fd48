"""The Hopper (Mosaic GPU) path of bi-level routing attention: routed regions as the visited blocks
of the local/global Mosaic kernels. Run in Mosaic GPU interpret mode on CPU (jax >= 0.11) against
the reference, forward and gradients; lowered for CUDA from this CPU host; the kernel choice."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.kernels.bi_level_routing import mosaic_gpu
from jaxformers.kernels.bi_level_routing.pallas_kernel import _use_mosaic, bi_level_routing_attention_pallas
from jaxformers.kernels.bi_level_routing.reference import bi_level_routing_attention_reference

needs_interpreter = pytest.mark.skipif(
    tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 11),
    reason="Mosaic GPU interpret mode cannot run vector loads from shared memory before jax 0.11")


def _maps(shape, channels, v_channels=None, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    dims = [channels, channels, v_channels or channels]
    return tuple(jax.random.normal(key, (*shape, c), jnp.float32).astype(jnp.bfloat16) for key, c in zip(keys, dims))


CASES = {  # (batch, height, width), channels, heads, regions per side, topk
    "8x8-regions-d32-top2": ((2, 16, 16), 64, 2, 2, 2),
    "8x16-regions-d64-top3": ((1, 16, 32), 128, 2, 2, 3),
}


@needs_interpreter
@pytest.mark.parametrize("name", list(CASES))
def test_mosaic_bra_matches_reference_forward_and_gradients(name):
    shape, channels, heads, s, topk = CASES[name]
    q, k, v = _maps(shape, channels)
    scale = (channels // heads) ** -0.5
    kw = dict(num_heads=heads, regions_per_side=s, topk=topk, scale=scale)
    ours = functools.partial(bi_level_routing_attention_pallas, gpu_kernel="mosaic", **kw)
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    weights = jnp.cos(jnp.arange(channels, dtype=jnp.float32))

    def loss(fn, *qkv):
        return jnp.sum(fn(*qkv).astype(jnp.float32) * weights)

    out = ours(q, k, v)
    want = bi_level_routing_attention_reference(*f32, **kw)
    assert out.shape == v.shape and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), atol=2e-2, rtol=2e-2)
    grads = jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2))(q, k, v)
    wants = jax.grad(functools.partial(loss, functools.partial(bi_level_routing_attention_reference, **kw)),
                     argnums=(0, 1, 2))(*f32)
    for g, w in zip(grads, wants):
        peak = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.asarray(g, np.float32) / peak, np.asarray(w) / peak, atol=3e-2)


def test_mosaic_bra_lowers_for_cuda():
    """Forward, dQ and dK/dV lower for CUDA from this CPU host (Mosaic GPU layout inference and
    lowering); compiling and running need a Hopper GPU."""
    q = jax.ShapeDtypeStruct((2, 56, 56, 64), jnp.bfloat16)  # BiFormer stage 1: 7x7 regions of 8x8 tokens
    kw = dict(num_heads=2, regions_per_side=7, topk=1, scale=32 ** -0.5, interpret=False, gpu_kernel="mosaic")

    def step(q, k, v):
        out, vjp = jax.vjp(functools.partial(bi_level_routing_attention_pallas, **kw), q, k, v)
        return out, vjp(out)

    text = jax.jit(step).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 3 and "triton" not in text


def test_mosaic_bra_choice_and_errors():
    q, k, v = _maps((1, 16, 16), 64)
    assert mosaic_gpu.supported(q, k, v, num_heads=2, regions_per_side=2)
    assert not mosaic_gpu.supported(q, k, v, num_heads=2, regions_per_side=4)  # 4x4-token regions
    assert not mosaic_gpu.supported(*(x.astype(jnp.float32) for x in (q, k, v)), num_heads=2, regions_per_side=2)
    # off a Hopper GPU, "auto" keeps the Triton kernels
    assert not _use_mosaic("auto", q, k, v, 2, 2, None)
    assert _use_mosaic("mosaic", q, k, v, 2, 2, None)
    with pytest.raises(ValueError, match="regions of a multiple of 64 tokens; got .* regions of 4x4 tokens"):
        bi_level_routing_attention_pallas(q, k, v, num_heads=2, regions_per_side=4, topk=2, scale=0.2,
                                          gpu_kernel="mosaic")
    with pytest.raises(ValueError, match="gpu_kernel must be one of"):
        bi_level_routing_attention_pallas(q, k, v, num_heads=2, regions_per_side=2, topk=2, scale=0.2,
                                          gpu_kernel="cuda")
