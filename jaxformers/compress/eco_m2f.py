"""ECO-M2F: early exit from Mask2Former's pixel-decoder encoder, chosen per image by a gate.

Paper: "Efficient Transformer Encoders for Mask2Former-style models", Yao et al., arXiv 2404.15244.
Official code: GYeow/ECO-M2F (``mask2former/modeling/pixel_decoder/gating.py``, ``msdeformattn.py``,
``mask2former/maskformer_model.py`` ``prepare_gating_targets``, ``mask2former/modeling/criterion.py``
``loss_gates``).

The model side is a field of Mask2Former (``jaxformers/models/mask2former.py``): ``num_gates=G``
adds the gate on the stride-32 encoder input tokens and each image runs ``argmax + L - G + 1``
encoder layers (``select_exits``); ``encoder_layers=k`` runs exactly k. This module holds the rest
of the recipe:

- ``pq_by_exit``: the derived data set, per-image PQ (fraction in [0, 1]) of every exit k.
- ``exit_targets``: the soft gate targets: utilities ``PQ_k - k * beta`` (k = 1..G, the official
  ``np.arange(1, 6) * slop``), then a softmax. The official code takes that softmax over dim 0 of
  the (batch, G) target tensor, i.e. **over the images of the batch, per exit** (``axis=0``, the
  default here); ``axis=-1`` normalises over the exits of each image instead (the paper's
  per-image utility reading). With axis 0 and batch 1 every target is 1 and the loss is constant.
- ``gate_loss``: MSE between ``softmax(gate_logits, axis)`` and the targets (official
  ``nn.MSELoss()(F.softmax(gates, dim=0), targets)``; the hard-target cross-entropy is commented out
  there).
- ``encoder_flops``: XLA's ``cost_analysis`` FLOPs of the model at each exit.

- ``eco_m2f_loss``: the training objective as the official ``maskformer_model.py`` forms it: the
  Mask2Former losses plus ``gate_weight`` (``GATE_WEIGHT``, 1.0) times the gate loss, all multiplied
  by ``exit_loss_weight`` = the number of encoder layers run + 2 (``encoder.i_exit + 2``: 4..8 for 6
  layers and 5 gates). ``jaxformers.segmentation.mask2former_loss`` applies the same factor by
  default to a gated model's outputs (``Mask2FormerLossConfig.exit_weighting``), so the panoptic
  task of ``train/tasks_seg.py`` trains a gated Mask2Former with it.

Deviations: the official encoder takes one exit for the whole batch (its flattened argmax, right for
batch 1); with an exit per image the factor is the mean over the batch of exit + 2. The official PQ
tables are files per exit from a separate evaluation run; ``pq_by_exit`` computes them in memory.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.models.mask2former import select_exits
from jaxformers.segmentation.losses import Mask2FormerLossConfig, exit_loss_weight, mask2former_loss

__all__ = ["eco_m2f_loss", "encoder_flops", "exit_loss_weight", "exit_targets", "gate_loss", "per_image_pq",
           "pq_by_exit", "select_exits"]


def exit_targets(pq_table: Any, beta: float, axis: int = 0) -> jax.Array:
    """Soft gate targets (B, G) from per-image PQ at each exit (B, G), columns k = 1..G shallow to
    deep: ``softmax(PQ_k - k * beta, axis)``; ``axis=0`` (over the batch) is the official choice."""
    pq = jnp.asarray(pq_table, jnp.float32)
    if pq.ndim != 2:
        raise ValueError(f"pq_table must be (images, exits); got shape {pq.shape}")
    utility = pq - beta * jnp.arange(1, pq.shape[1] + 1, dtype=jnp.float32)
    return jax.nn.softmax(utility, axis=axis)


def gate_loss(gate_logits: jax.Array, targets: jax.Array, axis: int = 0) -> jax.Array:
    """Mean squared error between ``softmax(gate_logits, axis)`` and ``targets`` (both (B, G))."""
    if gate_logits.shape != targets.shape:
        raise ValueError(f"gate logits {gate_logits.shape} and targets {targets.shape} differ in shape")
    probs = jax.nn.softmax(gate_logits.astype(jnp.float32), axis=axis)
    return jnp.mean(jnp.square(probs - targets.astype(jnp.float32)))


def eco_m2f_loss(outputs: dict, panoptic: jax.Array, segment_classes: jax.Array, segment_crowd: jax.Array,
                 rng: jax.Array, cfg: Mask2FormerLossConfig, gate_targets: jax.Array | None = None,
                 gate_weight: float = 1.0, axis: int = 0) -> tuple[jax.Array, dict]:
    """ECO-M2F's training loss for a gated Mask2Former's outputs (``gate_logits``, ``encoder_exit``):
    ``(exit + 2) * (mask2former losses + gate_weight * gate_loss(gate_logits, gate_targets, axis))``
    (``exit_loss_weight``; with ``cfg.exit_weighting=False`` the factor is left out). Without
    ``gate_targets`` the gate term is left out (the gate then trains on its own, as
    ``benchmarks/eco_m2f.py`` does). Parts: ``mask2former_loss``'s, ``loss_gate``, ``exit_weight``."""
    if "encoder_exit" not in outputs or "gate_logits" not in outputs:
        raise ValueError("eco_m2f_loss needs a gated Mask2Former's outputs (num_gates > 0: gate_logits, "
                         f"encoder_exit); got {sorted(outputs)}")
    total, parts = mask2former_loss({k: v for k, v in outputs.items() if k != "encoder_exit"}, panoptic,
                                    segment_classes, segment_crowd, rng, cfg)
    if gate_targets is not None:
        parts["loss_gate"] = gate_loss(outputs["gate_logits"], gate_targets, axis)
        total = total + gate_weight * parts["loss_gate"]
    if cfg.exit_weighting:
        parts["exit_weight"] = exit_loss_weight(outputs["encoder_exit"])
        total = total * parts["exit_weight"]
    return total, parts


