"""Official kMaX-DeepLab (bytedance/kmax-deeplab, PyTorch) state dicts -> our variables.

The head (``sem_seg_head.pixel_decoder.*`` and ``sem_seg_head.predictor.*``) maps module by module
(``head_rows``); a ConvNeXt backbone (``backbone.*``, the official ConvNeXt layout that
``D2ConvNeXt`` keeps) goes through ``convert_timm_convnext``. Nothing here imports
``kmax_deeplab.py``: the model file imports this one.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from jaxformers.convert.common import StateDict

Row = tuple[str, str, str]  # (our prefix, official prefix, kind)


def _convbn(ours: str, theirs: str, *, one_d: bool = False, bias: bool = False, norm: bool = True) -> list[Row]:
    rows = [(f"{ours}/conv", f"{theirs}.conv", "conv1d" if one_d else "conv")]
    if bias:
        rows.append((f"{ours}/conv/bias", f"{theirs}.conv.bias", "copy"))
    if norm:
        rows.append((f"{ours}/norm", f"{theirs}.norm", "bn"))
    return rows


def _predictor(ours: str, theirs: str) -> list[Row]:
    return [*_convbn(f"{ours}/pixel_conv0", f"{theirs}._pixel_space_head_conv0bnact"),
            *_convbn(f"{ours}/pixel_conv1", f"{theirs}._pixel_space_head_conv1bnact"),
            *_convbn(f"{ours}/pixel_last", f"{theirs}._pixel_space_head_last_convbn", bias=True),
            *_convbn(f"{ours}/class_head", f"{theirs}._transformer_class_head", one_d=True, bias=True, norm=False),
            *_convbn(f"{ours}/mask_head", f"{theirs}._transformer_mask_head", one_d=True),
            (f"{ours}/mask_bn", f"{theirs}._pixel_space_mask_batch_norm", "bn")]


def head_rows(model, prefix: str = "sem_seg_head.") -> list[Row]:
    """Every module of ``model``'s pixel decoder, transformer decoder and auxiliary head with its
    official name."""
    rows: list[Row] = []
    pd, tp = f"{prefix}pixel_decoder.", f"{prefix}predictor."
    for i in range(4):
        rows.append((f"pixel_decoder/in_norm_{i}", f"{pd}_in_norms.{i}", "ln"))
        kind = model.layer_types[i]
        for j in range(model.dec_layers[i]):
            o, t = f"pixel_decoder/stage_{i}_block_{j}", f"{pd}_stages.{i}._blocks.{j}"
            rows += _convbn(f"{o}/conv1_bn_act", f"{t}._conv1_bn_act") + _convbn(f"{o}/conv3_bn", f"{t}._conv3_bn")
            rows.append((f"{o}/shortcut", f"{t}._shortcut", "optional_convbn"))
            if kind == "axial":
                for axis in ("height", "width"):
                    a, ta = f"{o}/attention/{axis}_axis", f"{t}._attention._{axis}_axis"
                    rows += _convbn(f"{a}/qkv_transform", f"{ta}.qkv_transform", one_d=True, norm=False)
                    rows += [(f"{a}/bn_qkv", f"{ta}._batch_norm_qkv", "bn"),
                             (f"{a}/bn_similarity", f"{ta}._batch_norm_similarity", "bn"),
                             (f"{a}/bn_output", f"{ta}._batch_norm_retrieved_output", "bn")]
                    rows += [(f"{a}/{n}_rpe", f"{ta}._{n}_rpe._embeddings.weight", "param")
                             for n in ("query", "key", "value")]
            else:
                rows += _convbn(f"{o}/conv2_bn_act", f"{t}._conv2_bn_act")
        if i > 0:
            rows += [(f"pixel_decoder/fuse_{i}_low", f"{pd}_resized_fuses.{i - 1}._conv_bn_low", "optional_convbn"),
                     (f"pixel_decoder/fuse_{i}_high", f"{pd}_resized_fuses.{i - 1}._conv_bn_high", "optional_convbn")]
    rows.append(("cluster_centers", f"{tp}_cluster_centers.weight", "param"))
    for n in range(sum(model.trans_dec_layers)):
        o, t = f"kmax_layers_{n}", f"{tp}_kmax_transformer_layers.{n}"
        rows += [*_convbn(f"{o}/pixel_conv1", f"{t}._pixel_conv1_bn_act"),
                 *_convbn(f"{o}/query_conv1", f"{t}._query_conv1_bn_act", one_d=True),
                 *_convbn(f"{o}/pixel_v", f"{t}._pixel_v_conv_bn"),
                 *_predictor(f"{o}/predictor", f"{t}._predcitor"),
                 (f"{o}/kmeans_bn", f"{t}._kmeans_query_batch_norm_retrieved_value", "bn"),
                 *_convbn(f"{o}/kmeans_conv3", f"{t}._kmeans_query_conv3_bn", one_d=True),
                 *_convbn(f"{o}/query_qkv", f"{t}._query_qkv_conv_bn", one_d=True),
                 (f"{o}/attn_bn_similarity", f"{t}._query_self_attention._batch_norm_similarity", "bn"),
                 (f"{o}/attn_bn_output", f"{t}._query_self_attention._batch_norm_retrieved_value", "bn"),
                 *_convbn(f"{o}/query_conv3", f"{t}._query_conv3_bn", one_d=True),
                 *_convbn(f"{o}/ffn_conv1", f"{t}._query_ffn_conv1_bn_act", one_d=True),
                 *_convbn(f"{o}/ffn_conv2", f"{t}._query_ffn_conv2_bn", one_d=True)]
    rows += [*_convbn("class_embedding_projection", f"{tp}_class_embedding_projection", one_d=True),
             *_convbn("mask_embedding_projection", f"{tp}_mask_embedding_projection", one_d=True),
             *_predictor("predictor", f"{tp}_predcitor")]
    if model.aux_semantic:
        s = f"{tp}_auxiliary_semantic_predictor."
        for i in range(4):
            rows += _convbn(f"aux_semantic/aspp/conv{i}", f"{s}_aspp._aspp_conv{i}")
        rows += [*_convbn("aux_semantic/aspp/pool", f"{s}_aspp._aspp_pool"),
                 *_convbn("aux_semantic/aspp/proj", f"{s}_aspp._proj_conv_bn_act")]
        for os in ("os8", "os4"):
            rows += [*_convbn(f"aux_semantic/{os}_projection", f"{s}_low_level_projection_{os}"),
                     *_convbn(f"aux_semantic/{os}_fusion0", f"{s}_low_level_fusion_{os}_conv0_bn_act"),
                     *_convbn(f"aux_semantic/{os}_fusion1", f"{s}_low_level_fusion_{os}_conv1_bn_act")]
        rows += [*_convbn("aux_semantic/head_conv0", f"{s}conv_block_0"),
                 *_convbn("aux_semantic/head_conv1", f"{s}conv_block_1"),
                 *_convbn("aux_semantic/head_final", f"{s}final_conv", bias=True, norm=False)]
    return rows


def _entries(rows: list[Row], sd: StateDict, expected: dict[str, tuple]) -> Iterator[tuple[str, np.ndarray]]:
    for ours, theirs, kind in rows:
        if kind == "copy":
            yield f"params/{ours}", sd[theirs]
        elif kind == "param":
            yield f"params/{ours}", sd[theirs]
        elif kind in ("conv", "conv1d"):
            w = sd[theirs + ".weight"]
            if kind == "conv1d":  # Conv1d (out, in, 1) -> our 1x1 kernel (1, 1, in, out)
                w = w.reshape(w.shape[0], w.shape[1], 1, 1)
            yield f"params/{ours}/kernel", np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        elif kind == "ln":
            yield f"params/{ours}/scale", sd[theirs + ".weight"]
            yield f"params/{ours}/bias", sd[theirs + ".bias"]
        elif kind == "bn":
            yield f"params/{ours}/scale", sd[theirs + ".weight"]
            yield f"params/{ours}/bias", sd[theirs + ".bias"]
            yield f"batch_stats/{ours}/mean", sd[theirs + ".running_mean"]
            yield f"batch_stats/{ours}/var", sd[theirs + ".running_var"]
            sd.skip(theirs + ".num_batches_tracked")
        elif kind == "optional_convbn":  # present only when the channels change
            if f"params/{ours}/conv/kernel" in expected:
                yield from _entries(_convbn(ours, theirs), sd, expected)
        else:
            raise ValueError(kind)


def convert_official_kmax(sd: StateDict, model, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """A full official kMaX-DeepLab state dict (``backbone.*`` in the official ConvNeXt layout +
    ``sem_seg_head.*``) -> our flat variables. The official ResNet-50 backbone is detectron2's
    (``backbone.stem`` / ``backbone.res2``...), which has no converter here: convert it on its own."""
    out = dict(_entries(head_rows(model), sd, expected))
    backbone = {k[len("backbone."):]: k for k in sd.keys() if k.startswith("backbone.")}
    if backbone:
        if not model.backbone.startswith("convnext"):
            raise ValueError(f"official kMaX checkpoints with a {model.backbone!r} backbone have detectron2 key names; "
                             f"only the ConvNeXt backbones convert here")
        from jaxformers.models.convnext import convert_timm_convnext
        from jaxformers.registry import create_model

        inner = StateDict({k: sd[v] for k, v in backbone.items()})
        sub = create_model(model.backbone, **{**dict(model.backbone_overrides or {}), "num_classes": 0})
        for k, v in convert_timm_convnext(inner, sub, {}).items():
            out[k.replace("params/", "params/backbone/", 1)] = v
        used = set(inner.keys()) - set(inner.unused())
        sd.skip(*(backbone[k] for k in used), *(backbone[k] for k in inner.unused() if k.startswith("norm.")))
    return out
