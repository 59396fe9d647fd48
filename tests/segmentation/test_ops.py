"""The dense-head ops: Hungarian matching on hand-made costs, bilinear resampling and multi-scale
deformable attention against PyTorch, Mask2Former's criterion and inference on worked examples."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.layers.deformable import multi_scale_deformable_attention
from jaxformers.layers.interpolate import grid_sample, resize_bilinear
from jaxformers.segmentation import Mask2FormerLossConfig, hungarian_match, mask2former_loss, panoptic_inference


def test_hungarian_match_hand_made_costs():
    cost = np.array([[[1.0, 2.0], [1.0, 10.0], [5.0, 5.0]],     # greedy would take q0 for t0 (total 6), optimum 3
                     [[3.0, 0.0], [1.0, 0.0], [2.0, np.nan]]], np.float32)
    valid = np.array([[True, True], [True, False]])
    out = jax.jit(hungarian_match)(cost, valid)
    np.testing.assert_array_equal(out, [[1, 0], [1, -1]])
    # Batched over a leading axis (deep supervision vmaps the matcher over the decoder layers).
    stacked = jax.vmap(hungarian_match, in_axes=(0, None))(jnp.stack([cost, cost[:, ::-1]]), valid)
    np.testing.assert_array_equal(stacked, [[[1, 0], [1, -1]], [[1, 2], [1, -1]]])
    # A NaN cost is taken only when nothing else is left; more targets than queries: extras stay -1.
    nan = np.array([[[np.nan, 1.0, 1.0]]], np.float32)
    np.testing.assert_array_equal(hungarian_match(nan, np.ones((1, 3), bool))[0, 0], -1)
    assert sorted(np.asarray(hungarian_match(nan, np.ones((1, 3), bool)))[0].tolist()) == [-1, -1, 0]


def test_resize_bilinear_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.RandomState(0).randn(2, 5, 7, 3).astype(np.float32)
    for size, align in [((10, 14), False), ((3, 4), False), ((9, 13), True)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size, mode="bilinear",
                                              align_corners=align).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(resize_bilinear(x, size, align_corners=align), ref, atol=1e-5)


def test_grid_sample_and_deformable_attention_match_torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention as ref_msda

    rng = np.random.RandomState(0)
    x = rng.randn(2, 5, 6, 3).astype(np.float32)
    pts = rng.uniform(-0.2, 1.2, (2, 11, 2)).astype(np.float32)  # some taps outside the map (zero padding)
    ref = torch.nn.functional.grid_sample(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                          torch.from_numpy(2 * pts[:, :, None] - 1), mode="bilinear",
                                          padding_mode="zeros", align_corners=False)
    np.testing.assert_allclose(grid_sample(x, pts), ref.numpy()[..., 0].transpose(0, 2, 1), atol=1e-5)
    shapes = [(4, 5), (2, 3), (1, 2)]
    value = rng.randn(2, sum(h * w for h, w in shapes), 2, 4).astype(np.float32)
    loc = rng.uniform(-0.1, 1.1, (2, 7, 2, 3, 4, 2)).astype(np.float32)
    wts = rng.uniform(0, 1, (2, 7, 2, 3, 4)).astype(np.float32)
    ref = ref_msda(torch.from_numpy(value), shapes, torch.from_numpy(loc), torch.from_numpy(wts)).numpy()
    np.testing.assert_allclose(multi_scale_deformable_attention(value, shapes, loc, wts), ref, atol=1e-5)


def _targets():
    """One 32x32 image: segment 1 (class 2) top-left 16x16, segment 2 (class 0) the right half, void elsewhere."""
    pan = np.zeros((1, 32, 32), np.int32)
    pan[0, :16, :16] = 1
    pan[0, :, 16:] = 2
    classes = np.array([[2, 0, -1]], np.int32)
    return pan, classes, np.zeros_like(classes)


def test_mask2former_loss_worked_example():
    pan, classes, crowd = _targets()
    small = pan[:, ::4, ::4]  # the 8x8 prediction grid
    masks = np.stack([np.where(small == 2, 30.0, -30.0), np.full_like(small, -30.0, dtype=np.float64),
                      np.where(small == 1, 30.0, -30.0)], 1).astype(np.float32)  # q0: seg 2, q1: nothing, q2: seg 1
    cls = np.zeros((1, 3, 4), np.float32)
    cls[0, 0, 0], cls[0, 2, 2], cls[0, 1, 3] = 3.0, 2.0, 1.0  # q0 -> class 0, q2 -> class 2, q1 -> no object
    cfg = Mask2FormerLossConfig(num_classes=3, num_points=256)
    jitted = jax.jit(mask2former_loss, static_argnums=5)
    loss_fn = lambda o, k, cfg=cfg: jitted(o, pan, classes, crowd, k, cfg)  # noqa: E731
    total, parts = loss_fn({"class_queries_logits": cls, "masks_queries_logits": masks}, jax.random.key(0))
    # Matching: seg 1 -> q2, seg 2 -> q0; targets per query (2, no object, 0 -> as class ids 0, 3, 2).
    logp = jax.nn.log_softmax(cls[0], -1)
    ce = -np.array([logp[0, 0], logp[1, 3], logp[2, 2]])
    w = np.array([1.0, 0.1, 1.0])
    np.testing.assert_allclose(parts["loss_cross_entropy"], (ce * w).sum() / w.sum(), rtol=1e-5)
    # Right, sharp masks: dice near 0; the BCE is not, as the bilinearly sampled targets are fractional on
    # the edges, where importance sampling puts most points. Zero logits would give log 2.
    assert parts["loss_dice"] < 0.05 and 0.1 < parts["loss_mask"] < 0.6
    np.testing.assert_allclose(total, 2 * parts["loss_cross_entropy"] + 5 * parts["loss_mask"]
                               + 5 * parts["loss_dice"], rtol=1e-5)
    # The same predictions in another query order give the same loss (the matching follows them).
    perm = [2, 0, 1]
    total_perm, _ = loss_fn({"class_queries_logits": cls[:, perm], "masks_queries_logits": masks[:, perm]},
                            jax.random.key(0))
    np.testing.assert_allclose(total_perm, total, rtol=1e-5)
    # Deep supervision: two auxiliary copies about triple the loss (each prediction draws its own points);
    # swapped masks cost more.
    aux = {"class_queries_logits": np.stack([cls, cls]), "masks_queries_logits": np.stack([masks, masks])}
    deep, parts_deep = loss_fn({"class_queries_logits": cls, "masks_queries_logits": masks, "auxiliary_logits": aux},
                               jax.random.key(0))
    np.testing.assert_allclose(deep, 3 * total, rtol=0.15)
    final = 2 * parts_deep["loss_cross_entropy"] + 5 * parts_deep["loss_mask"] + 5 * parts_deep["loss_dice"]
    np.testing.assert_allclose(parts_deep["loss_aux"] + final, deep, rtol=1e-5)
    wrong, _ = loss_fn({"class_queries_logits": cls, "masks_queries_logits": masks[:, [2, 1, 0]]}, jax.random.key(0))
    assert wrong > total + 1.0


def test_panoptic_inference_merges_stuff_and_drops_weak_or_overlapped_queries():
    h = w = 4
    probs = np.zeros((1, 5, 3), np.float32)  # classes: 0 thing, 1 stuff, 2 = no object
    probs[0, :, :] = [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.9, 0.05], [0.5, 0.3, 0.2], [0.05, 0.05, 0.9]]
    masks = np.zeros((1, 5, h, w), np.float32)
    masks[0, 0, :2, :2] = 1.0   # thing
    masks[0, 1, 2:, :] = 1.0    # stuff, bottom half
    masks[0, 2, :2, 2:] = 1.0   # the same stuff class, top right: merged with query 1
    masks[0, 3, :, :] = 1.0     # score 0.5 < 0.8: dropped
    masks[0, 4, :, :] = 1.0     # no object: dropped
    infer = jax.jit(lambda p, m: panoptic_inference(p, m, thing_classes=(0,)))
    ids, classes = infer(probs, masks)
    np.testing.assert_array_equal(ids[0], [[1, 1, 2, 2], [1, 1, 2, 2], [2, 2, 2, 2], [2, 2, 2, 2]])
    np.testing.assert_array_equal(classes[0], [0, 1, -1, -1, -1])
    # A thing mostly covered by a stronger query keeps less than 80% of its mask: dropped, its pixels void.
    masks[0, 0] = 0.6
    masks[0, 0, 0, 0] = 1.0
    ids, classes = infer(probs, masks)
    assert ids[0, 1, 0] == 0 and classes[0, 0] == -1
