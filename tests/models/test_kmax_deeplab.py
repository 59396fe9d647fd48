"""kMaX-DeepLab: the k-means cross-attention against NumPy, the matcher and the PQ-style losses on
hand-made cases, parameter counts of the official PyTorch re-implementation, its state-dict layout
converted key for key, output layout and sharding on a tiny config, bad input."""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.traverse_util import flatten_dict

import jaxformers as jf
from jaxformers.convert.common import StateDict
from jaxformers.models.kmax_deeplab import kmeans_update
from jaxformers.models.kmax_deeplab_convert import convert_official_kmax
from jaxformers.segmentation.kmax_loss import KMaXLossConfig, kmax_loss, kmax_match
from tests.helpers import (assert_sharded_forward_matches, image, numpy_variables, panoptic_batch, panoptic_scores,
                           train_classifier)
from train.seg_data import NUM_CLASSES, THING_IDS
from train.tasks_seg import PanopticSegmentationTask

NAME = "kmax_deeplab_convnext_tiny_coco"
BACKBONE = dict(depths=(1, 1, 1, 1), dims=(16, 32, 32, 64), drop_path_rate=0.0)
# The config whose official state-dict keys and shapes kmax_official_keys.json lists (written from
# bytedance/kmax-deeplab's kMaXPixelDecoder + kMaXTransformerDecoder and its ConvNeXt).
KEYS_CONFIG = dict(num_classes=6, img_size=64, dec_layers=(1, 2, 1, 1), dec_channels=(32, 16, 16, 8),
                   trans_dec_layers=(1, 1, 1), num_queries=8, trans_drop_path=0.0, backbone_overrides=BACKBONE)
# A small model for the compiled tests: one kMaX layer, on the stride-8 map (the three-level decoder is
# checked key for key and counted), a 16-channel auxiliary semantic head, BatchNorm statistics that follow
# a short training run (momentum 0.5).
TINY = dict(KEYS_CONFIG, dec_layers=(1, 1, 1, 1), trans_dec_layers=(0, 0, 1), query_dim=32, base_filters=16,
            ffn_dim=64, num_heads=2, aux_semantic_channels=16, bn_momentum=0.5)
# Parameter counts of the official PyTorch model (heads + D2ConvNeXt, 133 classes, aux semantic head).
OFFICIAL_PARAMS = {"kmax_deeplab_convnext_tiny_coco": 67_265_502, "kmax_deeplab_convnext_small_coco": 88_900_062,
                   "kmax_deeplab_convnext_base_coco": 129_747_390, "kmax_deeplab_convnext_large_coco": 243_882_366}


def test_kmeans_update_matches_numpy_and_assignment_is_detached():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 5, 12).astype(np.float32)  # (B, N clusters, HW pixels)
    values = rng.randn(2, 12, 3).astype(np.float32)  # (B, HW, C)
    assign = np.zeros_like(logits)
    for b in range(2):
        assign[b, logits[b].argmax(0), np.arange(12)] = 1.0  # every pixel in exactly one cluster
    expected = np.einsum("bnm,bmc->bnc", assign, values)  # sums, not means, of the members' values
    np.testing.assert_allclose(kmeans_update(logits, values), expected, rtol=1e-6, atol=1e-6)
    g_logits, g_values = jax.grad(lambda l, v: jnp.sum(kmeans_update(l, v) ** 2), argnums=(0, 1))(logits, values)
    assert not np.any(np.asarray(g_logits))  # the argmax assignment passes no gradient
    np.testing.assert_allclose(g_values, np.einsum("bnm,bnc->bmc", assign, 2 * expected), rtol=1e-5, atol=1e-6)


def test_param_counts_equal_official():
    for name in ("kmax_deeplab_convnext_tiny_coco", "kmax_deeplab_convnext_large_coco"):  # S, B: same code path
        assert jf.count_params(name) == OFFICIAL_PARAMS[name], name


