"""Tasks: what a batch feeds the model and how its output becomes a loss and metrics.

The trainer is task-agnostic: the task declares the batch it reads (``fields``: name ->
``Field(dtype, per-example shape)``; the input pipeline delivers exactly those, checked, see
``train/input_pipeline.py``) and gives the model's positional inputs, the training loss (plus
per-batch metrics) and the evaluation sums. A new objective (masked-LM, contrastive, ...) is a
new ``Task`` subclass registered with ``@register_task("name")`` and named by ``config.task``; its
options come from ``config.task_args``.

Evaluation metrics are *sums* over the examples whose ``batch["mask"]`` is 1 (padding examples have
mask 0), plus ``"count"``; the trainer adds them over all eval batches and divides once, so the
result is exact whatever the batch size or host count.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from train.input_pipeline import Field

__all__ = ["Field", "Task", "ClassificationTask", "register_task", "get_task", "list_tasks"]

Batch = dict[str, jax.Array]

_TASKS: dict[str, Callable[..., "Task"]] = {}


def register_task(name: str):
    """Class decorator: make ``config.task = name`` build this task with ``**config.task_args``."""

    def wrap(cls):
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        _TASKS[name] = cls
        cls.name = name
        return cls

    return wrap


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **task_args: Any) -> "Task":
    """The registered task ``name``; unknown names and arguments raise a ValueError saying what is valid."""
    if name not in _TASKS:
        close = difflib.get_close_matches(name, list(_TASKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"config.task: unknown task {name!r}{hint} (registered: {list_tasks()})")
    try:
        return _TASKS[name](**task_args)
    except TypeError as e:
        raise ValueError(f"config.task_args for task {name!r}: {e}") from None


class Task:
    """Base class. ``fields`` are the arrays a batch holds: name -> ``Field(dtype, shape)`` with the
    per-example shape (``None`` = a size the data decides). Every batch has exactly these, with
    these dtypes; data that does not match fails before compiling, naming the field."""

    name = "task"
    fields: dict[str, Field] = {}
    # True: ``loss(outputs, batch, rng=key)`` gets a PRNG key (a fresh one every step).
    loss_uses_rng = False

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar mean training loss and a dict of per-batch scalar metrics (means)."""
        raise NotImplementedError

    def eval_sums(self, outputs: Any, batch: Batch) -> dict[str, jax.Array]:
        """Metric sums over examples with ``batch["mask"] == 1``, including ``"count"``."""
        raise NotImplementedError

    def predict(self, outputs: Any) -> jax.Array:
        """Predictions for display (e.g. class ids)."""
        raise NotImplementedError

    def apply_model(self, model: Any, variables: Any, *inputs: Any, **kwargs: Any) -> Any:
        """How the trainer runs the model (train and eval): ``model.apply`` unless a task needs more
        than the outputs (a distillation task collects intermediate features here). With ``mutable``
        in ``kwargs`` it returns ``(outputs, updated collections)`` like ``model.apply``."""
        return model.apply(variables, *inputs, **kwargs)

    def init_variables(self, model: Any, variables: Any, inputs: tuple) -> Any:
        """The initial variables from a fresh ``model.init`` (same structure back): identity, unless a
        task starts from other weights (a distillation student from its teacher's). ``inputs`` are the
        model inputs of the first training batch (for data-initialised scales). Only runs when the
        workdir has no checkpoint; traced inside the jitted init."""
        return variables

    def finish_eval(self, means: dict[str, float]) -> dict[str, float]:
        """The eval metrics from the per-example means of ``eval_sums`` (each sum divided by
        ``count``): add ratios of sums here (entity-level F1 = 2 correct / (true + predicted))."""
        return means


@register_task("classification")
class ClassificationTask(Task):
    """Image classification: ``batch["image"]`` (float32 HWC) -> logits, softmax cross-entropy
    against ``batch["label"]`` (int32 class ids) with optional label smoothing; accuracy.
    Subclasses feed other inputs by overriding ``fields`` and ``model_inputs``."""

    def __init__(self, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.fields = {"image": Field("float32", (None, None, None)), "label": Field("int32", ())}

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return (batch["image"],)

    def _cross_entropy(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        num_classes = logits.shape[-1]
        targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
        if self.label_smoothing:
            targets = optax.smooth_labels(targets, self.label_smoothing)
        return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)

    def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        per_example = self._cross_entropy(outputs, batch["label"])
        accuracy = jnp.mean(jnp.argmax(outputs, -1) == batch["label"])
        return per_example.mean(), {"accuracy": accuracy}

    def eval_sums(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        mask = batch["mask"].astype(jnp.float32)
        per_example = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), batch["label"])
        correct = (jnp.argmax(outputs, -1) == batch["label"]).astype(jnp.float32)
        return {"loss": jnp.sum(per_example * mask), "accuracy": jnp.sum(correct * mask), "count": jnp.sum(mask)}

    def predict(self, outputs: jax.Array) -> jax.Array:
        return jnp.argmax(outputs, -1)
