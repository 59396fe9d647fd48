"""Hugging Face MPNet checkpoints and directories <-> ``MPNet`` variables, both directions.

One key table (``key_table``) drives the import (``convert_hf_mpnet``) and the export
(``save_directory``). HF's ``attention.attn.{q,k,v}`` become our fused ``attn/qkv`` (E, 3, H, D)
and ``attention.attn.o`` the output projection ``attn/proj`` (H, D, E); the encoder's shared
``relative_attention_bias`` table (buckets, heads) is copied as is. Nothing here imports ``mpnet.py``.
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

MODEL_TYPE = "mpnet"
ARCHITECTURES = {"MPNetModel": None, "MPNetForMaskedLM": "mlm", "MPNetForSequenceClassification": "classification",
                 "MPNetForTokenClassification": "token_classification", "MPNetForQuestionAnswering": "qa"}
HEAD_ARCHITECTURE = {**{v: k for k, v in ARCHITECTURES.items()}, "embedding": "MPNetModel"}
SAME_NAME_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                    "layer_norm_eps", "relative_attention_num_buckets", "pad_token_id")
_BASES = ("", "mpnet.", "0.auto_model.", "model.")


def key_table(model) -> tuple[list[Row], list[Fused]]:
    """Rows mapping every variable of ``model`` to its HF key, and the fused q/k/v projections."""
    base = "" if model.head in (None, "embedding") else "mpnet."
    h = model.num_attention_heads
    rows: list[Row] = [
        ("params/embeddings/word_embeddings/embedding", base + "embeddings.word_embeddings.weight", "copy"),
        ("params/embeddings/position_embeddings/embedding", base + "embeddings.position_embeddings.weight", "copy"),
        *norm_rows("params/embeddings/norm", base + "embeddings.LayerNorm"),
        ("params/relative_attention_bias/embedding", base + "encoder.relative_attention_bias.weight", "copy"),
    ]
    fused: list[Fused] = []
    for i in range(model.num_hidden_layers):
        o, t = f"params/layer_{i}/", f"{base}encoder.layer.{i}."
        a = t + "attention.attn."
        fused.append((o + "attn/qkv", (a + "q", a + "k", a + "v"), h))
        rows += hf_encoder.post_norm_layer_rows(o, t, h, out_proj=a + "o", attn_norm=t + "attention.LayerNorm")
    rows += hf_encoder.head_rows(model.head, has_pooler=model.has_pooler, base=base)
    return rows, fused


def convert_hf_mpnet(sd: StateDict, model, expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """HF MPNet state dict (``MPNetModel``, a task class or a sentence-transformers export) -> our flat
    ``params/...`` arrays; buffers, the tied decoder and an unused pooler are skipped."""
    rows, fused = key_table(model)
    wanted = "" if model.head in (None, "embedding") else "mpnet."
    return hf_encoder.import_encoder(sd, model, rows, fused, wanted=wanted, bases=_BASES)


def fields_from_config(config: dict[str, Any], *, source: str = "config.json") -> dict[str, Any]:
    """``MPNet`` fields from a HF ``config.json`` dict (``ConfigError`` for another model_type)."""
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConfigError(f"{source} describes model_type={model_type!r}; the MPNet loader reads model_type='mpnet' only")
    fields = {k: config[k] for k in SAME_NAME_FIELDS if config.get(k) is not None}
    if "id2label" in config:
        fields["num_labels"] = len(config["id2label"])
    fields["head"] = hf_encoder.head_from_architectures(config, ARCHITECTURES, "MPNet", source)
    return fields


def save_directory(module, variables: Any, path: str | os.PathLike, *, id2label: dict | None = None,
                   tokenizer: Any = None) -> pathlib.Path:
    """``config.json`` + ``model.safetensors`` (float32, HF names) that ``transformers`` loads."""
    config: dict[str, Any] = {"architectures": [HEAD_ARCHITECTURE[module.head]], "model_type": MODEL_TYPE,
                              **{k: getattr(module, k) for k in SAME_NAME_FIELDS},
                              "bos_token_id": 0, "eos_token_id": 2, "initializer_range": 0.02,
                              "tie_word_embeddings": True}
    if module.head in ("classification", "token_classification"):
        config.update(hf_encoder.label_config(module.num_labels, id2label))
    rows, fused = key_table(module)
    return write_hf_directory(path, export_tensors(flat_variables(variables), rows, fused), config, tokenizer)