def test_official_state_dict_converts_key_for_key():
    """Every key of the official layout is consumed and every variable of ours filled, with its shape."""
    keys = json.loads((pathlib.Path(__file__).parent / "kmax_official_keys.json").read_text())
    rng = np.random.default_rng(0)
    sd = StateDict({k: rng.standard_normal(shape).astype(np.float32) for k, shape in keys.items()})
    model = jf.create_model(NAME, **KEYS_CONFIG)
    abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))))
    expected = {"/".join(k): v.shape for k, v in flatten_dict(abstract).items()}
    out = convert_official_kmax(sd, model, expected)
    assert sd.unused() == []
    assert sorted(out) == sorted(expected)
    for k, v in out.items():
        assert tuple(np.shape(v)) == tuple(expected[k]), k
    name = "sem_seg_head.predictor._kmax_transformer_layers.0._query_qkv_conv_bn.conv.weight"
    kernel = out["params/kmax_layers_0/query_qkv/conv/kernel"]  # a Conv1d (out, in, 1) as a 1x1 conv
    np.testing.assert_array_equal(kernel[0, 0], sd[name][:, :, 0].T)


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model(NAME, **TINY)
    return model, numpy_variables(model, image(1, 64))


def test_output_layout(tiny):
    model, variables = tiny
    x = image(2, 64)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert {k: v.shape for k, v in out.items()} == {"pred_logits": (2, 8, 7), "pred_masks": (2, 8, 16, 16),
                                                    "pixel_feature": (2, 16, 16, 128)}
    train_out, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                           rngs={"dropout": jax.random.key(0)}), variables, x)
    aux = {k: v.shape for k, v in train_out.pop("aux_outputs").items()}
    assert aux == {"pred_logits": (1, 2, 8, 7), "pred_masks": (1, 2, 8, 16, 16), "pixel_feature": (1, 2, 16, 16, 128)}
    assert train_out["aux_semantic_pred"].shape == (2, 16, 16, 7)


def test_sharded_equals_single_device(tiny):
    model, variables = tiny
    assert_sharded_forward_matches(model, variables, image(4, 64), tol=1e-4)


def test_bad_inputs_raise_clear_errors(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match="48x48, but height and width must be divisible by 32x32"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 48, 48, 3)))
    with pytest.raises(ValueError, match="axial attention spans at most 255 positions"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, 32 * 257, 32, 3)))


def test_matcher_hand_made_case():
    # 3 queries over 4 pixels; target 0 = pixels {0, 1} (class 1), target 1 = pixel {3} (class 0); pixel 2 void.
    masks = np.array([[[1, 1, 0, 0], [0, 0, 0, 1]]], np.float32)
    classes, valid = np.array([[1, 0]]), np.array([[True, True]])
    mask_logits = np.full((1, 3, 4), -9.0, np.float32)
    mask_logits[0, 2, :2] = mask_logits[0, 0, 3] = mask_logits[0, 1, 2] = 9.0  # q2 -> t0, q0 -> t1, q1 on void
    class_logits = np.log(np.array([[[0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1]]], np.float32))
    assign, dice, prob = kmax_match(class_logits, mask_logits, masks, classes, valid)
    np.testing.assert_array_equal(assign, [[2, 0]])
    np.testing.assert_allclose(dice, [[1.0, 1.0]], atol=1e-3)  # softmax over queries: sharp, exact masks
    # Class probability without "no object" (softmax over all classes, the void column dropped).
    np.testing.assert_allclose(prob, [[0.7, 0.1]], rtol=1e-5)
    # The class term decides between two equally good masks: the query predicting the right class wins.
    two = np.full((1, 3, 4), -9.0, np.float32)
    two[0, :2, :2] = 9.0  # q0 and q1 share target 0's mask; q2 covers target 1
    two[0, 2, 3] = 9.0
    cls = np.log(np.array([[[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]]], np.float32))
    np.testing.assert_array_equal(kmax_match(cls, two, masks, classes, valid)[0], [[1, 2]])


