"""Segmentation tasks for ``train/``: panoptic (and with it semantic) segmentation with mask
transformers, on the embedded generated data set (``train/seg_data.py``) or any source of the same
fields.

Importing this module (the segmentation configs do) registers the task ``panoptic_segmentation``
and the embedded data set ``panoptic_shapes``.

A batch holds (see ``jaxformers.segmentation.targets``): ``image`` float32 (H, W, 3), ``semantic``
int32 (H, W) (255 = void), ``panoptic`` int32 (H, W) (segment ids, 0 = void), ``segment_classes``
int32 (S,) (-1 = unused slot) and ``segment_crowd`` int32 (S,). The model's criterion
(``criterion``: ``"mask2former"`` or ``"kmax"``) gives the loss and the probabilities inference
reads; evaluation sums per-class panoptic-quality and IoU counts over the eval set (exact, any
batch size) and ``finish_eval`` turns them into PQ / SQ / RQ (all, things, stuff) and mIoU.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.segmentation import (Mask2FormerLossConfig, check_panoptic, mask2former_loss, mask2former_probs,
                                     panoptic_inference, panoptic_quality_stats, pq_summary, semantic_inference,
                                     semantic_stats)
from jaxformers.segmentation.kmax_loss import KMaXLossConfig, kmax_loss, kmax_probs
from jaxformers.segmentation.metrics import miou
from train import seg_data  # noqa: F401  (registers the embedded data set)
from train.input_pipeline import Field
from train.tasks import Batch, Task, register_task

# criterion name -> (make loss config, loss(outputs, batch, rng, cfg), probs(outputs, image_size))
CRITERIA: dict[str, tuple[Callable, Callable, Callable]] = {}


def register_criterion(name: str, make_config: Callable, loss: Callable, probs: Callable) -> None:
    CRITERIA[name] = (make_config, loss, probs)


def _m2f_loss(outputs, batch, rng, cfg):
    return mask2former_loss(outputs, batch["panoptic"], batch["segment_classes"], batch["segment_crowd"], rng, cfg)


register_criterion("mask2former", Mask2FormerLossConfig, _m2f_loss, mask2former_probs)


def _kmax_loss(outputs, batch, rng, cfg):
    return kmax_loss(outputs, batch["panoptic"], batch["segment_classes"], batch["segment_crowd"], rng, cfg)


register_criterion("kmax", KMaXLossConfig, _kmax_loss, kmax_probs)


@register_task("panoptic_segmentation")
class PanopticSegmentationTask(Task):
    """Panoptic segmentation with a mask-classification model (Mask2Former, kMaX-DeepLab...).

    ``num_classes`` / ``thing_classes``: the data set's classes (things are instances, the rest
    stuff); ``criterion`` and ``criterion_args``: the model's loss (e.g. ``num_points``); inference
    thresholds as the official post-processing."""

    loss_uses_rng = True

    def __init__(self, num_classes: int, thing_classes: Sequence[int], criterion: str = "mask2former",
                 criterion_args: dict | None = None, max_segments: int = seg_data.MAX_SEGMENTS,
                 object_threshold: float = 0.8, overlap_threshold: float = 0.8):
        if criterion not in CRITERIA:
            raise ValueError(f"criterion {criterion!r} is not one of {sorted(CRITERIA)}")
        bad = [c for c in thing_classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"thing_classes {bad} are outside [0, num_classes={num_classes})")
        make_config, self._loss, self._probs = CRITERIA[criterion]
        self.cfg = make_config(num_classes=num_classes, **dict(criterion_args or {}))
        self.num_classes, self.thing_classes = num_classes, tuple(int(c) for c in thing_classes)
        self.object_threshold, self.overlap_threshold = object_threshold, overlap_threshold
        self.fields = {"image": Field("float32", (None, None, 3)), "semantic": Field("int32", (None, None)),
                       "panoptic": Field("int32", (None, None)), "segment_classes": Field("int32", (max_segments,)),
                       "segment_crowd": Field("int32", (max_segments,))}

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return (batch["image"],)

    def _check(self, batch: Batch) -> None:
        check_panoptic(batch["panoptic"], batch["segment_classes"], batch["segment_crowd"],
                       num_classes=self.num_classes, image_shape=batch["image"].shape, semantic=batch["semantic"])

    def loss(self, outputs: Any, batch: Batch, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        self._check(batch)
        rng = jax.random.key(0) if rng is None else rng
        return self._loss(outputs, batch, rng, self.cfg)

    def predict(self, outputs: Any, image_size: tuple[int, int]) -> dict[str, jax.Array]:
        """``panoptic`` ids (B, H, W), ``segment_classes`` (B, Q) and ``semantic`` (B, H, W) maps."""
        class_probs, mask_probs = self._probs(outputs, image_size)
        ids, classes = panoptic_inference(class_probs, mask_probs, self.thing_classes,
                                          object_threshold=self.object_threshold,
                                          overlap_threshold=self.overlap_threshold)
        return {"panoptic": ids, "segment_classes": classes, "semantic": semantic_inference(class_probs, mask_probs)}

    def eval_sums(self, outputs: Any, batch: Batch) -> dict[str, jax.Array]:
        self._check(batch)
        pred = self.predict(outputs, batch["image"].shape[1:3])
        w = batch["mask"].astype(jnp.float32)
        per_image = panoptic_quality_stats(pred["panoptic"], pred["segment_classes"], batch["panoptic"],
                                           batch["segment_classes"], batch["segment_crowd"], self.num_classes,
                                           reduce=False)
        sem = jax.vmap(lambda p, g: semantic_stats(p, g, self.num_classes))(pred["semantic"], batch["semantic"])
        sums = {"count": jnp.sum(w)}
        for name, v in {**per_image, **sem}.items():
            total = jnp.einsum("b,bc->c", w, v)
            sums.update({f"{name}/{c}": total[c] for c in range(self.num_classes)})
        return sums

    def finish_eval(self, means: dict[str, float]) -> dict[str, float]:
        """Per-class sums (as averaged by the trainer) -> PQ, SQ, RQ (all / things / stuff) and mIoU, in %."""
        def per_class(name):
            return np.asarray([means[f"{name}/{c}"] for c in range(self.num_classes)])

        stats = {k: per_class(k) for k in ("tp", "fp", "fn", "iou")}
        out = {k: v for k, v in pq_summary(stats, self.thing_classes, self.num_classes).items() if not k.startswith("n")}
        out["mIoU"] = miou({k: per_class(k) for k in ("intersection", "union")})
        kept = {k: v for k, v in means.items()
                if not any(k.startswith(f"{n}/") for n in ("tp", "fp", "fn", "iou", "intersection", "union"))}
        return {**kept, **out}
