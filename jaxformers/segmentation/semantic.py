"""Per-pixel (semantic) segmentation pieces shared by the dense heads that predict one class map
(UperNet-style heads, real-time segmenters, mask decoders with a class per pixel).

``semantic_cross_entropy``: softmax cross-entropy over classes at every pixel, ignoring ``ignore_index``
(``VOID`` = 255, as ``torch.nn.CrossEntropyLoss(ignore_index=255)`` in mmsegmentation), averaged over
the labelled pixels; logits at a lower resolution than the labels are first resized bilinearly
(``align_corners=False``, as mmsegmentation's ``resize`` before the loss).
``semantic_prediction``: the arg-max class map at the labels' resolution.
``ohem_cross_entropy``: the cross-entropy of the hard pixels only (online hard example mining).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxformers.segmentation.targets import VOID


def resize_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w, C) -> (B, H, W, C) bilinear, half-pixel centres (``align_corners=False``), no antialiasing."""
    if logits.ndim != 4:
        raise ValueError(f"semantic logits must be (batch, height, width, classes), got shape {logits.shape}")
    if tuple(logits.shape[1:3]) == tuple(size):
        return logits
    b, _, _, c = logits.shape
    return jax.image.resize(logits, (b, *size, c), "bilinear", antialias=False)


def semantic_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = VOID) -> jax.Array:
    """Mean cross-entropy of (B, h, w, C) ``logits`` against (B, H, W) integer ``labels`` over the pixels
    whose label is not ``ignore_index``; 0 when no pixel is labelled."""
    if labels.ndim != 3 or logits.ndim != 4 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits (B, h, w, C) and labels (B, H, W), got {logits.shape} and {labels.shape}")
    logits = resize_logits(logits, labels.shape[1:])
    valid = labels != ignore_index
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, labels, 0))
    return jnp.sum(loss * valid) / jnp.maximum(valid.sum(), 1)


def semantic_prediction(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w, C) logits -> (B, H, W) int32 class map at ``size``."""
    return jnp.argmax(resize_logits(logits, size), axis=-1).astype(jnp.int32)


def ohem_cross_entropy(logits: jax.Array, labels: jax.Array, *, threshold: float = 0.9, min_kept: int = 131072,
                       ignore_index: int = VOID) -> jax.Array:
    """Online hard example mining cross-entropy (OHEM; HRNet-Semantic-Segmentation's ``OhemCrossEntropy``,
    as the P2AT and PIDNet training code compute it): the mean cross-entropy of (B, h, w, C) ``logits``
    (resized to the labels as in :func:`semantic_cross_entropy`) over the labelled pixels whose softmax
    probability of their own class is below ``max(threshold, p_k)``, where ``p_k`` is the
    ``min(min_kept, n - 1)``-th smallest of those probabilities over the whole batch (0-based, n
    labelled pixels): the hard pixels, and at least ``min_kept`` of them where the batch has that
    many (ties aside). 0 when no pixel is kept."""
    if labels.ndim != 3 or logits.ndim != 4 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits (B, h, w, C) and labels (B, H, W), got {logits.shape} and {labels.shape}")
    if min_kept < 1:
        raise ValueError(f"min_kept must be at least 1, got {min_kept}")
    logits = resize_logits(logits, labels.shape[1:]).astype(jnp.float32)
    valid = labels != ignore_index
    target = jnp.where(valid, labels, 0)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    prob = jnp.take_along_axis(jax.nn.softmax(logits, -1), target[..., None], -1)[..., 0]
    prob = jax.lax.stop_gradient(jnp.where(valid, prob, jnp.inf))
    ordered = jnp.sort(prob.ravel())
    k = jnp.minimum(min_kept, valid.sum() - 1)
    cut = jnp.maximum(ordered[jnp.maximum(k, 0)], threshold)
    kept = valid & (prob < cut)
    return jnp.sum(loss * kept) / jnp.maximum(kept.sum(), 1)
