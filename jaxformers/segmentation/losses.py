"""Mask2Former's set criterion in JAX: Hungarian matching on sampled points, then a weighted class
cross-entropy and point-sampled sigmoid-BCE + dice mask losses, for the final and every auxiliary
prediction (deep supervision).

As the official ``SetCriterion`` / transformers' ``Mask2FormerLoss``:
- matching cost per image = ``class_weight`` * (-p(target class)) + ``mask_weight`` * pairwise
  sigmoid BCE + ``dice_weight`` * pairwise dice, on ``num_points`` points drawn uniformly, shared by
  all queries and targets of the image;
- class loss: cross-entropy over all queries, unmatched queries' target = "no object" (the last
  class) weighted ``no_object_weight``, a weighted mean (torch ``CrossEntropyLoss(weight=...)``);
- mask losses on matched pairs at ``num_points`` points per pair: ``importance_sample_ratio`` of
  them the most uncertain (|logit| smallest) of ``oversample_ratio`` x as many uniform draws, the
  rest uniform; sigmoid BCE (mean over points) and dice, each summed over pairs and divided by the
  number of target masks in the batch;
- total = sum over the predictions of ``class_weight`` * CE + ``mask_weight`` * BCE + ``dice_weight`` * dice.

Points are (x, y) in [0, 1]; predictions (at 1/4 resolution) and targets (at image resolution) are
read by bilinear ``grid_sample`` at the same points, so no resizing is needed.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxformers.layers.interpolate import grid_sample
from jaxformers.segmentation.matching import hungarian_match, matched_query_targets
from jaxformers.segmentation.targets import panoptic_targets


@dataclasses.dataclass(frozen=True)
class Mask2FormerLossConfig:
    num_classes: int
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True
    # ECO-M2F (arXiv 2404.15244): outputs with ``encoder_exit`` (a gated model) have their total loss
    # multiplied by ``exit_loss_weight`` (the official maskformer_model.py: every loss times exit + 2).
    exit_weighting: bool = True


def exit_loss_weight(encoder_exit: jax.Array) -> jax.Array:
    """ECO-M2F's loss factor: the number of encoder layers run plus 2 (GYeow/ECO-M2F
    ``mask2former/maskformer_model.py``: ``losses[k] *= weight_dict[k] * (encoder.i_exit + 2)``), 4..8
    for the official 6 layers and 5 gates. The official encoder takes one exit for the whole batch
    (right for batch 1); with an exit per image (B,) the factor is their mean of exit + 2, the official
    one for batch 1 and for a batch that agrees on its exit."""
    return jnp.mean(jax.lax.stop_gradient(jnp.asarray(encoder_exit)).astype(jnp.float32) + 2.0)


def sample_maps(maps: jax.Array, points: jax.Array) -> jax.Array:
    """maps (B, N, h, w), points (B, K, 2) -> (B, K, N): every map of an image at the same points."""
    return grid_sample(maps.transpose(0, 2, 3, 1), points)


def sample_pairs(maps: jax.Array, points: jax.Array) -> jax.Array:
    """maps (B, S, h, w), points (B, S, K, 2) -> (B, S, K): each map at its own points."""
    b, s, h, w = maps.shape
    out = grid_sample(maps.reshape(b * s, h, w, 1), points.reshape(b * s, -1, 2))
    return out.reshape(b, s, -1)


def pairwise_sigmoid_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits (B, K, Q), labels (B, K, S) -> (B, Q, S) mean BCE of every query against every target."""
    k = logits.shape[1]
    pos, neg = jax.nn.softplus(-logits) / k, jax.nn.softplus(logits) / k
    return jnp.einsum("bkq,bks->bqs", pos, labels) + jnp.einsum("bkq,bks->bqs", neg, 1.0 - labels)