def test_kmax_loss_worked_example():
    """Right predictions cost little, the same ones in another query order cost the same, swapped
    classes cost more; unmatched queries' class terms are down-weighted by their overlap with void."""
    pan = np.zeros((1, 32, 32), np.int32)
    pan[0, :16, :16], pan[0, :, 16:] = 1, 2  # 8x8 targets at stride 4; the bottom-left quarter void
    seg_classes, crowd = np.array([[2, 0, -1]], np.int32), np.zeros((1, 3), np.int32)
    small = pan[:, ::4, ::4]
    masks = np.stack([np.where(small == 2, 20.0, -20.0), np.where(small == 0, 20.0, -20.0),
                      np.where(small == 1, 20.0, -20.0)], 1).astype(np.float32)  # q0: seg 2, q1: void, q2: seg 1
    logits = np.full((1, 3, 4), -5.0, np.float32)
    logits[0, 0, 0] = logits[0, 2, 2] = logits[0, 1, 3] = 5.0
    feat = np.stack([small == 1, small == 2, small == 0], -1).astype(np.float32)  # one-hot per segment
    out = {"pred_logits": logits, "pred_masks": masks, "pixel_feature": feat}
    cfg = KMaXLossConfig(num_classes=3, pixel_insdis_sample_k=64, aux_semantic_sample_k=64)
    loss_fn = jax.jit(lambda o: kmax_loss(o, pan, seg_classes, crowd, jax.random.key(0), cfg))
    total, parts = loss_fn(out)
    assert parts["loss_ce"] < 1e-3 and parts["loss_mask"] < 1e-3 and parts["loss_dice"] < 1e-3
    # Instance discrimination at temperature 0.3 on orthogonal unit features: per labelled pixel
    # -log(e^(1/0.3) / (n_same e^(1/0.3) + n_other)) averaged, with n_same the pixels of its segment.
    # (64 pixels sampled, all of them; void pixels' terms are zero and left out of the mean.)
    n = np.array([16] * 16 + [32] * 32)
    expected = np.mean(np.log(n + (64 - n) * np.exp(-1 / 0.3)))
    np.testing.assert_allclose(parts["loss_pixel_insdis"], expected, rtol=1e-4)
    perm = [2, 0, 1]
    total_perm, _ = loss_fn({**out, "pred_logits": logits[:, perm], "pred_masks": masks[:, perm]})
    np.testing.assert_allclose(total_perm, total, rtol=1e-5)
    wrong, parts_wrong = loss_fn({**out, "pred_logits": logits[:, [2, 1, 0]]})
    assert parts_wrong["loss_ce"] > 1.0 and wrong > total + 3.0
    # Deep supervision and the auxiliary semantic head add their terms.
    aux = {k: np.stack([v, v]) for k, v in out.items()}
    deep, parts_deep = loss_fn({**out, "aux_outputs": aux, "aux_semantic_pred": np.zeros((1, 8, 8, 4), np.float32)})
    np.testing.assert_allclose(parts_deep["loss_aux"], 2 * total, rtol=1e-5)
    np.testing.assert_allclose(parts_deep["loss_aux_semantic"], np.log(4.0), rtol=1e-5)  # uniform logits
    np.testing.assert_allclose(deep, 3 * total + np.log(4.0), rtol=1e-5)

def test_trains_on_generated_panoptic_scenes_loss_falls_and_pq_rises(tiny):
    """20 Adam steps on 8 generated 64 px scenes through the panoptic task's kMaX criterion (matching,
    PQ-style weights, pixel instance discrimination, auxiliary semantic head, deep supervision), BatchNorm
    statistics updated; PQ and mIoU on those scenes through the trainer's eval step, before and after."""
    model, variables = tiny
    batch = panoptic_batch(8)
    task = PanopticSegmentationTask(NUM_CLASSES, THING_IDS, criterion="kmax",
                                    criterion_args=dict(pixel_insdis_sample_k=128, aux_semantic_sample_k=128))
    scores = panoptic_scores(model, task, batch)
    before = scores(variables)
    losses, trained = train_classifier(model, variables, batch["image"], batch, steps=20, tx=optax.adam(1e-2),
                                       loss=lambda out, b: task.loss(out, b, jax.random.key(0))[0])
    after = scores(trained)
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
    assert after["PQ"] > before["PQ"] + 10 and after["mIoU"] > before["mIoU"] + 10, (before, after)
