"""What the Hugging Face converters of the BERT-style encoders (BERT / RoBERTa, Longformer, MPNet) share.

Each family's converter lists its embeddings and attention projections; the rest is common:

- ``post_norm_layer_rows``: a post-norm layer after its q/k/v (output projection, attention LayerNorm,
  ``intermediate.dense`` / ``output.dense``, ``output.LayerNorm``);
- ``head_rows``: the task heads under their HF names (BERT's ``cls.*`` and single-layer classifier, or
  RoBERTa's ``lm_head`` and two-layer classification head) and the pooler;
- ``import_encoder``: the table applied to a checkpoint stored under any of the family's base prefixes
  (``""`` for ``*Model``, ``"bert."`` / ``"longformer."`` for the task classes, ``"0.auto_model."`` in
  some sentence-transformers exports), skipping buffers, the tied decoder and an unused pooler;
- ``check_and_fill``: names and shapes checked as ``load_pretrained`` does, head weights the
  checkpoint lacks (a new task head) freshly initialised with a warning, as transformers does;
- ``load_directory``: ``from_pretrained(dir)`` plumbing (``save_pretrained`` writes through
  ``jaxformers.convert.common.write_hf_directory``);
- ``head_from_architectures`` and ``label_config``: the ``config.json`` fields every family reads and writes.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jaxformers.convert.common import StateDict, read_checkpoint
from jaxformers.convert.hf_keys import Fused, Row, dense_rows, find_base, heads_out_kind, import_tensors, norm_rows
from jaxformers.convert.pretrained import (CheckpointMismatchError, _describe, assemble_variables, checkpoint_problems,
                                           flat_variables)
from jaxformers.text import hf_config

HEAD_PREFIXES = ("cls.", "lm_head.", "classifier.", "qa_outputs.")
HEAD_MODULES = ("mlm", "nsp", "classifier", "qa_outputs")  # our top-level names of task-head variables
_DECODER = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "lm_head.decoder.weight",
            "lm_head.decoder.bias")


def post_norm_layer_rows(ours: str, hf: str, num_heads: int, *, out_proj: str, attn_norm: str) -> list[Row]:
    """Rows of one post-norm layer ``ours`` (``params/layer_i/``) after its q/k/v: the attention output
    projection ``out_proj`` and LayerNorm ``attn_norm`` (full HF names), then the feed-forward under the
    HF layer prefix ``hf`` (``...encoder.layer.i.``)."""
    return [(ours + "attn/proj/kernel", out_proj + ".weight", heads_out_kind(num_heads)),
            (ours + "attn/proj/bias", out_proj + ".bias", "copy"), *norm_rows(ours + "attn_norm", attn_norm),
            *dense_rows(ours + "mlp/fc1", hf + "intermediate.dense"), *dense_rows(ours + "mlp/fc2", hf + "output.dense"),
            *norm_rows(ours + "mlp_norm", hf + "output.LayerNorm")]


def head_rows(head: str | None, *, has_pooler: bool, base: str, bert_style: bool = False) -> list[Row]:
    """The pooler (under ``base``) and the rows of task ``head``: BERT's names (``cls.predictions``,
    ``cls.seq_relationship``, a one-layer ``classifier``) when ``bert_style``, else RoBERTa's
    (``lm_head``, ``classifier.dense`` / ``classifier.out_proj``)."""
    rows = dense_rows("params/pooler/dense", base + "pooler.dense") if has_pooler else []
    if head in ("pretraining", "mlm"):
        rows += ([*dense_rows("params/mlm/dense", "cls.predictions.transform.dense"),
                  *norm_rows("params/mlm/norm", "cls.predictions.transform.LayerNorm"),
                  ("params/mlm/bias", "cls.predictions.bias", "copy")] if bert_style else
                 [*dense_rows("params/mlm/dense", "lm_head.dense"), *norm_rows("params/mlm/norm", "lm_head.layer_norm"),
                  ("params/mlm/bias", "lm_head.bias", "copy")])
    if head in ("pretraining", "nsp"):
        rows += dense_rows("params/nsp", "cls.seq_relationship")
    if head in ("classification", "cross_encoder"):
        rows += (dense_rows("params/classifier", "classifier") if bert_style else
                 [*dense_rows("params/classifier/dense", "classifier.dense"),
                  *dense_rows("params/classifier/out_proj", "classifier.out_proj")])
    if head == "token_classification":
        rows += dense_rows("params/classifier", "classifier")
    if head == "qa":
        rows += dense_rows("params/qa_outputs", "qa_outputs")
    return rows


def import_encoder(sd: StateDict, model: Any, rows: Sequence[Row], fused: Sequence[Fused], *, wanted: str,
                   bases: Sequence[str], buffers: Sequence[str] = ("embeddings.position_ids",)) -> dict[str, np.ndarray]:
    """Our flat ``params/...`` arrays from ``sd`` through a table written for the encoder prefix
    ``wanted``, the checkpoint's actual prefix found among ``bases``; absent keys are left out (the
    caller reports them missing). ``buffers`` (under the prefix), the tied MLM decoder and, when
    ``model`` has no pooler, the checkpoint's pooler are marked as read."""
    actual = find_base(sd, bases, default=wanted)

    def move(key: str) -> str:
        return key if key.startswith(HEAD_PREFIXES) else actual + key[len(wanted):]

    out = import_tensors(sd, [(o, move(k), kind) for o, k, kind in rows],
                         [(o, tuple(move(n) for n in names), h) for o, names, h in fused])
    skip = [actual + b for b in buffers] + list(_DECODER)
    if not model.has_pooler:
        skip += [actual + "pooler.dense.weight", actual + "pooler.dense.bias"]
    sd.skip(*skip)
    return out


