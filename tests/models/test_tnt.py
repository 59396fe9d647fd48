"""TNT: timm parameter counts, live timm parity (current and legacy layouts, default and other image
sizes, timm and official key names), features, gradients, sharding, training, and input errors."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.convert.pretrained import CheckpointMismatchError
from jaxformers.models.tnt import _OFFICIAL_RENAMES
from jaxformers.sharding import activate, logical_shardings, make_mesh, shard_batch

# timm 1.0's exact counts (``sum(p.numel() for p in timm.create_model(name).parameters())``).
TIMM_PARAMS = {
    "tnt_s_patch16_224": 23_768_584,
    "tnt_b_patch16_224": 65_428_680,
    "tnt_s_legacy_patch16_224": 23_755_336,
}

TINY = dict(embed_dim=32, inner_dim=8, depth=2, num_heads_outer=2, num_heads_inner=2, num_classes=10)


def _image(batch, size, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


def _perturb(params, seed=1, scale=0.05):
    """Random offsets on every parameter (zero-initialised heads would make any two models agree)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


# The models here are tiny: compile them at XLA's lowest optimisation level (halves compile time).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def _init(model, size, batch=2, perturb=False):
    """Variables from ``model.init`` (one compiled program), optionally with ``_perturb``ed params."""

    def init(rng, x):
        variables = nn.unbox(model.init({"params": rng}, x))
        return {**variables, "params": _perturb(variables["params"])} if perturb else variables

    return _jit(init)(jax.random.key(0), _image(batch, size))


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_param_count_equals_timm(name):
    assert jf.count_params(name) == TIMM_PARAMS[name]
    assert abs(jf.model_info(name).params_m * 1e6 / TIMM_PARAMS[name] - 1) < 0.005  # paper: 23.8M / 65.6M


def test_timm_counts_are_current():
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    for name, count in TIMM_PARAMS.items():
        with torch.device("meta"):
            model = timm.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == count, name


def _timm_checkpoint(name, img_size, tmp_path, torch, timm):
    torch.manual_seed(0)
    ref_model = timm.create_model(name, img_size=img_size, **TINY).eval()
    with torch.no_grad():
        for p in ref_model.parameters():  # LayerNorm weights/biases and head away from their init
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / f"{name}_{img_size}.pth"
    torch.save(ref_model.state_dict(), path)
    return ref_model, path


