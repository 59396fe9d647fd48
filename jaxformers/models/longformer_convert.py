"""Hugging Face Longformer checkpoints and directories <-> ``Longformer`` variables, both directions.

One key table (``key_table``) drives the import (``convert_hf_longformer``: the registry converter
and ``from_pretrained(dir)``) and the export (``save_directory``). The local ``query/key/value``
become our fused ``attn/qkv`` (E, 3, H, D); ``query_global`` becomes ``attn/global_q`` (E, H, D)
and ``key_global/value_global`` the fused ``attn/global_kv`` (E, 2, H, D). Recformer's extra
``embeddings.item_position_embeddings`` is read and written under the same name. Nothing here
imports ``longformer.py`` (the model file imports this one).
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from jaxformers.convert import hf_encoder
from jaxformers.convert.common import StateDict, write_hf_directory
from jaxformers.convert.hf_keys import Fused, Row, export_tensors, norm_rows
from jaxformers.convert.pretrained import flat_variables
from jaxformers.text.hf_config import ConfigError

MODEL_TYPE = "longformer"
ARCHITECTURES = {"LongformerModel": None, "LongformerForMaskedLM": "mlm",
                 "LongformerForSequenceClassification": "classification",
                 "LongformerForTokenClassification": "token_classification",
                 "LongformerForQuestionAnswering": "qa"}
HEAD_ARCHITECTURE = {**{v: k for k, v in ARCHITECTURES.items()}, "embedding": "LongformerModel"}
SAME_NAME_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                    "type_vocab_size", "layer_norm_eps", "pad_token_id", "sep_token_id")
_BASES = ("", "longformer.", "roberta.", "model.")


def key_table(model) -> tuple[list[Row], list[Fused]]:
    """Rows mapping every variable of ``model`` to its HF key, and the fused projections."""
    base = "" if model.head in (None, "embedding") else "longformer."
    h = model.num_attention_heads
    rows: list[Row] = [
        ("params/embeddings/word_embeddings/embedding", base + "embeddings.word_embeddings.weight", "copy"),
        ("params/embeddings/position_embeddings/embedding", base + "embeddings.position_embeddings.weight", "copy"),
        *norm_rows("params/embeddings/norm", base + "embeddings.LayerNorm"),
    ]
    if model.type_vocab_size:
        rows.append(("params/embeddings/token_type_embeddings/embedding",
                     base + "embeddings.token_type_embeddings.weight", "copy"))
    if model.max_item_embeddings:
        rows.append(("params/embeddings/item_position_embeddings/embedding",
                     base + "embeddings.item_position_embeddings.weight", "copy"))
    fused: list[Fused] = []
    for i in range(model.num_hidden_layers):
        o, t = f"params/layer_{i}/", f"{base}encoder.layer.{i}."
        s = t + "attention.self."
        fused += [(o + "attn/qkv", (s + "query", s + "key", s + "value"), h),
                  (o + "attn/global_q", (s + "query_global",), h),
                  (o + "attn/global_kv", (s + "key_global", s + "value_global"), h)]
        rows += hf_encoder.post_norm_layer_rows(o, t, h, out_proj=t + "attention.output.dense",
                                                attn_norm=t + "attention.output.LayerNorm")
    rows += hf_encoder.head_rows(model.head, has_pooler=model.has_pooler, base=base)
    return rows, fused


def convert_hf_longformer(sd: StateDict, model, expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """HF Longformer state dict -> our flat ``params/...`` arrays (absent keys left out, so the
    caller reports them missing). The ``position_ids`` buffer, the tied decoder and an unused
    pooler are skipped; the checkpoint may be a ``LongformerModel`` or a task class."""
    rows, fused = key_table(model)
    wanted = "" if model.head in (None, "embedding") else "longformer."
    return hf_encoder.import_encoder(sd, model, rows, fused, wanted=wanted, bases=_BASES)


def fields_from_config(config: dict[str, Any], *, source: str = "config.json") -> dict[str, Any]:
    """``Longformer`` fields from a HF ``config.json`` dict (``ConfigError`` for another model_type)."""
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConfigError(f"{source} describes model_type={model_type!r}; the Longformer loader reads "
                          f"model_type='longformer' only")
    fields = {k: config[k] for k in SAME_NAME_FIELDS if config.get(k) is not None}
    window = config.get("attention_window", 512)
    fields["attention_window"] = tuple(int(w) for w in window) if isinstance(window, (list, tuple)) else int(window)
    if "id2label" in config:
        fields["num_labels"] = len(config["id2label"])
    fields["head"] = hf_encoder.head_from_architectures(config, ARCHITECTURES, "Longformer", source)
    return fields


def config_from_module(module, *, id2label: dict | None = None) -> dict[str, Any]:
    """A ``LongformerConfig`` dict for ``module``."""
    config: dict[str, Any] = {"architectures": [HEAD_ARCHITECTURE[module.head]], "model_type": MODEL_TYPE}
    for k in SAME_NAME_FIELDS:
        config[k] = getattr(module, k)
    config["attention_window"] = list(module.windows)
    config.update(bos_token_id=0, eos_token_id=2, initializer_range=0.02, onnx_export=False,
                  tie_word_embeddings=True)
    if module.head in ("classification", "token_classification"):
        config.update(hf_encoder.label_config(module.num_labels, id2label))
    return config


def save_directory(module, variables: Any, path: str | os.PathLike, *, id2label: dict | None = None,
                   tokenizer: Any = None) -> pathlib.Path:
    """``config.json`` + ``model.safetensors`` (float32, HF names) that ``transformers`` loads."""
    if module.max_item_embeddings:
        raise ConfigError("a Longformer with item-position embeddings (Recformer) has no Hugging Face class; "
                          "save its variables with jaxformers' checkpointing instead")
    rows, fused = key_table(module)
    return write_hf_directory(path, export_tensors(flat_variables(variables), rows, fused),
                              config_from_module(module, id2label=id2label), tokenizer)
