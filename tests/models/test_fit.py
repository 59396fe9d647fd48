"""FIT: layer specs, block-diagonal local attention, the encoder / AR decoder / denoiser (shapes, jit,
gradients, training on the embedded digits), cached AR decoding, and sharded == single device.

Compilation dominates on CPU, so each use compiles few programs (module-scoped fixtures)."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers
from jaxformers.layers import MultiHeadAttention, dot_product_attention
from jaxformers.models.fit import FITEncoder
from jaxformers.models.fit_ar import FITAR, ar_loss, generate, init_decode_cache
from jaxformers.models.fit_diffusion import FITDenoiser, ddpm_loss, ddpm_sample_step, ddpm_schedule
from jaxformers.models.fit_layers import (chunk_causal_mask, group_grid, groups_to_image, image_to_groups,
                                          local_attention, parse_layer_spec)
from jaxformers.sharding import activate, logical_shardings, make_mesh, shard_batch
from tests.helpers import fast_jit, perturb


@pytest.fixture(scope="module")
def digits():
    input_pipeline = pytest.importorskip("train.input_pipeline")
    pytest.importorskip("sklearn")
    images, labels = input_pipeline.load_digits_split("train")
    return (images.astype(np.float32) / 255.0 - 0.3) / 0.4, labels


# ---------------------------------------------------------------------------------------------
# Layer specs, masks, grouping


@pytest.mark.parametrize("spec, blocks", [
    ("(2)4(2)", ((2, 4), (2, 0))),
    ("(2)4", ((2, 4),)),
    ("(0)3", ((0, 3),)),
    ("(4)6(4)6(4)", ((4, 6), (4, 6), (4, 0))),
    ("(1)2(3)4", ((1, 2), (3, 4))),
    ("(12)10(2)", ((12, 10), (2, 0))),
])
def test_parse_layer_spec(spec, blocks):
    assert parse_layer_spec(spec) == blocks


@pytest.mark.parametrize("spec", ["", "2(2)", "(2)0(2)", "(2)0(2)4", "(a)2", "(2)4)", "((2)4", "(2)-1", "()4", "(0)0"])
def test_parse_layer_spec_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="layers="):
        parse_layer_spec(spec)


def test_parse_layer_spec_rejects_non_string():
    with pytest.raises(TypeError, match="layers must be a string"):
        parse_layer_spec(24)


def test_chunk_causal_mask():
    m = np.asarray(chunk_causal_mask(3, 2))
    expected = np.kron(np.tril(np.ones((3, 3), bool)), np.ones((2, 2), bool))
    np.testing.assert_array_equal(m, expected)


def test_image_groups_are_windows_and_invert():
    x = jax.random.normal(jax.random.key(0), (2, 16, 24, 3))
    g = image_to_groups(x, patch_size=2, group_size=(2, 3))
    assert g.shape == (2, 4 * 4, 6, 12)
    # group 1 is the second window of the first row: rows 0..3, columns 6..11
    window = x[:, 0:4, 6:12].reshape(2, 2, 2, 3, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 6, 12)
    np.testing.assert_array_equal(g[:, 1], window)
    np.testing.assert_array_equal(groups_to_image(g, (16, 24), 2, (2, 3)), x)
    with pytest.raises(ValueError, match="does not tile"):
        group_grid((18, 24), 2, (2, 3))


# ---------------------------------------------------------------------------------------------
# Local layers == dense attention with a block-diagonal mask


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dense_block_diagonal(attn_params, x, num_groups, causal):
    """Reference: the layer's projections, dense attention over the flattened (B, T*N) sequence with a
    block-diagonal (optionally causal-within-group) mask."""
    bt, n, c = x.shape
    b = bt // num_groups
    qkv = jnp.einsum("lc,cthd->lthd", x.reshape(bt * n, c), attn_params["qkv"]["kernel"]) + attn_params["qkv"]["bias"]
    q, k, v = (qkv[:, i].reshape(b, num_groups * n, *qkv.shape[2:]) for i in range(3))
    pos = jnp.arange(num_groups * n)
    mask = (pos[:, None] // n) == (pos[None, :] // n)
    if causal:
        mask &= pos[None, :] <= pos[:, None]
    out = dot_product_attention(q, k, v, mask=mask[None, None])
    out = jnp.einsum("blhk,hkc->blc", out, attn_params["proj"]["kernel"]) + attn_params["proj"]["bias"]
    return out.reshape(bt, n, c)


def _local_layer(num_groups, causal, impl="xla"):
    """The attention of FIT's local layers: the shared MultiHeadAttention with local_attention plugged in."""
    return MultiHeadAttention(num_heads=2, attention_fn=functools.partial(
        local_attention, num_groups=num_groups, causal=causal, implementation=impl))


