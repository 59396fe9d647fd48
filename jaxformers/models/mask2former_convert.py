"""Mask2Former <-> Hugging Face directories (``Mask2FormerForUniversalSegmentation``, Swin backbone).

One key table (``key_table``) drives both directions. It is written in the key names transformers
writes to ``model.safetensors`` (the legacy Swin names ``attention.self.query``, ``intermediate.dense``,
..., and the backbone's ``embeddings`` / ``encoder`` without the ``swin.`` prefix); checkpoints with
transformers 5's in-memory names (``attention.q_proj``, ``mlp.fc1``, ``swin.encoder``...) are renamed to
those first, so both load. Nothing here imports ``mask2former.py``: the model file imports this one.
"""
from __future__ import annotations

import os
import pathlib
import re
import warnings
from typing import Any

import jax
import numpy as np

from jaxformers.convert.common import StateDict, read_checkpoint, write_hf_directory
from jaxformers.convert.pretrained import (CheckpointMismatchError, assemble_variables, checkpoint_problems,
                                           flat_variables)

Row = tuple[str, str | tuple[str, ...], str, int]  # (ours, hf key(s), kind, heads)

_NEW_TO_LEGACY = [  # transformers 5 in-memory names -> the names it saves
    (r"\.swin\.embeddings\.", ".embeddings."), (r"\.swin\.encoder\.", ".encoder."),
    (r"attention\.q_proj\.", "attention.self.query."), (r"attention\.k_proj\.", "attention.self.key."),
    (r"attention\.v_proj\.", "attention.self.value."), (r"attention\.o_proj\.", "attention.output.dense."),
    (r"attention\.relative_position_bias\.relative_position_bias_table",
     "attention.self.relative_position_bias_table"),
    (r"(blocks\.\d+)\.mlp\.fc1\.", r"\1.intermediate.dense."), (r"(blocks\.\d+)\.mlp\.fc2\.", r"\1.output.dense."),
]
_SKIP = ("criterion.empty_weight", "model.pixel_level_module.encoder.swin.layernorm.weight",
         "model.pixel_level_module.encoder.swin.layernorm.bias")


