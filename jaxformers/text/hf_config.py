"""Hugging Face ``config.json`` <-> jaxformers BERT fields, and model-directory discovery.

A HF model directory holds ``config.json``, weights (``model.safetensors`` or
``pytorch_model.bin``) and tokenizer files; a sentence-transformers directory adds
``modules.json`` and ``1_Pooling/config.json``. These helpers read and write those files; the
tensor conversion itself lives with the model (``jaxformers/models/bert_convert.py``).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

SUPPORTED_MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "camembert": "roberta", "xlm-roberta": "roberta"}

# HF architecture class suffix -> our head.
ARCHITECTURE_HEADS = {
    "Model": None,
    "ForPreTraining": "pretraining",
    "ForMaskedLM": "mlm",
    "ForNextSentencePrediction": "nsp",
    "ForSequenceClassification": "classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "qa",
}
HEAD_ARCHITECTURES = {v: k for k, v in ARCHITECTURE_HEADS.items()}
HEAD_ARCHITECTURES.update({"cross_encoder": "ForSequenceClassification", "embedding": "Model"})
CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "camembert": "Camembert", "xlm-roberta": "XLMRoberta"}

# Fields copied verbatim between config.json and ``Bert``.
SAME_NAME_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                    "type_vocab_size", "layer_norm_eps", "pad_token_id", "classifier_dropout")


class ConfigError(ValueError):
    """config.json describes a model this loader cannot build (another architecture, or options we lack)."""


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a HF model directory, with a clear error when it is absent."""
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {os.fspath(model_dir)!r}: expected a Hugging Face model "
                                f"directory (config.json + model.safetensors or pytorch_model.bin)")
    return read_json(path)


def weights_file(model_dir: str | os.PathLike) -> pathlib.Path:
    """``model.safetensors`` if present, else ``pytorch_model.bin`` (read with weights_only)."""
    d = pathlib.Path(model_dir)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).is_file():
            return d / name
    if (d / "model.safetensors.index.json").is_file() or (d / "pytorch_model.bin.index.json").is_file():
        raise NotImplementedError(f"{d}: sharded checkpoints (*.index.json) are not supported; merge the shards")
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {os.fspath(d)!r}")


def sentence_transformers_pooling(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """{"pooling": "mean"|"cls"|"max", "normalize_embeddings": bool} for a sentence-transformers
    directory (``modules.json`` with a Pooling module), else None."""
    d = pathlib.Path(model_dir)
    if not (d / "modules.json").is_file():
        return None
    modules = read_json(d / "modules.json")
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    if "Pooling" not in types:
        return None
    cfg_path = d / types["Pooling"].get("path", "1_Pooling") / "config.json"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {"pooling_mode_mean_tokens": True}
    if cfg.get("pooling_mode_cls_token"):
        mode = "cls"
    elif cfg.get("pooling_mode_max_tokens"):
        mode = "max"
    elif cfg.get("pooling_mode_mean_tokens"):
        mode = "mean"
    else:
        raise ConfigError(f"{cfg_path}: unsupported sentence-transformers pooling {cfg}")
    return {"pooling": mode, "normalize_embeddings": "Normalize" in types}


def bert_fields_from_config(config: dict[str, Any], *, source: str = "config.json") -> dict[str, Any]:
    """``Bert`` fields from a HF config dict; ``ConfigError`` for another architecture or options
    this implementation lacks (relative position embeddings, decoder / cross-attention)."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source} describes model_type={model_type!r} (architectures {archs}); "
                          f"jaxformers' BERT loader builds {sorted(SUPPORTED_MODEL_TYPES)} encoders only")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{source}: position_embedding_type={config['position_embedding_type']!r} is not "
                          f"supported (only 'absolute')")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise ConfigError(f"{source}: decoder / cross-attention BERT (is_decoder, add_cross_attention) is not supported")
    fields = {k: config[k] for k in SAME_NAME_FIELDS if k in config and config[k] is not None}
    fields["model_type"] = SUPPORTED_MODEL_TYPES[model_type]
    if "id2label" in config:
        fields["num_labels"] = len(config["id2label"])
    elif "num_labels" in config:
        fields["num_labels"] = int(config["num_labels"])
    head = None
    prefix = CLASS_PREFIX[model_type]
    for arch in archs:
        suffix = arch[len(prefix):] if arch.startswith(prefix) else None
        if suffix in ARCHITECTURE_HEADS:
            head = ARCHITECTURE_HEADS[suffix]
            break
    else:
        if archs:
            raise ConfigError(f"{source}: architectures {archs} are not a supported {prefix} class; expected "
                              f"one of {[prefix + s for s in ARCHITECTURE_HEADS]}")
    fields["head"] = head
    return fields


def config_from_bert(module: Any, *, model_type: str | None = None, id2label: dict | None = None) -> dict[str, Any]:
    """A HF config dict for the ``Bert`` module (``model_type`` e.g. "camembert" to keep a source name)."""
    model_type = model_type or module.model_type
    if SUPPORTED_MODEL_TYPES.get(model_type) != module.model_type:
        raise ConfigError(f"model_type {model_type!r} does not match the module's {module.model_type!r}")
    head = module.head
    config: dict[str, Any] = {"architectures": [CLASS_PREFIX[model_type] + HEAD_ARCHITECTURES[head]],
                              "model_type": model_type}
    for k in SAME_NAME_FIELDS:
        config[k] = getattr(module, k)
    config.update(initializer_range=0.02, position_embedding_type="absolute", is_decoder=False,
                  tie_word_embeddings=True)
    if model_type != "bert":
        config.update(bos_token_id=0, eos_token_id=2)
    if head in ("classification", "token_classification", "cross_encoder"):
        labels = 1 if head == "cross_encoder" else module.num_labels
        id2label = id2label or {i: f"LABEL_{i}" for i in range(labels)}
        config["id2label"] = {str(k): v for k, v in id2label.items()}
        config["label2id"] = {v: int(k) for k, v in id2label.items()}
    return config
