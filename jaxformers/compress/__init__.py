"""Compression methods as transforms of any registered model (a config field or a function over
``(module, variables)``): ``jaxformers.compress.binary`` (BiBERT, BiPFT, BiViT, BiPer, packed 1-bit
inference), ``jaxformers.compress.distill`` (distillation losses)."""
