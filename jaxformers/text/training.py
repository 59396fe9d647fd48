"""A small AdamW fitting loop shared by the text methods (Trans-Encoder, News Deja Vu, Curved
Contrastive Learning, Recformer): a jitted step over a loss function and lists of batches.

``Fitter`` / ``fit`` run AdamW with HF's ``WarmupLinear`` schedule (linear warm-up to
``learning_rate`` over ``warmup_steps``, then linear decay to 0 at the last step; the
sentence-transformers / transformers default), optional gradient clipping, and ``frozen(path)``
parameters that never change (e.g. Recformer's ``--fix_word_embedding``). Batches must share one
shape (one compilation).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def warmup_linear(learning_rate: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    warmup_steps = min(max(0, warmup_steps), total_steps)
    if warmup_steps == 0:
        return optax.linear_schedule(learning_rate, 0.0, max(1, total_steps))
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                 optax.linear_schedule(learning_rate, 0.0, max(1, total_steps - warmup_steps))],
                                [warmup_steps])


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


class Fitter:
    """AdamW on ``loss_fn(params, batch, rng) -> scalar`` with one compiled step, run over batches in
    as many ``run`` calls as needed (the optimizer state and the schedule continue across calls; the
    schedule spans ``total_steps``). ``params`` may be replaced between calls (e.g. reloading the
    best checkpoint, as Recformer's stage 2 does); ``frozen(path)`` (path like
    ``"layer_0/attn/qkv/kernel"``) marks parameters that keep their values; ``compiler_options`` go to
    ``jax.jit``."""

    def __init__(self, loss_fn: Callable[[Any, Any, jax.Array], jax.Array], params: Any, *, learning_rate: float,
                 total_steps: int, weight_decay: float = 0.01, warmup_steps: int = 0,
                 grad_clip_norm: float | None = 1.0, frozen: Callable[[str], bool] | None = None, seed: int = 0,
                 compiler_options: dict | None = None):
        tx = optax.adamw(warmup_linear(learning_rate, total_steps, warmup_steps), weight_decay=weight_decay)
        if grad_clip_norm:
            tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
        if frozen is not None:
            labels = jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if frozen(_path_name(p)) else "train",
                                                      params)
            tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
        self.params = jax.tree.map(jnp.array, params)  # own copies: the caller's arrays are never donated
        self.opt_state = tx.init(self.params)
        self.seed, self.steps = seed, 0

        def step(params, opt_state, batch, rng):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._step = jax.jit(step, compiler_options=compiler_options, donate_argnums=(0, 1))

    def run(self, batches: Iterable[Any]) -> list[float]:
        """One step per batch; returns the losses."""
        losses = []
        for batch in batches:
            self.params, self.opt_state, loss = self._step(self.params, self.opt_state, batch,
                                                           jax.random.key(self.seed * 100003 + self.steps))
            self.steps += 1
            losses.append(float(loss))
        return losses

    def set_params(self, params: Any) -> None:
        self.params = jax.tree.map(jnp.array, params)


def fit(loss_fn: Callable[[Any, Any, jax.Array], jax.Array], params: Any, batches: Sequence[Any] | Iterable[Any], *,
        learning_rate: float, weight_decay: float = 0.01, warmup_steps: int = 0, grad_clip_norm: float | None = 1.0,
        frozen: Callable[[str], bool] | None = None, seed: int = 0, compiler_options: dict | None = None
        ) -> tuple[Any, list[float]]:
    """``Fitter`` over one list of ``batches`` (the schedule spans them); returns (params, losses)."""
    batches = list(batches)
    if not batches:
        return params, []
    fitter = Fitter(loss_fn, params, learning_rate=learning_rate, total_steps=len(batches), weight_decay=weight_decay,
                    warmup_steps=warmup_steps, grad_clip_norm=grad_clip_norm, frozen=frozen, seed=seed,
                    compiler_options=compiler_options)
    losses = fitter.run(batches)
    return fitter.params, losses


def batched(arrays: dict[str, np.ndarray], batch_size: int, *, epochs: int = 1, seed: int = 0,
            shuffle: bool = True) -> list[dict[str, np.ndarray]]:
    """Equal-sized batches (the last partial one dropped) of the rows of ``arrays``, reshuffled per epoch."""
    n = len(next(iter(arrays.values())))
    if n < batch_size:
        raise ValueError(f"{n} examples are fewer than one batch of {batch_size}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        for i in range(0, n - batch_size + 1, batch_size):
            rows = order[i:i + batch_size]
            out.append({k: v[rows] for k, v in arrays.items()})
    return out
