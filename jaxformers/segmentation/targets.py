"""Panoptic targets: the batch layout every segmentation model and metric here reads.

A panoptic example is
- ``panoptic`` int32 (H, W): segment index per pixel, 1..S, 0 = void (unlabelled);
- ``segment_classes`` int32 (S,): the class of segment k+1, -1 for an unused slot;
- ``segment_crowd`` int32 (S,): 1 for a crowd region (a group of things annotated as one segment,
  COCO's ``iscrowd``);
- ``semantic`` int32 (H, W): class per pixel, ``VOID`` (255) for unlabelled pixels.

Models take the images; the losses read ``panoptic`` / ``segment_classes`` / ``segment_crowd``
through ``panoptic_targets``; the metrics read all of them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

VOID = 255  # semantic label of unlabelled pixels


def _concrete(x) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_panoptic(panoptic, segment_classes, segment_crowd=None, *, num_classes: int | None = None,
                   image_shape: tuple[int, ...] | None = None, semantic=None) -> None:
    """Clear errors for targets that do not fit: maps whose size differs from the image, segment
    ids beyond the segment table, class ids outside [0, num_classes) (values are checked only when
    the arrays are concrete, i.e. outside ``jit``)."""
    pshape, cshape = np.shape(panoptic), np.shape(segment_classes)
    if len(pshape) < 2 or len(cshape) < 1 or pshape[:-2] != cshape[:-1]:
        raise ValueError(f"panoptic must be (..., H, W) segment ids and segment_classes (..., S) with the same leading "
                         f"axes; got {pshape} and {cshape}")
    if segment_crowd is not None and np.shape(segment_crowd) != cshape:
        raise ValueError(f"segment_crowd must have segment_classes' shape {cshape}; got {np.shape(segment_crowd)}")
    if image_shape is not None and tuple(pshape[-2:]) != tuple(image_shape[-3:-1]):
        raise ValueError(f"the panoptic map is {pshape[-2]}x{pshape[-1]} but the image is "
                         f"{image_shape[-3]}x{image_shape[-2]}: masks must have the image's size")
    if semantic is not None and np.shape(semantic) != pshape:
        raise ValueError(f"semantic map {np.shape(semantic)} and panoptic map {pshape} differ in shape")
    pan, cls = _concrete(panoptic), _concrete(segment_classes)
    if pan is not None and pan.size and (pan.min() < 0 or pan.max() > cshape[-1]):
        raise ValueError(f"panoptic holds segment ids in [{pan.min()}, {pan.max()}] but the segment table has "
                         f"{cshape[-1]} slots (ids 1..{cshape[-1]}, 0 = void)")
    if num_classes is not None and cls is not None and cls.size:
        bad = cls[(cls < -1) | (cls >= num_classes)]
        if bad.size:
            raise ValueError(f"segment_classes holds class id(s) {sorted(set(bad.tolist()))[:8]} outside "
                             f"[0, {num_classes}) (-1 marks an unused slot)")
    sem = _concrete(semantic) if semantic is not None else None
    if num_classes is not None and sem is not None and sem.size:
        bad = sem[(sem != VOID) & ((sem < 0) | (sem >= num_classes))]
        if bad.size:
            raise ValueError(f"semantic holds class id(s) {sorted(set(bad.tolist()))[:8]} outside [0, {num_classes}) "
                             f"(void is {VOID})")


def panoptic_targets(panoptic: jax.Array, segment_classes: jax.Array, segment_crowd: jax.Array | None = None,
                     dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(masks (B, S, H, W) of 0/1, classes (B, S) int32 (0 where unused), valid (B, S) bool): the
    segments a model is trained to predict: a class, not a crowd region, at least one pixel."""
    check_panoptic(panoptic, segment_classes, segment_crowd)
    s = segment_classes.shape[-1]
    ids = jnp.arange(1, s + 1, dtype=panoptic.dtype)
    masks = (panoptic[:, None, :, :] == ids[None, :, None, None]).astype(dtype)
    valid = (segment_classes >= 0) & (masks.sum((-2, -1)) > 0)
    if segment_crowd is not None:
        valid &= segment_crowd == 0
    return masks, jnp.maximum(segment_classes, 0).astype(jnp.int32), valid
