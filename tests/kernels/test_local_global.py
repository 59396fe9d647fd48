"""local_global_attention: mask semantics against hand-built masks, the Pallas kernel (interpret mode
on CPU) against the reference, forward and gradients, and input validation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.kernels import local_global_attention
from jaxformers.kernels.local_global.mask import MaskSpec, dense_mask
from tests.helpers import fast_jit, lowered_functions, shard_map_specs, subjaxprs


def _hand_mask(length, *, window=None, global_tokens=0, group_size=None, causal=False, chunk_size=None, seg=None):
    """Written from the definition with Python loops (independent of mask.py)."""
    m = np.zeros((length, length), bool)
    for i in range(length):
        for j in range(length):
            ok = True
            if window is not None:
                left, right = window
                ok &= (left is None or j >= i - left) and (right is None or j <= i + right)
            if group_size is not None:
                ok &= i // group_size == j // group_size
            ok |= i < global_tokens or j < global_tokens
            if causal:
                ok &= (j <= i) if chunk_size is None else (j // chunk_size <= i // chunk_size)
            if seg is not None:
                ok &= seg[i] == seg[j] and seg[j] != 0
            m[i, j] = ok
    return m


def test_window_mask_literal():
    got = np.asarray(dense_mask(MaskSpec(window=(1, 2)), 5, 5))[0]
    want = np.array([[1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 0],
                     [0, 1, 1, 1, 1],
                     [0, 0, 1, 1, 1],
                     [0, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(got, want)


def test_group_global_mask_literal():
    got = np.asarray(dense_mask(MaskSpec(group_size=2, global_tokens=1), 5, 5))[0]
    want = np.array([[1, 1, 1, 1, 1],
                     [1, 1, 0, 0, 0],
                     [1, 0, 1, 1, 0],
                     [1, 0, 1, 1, 0],
                     [1, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(got, want)


def test_chunk_causal_mask_literal():
    got = np.asarray(dense_mask(MaskSpec(causal=True, chunk_size=2), 5, 5))[0]
    want = np.array([[1, 1, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [1, 1, 1, 1, 0],
                     [1, 1, 1, 1, 0],
                     [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(got, want)


MASK_CASES = [
    dict(),
    dict(window=(2, 0)),
    dict(window=(0, 3)),
    dict(window=(None, 1)),
    dict(window=(40, 40)),
    dict(window=(1, 1), global_tokens=2),
    dict(group_size=3),
    dict(group_size=4, global_tokens=1),
    dict(window=(2, 2), group_size=5),
    dict(causal=True),
    dict(causal=True, window=(3, 0)),
    dict(causal=True, chunk_size=3),
    dict(causal=True, chunk_size=4, global_tokens=2),
]


@pytest.mark.parametrize("case", MASK_CASES, ids=str)
def test_mask_matches_definition(case):
    seg = np.array([1, 1, 1, 2, 2, 2, 2, 0, 3, 3, 3, 0, 0])
    length = len(seg)
    got = np.asarray(dense_mask(MaskSpec(**case), length, length, jnp.asarray(seg)[None]))[0]
    np.testing.assert_array_equal(got, _hand_mask(length, seg=seg, **case))


@pytest.mark.parametrize("case", MASK_CASES[:4] + MASK_CASES[5:], ids=str)
def test_xla_matches_jax_nn_with_hand_mask(case):
    length, heads, dim = 11, 2, 8
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, length, heads, dim))
    got = local_global_attention(q, k, v, implementation="xla", **case)
    mask = jnp.asarray(_hand_mask(length, **case))[None, None]
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_xla_padding_queries_are_zero_and_grads_finite():
    seg = jnp.array([[1, 1, 2, 2, 2, 0, 0]])
    q, k, v = jax.random.normal(jax.random.key(1), (3, 1, 7, 2, 8))
    out = local_global_attention(q, k, v, segment_ids=seg, implementation="xla")
    assert np.all(np.asarray(out[0, 5:]) == 0.0)
    grads = jax.jit(jax.grad(lambda *a: local_global_attention(*a, segment_ids=seg, implementation="xla").sum(),
                             argnums=(0, 1, 2)))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    # Padding keys receive no gradient, padding queries neither.
    assert np.all(np.asarray(grads[1][0, 5:]) == 0.0) and np.all(np.asarray(grads[0][0, 5:]) == 0.0)


def test_xla_grouped_query_heads_match_repeated_kv():
    q = jax.random.normal(jax.random.key(2), (1, 9, 4, 8))
    k, v = jax.random.normal(jax.random.key(3), (2, 1, 9, 2, 8))
    got = local_global_attention(q, k, v, window=(2, 2), implementation="xla")
    want = local_global_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), window=(2, 2), implementation="xla")
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_segment_ids_from_cu_seqlens():
    from jaxformers.kernels.local_global.api import segment_ids_from_cu_seqlens

    got = segment_ids_from_cu_seqlens(jnp.array([[0, 3, 5, 5], [0, 2, 6, 6]]), 8)
    np.testing.assert_array_equal(got, [[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 2, 2, 2, 2, 0, 0]])
    np.testing.assert_array_equal(segment_ids_from_cu_seqlens(jnp.array([0, 4]), 5), [[1, 1, 1, 1, 0]])
    with pytest.raises(ValueError, match="cu_seqlens"):
        segment_ids_from_cu_seqlens(jnp.array([0.0, 4.0]), 5)


BAD = [
    (dict(window=(1,)), ValueError, "window"),
    (dict(window=(-1, 2)), ValueError, "left"),
    (dict(global_tokens=-1), ValueError, "global_tokens"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(chunk_size=4), ValueError, "causal=True"),
    (dict(implementation="cuda"), ValueError, "implementation"),
    (dict(segment_ids=jnp.zeros((2, 5), jnp.int32)), ValueError, "segment_ids"),
    (dict(segment_ids=jnp.zeros((1, 7))), TypeError, "segment_ids"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_options_raise_clear_errors(kwargs, exc, match):
    q = jnp.zeros((1, 7, 2, 8))
    with pytest.raises(exc, match=match):
        local_global_attention(q, q, q, **kwargs)


def test_bad_shapes_raise_clear_errors():
    q = jnp.zeros((1, 7, 2, 8))
    with pytest.raises(ValueError, match="head_dim"):
        local_global_attention(q, q, jnp.zeros((1, 7, 2)))
    with pytest.raises(ValueError, match="multiple"):
        local_global_attention(jnp.zeros((1, 7, 3, 8)), q, q)
    with pytest.raises(ValueError, match="share head_dim"):
        local_global_attention(q, jnp.zeros((1, 7, 2, 4)), jnp.zeros((1, 7, 2, 4)))
    with pytest.raises(ValueError, match="q length == k length"):
        local_global_attention(q, jnp.zeros((1, 5, 2, 8)), jnp.zeros((1, 5, 2, 8)), causal=True)
    with pytest.raises(TypeError, match="floating"):
        local_global_attention(q.astype(jnp.int32), q, q)


# ---------------------------------------------------------------------------------------------
# Block sparsity tables: conservative (never skip an allowed pair, never call a mixed block full).

from jaxformers.kernels.local_global.blocks import (BlockSizes, block_kinds, k_major_table,  # noqa: E402
                                                    q_major_table, static_segments)
from jaxformers.kernels.local_global.pallas_kernel import local_global_attention_pallas  # noqa: E402
from jaxformers.kernels.local_global.reference import local_global_attention_reference  # noqa: E402

PACKED = np.array([[1] * 9 + [2] * 14 + [4] * 8 + [0] * 6,      # three sequences, then padding
                   [5] * 20 + [6] * 17])                        # (segment 3 of row 0 is empty)


@pytest.mark.parametrize("case", MASK_CASES, ids=str)
def test_block_kinds_are_conservative(case):
    spec, block = MaskSpec(**case), 8
    seg = jnp.asarray(np.pad(PACKED, ((0, 0), (0, 3))))  # padded to 40 = 5 blocks
    dense = np.asarray(dense_mask(spec, 40, 40, seg)).reshape(2, 5, block, 5, block)
    any_, full = (np.asarray(a) for a in block_kinds(spec, seg, seg, block, block)[:2])
    np.testing.assert_array_equal(any_, dense.any(axis=(2, 4)))  # exact here: no false visits either
    assert not np.any(full & ~dense.all(axis=(2, 4)))
    if not case:
        assert full.sum() > 0  # dense blocks inside one segment run without a mask


def test_block_kinds_conservative_on_random_specs():
    """Random options, segment layouts and block sizes: a skipped block never holds an allowed pair,
    a "full" block never holds a masked one, and the static width bounds the visited blocks."""
    from jaxformers.kernels.local_global.mask import allowed, segments_allowed

    rng = np.random.default_rng(0)
    padded = 96  # fixed shapes keep eager jnp from recompiling; the real length varies below
    pos = np.arange(padded)
    for trial in range(40):
        length = int(rng.integers(20, padded + 1))
        case = {}
        if rng.random() < 0.6:
            case["window"] = tuple(None if rng.random() < 0.2 else int(rng.integers(0, 20)) for _ in range(2))
        if rng.random() < 0.4:
            case["group_size"] = int(rng.integers(1, 24))
        if rng.random() < 0.4:
            case["global_tokens"] = int(rng.integers(1, 6))
            case["global_queries"] = bool(rng.random() < 0.7)
        if rng.random() < 0.4:
            case["causal"] = True
            if rng.random() < 0.5:
                case["chunk_size"] = int(rng.integers(1, 12))
        spec = MaskSpec(**case)
        bq, bk = (int(b) for b in rng.choice([8, 16, 32], size=2))
        cuts = np.sort(rng.choice(np.arange(1, length), size=int(rng.integers(0, 4)), replace=False))
        seg = np.zeros(padded, np.int32)
        for i, part in enumerate(np.split(np.arange(length), cuts)):
            seg[part] = 0 if rng.random() < 0.2 else i + 1
        dense = allowed(spec, pos[:, None], pos[None, :]) & segments_allowed(seg[:, None], seg[None, :])
        blocks = dense.reshape(padded // bq, bq, padded // bk, bk)
        any_, full, k_width, q_width = block_kinds(spec, jnp.asarray(seg[None]), jnp.asarray(seg[None]), bq, bk)
        any_, full = np.asarray(any_)[0], np.asarray(full)[0]
        msg = f"trial {trial}: {case}, blocks {bq}x{bk}, segments {seg.tolist()}"
        assert not np.any(blocks.any(axis=(1, 3)) & ~any_), msg
        assert not np.any(full & ~blocks.all(axis=(1, 3))), msg
        assert any_.sum(1).max() <= k_width and any_.sum(0).max() <= q_width, msg
        if trial % 4 == 0:  # numpy segments (no segment ids) build the same tables while tracing
            static = static_segments(length, padded)
            for table in (q_major_table, k_major_table):
                want = table(spec, jnp.asarray(static), jnp.asarray(static), bq, bk)
                got = table(spec, static, static, bq, bk)
                assert isinstance(got[0], np.ndarray) and got[1] == want[1], msg
                np.testing.assert_array_equal(got[0], np.asarray(want[0]), err_msg=msg)


def test_tables_without_segment_ids_are_built_while_tracing():
    """Without segment ids the block tables are numpy constants of the traced program: built as jnp
    ops on constants, XLA folded them while compiling, ~7 s per table at L = 16384 in 16-token tiles
    (an argsort over 512 x 1024 blocks). With segment ids they are computed at run time."""
    x = jnp.zeros((1, 300, 2, 32), jnp.float32)
    seg = jnp.ones((1, 300), jnp.int32)

    def sorts(**kw):
        fn = functools.partial(local_global_attention_pallas, spec=MaskSpec(window=(40, 8)), scale=0.125,
                               backend="gpu", interpret=False, gpu_kernel="triton", **kw)
        jaxpr = jax.make_jaxpr(lambda x: jax.vjp(lambda *a: fn(*a), x, x, x)[1](x))(x)
        return sum(e.primitive.name == "sort" for j in [jaxpr.jaxpr, *subjaxprs(jaxpr.jaxpr)] for e in j.eqns)

    assert sorts() == 0
    assert sorts(segment_ids=seg) == 3  # forward, dQ and dK/dV tables


def test_window_visits_only_the_band():
    seg = jnp.ones((1, 512), jnp.int32)
    any_, full, k_width, q_width = block_kinds(MaskSpec(window=(16, 16)), seg, seg, 32, 32)
    assert int(any_.sum()) == 16 * 3 - 2 and int(full.sum()) == 0  # tridiagonal band of 16 query blocks
    assert k_width == q_width == 3  # index tables hold 3 entries per row, not 16
    any_, full, *_ = block_kinds(MaskSpec(window=(64, 64)), seg, seg, 32, 32)
    assert int(any_.sum()) == 16 * 5 - 6  # five diagonals
    assert int(full.sum()) == 16 * 3 - 2  # the inner three need no element mask
    # Global queries are left to a dense side pass, so no query block walks the whole row.
    _, _, k_width, q_width = block_kinds(MaskSpec(window=(16, 16), global_tokens=4, global_queries=False),
                                         seg, seg, 32, 32)
    assert k_width == 4 and q_width == 16  # band + the global key block; that key block serves all


# ---------------------------------------------------------------------------------------------
# Pallas kernel (interpret mode on CPU) against the reference: forward and gradients.

SMALL_BLOCKS = BlockSizes(16, 16, 16, 16)


def _fast_compile(fn):
    """Runs fn under jit with XLA's CPU optimisations off: interpret-mode kernels are all compile time."""
    return jax.jit(fn).lower().compile({"xla_backend_optimization_level": 0})()


