"""Deployment int8 quantisation through qwix (Google's JAX quantisation library, ``pip install qwix``).

qwix intercepts the matmuls (``lax.dot_general``, ``jnp.einsum``, convolutions) of any Linen model,
so every jaxformers model quantises without changes. Schemes:

- ``"int8-weight-only"``: int8 weights, per output channel (absmax), stored as int8 (qwix
  ``QArray``); activations in float. No calibration.
- ``"int8-w8a8"``: int8 per-channel weights and int8 activations for every Dense input, on a
  per-tensor symmetric static grid: the largest |x| over the calibration batches (measured here;
  passed to qwix as a fixed range per layer: qwix's own static statistics average the absmax per
  token, which clips the tokens above average). XLA runs real int8 dots.
- ``"int8-w8a8-dynamic"``: as ``"int8-w8a8"`` but activation scales computed per token at run time
  (no calibration).
- ``"int8-weight-only-qat"`` / ``"int8-w8a8-qat"``: quantisation-aware training: fake-quantised
  forward (qwix ``QtProvider``: straight-through gradients, clipped to the calibration range), the
  float parameters are the ones you train; quantise them with the PTQ scheme afterwards.

Embedding tables: qwix leaves lookups alone (a lookup is not a matmul, and a tied LM head's
``attend`` would turn the table into an int8 matmul operand its own lookup cannot read), so the PTQ
schemes store every table outside the head as int8 with one float32 scale per row here and
dequantise it inside the jitted forward (a tied head then reads the int8 table's values).

Kept in float: the head (``keep_float``, default ``quantize.DEFAULT_KEEP_FLOAT``) and convolutions
(qwix's PTQ quantises a convolution only with int8 activations too, on scales that depend on the
image size; a ViT has one, its patch embedding). The attention score/probability einsums stay
float (qwix's static scales for them would depend on the sequence length); the paper-faithful
simulation of those is the ``"w8a8"`` scheme.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxformers.compress.quantize import DEFAULT_KEEP_FLOAT, QuantizedModel, as_call, register_scheme


def _qwix():
    try:
        import qwix
    except ImportError as e:  # pragma: no cover - qwix is in the dev extra
        raise ImportError("the int8 deployment schemes need qwix: pip install qwix") from e
    return qwix


def _float_paths(module: nn.Module, variables: Any, args, kwargs, keep_float: str) -> tuple[str, list[str]]:
    """A regex of the module paths qwix must leave alone (``keep_float`` and every ``nn.Embed``), and
    the embeddings' paths."""
    embeds = set()

    def spy(next_fun, a, k, context):
        if isinstance(context.module, nn.Embed):
            embeds.add("/".join(str(p) for p in context.module.path))
        return next_fun(*a, **k)

    with nn.intercept_methods(spy):
        jax.eval_shape(lambda v: module.apply(v, *args, **kwargs), variables)
    return "|".join([f"(?:{keep_float})"] + [re.escape(p) for p in sorted(embeds)]), sorted(embeds)


def _input_absmax(module: nn.Module, variables: Any, calibration: list, float_paths: str) -> dict[str, float]:
    """max |x| over the calibration batches of the input of every Dense outside ``float_paths``."""
    keep = re.compile(float_paths)

    @jax.jit
    def absmax(variables, args, kwargs):
        found = {}

        def spy(next_fun, a, k, context):
            path = "/".join(str(p) for p in context.module.path)
            if (isinstance(context.module, (nn.Dense, nn.DenseGeneral)) and context.method_name == "__call__"
                    and not keep.fullmatch(path)):
                found[path] = jnp.maximum(found.get(path, 0.0), jnp.max(jnp.abs(a[0])))
            return next_fun(*a, **k)

        with nn.intercept_methods(spy):
            module.apply(variables, *args, **kwargs)
        return found

    ranges: dict[str, float] = {}
    for batch in calibration:
        for path, value in absmax(variables, *as_call(batch)).items():
            ranges[path] = max(ranges.get(path, 0.0), float(value))
    return ranges


