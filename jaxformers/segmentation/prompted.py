"""Losses of prompted (binary-mask) segmenters: SAM-UNet's focal + dice + IoU-regression objective.

``sam_unet_loss`` is the official ``FocalDiceloss_IoULoss`` of Hhankyangg/sam-unet
(``sam_unet/utils/loss.py``; "SAM-UNet", arXiv 2408.09886), the loss of SAM-Med2D:
``focal_weight * focal + dice + iou_weight * MSE(iou_pred, soft IoU)`` with
- focal (gamma 2, alpha 0.25): sum over every pixel of every mask of
  -alpha y (1 - p)^gamma log p - (1 - alpha)(1 - y) p^gamma log(1 - p), divided by the number of pixels;
- dice (smooth 1): 1 - (2 sum(p y) + 1) / (sum p + sum y + 1);
- soft IoU = (sum(p y) + 1e-7) / (sum p + sum y - sum(p y) + 1e-7), the target of each predicted IoU.
As the official code, the sums run over the whole batch (all masks together), not per mask. log p and
log(1 - p) are computed as log-sigmoids (the official ``log(p + 1e-12)`` differs only where p is within
1e-12 of 0 or 1). The official training script itself optimises ``focal + 20 * dice`` without the IoU
term (``FocalDiceloss``): ``focal_weight=1, dice_weight=20, iou_pred=None`` gives that.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sam_unet_loss(logits: jax.Array, masks: jax.Array, iou_pred: jax.Array | None = None, *,
                  focal_weight: float = 20.0, dice_weight: float = 1.0, iou_weight: float = 1.0,
                  gamma: float = 2.0, alpha: float = 0.25, smooth: float = 1.0) -> jax.Array:
    """Scalar loss of mask ``logits`` against binary ``masks`` of the same shape (e.g. (B, M, H, W));
    ``iou_pred`` (one predicted IoU per mask, e.g. (B, M)) adds the MSE term, None leaves it out."""
    if logits.shape != masks.shape:
        raise ValueError(f"mask logits and target masks must have the same shape; got {logits.shape} and {masks.shape}")
    x = logits.astype(jnp.float32)
    y = masks.astype(jnp.float32)
    p = jax.nn.sigmoid(x)
    focal = -(alpha * y * (1 - p) ** gamma * jax.nn.log_sigmoid(x)
              + (1 - alpha) * (1 - y) * p ** gamma * jax.nn.log_sigmoid(-x))
    focal = jnp.sum(focal) / (y.size + 1e-12)
    inter, total = jnp.sum(p * y), jnp.sum(p) + jnp.sum(y)
    dice = 1.0 - (2.0 * inter + smooth) / (total + smooth)
    loss = focal_weight * focal + dice_weight * dice
    if iou_pred is not None:
        iou = (inter + 1e-7) / (total - inter + 1e-7)
        loss = loss + iou_weight * jnp.mean((iou - iou_pred.astype(jnp.float32)) ** 2)
    return loss
