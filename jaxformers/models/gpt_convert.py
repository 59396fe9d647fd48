"""Hugging Face GPT-2 / OPT checkpoints and ``config.json`` <-> ``CausalLM``, both directions.

One key table (``key_table``) drives the registry converter (``convert_hf_causal_lm``, used by
``jaxformers.load_pretrained``), ``load_directory`` (``from_pretrained(dir)``) and the export
``save_directory``. Nothing here imports ``gpt.py``: the model file imports this one.

Layouts: GPT-2's ``Conv1D`` weights are already (in, out); its fused ``c_attn`` (E, 3E) is our
``qkv`` (E, 3, H, D) by a reshape. OPT's separate ``q_proj``/``k_proj``/``v_proj`` (torch Linear,
(out, in)) are stacked into the same fused kernel. The tied LM head (``lm_head.weight``) is the
token embedding: not stored, and skipped when a checkpoint carries it. GPT-2's old causal-mask
buffers (``attn.bias``, ``attn.masked_bias``) are skipped.
"""
from __future__ import annotations

import os
import pathlib
import warnings
from typing import Any

import jax
import numpy as np

from jaxformers.convert.common import StateDict, heads_out, linear, read_checkpoint, write_hf_directory
from jaxformers.convert.pretrained import (CheckpointMismatchError, assemble_variables, checkpoint_problems,
                                           flat_variables)
from jaxformers.text import hf_config

MODEL_TYPES = ("gpt2", "opt")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM"}
_BARE = {"gpt2": "GPT2Model", "opt": "OPTModel"}
Row = tuple[str, str, str]  # (ours, hf, kind): kind "copy" | "linear" (torch Linear) | "heads_out" (torch Linear)


# ---------------------------------------------------------------------------------------------
# config.json <-> fields


