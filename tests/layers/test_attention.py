import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.layers import MultiHeadAttention, dot_product_attention, segment_mask
from tests.helpers import numpy_variables, on_fake_gpu


def _naive(q, k, v, mask=None, bias=None, scale=None):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if mask is not None:
        s = np.where(np.asarray(mask), s, -1e30)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _qkv(seed, b=2, lq=7, lk=9, h=3, d=8, dv=None):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, lq, h, d)), jax.random.normal(ks[1], (b, lk, h, d)),
            jax.random.normal(ks[2], (b, lk, h, dv or d)))


def test_xla_matches_naive_with_mask_bias_and_scale():
    q, k, v = _qkv(0, dv=5)
    mask = jax.random.bernoulli(jax.random.key(1), 0.7, (2, 1, 7, 9)).at[..., 0].set(True)
    bias = jax.random.normal(jax.random.key(2), (1, 3, 7, 9))
    out = dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.3)
    np.testing.assert_allclose(out, _naive(q, k, v, mask, bias, 0.3), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 7, 3, 5)


def test_segment_ids_block_cross_segment_attention():
    q, k, v = _qkv(3, lq=6, lk=6)
    seg = jnp.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]])
    out = dot_product_attention(q, k, v, segment_ids=seg)
    ref = _naive(q, k, v, mask=segment_mask(seg, seg))
    valid = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], rtol=1e-5, atol=1e-5)
    # a sequence alone equals the same sequence inside a packed row
    alone = dot_product_attention(q[:1, 2:5], k[:1, 2:5], v[:1, 2:5])
    np.testing.assert_allclose(out[:1, 2:5], alone, rtol=1e-5, atol=1e-5)


def test_auto_falls_back_to_xla_on_cpu():
    q, k, v = _qkv(4)
    np.testing.assert_allclose(dot_product_attention(q, k, v, implementation="auto"),
                               dot_product_attention(q, k, v), rtol=1e-6)


@pytest.mark.parametrize("capability,eligible", [("8.0", True), ("8.9", True), ("9.0", True), ("7.5", False),
                                                 ("7.0", False), (None, False)])
def test_auto_takes_cudnn_on_ampere_and_newer_only(monkeypatch, capability, eligible):
    """cuDNN's flash attention needs compute capability 8.0: "auto" keeps the XLA path on a T4 or V100
    (and on a ROCm GPU, which gives none), where the cuDNN call would fail."""
    from jaxformers.layers.attention import _cudnn_eligible

    on_fake_gpu(monkeypatch, capability)
    q = jnp.zeros((1, 8, 2, 64), jnp.float16)
    assert _cudnn_eligible(q, None, None, 0.0) == eligible
    assert not _cudnn_eligible(q.astype(jnp.float32), None, None, 0.0)
    assert not _cudnn_eligible(q, None, None, 0.1)
    assert not _cudnn_eligible(jnp.zeros((1, 8, 2, 256), jnp.float16), None, None, 0.0)


@pytest.mark.parametrize("bad,match", [
    (dict(implementation="flash"), "implementation must be one of"),
    (dict(q=jnp.zeros((2, 7, 3))), "must be \\(batch, length, heads, head_dim\\)"),
    (dict(k=jnp.zeros((2, 9, 3, 4)), v=jnp.zeros((2, 9, 3, 4))), "share head_dim"),
    (dict(segment_ids=jnp.zeros((2, 5), jnp.int32)), "segment_ids must be"),
])
def test_bad_input_is_named(bad, match):
    q, k, v = _qkv(5)
    args = dict(q=q, k=k, v=v)
    args.update({n: bad.pop(n) for n in list(bad) if n in "qkv"})
    with pytest.raises(ValueError, match=match):
        dot_product_attention(args["q"], args["k"], args["v"], **bad)


def test_pallas_rejects_arbitrary_mask():
    q, k, v = _qkv(6)
    with pytest.raises(ValueError, match="segment_ids, not an arbitrary"):
        dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 7, 9), bool), implementation="pallas")


