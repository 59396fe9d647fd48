"""From per-query (class, mask) predictions to panoptic and semantic maps, batched and jittable.

``panoptic_inference`` follows the official Mask2Former ``panoptic_inference`` (and kMaX-DeepLab's
post-processing through its own thresholds): keep queries whose best class is not "no object"
and scores above ``object_threshold``; every pixel goes to the kept query of highest score x mask
probability; a query keeps its pixels only where its own mask probability is >= 0.5 and only if
that is at least ``overlap_threshold`` of its own mask (>= 0.5) area; all queries of one stuff
class are merged into one segment. The result is a map of segment ids (0 = void: no query)
whose segment k has class ``classes[k - 1]``; ids are query indices + 1 (merged stuff takes the
id of its first query).

``semantic_inference``: argmax over classes of sum_q p(class | q) * mask_q (Mask2Former's
``semantic_inference``).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxformers.layers.interpolate import resize_bilinear


def upsample_masks(mask_logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, Q, h, w) -> (B, Q, H, W) bilinear (``align_corners=False``)."""
    return resize_bilinear(mask_logits.transpose(0, 2, 3, 1), size).transpose(0, 3, 1, 2)


def panoptic_inference(class_probs: jax.Array, mask_probs: jax.Array, thing_classes: Sequence[int], *,
                       object_threshold: float = 0.8, overlap_threshold: float = 0.8
                       ) -> tuple[jax.Array, jax.Array]:
    """class_probs (B, Q, C+1) (last = no object), mask_probs (B, Q, H, W) in [0, 1] ->
    (segment ids (B, H, W) int32 in 0..Q, segment classes (B, Q) int32, -1 for ids not used)."""
    class_probs, mask_probs = jnp.asarray(class_probs), jnp.asarray(mask_probs)
    b, q, c1 = class_probs.shape
    num_classes = c1 - 1
    scores = class_probs.max(-1)
    labels = class_probs.argmax(-1)
    keep = (labels != num_classes) & (scores > object_threshold)
    prob = jnp.where(keep[:, :, None, None], scores[:, :, None, None] * mask_probs, -1.0)
    owner = prob.argmax(1)  # (B, H, W)
    onehot = owner[:, None] == jnp.arange(q)[None, :, None, None]  # (B, Q, H, W)
    fg = mask_probs >= 0.5
    mask = onehot & fg
    mask_area = onehot.sum((-2, -1))
    original_area = fg.sum((-2, -1))
    final_area = mask.sum((-2, -1))
    ok = keep & (mask_area > 0) & (original_area > 0) & (final_area > 0)
    ok &= mask_area >= overlap_threshold * original_area
    is_thing = jnp.isin(labels, jnp.asarray(list(thing_classes), jnp.int32))
    # Stuff: every kept query of a class maps to the first kept query of that class.
    same = (labels[:, :, None] == labels[:, None, :]) & ok[:, None, :] & ~is_thing[:, :, None]
    first = jnp.where(same, jnp.arange(q)[None, None, :], q).min(-1)
    canonical = jnp.where(is_thing | (first == q), jnp.arange(q)[None, :], first)
    seg_of_query = jnp.where(ok, canonical + 1, 0)  # (B, Q)
    pixel_query = owner
    pixel_ok = jnp.take_along_axis(mask, pixel_query[:, None], axis=1)[:, 0]
    ids = jnp.take_along_axis(seg_of_query, pixel_query.reshape(b, -1), axis=1).reshape(owner.shape)
    ids = jnp.where(pixel_ok, ids, 0).astype(jnp.int32)
    used = jnp.zeros((b, q + 1), bool).at[jnp.arange(b)[:, None], seg_of_query].set(True)[:, 1:]
    classes = jnp.where(used, labels, -1).astype(jnp.int32)
    return ids, classes


def semantic_inference(class_probs: jax.Array, mask_probs: jax.Array) -> jax.Array:
    """class_probs (B, Q, C+1), mask_probs (B, Q, H, W) -> class map (B, H, W) int32."""
    scores = jnp.einsum("bqc,bqhw->bchw", class_probs[..., :-1], mask_probs)
    return scores.argmax(1).astype(jnp.int32)


def mask2former_probs(outputs: dict, image_size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Mask2Former: softmax class probabilities and sigmoid masks upsampled to the image."""
    class_probs = jax.nn.softmax(outputs["class_queries_logits"].astype(jnp.float32), -1)
    masks = upsample_masks(outputs["masks_queries_logits"].astype(jnp.float32), image_size)
    return class_probs, jax.nn.sigmoid(masks)
