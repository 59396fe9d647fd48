"""kMaX-DeepLab's PQ-style set criterion in JAX (arXiv 2207.04044; the official PyTorch
re-implementation bytedance/kmax-deeplab, ``kmax_deeplab/modeling/{criterion,matcher}.py``, and
deeplab2's ``model/loss/max_deeplab_loss.py``).

Targets are read at the prediction's resolution: the panoptic map is subsampled with
``[::stride, ::stride]`` (the official data mapper's ``pan_seg_gt[::4, ::4]``). Crowd segments
and unlabelled pixels are void (the official mapper drops crowd segments from the targets).

- Matching (final prediction only; the auxiliary layers share it, ``SHARE_FINAL_MATCHING``): cost =
  -(mask similarity x class probability); mask similarity = intersection / ((|p| + |t|) / 2 + 1e-5)
  of the mask probabilities *softmaxed over the queries* (void pixels zeroed) with each target;
  class probability = softmax over the classes without "no object", at the target's class.
- PQ-style weights (no gradient): the class loss of a matched query is weighted by its mask
  similarity, of an unmatched one by the share of its mask on void pixels; the dice loss of a
  matched query is weighted by its class probability (unmatched: 0); both clamped below at
  ``no_object_weight``.
- Class loss: cross-entropy, alpha-weighted (0.75 objects, 0.25 "no object"), PQ-weighted, mean
  over the non-zero terms of an image, mean over images. Mask loss: softmax cross-entropy over the
  queries at every non-void pixel. Dice: softmax-over-queries dice (smooth 1), x 0.75 / N.
- Pixel instance discrimination: ``sample_k`` pixels drawn without replacement (Gumbel top-k) with
  logits ``temperature * log(HW / segment area)`` (void never, unless nothing else is left); a
  cross-entropy between the pixels' normalised co-membership and their feature similarity / 0.3.
- Auxiliary semantic loss: cross-entropy of the semantic head at ``sample_k`` pixels drawn the
  same way (temperature 2.0), void ignored.
- Total = sum over the final and every auxiliary prediction of 3 * class + 0.3 * mask + 3 * dice +
  1 * instance discrimination, + 1 * auxiliary semantic.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxformers.layers.interpolate import resize_bilinear
from jaxformers.segmentation.matching import hungarian_match
from jaxformers.segmentation.targets import panoptic_targets

_MASKING = -99999.0


@dataclasses.dataclass(frozen=True)
class KMaXLossConfig:
    num_classes: int
    class_weight: float = 3.0
    mask_weight: float = 0.3
    dice_weight: float = 3.0
    insdis_weight: float = 1.0
    aux_semantic_weight: float = 1.0
    no_object_weight: float = 1e-5
    focal_alpha: float = 0.75
    pixel_insdis_temperature: float = 1.5
    pixel_insdis_sample_k: int = 4096
    insdis_temperature: float = 0.3
    aux_semantic_temperature: float = 2.0
    aux_semantic_sample_k: int = 4096
    stride: int = 4


def _mean_nonzero(loss: jax.Array) -> jax.Array:
    """(B, ...) -> per image sum / number of non-zero terms (at least 1), mean over images."""
    flat = loss.reshape(loss.shape[0], -1)
    count = jnp.maximum(jnp.sum(flat != 0.0, -1).astype(flat.dtype), 1.0)
    return jnp.mean(jnp.sum(flat, -1) / count)


def kmax_match(class_logits: jax.Array, mask_logits: jax.Array, masks: jax.Array, classes: jax.Array,
               valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """class_logits (B, N, C+1), mask_logits (B, N, HW), masks (B, S, HW) of 0/1, classes / valid (B, S) ->
    (query of each target (B, S), -1 if invalid; its mask similarity (B, S); its class probability (B, S))."""
    class_logits, mask_logits = jax.lax.stop_gradient(class_logits), jax.lax.stop_gradient(mask_logits)
    class_prob = jax.nn.softmax(class_logits.astype(jnp.float32), -1)[..., :-1]
    class_sim = jnp.take_along_axis(class_prob, classes[:, None, :], axis=2)  # (B, N, S)
    masks = masks * valid[..., None]
    p = jax.nn.softmax(mask_logits.astype(jnp.float32), axis=1) * (masks.sum(1) > 0)[:, None, :]
    inter = jnp.einsum("bnm,bsm->bns", p, masks)
    mask_sim = inter / ((p.sum(-1)[:, :, None] + masks.sum(-1)[:, None, :]) / 2.0 + 1e-5)
    assign = hungarian_match(-mask_sim * class_sim, valid)
    at = jnp.maximum(assign, 0)[:, None, :]
    dice = jnp.take_along_axis(mask_sim, at, axis=1)[:, 0]
    prob = jnp.take_along_axis(class_sim, at, axis=1)[:, 0]
    return assign, dice, prob


def _gumbel_top_k(rng: jax.Array, logits: jax.Array, k: int) -> jax.Array:
    u = jax.random.uniform(rng, logits.shape, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
    return jax.lax.top_k(logits - jnp.log(-jnp.log(u)), k)[1]


def _targets(panoptic, segment_classes, segment_crowd, size: tuple[int, int], stride: int):
    """Targets at the prediction's ``size``: masks (B, S, hw), classes, valid (B, S)."""
    pan = panoptic[:, ::stride, ::stride]
    if pan.shape[1:] != tuple(size):
        raise ValueError(f"the panoptic map subsampled by {stride} is {pan.shape[1]}x{pan.shape[2]} but the "
                         f"predicted masks are {size[0]}x{size[1]}")
    masks, classes, valid = panoptic_targets(pan, segment_classes, segment_crowd)
    masks = masks * valid[..., None, None]
    return masks.reshape(masks.shape[0], masks.shape[1], -1), classes, valid


