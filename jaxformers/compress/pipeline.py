"""The survey's toolkit as one pipeline: quantise -> prune -> distil, then deploy int8.

"Full Stack Optimization of Transformer Inference: a Survey" (Kim, Hooper, ..., Shao, Gholami,
arXiv 2302.14017) reviews the ways to make a fixed architecture cheaper: quantisation (integer
matmuls and, beyond them, integer nonlinear ops), sparsity / pruning, and knowledge distillation
to recover the accuracy they cost. ``compress`` chains them on any jaxformers model:

1. **quantise**: the student is the quantisation-aware (fake-quantised, straight-through) form of
   a deployment scheme (``"int8-w8a8"`` -> ``"int8-w8a8-qat"``, ``"int8-weight-only"`` ->
   ``"int8-weight-only-qat"``), built on the float parameters.
2. **prune**: ``prune(module, variables) -> variables`` zeroes parameters (the pruning papers
   register theirs with ``register_pruner``; a callable works too); the zeros are a mask kept
   through distillation.
3. **distil**: ``distill_steps`` AdamW steps on ``batches`` fitting the student's outputs to the
   original float model's (temperature-scaled KL on logits, or MSE), pruned weights held at 0.
4. **deploy**: the distilled float parameters are quantised for real by the scheme (int8 storage).

The report measures each stage against the float teacher (the survey's trade-off, measured here
rather than quoted): bytes, sparsity and the output disagreement on ``batches``.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.compress.quantize import as_call, float32_bytes, quantize, variable_bytes

QAT_FORMS = {"int8-w8a8": "int8-w8a8-qat", "int8-weight-only": "int8-weight-only-qat"}
_PRUNERS: dict[str, Callable[..., Any]] = {}


def register_pruner(name: str, fn: Callable[..., Any]) -> None:
    """Adds a pruner for ``compress(prune=name)``: ``fn(module, variables, **options) -> variables``."""
    if name in _PRUNERS:
        raise ValueError(f"pruner {name!r} is registered twice")
    _PRUNERS[name] = fn


def pruners() -> list[str]:
    return sorted(_PRUNERS)


def _disagreement(student: jax.Array, teacher: jax.Array, loss: str, temperature: float) -> jax.Array:
    if loss == "mse":
        return jnp.mean((student.astype(jnp.float32) - teacher.astype(jnp.float32)) ** 2)
    t = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1)) * temperature ** 2


def _sparsity(params: Any) -> float:
    leaves = [np.asarray(x) for x in jax.tree.leaves(params) if np.ndim(x) >= 2]
    return float(sum((x == 0).sum() for x in leaves) / max(sum(x.size for x in leaves), 1))


def compress(module: nn.Module, variables: Any, batches: list[Any], *, scheme: str = "int8-w8a8",
             prune: str | Callable[..., Any] | None = None, prune_options: dict | None = None,
             distill_steps: int = 0, learning_rate: float = 1e-4, loss: str = "kl", temperature: float = 1.0,
             seed: int = 0) -> tuple[Any, Any, list[dict[str, Any]]]:
    """Quantise -> prune -> distil ``module`` against its float self on ``batches`` (inputs as for
    ``quantize``'s calibration; they also calibrate the deployed scheme), then deploy with
    ``scheme``. Returns ``(module, variables, report)``: the int8 model and one row per stage
    (``stage``, ``bytes``, ``sparsity``, ``disagreement`` with the float model on ``batches``)."""
    import optax

    if scheme not in QAT_FORMS:
        raise ValueError(f"compress deploys a scheme with a quantisation-aware form: one of {sorted(QAT_FORMS)}; "
                         f"got {scheme!r}")
    if loss not in ("kl", "mse"):
        raise ValueError(f"loss must be 'kl' (logits) or 'mse'; got {loss!r}")
    if not batches:
        raise ValueError("compress needs at least one batch of inputs (distillation data and calibration)")
    if isinstance(prune, str) and prune not in _PRUNERS:
        raise ValueError(f"unknown pruner {prune!r}; registered: {pruners() or 'none yet'} (or pass a callable)")
    variables = nn.unbox(dict(variables))
    calls = [as_call(b) for b in batches]
    teacher_apply = jax.jit(module.apply)
    teachers = [teacher_apply(variables, *a, **k) for a, k in calls]
    if not all(isinstance(t, jax.Array) for t in teachers):
        raise TypeError("compress distils array outputs (logits or embeddings); this module returns "
                        f"{type(teachers[0]).__name__}")

    def measure(apply, v) -> float:
        return float(np.mean([_disagreement(apply(v, *a, **k), t, loss, temperature)
                              for (a, k), t in zip(calls, teachers)]))

    report = [{"stage": "float", "bytes": float32_bytes(variables), "sparsity": _sparsity(variables["params"]),
               "disagreement": 0.0}]
    qat, qat_variables = quantize(module, variables, QAT_FORMS[scheme], calibration=batches)
    qat_apply = jax.jit(qat.apply)
    report.append({"stage": "quantize (QAT form)", "bytes": None, "sparsity": report[0]["sparsity"],
                   "disagreement": measure(qat_apply, qat_variables)})

    params = qat_variables["params"]
    masks = None
    if prune is not None:
        fn = _PRUNERS[prune] if isinstance(prune, str) else prune
        pruned = nn.unbox(dict(fn(module, {**qat_variables, "params": params}, **(prune_options or {}))))
        # the zeros the pruner introduced stay zero (parameters that were already 0, e.g. fresh biases, train)
        masks = jax.tree.map(lambda new, old: 1.0 - ((new == 0) & (old != 0)).astype(new.dtype), pruned["params"],
                             params)
        params = pruned["params"]
        report.append({"stage": "prune", "bytes": None, "sparsity": _sparsity(params),
                       "disagreement": measure(qat_apply, {**qat_variables, "params": params})})

    if distill_steps:
        rest = {k: v for k, v in qat_variables.items() if k != "params"}
        tx = optax.adamw(learning_rate, weight_decay=0.0)
        state = tx.init(params)

        @jax.jit
        def step(params, state, args, kwargs, teacher):
            def objective(p):
                return _disagreement(qat.apply({**rest, "params": p}, *args, **kwargs), teacher, loss, temperature)

            value, grads = jax.value_and_grad(objective)(params)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            if masks is not None:
                params = jax.tree.map(lambda p, m: p * m, params, masks)
            return params, state, value

        order = np.random.default_rng(seed).permutation(np.arange(distill_steps) % len(calls))
        for i in order:
            (args, kwargs), teacher = calls[i], teachers[i]
            params, state, _ = step(params, state, args, kwargs, teacher)
        report.append({"stage": f"distill ({distill_steps} steps)", "bytes": None, "sparsity": _sparsity(params),
                       "disagreement": measure(qat_apply, {**qat_variables, "params": params})})

    deployed, deployed_variables = quantize(module, {**variables, "params": params}, scheme, calibration=batches)
    report.append({"stage": f"deploy ({scheme})", "bytes": variable_bytes(deployed_variables),
                   "sparsity": _sparsity(params), "disagreement": measure(jax.jit(deployed.apply), deployed_variables)})
    return deployed, deployed_variables, report
