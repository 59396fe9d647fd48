"""Wide attention: trade depth for width with the total number of attention heads fixed.

Paper: "Wide Attention Is The Way Forward For Transformers?", Brown, Zhao, Shumailov, Mullins,
arXiv 2210.00640 (no official code found). The paper's aspect-ratio study keeps the total number
of heads, the head width and every other hyperparameter constant and moves heads from depth
(layers) into width (heads per layer); its single-layer models matched or beat deep ones on
average and ran faster with fewer parameters (the FFN and norms count once per layer).

:func:`aspect_ratio_configs` lists the (depth, heads per layer) pairs for a head total;
:func:`widen` rebuilds any model that has ``depth`` and ``num_heads`` fields (and keeps its
``head_dim`` when it has one) at a given depth. The byte-level text host is
``jaxformers.models.wide_attention`` (``wide_attention_lra_text_deep`` / ``_wide``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

__all__ = ["aspect_ratio_configs", "widen"]


def aspect_ratio_configs(total_heads: int) -> list[tuple[int, int]]:
    """Every (depth, heads per layer) with depth x heads = ``total_heads``, deepest first."""
    if total_heads < 1:
        raise ValueError(f"total_heads must be >= 1, got {total_heads}")
    return [(d, total_heads // d) for d in range(total_heads, 0, -1) if total_heads % d == 0]


def widen(model: nn.Module, depth: int, **overrides: Any) -> nn.Module:
    """``model`` with ``depth`` layers and the same total number of heads (heads per layer scaled)."""
    for field in ("depth", "num_heads"):
        if not hasattr(model, field):
            raise TypeError(f"{type(model).__name__} has no {field!r} field: widen needs depth and num_heads")
    total = model.depth * model.num_heads
    if depth < 1 or total % depth:
        raise ValueError(f"depth={depth} does not divide the total of {total} heads "
                         f"(valid depths: {[d for d, _ in aspect_ratio_configs(total)]})")
    return model.clone(depth=depth, num_heads=total // depth, **overrides)
