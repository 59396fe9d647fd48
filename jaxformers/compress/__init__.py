"""Compression methods as transforms of any registered model (a config field or a function over
``(module, variables)``), never forked model files.

Quantisation:

- ``quantize(module, variables, scheme, calibration=batches)``: the one entry; ``schemes()`` lists
  them (``"w8a8"``: the paper-faithful simulation of "Quantizable Transformers"; ``"int8-*"``:
  deployment int8 through qwix; ``"bct"``: blockwise compression, BCT). Each submodule registers its
  schemes on import; add yours with ``register_scheme``.
- ``outlier_preset`` / ``OUTLIER_PRESETS`` (clipped softmax, gated attention) and
  ``outlier_metrics`` (infinity norms, kurtosis) of "Quantizable Transformers".
- ``variable_bytes``: what quantised variables really occupy.
- ``compress(module, variables, batches, ...)``: the survey's pipeline, quantise -> prune (a hook:
  ``register_pruner``) -> distil -> deploy int8, with a measured report per stage.

Binarisation and distillation: ``jaxformers.compress.binary`` (BiBERT, BiPFT, BiViT, BiPer, packed
1-bit inference), ``jaxformers.compress.distill`` (distillation losses).

Efficiency transforms, each in its own module: ``token_reduction`` (Token Transforming, ToMe,
pruning by [CLS] attention), ``ia_red`` (IA-RED^2), ``ecoformer`` (kernelized hashing + linear
attention), ``dsformer`` (dense x N:M sparse factorization), ``axformer`` (accuracy-driven pruning,
top-k hard attention), ``ofb`` (Once-for-Both search), ``wide`` (wide-attention configurations).
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