def _compare(case, **kwargs):
    blocks = kwargs.pop("blocks", SMALL_BLOCKS)
    return _compare_with(functools.partial(local_global_attention_pallas, block_sizes=blocks), case, **kwargs)


def _compare_with(impl, case, *, dtype=jnp.float32, batch=2, length=37, heads=2, kv_heads=None, dim=32, seg=None,
             k_length=None, seed=0):
    kv_heads = kv_heads or heads
    k_length = k_length or length
    spec = MaskSpec(**case)
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, dim), dtype)
    k = jax.random.normal(keys[1], (batch, k_length, kv_heads, dim), dtype)
    v = jax.random.normal(keys[2], (batch, k_length, kv_heads, dim), dtype)
    d_out = jax.random.normal(keys[3], (batch, length, heads, dim), dtype)
    seg = None if seg is None else jnp.asarray(seg, jnp.int32)

    def run(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, spec, segment_ids=seg, scale=0.3), q, k, v)
        return out, vjp(d_out)

    out, grads = _fast_compile(lambda: run(impl))
    ref_out, ref_grads = _fast_compile(lambda: run(local_global_attention_reference))
    assert out.dtype == dtype and out.shape == q.shape
    # Interpret mode fills outputs with NaN before the kernel runs: unwritten elements fail here.
    for t in (out, *grads):
        assert np.isfinite(np.asarray(t, np.float32)).all()
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        if dtype == jnp.float32:
            np.testing.assert_allclose(got, want, **tol)
        else:  # bf16: relative error of the whole tensor
            assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want) + 1e-6
    if seg is not None:  # padding queries give zeros; padding keys get no gradient
        pad = np.asarray(seg) == 0
        assert np.all(np.asarray(out, np.float32)[pad] == 0)
        assert np.all(np.asarray(grads[1], np.float32)[pad] == 0)
    return out


