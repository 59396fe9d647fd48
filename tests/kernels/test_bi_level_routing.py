"""Bi-level routing attention: reference vs an independent brute force, Pallas (interpret mode) vs
reference (forward and gradients), bad-input errors."""
from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxformers.kernels import bi_level_routing_attention
from jaxformers.kernels.bi_level_routing import api, pallas_kernel
from jaxformers.kernels.bi_level_routing.reference import bi_level_routing_attention_reference
from tests.helpers import lowered_functions, shard_map_specs, subjaxprs


def _inputs(seed, b, height, width, c_qk, c_v, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, height, width, c_qk), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, height, width, c_qk), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, height, width, c_v), jnp.float32).astype(dtype)
    return q, k, v


def brute_force(q, k, v, *, num_heads, regions_per_side, topk, scale):
    """Dense attention over all tokens with a boolean mask built from an independent numpy routing."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, height, width, c_qk = q.shape
    c_v = v.shape[-1]
    s = regions_per_side
    rh, rw = height // s, width // s
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    region_of = ((ys // rh) * s + xs // rw).reshape(-1)  # token (row-major) -> region id
    num_regions = s * s
    out = np.zeros((b, height * width, c_v))
    for n in range(b):
        qf, kf, vf = q[n].reshape(-1, c_qk), k[n].reshape(-1, c_qk), v[n].reshape(-1, c_v)
        q_mean = np.stack([qf[region_of == r].mean(0) for r in range(num_regions)])
        k_mean = np.stack([kf[region_of == r].mean(0) for r in range(num_regions)])
        affinity = q_mean @ k_mean.T
        chosen = np.argsort(-affinity, axis=1, kind="stable")[:, :topk]  # (R, topk)
        allowed = np.zeros((num_regions, num_regions), bool)
        allowed[np.arange(num_regions)[:, None], chosen] = True
        mask = allowed[region_of][:, region_of]  # (L, L)
        dq, dv = c_qk // num_heads, c_v // num_heads
        for h in range(num_heads):
            logits = qf[:, h * dq:(h + 1) * dq] @ kf[:, h * dq:(h + 1) * dq].T * scale
            logits = np.where(mask, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[n, :, h * dv:(h + 1) * dv] = p @ vf[:, h * dv:(h + 1) * dv]
    return out.reshape(b, height, width, c_v)


# (batch, H, W, C_qk, C_v, heads, S, topk)
XLA_CASES = [
    (2, 8, 8, 8, 8, 2, 2, 2),
    (1, 9, 6, 12, 6, 3, 3, 4),  # 3x2-token regions, qk dim != v dim, 3 heads
    (2, 4, 4, 4, 4, 1, 1, 1),  # one region
    (1, 6, 6, 8, 4, 2, 3, -1),  # full attention
    (1, 6, 6, 8, 8, 2, 3, 1),  # topk = 1
    (1, 6, 6, 8, 8, 2, 3, np.int64(9)),  # topk = S^2 spelled out, as a numpy int
]


@pytest.mark.parametrize("case", XLA_CASES)
def test_reference_matches_brute_force(case):
    b, height, width, c_qk, c_v, heads, s, topk = case
    q, k, v = _inputs(0, b, height, width, c_qk, c_v)
    out = jax.jit(functools.partial(bi_level_routing_attention, num_heads=heads, regions_per_side=s,
                                    topk=topk, implementation="xla"))(q, k, v)
    assert out.shape == (b, height, width, c_v) and out.dtype == v.dtype
    want = brute_force(q, k, v, num_heads=heads, regions_per_side=s,
                       topk=api.resolve_topk(topk, s), scale=(c_qk // heads) ** -0.5)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)


def test_upstream_scale_uses_full_qk_dim():
    q, k, v = _inputs(1, 1, 8, 8, 16, 8)
    kw = dict(num_heads=4, regions_per_side=2, topk=2, implementation="xla")
    upstream = bi_level_routing_attention(q, k, v, upstream_compatible=True, **kw)
    explicit = bi_level_routing_attention(q, k, v, scale=16 ** -0.5, **kw)
    default = bi_level_routing_attention(q, k, v, **kw)
    np.testing.assert_array_equal(np.asarray(upstream), np.asarray(explicit))
    assert not np.allclose(np.asarray(upstream), np.asarray(default))
    want = brute_force(q, k, v, num_heads=4, regions_per_side=2, topk=2, scale=16 ** -0.5)
    np.testing.assert_allclose(np.asarray(upstream), want, atol=2e-5, rtol=2e-5)


def test_route_regions_matches_numpy_and_has_no_gradient():
    q, k, _ = _inputs(2, 2, 12, 12, 8, 8)
    idx = api.route_regions(q, k, 3, 4)
    assert idx.shape == (2, 9, 4) and idx.dtype == jnp.int32
    for n in range(2):
        qm = np.asarray(api.to_regions(q, 3))[n].mean(1)
        km = np.asarray(api.to_regions(k, 3))[n].mean(1)
        want = np.argsort(-(qm @ km.T), axis=1, kind="stable")[:, :4]
        np.testing.assert_array_equal(np.asarray(idx[n]), want)
    full = api.route_regions(q, k, 3, -1)
    np.testing.assert_array_equal(np.asarray(full), np.broadcast_to(np.arange(9), (2, 9, 9)))
    # The routing is detached: q's gradient equals the gradient with the routing held fixed.
    g = jax.grad(lambda q_: api.route_regions(q_, k, 3, 4).astype(jnp.float32).sum())(q)
    assert not np.any(np.asarray(g))


def test_regions_round_trip():
    x = jnp.arange(2 * 6 * 9 * 3, dtype=jnp.float32).reshape(2, 6, 9, 3)
    r = api.to_regions(x, 3)
    assert r.shape == (2, 9, 6, 3)
    np.testing.assert_array_equal(np.asarray(r[0, 1, 0]), np.asarray(x[0, 0, 3]))  # region (0, 1)
    np.testing.assert_array_equal(np.asarray(r[0, 3, 0]), np.asarray(x[0, 2, 0]))  # region (1, 0)
    np.testing.assert_array_equal(np.asarray(api.from_regions(r, 3, 6, 9)), np.asarray(x))


def test_attention_cost():
    cost = api.attention_cost(128, 56, 56, 64, 64, 7, 1)
    assert cost["flops"] == 2 * 128 * 3136 * 64 * 128
    assert cost["bytes"] == 128 * 3136 * 64 * 4 * 2
    small = api.BraShape(2, 14, 14, 16, 2, 7, 4)
    q, k, v = api.make_inputs(small, jnp.bfloat16)
    assert q.shape == k.shape == v.shape == (2, 14, 14, 16) and q.dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(q), np.asarray(k))


@pytest.mark.parametrize(
    "kwargs, shapes, match",
    [
        (dict(regions_per_side=3), ((1, 8, 9, 4),) * 3, "divisible by regions_per_side"),
        (dict(topk=5), ((1, 4, 4, 4),) * 3, "topk must be in 1..4"),
        (dict(topk=0), ((1, 4, 4, 4),) * 3, "topk must be in"),
        (dict(num_heads=3), ((1, 4, 4, 4),) * 3, "divisible by num_heads"),
        (dict(num_heads=2), ((1, 4, 4, 4), (1, 4, 4, 4), (1, 4, 4, 3)), r"v channels \(3\)"),
        ({}, ((1, 4, 4, 4), (1, 4, 4, 8), (1, 4, 4, 4)), "q and k must have the same shape"),
        ({}, ((1, 4, 4, 4), (1, 4, 4, 4), (1, 4, 2, 4)), "v must share"),
        ({}, ((4, 4, 4),) * 3, "must be a"),
        (dict(implementation="cuda"), ((1, 4, 4, 4),) * 3, "implementation must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, shapes, match):
    args = dict(num_heads=1, regions_per_side=2, topk=1)
    args.update(kwargs)
    q, k, v = (jnp.zeros(s, jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=match):
        bi_level_routing_attention(q, k, v, **args)


def test_integer_inputs_rejected():
    x = jnp.zeros((1, 4, 4, 4), jnp.int32)
    with pytest.raises(TypeError, match="floating point"):
        bi_level_routing_attention(x, x, x, num_heads=1, regions_per_side=2, topk=1)


# ----------------------------------------------------------------------------- Pallas kernels


def _value_and_grads(fn, q, k, v, seed):
    """Output and (dq, dk, dv) for a random cotangent, in one jit (one compile per case)."""
    out_shape = jax.eval_shape(fn, q, k, v)
    cotangent = jax.random.normal(jax.random.PRNGKey(seed), out_shape.shape, jnp.float32).astype(out_shape.dtype)

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    return run(q, k, v)


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


# (batch, H, W, C_qk, C_v, heads, S, topk, block sizes, layout, direct NHWC tiles). With the GPU
# layout, routed regions are gathered several per step where topk > 1 (padded routes masked).
PALLAS_CASES = [
    pytest.param((2, 9, 9, 8, 4, 2, 3, 1, None, "gpu", False), id="3x3-token-regions-qk!=v-topk1-gpu-blocked"),
    pytest.param((1, 8, 4, 8, 16, 2, 4, 3, None, "gpu", True), id="2x1-token-regions-qk!=v-gpu-direct"),
    pytest.param((1, 3, 3, 4, 4, 1, 3, 3, None, "tpu", False), id="1x1-token-regions-tpu-layout"),
    pytest.param((1, 16, 16, 16, 8, 2, 2, 2, None, "tpu", True), id="8x8-token-regions-tpu-direct-qk!=v"),
    pytest.param((1, 4, 4, 8, 8, 2, 1, 1, None, "gpu", True), id="one-region-gpu-direct"),
    pytest.param((1, 6, 6, 8, 8, 2, 3, -1, pallas_kernel.BlockSizes(4, 2), "gpu", False),
                 id="topk-all-regions-stacked-padded-regions"),
]


@pytest.mark.parametrize("case", PALLAS_CASES)
def test_pallas_matches_reference_float32(case):
    b, height, width, c_qk, c_v, heads, s, topk, blocks, layout, direct = case
    q, k, v = _inputs(3, b, height, width, c_qk, c_v)
    topk = api.resolve_topk(topk, s)
    scale = (c_qk // heads) ** -0.5
    kw = dict(num_heads=heads, regions_per_side=s, topk=topk, scale=scale)
    kernel = functools.partial(pallas_kernel.bi_level_routing_attention_pallas, block_sizes=blocks,
                               layout=layout, interpret=True, poison=True, direct=direct, **kw)
    reference = functools.partial(bi_level_routing_attention_reference, **kw)
    got_out, got_grads = _value_and_grads(kernel, q, k, v, seed=4)
    want_out, want_grads = _value_and_grads(reference, q, k, v, seed=4)
    assert not np.isnan(np.asarray(got_out)).any()
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=1e-5, rtol=1e-5)
    for name, got, want in zip("qkv", got_grads, want_grads):
        assert not np.isnan(np.asarray(got)).any(), f"d{name} has unwritten (NaN) elements"
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5,
                                   err_msg=f"d{name}")


def test_pallas_matches_reference_bfloat16():
    q, k, v = _inputs(5, 2, 8, 8, 16, 8, jnp.bfloat16)
    kw = dict(num_heads=2, regions_per_side=2, topk=2, scale=8 ** -0.5)
    kernel = functools.partial(pallas_kernel.bi_level_routing_attention_pallas, interpret=True, poison=True, **kw)
    got_out, got_grads = _value_and_grads(kernel, q, k, v, seed=6)
    # The truth: the reference in float32 on the same bf16-rounded inputs.
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    want_out, want_grads = _value_and_grads(
        functools.partial(bi_level_routing_attention_reference, **kw), q32, k32, v32, seed=6)
    assert got_out.dtype == jnp.bfloat16
    assert _rel_err(got_out, want_out) < 1e-2
    for name, got, want in zip("qkv", got_grads, want_grads):
        assert got.dtype == jnp.bfloat16
        assert _rel_err(got, want) < 2e-2, f"d{name}"


@pytest.mark.parametrize("shape", [(2, 8, 8, 16, 16, 2, 4, 3), (1, 9, 9, 8, 4, 2, 3, 2), (1, 8, 8, 32, 16, 4, 2, 2),
                                   (2, 16, 32, 16, 8, 2, 2, 1)],
                         ids=["2x2-token-regions-stacked", "3x3-token-regions-padded-qk!=v", "4-heads-on-lanes-qk!=v",
                              "8x16-token-regions-nhwc-in-place-qk!=v"])
def test_tpu_layout_in_tpu_interpret_mode(shape):
    """The TPU kernels under Pallas' TPU interpret mode, which simulates what the generic interpreter
    does not: scalar-prefetched tables in SMEM, VMEM blocks fetched by DMA per grid step, the
    sequential grid, uninitialised (NaN) scratch, out-of-bounds reads raising, and a race detector
    (raises on a race)."""
    from jax.experimental.pallas import tpu as pltpu

    b, height, width, c_qk, c_v, heads, s, topk = shape
    q, k, v = _inputs(9, b, height, width, c_qk, c_v)
    kw = dict(num_heads=heads, regions_per_side=s, topk=topk, scale=0.3)
    kernel = functools.partial(pallas_kernel.bi_level_routing_attention_pallas, layout="tpu", poison=True,
                               interpret=pltpu.InterpretParams(detect_races=True), **kw)
    got_out, got_grads = _value_and_grads(kernel, q, k, v, seed=10)
    want_out, want_grads = _value_and_grads(functools.partial(bi_level_routing_attention_reference, **kw), q, k, v,
                                            seed=10)
    for got, want in zip((got_out, *got_grads), (want_out, *want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_public_api_pallas_path_under_jit():
    q, k, v = _inputs(7, 1, 8, 8, 8, 4)
    kw = dict(num_heads=2, regions_per_side=2, topk=3, upstream_compatible=True)
    got = jax.jit(lambda q, k, v: bi_level_routing_attention(q, k, v, implementation="pallas", **kw))(q, k, v)
    want = bi_level_routing_attention(q, k, v, implementation="xla", **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_same_shaped_calls_share_one_lowering():
    """A model's same-shaped blocks lower the kernels once, forward and backward (compile time)."""
    q = _inputs(8, 1, 8, 8, 8, 4)[0]
    attend = functools.partial(bi_level_routing_attention, num_heads=2, regions_per_side=2, topk=2,
                               implementation="pallas")
    twice = lambda q: attend(attend(q, q, q), q, q)  # noqa: E731
    assert lowered_functions(jax.jit(twice).lower(q).as_text(), "_pallas") == {"_pallas": 2}
    grads = lowered_functions(jax.jit(jax.grad(lambda q: twice(q).sum())).lower(q).as_text(), "_pallas")
    assert len(grads) == 2 and set(grads.values()) == {2}, grads  # forward and backward, each called twice