def kmax_loss(outputs: dict, panoptic: jax.Array, segment_classes: jax.Array, segment_crowd: jax.Array,
              rng: jax.Array, cfg: KMaXLossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss and its parts (``loss_ce``, ``loss_mask``, ``loss_dice``, ``loss_pixel_insdis`` of
    the final prediction, ``loss_aux_semantic``, ``loss_aux`` the auxiliary layers' sum) for a
    kMaX-DeepLab output dict (``pred_logits``, ``pred_masks``, ``pixel_feature``, optional
    ``aux_outputs`` and ``aux_semantic_pred``)."""
    logits, mask_logits = outputs["pred_logits"], outputs["pred_masks"]
    if logits.shape[-1] != cfg.num_classes + 1:
        raise ValueError(f"pred_logits has {logits.shape[-1]} classes but the loss expects num_classes + 1 = "
                         f"{cfg.num_classes + 1}")
    b, n, h, w = mask_logits.shape
    masks, classes, valid = _targets(panoptic, segment_classes, segment_crowd, (h, w), cfg.stride)
    flat_masks = mask_logits.reshape(b, n, -1).astype(jnp.float32)
    assign, dice_s, prob_s = kmax_match(logits, flat_masks, masks, classes, valid)

    # Per-query targets and PQ-style weights, from the final prediction (shared by the auxiliary ones).
    hit = (assign[:, :, None] == jnp.arange(n)[None, None, :]) & valid[:, :, None]  # (B, S, N)
    hitf = hit.astype(jnp.float32)
    target_masks = jnp.einsum("bsn,bsm->bnm", hitf, masks)  # (B, N, HW)
    labels = jnp.where(hit.any(1), jnp.einsum("bsn,bs->bn", hitf, classes.astype(jnp.float32)).astype(jnp.int32),
                       cfg.num_classes)
    matched = hit.any(1)
    void = target_masks.sum(1) < 1  # (B, HW)
    eos = cfg.no_object_weight
    mask_weight = jnp.where(matched, jnp.maximum(jnp.einsum("bsn,bs->bn", hitf, prob_s), eos), 0.0)
    p = jax.nn.softmax(jax.lax.stop_gradient(flat_masks), axis=1)
    void_share = jnp.einsum("bnm,bm->bn", p, void.astype(jnp.float32)) / (p.sum(-1) + 1e-5)
    class_weight = jnp.maximum(jnp.where(matched, jnp.einsum("bsn,bs->bn", hitf, dice_s), void_share), eos)
    seg_area = jnp.einsum("bnm,bn->bm", target_masks, target_masks.sum(-1))
    inverse_area = (h * w) / jnp.maximum(seg_area, 1.0)
    log_inverse_area, void_logit = jnp.log(inverse_area), void * _MASKING

    def class_loss(cls_logits):
        logp = jax.nn.log_softmax(cls_logits.astype(jnp.float32), -1)
        ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        is_void = (labels == cfg.num_classes).astype(jnp.float32)
        alpha = cfg.focal_alpha * (1.0 - is_void) + (1.0 - cfg.focal_alpha) * is_void
        return _mean_nonzero(alpha * ce * class_weight)

    def mask_losses(m_logits):
        m = m_logits.reshape(b, n, -1).astype(jnp.float32)
        logp = jax.nn.log_softmax(m, axis=1)
        ce = jnp.where(void, 0.0, -jnp.sum(target_masks * logp, axis=1))
        probs = jnp.where(void[:, None], 0.0, jnp.exp(logp))
        inter = 2.0 * jnp.sum(probs * target_masks, -1) + 1.0
        den = probs.sum(-1) + target_masks.sum(-1) + 1.0
        dice = (1.0 - inter / den) * mask_weight
        return _mean_nonzero(ce), jnp.mean(dice.sum(1) * 0.75 / n)

    def insdis_loss(pixel_feature, key):
        k = min(cfg.pixel_insdis_sample_k, h * w)
        idx = _gumbel_top_k(key, log_inverse_area * cfg.pixel_insdis_temperature + void_logit, k)  # (B, K)
        gt = jnp.take_along_axis(target_masks, idx[:, None, :], axis=2)  # (B, N, K)
        gt_sim = jnp.einsum("bnk,bnj->bkj", gt, gt)
        gt_sim = gt_sim / jnp.maximum(gt_sim.sum(1, keepdims=True), 1.0)
        feat = jnp.take_along_axis(pixel_feature.reshape(b, h * w, -1).astype(jnp.float32), idx[..., None], axis=1)
        pred_sim = jnp.einsum("bkc,bjc->bkj", feat, feat) / cfg.insdis_temperature
        loss = -jnp.sum(gt_sim * jax.nn.log_softmax(pred_sim, axis=1), axis=1)  # (B, K): classes on axis 1
        return _mean_nonzero(loss)

    def total(cls_logits, m_logits, pixel_feature, key):
        ce = class_loss(cls_logits)
        m, d = mask_losses(m_logits)
        ins = insdis_loss(pixel_feature, key)
        weighted = cfg.class_weight * ce + cfg.mask_weight * m + cfg.dice_weight * d + cfg.insdis_weight * ins
        return weighted, (ce, m, d, ins)

    k_final, k_aux, k_sem = jax.random.split(rng, 3)
    final, (ce, m, d, ins) = total(logits, mask_logits, outputs["pixel_feature"], k_final)
    metrics = {"loss_ce": ce, "loss_mask": m, "loss_dice": d, "loss_pixel_insdis": ins}
    loss = final
    aux = outputs.get("aux_outputs")
    if aux is not None:
        layers = aux["pred_logits"].shape[0]
        aux_totals, _ = jax.vmap(total)(aux["pred_logits"], aux["pred_masks"], aux["pixel_feature"],
                                        jax.random.split(k_aux, layers))
        metrics["loss_aux"] = jnp.sum(aux_totals)
        loss = loss + metrics["loss_aux"]
    semantic = outputs.get("aux_semantic_pred")
    if semantic is not None:
        if semantic.shape[1:3] != (h, w):
            semantic = resize_bilinear(semantic, (h, w))
        labelled = masks.sum(1) > 0  # every (non-crowd) segment, matched or not
        sem_target = jnp.where(labelled, jnp.einsum("bsm,bs->bm", masks, classes.astype(jnp.float32)).astype(jnp.int32),
                               cfg.num_classes)
        logp = jax.nn.log_softmax(semantic.reshape(b, h * w, -1).astype(jnp.float32), -1)
        ce_px = -jnp.take_along_axis(logp, sem_target[..., None], axis=-1)[..., 0]
        ce_px = jnp.where(labelled, ce_px, 0.0)
        if cfg.aux_semantic_sample_k:
            k = min(cfg.aux_semantic_sample_k, h * w)
            idx = _gumbel_top_k(k_sem, log_inverse_area * cfg.aux_semantic_temperature + void_logit, k)
            ce_px = jnp.take_along_axis(ce_px, idx, axis=1)
        metrics["loss_aux_semantic"] = _mean_nonzero(ce_px)
        loss = loss + cfg.aux_semantic_weight * metrics["loss_aux_semantic"]
    return loss, metrics


def kmax_probs(outputs: dict, image_size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """kMaX-DeepLab: softmax class probabilities and mask probabilities softmaxed over the queries
    (every pixel belongs to one cluster), upsampled to the image."""
    class_probs = jax.nn.softmax(outputs["pred_logits"].astype(jnp.float32), -1)
    masks = resize_bilinear(outputs["pred_masks"].astype(jnp.float32).transpose(0, 2, 3, 1), image_size)
    return class_probs, jax.nn.softmax(masks, -1).transpose(0, 3, 1, 2)
