"""Compression methods as transforms of any model (a config field, or a function over module + variables).

Efficiency transforms (issue 26), each in its own module:
``token_reduction`` (Token Transforming, ToMe, pruning by [CLS] attention), ``ia_red`` (IA-RED^2),
``ecoformer`` (kernelized hashing + linear attention), ``dsformer`` (dense x N:M sparse factorization),
``axformer`` (accuracy-driven pruning, top-k hard attention), ``ofb`` (Once-for-Both search),
``wide`` (wide-attention configurations).
"""