def _rules(qwix, rule_cls, float_paths: str, acts: str | None, ranges: dict[str, float] | None = None):
    rules = [rule_cls(module_path=float_paths), rule_cls(module_path=".*", op_names=("conv_general_dilated",))]
    if acts is None:
        return rules + [rule_cls(module_path=".*", weight_qtype=jnp.int8)]
    act = dict(act_qtype=jnp.int8, act_calibration_method="absmax", act_batch_axes=(0,))
    for path, a in sorted((ranges or {}).items()):
        a = max(a, 1e-8)
        rules.append(rule_cls(module_path=re.escape(path), op_names=("dot_general",), weight_qtype=jnp.int8,
                              **{**act, "act_calibration_method": f"fixed,{-a!r},{a!r}"}))
    return rules + [rule_cls(module_path=".*", op_names=("dot_general",), weight_qtype=jnp.int8, **act)]


def _deploy(module: nn.Module, variables: Any, *, calibration: list, acts: str | None, qat: bool, name: str,
            keep_float: str = DEFAULT_KEEP_FLOAT, example: Any = None) -> tuple[QuantizedModel, Any]:
    qwix = _qwix()
    variables = nn.unbox(dict(variables))
    batch = calibration[0] if calibration else example
    if batch is None:
        if not hasattr(module, "example_inputs"):
            raise ValueError(f"scheme {name!r}: pass calibration=[batch] (or example=batch) so the model can be "
                             f"traced once")
        batch = tuple(module.example_inputs(1))
    args, kwargs = as_call(batch)
    float_paths, embeds = _float_paths(module, variables, args, kwargs, keep_float)
    rest = {k: v for k, v in variables.items() if k != "params"}
    if qat:
        qt_model = qwix.quantize_model(module, qwix.QtProvider(_rules(qwix, qwix.QtRule, float_paths, acts)))

        def run_qat(v, *a, **k):
            return qt_model.apply(v, *a, **k)

        return QuantizedModel(qt_model, name, run_qat, original=module), variables

    ranges = _input_absmax(module, variables, calibration, float_paths) if acts == "static" else None
    rules = _rules(qwix, qwix.QuantizationRule, float_paths, acts, ranges)
    ptq_model = qwix.quantize_model(module, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(lambda: ptq_model.init(jax.random.key(0), *args, **kwargs))
    qparams = flatten_dict(qwix.quantize_params(variables["params"], abstract["params"]), sep="/")
    keep = re.compile(keep_float)
    tables = {}
    for path in embeds:
        key = f"{path}/embedding"
        if key in qparams and not keep.fullmatch(path):
            table = np.asarray(qparams[key], np.float32)
            scale = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-8) / 127.0
            qparams[key] = jnp.asarray(np.clip(np.round(table / scale), -127, 127).astype(np.int8))
            tables[key] = jnp.asarray(scale, jnp.float32)

    def run(v, *a, **k):
        params = flatten_dict(v["params"], sep="/")
        params.update({key: params[key].astype(jnp.float32) * v["embedding_scale"][key] for key in tables})
        others = {c: x for c, x in v.items() if c not in ("params", "embedding_scale")}
        return ptq_model.apply({**others, "params": unflatten_dict(params, sep="/")}, *a, **k)

    return QuantizedModel(ptq_model, name, run, original=module), {**rest, "params": unflatten_dict(qparams, sep="/"),
                                                                   "embedding_scale": tables}


def _scheme(name: str, acts: str | None, qat: bool, needs_calibration: bool, description: str) -> None:
    def fn(module, variables, *, calibration, **options):
        return _deploy(module, variables, calibration=calibration, acts=acts, qat=qat, name=name, **options)

    register_scheme(name, fn, needs_calibration=needs_calibration, description=description)


_scheme("int8-weight-only", None, False, False, "qwix PTQ: int8 per-channel weights, float activations")
_scheme("int8-w8a8", "static", False, True,
        "qwix PTQ: int8 per-channel weights, int8 per-tensor static activations (calibrated), int8 matmuls")
_scheme("int8-w8a8-dynamic", "dynamic", False, False,
        "qwix PTQ: int8 per-channel weights, int8 activations with per-token scales computed at run time")
_scheme("int8-weight-only-qat", None, True, False, "qwix QAT: fake-quantised int8 per-channel weights, train "
        "the float parameters")
_scheme("int8-w8a8-qat", "dynamic", True, False, "qwix QAT: fake-quantised int8 weights and activations, train "
        "the float parameters")