KERNEL_CASES = [  # (mask options, segment ids, other _compare arguments)
    (dict(), None, dict()),                                           # dense, odd length
    (dict(), PACKED, dict(dim=64)),                                   # packed variable-length (BERT)
    (dict(window=(3, 5), global_tokens=2), PACKED, dict()),
    (dict(window=(50, 60)), None, dict(dim=128, batch=1)),             # window wider than the sequence
    (dict(group_size=5, global_tokens=1), None, dict(dim=48, heads=4, kv_heads=2, batch=1)),  # D padded, GQA
    (dict(window=(2, 2), group_size=8), PACKED, dict()),
    (dict(causal=True), None, dict(heads=4, kv_heads=2, batch=1)),     # grouped-query heads
    (dict(causal=True, window=(6, 0), global_tokens=3), PACKED, dict()),
    (dict(causal=True, chunk_size=4), PACKED, dict()),
]


@pytest.mark.parametrize("case,seg,kwargs", KERNEL_CASES,
                         ids=[f"{c}-{'packed' if s is not None else 'rows'}-{a}" for c, s, a in KERNEL_CASES])
def test_pallas_matches_reference_f32(case, seg, kwargs):
    _compare(case, seg=seg, **kwargs)


@pytest.mark.parametrize("case,seg", [(dict(window=(3, 5), global_tokens=2), PACKED),
                                      (dict(causal=True, chunk_size=4), None)], ids=["window-global-packed", "chunk-causal"])