def test_mha_self_and_cross_attention_match_manual_computation():
    x = jax.random.normal(jax.random.key(0), (2, 5, 12))
    ctx = jax.random.normal(jax.random.key(1), (2, 4, 12))
    mha = MultiHeadAttention(num_heads=3)
    params = nn.unbox(mha.init(jax.random.key(2), x))["params"]
    assert params["qkv"]["kernel"].shape == (12, 3, 3, 4) and params["proj"]["kernel"].shape == (3, 4, 12)
    qkv = jnp.einsum("ble,ethd->blthd", x, params["qkv"]["kernel"]) + params["qkv"]["bias"]
    att = _naive(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    ref = np.einsum("blhd,hde->ble", att, params["proj"]["kernel"]) + params["proj"]["bias"]
    np.testing.assert_allclose(mha.apply({"params": params}, x), ref, rtol=1e-5, atol=1e-5)

    cross = mha.init(jax.random.key(3), x, ctx)["params"]
    assert set(cross) == {"q", "kv", "proj"}
    out = mha.apply({"params": cross}, x, ctx)
    assert out.shape == x.shape


def test_mha_attention_dropout_needs_rng_only_in_training():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    mha = MultiHeadAttention(num_heads=2, attention_dropout=0.5)
    v = mha.init(jax.random.key(1), x)
    a = mha.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    b = mha.apply(v, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(a, b)
    np.testing.assert_allclose(mha.apply(v, x), mha.apply(v, x))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MultiHeadAttention(num_heads=3).init(jax.random.key(0), x)


def test_mha_attention_fn_replaces_the_pattern_keeping_params():
    import functools

    from jaxformers.kernels import local_global_attention

    x = jax.random.normal(jax.random.key(0), (2, 9, 12))
    dense = MultiHeadAttention(num_heads=3)
    windowed = MultiHeadAttention(num_heads=3, attention_fn=functools.partial(local_global_attention, window=(1, 1)))
    v = dense.init(jax.random.key(1), x)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(windowed.init(jax.random.key(1), x))
    p = nn.unbox(v)["params"]
    qkv = jnp.einsum("ble,ethd->blthd", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    band = np.abs(np.arange(9)[:, None] - np.arange(9)[None, :]) <= 1
    att = _naive(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=band[None, None])
    ref = np.einsum("blhd,hde->ble", att, p["proj"]["kernel"]) + p["proj"]["bias"]
    np.testing.assert_allclose(windowed.apply(v, x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="takes no mask, bias or attention dropout; got mask"):
        windowed.apply(v, x, mask=jnp.ones((1, 1, 9, 9), bool))


def test_mha_kv_cache_decoding_equals_causal_attention():
    from jaxformers.layers.attention import KVCache, init_kv_cache

    b, length, dim, heads, max_len = 2, 7, 12, 3, 9  # the cache is longer than the sequence
    x = jax.random.normal(jax.random.key(0), (b, length, dim))
    mha = MultiHeadAttention(num_heads=heads)
    params = numpy_variables(mha, x)
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    want = np.asarray(jax.jit(lambda x: mha.apply(params, x, mask=causal))(x))

    step = jax.jit(lambda cache, x_t, mask=None: mha.apply(params, x_t, mask=mask, cache=cache))
    cache = init_kv_cache(b, max_len, heads, dim // heads)
    # a 3-token prefill, causal inside the step through ``mask``, then one token per step
    prefill_mask = (jnp.arange(max_len)[None, :] <= jnp.arange(3)[:, None])[None, None]
    out, cache = step(cache, x[:, :3], prefill_mask)
    outs = [out]
    for t in range(3, length):
        out, cache = step(cache, x[:, t:t + 1])
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), want, rtol=1e-5, atol=1e-5)
    assert isinstance(cache, KVCache) and int(cache.index) == length
    # the cache holds exactly the layer's keys/values of the sequence, zeros after it
    qkv = jnp.einsum("ble,ethd->blthd", x, params["params"]["qkv"]["kernel"]) + params["params"]["qkv"]["bias"]
    np.testing.assert_allclose(cache.k[:, :length], qkv[:, :, 1], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(cache.v[:, length:]) == 0)
    # a bfloat16 cache stores the keys/values rounded, the step computes in the input dtype
    _, small = jax.eval_shape(lambda c: mha.apply(params, x[:, :1], cache=c),
                              init_kv_cache(b, max_len, heads, dim // heads, jnp.bfloat16))
    assert small.k.dtype == jnp.bfloat16 and small.index.dtype == jnp.int32


def test_mha_kv_cache_bad_inputs_raise_clear_errors():
    from jaxformers.layers.attention import init_kv_cache

    x = jnp.ones((2, 1, 12))
    mha = MultiHeadAttention(num_heads=3)
    params = jax.jit(mha.init)(jax.random.key(0), x)
    good = init_kv_cache(2, 4, 3, 4)
    cases = [
        (dict(cache=(good.k, good.v, good.index)), TypeError, "KVCache"),
        (dict(cache=init_kv_cache(2, 4, 2, 6)), ValueError, r"cache.k must be \(batch, max_len, heads, head_dim\)"),
        (dict(cache=init_kv_cache(3, 4, 3, 4)), ValueError, "cache.k must be"),
        (dict(cache=good._replace(v=jnp.zeros((2, 5, 3, 4)))), ValueError, "same shape"),
        (dict(cache=good._replace(index=jnp.zeros((1,), jnp.int32))), ValueError, "integer scalar"),
        (dict(cache=good._replace(index=jnp.asarray(4))), ValueError, "do not fit"),
        (dict(cache=good, kv=jnp.ones((2, 3, 12))), ValueError, "self-attention"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            mha.apply(params, x, **kwargs)
    with pytest.raises(ValueError, match="holds only max_len=4"):
        mha.apply(params, jnp.ones((2, 5, 12)), cache=good)
    # traced indices cannot be checked: the caller keeps index + steps <= max_len (documented)
    out, cache = jax.jit(lambda c: mha.apply(params, x, cache=c))(good._replace(index=jnp.asarray(2)))
    assert out.shape == x.shape and int(cache.index) == 3


def test_causal_attention_equals_a_lower_triangular_mask():
    """``causal=True`` is the lower-triangular mask, on XLA and in the Pallas kernel, with segments too."""
    from jaxformers.layers import causal_mask

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 2, 8)) for i in range(3))
    seg = jnp.asarray([[1] * 9 + [2] * 7, [1] * 16])
    tril = jnp.tril(jnp.ones((16, 16), bool))[None, None]
    np.testing.assert_array_equal(causal_mask(16), tril)
    ref = dot_product_attention(q, k, v, mask=tril, segment_ids=seg)
    np.testing.assert_allclose(dot_product_attention(q, k, v, causal=True, segment_ids=seg), ref, atol=1e-6)
    pallas = dot_product_attention(q, k, v, causal=True, segment_ids=seg, implementation="pallas")
    np.testing.assert_allclose(pallas, ref, atol=1e-5)
