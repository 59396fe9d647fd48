"""Hugging Face MPNet checkpoints and directories <-> ``MPNet`` variables, both directions.

One key table (``key_table``) drives the import (``convert_hf_mpnet``) and the export
(``save_directory``). HF's ``attention.attn.{q,k,v}`` become our fused ``attn/qkv`` (E, 3, H, D)
and ``attention.attn.o`` the output projection ``attn/proj`` (H, D, E); the encoder's shared
``relative_attention_bias`` table (buckets, heads) is copied as is. Nothing here imports ``mpnet.py``.
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
        rows += [(o + "attn/proj/kernel", a + "o.weight", heads_out_kind(h)), (o + "attn/proj/bias", a + "o.bias", "copy"),
                 *norm_rows(o + "attn_norm", t + "attention.LayerNorm"),
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


def convert_hf_mpnet(sd: StateDict, model, expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """HF MPNet state dict (``MPNetModel``, a task class or a sentence-transformers export) -> our flat
    ``params/...`` arrays; buffers, the tied decoder and an unused pooler are skipped."""
    rows, fused = key_table(model)
    wanted = "" if model.head in (None, "embedding") else "mpnet."
    actual = find_base(sd, _BASES, default=wanted)

    def move(key: str) -> str:
        return key if key.startswith(("lm_head.", "classifier", "qa_outputs.")) else actual + key[len(wanted):]

    rows = [(o, move(k), kind) for o, k, kind in rows]
    fused = [(o, tuple(move(n) for n in names), h) for o, names, h in fused]
    out = import_tensors(sd, rows, fused)
    skip = [actual + "embeddings.position_ids", "lm_head.decoder.weight", "lm_head.decoder.bias"]
    if not model.has_pooler:
        skip += [actual + "pooler.dense.weight", actual + "pooler.dense.bias"]
    sd.skip(*skip)
    return out


def fields_from_config(config: dict[str, Any], *, source: str = "config.json") -> dict[str, Any]:
    """``MPNet`` fields from a HF ``config.json`` dict (``ConfigError`` for another model_type)."""
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConfigError(f"{source} describes model_type={model_type!r}; the MPNet loader reads model_type='mpnet' only")
    fields = {k: config[k] for k in SAME_NAME_FIELDS if config.get(k) is not None}
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
            raise ConfigError(f"{source}: architectures {archs} are not a supported MPNet class; expected one of "
                              f"{sorted(ARCHITECTURES)}")
    fields["head"] = head
    return fields


def save_directory(module, variables: Any, path: str | os.PathLike, *, id2label: dict | None = None,
                   tokenizer: Any = None) -> pathlib.Path:
    """``config.json`` + ``model.safetensors`` (float32, HF names) that ``transformers`` loads."""
    import flax.linen as nn
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(nn.unbox(dict(variables))).items()}
    rows, fused = key_table(module)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in export_tensors(flat, rows, fused)}
    save_file(tensors, os.fspath(path / "model.safetensors"), metadata={"format": "pt"})
    config: dict[str, Any] = {"architectures": [HEAD_ARCHITECTURE[module.head]], "model_type": MODEL_TYPE,
                              **{k: getattr(module, k) for k in SAME_NAME_FIELDS},
                              "bos_token_id": 0, "eos_token_id": 2, "initializer_range": 0.02,
                              "tie_word_embeddings": True}
    if module.head in ("classification", "token_classification"):
        id2label = id2label or {i: f"LABEL_{i}" for i in range(module.num_labels)}
        config["id2label"] = {str(k): v for k, v in id2label.items()}
        config["label2id"] = {v: int(k) for k, v in id2label.items()}
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(path)
    return path