def fields_from_config(config: dict[str, Any], *, source: str = "config.json") -> dict[str, Any]:
    """``CausalLM`` fields from a GPT-2 or OPT ``config.json``; ``ConfigError`` naming what is not supported."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise hf_config.ConfigError(f"{source} describes model_type={model_type!r}; the causal-LM loader builds "
                                    f"{list(MODEL_TYPES)}")
    archs = config.get("architectures") or []
    known = (ARCHITECTURES[model_type], _BARE[model_type])
    if archs and archs[0] not in known:
        raise hf_config.ConfigError(f"{source}: architectures {archs} are not supported; expected one of "
                                    f"{list(known)} (a language model returning logits)")
    get = config.get
    if model_type == "gpt2":
        if get("add_cross_attention"):
            raise hf_config.ConfigError(f"{source}: GPT-2 with cross-attention (add_cross_attention) is not supported")
        hidden = get("n_embd", 768)
        fields = dict(model_type="gpt2", vocab_size=get("vocab_size", 50257), hidden_size=hidden,
                      num_hidden_layers=get("n_layer", 12), num_attention_heads=get("n_head", 12),
                      ffn_dim=get("n_inner") or 4 * hidden, max_position_embeddings=get("n_positions", 1024),
                      hidden_act=get("activation_function", "gelu_new"), layer_norm_eps=get("layer_norm_epsilon", 1e-5),
                      dropout=get("resid_pdrop", 0.1), embed_dropout=get("embd_pdrop", 0.1),
                      attention_dropout=get("attn_pdrop", 0.1), scale_attn_weights=get("scale_attn_weights", True),
                      scale_attn_by_inverse_layer_idx=get("scale_attn_by_inverse_layer_idx", False),
                      word_embed_proj_dim=None, do_layer_norm_before=True, enable_bias=True)
    else:
        if not get("layer_norm_elementwise_affine", True):
            raise hf_config.ConfigError(f"{source}: OPT without LayerNorm weights (layer_norm_elementwise_affine="
                                        f"false) is not supported")
        if get("_remove_final_layer_norm", False):
            raise hf_config.ConfigError(f"{source}: _remove_final_layer_norm=true is not supported")
        hidden = get("hidden_size", 768)
        proj = get("word_embed_proj_dim") or hidden
        fields = dict(model_type="opt", vocab_size=get("vocab_size", 50272), hidden_size=hidden,
                      num_hidden_layers=get("num_hidden_layers", 12),
                      num_attention_heads=get("num_attention_heads", 12),
                      ffn_dim=get("ffn_dim", 3072), max_position_embeddings=get("max_position_embeddings", 2048),
                      hidden_act=get("activation_function", "relu"), layer_norm_eps=1e-5,
                      dropout=get("dropout", 0.1), embed_dropout=0.0, attention_dropout=get("attention_dropout", 0.0),
                      word_embed_proj_dim=None if proj == hidden else proj,
                      do_layer_norm_before=get("do_layer_norm_before", True), enable_bias=get("enable_bias", True),
                      scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
    fields.update(tie_word_embeddings=get("tie_word_embeddings", True), pad_token_id=get("pad_token_id"),
                  bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"))
    return fields


def config_from_module(module) -> dict[str, Any]:
    """A ``config.json`` dict transformers reads back into the same architecture."""
    m = module
    common = dict(architectures=[ARCHITECTURES[m.model_type]], model_type=m.model_type, vocab_size=m.vocab_size,
                  tie_word_embeddings=m.tie_word_embeddings, pad_token_id=m.pad_token_id, bos_token_id=m.bos_token_id,
                  eos_token_id=m.eos_token_id, activation_function=m.hidden_act)
    if m.model_type == "gpt2":
        return dict(common, n_embd=m.hidden_size, n_layer=m.num_hidden_layers, n_head=m.num_attention_heads,
                    n_inner=m.intermediate_size, n_positions=m.max_position_embeddings, n_ctx=m.max_position_embeddings,
                    layer_norm_epsilon=m.layer_norm_eps, resid_pdrop=m.dropout, embd_pdrop=m.embed_dropout,
                    attn_pdrop=m.attention_dropout, scale_attn_weights=m.scale_attn_weights,
                    scale_attn_by_inverse_layer_idx=m.scale_attn_by_inverse_layer_idx, initializer_range=0.02)
    return dict(common, hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
                num_attention_heads=m.num_attention_heads, ffn_dim=m.intermediate_size,
                max_position_embeddings=m.max_position_embeddings, word_embed_proj_dim=m.embed_dim,
                do_layer_norm_before=m.do_layer_norm_before, enable_bias=m.enable_bias, dropout=m.dropout,
                attention_dropout=m.attention_dropout, layer_norm_elementwise_affine=True, init_std=0.02)


# ---------------------------------------------------------------------------------------------
# the key table


def _norm(ours: str, hf: str) -> list[Row]:
    return [(f"{ours}/scale", f"{hf}.weight", "copy"), (f"{ours}/bias", f"{hf}.bias", "copy")]


def key_table(module) -> tuple[list[Row], list[tuple[str, str]]]:
    """Rows mapping every variable of ``module`` to its HF key (with the LMHead / ForCausalLM
    prefix), and (our qkv prefix, HF attention prefix) per layer for the fused projections."""
    m, bias = module, module.enable_bias
    gpt2 = m.model_type == "gpt2"
    base = "transformer." if gpt2 else "model.decoder."
    rows: list[Row] = [
        ("params/embed_tokens/embedding", base + ("wte.weight" if gpt2 else "embed_tokens.weight"), "copy"),
        ("params/embed_positions/embedding", base + ("wpe.weight" if gpt2 else "embed_positions.weight"), "copy")]
    if m.word_embed_proj_dim is not None:
        rows += [("params/project_in/kernel", base + "project_in.weight", "linear"),
                 ("params/project_out/kernel", base + "project_out.weight", "linear")]
    qkv = []
    for i in range(m.num_hidden_layers):
        o = f"params/layer_{i}/"
        if gpt2:
            t = f"{base}h.{i}."
            qkv.append((o + "attn/qkv", t + "attn.c_attn"))  # c_attn.weight / .bias
            rows += [*_norm(o + "attn_norm", t + "ln_1"), *_norm(o + "mlp_norm", t + "ln_2"),
                     (o + "attn/proj/kernel", t + "attn.c_proj.weight", "conv1d_heads"),
                     (o + "attn/proj/bias", t + "attn.c_proj.bias", "copy"),
                     (o + "mlp/fc1/kernel", t + "mlp.c_fc.weight", "copy"),
                     (o + "mlp/fc1/bias", t + "mlp.c_fc.bias", "copy"),
                     (o + "mlp/fc2/kernel", t + "mlp.c_proj.weight", "copy"),
                     (o + "mlp/fc2/bias", t + "mlp.c_proj.bias", "copy")]
        else:
            t = f"{base}layers.{i}."
            qkv.append((o + "attn/qkv", t + "self_attn"))
            rows += [*_norm(o + "attn_norm", t + "self_attn_layer_norm"),
                     *_norm(o + "mlp_norm", t + "final_layer_norm"),
                     (o + "attn/proj/kernel", t + "self_attn.out_proj.weight", "heads_out"),
                     (o + "mlp/fc1/kernel", t + "fc1.weight", "linear"),
                     (o + "mlp/fc2/kernel", t + "fc2.weight", "linear")]
            if bias:
                rows += [(o + "attn/proj/bias", t + "self_attn.out_proj.bias", "copy"),
                         (o + "mlp/fc1/bias", t + "fc1.bias", "copy"), (o + "mlp/fc2/bias", t + "fc2.bias", "copy")]
    if m.has_final_norm:
        rows += _norm("params/final_norm", base + ("ln_f" if gpt2 else "final_layer_norm"))
    if not m.tie_word_embeddings:
        rows.append(("params/lm_head/kernel", "lm_head.weight", "linear"))
    return rows, qkv


def _find_base(sd: StateDict, model_type: str) -> str:
    """The prefix this checkpoint stores the decoder under ("" / "transformer." / "model.decoder." / "decoder.")."""
    first = "wte.weight" if model_type == "gpt2" else "embed_tokens.weight"
    for prefix in (("transformer.", "") if model_type == "gpt2" else ("model.decoder.", "decoder.", "")):
        if prefix + first in sd:
            return prefix
    return "transformer." if model_type == "gpt2" else "model.decoder."


def convert_hf_causal_lm(sd: StateDict, model, expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """HF state dict -> our flat ``params/...`` arrays (absent keys are left out for the caller to
    report). The tied ``lm_head.weight`` and GPT-2's mask buffers are skipped."""
    rows, qkv = key_table(model)
    wanted = "transformer." if model.model_type == "gpt2" else "model.decoder."
    actual = _find_base(sd, model.model_type)
    rebase = lambda k: actual + k[len(wanted):] if k.startswith(wanted) else k  # noqa: E731
    h = model.num_attention_heads
    out: dict[str, np.ndarray] = {}
    for ours, hf, kind in rows:
        hf = rebase(hf)
        if hf not in sd:
            continue
        w = sd[hf]
        if kind == "linear":
            w = linear(w)
        elif kind == "heads_out":
            w = heads_out(w, h)
        elif kind == "conv1d_heads":  # Conv1D (H*D, E) -> (H, D, E)
            w = w.reshape(h, -1, w.shape[-1])
        out[ours] = w
    for ours, hf in qkv:
        hf = rebase(hf)
        if model.model_type == "gpt2":
            w, b = hf + ".weight", hf + ".bias"
            if w in sd:
                kernel = sd[w]  # (E, 3E): out index = part * E + head * D + d
                out[ours + "/kernel"] = np.ascontiguousarray(kernel.reshape(kernel.shape[0], 3, h, -1))
            if b in sd:
                out[ours + "/bias"] = sd[b].reshape(3, h, -1)
        else:
            names = [f"{hf}.{p}_proj" for p in ("q", "k", "v")]
            if all(n + ".weight" in sd for n in names):
                w = np.stack([sd[n + ".weight"] for n in names])  # (3, H*D, E)
                out[ours + "/kernel"] = np.ascontiguousarray(w.reshape(3, h, -1, w.shape[-1]).transpose(3, 0, 1, 2))
            if model.enable_bias and all(n + ".bias" in sd for n in names):
                out[ours + "/bias"] = np.stack([sd[n + ".bias"] for n in names]).reshape(3, h, -1)
    skip = [k for k in sd.keys() if k.endswith((".attn.bias", ".attn.masked_bias"))]
    if model.tie_word_embeddings:
        skip.append("lm_head.weight")
    sd.skip(*skip)
    return out


