"""BERT's dynamic masked-LM corruption on NumPy id arrays (for the method recipes' pretraining).

``mask_tokens(ids, rng, mask_id=..., vocab_size=...)``: ``rate`` of the maskable tokens (not
special, not padding) become targets (at least one per row that has any); of those 80% are replaced
by the mask id, 10% by a random id and 10% kept; labels hold the original ids at targets and
``ignore_index`` (-100, PyTorch's CrossEntropyLoss default) elsewhere.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
import optax


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *, mask_id: int, vocab_size: int,
                special_ids: Sequence[int] = (), rate: float = 0.15, ignore_index: int = -100,
                random_low: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted ids, labels) for an int array (B, L); ``random_low`` is the smallest random id."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    ids = np.array(ids)
    maskable = ~np.isin(ids, np.asarray(list(special_ids), ids.dtype))
    chosen = maskable & (rng.random(ids.shape) < rate)
    for row in np.flatnonzero(maskable.any(1) & ~chosen.any(1)):  # at least one target per row
        chosen[row, rng.choice(np.flatnonzero(maskable[row]))] = True
    labels = np.where(chosen, ids, ignore_index)
    roll = rng.random(ids.shape)
    ids = np.where(chosen & (roll < 0.8), mask_id, ids)
    random_ids = rng.integers(random_low, vocab_size, ids.shape)
    ids = np.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, ids)
    return ids.astype(np.int32), labels.astype(np.int32)


def mlm_cross_entropy(logits, labels, ignore_index: int = -100):
    """Mean cross-entropy over target tokens (labels != ignore_index), PyTorch's CrossEntropyLoss."""
    keep = labels != ignore_index
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(keep, labels, 0))
    return jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.maximum(keep.sum(), 1)
