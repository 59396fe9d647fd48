"""Paper-faithful W8A8 simulation of "Quantizable Transformers" (scheme ``"w8a8"``).

Bondarenko, Nagel, Blankevoort, "Quantizable Transformers: Removing Outliers by Helping Attention
Heads Do Nothing", NeurIPS 2023, arXiv 2306.12929; official code Qualcomm-AI-research/
outlier-free-transformers (``quant_configs.py``, ``quantized_bert.py``, ``quantized_opt.py``,
``quantization/``). Their post-training setting, reproduced on any jaxformers model built from the
shared layers, without editing a model file (Flax ``nn.intercept_methods``):

- Weights: 8-bit symmetric **per-tensor** "current min-max" grids for every Dense / DenseGeneral /
  Conv kernel, embedding table and LayerNorm scale (``quantize_symmetric``); a fused q/k/v kernel
  gets one grid per q, k and v, as the official separate ``query``/``key``/``value`` Linears do.
  Stored as int8 (uint8 for all-positive LayerNorm scales) with a float32 scale; biases stay float.
- Activations: 8-bit asymmetric per-tensor **static** grids from a running min-max (momentum 0.9)
  over the calibration batches; each batch is quantised with the range updated by its own
  statistics, so later quantisers calibrate on quantised inputs (the official estimation pass).
  Quantised: every Dense output (q, k and v separately) except an FFN's first layer, whose
  activation output is quantised instead; attention scores (scaled, before the mask) and
  probabilities (``MultiHeadAttention.attention_probs``); the attention context (before the output
  projection); every LayerNorm output; residual sums: a post-LN model's LayerNorm inputs (BERT,
  OPT-350m: the residual and embedding sums), and in a pre-LN block (GPT-2, OPT, ViT) the block
  input (the stream between blocks and the embedding sum), the input of the FFN's LayerNorm (the
  attention residual) and the final LayerNorm's input.
- Head in float (``keep_float``, default ``quantize.DEFAULT_KEEP_FLOAT``); a token embedding the
  head reads (a tied LM / MLM decoder: ``Embed.attend``) stays float in storage, its lookups
  quantised on the table's per-tensor grid (the same values as looking up the quantised table,
  while the head reads the float table, as the official code's ``fp32_head``).

Deviations (documented, all small): inside a pre-LN block the skip path carries the attention
residual in float (the official OPT code re-quantises the sum itself); BERT's intermediate sum of
word and token-type embeddings is not quantised on its own, only the full embedding sum; the BERT
pooler's output is quantised before its tanh (official: after); the gate networks of gated
attention stay float (as the official code: "do not quantize for now"). ``percentile`` (the
official OPT setting: 99.999) switches the running min-max to per-batch percentiles.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxformers.compress.ops import (batch_range, fake_quant_asymmetric, fake_quant_symmetric, quantize_symmetric,
                                     running_minmax)
from jaxformers.compress.quantize import DEFAULT_KEEP_FLOAT, QuantizedModel, as_call, register_scheme
from jaxformers.layers.attention import MultiHeadAttention
from jaxformers.layers.block import TransformerBlock
from jaxformers.layers.mlp import Mlp

_DENSE = (nn.Dense, nn.DenseGeneral)
_WEIGHTED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed, nn.LayerNorm)
_WEIGHT_LEAF = {nn.Dense: "kernel", nn.DenseGeneral: "kernel", nn.Conv: "kernel", nn.Embed: "embedding",
                nn.LayerNorm: "scale"}


@dataclasses.dataclass(frozen=True)
class W8A8Config:
    weight_bits: int = 8
    act_bits: int = 8
    momentum: float = 0.9
    percentile: float | None = None
    keep_float: str = DEFAULT_KEEP_FLOAT


def _is_pre_norm_block(module: Any) -> bool:
    """A block whose residual stream bypasses its LayerNorms (x + f(LN(x)))."""
    if isinstance(module, TransformerBlock):
        return True
    return type(module).__name__.endswith("DecoderLayer") and bool(getattr(module, "pre_norm", False))


def _path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


class _Quantizers:
    """The activation quantisers of one forward pass: ``observe`` (names only), ``calibrate`` (update
    the running ranges and quantise with them) or ``apply`` (fixed ranges); ``act_fn(name, x)``
    replaces the static per-tensor quantiser (BCT's dynamic blockwise one) in every mode but
    ``observe``. The placement rules are shared by every scheme that uses this class."""

    def __init__(self, mode: str, config: Any, ranges: dict | None = None, embed_scales: dict | None = None,
                 act_fn: Any = None):
        self.mode, self.config, self.act_fn = mode, config, act_fn
        self.ranges, self.embed_scales = ranges or {}, embed_scales or {}
        self.new: dict[str, Any] = {}
        self.modules: dict[str, tuple[type, set, bool]] = {}
        self.keep = re.compile(config.keep_float)
        self.calls: collections.Counter = collections.Counter()

    def act(self, name: str, x: jax.Array) -> jax.Array:
        if self.mode == "observe":
            self.new[name] = None
            return x
        if self.act_fn is not None:
            return self.act_fn(name, x)
        if self.mode == "calibrate":
            r = running_minmax(self.ranges[name], batch_range(x, self.config.percentile), self.config.momentum)
            self.new[name] = r
        else:
            r = self.ranges[name]
        return fake_quant_asymmetric(x, r[0], r[1], self.config.act_bits).astype(x.dtype)

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        path = _path(module)
        if self.mode == "observe":
            entry = self.modules.setdefault(path, (type(module), set(), isinstance(module.parent, MultiHeadAttention)
                                                   and module.name in ("qkv", "kv")))
            entry[1].add(method)
        if self.keep.fullmatch(path) or method not in ("__call__", "attention_probs"):
            return next_fun(*args, **kwargs)
        self.calls[(path, method)] += 1
        calls = self.calls[(path, method)]
        name = path if calls == 1 else f"{path}#{calls}"
        if isinstance(module, MultiHeadAttention) and method == "attention_probs":
            scores, mask = args
            return self.act(name + ":probs", next_fun(self.act(name + ":scores", scores), mask))
        if isinstance(module, _DENSE):
            parent = module.parent
            x, rest = args[0], args[1:]
            if (isinstance(parent, MultiHeadAttention) and module.name == "proj") or (
                    isinstance(parent, Mlp) and module.name == "fc2"):
                x = self.act(name + ":in", x)
            y = next_fun(x, *rest, **kwargs)
            if isinstance(parent, Mlp) and module.name == "fc1":
                return y  # quantised after the activation (fc2's input)
            if isinstance(parent, MultiHeadAttention) and module.name in ("qkv", "kv"):
                return jnp.stack([self.act(f"{name}:out{i}", y[..., i, :, :]) for i in range(y.shape[-3])], axis=-3)
            return self.act(name + ":out", y)
        if isinstance(module, nn.LayerNorm):
            x, rest = args[0], args[1:]
            if not (_is_pre_norm_block(module.parent) and module.name in ("attn_norm", "norm1")):
                x = self.act(name + ":in", x)
            return self.act(name + ":out", next_fun(x, *rest, **kwargs))
        if _is_pre_norm_block(module):
            return next_fun(self.act(name + ":in", args[0]), *args[1:], **kwargs)
        if isinstance(module, nn.Embed) and path in self.embed_scales:
            y = next_fun(*args, **kwargs)
            return fake_quant_symmetric(y, self.embed_scales[path], self.config.weight_bits).astype(y.dtype)
        return next_fun(*args, **kwargs)


def _run(module, variables, quantizers, args, kwargs):
    with nn.intercept_methods(quantizers):
        return module.apply(variables, *args, **kwargs)


def dequantize_params(params: Any, weight_scale: dict[str, jax.Array]) -> Any:
    """Float parameters from integer codes and their scales (leaves not in ``weight_scale`` as they are)."""
    flat = flatten_dict(params, sep="/")
    return unflatten_dict({k: (v.astype(jnp.float32) * weight_scale[k] if k in weight_scale else v)
                           for k, v in flat.items()}, sep="/")


def quantize_w8a8(module: nn.Module, variables: Any, *, calibration: list, keep_float: str = DEFAULT_KEEP_FLOAT,
                  percentile: float | None = None, momentum: float = 0.9, weight_bits: int = 8,
                  act_bits: int = 8) -> tuple[QuantizedModel, dict]:
    """The ``"w8a8"`` scheme (see the module docstring): integer weights, activation ranges from the
    running min-max over ``calibration``, head in float."""
    config = W8A8Config(weight_bits, act_bits, momentum, percentile, keep_float)
    variables = nn.unbox(dict(variables))
    if hasattr(module, "attention_impl") and module.attention_impl != "xla":
        module = module.clone(attention_impl="xla")  # the probabilities go through attention_probs
    args, kwargs = as_call(calibration[0])

    # 1. which modules run (and which embeddings a head reads), and the activation quantisers
    observer = _Quantizers("observe", config)
    jax.eval_shape(lambda v: _run(module, v, observer, args, kwargs), variables)
    points = sorted(observer.new)

    # 2. weights: integer codes + scales (the head, biases and gates stay float)
    params = flatten_dict(variables["params"], sep="/")
    weight_scale, embed_scales = {}, {}
    keep = re.compile(keep_float)
    for path, (kind, methods, fused) in observer.modules.items():
        leaf = next((_WEIGHT_LEAF[t] for t in _WEIGHT_LEAF if issubclass(kind, t)), None)
        key = f"{path}/{leaf}" if path else leaf
        if leaf is None or keep.fullmatch(path) or key not in params:
            continue
        codes, scale = quantize_symmetric(params[key], weight_bits, channel_axes=(1,) if fused else ())
        if issubclass(kind, nn.Embed) and "attend" in methods:  # read by the (float) head: keep the table
            embed_scales[path] = jnp.asarray(scale.reshape(()))
            continue
        params[key], weight_scale[key] = jnp.asarray(codes), jnp.asarray(scale)
    qparams = unflatten_dict(params, sep="/")
    float_params = dequantize_params(qparams, weight_scale)

    # 3. activation ranges: the running min-max, batch by batch, each batch quantised with its update
    @jax.jit
    def calibrate(float_params, ranges, args, kwargs):
        q = _Quantizers("calibrate", config, ranges, embed_scales)
        _run(module, {**variables, "params": float_params}, q, args, kwargs)
        return q.new

    ranges = {name: jnp.full((2,), jnp.nan, jnp.float32) for name in points}
    for batch in calibration:
        ranges = calibrate(float_params, ranges, *as_call(batch))

    quant = {"weight_scale": weight_scale, "act_range": ranges, "embed_scale": embed_scales}

    def run(qvariables, *args, **kwargs):
        quant = qvariables["quant"]
        rest = {k: v for k, v in qvariables.items() if k != "quant"}
        rest["params"] = dequantize_params(rest["params"], quant["weight_scale"])
        return _run(module, rest, _Quantizers("apply", config, quant["act_range"], quant["embed_scale"]), args,
                    kwargs)

    qvariables = {**{k: v for k, v in variables.items() if k != "params"}, "params": qparams, "quant": quant}
    return QuantizedModel(module, "w8a8", run, original=module), qvariables


def activation_points(qvariables: dict) -> dict[str, np.ndarray]:
    """The calibrated [min, max] of every activation quantiser of a ``"w8a8"`` model, by name
    (``<module path>:<in|out|scores|probs|out0..2>``)."""
    return {k: np.asarray(v) for k, v in qvariables["quant"]["act_range"].items()}


register_scheme("w8a8", quantize_w8a8, needs_calibration=True,
                description="paper-faithful W8A8 simulation (Bondarenko et al. 2023): per-tensor symmetric int8 "
                            "weights, per-tensor asymmetric static activations from a running min-max, quantised "
                            "attention scores/probabilities, residual sums and LayerNorms, head in float")