@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_equals_block_diagonal_dense(causal):
    t, n, c = 3, 5, 16
    x = jax.random.normal(jax.random.key(1), (2 * t, n, c))
    layer = _local_layer(t, causal)
    params = perturb(nn.unbox(fast_jit(layer.init)(jax.random.key(2), x))["params"], seed=0)
    out = fast_jit(layer.apply)({"params": params}, x)
    np.testing.assert_allclose(out, _dense_block_diagonal(params, x, t, causal), rtol=1e-5, atol=1e-5)


def test_local_attention_pallas_path_equals_xla():
    pytest.importorskip("jaxformers.kernels.local_global.pallas_kernel")
    t, n, c = 2, 16, 32
    x = jax.random.normal(jax.random.key(3), (2 * t, n, c))
    layer = _local_layer(t, True)
    params = perturb(nn.unbox(fast_jit(layer.init)(jax.random.key(4), x))["params"], seed=0)
    ref = fast_jit(layer.apply)({"params": params}, x)
    out = fast_jit(_local_layer(t, True, "pallas").apply)({"params": params}, x)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Encoder


def _tiny_encoder(**kw):
    cfg = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, layers="(1)1(1)", group_size=2,
               latents_per_group=2, x_dim=32, latent_dim=48, x_num_heads=2, latent_num_heads=2)
    return FITEncoder(**{**cfg, **kw})


@pytest.fixture(scope="module")
def encoder_setup():
    model = _tiny_encoder()
    params = nn.unbox(fast_jit(model.init)(jax.random.key(0), jnp.zeros((2, 8, 8, 1))))["params"]
    return model, params


def test_encoder_shapes_features_and_bad_input(encoder_setup):
    model, params = encoder_setup
    x = jnp.zeros((2, 8, 8, 1))
    variables = {"params": params}
    assert model.num_groups == 4
    out = fast_jit(lambda v, x: model.apply(v, x, output="all"))(variables, x)
    assert out.logits.shape == (2, 10)
    assert {k: v.shape for k, v in out.features.items()} == {2: (2, 4, 4, 32)}  # 2x2 groups of 2x2 patches
    assert out.pre_logits.shape == (2, 32)  # spec ends with local layers: tokens are pooled
    np.testing.assert_allclose(out.pre_logits, out.features[2].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="img_size"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 12, 12, 1)))
    with pytest.raises(ValueError, match="layers="):
        jax.eval_shape(_tiny_encoder(layers="(1)0(1)").init, jax.random.key(0), x)
    # bf16 compute with float32 parameters, sin-cos positions, latents pooled (spec ends with global layers)
    bf16 = _tiny_encoder(dtype=jnp.bfloat16, x_pos_encoding="sincos", layers="(1)2")
    abstract = jax.eval_shape(bf16.init, jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(nn.unbox(abstract)))
    assert "x_pos_emb" not in abstract["params"]
    out = jax.eval_shape(lambda v: bf16.apply(v, x, output="all"), nn.unbox(abstract))
    assert out.features[2].dtype == jnp.bfloat16 and out.pre_logits.shape == (2, 48)


def test_registered_variants():
    assert {"fit_s", "fit_b", "fit_l"} <= set(jaxformers.list_models("fit_*"))
    info = jaxformers.model_info("fit_b")
    assert info.arxiv == "2305.12689" and info.repo == "google-research/pix2seq" and info.params_m is None
    counts = [jaxformers.registry.count_params(name) for name in ("fit_s", "fit_b")]
    assert 20e6 < counts[0] < counts[1]
    assert jaxformers.create_model("fit_s").layers == "(2)4(2)4(2)"