def per_image_pq(stats: dict) -> np.ndarray:
    """PQ (fraction) of each image from per-image, per-class counts ``tp``/``fp``/``fn``/``iou`` (B, C),
    as ``panoptic_quality_stats(..., reduce=False)`` gives: the mean over the classes that occur
    (tp + fp + fn > 0) of iou / (tp + fp/2 + fn/2); 1.0 for an image with no segment at all."""
    tp, fp, fn, iou = (np.asarray(stats[k], np.float64) for k in ("tp", "fp", "fn", "iou"))
    denom = tp + 0.5 * fp + 0.5 * fn
    present = denom > 0
    pq = np.where(present, iou / np.maximum(denom, 1e-12), 0.0)
    n = present.sum(-1)
    return np.where(n > 0, pq.sum(-1) / np.maximum(n, 1), 1.0)


def pq_by_exit(module, variables: Any, batch: dict, task, exits: Sequence[int],
               apply: Callable | None = None) -> np.ndarray:
    """Per-image PQ (B, len(exits)) of ``module`` run with ``encoder_layers=k`` for each k in ``exits``.

    ``batch``: ``image``, ``panoptic``, ``segment_classes``, ``segment_crowd`` (the panoptic task's
    fields, ``train/tasks_seg.py``); ``task``: an object with ``predict(outputs, image_size)`` and
    ``num_classes`` (``PanopticSegmentationTask``)."""
    from jaxformers.segmentation import panoptic_quality_stats

    def run(v, x, k):
        out = module.apply(v, x, encoder_layers=k)
        pred = task.predict(out, x.shape[1:3])
        return panoptic_quality_stats(pred["panoptic"], pred["segment_classes"], batch["panoptic"],
                                      batch["segment_classes"], batch["segment_crowd"], task.num_classes,
                                      reduce=False)

    apply = apply or jax.jit(run, static_argnums=2)
    return np.stack([per_image_pq(jax.device_get(apply(variables, batch["image"], int(k)))) for k in exits], 1)


def encoder_flops(module, variables: Any, x: jax.Array, exits: Sequence[int]) -> dict[int, float]:
    """FLOPs (XLA ``cost_analysis`` of the compiled forward) of the encoder's first k layers for each
    k in ``exits``: the model's FLOPs at k minus its FLOPs with no encoder layer."""
    def flops(k):
        compiled = jax.jit(lambda v, a: module.apply(v, a, encoder_layers=k)).lower(variables, x).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    base = flops(0)
    return {int(k): flops(int(k)) - base for k in exits}
