"""Hugging Face Longformer checkpoints and directories <-> ``Longformer`` variables, both directions.

One key table (``key_table``) drives the import (``convert_hf_longformer``: the registry converter
and ``from_pretrained(dir)``) and the export (``save_directory``). The local ``query/key/value``
become our fused ``attn/qkv`` (E, 3, H, D); ``query_global`` becomes ``attn/global_q`` (E, H, D)
and ``key_global/value_global`` the fused ``attn/global_kv`` (E, 2, H, D). Recformer's extra
``embeddings.item_position_embeddings`` is read and written under the same name. Nothing here
imports ``longformer.py`` (the model file imports this one).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict

from jaxformers.convert.common import StateDict
from jaxformers.convert.hf_keys import (Fused, Row, dense_rows, export_tensors, find_base, heads_out_kind,
                                        import_tensors, norm_rows)
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
        rows += [(o + "attn/proj/kernel", t + "attention.output.dense.weight", heads_out_kind(h)),
                 (o + "attn/proj/bias", t + "attention.output.dense.bias", "copy"),
                 *norm_rows(o + "attn_norm", t + "attention.output.LayerNorm"),
                 *dense_rows(o + "mlp/fc1", t + "intermediate.dense"), *dense_rows(o + "mlp/fc2", t + "output.dense"),
                 *norm_rows(o + "mlp_norm", t + "output.LayerNorm")]
    if model.has_pooler:
        rows += dense_rows("params/pooler/dense", base + "pooler.dense")
    if model.head == "mlm":
        rows += [*dense_rows("params/mlm/dense", "lm_head.dense"), *norm_rows("params/mlm/norm", "lm_head.layer_norm"),
                 ("params/mlm/bias", "lm_head.bias", "copy")]
    elif model.head == "classification":
        rows += [*dense_rows("params/classifier/dense", "classifier.dense"),
                 *dense_rows("params/classifier/out_proj", "classifier.out_proj")]
    elif model.head == "token_classification":
        rows += dense_rows("params/classifier", "classifier")
    elif model.head == "qa":
        rows += dense_rows("params/qa_outputs", "qa_outputs")
    return rows, fused


def _rebased(model, sd: StateDict) -> tuple[list[Row], list[Fused], str]:
    rows, fused = key_table(model)
    wanted = "" if model.head in (None, "embedding") else "longformer."
    actual = find_base(sd, _BASES, default=wanted)

    def move(key: str) -> str:
        if key.startswith(("lm_head.", "classifier", "qa_outputs.")):
            return key
        return actual + key[len(wanted):]

    rows = [(o, move(k), kind) for o, k, kind in rows]
    fused = [(o, tuple(move(n) for n in names), h) for o, names, h in fused]
    return rows, fused, actual


def convert_hf_longformer(sd: StateDict, model, expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """HF Longformer state dict -> our flat ``params/...`` arrays (absent keys left out, so the
    caller reports them missing). The ``position_ids`` buffer, the tied decoder and an unused
    pooler are skipped; the checkpoint may be a ``LongformerModel`` or a task class."""
    rows, fused, base = _rebased(model, sd)
    out = import_tensors(sd, rows, fused)
    skip = [base + "embeddings.position_ids", "lm_head.decoder.weight", "lm_head.decoder.bias"]
    if not model.has_pooler:
        skip += [base + "pooler.dense.weight", base + "pooler.dense.bias"]
    sd.skip(*skip)
    return out


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
    head = None
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            head = ARCHITECTURES[arch]
            break
    else:
        if archs:
            raise ConfigError(f"{source}: architectures {archs} are not a supported Longformer class; expected one "
                              f"of {sorted(ARCHITECTURES)}")
    fields["head"] = head
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
        id2label = id2label or {i: f"LABEL_{i}" for i in range(module.num_labels)}
        config["id2label"] = {str(k): v for k, v in id2label.items()}
        config["label2id"] = {v: int(k) for k, v in id2label.items()}
    return config


def save_directory(module, variables: Any, path: str | os.PathLike, *, id2label: dict | None = None,
                   tokenizer: Any = None) -> pathlib.Path:
    """``config.json`` + ``model.safetensors`` (float32, HF names) that ``transformers`` loads."""
    import flax.linen as nn
    from safetensors.numpy import save_file

    if module.max_item_embeddings:
        raise ConfigError("a Longformer with item-position embeddings (Recformer) has no Hugging Face class; "
                          "save its variables with jaxformers' checkpointing instead")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(nn.unbox(dict(variables))).items()}
    rows, fused = key_table(module)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in export_tensors(flat, rows, fused)}
    save_file(tensors, os.fspath(path / "model.safetensors"), metadata={"format": "pt"})
    config = config_from_module(module, id2label=id2label)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(path)
    return path
