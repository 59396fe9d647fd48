"""Reusable Linen building blocks; every model is assembled from these."""
from jaxformers.layers.attention import (HeadGate, KVCache, MultiHeadAttention, cached_attention, causal_mask,
                                         clipped_softmax, dot_product_attention, init_kv_cache, masked_softmax,
                                         segment_mask)
from jaxformers.layers.block import TransformerBlock, maybe_remat
from jaxformers.layers.checks import check_image, check_token_ids
from jaxformers.layers.drop import DropPath, LayerScale
from jaxformers.layers.features import (BackboneOutput, FeatureBackbone, check_image_strides, check_pyramid,
                                        pyramid_shapes)
from jaxformers.layers.linear import Conv, Dense, logical, trunc_normal
from jaxformers.layers.mlp import Mlp, gelu
from jaxformers.layers.norm import BatchNorm, LayerNorm, RMSNorm
from jaxformers.layers.patch_embed import ConvStem, PatchEmbed, to_2tuple
from jaxformers.layers.pos_embed import (LePE, PositionTerms, apply_rope, resample_abs_pos_embed, rope_frequencies,
                                         sincos_1d, sincos_2d)

__all__ = [
    "MultiHeadAttention", "KVCache", "init_kv_cache", "cached_attention", "causal_mask", "clipped_softmax", "masked_softmax", "HeadGate", "TransformerBlock", "maybe_remat", "dot_product_attention", "segment_mask", "check_image", "check_token_ids",
    "DropPath", "LayerScale", "Conv", "Dense", "logical", "trunc_normal", "Mlp", "gelu", "BatchNorm",
    "LayerNorm", "RMSNorm", "ConvStem", "PatchEmbed", "to_2tuple", "LePE", "apply_rope",
    "PositionTerms", "resample_abs_pos_embed", "rope_frequencies", "sincos_1d", "sincos_2d",
    "BackboneOutput", "FeatureBackbone", "check_pyramid", "check_image_strides", "pyramid_shapes",
]
