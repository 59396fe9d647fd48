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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxformers.convert.common import StateDict, heads_out, linear, read_checkpoint
from jaxformers.convert.pretrained import CheckpointMismatchError, _describe
from jaxformers.text import hf_config

# (ours, hf, kind); kind: "copy" | "linear" (torch Linear weight) | "heads_out" | "norm" (weight/gamma).
Row = tuple[str, str, str]
HEAD_PREFIXES = ("cls.", "lm_head.", "classifier.", "qa_outputs.")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _dense(ours: str, hf: str) -> list[Row]:
    return [(f"{ours}/kernel", f"{hf}.weight", "linear"), (f"{ours}/bias", f"{hf}.bias", "copy")]


def _norm(ours: str, hf: str) -> list[Row]:
    return [(f"{ours}/scale", f"{hf}.weight", "norm"), (f"{ours}/bias", f"{hf}.bias", "norm")]


def key_table(model) -> tuple[list[Row], list[tuple[str, str]]]:
    """Rows mapping every variable of ``model`` to its HF key (base prefix included), and the
    fused qkv entries as (ours layer prefix, HF layer prefix)."""
    base = "" if model.head in (None, "embedding") else ("bert." if model.model_type == "bert" else "roberta.")
    rows: list[Row] = [
        ("params/embeddings/word_embeddings/embedding", base + "embeddings.word_embeddings.weight", "copy"),
        ("params/embeddings/position_embeddings/embedding", base + "embeddings.position_embeddings.weight", "copy"),
        *_norm("params/embeddings/norm", base + "embeddings.LayerNorm"),
    ]
    if model.type_vocab_size:
        rows.append(("params/embeddings/token_type_embeddings/embedding",
                     base + "embeddings.token_type_embeddings.weight", "copy"))
    qkv = []
    for i in range(model.num_hidden_layers):
        o, t = f"params/layer_{i}/", f"{base}encoder.layer.{i}."
        qkv.append((o + "attn/qkv", t + "attention.self"))
        rows += [(o + "attn/proj/kernel", t + "attention.output.dense.weight", "heads_out"),
                 (o + "attn/proj/bias", t + "attention.output.dense.bias", "copy"),
                 *_norm(o + "attn_norm", t + "attention.output.LayerNorm"),
                 *_dense(o + "mlp/fc1", t + "intermediate.dense"), *_dense(o + "mlp/fc2", t + "output.dense"),
                 *_norm(o + "mlp_norm", t + "output.LayerNorm")]
    if model.has_pooler:
        rows += _dense("params/pooler/dense", base + "pooler.dense")
    head, bert = model.head, model.model_type == "bert"
    if head in ("pretraining", "mlm"):
        if bert:
            rows += [*_dense("params/mlm/dense", "cls.predictions.transform.dense"),
                     *_norm("params/mlm/norm", "cls.predictions.transform.LayerNorm"),
                     ("params/mlm/bias", "cls.predictions.bias", "copy")]
        else:
            rows += [*_dense("params/mlm/dense", "lm_head.dense"), *_norm("params/mlm/norm", "lm_head.layer_norm"),
                     ("params/mlm/bias", "lm_head.bias", "copy")]
    if head in ("pretraining", "nsp"):
        rows += _dense("params/nsp", "cls.seq_relationship")
    if head in ("classification", "cross_encoder"):
        rows += (_dense("params/classifier", "classifier") if bert else
                 [*_dense("params/classifier/dense", "classifier.dense"),
                  *_dense("params/classifier/out_proj", "classifier.out_proj")])
    if head == "token_classification":
        rows += _dense("params/classifier", "classifier")
    if head == "qa":
        rows += _dense("params/qa_outputs", "qa_outputs")
    return rows, qkv


def _find_base(sd: StateDict, wanted: str) -> str:
    """The prefix under which this checkpoint stores the encoder ("", "bert.", "roberta.", ...)."""
    for prefix in ("", "bert.", "roberta.", "camembert.", "model.", "0.auto_model."):
        if prefix + "embeddings.word_embeddings.weight" in sd:
            return prefix
    return wanted