def pairwise_dice(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits (B, K, Q), labels (B, K, S) -> (B, Q, S) dice loss 1 - (2|p t| + 1) / (|p| + |t| + 1)."""
    p = jax.nn.sigmoid(logits)
    num = 2.0 * jnp.einsum("bkq,bks->bqs", p, labels)
    den = p.sum(1)[:, :, None] + labels.sum(1)[:, None, :]
    return 1.0 - (num + 1.0) / (den + 1.0)


def sigmoid_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the last axis of BCE-with-logits."""
    return jnp.mean(jax.nn.softplus(logits) - logits * labels, axis=-1)


def dice(logits: jax.Array, labels: jax.Array) -> jax.Array:
    p = jax.nn.sigmoid(logits)
    return 1.0 - (2.0 * (p * labels).sum(-1) + 1.0) / (p.sum(-1) + labels.sum(-1) + 1.0)


def uncertain_points(rng: jax.Array, logits: jax.Array, num_points: int, oversample_ratio: float,
                     importance_sample_ratio: float) -> jax.Array:
    """(B, S, K, 2) points per map of ``logits`` (B, S, h, w): the ``importance_sample_ratio`` * K most
    uncertain of ``oversample_ratio`` * K uniform draws, then uniform ones (PointRend's sampling)."""
    b, s = logits.shape[:2]
    k_over, k_rand = jax.random.split(rng)
    drawn = int(num_points * oversample_ratio)
    important = int(importance_sample_ratio * num_points)
    coords = jax.random.uniform(k_over, (b, s, drawn, 2))
    uncertainty = -jnp.abs(sample_pairs(jax.lax.stop_gradient(logits), coords))
    _, idx = jax.lax.top_k(uncertainty, important)
    picked = jnp.take_along_axis(coords, idx[..., None], axis=2)
    rest = jax.random.uniform(k_rand, (b, s, num_points - important, 2))
    return jnp.concatenate([picked, rest], axis=2)


def match_predictions(rng: jax.Array, class_logits: jax.Array, mask_logits: jax.Array, masks: jax.Array,
                      classes: jax.Array, valid: jax.Array, cfg: Mask2FormerLossConfig) -> jax.Array:
    """(B, S) query index matched to each valid target (-1 otherwise), on the matching cost."""
    b = class_logits.shape[0]
    points = jax.random.uniform(rng, (b, cfg.num_points, 2))
    pred = sample_maps(mask_logits.astype(jnp.float32), points)  # (B, K, Q)
    tgt = sample_maps(masks, points)  # (B, K, S)
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), -1)
    cost_class = -jnp.take_along_axis(probs, classes[:, None, :], axis=2)  # (B, Q, S)
    cost = (cfg.mask_weight * pairwise_sigmoid_ce(pred, tgt) + cfg.class_weight * cost_class
            + cfg.dice_weight * pairwise_dice(pred, tgt))
    return hungarian_match(cost, valid)


def _single_prediction_loss(rng, class_logits, mask_logits, masks, classes, valid, num_masks, cfg):
    k_match, k_points = jax.random.split(rng)
    assign = match_predictions(k_match, class_logits, mask_logits, masks, classes, valid, cfg)
    num_queries = class_logits.shape[1]
    matched = valid & (assign >= 0)
    target_classes = matched_query_targets(jnp.where(matched, assign, -1), num_queries, classes, cfg.num_classes)
    logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), -1)
    ce = -jnp.take_along_axis(logp, target_classes[..., None], axis=-1)[..., 0]
    weight = jnp.where(target_classes == cfg.num_classes, cfg.no_object_weight, 1.0)
    loss_ce = jnp.sum(ce * weight) / jnp.sum(weight)
    pred = jnp.take_along_axis(mask_logits.astype(jnp.float32), jnp.maximum(assign, 0)[:, :, None, None], axis=1)
    points = jax.lax.stop_gradient(uncertain_points(k_points, pred, cfg.num_points, cfg.oversample_ratio,
                                                    cfg.importance_sample_ratio))
    labels = jax.lax.stop_gradient(sample_pairs(masks, points))
    logits = sample_pairs(pred, points)
    w = matched.astype(jnp.float32)
    loss_mask = jnp.sum(sigmoid_ce(logits, labels) * w) / num_masks
    loss_dice = jnp.sum(dice(logits, labels) * w) / num_masks
    return loss_ce, loss_mask, loss_dice


def mask2former_loss(outputs: dict, panoptic: jax.Array, segment_classes: jax.Array, segment_crowd: jax.Array,
                     rng: jax.Array, cfg: Mask2FormerLossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss and its parts (``loss_cross_entropy``, ``loss_mask``, ``loss_dice`` of the final
    prediction, ``loss_aux`` the auxiliary sum) for a Mask2Former output dict (HF names). With an
    ``encoder_exit`` output (ECO-M2F's gated model) and ``cfg.exit_weighting`` the total is multiplied
    by ``exit_loss_weight`` (the part ``exit_weight``; the other parts are unweighted)."""
    masks, classes, valid = panoptic_targets(panoptic, segment_classes, segment_crowd)
    if outputs["class_queries_logits"].shape[-1] != cfg.num_classes + 1:
        raise ValueError(f"class_queries_logits has {outputs['class_queries_logits'].shape[-1]} classes but the loss "
                         f"expects num_classes + 1 = {cfg.num_classes + 1}")
    num_masks = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
    cls = outputs["class_queries_logits"][None]
    msk = outputs["masks_queries_logits"][None]
    aux = outputs.get("auxiliary_logits")
    if cfg.deep_supervision and aux is not None:
        cls = jnp.concatenate([aux["class_queries_logits"], cls])
        msk = jnp.concatenate([aux["masks_queries_logits"], msk])
    keys = jax.random.split(rng, cls.shape[0])
    per_layer = jax.vmap(lambda k, c, m: _single_prediction_loss(k, c, m, masks, classes, valid, num_masks, cfg))(
        keys, cls, msk)
    ce, bce, dc = per_layer
    totals = cfg.class_weight * ce + cfg.mask_weight * bce + cfg.dice_weight * dc
    metrics = {"loss_cross_entropy": ce[-1], "loss_mask": bce[-1], "loss_dice": dc[-1],
               "loss_aux": jnp.sum(totals[:-1])}
    total = jnp.sum(totals)
    if cfg.exit_weighting and outputs.get("encoder_exit") is not None:
        metrics["exit_weight"] = exit_loss_weight(outputs["encoder_exit"])
        total = total * metrics["exit_weight"]
    return total, metrics
