"""Mamba checkpoints <-> ``Mamba`` variables, both directions, and config.json <-> module fields.

Reads transformers' ``MambaForCausalLM`` state dicts (``backbone.embeddings.weight``...) and the official
state-spaces ``MambaLMHeadModel`` ones (``backbone.embedding.weight``, tied ``lm_head.weight`` stored);
writes the transformers layout. Nothing here imports ``mamba.py`` (the model file imports this one).
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Iterator

import numpy as np

from jaxformers.convert.common import StateDict, write_hf_directory
from jaxformers.convert.pretrained import flat_variables

# (ours, hf, kind): kind "copy" | "linear" (torch (out, in) -> (in, out)) | "in_proj" | "in_proj_bias" | "conv".
Row = tuple[str, str, str]


class ConfigError(ValueError):
    """config.json describes a model this loader cannot build."""


def mixer_rows(o: str, t: str, *, use_conv_bias: bool = True, use_bias: bool = False,
               bidirectional: bool = False) -> list[Row]:
    """Rows of one ``MambaMixer`` (our prefix ``o`` ending in "/", the checkpoint's ``t`` ending in
    "."); ``bidirectional`` adds Vision Mamba's backward branch (``conv1d_b``, ``A_b_log``...)."""
    rows: list[Row] = [(o + "in_proj/kernel", t + "in_proj.weight", "in_proj"),
                       (o + "out_proj/kernel", t + "out_proj.weight", "linear")]
    for s in ("", "_b") if bidirectional else ("",):
        rows += [(o + f"conv1d{s}/kernel", t + f"conv1d{s}.weight", "conv"),
                 (o + f"x_proj{s}/kernel", t + f"x_proj{s}.weight", "linear"),
                 (o + f"dt_proj{s}/kernel", t + f"dt_proj{s}.weight", "linear"),
                 (o + f"dt_proj{s}/bias", t + f"dt_proj{s}.bias", "copy"),
                 (o + ("A_b_log" if s else "A_log"), t + ("A_b_log" if s else "A_log"), "copy"),
                 (o + f"D{s}", t + f"D{s}", "copy")]
        if use_conv_bias:
            rows.append((o + f"conv1d{s}/bias", t + f"conv1d{s}.bias", "copy"))
    if use_bias:
        rows += [(o + "in_proj/bias", t + "in_proj.bias", "in_proj_bias"),
                 (o + "out_proj/bias", t + "out_proj.bias", "copy")]
    return rows


def key_table(model) -> list[Row]:
    rows: list[Row] = [("params/embeddings/embedding", "backbone.embeddings.weight", "copy")]
    for i in range(model.num_hidden_layers):
        o, t = f"params/layers_{i}/", f"backbone.layers.{i}."
        rows.append((o + "norm/scale", t + "norm.weight", "copy"))
        rows += mixer_rows(o + "mixer/", t + "mixer.", use_conv_bias=model.use_conv_bias, use_bias=model.use_bias)
    rows.append(("params/norm_f/scale", "backbone.norm_f.weight", "copy"))
    if not model.tie_word_embeddings:
        rows.append(("params/lm_head/kernel", "lm_head.weight", "linear"))
    return rows