def test_inverse_routing_lists_every_consumer_once():
    index = jnp.array([[[0, 2], [2, 1], [2, 0], [3, 1]]], jnp.int32)  # 4 query regions, topk 2
    rows, offsets = pallas_kernel.inverse_routing(index, regions_padded=6)
    rows, offsets = np.asarray(rows[0]), np.asarray(offsets[0])
    assert offsets.tolist() == [0, 2, 4, 7, 8, 8, 8]
    consumers = [sorted(rows[offsets[j]:offsets[j + 1]].tolist()) for j in range(6)]
    assert consumers == [[0, 2], [1, 3], [0, 1, 2], [3], [], []]


def test_pallas_rejects_unknown_layout_and_impossible_direct_tiles():
    q, k, v = _inputs(0, 1, 4, 4, 4, 4)
    kw = dict(num_heads=1, regions_per_side=2, topk=1, scale=1.0)
    with pytest.raises(ValueError, match="layout must be"):
        pallas_kernel.bi_level_routing_attention_pallas(q, k, v, layout="cuda", **kw)
    with pytest.raises(ValueError, match="power of two"):
        pallas_kernel.bi_level_routing_attention_pallas(
            q, k, v, layout="gpu", block_sizes=pallas_kernel.BlockSizes(regions_per_step=3), **kw)
    with pytest.raises(ValueError, match="must be 1 on the TPU layout"):
        pallas_kernel.bi_level_routing_attention_pallas(
            q, k, v, layout="tpu", block_sizes=pallas_kernel.BlockSizes(regions_per_step=2), **kw)
    q, k, v = _inputs(0, 1, 6, 6, 4, 4)  # 3x3-token regions: no power-of-two NHWC tiles
    with pytest.raises(ValueError, match="direct NHWC layout needs"):
        pallas_kernel.bi_level_routing_attention_pallas(q, k, v, layout="gpu", direct=True, **kw)


