"""Input validation: bad input fails with a message naming the argument, expectation and value,
before any tracing reaches XLA."""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp


def check_image(
    x,
    *,
    in_chans: int,
    img_size: int | Sequence[int] | None = None,
    divisible_by: int | Sequence[int] | None = None,
    what: str = "image",
    name: str = "x",
) -> tuple[int, int]:
    """Checks an NHWC float image batch; returns its (H, W).

    ``img_size`` (when given) must match exactly (models with fixed position tables);
    ``divisible_by`` is the patch size or other stride H and W must be multiples of.
    """
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"{name} must be an NHWC {what} batch of rank 4 (batch, height, width, "
                         f"{in_chans}); got shape {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point {what} (float32/bfloat16/float16); got dtype "
                        f"{x.dtype}. Convert uint8 images with x.astype(jnp.float32) and normalise first.")
    _, h, w, c = shape
    if c != in_chans:
        raise ValueError(f"{name} has {c} channels in its last axis but the model expects in_chans="
                         f"{in_chans} (images are NHWC: (batch, height, width, channels))")
    if img_size is not None:
        eh, ew = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if (h, w) != (eh, ew):
            raise ValueError(f"{name} is {h}x{w} but the model was built for img_size={eh}x{ew}; "
                             f"create it with img_size=({h}, {w}) (position embeddings are resampled "
                             f"by load_pretrained)")
    if divisible_by is not None:
        dh, dw = (divisible_by, divisible_by) if isinstance(divisible_by, int) else tuple(divisible_by)
        if h % dh or w % dw:
            raise ValueError(f"{name} is {h}x{w}, but height and width must be divisible by {dh}x{dw}")
    return h, w


def check_token_ids(ids, *, vocab_size: int | None = None, max_len: int | None = None, name: str = "input_ids"):
    """Checks a (batch, length) integer id array against the vocabulary and position table.

    Out-of-vocabulary ids are checked only on concrete (non-traced) arrays."""
    shape = getattr(ids, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{name} must be (batch, length) integer token ids; got shape {shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer token ids; got dtype {ids.dtype}")
    if max_len is not None and shape[1] > max_len:
        raise ValueError(f"{name} has length {shape[1]} but the position table holds {max_len} positions")
    if vocab_size is not None:
        try:
            lo, hi = int(ids.min()), int(ids.max())
        except Exception:  # traced: cannot look at values
            return
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} holds ids in [{lo}, {hi}] but the vocabulary has {vocab_size} entries "
                             f"(valid ids 0..{vocab_size - 1})")