def test_pallas_exact_float32_tiles(case, seg):
    """The tiles of exact float32 dots (32-query forward tiles over 16-key blocks, 16x16 backward)."""
    from jaxformers.kernels.local_global.blocks import EXACT_FLOAT32_GPU_BLOCKS

    _compare(case, seg=seg, blocks=EXACT_FLOAT32_GPU_BLOCKS)


def test_pallas_bf16():
    _compare(dict(window=(4, 4), global_tokens=3), dtype=jnp.bfloat16, seg=PACKED)


def test_pallas_cross_attention_lengths():
    _compare(dict(), batch=1, length=20, k_length=37)


def test_dot_product_attention_pallas_route():
    """The layers seam with implementation="pallas": default block sizes, shrunk to the sequence."""
    from jaxformers.layers import dot_product_attention

    q, k, v = jax.random.normal(jax.random.key(4), (3, 2, 37, 2, 16))
    seg = jnp.asarray(PACKED)
    got = jax.jit(lambda: dot_product_attention(q, k, v, segment_ids=seg, implementation="pallas"))()
    want = dot_product_attention(q, k, v, segment_ids=seg, implementation="xla")
    valid = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5)
    assert np.all(np.asarray(got)[~valid] == 0)


def test_same_shaped_calls_share_one_lowering():
    """A model's same-shaped layers lower the kernels once (compile time)."""
    x = jax.random.normal(jax.random.key(5), (1, 40, 2, 16))
    attend = functools.partial(local_global_attention, window=(3, 3), implementation="pallas")
    text = jax.jit(lambda x: attend(attend(x, x, x), x, x)).lower(x).as_text()
    assert lowered_functions(text, "_pallas") == {"_pallas": 2}


