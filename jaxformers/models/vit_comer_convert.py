"""Official ViT-CoMer (Traffic-X/ViT-CoMer, mmsegmentation) state dicts -> jaxformers variables.

Covers the backbone (``ViTCoMer`` in ``segmentation/mmseg_custom/models/backbones/vit_comer.py``,
keys as in its ``state_dict()``, optionally under ``backbone.``) and the mmsegmentation UperNet
segmenter around it (``decode_head.*`` = ``UPerHead``, ``auxiliary_head.*`` = ``FCNHead``), as in
the checkpoints of ``upernet_vit_comer_*_512_160k_ade20k``. Our parameter paths are derived from the
model's own variables (``expected``), so every parameter is looked up by name and missing or unused
keys are reported by ``load_pretrained``.
"""
from __future__ import annotations

import re

import numpy as np

from jaxformers.convert.common import StateDict, conv2d, fit_pos_embed, heads_out, linear, qkv_fused

_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var", "kernel": "weight"}
_SPM = {"stem_0_conv": "stem.0", "stem_0_bn": "stem.1", "stem_1_conv": "stem.3", "stem_1_bn": "stem.4",
        "stem_2_conv": "stem.6", "stem_2_bn": "stem.7"}


def _torch_module(parts: list[str]) -> str:
    """Our module path (list of names, without the collection and the leaf) -> the official module name."""
    out = []
    for i, p in enumerate(parts):
        parent = parts[i - 1] if i else ""
        m = re.fullmatch(r"(blocks|interactions|extra_ctis|psp_modules|lateral_convs|fpn_convs|convs)_(\d+)", p)
        if m:
            name = "extra_CTIs" if m.group(1) == "extra_ctis" else m.group(1)
            out.append(f"{name}.{m.group(2)}" + (".1" if name == "psp_modules" else ""))
        elif parent == "spm" and p in _SPM:
            out.append(_SPM[p])
        elif parent == "spm" and re.fullmatch(r"conv\d_(conv|bn)", p):
            out.append(p[:5] + (".0" if p.endswith("conv") else ".1"))
        elif parent == "mrfp" and re.fullmatch(r"(dwconv|bn)\d", p):
            out.append("dwconv." + p)
        elif parent == "ffn" and p == "dwconv":
            out.append("dwconv.dwconv")
        else:
            out.append(p)
    return ".".join(out)


def convert_vit_comer(sd: StateDict, model, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Official ViT-CoMer backbone or UperNet-ViT-CoMer state dict -> our flat ``params/...`` and
    ``batch_stats/...`` variables (the target is ``model``'s ``expected`` {path: shape})."""
    wrapped = any(k.startswith(("params/backbone/", "batch_stats/backbone/")) for k in expected)
    bare_ckpt = not any(k.startswith("backbone.") for k in sd.keys())
    backbone = getattr(model, "backbone", model) if wrapped else model
    out: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        _, *parts = key.split("/")
        leaf, mods = parts[-1], parts[:-1]
        if wrapped and mods and mods[0] == "backbone" and bare_ckpt:
            mods = mods[1:]  # a backbone-only checkpoint into the segmenter: its backbone keys
        inner = mods[1:] if mods and mods[0] == "backbone" else mods
        prefix = (_torch_module(mods) + ".") if mods else ""
        if leaf == "gamma" and inner and inner[-1] in ("ls1", "ls2"):
            t = _torch_module(mods[:-1]) + (".gamma1" if inner[-1] == "ls1" else ".gamma2")
            out[key] = sd[t]
            continue
        if leaf in ("pos_embed", "level_embed", "gamma"):
            value = sd[prefix + leaf]
            if leaf == "pos_embed":
                g = backbone.pretrain_size // backbone.patch_size
                value = fit_pos_embed(value, (g, g), 1)
            out[key] = value
            continue
        t = prefix + _LEAF[leaf]
        if leaf == "mean":
            sd.skip(prefix + "num_batches_tracked")
        value = sd[t]
        if leaf == "kernel":
            if inner[-2:] == ["attn", "qkv"]:
                value = qkv_fused(value, backbone.num_heads)
            elif inner[-2:] == ["attn", "proj"]:
                value = heads_out(value, backbone.num_heads)
            elif inner[-1:] == ["up"]:
                value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # ConvTranspose (in, out, kh, kw)
            elif value.ndim == 4:
                value = conv2d(value)
            else:
                value = linear(value)
        elif leaf == "bias" and inner[-2:] == ["attn", "qkv"]:
            value = qkv_fused(value, backbone.num_heads)
        out[key] = value
    return out
