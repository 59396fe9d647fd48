"""CrossViT: timm parameter counts, live timm parity (linear and dagger stems, default and other image
sizes), features, gradients, sharding, training, and input errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.convert.pretrained import CheckpointMismatchError
from jaxformers.models.crossvit import VARIANTS, bicubic_weights, resize_bicubic
from jaxformers.sharding import make_mesh
from tests.helpers import (assert_logits_match_torch, assert_sharded_grads_match, fast_jit, image, init_variables,
                           perturbed_torch_model, shard_like_init, single_and_sharded, train_with_remat_check)

# timm 1.0's exact counts (``sum(p.numel() for p in timm.create_model(name).parameters())``).
TIMM_PARAMS = {
    "crossvit_tiny_240": 7_014_800,
    "crossvit_small_240": 26_856_272,
    "crossvit_base_240": 105_025_232,
    "crossvit_9_240": 8_553_296,
    "crossvit_15_240": 27_528_464,
    "crossvit_18_240": 43_271_408,
    "crossvit_9_dagger_240": 8_776_592,
    "crossvit_15_dagger_240": 28_209_008,
    "crossvit_15_dagger_408": 28_500_080,
    "crossvit_18_dagger_240": 44_266_976,
    "crossvit_18_dagger_408": 44_606_560,
}

# Tiny widths, two encoders (the second with one large-branch block), 10 classes.
TINY = dict(embed_dim=(16, 32), num_heads=(2, 2), depth=((1, 2, 0), (1, 1, 0)), num_classes=10)
TIMM_TINY = dict(embed_dim=[16, 32], num_heads=[2, 2], depth=[[1, 2, 0], [1, 1, 0]], num_classes=10)
# Smaller still for the tests that compile gradients or meshes: one encoder, a 48 px image (the
# large branch sees 44 px, i.e. 2x2 patches of 16 after dropping the remainder, as timm does).
FAST = dict(embed_dim=(16, 32), num_heads=(2, 2), depth=((1, 1, 0),), num_classes=10, img_size=48)


# ---------------------------------------------------------------------------------------------
# Parameter counts


def test_every_timm_variant_is_registered():
    assert sorted(jf.list_models("crossvit_*")) == sorted(TIMM_PARAMS) == sorted(VARIANTS)
    info = jf.model_info("crossvit_18_dagger_408")
    assert info.input_size == (408, 408, 3) and info.top1 == 83.9 and info.converter is not None
    # a single img_scale number applies to both branches (timm's to_2tuple): the large branch then
    # sees 240 px, 15x15 patches, 29 more position rows of width 256
    assert jf.count_params("crossvit_9_240", img_scale=1.0) == TIMM_PARAMS["crossvit_9_240"] + 29 * 256


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_param_count_equals_timm(name):
    assert jf.count_params(name) == TIMM_PARAMS[name]
    # the paper's rounded count (Tables 2/4) is within 2% of timm's
    assert abs(jf.model_info(name).params_m * 1e6 / TIMM_PARAMS[name] - 1) < 0.02


def test_timm_counts_are_current():
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    for name, count in TIMM_PARAMS.items():
        with torch.device("meta"):
            model = timm.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == count, name


# ---------------------------------------------------------------------------------------------
# Live parity with timm


def test_bicubic_resize_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.RandomState(0).randn(2, 240, 200, 3).astype(np.float32)
    for size in [(224, 187), (250, 211)]:  # downscale and upscale, non-square
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="bicubic",
                                              align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(resize_bicubic(jnp.asarray(x), size)), ref, atol=2e-5)
    np.testing.assert_allclose(bicubic_weights(10, 7).sum(1), 1.0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,img_size", [
    ("crossvit_9_240", 240), ("crossvit_9_240", 120),
    ("crossvit_9_dagger_240", 240), ("crossvit_15_dagger_408", 204),
])
def test_logits_match_timm(name, img_size, tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    ref_model = perturbed_torch_model(lambda: timm.create_model(name, img_size=img_size, **TIMM_TINY))
    path = tmp_path / f"{name}.pth"
    torch.save(ref_model.state_dict(), path)
    assert_logits_match_torch(name, ref_model, path, img_size, **TINY)


def test_checkpoint_resampled_to_other_size_and_errors_name_keys(tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    ref_model = timm.create_model("crossvit_9_240", **TIMM_TINY)
    sd = ref_model.state_dict()
    path = tmp_path / "cv.pth"
    torch.save(sd, path)
    # the 240 checkpoint (20x20 and 14x14 position grids) loads into a 120 model (10x10 and 7x7)
    variables = jf.load_pretrained("crossvit_9_240", path, img_size=120, **TINY)
    assert variables["params"]["pos_embed_0"].shape == (1, 1 + 100, 16)
    assert variables["params"]["pos_embed_1"].shape == (1, 1 + 49, 32)
    from timm.layers import resample_abs_pos_embed
    for i, grid in enumerate([(10, 10), (7, 7)]):  # resampled exactly as timm resamples
        ref = resample_abs_pos_embed(sd[f"pos_embed_{i}"], new_size=grid, num_prefix_tokens=1).numpy()
        np.testing.assert_allclose(variables["params"][f"pos_embed_{i}"], ref, atol=1e-5)
    model = jf.create_model("crossvit_9_240", img_size=120, **TINY)
    assert np.isfinite(np.asarray(fast_jit(model.apply)(variables, image(1, 120)))).all()
    # IBM's original key names (pos_embed.0) are accepted
    ibm = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v for k, v in sd.items()}
    torch.save(ibm, path)
    jf.load_pretrained("crossvit_9_240", path, **TINY)
    # an extra key and a missing key are reported by name
    torch.save({**sd, "blocks.9.extra": torch.zeros(3)}, path)
    with pytest.raises(CheckpointMismatchError, match="blocks.9.extra"):
        jf.load_pretrained("crossvit_9_240", path, **TINY)
    torch.save({k: v for k, v in sd.items() if k != "blocks.1.fusion.0.attn.wk.weight"}, path)
    with pytest.raises(CheckpointMismatchError, match="blocks.1.fusion.0.attn.wk.weight"):
        jf.load_pretrained("crossvit_9_240", path, **TINY)


# ---------------------------------------------------------------------------------------------
# Features, gradients, remat, attention implementations


def test_features_and_attention_switch():
    model = jf.create_model("crossvit_9_dagger_240", **{**FAST, "img_size": 120})
    x = image(2, 120)
    params = init_variables(model, 120, perturbed=True)["params"]
    out = fast_jit(lambda p, x: model.apply({"params": p}, x, output="all"))(params, x)
    # one map per branch, keyed by its effective stride: 12 (patch 12) and round(16 * 240 / 224) = 17
    assert {k: v.shape for k, v in out.features.items()} == {12: (2, 10, 10, 16), 17: (2, 7, 7, 32)}
    assert out.pre_logits.shape == (2, 48) and out.logits.shape == (2, 10)
    assert np.abs(np.asarray(out.logits)).max() > 0.01
    headless = jf.create_model("crossvit_9_240", **{**FAST, "num_classes": 0})
    logits, _ = jax.eval_shape(lambda: headless.init_with_output(jax.random.key(0), image(2, 48)))
    assert logits.shape == (2, 48)  # pre-logits of both branches, as timm with num_classes=0
    # attention_impl reaches every attention (branch blocks and the CLS cross-attention)
    bogus = jf.create_model("crossvit_9_240", attention_impl="bogus", **FAST)
    with pytest.raises(ValueError, match="implementation must be one of"):
        jax.eval_shape(bogus.init, jax.random.key(0), image(1, 48))


# ---------------------------------------------------------------------------------------------
# Training, remat, sharding


def test_train_steps_lower_the_loss_and_remat_keeps_gradients():
    model = jf.create_model("crossvit_9_240", drop_path_rate=0.1, **FAST)
    remat = jf.create_model("crossvit_9_240", drop_path_rate=0.1, remat=True, **FAST)
    x = image(8, 48, seed=4)
    y = jnp.arange(8) % 10
    losses, grads = train_with_remat_check(model, remat, init_variables(model, 48)["params"], x, y)
    assert np.abs(np.asarray(grads["blocks_0"]["fusion_1"]["attn"]["q"]["kernel"])).max() > 0
    assert np.isfinite(losses).all() and losses[-1] < losses[0] * 0.7, losses


def test_sharded_equals_single_device():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = jf.create_model("crossvit_9_240", **FAST)
    x = image(4, 48)
    single = init_variables(model, 48, perturbed=True)
    sharded = shard_like_init(model, single, x, mesh)
    qkv = sharded["params"]["blocks_0"]["blocks_1_0"]["attn"]["qkv"]["kernel"]
    assert tuple(qkv.sharding.spec) == ("fsdp", None, "tensor", None)  # embed=32 over fsdp, heads=2 over tensor
    expected, got = single_and_sharded(fast_jit(model.apply), single, sharded, x, mesh)
    assert np.abs(np.asarray(expected)).max() > 0.01
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    assert_sharded_grads_match(model, single, sharded, x, mesh)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_clear_errors():
    model = jf.create_model("crossvit_9_240", **FAST)
    variables = jax.eval_shape(model.init, jax.random.key(0), image(1, 48))
    with pytest.raises(ValueError, match="img_size=48x48"):
        model.apply(variables, image(1, 64))
    with pytest.raises(ValueError, match="in_chans=3"):
        model.apply(variables, jnp.zeros((1, 48, 48, 1)))
    with pytest.raises(ValueError, match="in_chans=3"):  # NCHW instead of NHWC
        model.apply(variables, jnp.zeros((1, 3, 48, 48)))
    with pytest.raises(TypeError, match="floating-point"):
        model.apply(variables, jnp.zeros((1, 48, 48, 3), jnp.uint8))
    with pytest.raises(ValueError, match="rank 4"):
        model.apply(variables, jnp.zeros((48, 48, 3)))
    with pytest.raises(ValueError, match="dagger stem"):
        jf.count_params("crossvit_9_dagger_240", img_size=250)
    with pytest.raises(ValueError, match="one entry per branch"):
        jf.count_params("crossvit_9_240", num_heads=(4,))
    with pytest.raises(ValueError, match="fusion depth"):
        jf.count_params("crossvit_9_240", depth=((0, 3, 0),))
    with pytest.raises(TypeError, match="unknown override"):
        jf.create_model("crossvit_9_240", patch=16)