# ---------------------------------------------------------------------------------------------
# directories


def load_directory(module, path: str | os.PathLike, *, strict: bool = True, seed: int = 0, mesh: Any = None,
                   rules: Any = None) -> dict[str, Any]:
    """``module``'s variables from the weights of the HF directory ``path``, every name and shape
    checked (``CheckpointMismatchError`` naming them; ``strict=False`` initialises what is missing
    with a warning). With ``mesh`` they are placed in their logical shardings."""
    weights = hf_config.weights_file(path)
    sd = StateDict(read_checkpoint(weights))
    converted = convert_hf_causal_lm(sd, module)
    boxed = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, *module.example_inputs(1)))
    expected = flat_variables(boxed)
    wrong, problems = checkpoint_problems(expected, converted, sd.unused())
    if problems and strict:
        raise CheckpointMismatchError(f"checkpoint {os.fspath(weights)} does not fit CausalLM(model_type="
                                      f"{module.model_type!r}, hidden_size={module.hidden_size}, num_hidden_layers="
                                      f"{module.num_hidden_layers}, vocab_size={module.vocab_size}).\n  "
                                      + "\n  ".join(problems))
    if problems:
        warnings.warn(f"{os.fspath(weights)}: " + "; ".join(problems) + " -- freshly initialised where missing",
                      stacklevel=3)
    return assemble_variables(expected, converted, wrong,
                              lambda: module.init({"params": jax.random.key(seed)}, *module.example_inputs(1)),
                              boxed, mesh, rules)