def _rebase(key: str, wanted: str, actual: str) -> str:
    return actual + key[len(wanted):] if wanted and key.startswith(wanted) else (
        actual + key if not wanted and not key.startswith(HEAD_PREFIXES) else key)


def _get_norm(sd: StateDict, key: str) -> str | None:
    alt = key[:-len(".weight")] + ".gamma" if key.endswith(".weight") else key[:-len(".bias")] + ".beta"
    return key if key in sd else alt if alt in sd else None


def convert_hf_bert(sd: StateDict, model, expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """HF state dict -> our flat ``params/...`` arrays (keys absent from ``sd`` are left out, so the
    caller reports them as missing). Buffers, the tied decoder and an unused pooler are skipped."""
    rows, qkv = key_table(model)
    wanted = rows[0][1][: -len("embeddings.word_embeddings.weight")]
    actual = _find_base(sd, wanted)
    h = model.num_attention_heads
    out: dict[str, np.ndarray] = {}
    for ours, hf, kind in rows:
        hf = _rebase(hf, wanted, actual)
        key = _get_norm(sd, hf) if kind == "norm" else (hf if hf in sd else None)
        if key is None:
            continue
        w = sd[key]
        out[ours] = linear(w) if kind == "linear" else heads_out(w, h) if kind == "heads_out" else w
    for ours, hf in qkv:
        hf = _rebase(hf, wanted, actual)
        names = [f"{hf}.{p}" for p in ("query", "key", "value")]
        if all(n + ".weight" in sd for n in names):
            w = np.stack([sd[n + ".weight"] for n in names])  # (3, H*D, E)
            out[ours + "/kernel"] = np.ascontiguousarray(w.reshape(3, h, -1, w.shape[-1]).transpose(3, 0, 1, 2))
        if all(n + ".bias" in sd for n in names):
            out[ours + "/bias"] = np.stack([sd[n + ".bias"] for n in names]).reshape(3, h, -1)
    skip = [actual + b for b in _BUFFERS] + ["cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                                             "lm_head.decoder.weight", "lm_head.decoder.bias"]
    if not model.has_pooler:
        skip += [actual + "pooler.dense.weight", actual + "pooler.dense.bias"]
    sd.skip(*skip)
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


def _check_and_fill(module, converted: dict[str, np.ndarray], sd: StateDict, source: str, *, strict: bool,
                    seed: int) -> dict[str, Any]:
    """Checks names and shapes like ``load_pretrained``; head variables the checkpoint lacks (a new
    task head) are freshly initialised with a warning, as transformers does."""
    inputs = module.example_inputs(1)
    abstract = jax.eval_shape(lambda: nn.unbox(module.init({"params": jax.random.key(0)}, *inputs)))
    expected = {"/".join(k): v for k, v in flatten_dict(abstract).items()}
    is_head = lambda k: k.split("/")[1] in ("mlm", "nsp", "classifier", "qa_outputs")  # noqa: E731
    missing = sorted(set(expected) - set(converted))
    wrong = sorted(k for k in set(expected) & set(converted) if tuple(np.shape(converted[k])) != expected[k].shape)
    unused = sd.unused()
    other_head = [k for k in unused if k.startswith(HEAD_PREFIXES)]
    problems = []
    if [k for k in missing if not is_head(k)]:
        problems.append(_describe("missing in the checkpoint", [k for k in missing if not is_head(k)]))
    if wrong:
        problems.append(_describe("shape mismatch", [f"{k} {np.shape(converted[k])} vs expected {expected[k].shape}"
                                                     for k in wrong]))
    if [k for k in unused if k not in other_head]:
        problems.append(_describe("unexpected checkpoint keys", [k for k in unused if k not in other_head]))
    if problems and strict:
        raise CheckpointMismatchError(f"checkpoint {source} does not fit {type(module).__name__}("
                                      f"head={module.head!r}, "
                                      f"hidden_size={module.hidden_size}, num_hidden_layers="
                                      f"{module.num_hidden_layers}, vocab_size={module.vocab_size}).\n  "
                                      + "\n  ".join(problems))
    fresh_keys = [k for k in missing if is_head(k)] + ([] if strict else [k for k in missing if not is_head(k)] + wrong)
    if other_head or fresh_keys or problems:
        warnings.warn(f"{source}: " + "; ".join(problems + (
            [_describe("newly initialised (train them)", fresh_keys)] if fresh_keys else []) + (
            [_describe("checkpoint head weights not used by head=" + repr(module.head), other_head)]
            if other_head else [])), stacklevel=3)
    flat = {k: jnp.asarray(converted[k], expected[k].dtype) for k in expected if k in converted and k not in wrong}
    if fresh_keys:
        init = nn.unbox(module.init({"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}, *inputs))
        init = {"/".join(k): v for k, v in flatten_dict(init).items()}
        flat.update({k: init[k] for k in fresh_keys})
    return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def load_directory(module, path: str | os.PathLike, *, strict: bool = True, seed: int = 0, mesh: Any = None,
                   rules: Any = None, convert: Any = None) -> dict[str, Any]:
    """``module``'s variables from the weights of the HF directory ``path``: checked like
    ``load_pretrained`` (``_check_and_fill``), placed in their logical shardings with ``mesh``.
    ``convert(sd, module)`` maps the state dict (default ``convert_hf_bert``; other text families
    pass their own)."""
    weights = hf_config.weights_file(path)
    sd = StateDict(read_checkpoint(weights))
    converted = (convert or convert_hf_bert)(sd, module)
    variables = _check_and_fill(module, converted, sd, os.fspath(weights), strict=strict, seed=seed)
    if mesh is not None:
        from jaxformers.sharding import DEFAULT_RULES, logical_shardings

        boxed = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, *module.example_inputs(1)))
        variables = jax.device_put(variables, logical_shardings(boxed, mesh, rules or DEFAULT_RULES))
    return variables


def _export_tensors(module, variables: Any) -> Iterator[tuple[str, np.ndarray]]:
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(nn.unbox(dict(variables))).items()}
    rows, qkv = key_table(module)
    h = module.num_attention_heads
    for ours, hf, kind in rows:
        w = flat[ours]
        if kind == "linear":
            w = w.T
        elif kind == "heads_out":
            w = w.reshape(h * w.shape[1], w.shape[2]).T
        yield hf, w
    for ours, hf in qkv:
        k, b = flat[ours + "/kernel"], flat[ours + "/bias"]  # (E, 3, H, D), (3, H, D)
        w = k.transpose(1, 2, 3, 0).reshape(3, -1, k.shape[0])
        for i, p in enumerate(("query", "key", "value")):
            yield f"{hf}.{p}.weight", w[i]
            yield f"{hf}.{p}.bias", b[i].reshape(-1)


def save_directory(module, variables: Any, path: str | os.PathLike, *, model_type: str | None = None,
                   id2label: dict | None = None, tokenizer: Any = None) -> pathlib.Path:
    """Writes ``config.json`` + ``model.safetensors`` (float32, HF key names) that
    ``transformers.AutoModel*.from_pretrained`` loads; ``tokenizer`` (a ``jaxformers.text.Tokenizer``)
    is saved beside them. ``model_type`` keeps e.g. "camembert" / "xlm-roberta" for RoBERTa-style models."""
    import json

    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if module.head == "embedding":
        warnings.warn("head='embedding' is exported as the bare encoder (BertModel); pooling is applied outside "
                      "transformers (sentence-transformers' Pooling)", stacklevel=2)
    config = hf_config.config_from_bert(module, model_type=model_type, id2label=id2label)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in _export_tensors(module, variables)}
    save_file(tensors, os.fspath(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(path)
    return path