def test_encoder_trains_with_remat_on_digits(digits, encoder_setup):
    images, labels = digits
    model, params = encoder_setup
    model = model.clone(remat=True)  # per-layer rematerialisation in the backward pass
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, grads

    fixed = (jnp.asarray(images[:128]), jnp.asarray(labels[:128]))
    _, _, loss0, _ = step(params, opt, *fixed)
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = rng.choice(len(labels), 128, replace=False)
        params, opt, _, _ = step(params, opt, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
    _, _, loss1, grads = step(params, opt, *fixed)
    assert float(loss1) < 0.9 * float(loss0), (float(loss0), float(loss1))
    # once the (zero-initialised) head has moved, every part of the interleaved stack gets gradient
    flat = {k: np.asarray(g) for k, g in flax.traverse_util.flatten_dict(grads, sep="/").items()}
    assert all(np.isfinite(g).all() for g in flat.values())
    for part in ("core/x_network_0_0", "core/l2x_cross_attn_0", "core/l_network_0_0", "core/x2l_cross_attn_0",
                 "core/x_network_1_0", "core/latent_pos_emb", "stem"):
        assert any(k.startswith(part) and np.abs(g).sum() > 0 for k, g in flat.items()), part


def test_encoder_sharded_over_groups_equals_single_device(encoder_setup):
    """data=2, fsdp=2, tensor=2 with remat: the (B*T, N, C) group axis is split over data x fsdp, heads
    over tensor; loss, features and gradients equal the single-device, non-remat computation."""
    model, params = encoder_setup
    params = perturb(params, seed=3)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = jax.random.normal(jax.random.key(5), (4, 8, 8, 1))
    y = jnp.arange(4)

    def loss_and_grads(model):
        def f(p, x):
            out = model.apply({"params": p}, x, output="all")
            return optax.softmax_cross_entropy_with_integer_labels(out.logits, y).mean(), out
        return fast_jit(jax.value_and_grad(f, has_aux=True))

    (ref_loss, ref), ref_grads = loss_and_grads(model)(params, x)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    placed = jax.device_put(params, logical_shardings(abstract, mesh))
    assert not placed["core"]["x_network_0_0"]["mlp"]["fc1"]["kernel"].sharding.is_fully_replicated
    with activate(mesh):
        (loss, out), grads = loss_and_grads(model.clone(remat=True))(placed, shard_batch(x, mesh))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Autoregressive decoder


def _tiny_ar():
    return FITAR(vocab_size=13, seq_len=24, group_size=6, latents_per_group=2, layers="(1)1(1)1(1)", x_dim=16,
                 latent_dim=24, x_num_heads=2, latent_num_heads=3)


@pytest.fixture(scope="module")
def ar_setup():
    model = _tiny_ar()
    targets = jax.random.randint(jax.random.key(0), (2, 24), 0, 13)
    params = perturb(nn.unbox(fast_jit(model.init)(jax.random.key(1), targets))["params"], scale=0.1)

    @jax.jit
    def loss_and_grads(p, targets):
        return jax.value_and_grad(lambda p: ar_loss(model, {"params": p}, targets, return_logits=True), has_aux=True)(p)

    return model, params, targets, loss_and_grads


def test_ar_shapes_grads_and_causality(ar_setup):
    model, params, targets, loss_and_grads = ar_setup
    (loss, logits), grads = loss_and_grads(params, targets)
    logits, grads = np.asarray(logits, np.float64), jax.tree_util.tree_map(np.asarray, grads)
    assert logits.shape == (2, 24, 13) and np.isfinite(float(loss))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(loss, -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean(), rtol=1e-5)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert np.abs(grads["core"]["l_network_1_0"]["mlp"]["fc2"]["kernel"]).sum() > 0
    # changing target s (the input at s+1) must not change any logit at positions <= s
    for s in (3, 11, 12, 20):
        changed = targets.at[:, s].set((targets[:, s] + 1) % 13)
        (_, logits2), _ = loss_and_grads(params, changed)
        logits2 = np.asarray(logits2, np.float64)
        np.testing.assert_array_equal(logits2[:, : s + 1], logits[:, : s + 1])
        assert np.abs(logits2[:, s + 1:] - logits[:, s + 1:]).max() > 1e-4
    with pytest.raises(ValueError, match="seq_len"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 18), jnp.int32))