def to_ours(w: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(w.T)
    if kind == "in_proj":  # (2E, D) -> (D, 2, E)
        return np.ascontiguousarray(w.reshape(2, -1, w.shape[1]).transpose(2, 0, 1))
    if kind == "in_proj_bias":
        return w.reshape(2, -1)
    if kind == "conv":  # (E, 1, K) -> (K, E)
        return np.ascontiguousarray(w[:, 0, :].T)
    return w


def to_hf(w: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return w.T
    if kind == "in_proj":  # (D, 2, E) -> (2E, D)
        return w.transpose(1, 2, 0).reshape(-1, w.shape[0])
    if kind == "in_proj_bias":
        return w.reshape(-1)
    if kind == "conv":  # (K, E) -> (E, 1, K)
        return w.T[:, None, :]
    return w


def convert_mamba(sd: StateDict, model, expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """A transformers or official state dict -> our flat ``params/...`` arrays (the registry converter
    of every ``mamba_*`` variant). The official ``embedding`` name is read as ``embeddings``; a stored
    copy of a tied head is skipped."""
    del expected
    rename = {}
    if "backbone.embeddings.weight" not in sd and "backbone.embedding.weight" in sd:
        rename["backbone.embeddings.weight"] = "backbone.embedding.weight"
    out = {}
    for ours, hf, kind in key_table(model):
        key = rename.get(hf, hf)
        if key in sd:
            out[ours] = to_ours(sd[key], kind)
    if model.tie_word_embeddings:
        sd.skip("lm_head.weight")
    return out


# ---------------------------------------------------------------------------------------------
# config.json

_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel", "use_bias",
              "use_conv_bias", "layer_norm_epsilon", "residual_in_fp32", "tie_word_embeddings",
              "rescale_prenorm_residual", "time_step_min", "time_step_max", "time_step_floor", "time_step_scale",
              "time_step_init_scheme", "pad_token_id", "bos_token_id", "eos_token_id")


def fields_from_config(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """``Mamba`` fields from a transformers ``MambaConfig`` dict or an official state-spaces config
    (``d_model``, ``n_layer``, ``vocab_size`` padded to ``pad_vocab_size_multiple``, ``ssm_cfg``)."""
    if "model_type" not in config and "d_model" in config:  # official MambaLMHeadModel config
        ssm = dict(config.get("ssm_cfg") or {})
        if ssm.get("layer", "Mamba1") != "Mamba1":
            raise ConfigError(f"{source}: ssm_cfg.layer={ssm['layer']!r}; only Mamba (v1) checkpoints are supported")
        if not config.get("rms_norm", True):
            raise ConfigError(f"{source}: rms_norm=false (LayerNorm blocks) is not supported; Mamba uses RMSNorm")
        vocab, multiple = config["vocab_size"], config.get("pad_vocab_size_multiple", 1)
        vocab += -vocab % multiple
        rank = ssm.get("dt_rank", "auto")
        return dict(vocab_size=vocab, hidden_size=config["d_model"], num_hidden_layers=config["n_layer"],
                    state_size=ssm.get("d_state", 16), expand=ssm.get("expand", 2), conv_kernel=ssm.get("d_conv", 4),
                    time_step_rank=None if rank == "auto" else int(rank), use_bias=ssm.get("bias", False),
                    use_conv_bias=ssm.get("conv_bias", True), layer_norm_epsilon=config.get("norm_epsilon", 1e-5),
                    residual_in_fp32=config.get("residual_in_fp32", True),
                    tie_word_embeddings=config.get("tie_embeddings", True))
    if config.get("model_type") != "mamba":
        raise ConfigError(f"{source}: model_type {config.get('model_type')!r} is not 'mamba'")
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{source}: hidden_act={act!r}; Mamba's mixer is built with SiLU only")
    fields = {k: config[k] for k in _HF_FIELDS if k in config}
    rank = config.get("time_step_rank", "auto")
    auto = math.ceil(fields.get("hidden_size", 768) / 16)
    fields["time_step_rank"] = None if rank in ("auto", None, auto) else int(rank)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(fields.get(k), list):
            fields[k] = fields[k][0]
    return fields


def config_from_module(module) -> dict[str, Any]:
    config = {k: getattr(module, k) for k in _HF_FIELDS}
    config.update(model_type="mamba", architectures=["MambaForCausalLM"], hidden_act="silu",
                  time_step_rank=module.dt_rank, intermediate_size=module.intermediate_size,
                  initializer_range=0.1, use_cache=True, torch_dtype="float32")
    return config


# ---------------------------------------------------------------------------------------------
# Directories


def weights_file(path: pathlib.Path) -> pathlib.Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {os.fspath(path)!r}")


def load_directory(module, path: str | os.PathLike, *, strict: bool = True, mesh: Any = None,
                   rules: Any = None) -> dict[str, Any]:
    """``module``'s variables from the weights in directory ``path``, checked key by key and shape by
    shape like ``jaxformers.load_pretrained`` (which does the work: ``convert_mamba`` is the converter
    registered on every ``mamba_*`` variant, and the module's fields override the variant's)."""
    import dataclasses

    from jaxformers.convert.pretrained import load_pretrained

    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name")}
    return load_pretrained("mamba_130m", weights_file(pathlib.Path(path)), strict=strict, mesh=mesh, rules=rules,
                           **fields)


def _export_tensors(module, variables: Any) -> Iterator[tuple[str, np.ndarray]]:
    flat = flat_variables(variables)
    for ours, hf, kind in key_table(module):
        yield hf, to_hf(flat[ours], kind)


def save_directory(module, variables: Any, path: str | os.PathLike, *, tokenizer: Any = None) -> pathlib.Path:
    """``config.json`` + ``model.safetensors`` (float32, transformers' key names)."""
    return write_hf_directory(path, _export_tensors(module, variables), config_from_module(module), tokenizer)