def export_tensors(module, variables: Any) -> dict[str, np.ndarray]:
    """Our variables as a HF state dict (float32, the LMHead / ForCausalLM key names)."""
    flat = {k: np.asarray(v, np.float32) for k, v in flat_variables(variables).items()}
    rows, qkv = key_table(module)
    out = {}
    for ours, hf, kind in rows:
        w = flat[ours]
        if kind == "linear":
            w = w.T
        elif kind == "heads_out":
            w = w.reshape(-1, w.shape[-1]).T
        elif kind == "conv1d_heads":
            w = w.reshape(-1, w.shape[-1])
        out[hf] = w
    for ours, hf in qkv:
        k = flat[ours + "/kernel"]  # (E, 3, H, D)
        b = flat.get(ours + "/bias")
        if module.model_type == "gpt2":
            out[hf + ".weight"] = k.reshape(k.shape[0], -1)
            out[hf + ".bias"] = b.reshape(-1)
        else:
            w = k.transpose(1, 2, 3, 0).reshape(3, -1, k.shape[0])
            for i, p in enumerate(("q", "k", "v")):
                out[f"{hf}.{p}_proj.weight"] = w[i]
                if b is not None:
                    out[f"{hf}.{p}_proj.bias"] = b[i].reshape(-1)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def save_directory(module, variables: Any, path: str | os.PathLike) -> pathlib.Path:
    """Writes ``config.json`` + ``model.safetensors`` that ``transformers.AutoModelForCausalLM``
    loads (``GPT2LMHeadModel`` / ``OPTForCausalLM``; a tied head is left to transformers to tie)."""
    return write_hf_directory(path, export_tensors(module, variables), config_from_module(module))
