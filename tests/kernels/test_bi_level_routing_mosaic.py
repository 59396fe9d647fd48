"""The Hopper (Mosaic GPU) path of bi-level routing attention: routed regions as the visited blocks
of the local/global Mosaic kernels. Run in Mosaic GPU interpret mode on CPU (jax >= 0.11) against
the reference, forward and gradients; lowered for CUDA from this CPU host; the kernel choice."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.kernels.bi_level_routing import mosaic_gpu
from jaxformers.kernels.bi_level_routing.pallas_kernel import uses_mosaic_gpu, bi_level_routing_attention_pallas
from jaxformers.kernels.bi_level_routing.reference import bi_level_routing_attention_reference
from tests.helpers import needs_mosaic_gpu_interpreter


def _maps(shape, channels, v_channels=None, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    dims = [channels, channels, v_channels or channels]
    return tuple(jax.random.normal(key, (*shape, c), jnp.float32).astype(jnp.bfloat16) for key, c in zip(keys, dims))


CASES = {  # (batch, height, width), channels, heads, regions per side, topk
    "8x8-regions-d32-top2": ((2, 16, 16), 64, 2, 2, 2),
    "8x16-regions-d64-top3": ((1, 16, 32), 128, 2, 2, 3),
    # Regions smaller than a block: routing bit masks. 49 regions of 2x2 (BiFormer stage 3 at 224²,
    # two words of bits, a padded last block), 4x4 regions with a padded block, 64 regions of 2x1,
    # and topk = all regions (every visited block full, no mask).
    "2x2-regions-7x7-top16": ((1, 14, 14), 64, 2, 7, 16),
    "4x4-regions-3x3-top2": ((2, 12, 12), 64, 2, 3, 2),
    "2x1-regions-8x8-top5": ((1, 16, 8), 64, 2, 8, 5),
    "2x2-regions-all": ((1, 8, 8), 64, 2, 4, 16),
    # 1-token regions: 64 regions per block, two words of bits per block; 36 regions in one padded block.
    "1x1-regions-8x8-top5": ((1, 8, 8), 64, 2, 8, 5),
    "1x1-regions-6x6-top7": ((1, 6, 6), 64, 2, 6, 7),
}


@needs_mosaic_gpu_interpreter
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


@needs_mosaic_gpu_interpreter
def test_mosaic_bra_small_regions_no_races():
    """The interpreter's race detector over forward, dQ and dK/dV with routing bit masks."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as interp

    q, k, v = _maps((1, 8, 16), 64, seed=3)
    params = mosaic_gpu.lg.interpret_params(detect_races=True)
    attend = functools.partial(mosaic_gpu.bi_level_routing_attention_mosaic, num_heads=2, regions_per_side=4, topk=3,
                               scale=0.2, interpret=params)
    out, vjp = jax.vjp(attend, q, k, v)
    grads = vjp(out)
    assert not interp.get_races().races_found
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in (out, *grads))


def test_mosaic_bra_route_words():
    """The per-token routing bits: bit j of word w of a query token = its region routed to region
    32w + j; the key-side words are the transpose; padding tokens have none."""
    index = jnp.array([[[0, 40], [40, 1]] + [[2, 3]] * 39 + [[33, 0]]])  # 42 regions, topk 2
    routed = mosaic_gpu._routed(index, 42)
    route = mosaic_gpu._route_words(routed, tokens=4, length=192)
    assert route.shift == 2 and route.q_words.shape == route.k_words.shape == (1, 2, 192)
    bits = lambda words, token, region: (int(words[0, region // 32, token]) >> (region % 32)) & 1
    for token in (0, 3):  # region 0 routed to 0 and 40
        assert [r for r in range(42) if bits(route.q_words, token, r)] == [0, 40]
    assert [r for r in range(42) if bits(route.k_words, 4 * 40, r)] == [0, 1]  # chosen by 0 and 1
    assert [r for r in range(42) if bits(route.k_words, 4 * 33 + 1, r)] == [41]
    assert not np.any(np.asarray(route.q_words[..., 168:])) and not np.any(np.asarray(route.k_words[..., 168:]))
    assert int(route.k_words[0, 1, 0]) >> 9 & 1  # region 41 (bit 9 of word 1) chose region 0
    # 1-token regions: two words per 64-row block, all present (the kernel reads both)
    one = mosaic_gpu._route_words(routed, tokens=1, length=128)
    assert one.shift == 0 and one.q_words.shape == (1, 4, 128) and not np.any(np.asarray(one.q_words[:, 2:]))
    assert [r for r in range(42) if bits(one.q_words, 1, r)] == [1, 40]


@pytest.mark.parametrize("stage", ["1: 8x8 regions", "2: 4x4 regions", "3: 2x2 regions", "4: 1x1 regions"])
def test_mosaic_bra_lowers_for_cuda(stage):
    """Forward, dQ and dK/dV lower for CUDA from this CPU host (Mosaic GPU layout inference and
    lowering) at BiFormer-T's stage shapes (224² input, S = 7; BiFormer's stage 4 is plain attention,
    here routed with topk 8); compiling and running need a Hopper GPU."""
    side, channels, topk = {"1": (56, 64, 1), "2": (28, 128, 4), "3": (14, 256, 16), "4": (7, 512, 8)}[stage[0]]
    q = jax.ShapeDtypeStruct((2, side, side, channels), jnp.bfloat16)
    kw = dict(num_heads=channels // 32, regions_per_side=7, topk=topk, scale=32 ** -0.5, interpret=False,
              gpu_kernel="mosaic")

    def step(q, k, v):
        out, vjp = jax.vjp(functools.partial(bi_level_routing_attention_pallas, **kw), q, k, v)
        return out, vjp(out)

    text = jax.jit(step).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 3 and "triton" not in text


def test_mosaic_bra_choice_and_errors():
    q, k, v = _maps((1, 16, 16), 64)
    assert mosaic_gpu.supported(q, k, v, num_heads=2, regions_per_side=2)
    assert mosaic_gpu.supported(q, k, v, num_heads=2, regions_per_side=4)  # 4x4-token regions, bit masks
    assert mosaic_gpu.supported(q, k, v, num_heads=2, regions_per_side=16)  # 1-token regions
    assert not mosaic_gpu.supported(q[:, :12, :12], k[:, :12, :12], v[:, :12, :12], num_heads=2, regions_per_side=4)
    assert [t for t in range(1, 257) if mosaic_gpu.region_sizes_supported(t)] == [1, 2, 4, 8, 16, 32, 64, 128, 192, 256]
    assert not mosaic_gpu.supported(*(x.astype(jnp.float32) for x in (q, k, v)), num_heads=2, regions_per_side=2)
    # off a Hopper GPU, "auto" keeps the Triton kernels
    assert not uses_mosaic_gpu("auto", q, k, v, 2, 2, None)
    assert uses_mosaic_gpu("mosaic", q, k, v, 2, 2, None)
    with pytest.raises(ValueError, match="or of 1..32 tokens dividing 64; got .* regions of 3x3 tokens"):
        bi_level_routing_attention_pallas(q[:, :12, :12], k[:, :12, :12], v[:, :12, :12], num_heads=2,
                                          regions_per_side=4, topk=2, scale=0.2, gpu_kernel="mosaic")
    with pytest.raises(ValueError, match="gpu_kernel must be one of"):
        bi_level_routing_attention_pallas(q, k, v, num_heads=2, regions_per_side=2, topk=2, scale=0.2,
                                          gpu_kernel="cuda")
