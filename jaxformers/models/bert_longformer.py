"""Longformer-style self-attention for ``Bert(attention_window=w, global_tokens=g)``.

Each token attends to its ±w neighbours (sliding window, Beltagy et al. 2020, arXiv 2004.05150)
and the first g tokens of every row are global (attend to and are attended by all tokens), all
inside packed segments, through ``jaxformers.kernels.local_global_attention`` (block-sparse Pallas
kernel on GPU/TPU, its plain-jnp reference on CPU), plugged into ``MultiHeadAttention`` as its
``attention_fn``: the parameters stay ``qkv`` (E, 3, H, D) and ``proj`` (H, D, E), so a dense BERT
checkpoint loads unchanged and the model can switch between dense and local attention.

Deviations from Longformer: global tokens are the first ``g`` of a row (a static count, not a
per-token mask), they reuse the local q/k/v projections (Longformer has separate global ones),
and attention-probability dropout is not applied on this path (the kernel has none).
"""
from __future__ import annotations

import functools
from typing import Callable

_KERNEL_IMPL = {"xla": "xla", "pallas": "pallas", "auto": "auto", "cudnn": "auto"}


def longformer_attention_fn(window: int, global_tokens: int = 0, attention_impl: str = "xla") -> Callable:
    """``MultiHeadAttention.attention_fn`` for ±``window`` sliding windows + ``global_tokens``."""
    from jaxformers.kernels import local_global_attention

    if window < 0:
        raise ValueError(f"attention_window must be >= 0, got {window}")
    if global_tokens < 0:
        raise ValueError(f"global_tokens must be >= 0, got {global_tokens}")
    return functools.partial(local_global_attention, window=(window, window), global_tokens=global_tokens,
                             implementation=_KERNEL_IMPL[attention_impl])
