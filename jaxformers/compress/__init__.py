"""Compression methods as transforms of any registered model (a config field or a function over
``(module, variables)``): ``jaxformers.compress.binary`` (BiBERT, BiPFT, BiViT, BiPer, packed 1-bit
inference), ``jaxformers.compress.distill`` (distillation losses).

Efficiency transforms (issue 26), each in its own module:
``token_reduction`` (Token Transforming, ToMe, pruning by [CLS] attention), ``ia_red`` (IA-RED^2),
``ecoformer`` (kernelized hashing + linear attention), ``dsformer`` (dense x N:M sparse factorization),
``axformer`` (accuracy-driven pruning, top-k hard attention), ``ofb`` (Once-for-Both search),
``wide`` (wide-attention configurations).
"""
