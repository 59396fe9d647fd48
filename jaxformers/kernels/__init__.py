"""Pallas kernels with plain-jnp references: one folder per op (``api.py`` is its public function).

- ``bi_level_routing_attention``: BiFormer's sparse region attention.
- ``local_global_attention``: sliding windows + global tokens + block-diagonal groups + packed
  segments (FIT, Longformer, padding-free BERT), also the ``"pallas"`` path of dense attention.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "bi_level_routing_attention": "jaxformers.kernels.bi_level_routing.api",
    "local_global_attention": "jaxformers.kernels.local_global.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxformers.kernels' has no attribute {name!r}")