def test_kernels_lower_for_gpu_triton(lower_as_h100):
    """Lowers forward and backward for a CUDA device from this CPU host (no GPU needed): catches ops
    the Triton lowering does not support. Compiling and running need a GPU."""
    pytest.importorskip("jax._src.lib.triton")
    from jax import export

    spec = MaskSpec(window=(32, 0), global_tokens=2, causal=True, chunk_size=None)
    shape = jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

    def step(q, k, v, seg):
        out, vjp = jax.vjp(lambda *a: local_global_attention_pallas(
            *a, spec, segment_ids=seg, scale=0.125, interpret=False, backend="gpu"), q, k, v)
        return out, vjp(out)

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(jax.jit(step), platforms=["cuda"], disabled_checks=checks)(shape, shape, shape, seg).mlir_module()
    for name in ("local_global_fwd", "local_global_dq", "local_global_dkv"):
        assert f'name = "{name}"' in text


def test_float32_gpu_kernels_default_to_smaller_tiles():
    """Compiled float32 Triton kernels take FLOAT32_GPU_BLOCKS (at the bf16 tiles ptxas spilled up to
    ~16 KB per thread: compile_check for an A100), and EXACT_FLOAT32_GPU_BLOCKS where the default
    matmul precision asks for exact float32 dots (FLOAT32_GPU_BLOCKS spilled ~25 KB there); bf16,
    interpret mode and explicit sizes keep theirs."""
    import math

    def grids(dtype, **kw):  # programs per kernel: smaller tiles, more programs
        x = jnp.zeros((1, 256, 2, 64), dtype)
        fn = functools.partial(local_global_attention_pallas, spec=MaskSpec(window=(32, 32)), scale=0.125,
                               backend="gpu", gpu_kernel="triton", **kw)
        jaxpr = jax.make_jaxpr(lambda x: jax.vjp(lambda *a: fn(*a), x, x, x)[1](x))(x)
        calls = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
        assert len(calls) == 3  # forward, dQ, dK/dV
        return [math.prod(e.params["grid_mapping"].grid) for e in calls]

    with jax.default_matmul_precision("default"):  # TF32 (the tests' conftest asks for "highest")
        f32, bf16 = grids(jnp.float32, interpret=False), grids(jnp.bfloat16, interpret=False)
        # 256 tokens: forward 64- instead of 128-query tiles, dQ and dK/dV 32- instead of 64-token tiles
        assert f32 == [2 * n for n in bf16]
        assert grids(jnp.float32, interpret=True) == bf16
        assert grids(jnp.float32, interpret=False, block_sizes=BlockSizes()) == bf16
    with jax.default_matmul_precision("float32"):
        # forward 32x16 instead of 128x64 tiles (only query tiles make programs), dQ and dK/dV 16 instead of 64
        assert grids(jnp.float32, interpret=False) == [4 * n for n in bf16]
        assert grids(jnp.bfloat16, interpret=False) == bf16
        assert grids(jnp.float32, interpret=True) == bf16


