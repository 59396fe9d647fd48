"""Mask2Former: parameter counts, live parity with transformers' Mask2FormerForUniversalSegmentation
through Hugging Face directories both ways, training on the generated panoptic set (loss falls, PQ
rises) through the trainer's step functions, sharding, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.sharding import make_mesh
from tests.helpers import (assert_every_param_has_gradient, fast_jit, image, numpy_variables, panoptic_batch,
                           panoptic_scores, shard_like_init, single_and_sharded)
from train.seg_data import NUM_CLASSES, THING_IDS
from train.tasks_seg import PanopticSegmentationTask

NAME = "mask2former_swin_tiny_coco_panoptic"
# 64 px images (at 32 px the stride-32 map is one pixel: GroupNorm and attention over it pass no
# gradient): Swin maps 16, 8, 4, 2 in 2x2 windows, shifted at every stage.
TINY = dict(num_classes=NUM_CLASSES, img_size=64, feature_size=32, mask_feature_size=32, hidden_dim=32,
            encoder_layers=1, encoder_ffn_dim=64, decoder_layers=3, num_heads=2, dim_feedforward=64, num_queries=8,
            backbone_overrides=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2,
                                    drop_path_rate=0.0))


def test_param_count():
    # transformers' count (Mask2FormerForUniversalSegmentation, Swin-T, 133 labels) less the final LayerNorm
    # its SwinBackbone builds but never uses (2 x 768), which the official D2 Swin lacks. (Swin-S and
    # Swin-B-384 were checked the same way: 68,754,704 and 106,919,870 in transformers 5.25.)
    assert jf.count_params(NAME) == 47_436_800 - 2 * 768


def test_hugging_face_directories_both_ways_single_and_sharded(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.helpers import perturbed_torch_model

    # 32 px: Swin maps 8, 4, 2, 1 in 2x2 windows, shifted at every stage (the last one padded first).
    swin = transformers.SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2,
                                   out_features=["stage1", "stage2", "stage3", "stage4"], drop_path_rate=0.0)
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=1, decoder_layers=4, num_attention_heads=2, num_queries=5, num_labels=6)
    ref = perturbed_torch_model(lambda: transformers.Mask2FormerForUniversalSegmentation(config), scale=0.1)
    ref.save_pretrained(tmp_path / "hf")
    module, variables = jf.from_pretrained(tmp_path / "hf")
    x = np.random.RandomState(1).randn(4, 32, 32, 3).astype(np.float32)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded_vars = shard_like_init(module, variables, x, mesh)
    single, sharded = single_and_sharded(fast_jit(module.apply), variables, sharded_vars, x, mesh)
    with torch.no_grad():
        expected = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    for key, shape in (("class_queries_logits", (4, 5, 7)), ("masks_queries_logits", (4, 5, 8, 8))):
        theirs = getattr(expected, key).numpy()
        assert np.asarray(single[key]).shape == theirs.shape == shape and np.abs(theirs).max() > 0.5
        np.testing.assert_allclose(single[key], theirs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(sharded[key], theirs, atol=1e-4, rtol=0)
    # Our export loads into transformers with exactly the original tensors.
    jf.save_pretrained(module, variables, tmp_path / "ours")
    back = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path / "ours").eval()
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    assert sorted(ref_sd) == sorted(back_sd)
    for k, v in ref_sd.items():
        if "swin.layernorm" not in k:  # built by SwinBackbone, never used; we write ones / zeros
            np.testing.assert_array_equal(back_sd[k].numpy(), v.numpy(), err_msg=k)


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model(NAME, **TINY)
    return model, numpy_variables(model, image(1, 64))


def test_trains_on_generated_panoptic_scenes_loss_falls_and_pq_rises(tiny):
    """40 AdamW steps on 8 generated scenes through the panoptic task's loss (Hungarian matching,
    point-sampled losses, deep supervision); evaluation through the trainer's eval step."""
    model, variables = tiny
    batch = panoptic_batch(8)
    task = PanopticSegmentationTask(NUM_CLASSES, THING_IDS, criterion_args=dict(num_points=64))
    tx = optax.adamw(2e-3, weight_decay=0.0)

    @fast_jit
    def train_step(params, opt, rng):
        loss_fn = lambda p: task.loss(model.apply({"params": p}, batch["image"], train=True), batch, rng)  # noqa
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, grads

    scores = panoptic_scores(model, task, batch)
    params = variables["params"]
    opt = tx.init(params)
    before = scores({"params": params})
    losses = []
    for i in range(40):
        params, opt, loss, grads = train_step(params, opt, jax.random.key(i))
        losses.append(float(loss))
        if i == 0:
            assert_every_param_has_gradient(grads)
    after = scores({"params": params})
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert after["PQ"] > before["PQ"] + 10 and after["mIoU"] > before["mIoU"] + 10, (before, after)


def test_bad_inputs_raise_clear_errors(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match="48x48, but height and width must be divisible by 32x32"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 48, 48, 3)))
    cnn = jf.create_model(NAME, **{**TINY, "backbone": "vit_tiny_patch16_224",
                                    "backbone_overrides": {"img_size": 224}})
    with pytest.raises(ValueError, match=r"backbone 'vit_tiny_patch16_224''s forward_features must return "
                                         r"\{stride: NHWC map\} with strides \(4, 8, 16, 32\)"):
        jax.eval_shape(cnn.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    with pytest.raises(ValueError, match="encoder_layers=3: the pixel decoder has 1 layers"):
        jax.eval_shape(lambda v, x: model.apply(v, x, encoder_layers=3), variables, jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="Hugging Face Mask2Former directories hold Swin backbones"):
        jf.save_pretrained(cnn, {}, "/tmp/unused")


def test_one_decoder_prediction_trains_without_auxiliary_outputs():
    """decoder_layers=1 (masks from the learned queries alone): no earlier predictions to supervise, so no
    ``auxiliary_logits`` (it used to fail stacking an empty list), and the loss needs none."""
    model = jf.create_model(NAME, **{**TINY, "decoder_layers": 1})
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=False), variables)
    assert "auxiliary_logits" not in out and out["masks_queries_logits"].shape == (1, 8, 16, 16)