@pytest.mark.parametrize("name,img_size", [
    ("tnt_s_patch16_224", 64), ("tnt_s_patch16_224", 56), ("tnt_s_legacy_patch16_224", 48),
])
def test_logits_match_timm(name, img_size, tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    ref_model, path = _timm_checkpoint(name, img_size, tmp_path, torch, timm)
    variables = jf.load_pretrained(name, path, img_size=img_size, **TINY)
    model = jf.create_model(name, img_size=img_size, **TINY)
    x = np.random.RandomState(1).randn(2, img_size, img_size, 3).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    out = np.asarray(_jit(model.apply)(variables, x))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_official_key_names_resampling_and_key_errors(tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    _, path = _timm_checkpoint("tnt_s_patch16_224", 64, tmp_path, torch, timm)
    sd = torch.load(path, weights_only=True)
    reference = jf.load_pretrained("tnt_s_patch16_224", path, img_size=64, **TINY)

    # the official release's names (timm's renames undone per key segment), pixel_pos as (1, words, C)
    to_official = {new: old for old, new in _OFFICIAL_RENAMES}
    official = {".".join(to_official.get(part, part) for part in k.split(".")): v for k, v in sd.items()}
    official["inner_pos"] = sd["pixel_pos"].flatten(2).transpose(1, 2)
    official["outer_tokens"] = torch.zeros(1)
    for key in ("blocks.0.outer_attn.qk.weight", "blocks.0.inner_norm2.weight", "blocks.0.outer_mlp.fc1.weight",
                "blocks.0.proj_norm2.weight", "patch_embed.proj.weight", "outer_pos", "proj_norm1.weight"):
        assert key in official, key
    opath = tmp_path / "official.pth"
    torch.save(official, opath)
    converted = jf.load_pretrained("tnt_s_patch16_224", opath, img_size=64, **TINY)
    for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(converted)):
        np.testing.assert_array_equal(a, b)

    # a 64 px checkpoint (4x4 patches) loads into a 96 px model (6x6): patch positions resampled
    bigger = jf.load_pretrained("tnt_s_patch16_224", path, img_size=96, **TINY)
    assert bigger["params"]["patch_pos"].shape == (1, 37, 32)
    from timm.models.tnt import checkpoint_filter_fn  # timm's own loader resamples the same way
    ref = checkpoint_filter_fn(dict(sd), timm.create_model("tnt_s_patch16_224", img_size=96, **TINY))["patch_pos"]
    np.testing.assert_allclose(bigger["params"]["patch_pos"], ref.numpy(), atol=1e-5)
    assert np.isfinite(np.asarray(_jit(jf.create_model("tnt_s_patch16_224", img_size=96, **TINY).apply)(
        bigger, _image(1, 96)))).all()

    # wrong model size, extra and missing keys are named
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        jf.load_pretrained("tnt_s_patch16_224", path, img_size=64, **{**TINY, "embed_dim": 48})
    torch.save({**sd, "blocks.0.extra.weight": torch.zeros(2)}, opath)
    with pytest.raises(CheckpointMismatchError, match="blocks.0.extra.weight"):
        jf.load_pretrained("tnt_s_patch16_224", opath, img_size=64, **TINY)
    torch.save({k: v for k, v in sd.items() if k != "blocks.1.attn_in.v.weight"}, opath)
    with pytest.raises(CheckpointMismatchError, match="blocks.1.attn_in.v.weight"):
        jf.load_pretrained("tnt_s_patch16_224", opath, img_size=64, **TINY)


def test_features_and_attention_switch():
    model = jf.create_model("tnt_s_patch16_224", img_size=48, **TINY)
    x = _image(2, 48)
    params = _init(model, 48, perturb=True)["params"]
    feats = _jit(lambda p, x: model.apply({"params": p}, x, method="forward_features"))(params, x)
    assert [f.shape for f in feats["stages"]] == [(2, 3, 3, 32)] * 2
    assert feats["feature_map"].shape == (2, 3, 3, 32) and feats["pre_logits"].shape == (2, 32)
    assert feats["pixel_tokens"].shape == (2 * 9, 16, 8) and feats["logits"].shape == (2, 10)
    assert np.abs(np.asarray(feats["logits"])).max() > 0.01
    # attention_impl reaches the inner and outer attentions
    bogus = jf.create_model("tnt_s_patch16_224", img_size=48, attention_impl="bogus", **TINY)
    with pytest.raises(ValueError, match="implementation must be one of"):
        jax.eval_shape(bogus.init, jax.random.key(0), x)


def test_train_steps_lower_the_loss_and_remat_keeps_gradients():
    model = jf.create_model("tnt_s_patch16_224", img_size=32, drop_path_rate=0.1, **TINY)
    remat = jf.create_model("tnt_s_patch16_224", img_size=32, drop_path_rate=0.1, remat=True, **TINY)
    x = _image(8, 32, seed=4)
    y = jnp.arange(8) % 10
    params = _init(model, 32)["params"]
    tx = optax.adamw(1e-2, weight_decay=0.05)
    opt_state = tx.init(params)

    def loss_fn(p, m, rng):
        logits = m.apply({"params": p}, x, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @_jit
    def step(params, opt_state, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, model, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    losses = []
    for i in range(8):
        new_params, opt_state, loss, grads = step(params, opt_state, jax.random.key(i))
        if i == 1:  # rematerialised blocks give the same gradients (same dropout draws)
            remat_grads = _jit(jax.grad(loss_fn), static_argnums=1)(params, remat, jax.random.key(i))
            assert np.abs(np.asarray(grads["pixel_pos"])).max() > 0
            assert np.abs(np.asarray(grads["blocks_0"]["inner"]["attn"]["qkv"]["kernel"])).max() > 0
            for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(remat_grads)):
                assert np.isfinite(a).all()
                np.testing.assert_allclose(a, b, atol=1e-5)
        params = new_params
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] * 0.7, losses


def test_sharded_equals_single_device():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = jf.create_model("tnt_s_patch16_224", img_size=32, **TINY)
    x = _image(4, 32)
    single = _init(model, 32, perturb=True)
    # the shardings init_sharded would give (from the parameters' logical axes), without its compile
    shardings = logical_shardings(jax.eval_shape(model.init, jax.random.key(0), x), mesh)
    sharded = jax.device_put(single, shardings)
    qkv = sharded["params"]["blocks_0"]["outer"]["attn"]["qkv"]["kernel"]
    assert tuple(qkv.sharding.spec) == ("fsdp", None, "tensor", None)  # embed=32 over fsdp, heads=2 over tensor
    assert sharded["params"]["blocks_0"]["inner"]["mlp"]["fc1"]["kernel"].sharding.spec[:2] == ("fsdp", "tensor")
    expected = _jit(model.apply)(single, x)
    with activate(mesh):
        got = _jit(model.apply)(sharded, shard_batch(x, mesh))
    assert np.abs(np.asarray(expected)).max() > 0.01
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = jf.create_model("tnt_s_patch16_224", img_size=32, **TINY)
    variables = jax.eval_shape(model.init, jax.random.key(0), _image(1, 32))
    with pytest.raises(ValueError, match="img_size=32x32"):
        model.apply(variables, _image(1, 48))
    with pytest.raises(ValueError, match="in_chans=3"):
        model.apply(variables, jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="in_chans=3"):  # NCHW instead of NHWC
        model.apply(variables, jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(TypeError, match="floating-point"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3), jnp.int32))
    with pytest.raises(ValueError, match="smaller than patch_size"):
        jf.count_params("tnt_s_patch16_224", img_size=8)
    with pytest.raises(ValueError, match="global_pool"):
        jf.count_params("tnt_s_patch16_224", global_pool="max")
    with pytest.raises(ValueError, match="num_heads"):
        jf.count_params("tnt_s_patch16_224", num_heads_outer=5)
