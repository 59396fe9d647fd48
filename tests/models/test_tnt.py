"""TNT: timm parameter counts, live timm parity (current and legacy layouts, default and other image
sizes, timm and official key names), features, gradients, sharding, training, and input errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.convert.pretrained import CheckpointMismatchError
from jaxformers.models.tnt import _OFFICIAL_RENAMES
from jaxformers.sharding import make_mesh
from tests.helpers import (assert_logits_match_torch, assert_sharded_grads_match, fast_jit, image, init_variables,
                           perturbed_torch_model, shard_like_init, single_and_sharded, train_with_remat_check)

# timm 1.0's exact counts (``sum(p.numel() for p in timm.create_model(name).parameters())``).
TIMM_PARAMS = {
    "tnt_s_patch16_224": 23_768_584,
    "tnt_b_patch16_224": 65_428_680,
    "tnt_s_legacy_patch16_224": 23_755_336,
}

TINY = dict(embed_dim=32, inner_dim=8, depth=2, num_heads_outer=2, num_heads_inner=2, num_classes=10)


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
    """A perturbed timm model at ``img_size`` and the path of its saved state dict."""
    ref_model = perturbed_torch_model(lambda: timm.create_model(name, img_size=img_size, **TINY))
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
    assert_logits_match_torch(name, ref_model, path, img_size, **TINY)


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
    assert np.isfinite(np.asarray(fast_jit(jf.create_model("tnt_s_patch16_224", img_size=96, **TINY).apply)(
        bigger, image(1, 96)))).all()

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
    x = image(2, 48)
    params = init_variables(model, 48, perturbed=True)["params"]
    out = fast_jit(lambda p, x: model.apply({"params": p}, x, output="all"))(params, x)
    # words (4x4 per 16-px patch, each covering 4x4 pixels) at stride 4, patch tokens at stride 16
    assert {k: v.shape for k, v in out.features.items()} == {4: (2, 12, 12, 8), 16: (2, 3, 3, 32)}
    assert out.pre_logits.shape == (2, 32) and out.logits.shape == (2, 10)
    np.testing.assert_allclose(out.pre_logits @ params["head"]["kernel"] + params["head"]["bias"], out.logits,
                               rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out.logits)).max() > 0.01
    # attention_impl reaches the inner and outer attentions
    bogus = jf.create_model("tnt_s_patch16_224", img_size=48, attention_impl="bogus", **TINY)
    with pytest.raises(ValueError, match="implementation must be one of"):
        jax.eval_shape(bogus.init, jax.random.key(0), x)


def test_train_steps_lower_the_loss_and_remat_keeps_gradients():
    model = jf.create_model("tnt_s_patch16_224", img_size=32, drop_path_rate=0.1, **TINY)
    remat = jf.create_model("tnt_s_patch16_224", img_size=32, drop_path_rate=0.1, remat=True, **TINY)
    x = image(8, 32, seed=4)
    y = jnp.arange(8) % 10
    losses, grads = train_with_remat_check(model, remat, init_variables(model, 32)["params"], x, y)
    assert np.abs(np.asarray(grads["pixel_pos"])).max() > 0
    assert np.abs(np.asarray(grads["blocks_0"]["inner"]["attn"]["qkv"]["kernel"])).max() > 0
    assert np.isfinite(losses).all() and losses[-1] < losses[0] * 0.7, losses


def test_sharded_equals_single_device():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = jf.create_model("tnt_s_patch16_224", img_size=32, **TINY)
    x = image(4, 32)
    single = init_variables(model, 32, perturbed=True)
    sharded = shard_like_init(model, single, x, mesh)
    qkv = sharded["params"]["blocks_0"]["outer"]["attn"]["qkv"]["kernel"]
    assert tuple(qkv.sharding.spec) == ("fsdp", None, "tensor", None)  # embed=32 over fsdp, heads=2 over tensor
    assert sharded["params"]["blocks_0"]["inner"]["mlp"]["fc1"]["kernel"].sharding.spec[:2] == ("fsdp", "tensor")
    expected, got = single_and_sharded(fast_jit(model.apply), single, sharded, x, mesh)
    assert np.abs(np.asarray(expected)).max() > 0.01
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    assert_sharded_grads_match(model, single, sharded, x, mesh)


def test_bad_inputs_raise_clear_errors():
    model = jf.create_model("tnt_s_patch16_224", img_size=32, **TINY)
    variables = jax.eval_shape(model.init, jax.random.key(0), image(1, 32))
    with pytest.raises(ValueError, match="img_size=32x32"):
        model.apply(variables, image(1, 48))
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