def legacy_names(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        for pattern, repl in _NEW_TO_LEGACY:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _dense(ours, hf, kind="linear", heads=0) -> list[Row]:
    return [(f"{ours}/kernel", f"{hf}.weight", kind, heads), (f"{ours}/bias", f"{hf}.bias",
                                                               "bias_heads" if kind == "heads_in" else "copy", heads)]


def _norm(ours, hf) -> list[Row]:
    return [(f"{ours}/scale", f"{hf}.weight", "copy", 0), (f"{ours}/bias", f"{hf}.bias", "copy", 0)]


def _conv(ours, hf, bias=True) -> list[Row]:
    return [(f"{ours}/kernel", f"{hf}.weight", "conv", 0)] + ([(f"{ours}/bias", f"{hf}.bias", "copy", 0)] if bias else [])


def key_table(module) -> list[Row]:
    """Every variable of ``module`` (a Mask2Former with a Swin backbone) and its HF key(s)."""
    swin = swin_config(module)
    rows: list[Row] = []
    e = "model.pixel_level_module.encoder."
    b = "params/backbone/"
    rows += _conv(b + "patch_embed/proj", e + "embeddings.patch_embeddings.projection")
    rows += _norm(b + "patch_embed/norm", e + "embeddings.norm")
    for i, depth in enumerate(swin["depths"]):
        heads = swin["num_heads"][i]
        for j in range(depth):
            o, t = f"{b}layers_{i}/blocks_{j}/", f"{e}encoder.layers.{i}.blocks.{j}."
            qkv = tuple(f"{t}attention.self.{p}" for p in ("query", "key", "value"))
            rows += [*_norm(o + "norm1", t + "layernorm_before"), *_norm(o + "norm2", t + "layernorm_after"),
                     (o + "attn/relative_position_bias_table", t + "attention.self.relative_position_bias_table",
                      "copy", 0),
                     (o + "attn/mha/qkv/kernel", tuple(k + ".weight" for k in qkv), "qkv", heads),
                     (o + "attn/mha/qkv/bias", tuple(k + ".bias" for k in qkv), "qkv_bias", heads),
                     *_dense(o + "attn/mha/proj", t + "attention.output.dense", "heads_out", heads),
                     *_dense(o + "mlp/fc1", t + "intermediate.dense"), *_dense(o + "mlp/fc2", t + "output.dense")]
        if i > 0:
            t = f"{e}encoder.layers.{i - 1}.downsample."
            rows += [*_norm(f"{b}layers_{i}/downsample/norm", t + "norm"),
                     (f"{b}layers_{i}/downsample/reduction/kernel", t + "reduction.weight", "linear", 0)]
        rows += _norm(f"{b}out_norm{i}", f"{e}hidden_states_norms.stage{i + 1}")
    p, t = "params/pixel_decoder/", "model.pixel_level_module.decoder."
    for lvl in range(3):
        rows += [*_conv(f"{p}input_proj_{lvl}", f"{t}input_projections.{lvl}.0"),
                 *_norm(f"{p}input_norm_{lvl}", f"{t}input_projections.{lvl}.1")]
    rows.append((p + "level_embed", t + "level_embed", "copy", 0))
    for i in range(module.encoder_layers):
        o, s = f"{p}layers_{i}/", f"{t}encoder.layers.{i}."
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            rows += _dense(f"{o}self_attn/{name}", f"{s}self_attn.{name}")
        rows += [*_norm(o + "self_attn_norm", s + "self_attn_layer_norm"), *_dense(o + "fc1", s + "fc1"),
                 *_dense(o + "fc2", s + "fc2"), *_norm(o + "final_norm", s + "final_layer_norm")]
    rows += [*_conv(p + "lateral", t + "adapter_1.0", bias=False), *_norm(p + "lateral_norm", t + "adapter_1.1"),
             *_conv(p + "output", t + "layer_1.0", bias=False), *_norm(p + "output_norm", t + "layer_1.1"),
             *_conv(p + "mask_projection", t + "mask_projection")]
    d, t = "params/transformer_decoder/", "model.transformer_module."
    h = module.num_heads
    rows += [(d + "query_feat", t + "queries_features.weight", "copy", 0),
             (d + "query_embed", t + "queries_embedder.weight", "copy", 0),
             (d + "level_embed", t + "level_embed.weight", "copy", 0)]
    if module.feature_size != module.hidden_dim or module.enforce_input_projection:
        for lvl in range(3):
            rows += _conv(f"{d}input_proj_{lvl}", f"{t}input_projections.{lvl}")
    for i in range(module.decoder_layers - 1):
        o, s = f"{d}layers_{i}/", f"{t}decoder.layers.{i}."
        for part in range(3):
            name = "qkv"[part]
            rows += [(f"{o}cross_attn/{name}/kernel", f"{s}cross_attn.in_proj_weight", f"in_proj{part}", h),
                     (f"{o}cross_attn/{name}/bias", f"{s}cross_attn.in_proj_bias", f"in_proj_bias{part}", h)]
        rows += _dense(o + "cross_attn/proj", s + "cross_attn.out_proj", "heads_out", h)
        for name in "qkv":
            rows += _dense(f"{o}self_attn/{name}", f"{s}self_attn.{name}_proj", "heads_in", h)
        rows += [*_dense(o + "self_attn/proj", s + "self_attn.out_proj", "heads_out", h),
                 *_norm(o + "cross_attn_norm", s + "cross_attn_layer_norm"),
                 *_norm(o + "self_attn_norm", s + "self_attn_layer_norm"),
                 *_dense(o + "fc1", s + "fc1"), *_dense(o + "fc2", s + "fc2"),
                 *_norm(o + "final_norm", s + "final_layer_norm")]
    rows += _norm(d + "decoder_norm", t + "decoder.layernorm")
    for i in range(3):
        rows += _dense(f"{d}mask_embed_{i}", f"{t}decoder.mask_predictor.mask_embedder.{i}.0")
    rows += _dense(d + "class_predictor", "class_predictor")
    return rows


def _to_ours(kind: str, w, heads: int) -> np.ndarray:
    if kind == "copy":
        return w
    if kind == "linear":
        return np.ascontiguousarray(w.T)
    if kind == "conv":
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    if kind == "heads_in":  # (H*D, E) -> (E, H, D)
        return np.ascontiguousarray(w.T.reshape(w.shape[1], heads, -1))
    if kind == "bias_heads":
        return w.reshape(heads, -1)
    if kind == "heads_out":  # (E, H*D) -> (H, D, E)
        return np.ascontiguousarray(w.T.reshape(heads, -1, w.shape[0]))
    if kind == "qkv":  # three (H*D, E) -> (E, 3, H, D)
        stacked = np.stack(w)
        return np.ascontiguousarray(stacked.reshape(3, heads, -1, stacked.shape[-1]).transpose(3, 0, 1, 2))
    if kind == "qkv_bias":
        return np.stack(w).reshape(3, heads, -1)
    if kind.startswith("in_proj_bias"):
        part = int(kind[-1])
        e = w.shape[0] // 3
        return w[part * e:(part + 1) * e].reshape(heads, -1)
    if kind.startswith("in_proj"):
        part = int(kind[-1])
        e = w.shape[0] // 3
        return _to_ours("heads_in", w[part * e:(part + 1) * e], heads)
    raise ValueError(kind)


def convert_hf_mask2former(sd: StateDict, module) -> dict[str, np.ndarray]:
    """HF state dict (legacy names) -> our flat ``params/...`` arrays; keys the checkpoint lacks are
    left out (the caller names them)."""
    out = {}
    for ours, hf, kind, heads in key_table(module):
        keys = hf if isinstance(hf, tuple) else (hf,)
        if not all(k in sd for k in keys):
            continue
        w = [sd[k] for k in keys] if isinstance(hf, tuple) else sd[hf]
        out[ours] = _to_ours(kind, w, heads)
    sd.skip(*_SKIP)
    return out


def _to_hf(rows: list[Row], flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    in_proj: dict[str, list] = {}
    for ours, hf, kind, heads in rows:
        w = flat[ours]
        if kind == "copy":
            out[hf] = w
        elif kind == "linear":
            out[hf] = w.T
        elif kind == "conv":
            out[hf] = w.transpose(3, 2, 0, 1)
        elif kind == "heads_in":
            out[hf] = w.reshape(w.shape[0], -1).T
        elif kind == "bias_heads":
            out[hf] = w.reshape(-1)
        elif kind == "heads_out":
            out[hf] = w.reshape(-1, w.shape[-1]).T
        elif kind == "qkv":
            parts = w.transpose(1, 2, 3, 0).reshape(3, -1, w.shape[0])
            out.update({k: parts[i] for i, k in enumerate(hf)})
        elif kind == "qkv_bias":
            out.update({k: w[i].reshape(-1) for i, k in enumerate(hf)})
        elif kind.startswith("in_proj_bias"):
            in_proj.setdefault(hf, [None] * 3)[int(kind[-1])] = w.reshape(-1)
        elif kind.startswith("in_proj"):
            in_proj.setdefault(hf, [None] * 3)[int(kind[-1])] = w.reshape(w.shape[0], -1).T
    out.update({k: np.concatenate(v, 0) for k, v in in_proj.items()})
    return out


# ---------------------------------------------------------------------------------------------
# Configs


def swin_config(module) -> dict[str, Any]:
    """The backbone of ``module`` as Swin settings; a clear error for backbones HF cannot hold."""
    from jaxformers.registry import create_model

    overrides = dict(module.backbone_overrides or {})
    overrides.setdefault("num_classes", 0)
    backbone = create_model(module.backbone, **overrides)
    if type(backbone).__name__ != "SwinTransformer":
        raise ValueError(f"Hugging Face Mask2Former directories hold Swin backbones; this model's backbone is "
                         f"{module.backbone!r} ({type(backbone).__name__})")
    if not (backbone.always_partition and backbone.out_norms):
        raise ValueError("a Hugging Face SwinBackbone partitions every map into fixed windows and normalises every "
                         "output: build the Swin backbone with always_partition=True, out_norms=True")
    return {"embed_dim": backbone.embed_dim, "depths": list(backbone.depths), "num_heads": list(backbone.num_heads),
            "window_size": backbone.window_size, "mlp_ratio": backbone.mlp_ratio, "qkv_bias": backbone.qkv_bias,
            "drop_path_rate": backbone.drop_path_rate, "patch_size": backbone.patch_size,
            "num_channels": backbone.in_chans, "attention_probs_dropout_prob": backbone.attn_drop_rate,
            "hidden_dropout_prob": backbone.drop_rate}


_FIELDS = {  # HF config -> Mask2Former field
    "feature_size": "feature_size", "mask_feature_size": "mask_feature_size", "hidden_dim": "hidden_dim",
    "encoder_feedforward_dim": "encoder_ffn_dim", "encoder_layers": "encoder_layers",
    "decoder_layers": "decoder_layers", "num_attention_heads": "num_heads", "dim_feedforward": "dim_feedforward",
    "num_queries": "num_queries", "pre_norm": "pre_norm", "enforce_input_projection": "enforce_input_projection",
    "common_stride": "common_stride", "dropout": "dropout",
}


def fields_from_config(config: dict[str, Any], source: str) -> dict[str, Any]:
    """Mask2Former fields for a HF ``config.json`` (Swin backbone)."""
    bb = config.get("backbone_config") or {}
    if config.get("use_timm_backbone") or config.get("backbone") or bb.get("model_type", "swin") != "swin":
        raise ValueError(f"{source}: only Swin backbones (backbone_config.model_type 'swin') are supported; got "
                         f"{bb.get('model_type') or config.get('backbone')!r}")
    if config.get("activation_function", "relu") != "relu" or bb.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{source}: expected activation_function 'relu' and a GELU Swin")
    if bb.get("use_absolute_embeddings"):
        raise ValueError(f"{source}: Swin with absolute position embeddings is not supported")
    out_features = bb.get("out_features") or ["stage1", "stage2", "stage3", "stage4"]
    if list(out_features) != ["stage1", "stage2", "stage3", "stage4"] or len(bb.get("depths", [0] * 4)) != 4:
        raise ValueError(f"{source}: the backbone must output stage1..stage4 of a 4-stage Swin; got {out_features}")
    if list(config.get("feature_strides", [4, 8, 16, 32])) != [4, 8, 16, 32]:
        raise ValueError(f"{source}: feature_strides must be [4, 8, 16, 32]")
    if abs(float(bb.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        raise ValueError(f"{source}: Swin layer_norm_eps must be 1e-5")
    id2label = config.get("id2label") or {}
    num_classes = len(id2label) if id2label else int(config.get("num_labels", 133))
    fields = {ours: config[hf] for hf, ours in _FIELDS.items() if hf in config}
    backbone = {"embed_dim": bb.get("embed_dim", 96), "depths": tuple(bb.get("depths", (2, 2, 6, 2))),
                "num_heads": tuple(bb.get("num_heads", (3, 6, 12, 24))), "window_size": bb.get("window_size", 7),
                "mlp_ratio": float(bb.get("mlp_ratio", 4.0)), "qkv_bias": bool(bb.get("qkv_bias", True)),
                "drop_path_rate": float(bb.get("drop_path_rate", 0.1)), "patch_size": bb.get("patch_size", 4),
                "in_chans": bb.get("num_channels", 3), "attn_drop_rate": float(bb.get("attention_probs_dropout_prob",
                                                                                      0.0)),
                "drop_rate": float(bb.get("hidden_dropout_prob", 0.0)), "always_partition": True, "out_norms": True,
                "img_size": bb.get("image_size", 224)}
    return {**fields, "num_classes": num_classes, "in_chans": backbone["in_chans"],
            "backbone": "swin_tiny_patch4_window7_224", "backbone_overrides": backbone}


def config_from_module(module, id2label: dict | None = None) -> dict[str, Any]:
    swin = swin_config(module)
    labels = id2label or {i: f"LABEL_{i}" for i in range(module.num_classes)}
    if len(labels) != module.num_classes:
        raise ValueError(f"id2label has {len(labels)} entries but the model has num_classes={module.num_classes}")
    config = {hf: getattr(module, ours) for hf, ours in _FIELDS.items()}
    config.update({
        "model_type": "mask2former", "architectures": ["Mask2FormerForUniversalSegmentation"],
        "activation_function": "relu", "feature_strides": [4, 8, 16, 32], "ignore_value": 255,
        "id2label": {str(k): v for k, v in labels.items()}, "label2id": {v: int(k) for k, v in labels.items()},
        "backbone_config": {"model_type": "swin", "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                            "use_absolute_embeddings": False, "image_size": 224,
                            "out_features": ["stage1", "stage2", "stage3", "stage4"], **swin},
    })
    return config


# ---------------------------------------------------------------------------------------------
# Directories


def load_directory(module, path: str | os.PathLike, *, strict: bool = True, mesh: Any = None,
                   rules: Any = None) -> dict[str, Any]:
    """``module``'s variables from the weights in the HF directory ``path`` (names and shapes checked:
    ``CheckpointMismatchError`` naming the keys, or with ``strict=False`` a warning and fresh values)."""
    from jaxformers.registry import example_inputs
    from jaxformers.text.hf_config import weights_file

    weights = weights_file(path)
    sd = StateDict(legacy_names(read_checkpoint(weights)))
    converted = convert_hf_mask2former(sd, module)
    inputs = example_inputs(module, 1)
    boxed = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, *inputs))
    expected = flat_variables(boxed)
    wrong, problems = checkpoint_problems(expected, converted, sd.unused())
    if problems and strict:
        raise CheckpointMismatchError(f"checkpoint {os.fspath(weights)} does not fit the Mask2Former of its "
                                      f"config.json.\n  " + "\n  ".join(problems))
    if set(expected) - set(converted) or wrong:
        warnings.warn(f"{os.fspath(weights)}: " + "; ".join(problems) + " -- freshly initialised where missing",
                      stacklevel=3)
    return assemble_variables(
        expected, converted, wrong,
        lambda: module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, *inputs), boxed, mesh, rules)


def save_directory(module, variables: Any, path: str | os.PathLike, *, id2label: dict | None = None,
                   no_object_weight: float = 0.1) -> pathlib.Path:
    """Writes ``config.json`` + ``model.safetensors`` (float32, the key names transformers saves) that
    ``transformers.Mask2FormerForUniversalSegmentation.from_pretrained`` loads."""
    config = config_from_module(module, id2label)
    flat = {k: np.asarray(v, np.float32) for k, v in flat_variables(variables).items()}
    tensors = _to_hf(key_table(module), flat)
    last = config["backbone_config"]["embed_dim"] * 2 ** 3
    tensors["model.pixel_level_module.encoder.swin.layernorm.weight"] = np.ones(last, np.float32)  # built, unused
    tensors["model.pixel_level_module.encoder.swin.layernorm.bias"] = np.zeros(last, np.float32)
    empty = np.ones(module.num_classes + 1, np.float32)
    empty[-1] = no_object_weight
    tensors["criterion.empty_weight"] = empty
    return write_hf_directory(path, tensors, config)
