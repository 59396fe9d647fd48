"""local_global_attention: mask semantics against hand-built masks, the Pallas kernel (interpret mode
on CPU) against the reference, forward and gradients, and input validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.kernels import local_global_attention
from jaxformers.kernels.local_global.mask import MaskSpec, dense_mask


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
    grads = jax.grad(lambda *a: local_global_attention(*a, segment_ids=seg, implementation="xla").sum(),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    # Padding keys receive no gradient, padding queries neither.
    assert np.all(np.asarray(grads[1][0, 5:]) == 0.0) and np.all(np.asarray(grads[0][0, 5:]) == 0.0)


def test_xla_grouped_query_heads_match_repeated_kv():
    q = jax.random.normal(jax.random.key(2), (1, 9, 4, 8))
    k, v = jax.random.normal(jax.random.key(3), (2, 1, 9, 2, 8))
    got = local_global_attention(q, k, v, window=(2, 2), implementation="xla")
    want = local_global_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), window=(2, 2), implementation="xla")
    np.testing.assert_allclose(got, want, atol=1e-6)


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
