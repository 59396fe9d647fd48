"""Compression of any jaxformers model: quantisation (and, as they land, binarisation, pruning,
distillation), each paper a transform of a module and its variables, never a forked model file.

- ``quantize(module, variables, scheme, calibration=batches)``: the one entry; ``schemes()`` lists
  them (``"w8a8"``: the paper-faithful simulation of "Quantizable Transformers"; ``"int8-*"``:
  deployment int8 through qwix; ``"bct"``: blockwise compression, BCT).
- ``outlier_preset`` / ``OUTLIER_PRESETS`` (clipped softmax, gated attention) and
  ``outlier_metrics`` (infinity norms, kurtosis) of "Quantizable Transformers".
- ``variable_bytes``: what quantised variables really occupy.
- ``compress(module, variables, batches, ...)``: the survey's pipeline, quantise -> prune (a hook:
  ``register_pruner``) -> distil -> deploy int8, with a measured report per stage.

Each submodule registers its schemes on import; add yours with ``register_scheme`` below.
"""
from jaxformers.compress.quantize import (DEFAULT_KEEP_FLOAT, QuantizedModel, float32_bytes, quantize,
                                          register_scheme, schemes, variable_bytes)
from jaxformers.compress import w8a8 as _w8a8  # noqa: F401  (registers "w8a8")
from jaxformers.compress import deploy as _deploy  # noqa: F401  (registers the "int8-*" schemes)
from jaxformers.compress import bct as _bct  # noqa: F401  (registers "bct")
from jaxformers.compress.outliers import (OUTLIER_PRESETS, clipped_softmax_alpha, inf_norm, kurtosis,
                                          outlier_metrics, outlier_preset)
from jaxformers.compress.pipeline import compress, pruners, register_pruner

__all__ = ["DEFAULT_KEEP_FLOAT", "OUTLIER_PRESETS", "QuantizedModel", "clipped_softmax_alpha", "compress",
           "float32_bytes", "inf_norm", "kurtosis", "outlier_metrics", "outlier_preset", "pruners", "quantize",
           "register_pruner", "register_scheme", "schemes", "variable_bytes"]
