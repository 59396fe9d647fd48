"""Hugging Face BERT / RoBERTa checkpoints <-> ``Bert`` variables, both directions.

One key table (``key_table``) drives the import (``convert_hf_bert``, the registry converter used
by ``jaxformers.load_pretrained``), ``load_directory`` (``from_pretrained(dir)``) and the export
``save_directory`` (``save_pretrained``). Nothing here imports ``bert.py``: the model file imports this one.
HF's separate query/key/value projections become our fused ``qkv`` (E, 3, H, D); the tied MLM
decoder is not stored (it is the word embedding). Old TF-converted checkpoints with
``LayerNorm.gamma/beta`` names are read too.
"""
from __future__ import annotations

import os
import pathlib
import warnings
from typing import Any, Iterator

import numpy as np

from jaxformers.convert import hf_encoder
from jaxformers.convert.common import StateDict, write_hf_directory
from jaxformers.convert.hf_keys import Fused, Row, export_tensors, norm_rows
from jaxformers.convert.pretrained import flat_variables
from jaxformers.text import hf_config

_BASES = ("", "bert.", "roberta.", "camembert.", "model.", "0.auto_model.")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def key_table(model) -> tuple[list[Row], list[Fused]]:
    """Rows mapping every variable of ``model`` to its HF key (base prefix included), and the fused
    q/k/v projections."""
    base = "" if model.head in (None, "embedding") else ("bert." if model.model_type == "bert" else "roberta.")
    h = model.num_attention_heads
    rows: list[Row] = [
        ("params/embeddings/word_embeddings/embedding", base + "embeddings.word_embeddings.weight", "copy"),
        ("params/embeddings/position_embeddings/embedding", base + "embeddings.position_embeddings.weight", "copy"),
        *norm_rows("params/embeddings/norm", base + "embeddings.LayerNorm"),
    ]
    if model.type_vocab_size:
        rows.append(("params/embeddings/token_type_embeddings/embedding",
                     base + "embeddings.token_type_embeddings.weight", "copy"))
    fused: list[Fused] = []
    for i in range(model.num_hidden_layers):
        o, t = f"params/layer_{i}/", f"{base}encoder.layer.{i}."
        s = t + "attention.self."
        fused.append((o + "attn/qkv", (s + "query", s + "key", s + "value"), h))
        rows += hf_encoder.post_norm_layer_rows(o, t, h, out_proj=t + "attention.output.dense",
                                                attn_norm=t + "attention.output.LayerNorm")
    rows += hf_encoder.head_rows(model.head, has_pooler=model.has_pooler, base=base,
                                 bert_style=model.model_type == "bert")
    return rows, fused


def convert_hf_bert(sd: StateDict, model, expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """HF state dict -> our flat ``params/...`` arrays (keys absent from ``sd`` are left out, so the
    caller reports them as missing). Buffers, the tied decoder and an unused pooler are skipped."""
    rows, fused = key_table(model)
    wanted = rows[0][1][: -len("embeddings.word_embeddings.weight")]
    return hf_encoder.import_encoder(sd, model, rows, fused, wanted=wanted, bases=_BASES, buffers=_BUFFERS)


def load_directory(module, path: str | os.PathLike, *, strict: bool = True, seed: int = 0, mesh: Any = None,
                   rules: Any = None) -> dict[str, Any]:
    """``module``'s variables from the weights of the HF directory ``path`` (``hf_encoder.load_directory``:
    checked like ``load_pretrained``, a new task head initialised with a warning, placed on ``mesh``)."""
    return hf_encoder.load_directory(module, path, convert_hf_bert, strict=strict, seed=seed, mesh=mesh, rules=rules)


def save_directory(module, variables: Any, path: str | os.PathLike, *, model_type: str | None = None,
                   id2label: dict | None = None, tokenizer: Any = None) -> pathlib.Path:
    """Writes ``config.json`` + ``model.safetensors`` (float32, HF key names) that
    ``transformers.AutoModel*.from_pretrained`` loads; ``tokenizer`` (a ``jaxformers.text.Tokenizer``)
    is saved beside them. ``model_type`` keeps e.g. "camembert" / "xlm-roberta" for RoBERTa-style models."""
    if module.head == "embedding":
        warnings.warn("head='embedding' is exported as the bare encoder (BertModel); pooling is applied outside "
                      "transformers (sentence-transformers' Pooling)", stacklevel=2)
    config = hf_config.config_from_bert(module, model_type=model_type, id2label=id2label)
    return write_hf_directory(path, hf_tensors(module, variables), config, tokenizer)


def hf_tensors(module, variables: Any) -> Iterator[tuple[str, np.ndarray]]:
    """``(HF key, tensor)`` of every variable of ``module``: the state dict ``save_directory`` writes."""
    rows, fused = key_table(module)
    return export_tensors(flat_variables(variables), rows, fused)
