"""Segmentation metrics as per-class sums (batched, jittable; add them over a data set, then summarise).

Panoptic quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019), exactly as the COCO
panoptic API (``panopticapi/evaluation.py``, ``pq_compute_single_core``) counts it:

- a predicted and a ground-truth segment of the same class match when IoU > 0.5, where the union
  leaves out the predicted pixels that fall on void: IoU = |P n G| / (|P| + |G| - |P n G| - |P n void|);
  crowd ground truth never matches;
- an unmatched, non-crowd ground-truth segment is a false negative;
- an unmatched predicted segment is a false positive unless more than half of it lies on void or
  on crowd regions of its class;
- per class: PQ = sum IoU(TP) / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2);
  PQ, SQ, RQ average over the classes with TP + FP + FN > 0, also over things and stuff apart.

Conventions: ground truth as in ``targets.py`` (segment ids 1..S, 0 = void, a class per slot, -1
unused; a listed segment without pixels is ignored); predictions as ``panoptic_inference`` makes
them (ids 1..P, 0 = void / unassigned, a class per id). One deliberate difference: the API takes the
intersection with the *last* crowd segment of a class (one per class in COCO); here it is the
intersection with all crowd segments of the class (the same whenever there is one).

Semantic segmentation: per-class intersection and union over the pixels whose label is not void
(detectron2's ``SemSegEvaluator``); mIoU averages IoU over the classes with a non-empty union.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.segmentation.targets import VOID


def _one_image_pq(pred_ids, pred_classes, gt_ids, gt_classes, gt_crowd, num_classes):
    p, s = pred_classes.shape[0], gt_classes.shape[0]
    gt_oh = jax.nn.one_hot(gt_ids.reshape(-1), s + 1, dtype=jnp.float32)  # (HW, S+1)
    pr_oh = jax.nn.one_hot(pred_ids.reshape(-1), p + 1, dtype=jnp.float32)  # (HW, P+1)
    inter = gt_oh.T @ pr_oh  # (S+1, P+1): row 0 = void
    gt_area = inter.sum(1)[1:]
    pred_area = inter.sum(0)[1:]
    void_inter = inter[0, 1:]
    inter = inter[1:, 1:]  # (S, P)
    gt_valid = (gt_classes >= 0) & (gt_area > 0)
    crowd = gt_valid & (gt_crowd > 0)
    gt_real = gt_valid & ~crowd
    pred_valid = (pred_classes >= 0) & (pred_area > 0)
    same_class = gt_classes[:, None] == pred_classes[None, :]
    union = gt_area[:, None] + pred_area[None, :] - inter - void_inter[None, :]
    iou = inter / jnp.maximum(union, 1.0)
    match = gt_real[:, None] & pred_valid[None, :] & same_class & (iou > 0.5)
    gt_matched = match.any(1)
    pred_matched = match.any(0)
    crowd_inter = jnp.sum(jnp.where(crowd[:, None] & same_class, inter, 0.0), axis=0)
    ignored = (void_inter + crowd_inter) / jnp.maximum(pred_area, 1.0) > 0.5
    fp = pred_valid & ~pred_matched & ~ignored
    fn = gt_real & ~gt_matched
    gt_c = jax.nn.one_hot(jnp.maximum(gt_classes, 0), num_classes, dtype=jnp.float32)  # (S, C)
    pr_c = jax.nn.one_hot(jnp.maximum(pred_classes, 0), num_classes, dtype=jnp.float32)  # (P, C)
    tp_c = match.any(1).astype(jnp.float32) @ gt_c
    iou_c = jnp.sum(jnp.where(match, iou, 0.0), axis=1) @ gt_c
    return {"tp": tp_c, "fp": fp.astype(jnp.float32) @ pr_c, "fn": fn.astype(jnp.float32) @ gt_c, "iou": iou_c}


def panoptic_quality_stats(pred_ids: jax.Array, pred_classes: jax.Array, gt_ids: jax.Array, gt_classes: jax.Array,
                           gt_crowd: jax.Array | None, num_classes: int, reduce: bool = True) -> dict[str, jax.Array]:
    """Per-class sums over a batch: ``tp``, ``fp``, ``fn``, ``iou`` (sum of matched IoUs), each (C,)
    (per image, (B, C), with ``reduce=False``).

    pred_ids (B, H, W) in 0..P, pred_classes (B, P); gt_ids (B, H, W) in 0..S, gt_classes (B, S),
    gt_crowd (B, S) (None: no crowd)."""
    if pred_ids.shape != gt_ids.shape:
        raise ValueError(f"predicted and ground-truth panoptic maps differ in shape: {pred_ids.shape} vs {gt_ids.shape}")
    if gt_crowd is None:
        gt_crowd = jnp.zeros_like(gt_classes)
    per_image = jax.vmap(lambda a, b, c, d, e: _one_image_pq(a, b, c, d, e, num_classes))(
        pred_ids, pred_classes, gt_ids, gt_classes, gt_crowd)
    return {k: v.sum(0) for k, v in per_image.items()} if reduce else per_image


def pq_summary(stats: dict, thing_classes: Sequence[int], num_classes: int | None = None) -> dict[str, float]:
    """PQ, SQ, RQ (in %) over all classes with TP + FP + FN > 0, and over things / stuff apart
    (``PQ_th``, ``PQ_st``...), from summed ``panoptic_quality_stats``."""
    tp, fp, fn, iou = (np.asarray(stats[k], np.float64) for k in ("tp", "fp", "fn", "iou"))
    c = len(tp) if num_classes is None else num_classes
    things = np.zeros(c, bool)
    things[list(thing_classes)] = True
    present = (tp + fp + fn) > 0
    denom = np.maximum(tp + 0.5 * fp + 0.5 * fn, 1e-12)
    pq, rq = iou / denom, tp / denom
    sq = np.where(tp > 0, iou / np.maximum(tp, 1e-12), 0.0)
    out = {}
    for suffix, sel in (("", present), ("_th", present & things), ("_st", present & ~things)):
        n = sel.sum()
        for name, v in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
            out[name + suffix] = float(100.0 * v[sel].mean()) if n else 0.0
        out["n" + suffix] = int(n)
    return out


def semantic_stats(pred: jax.Array, gt: jax.Array, num_classes: int, void: int = VOID) -> dict[str, jax.Array]:
    """Per-class ``intersection`` and ``union`` (C,) over the pixels whose ground truth is not ``void``."""
    if pred.shape != gt.shape:
        raise ValueError(f"predicted and ground-truth semantic maps differ in shape: {pred.shape} vs {gt.shape}")
    valid = (gt != void).reshape(-1)
    p = jax.nn.one_hot(pred.reshape(-1), num_classes, dtype=jnp.float32) * valid[:, None]
    g = jax.nn.one_hot(jnp.where(gt == void, 0, gt).reshape(-1), num_classes, dtype=jnp.float32) * valid[:, None]
    inter = (p * g).sum(0)
    return {"intersection": inter, "union": p.sum(0) + g.sum(0) - inter}


def miou(stats: dict) -> float:
    """Mean IoU (in %) over the classes with a non-empty union."""
    inter, union = np.asarray(stats["intersection"], np.float64), np.asarray(stats["union"], np.float64)
    present = union > 0
    return float(100.0 * (inter[present] / union[present]).mean()) if present.any() else 0.0
