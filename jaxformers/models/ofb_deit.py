"""OFB-DeiT A-E: DeiT subnets found by OFB (Once for Both) search, as plain dense ViTs.

Paper: "Once for Both: Single Stage of Importance and Sparsity Search for Vision Transformer
Compression", Ye et al., CVPR 2024, arXiv 2403.15835; official code HankYe/Once-for-Both. The
search itself is ``jaxformers.compress.ofb`` (its ``export`` produces models of this form).

The README lists OFB-DeiT-A..E at 4.4 / 5.3 / 8.0 / 17.6 / 43.9 M parameters and 0.9 / 1.1 / 1.7 /
3.6 / 8.7 GFLOPs (top-1 75.0 / 76.1 / 78.0 / 80.3 / 81.7). The per-layer widths of the released
checkpoints are published only inside those files, so each name here is registered with a
*uniform* member of the official search space (A-D from DeiT-S: embedding width in 192..384 step 12,
2/4/6 heads of width 16..64 step 8, MLP 384..1536 step 192; E from DeiT-B) whose parameter count
and official-formula FLOPs match the README (``OFB_CONFIGS``; checked in the tests). A released
checkpoint loads with its own widths: ``config = ofb_config_from_state_dict(read_checkpoint(path),
num_heads=...)`` then ``load_pretrained("ofb_deit_a", path, **config)`` (OFB checkpoints use timm's
ViT key names; the head counts are not recorded in the tensors).

Like the official pruned attention, every block keeps the original ``head_dim ** -0.5`` scale
(64 ** -0.5) whatever its searched head width.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxformers.models.vit import VisionTransformer, convert_timm_vit
from jaxformers.registry import ModelInfo, register_model

__all__ = ["OFB_CONFIGS", "ofb_config_from_state_dict"]

# name: (embed dim, heads, head dim, mlp hidden, params (exact), README params M, README GFLOPs, top-1)
OFB_CONFIGS = {
    "ofb_deit_a": (276, 6, 16, 384, 4_387_804, 4.4, 0.9, 75.0),
    "ofb_deit_b": (240, 2, 64, 576, 5_294_680, 5.3, 1.1, 76.1),
    "ofb_deit_c": (204, 4, 48, 1152, 7_958_356, 8.0, 1.7, 78.0),
    "ofb_deit_d": (348, 6, 40, 1536, 17_575_972, 17.6, 3.6, 80.3),
    "ofb_deit_e": (516, 12, 16, 3072, 43_897_036, 43.9, 8.7, 81.7),
}
SCALE = 64 ** -0.5  # DeiT's head width 64: the scale the pruned attention keeps


def ofb_config_from_state_dict(sd: Mapping[str, Any], num_heads: int | Sequence[int]) -> dict[str, Any]:
    """``create_model`` overrides for a pruned ViT state dict (timm key names): embedding width, depth
    and per-block widths read from the tensors. The head split of a fused qkv is not recorded in
    the tensors, so ``num_heads`` (one count, or one per block) gives it."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = [num_heads] * depth if isinstance(num_heads, int) else [int(h) for h in num_heads]
    if len(heads) != depth:
        raise ValueError(f"num_heads has {len(heads)} entries but the checkpoint has {depth} blocks")
    blocks = []
    for i, h in enumerate(heads):
        width = int(np.shape(sd[f"blocks.{i}.attn.qkv.weight"])[0]) // 3
        if width % h:
            raise ValueError(f"block {i}: q/k/v width {width} is not divisible by num_heads={h}")
        blocks.append({"num_heads": h, "head_dim": width // h,
                       "mlp_hidden": int(np.shape(sd[f"blocks.{i}.mlp.fc1.weight"])[0]), "scale": SCALE})
    return {"embed_dim": int(np.shape(sd["cls_token"])[-1]), "depth": depth, "num_heads": heads[0],
            "block_overrides": tuple(blocks)}


def _build(name: str, overrides: dict[str, Any]) -> VisionTransformer:
    dim, heads, head_dim, hidden = OFB_CONFIGS[name][:4]
    blocks = ({"num_heads": heads, "head_dim": head_dim, "mlp_hidden": hidden, "scale": SCALE},)  # every block
    return VisionTransformer(**{"embed_dim": dim, "depth": 12, "num_heads": heads, "block_overrides": blocks,
                                **overrides})


def _info(name: str) -> ModelInfo:
    *_, params, _, gflops, top1 = OFB_CONFIGS[name]
    return ModelInfo(paper="Once for Both: Single Stage of Importance and Sparsity Search for Vision Transformer "
                           "Compression (OFB)", arxiv="2403.15835", repo="HankYe/Once-for-Both",
                     input_size=(224, 224, 3), params_m=round(params / 1e6, 2), flops_g=gflops, top1=top1,
                     converter=convert_timm_vit)


@register_model(_info("ofb_deit_a"))
def ofb_deit_a(**overrides: Any) -> VisionTransformer:
    return _build("ofb_deit_a", overrides)


@register_model(_info("ofb_deit_b"))
def ofb_deit_b(**overrides: Any) -> VisionTransformer:
    return _build("ofb_deit_b", overrides)


@register_model(_info("ofb_deit_c"))
def ofb_deit_c(**overrides: Any) -> VisionTransformer:
    return _build("ofb_deit_c", overrides)


@register_model(_info("ofb_deit_d"))
def ofb_deit_d(**overrides: Any) -> VisionTransformer:
    return _build("ofb_deit_d", overrides)


@register_model(_info("ofb_deit_e"))
def ofb_deit_e(**overrides: Any) -> VisionTransformer:
    return _build("ofb_deit_e", overrides)