@pytest.mark.parametrize("case,seg", [(dict(window=(3, 5), global_tokens=2), PACKED),
                                      (dict(causal=True, chunk_size=4), None)], ids=["window-global-packed", "chunk-causal"])
def test_tpu_splash_path_matches_reference(case, seg):
    """The TPU route (JAX splash attention + our mask) in interpret mode on CPU."""
    from jaxformers.kernels.local_global.splash_tpu import local_global_attention_splash

    splash = functools.partial(local_global_attention_splash, interpret=True)
    _compare_with(splash, case, seg=seg, heads=4, kv_heads=2)


@pytest.mark.parametrize("dim,case", [(64, dict(window=(32, 32), global_tokens=2)),
                                      (128, dict(causal=True, chunk_size=64)), (32, dict(group_size=16))])
def test_tpu_splash_path_lowers_for_tpu(dim, case):
    """Lowers forward and backward of the TPU route with Mosaic from this CPU host (no TPU needed)."""
    from jax import export

    from jaxformers.kernels.local_global.splash_tpu import local_global_attention_splash

    spec = MaskSpec(**case)
    shape = jax.ShapeDtypeStruct((2, 300, 4, dim), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

    def step(q, k, v, seg):
        out, vjp = jax.vjp(lambda *a: local_global_attention_splash(*a, spec, segment_ids=seg, scale=0.125), q, k, v)
        return out, vjp(out)

    checks = [export.DisabledSafetyCheck.custom_call("tpu_custom_call")]
    text = export.export(jax.jit(step), platforms=["tpu"], disabled_checks=checks)(shape, shape, shape, seg).mlir_module()
    assert text.count("tpu_custom_call") >= 3  # forward, dQ, dK/dV


def test_pallas_path_runs_per_batch_and_head_shard_over_an_active_mesh():
    from jaxformers import sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ks = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(ks[0], (4, 16, 4, 8))
    k, v = (jax.random.normal(kk, (4, 16, 2, 8)) for kk in ks[1:3])  # grouped-query: 2 query heads per kv head
    d_out = jax.random.normal(ks[3], q.shape)
    seg = jnp.array([[1] * 10 + [2] * 6, [1] * 16, [1] * 5 + [0] * 11, [3] * 8 + [4] * 8])

    def out_and_grads(implementation, q, k, v, seg):
        out, vjp = jax.vjp(lambda *a: local_global_attention(*a, window=(3, 3), segment_ids=seg,
                                                             implementation=implementation), q, k, v)
        return out, *vjp(d_out)

    want = out_and_grads("xla", q, k, v, seg)
    with sharding.activate(mesh):
        q, k, v, seg = sharding.shard_batch((q, k, v, seg), mesh)
        fn = jax.jit(functools.partial(out_and_grads, "pallas"))
        specs = [str(in_specs) for in_specs, _ in shard_map_specs(fn, q, k, v, seg)]
        assert specs and all("'tensor'" in s and "'fsdp'" in s for s in specs)  # its batch and heads
        got = fn(q, k, v, seg)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_tpu_paths_lower_under_a_multi_device_mesh(monkeypatch, lower_as_v5e):
    """Pallas TPU (Mosaic) calls do not compile outside shard_map on several devices ("Mosaic kernels
    cannot be automatically partitioned"): splash (unpacked) and our TPU kernels (packed), with a batch
    that splits and one that does not, lower for TPU under an 8-device mesh."""
    from jaxformers import sharding

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    for batch, packed in [(4, False), (4, True), (3, False)]:
        x = jax.ShapeDtypeStruct((batch, 300, 4, 64), jnp.bfloat16)
        seg = (jax.ShapeDtypeStruct((batch, 300), jnp.int32),) if packed else ()

        def step(q, k, v, *seg):
            out, vjp = jax.vjp(lambda *a: local_global_attention(*a, window=(32, 32), segment_ids=seg[0] if seg else None),
                               q, k, v)
            return out, vjp(out)

        with sharding.activate(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
            text = jax.jit(step).trace(x, x, x, *seg).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") >= 3


# ---------------------------------------------------------------------------------------------
# The reference's group layout: group-structured specs attend within groups of g positions
# (O(L·g) memory) and must equal the full-mask computation exactly.

GROUPED_CASES = [  # (mask options, segment ids or None, (batch, length, heads, kv_heads))
    (dict(group_size=8), None, (2, 32, 2, 2)),                          # L divisible by g
    (dict(group_size=5), PACKED, (2, 37, 2, 2)),                        # padded tail, packed segments
    (dict(group_size=6, causal=True), PACKED, (2, 37, 4, 2)),           # causal inside groups, GQA
    (dict(group_size=7, causal=True, chunk_size=3), None, (1, 30, 2, 1)),  # chunks straddle groups, MQA
    (dict(group_size=8, window=(2, 1)), PACKED[:1], (1, 37, 2, 2)),     # window inside groups
    (dict(group_size=64, causal=True), None, (1, 20, 2, 2)),            # one group longer than L
]


def _reference_out_and_grads(case, seg, shape, *, dense: bool, monkeypatch):
    from jaxformers.kernels.local_global import reference

    batch, length, heads, kv_heads = shape
    ks = jax.random.split(jax.random.key(11), 4)
    q = jax.random.normal(ks[0], (batch, length, heads, 16))
    k, v = (jax.random.normal(kk, (batch, length, kv_heads, 16)) for kk in ks[1:3])
    d_out = jax.random.normal(ks[3], q.shape)
    seg = None if seg is None else jnp.asarray(seg, jnp.int32)
    with monkeypatch.context() as m:
        if dense:  # the full-mask path, as before the group layout existed
            m.setattr(reference, "is_group_structured", lambda spec: False)

        @jax.jit
        def run(q, k, v):
            out, vjp = jax.vjp(lambda *a: local_global_attention(*a, segment_ids=seg, implementation="xla", **case),
                               q, k, v)
            return out, vjp(d_out)

        return run(q, k, v)


@pytest.mark.parametrize("case,seg,shape", GROUPED_CASES,
                         ids=[f"{c}-{'packed' if s is not None else 'rows'}-{sh}" for c, s, sh in GROUPED_CASES])
def test_reference_group_layout_equals_full_mask(case, seg, shape, monkeypatch):
    out, grads = _reference_out_and_grads(case, seg, shape, dense=False, monkeypatch=monkeypatch)
    want, want_grads = _reference_out_and_grads(case, seg, shape, dense=True, monkeypatch=monkeypatch)
    for got, ref in zip((out, *grads), (want, *want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6, rtol=1e-6)
    if seg is not None:  # padding queries give zeros, padding keys no gradient
        pad = np.asarray(seg) == 0
        assert np.all(np.asarray(out)[pad] == 0) and np.all(np.asarray(grads[1])[pad] == 0)


def test_reference_group_layout_has_no_length_squared_intermediate():
    """L=4096, g=64: no (L, L)-sized value in the forward or backward jaxpr, and XLA's temporary
    buffers stay far below one (L, L) float32 score matrix (64 MiB; the full-mask path needs ~640 MiB)."""
    length, group = 4096, 64
    shape = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(q, k, v, seg):
        return local_global_attention(q, k, v, group_size=group, causal=True, segment_ids=seg,
                                      implementation="xla").sum()

    fwd_bwd = jax.grad(loss, argnums=(0, 1, 2))
    jaxpr = jax.make_jaxpr(fwd_bwd)(shape, shape, shape, seg)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape"))
            for param in eqn.params.values():  # sub-jaxprs (pjit, custom_vjp, ...)
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from sizes(sub)

    biggest = max(sizes(jaxpr.jaxpr))
    assert biggest < length * length // 16, f"an intermediate has {biggest} elements"
    memory = jax.jit(fwd_bwd).lower(shape, shape, shape, seg).compile().memory_analysis()
    if memory is not None:  # some backends do not report
        assert memory.temp_size_in_bytes < 32 * 2**20, memory.temp_size_in_bytes


def test_banded_reference_equals_dense_mask():
    """The reference's banded layout (finite windows, linear memory) equals the full-mask softmax,
    values and gradients, with global tokens, causal/chunk rules, groups and packed segments."""
    from jaxformers.kernels.local_global.reference import _masked_attention, is_banded

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 2, 8)), jnp.float32) for _ in range(3))
    seg = np.ones((2, 37), np.int32)
    seg[0, 20:], seg[1, 30:] = 2, 0
    specs = [MaskSpec(window=(2, 5), global_tokens=3), MaskSpec(window=(4, 0), causal=True, chunk_size=3),
             MaskSpec(window=(3, 3), group_size=8, global_tokens=2)]
    for spec, segment_ids in zip(specs, (jnp.asarray(seg), None, jnp.asarray(seg))):
        assert is_banded(spec, 37, 37)

        def both(q, k, v, segment_ids):
            mask = dense_mask(spec, 37, 37, segment_ids)[:, None]
            banded = lambda *a: local_global_attention_reference(*a, spec, segment_ids=segment_ids, scale=0.3)  # noqa: E731
            dense = lambda *a: _masked_attention(*a, mask, 0.3)  # noqa: E731
            return [jax.value_and_grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v) + (f(q, k, v),)
                    for f in (banded, dense)]

        got, want = fast_jit(both)(q, k, v, segment_ids)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
    assert not is_banded(MaskSpec(window=(20, 20)), 37, 37) and not is_banded(MaskSpec(window=(None, 2)), 64, 64)
