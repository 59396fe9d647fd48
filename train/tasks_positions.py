"""Position prediction (MP3 pretraining): the model classifies every patch's position.

Importing this module (the ``mp3_digits`` config does) registers the task ``position_prediction``:
``batch["image"]`` -> position logits (B, N, N) -> cross-entropy against positions 0..N-1 (the
patches carry no position embedding, so only the content tells where a patch belongs); metric: the
fraction of patches placed exactly. During training the model hides a random subset of the patches
from the keys and values (``jaxformers.models.mp3``); evaluation shows every patch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train.input_pipeline import Field
from train.tasks import Batch, Task, register_task


@register_task("position_prediction")
class PositionPredictionTask(Task):
    def __init__(self):
        self.fields = {"image": Field("float32", (None, None, None)), "label": Field("int32", ())}

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return (batch["image"],)

    @staticmethod
    def _terms(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, n, _ = logits.shape
        labels = jnp.broadcast_to(jnp.arange(n), (b, n))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean(-1)
        return ce, (jnp.argmax(logits, -1) == labels).mean(-1)

    def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        ce, acc = self._terms(outputs)
        return ce.mean(), {"position_accuracy": acc.mean()}

    def eval_sums(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        mask = batch["mask"].astype(jnp.float32)
        ce, acc = self._terms(outputs)
        return {"loss": jnp.sum(ce * mask), "position_accuracy": jnp.sum(acc * mask), "count": jnp.sum(mask)}

    def predict(self, outputs: jax.Array) -> jax.Array:
        return jnp.argmax(outputs, -1)
