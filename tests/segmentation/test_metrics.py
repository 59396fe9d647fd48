"""Panoptic quality and mIoU on worked examples: void in the union, crowd regions, unmatched and
wrongly classified segments, things / stuff averages."""
from __future__ import annotations

import numpy as np
import pytest

from jaxformers.segmentation import miou, panoptic_quality_stats, pq_summary, semantic_stats


def _batch():
    # Image 1. gt: segments 1, 2 (class 0), 3 (class 1, stuff), 4 (class 0, crowd); 0 = void.
    gt1 = np.array([[1, 1, 1, 2, 2, 0],
                    [1, 1, 1, 2, 2, 0],
                    [3, 3, 3, 3, 4, 4],
                    [3, 3, 3, 3, 4, 4]])
    pr1 = np.array([[1, 1, 1, 1, 2, 2],
                    [1, 1, 1, 2, 2, 2],
                    [3, 3, 3, 3, 0, 5],
                    [3, 3, 3, 3, 0, 5]])
    # Image 2. a class-0 thing predicted as class 2 (a false negative and a false positive), stuff exact.
    gt2 = np.array([[1, 1, 2, 2, 2, 2],
                    [1, 1, 2, 2, 2, 2],
                    [2, 2, 2, 2, 2, 2],
                    [2, 2, 2, 2, 2, 2]])
    pr2 = gt2.copy()
    gt_classes = np.array([[0, 0, 1, 0], [0, 1, -1, -1]])
    gt_crowd = np.array([[0, 0, 0, 1], [0, 0, 0, 0]])
    pred_classes = np.array([[0, 0, 1, -1, 0], [2, 1, -1, -1, -1]])
    return pr1, pr2, gt1, gt2, gt_classes, gt_crowd, pred_classes


def test_panoptic_quality_worked_example():
    pr1, pr2, gt1, gt2, gt_classes, gt_crowd, pred_classes = _batch()
    stats = panoptic_quality_stats(np.stack([pr1, pr2]), pred_classes, np.stack([gt1, gt2]), gt_classes, gt_crowd,
                                   num_classes=4)
    # Class 0: gt 1 / pred 1: IoU 6/7. gt 2 / pred 2: 3 shared pixels of 4 + 5; 2 of pred 2's pixels
    # lie on void and leave the union: 3 / (4 + 5 - 3 - 2) = 0.75 (without that rule: 0.5, no match).
    # Pred 5 lies on the class-0 crowd region: ignored. Image 2: the class-0 thing is missed (FN).
    np.testing.assert_allclose(stats["tp"], [2, 2, 0, 0])
    np.testing.assert_allclose(stats["fp"], [0, 0, 1, 0])
    np.testing.assert_allclose(stats["fn"], [1, 0, 0, 0])
    np.testing.assert_allclose(stats["iou"], [6 / 7 + 0.75, 2, 0, 0], rtol=1e-6)
    s = pq_summary(stats, thing_classes=(0, 2))
    pq0 = (6 / 7 + 0.75) / 2.5
    assert s["n"] == 3 and s["n_th"] == 2 and s["n_st"] == 1  # class 3 never appears: not averaged
    np.testing.assert_allclose(s["PQ"], 100 * (pq0 + 1 + 0) / 3, rtol=1e-6)
    np.testing.assert_allclose(s["SQ"], 100 * ((6 / 7 + 0.75) / 2 + 1 + 0) / 3, rtol=1e-6)
    np.testing.assert_allclose(s["RQ"], 100 * (2 / 2.5 + 1 + 0) / 3, rtol=1e-6)
    np.testing.assert_allclose([s["PQ_th"], s["PQ_st"]], [100 * pq0 / 2, 100.0], rtol=1e-6)


def test_pred_mostly_on_void_or_crowd_is_no_false_positive():
    gt = np.array([[[1, 1, 0, 0], [1, 1, 2, 2]]])  # segment 1: class 0; segment 2: class-1 crowd; 0: void
    gt_classes, crowd = np.array([[0, 1]]), np.array([[0, 1]])
    # pred 1 entirely on void, pred 2 on the class-1 crowd region: both ignored; the thing is missed.
    stats = panoptic_quality_stats(np.array([[[0, 0, 1, 1], [0, 0, 2, 2]]]), np.array([[0, 1]]), gt, gt_classes,
                                   crowd, 2)
    assert stats["fp"].tolist() == [0, 0] and stats["fn"].tolist() == [1, 0]  # crowd is never a false negative
    # Half on void, half on the crowd: ignored if the crowd is of the prediction's class (4/4 > 1/2),
    # a false positive otherwise (void alone is 2/4, not more than half).
    pred = np.array([[[0, 0, 1, 1], [0, 0, 1, 1]]])
    assert panoptic_quality_stats(pred, np.array([[1]]), gt, gt_classes, crowd, 2)["fp"].tolist() == [0, 0]
    assert panoptic_quality_stats(pred, np.array([[0]]), gt, gt_classes, crowd, 2)["fp"].tolist() == [1, 0]


def test_miou_worked_example_ignores_void():
    gt = np.array([[[0, 0, 1], [1, 255, 2]]])
    pred = np.array([[[0, 1, 1], [1, 2, 2]]])
    stats = semantic_stats(pred, gt, num_classes=4)
    np.testing.assert_allclose(stats["intersection"], [1, 2, 1, 0])
    np.testing.assert_allclose(stats["union"], [2, 3, 1, 0])  # the void pixel predicted as 2 is not counted
    assert miou(stats) == pytest.approx(100 * (0.5 + 2 / 3 + 1) / 3)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="differ in shape"):
        semantic_stats(np.zeros((1, 4, 4), int), np.zeros((1, 4, 5), int), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        panoptic_quality_stats(np.zeros((1, 4, 4), int), np.zeros((1, 2), int), np.zeros((1, 5, 4), int),
                               np.zeros((1, 2), int), None, 3)
