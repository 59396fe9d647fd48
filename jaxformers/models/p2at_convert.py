"""Official P2AT (mohamedac29/P2AT, PyTorch) state dicts -> our variables.

The head's modules carry the official attribute names (``jaxformers/models/p2at.py``), so every one of
our head variables names its official tensor: ``a/b_0/c/kernel`` <- ``a.b.0.c.weight`` (an
``nn.Sequential`` index ``.0`` is our ``_0`` suffix); kernels of convolutions and linear layers are
transposed, BatchNorm ``scale`` / ``mean`` / ``var`` are the official ``weight`` / ``running_mean`` /
``running_var``, PReLU slopes, position tables, layer scales and ScaleLayers keep their names. The
torchvision ResNet backbone (``conv1_x``, ``bn1``, ``layer1``... at the top level of the official
state dict) goes through ``convert_timm_resnet`` (torchvision and timm share the layout). A checkpoint
of the training build (with ``aux_seg_head1/2``) loads into the inference build: the auxiliary heads
are skipped. Nothing here imports ``p2at.py``: the model file imports this one.
"""
from __future__ import annotations

import re

import numpy as np

from jaxformers.convert.common import StateDict, conv2d, linear

_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
BACKBONE_KEYS = re.compile(r"^(conv1_x|bn1|layer[1-4])\.")


def official_name(ours: str) -> str:
    """Our flat head variable name (``params/...`` or ``batch_stats/...``) -> the official state-dict key."""
    parts = ours.split("/")[1:]
    modules = [re.sub(r"_(\d+)$", r".\1", p) for p in parts[:-1]]
    return ".".join([*modules, _LEAF.get(parts[-1], parts[-1])])


def convert_official_p2at(sd: StateDict, model, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """An official P2AT state dict (``model.state_dict()`` of ``models/P2AT.py``'s ``P2AT``) -> our flat
    ``params/...`` and ``batch_stats/...`` variables for ``model`` (a ``jaxformers.models.p2at.P2AT``)."""
    from jaxformers.models.resnet import convert_timm_resnet
    from jaxformers.registry import create_model

    out: dict[str, np.ndarray] = {}
    for key in expected:
        if "/backbone/" in key or key.split("/", 2)[1] == "backbone":
            continue
        theirs = official_name(key)
        value = sd[theirs]
        if key.endswith("/kernel"):
            value = conv2d(value) if value.ndim == 4 else linear(value)
        out[key] = value
    sd.skip(*(k for k in sd.keys() if k.endswith(".num_batches_tracked")))
    if not model.aux_heads:  # a training-build checkpoint into the inference build
        sd.skip(*(k for k in sd.keys() if k.startswith(("aux_seg_head1.", "aux_seg_head2."))))

    names = {k.replace("conv1_x.", "conv1.", 1): k for k in sd.keys() if BACKBONE_KEYS.match(k)}
    inner = StateDict({k: sd._tensors[v] for k, v in names.items()})  # marked used below, as the ResNet reads
    backbone = create_model(model.backbone, **{**dict(model.backbone_overrides or {}), "num_classes": 0})
    sub = {k.replace("/backbone/", "/", 1): v for k, v in expected.items() if k.split("/", 2)[1] == "backbone"}
    for k, v in convert_timm_resnet(inner, backbone, sub).items():
        out[k.replace("/", "/backbone/", 1)] = v
    sd.skip(*(names[k] for k in set(inner.keys()) - set(inner.unused())))
    return out
