"""ECO-M2F's training loss (``jaxformers.compress.eco_m2f``): every loss, the gate's included, weighted
by the number of encoder layers run + 2 as the official GYeow/ECO-M2F ``maskformer_model.py``, on a
worked example."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxformers.compress.eco_m2f import eco_m2f_loss, exit_loss_weight
from jaxformers.segmentation import Mask2FormerLossConfig, mask2former_loss
from train.seg_data import NUM_CLASSES


def test_losses_weighted_by_exit_plus_two_as_the_official_training():
    """GYeow/ECO-M2F maskformer_model.py: every loss, the gate's included, times (layers run + 2)."""
    pan = np.zeros((2, 16, 16), np.int32)
    pan[:, :8], pan[:, 8:, :8] = 1, 2  # two segments per image, the bottom-right quarter void
    seg_classes, crowd = np.array([[0, 3, -1], [1, 2, -1]], np.int32), np.zeros((2, 3), np.int32)
    rs = np.random.RandomState(0)
    out = {"class_queries_logits": rs.randn(2, 4, NUM_CLASSES + 1).astype(np.float32),
           "masks_queries_logits": rs.randn(2, 4, 4, 4).astype(np.float32),
           "gate_logits": np.array([[0.0, 1.0], [2.0, 0.0]], np.float32), "encoder_exit": np.array([3, 2], np.int32)}
    cfg = Mask2FormerLossConfig(num_classes=NUM_CLASSES, num_points=16)
    key = jax.random.key(0)
    plain, parts = mask2former_loss({k: out[k] for k in ("class_queries_logits", "masks_queries_logits")}, pan,
                                    seg_classes, crowd, key, cfg)
    assert "exit_weight" not in parts and float(plain) > 0
    np.testing.assert_allclose(exit_loss_weight(out["encoder_exit"]), (5 + 4) / 2)  # per image: mean of exit + 2
    np.testing.assert_allclose(exit_loss_weight(np.array([6])), 8.0)  # batch 1, the official deepest exit
    gated, parts = mask2former_loss(out, pan, seg_classes, crowd, key, cfg)  # the default for a gated model
    np.testing.assert_allclose(gated, 4.5 * plain, rtol=1e-6)
    assert float(parts["exit_weight"]) == 4.5
    off = Mask2FormerLossConfig(num_classes=NUM_CLASSES, num_points=16, exit_weighting=False)
    np.testing.assert_allclose(mask2former_loss(out, pan, seg_classes, crowd, key, off)[0], plain, rtol=1e-6)
    # The gate term: MSE of the softmax over the batch (official dim 0) against the targets, inside the factor.
    targets = np.array([[0.25, 0.5], [0.75, 0.5]], np.float32)
    probs = np.exp(out["gate_logits"]) / np.exp(out["gate_logits"]).sum(0, keepdims=True)
    mse = np.mean((probs - targets) ** 2)
    total, parts = eco_m2f_loss(out, pan, seg_classes, crowd, key, cfg, gate_targets=targets, gate_weight=2.0)
    np.testing.assert_allclose(parts["loss_gate"], mse, rtol=1e-6)
    np.testing.assert_allclose(total, 4.5 * (plain + 2.0 * mse), rtol=1e-6)
    np.testing.assert_allclose(eco_m2f_loss(out, pan, seg_classes, crowd, key, off, gate_targets=targets)[0],
                               plain + mse, rtol=1e-6)
    with pytest.raises(ValueError, match="needs a gated Mask2Former's outputs"):
        eco_m2f_loss({k: out[k] for k in ("class_queries_logits", "masks_queries_logits")}, pan, seg_classes,
                     crowd, key, cfg)