def test_gpu_steps_gather_small_regions_within_a_register_budget():
    """Regions gathered per GPU online-softmax step: small regions batched, a step's score tile (a
    region's queries x the gathered keys) at most 8192 floats: 8x8-token regions at top-4 took 4 per
    step and ptxas spilled the dK/dV and dQ kernels (compile_check for an H100); 2 do not."""
    def step(stage, **kw):
        region = (stage.height // stage.regions_per_side) * (stage.width // stage.regions_per_side)
        return pallas_kernel._plan((1, stage.height, stage.width, stage.channels),
                                   (1, stage.height, stage.width, stage.channels), kw.pop("dtype", jnp.bfloat16),
                                   num_heads=stage.num_heads, regions_per_side=stage.regions_per_side,
                                   topk=stage.topk, scale=1.0, block_sizes=None, interpret=True, poison=False,
                                   **kw)[0].kv_step, region

    stage1, stage2, stage3, large = api.BIFORMER_STAGE_SHAPES
    assert [step(s, layout="gpu") for s in (stage1, stage2, stage3, large)] == [(1, 64), (4, 16), (16, 4), (2, 64)]
    # float32 keys take twice the registers: one 8x8 region per step (two spilled 276 B in dK/dV)
    assert [step(s, layout="gpu", dtype=jnp.float32)[0] for s in (stage2, stage3, large)] == [4, 16, 1]
    assert all(step(s, layout="tpu")[0] == 1 for s in (stage2, stage3))  # one region per step on TPU


@pytest.mark.parametrize("entry", ["kernel", "public op"])
def test_kernel_dots_follow_the_default_matmul_precision(entry):
    """float32 dots take jax's default matmul precision, as the reference's einsums do (TF32 tensor
    cores on GPU): at Precision.HIGHEST the GPU kernels spilled up to 26 KB per thread (ptxas, H100).
    ``jax.default_matmul_precision("float32")`` still gets exact dots, also through the public op's
    cached jit (the precision context is part of its cache key)."""
    q = jnp.zeros((1, 32, 32, 64), jnp.float32)  # 8x8-token regions, head dim 32: tl.dot-sized tiles
    kw = dict(num_heads=2, regions_per_side=4, topk=2, scale=0.25)
    fn = (functools.partial(pallas_kernel.bi_level_routing_attention_pallas, **kw, layout="gpu", interpret=False)
          if entry == "kernel" else
          functools.partial(bi_level_routing_attention, **kw, implementation="pallas", gpu_kernel="triton"))

    def precisions():
        jaxpr = jax.make_jaxpr(lambda q: jax.vjp(fn, q, q, q)[1](q))(q)
        found = set()
        for call in _pallas_calls(jaxpr.jaxpr):
            body = call.params["jaxpr"]
            found |= {str(e.params["precision"]) for sub in [body, *subjaxprs(body)] for e in sub.eqns
                      if e.primitive.name == "dot_general"}
        return found

    with jax.default_matmul_precision("default"):  # jax's own default (the tests' conftest asks for "highest")
        found = precisions()
    assert found and not any("HIGHEST" in p for p in found)
    with jax.default_matmul_precision("float32"):
        assert precisions() == {str((jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST))}


def test_tpu_reads_the_maps_in_place_where_regions_are_8_tokens_wide():
    """On TPU, regions a multiple of 8 tokens wide (BiFormer's stage 1) are read from the NHWC maps in
    place, a row of regions per program: no layout copies in or out. Narrower ones go through
    region blocks (a routed region's rows would start at sublane offsets Mosaic rejects)."""
    def plan(stage, **kw):
        shape = (stage.batch, stage.height, stage.width, stage.channels)
        return pallas_kernel._plan(shape, shape, jnp.bfloat16, num_heads=stage.num_heads,
                                   regions_per_side=stage.regions_per_side, topk=stage.topk, scale=1.0,
                                   block_sizes=None, layout="tpu", interpret=False, poison=False, **kw)[0]

    stage1, stage2, _, _ = api.BIFORMER_STAGE_SHAPES
    cfg = plan(stage1)
    assert cfg.direct and cfg.query_regions == cfg.kv_regions == stage1.regions_per_side
    assert not plan(stage2).direct
    with pytest.raises(ValueError, match="multiple of 8 tokens wide"):
        plan(stage2, direct=True)
    q = jnp.zeros((stage1.batch, stage1.height, stage1.width, stage1.channels), jnp.bfloat16)
    fn = functools.partial(pallas_kernel.bi_level_routing_attention_pallas, num_heads=stage1.num_heads,
                           regions_per_side=stage1.regions_per_side, topk=stage1.topk, scale=0.2, layout="tpu",
                           interpret=False)
    jaxpr = jax.make_jaxpr(lambda q: jax.vjp(fn, q, q, q)[1](q))(q)
    calls = list(_pallas_calls(jaxpr.jaxpr))
    assert len(calls) == 3
    for eqn in calls:  # every map (q, k, v, o, dO, dq, dk, dv) goes in and out as (B, H, W, C)
        maps = [x.aval.shape for x in eqn.invars + eqn.outvars if x.aval.size == q.size]
        assert len(maps) >= 3 and all(shape == q.shape for shape in maps)


def test_tpu_vmem_estimate_gates_large_maps():
    def estimate(stage):
        shape = (stage.batch, stage.height, stage.width, stage.channels)
        kw = dict(num_heads=stage.num_heads, regions_per_side=stage.regions_per_side, topk=stage.topk)
        assert pallas_kernel.tpu_fits(shape, shape, jnp.bfloat16, **kw)
        return pallas_kernel.tpu_vmem_bytes(shape, shape, jnp.bfloat16, **kw)

    stage1, _, stage3, _ = api.BIFORMER_STAGE_SHAPES
    # Stage 1's kernels keep two of one image's maps resident (K and V; dK/dV: q and dO),
    # double-buffered: 4 x 56 x 56 x 64 channels (128 lanes) in bf16 = 3.1 MiB, plus their own
    # blocks (rows of regions) and dK/dV's statistics rows.
    assert 3 << 20 < estimate(stage1) < 6 << 20
    # Stage 3 (8 heads of 32 channels, 2x2-token regions): heads share the 128 lanes; with a lane tile
    # per head it needed 15 MiB, over a TPU v4's budget.
    assert estimate(stage3) < 4 << 20
    huge = (1, 384, 384, 64)
    assert not pallas_kernel.tpu_fits(huge, huge, jnp.bfloat16, num_heads=2, regions_per_side=8, topk=4)


def test_tpu_single_buffers_resident_blocks_when_two_do_not_fit(monkeypatch):
    """Where two copies of an image's resident blocks exceed the VMEM budget (a v4's 12 MiB and a
    128x128 map), the TPU kernels keep one (the next image's is fetched after this one) rather than
    giving up; below even that they refuse."""
    shape, kw = (2, 8, 8, 16), dict(num_heads=2, regions_per_side=4, topk=3)
    double, single = (pallas_kernel.tpu_vmem_bytes(shape, shape, jnp.float32, resident_buffers=n, **kw) for n in (2, 1))
    assert single < double
    monkeypatch.setattr(pallas_kernel, "vmem_budget_bytes", lambda: (single + double) // 2)
    assert pallas_kernel.tpu_fits(shape, shape, jnp.float32, **kw)
    from jax.experimental.pallas import tpu as pltpu

    q, k, v = _inputs(11, *shape, shape[-1])
    kernel = functools.partial(pallas_kernel.bi_level_routing_attention_pallas, layout="tpu", poison=True,
                               interpret=pltpu.InterpretParams(), scale=0.3, **kw)
    got_out, got_grads = _value_and_grads(kernel, q, k, v, seed=12)
    want_out, want_grads = _value_and_grads(functools.partial(bi_level_routing_attention_reference, scale=0.3, **kw),
                                            q, k, v, seed=12)
    for got, want in zip((got_out, *got_grads), (want_out, *want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    jaxpr = jax.make_jaxpr(lambda q, k, v: jax.vjp(kernel, q, k, v)[1](kernel(q, k, v)))(q, k, v)
    buffers = [getattr(m.pipeline_mode, "buffer_count", 2) for eqn in _pallas_calls(jaxpr.jaxpr)
               for m in eqn.params["grid_mapping"].block_mappings if m.pipeline_mode is not None]
    assert 1 in buffers
    monkeypatch.setattr(pallas_kernel, "vmem_budget_bytes", lambda: single - 1)
    assert not pallas_kernel.tpu_fits(shape, shape, jnp.float32, **kw)
    with pytest.raises(ValueError, match="TPU VMEM"):
        _value_and_grads(kernel, q, k, v, seed=12)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_gpu_and_tpu_without_hardware(platform, request, lower_as_h100):
    """Forward, dQ and dK/dV lower through Pallas' Triton (GPU) and Mosaic (TPU) rules: no accelerator
    is needed to catch ops or tile shapes those backends reject (the device compile itself is not run)."""
    if platform == "tpu":
        request.getfixturevalue("lower_as_v5e")
    layout = "tpu" if platform == "tpu" else "gpu"
    # (H, C_qk, C_v, heads, S, topk): 8x8-token regions and 2x2 tokens (small-tile path) read NHWC in
    # place on GPU; 3x3 tokens go through the padded blocked layout; head dims 32, 16, 64 and 128.
    for height, c_qk, c_v, heads, s, topk in [(56, 64, 64, 2, 7, 1), (14, 256, 256, 8, 7, 16), (9, 96, 48, 3, 3, 2),
                                              (28, 128, 128, 2, 7, 4), (14, 256, 256, 2, 7, 49)]:
        def loss_grads(q, k, v):
            out, vjp = jax.vjp(functools.partial(
                pallas_kernel.bi_level_routing_attention_pallas, num_heads=heads, regions_per_side=s, topk=topk,
                scale=0.2, layout=layout, interpret=False), q, k, v)
            return vjp(out)

        qk = jax.ShapeDtypeStruct((2, height, height, c_qk), jnp.bfloat16)
        v = jax.ShapeDtypeStruct((2, height, height, c_v), jnp.bfloat16)
        text = jax.jit(loss_grads).trace(qk, qk, v).lower(lowering_platforms=(platform,)).as_text()
        target = "tpu_custom_call" if platform == "tpu" else "triton"
        assert text.count(target) >= 3, f"expected forward, dQ and dK/dV kernels for {platform}"


def _pallas_calls(jaxpr):
    """Every pallas_call equation in ``jaxpr`` and the jaxprs nested in it."""
    return [eqn for j in [jaxpr, *subjaxprs(jaxpr)] for eqn in j.eqns if eqn.primitive.name == "pallas_call"]


def test_tpu_routing_tables_reach_smem_flat():
    """SMEM pads an array's last two dims to (8, 128) words: BiFormer-T's stage-1 table (128 images,
    56 regions, top-1) took 3.5 MiB of the 1 MiB SMEM as a 3-D array (found by compiling for a v5e).
    The TPU kernels get every scalar-prefetched table flat, and read it with the 3-D indices."""
    q, k, v = _inputs(0, 3, 12, 12, 16, 16)
    fn = functools.partial(pallas_kernel.bi_level_routing_attention_pallas, num_heads=2, regions_per_side=3, topk=2,
                           scale=0.2, layout="tpu", interpret=False)
    jaxpr = jax.make_jaxpr(lambda q, k, v: jax.vjp(fn, q, k, v)[1](fn(q, k, v)))(q, k, v)
    calls = list(_pallas_calls(jaxpr.jaxpr))
    assert len(calls) >= 3  # forward, dQ, dK/dV
    for eqn in calls:
        prefetched = eqn.params["grid_mapping"].num_index_operands  # the scalar-prefetched operands
        assert prefetched >= 1
        assert all(x.aval.ndim == 1 and x.aval.dtype == jnp.int32 for x in eqn.invars[:prefetched])
    table = pallas_kernel._FlatTable(jnp.arange(24), (2, 3, 4))
    assert int(table[1, 2, 3]) == 23 and int(table[0, 1, 2]) == 6 and int(table[1, 0, 0]) == 12


def test_pallas_path_runs_per_batch_and_head_shard_over_an_active_mesh(monkeypatch, lower_as_v5e):
    """Each device attends its examples and heads, routed by the routing of all heads (the region
    affinities sum over every channel, so a routing from one device's heads alone would differ)."""
    from jaxformers import sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    q, k, v = _inputs(8, 4, 8, 8, 16, 16)
    d_out = jax.random.normal(jax.random.key(3), v.shape)
    kw = dict(num_heads=2, regions_per_side=4, topk=2)

    def out_and_grads(implementation, q, k, v):
        out, vjp = jax.vjp(lambda *a: bi_level_routing_attention(*a, implementation=implementation, **kw), q, k, v)
        return out, *vjp(d_out)

    want = out_and_grads("xla", q, k, v)
    heads_routing = [api.route_regions(q[..., h * 8:(h + 1) * 8], k[..., h * 8:(h + 1) * 8], 4, 2)
                     for h in range(2)]
    assert not all(np.array_equal(r, api.route_regions(q, k, 4, 2)) for r in heads_routing)
    with sharding.activate(mesh):
        q, k, v = sharding.shard_batch((q, k, v), mesh)
        fn = jax.jit(functools.partial(out_and_grads, "pallas"))
        specs = [str(in_specs) for in_specs, _ in shard_map_specs(fn, q, k, v)]
        assert specs and all("'tensor'" in s and "'fsdp'" in s for s in specs)  # its batch and heads
        got = fn(q, k, v)
        # And it compiles for a TPU (Mosaic calls compile only inside shard_map), also with 6 examples,
        # which do not split over data x fsdp = 4.
        monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
        x = jax.ShapeDtypeStruct((6, 28, 28, 128), jnp.bfloat16)
        step = jax.jit(lambda q, k, v: jax.vjp(lambda *a: bi_level_routing_attention(
            *a, num_heads=2, regions_per_side=7, topk=4), q, k, v)[1](q))
        assert step.trace(x, x, x).lower(lowering_platforms=("tpu",)).as_text().count("tpu_custom_call") >= 3
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