def check_and_fill(module: Any, converted: dict[str, np.ndarray], sd: StateDict, source: str, *, strict: bool,
                   seed: int, mesh: Any = None, rules: Any = None) -> dict[str, Any]:
    """Variables of ``module`` from ``converted``, checked like ``load_pretrained``. Task-head variables
    the checkpoint lacks are initialised (seed ``seed``) with a warning, and a checkpoint's weights of
    another head are reported, not refused; anything else missing, mis-shaped or unexpected raises
    ``CheckpointMismatchError`` when ``strict`` (else it is initialised fresh, with a warning)."""
    inputs = module.example_inputs(1)
    boxed = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, *inputs))
    expected = flat_variables(boxed)
    is_head = lambda k: k.split("/")[1] in HEAD_MODULES  # noqa: E731
    unused = sd.unused()
    other_head = [k for k in unused if k.startswith(HEAD_PREFIXES)]
    checked = {k: v for k, v in expected.items() if not is_head(k) or k in converted}  # a missing head is no problem
    wrong, problems = checkpoint_problems(checked, converted, [k for k in unused if k not in other_head])
    if problems and strict:
        raise CheckpointMismatchError(f"checkpoint {source} does not fit {type(module).__name__}(head={module.head!r}, "
                                      f"hidden_size={module.hidden_size}, num_hidden_layers={module.num_hidden_layers}"
                                      f", vocab_size={module.vocab_size}).\n  " + "\n  ".join(problems))
    fresh = [k for k in expected if k not in converted or k in wrong]
    notes = list(problems)
    if fresh:
        notes.append(_describe("newly initialised (train them)", fresh))
    if other_head:
        notes.append(_describe(f"checkpoint head weights not used by head={module.head!r}", other_head))
    if notes:
        warnings.warn(f"{source}: " + "; ".join(notes), stacklevel=3)
    return assemble_variables(expected, converted, wrong, lambda: module.init(
        {"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}, *inputs), boxed, mesh, rules)


def load_directory(module: Any, path: str | os.PathLike, convert: Callable[[StateDict, Any], dict], *,
                   strict: bool = True, seed: int = 0, mesh: Any = None, rules: Any = None) -> dict[str, Any]:
    """``module``'s variables from the weights of the HF directory ``path``: ``convert(sd, module)`` maps
    the state dict, ``check_and_fill`` checks it; placed in their logical shardings with ``mesh``."""
    weights = hf_config.weights_file(path)
    sd = StateDict(read_checkpoint(weights))
    return check_and_fill(module, convert(sd, module), sd, os.fspath(weights), strict=strict, seed=seed, mesh=mesh,
                          rules=rules)


def head_from_architectures(config: Mapping[str, Any], architectures: Mapping[str, str | None], family: str,
                            source: str) -> str | None:
    """The head of the first of ``config["architectures"]`` that ``architectures`` (class name -> head)
    knows; None for no architectures; ``ConfigError`` naming the supported classes otherwise."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in architectures:
            return architectures[arch]
    if archs:
        raise hf_config.ConfigError(f"{source}: architectures {archs} are not a supported {family} class; expected "
                                    f"one of {sorted(architectures)}")
    return None


def label_config(num_labels: int, id2label: Mapping | None = None) -> dict[str, Any]:
    """``id2label`` / ``label2id`` of a classifier with ``num_labels`` outputs (``LABEL_i`` by default)."""
    id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    return {"id2label": {str(k): v for k, v in id2label.items()}, "label2id": {v: int(k) for k, v in id2label.items()}}