@pytest.mark.slow
def test_ar_pallas_attention_equals_xla(ar_setup):
    """attention_impl='pallas' (chunk-causal global layers through the local_global kernel, in
    interpret mode here) gives the XLA path's loss and gradients; attention dropout is refused."""
    pytest.importorskip("jaxformers.kernels.local_global.pallas_kernel")
    model, params, targets, loss_and_grads = ar_setup
    pallas = model.clone(attention_impl="pallas", local_attention_impl="pallas")
    (loss, logits), grads = loss_and_grads(params, targets)
    (loss_p, logits_p), grads_p = fast_jit(jax.value_and_grad(
        lambda p: ar_loss(pallas, {"params": p}, targets, return_logits=True), has_aux=True))(params)
    np.testing.assert_allclose(logits_p, logits, rtol=1e-4, atol=1e-5)
    for g, w in zip(jax.tree_util.tree_leaves(grads_p), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="attention dropout"):
        ar_loss(pallas.clone(attn_drop_rate=0.1), {"params": params}, targets, train=True,
                rngs={"dropout": jax.random.key(0)})


def test_ar_cached_decoding_equals_uncached_forward(ar_setup):
    model, params, targets, loss_and_grads = ar_setup
    (_, logits), _ = loss_and_grads(params, targets)
    toks, cached = generate(model, {"params": params}, jax.random.key(2), prompt=targets, return_logits=True)
    np.testing.assert_array_equal(toks, targets)
    np.testing.assert_allclose(cached, logits, rtol=1e-4, atol=1e-5)
    # sampling after a prompt (same compiled loop): the prompt is kept, the rest are valid ids, and the
    # logits of the sampled continuation equal the uncached forward on the sampled sequence
    toks, cached = generate(model, {"params": params}, jax.random.key(3), prompt=targets[:, :7], return_logits=True)
    toks = np.asarray(toks)
    assert toks.shape == (2, 24)
    np.testing.assert_array_equal(toks[:, :7], np.asarray(targets)[:, :7])
    assert toks.min() >= 0 and toks.max() < 13
    (_, logits), _ = loss_and_grads(params, toks)
    np.testing.assert_allclose(cached, logits, rtol=1e-4, atol=1e-5)
    cache = init_decode_cache(model, 2)
    assert cache["global"]["0_0"].k.shape == (2, 8, 3, 8) and cache["local"]["2_0"].v.shape == (2, 6, 2, 8)


# ---------------------------------------------------------------------------------------------
# Denoiser


def test_denoiser_trains_on_digits_and_samples(digits):
    images, labels = digits
    model = FITDenoiser(img_size=8, patch_size=2, in_chans=1, layers="(1)1(1)", group_size=2, latents_per_group=2,
                        x_dim=32, latent_dim=32, x_num_heads=2, latent_num_heads=2, num_classes=10)
    sched = ddpm_schedule(50)
    params = nn.unbox(fast_jit(model.init)(jax.random.key(0), jnp.asarray(images[:2]), jnp.zeros(2),
                                          jnp.asarray(labels[:2])))["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y, rng):
        loss, grads = jax.value_and_grad(lambda p: ddpm_loss(model, {"params": p}, x, rng, schedule=sched, labels=y))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, grads

    fixed = (jnp.asarray(images[:64]), jnp.asarray(labels[:64]), jax.random.key(7))
    _, _, loss0, grads = step(params, opt, *fixed)
    grads = jax.tree_util.tree_map(np.asarray, grads)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert np.abs(grads["core"]["l2c_cross_attn_0"]["attn"]["q"]["kernel"]).sum() > 0
    rng = np.random.default_rng(0)
    for i in range(25):
        idx = rng.choice(len(labels), 64, replace=False)
        params, opt, _, _ = step(params, opt, jnp.asarray(images[idx]), jnp.asarray(labels[idx]), jax.random.key(i))
    _, _, loss1, _ = step(params, opt, *fixed)
    assert float(loss1) < 0.8 * float(loss0), (float(loss0), float(loss1))
    sample_step = fast_jit(lambda p, x, s, r: ddpm_sample_step(model, {"params": p}, x, s, r, schedule=sched,
                                                              labels=jnp.arange(4)))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    x_prev = np.asarray(sample_step(params, x, 49, jax.random.key(2)))
    x_last = sample_step(params, x, 0, jax.random.key(2))
    assert x_prev.shape == x.shape and np.isfinite(x_prev).all()
    assert np.abs(x_prev - np.asarray(x)).max() > 0
    # t=0 adds no noise: the step is deterministic in the rng
    np.testing.assert_allclose(x_last, sample_step(params, x, 0, jax.random.key(3)), rtol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        jax.eval_shape(lambda p: model.apply({"params": p}, x, jnp.zeros(4)), params)
    with pytest.raises(ValueError, match="time"):
        jax.eval_shape(lambda p: model.apply({"params": p}, x, jnp.zeros(3), jnp.arange(4)), params)
