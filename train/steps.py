"""The pure functions of training: state construction, ``train_step`` and ``eval_step``.

The train state is a plain dict pytree::

    {"step": int32[], "params": ..., "opt_state": ..., "rng": uint32[2] (raw key data),
     "nonfinite_streak": int32[], "batch_stats": ... (if the model has any),
     "ema_params": ... (if config.ema_decay > 0)}

Everything here is a pure function of its inputs: ``train_step(state, batch) -> (state, metrics)``
derives the step's dropout key as ``fold_in(rng, step)``, so replaying the same batches from a
restored state reproduces the run bit for bit. A non-finite loss, gradient or updated parameter
makes the step a no-op on params / optimizer / EMA / batch stats (the step counter still advances,
the batch is consumed) and is reported per parameter leaf in the metrics.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxformers.registry import example_inputs
from jaxformers.sharding import batch_sharding, logical_shardings
from train.input_pipeline import Field
from train.tasks import Task

__all__ = ["StateSpec", "state_spec", "init_state", "make_train_step", "make_eval_step", "param_paths"]

State = dict[str, Any]


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_paths(params: Any) -> list[str]:
    """``"blocks_0/attn/qkv/kernel"``-style names of the leaves of ``params``, in leaf order."""
    return [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


@dataclasses.dataclass
class StateSpec:
    """Abstract train state (shapes/dtypes, nothing allocated) and its shardings."""

    abstract: State                 # jax.ShapeDtypeStruct leaves carrying their shardings
    shardings: State                # NamedSharding leaves
    init_fn: Callable[[], State]    # jitted: builds the state directly in its shardings
    param_shapes: dict[str, tuple]  # for checkpoint compatibility checks
    has_batch_stats: bool


def state_spec(model: nn.Module, tx: optax.GradientTransformation, *, mesh, rules, seed: int,
               ema: bool, init_variables: Callable[[Any], Any] | None = None) -> StateSpec:
    """Shapes and shardings of the train state, and a jitted init that creates it in place.

    Parameter (and batch-stat) shardings come from the model's logical axis names; optimizer
    state leaves that mirror parameters (Adam moments, momentum, ...) get their parameter's
    sharding and scalars (counts) are replicated. ``init_variables`` (e.g. ``Task.init_variables``)
    maps the fresh variables to the initial ones (same structure) inside the jitted init."""
    inputs = example_inputs(model, 1)
    rngs = {"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}
    boxed = jax.eval_shape(lambda: model.init(rngs, *inputs, train=False))
    var_shardings = logical_shardings(boxed, mesh, rules)
    unboxed = nn.unbox(boxed)
    has_bs = "batch_stats" in unboxed
    replicated = NamedSharding(mesh, P())

    def init() -> State:
        k_params, k_dropout, k_train = jax.random.split(jax.random.key(seed), 3)
        variables = nn.unbox(model.init({"params": k_params, "dropout": k_dropout}, *inputs, train=False))
        if init_variables is not None:
            variables = init_variables(variables)
        params = variables["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                 "rng": jax.random.key_data(k_train), "nonfinite_streak": jnp.zeros((), jnp.int32)}
        if has_bs:
            state["batch_stats"] = variables["batch_stats"]
        if ema:
            state["ema_params"] = jax.tree_util.tree_map(jnp.copy, params)
        return state

    abstract = jax.eval_shape(init)
    p_shard = var_shardings["params"]
    opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], p_shard,
                                      transform_non_params=lambda _: replicated,
                                      is_leaf=lambda x: isinstance(x, NamedSharding))
    shardings = {k: replicated for k in abstract}
    shardings.update(params=p_shard, opt_state=opt_shard)
    if has_bs:
        shardings["batch_stats"] = var_shardings["batch_stats"]
    if ema:
        shardings["ema_params"] = p_shard
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, shardings)
    shapes = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(unboxed["params"])[0]}
    return StateSpec(abstract, shardings, jax.jit(init, out_shardings=shardings), shapes, has_bs)


def init_state(spec: StateSpec) -> State:
    """The initial train state, every leaf born in its sharding."""
    return spec.init_fn()


def _apply(model, task, params, batch_stats, batch, *, train: bool, rng=None):
    variables = {"params": params}
    if batch_stats is not None:
        variables["batch_stats"] = batch_stats
    kwargs = {"rngs": {"dropout": rng}} if train else {}
    if train and batch_stats is not None:
        outputs, updates = task.apply_model(model, variables, *task.model_inputs(batch), train=True,
                                            mutable=["batch_stats"], **kwargs)
        return outputs, updates["batch_stats"]
    return task.apply_model(model, variables, *task.model_inputs(batch), train=train, **kwargs), batch_stats


def _optimizer_count(opt_state: Any, fallback: jax.Array) -> jax.Array:
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return counts[0][1] if counts else fallback


def make_train_step(model: nn.Module, task: Task, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: Any) -> Callable[[State, Any], tuple[State, dict]]:
    """``train_step(state, batch) -> (state, metrics)``: pure; jit it with shardings and donation."""
    accum = int(config.accumulation_steps)
    ema_decay = float(config.ema_decay)
    debug = config.debug

    def loss_fn(params, batch_stats, batch, rng):
        outputs, new_bs = _apply(model, task, params, batch_stats, batch, train=True, rng=rng)
        # A task whose loss draws random numbers (e.g. point-sampled mask losses) gets its own key.
        extra = {"rng": jax.random.fold_in(rng, 1)} if getattr(task, "loss_uses_rng", False) else {}
        loss, metrics = task.loss(outputs, batch, **extra)
        return loss, (metrics, new_bs)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, batch_stats, batch, rng):
        if accum == 1:
            (loss, (metrics, new_bs)), grads = grad_fn(params, batch_stats, batch, rng)
            return loss, metrics, new_bs, grads
        # Micro-batch i takes rows i, i+accum, ...: every micro-batch stays spread over all devices.
        micro = jax.tree_util.tree_map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

        def body(carry, xs):
            grads_sum, loss_sum, metrics_sum, bs = carry
            mb, i = xs
            (loss, (metrics, bs)), grads = grad_fn(params, bs, mb, jax.random.fold_in(rng, i))
            add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)  # noqa: E731
            return (add(grads_sum, grads), loss_sum + loss, add(metrics_sum, metrics), bs), None

        mb0 = jax.tree_util.tree_map(lambda x: x[0], micro)
        _, (m_shape, _) = jax.eval_shape(loss_fn, params, batch_stats, mb0, rng)
        zeros = lambda t: jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), t)  # noqa: E731
        init = (zeros(params), jnp.zeros((), jnp.float32), zeros(m_shape), batch_stats)
        (grads, loss, metrics, new_bs), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum)))
        scale = lambda t: jax.tree_util.tree_map(lambda x: x / accum, t)  # noqa: E731
        return loss / accum, scale(metrics), new_bs, scale(grads)

    def inject_nan(grads, step):
        if debug.nan_grad_step < 0:
            return grads
        number = step + 1  # 1-based, as in the logs and checkpoints: update N produces step N
        hit = (number >= debug.nan_grad_step) & (number < debug.nan_grad_step + max(1, debug.nan_grad_count))

        def one(path, g):
            if debug.nan_grad_param and debug.nan_grad_param not in _path_name(path):
                return g
            return jnp.where(hit, jnp.full_like(g, jnp.nan), g)

        return jax.tree_util.tree_map_with_path(one, grads)

    def train_step(state: State, batch: Any) -> tuple[State, dict]:
        step = state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        params, batch_stats = state["params"], state.get("batch_stats")
        loss, task_metrics, new_bs, grads = gradients(params, batch_stats, batch, rng)
        grads = inject_nan(grads, step)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)

        grad_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)])
        param_finite = jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(new_params)])
        finite = jnp.isfinite(loss) & jnp.all(grad_finite) & jnp.all(param_finite)

        new = {"params": new_params, "opt_state": new_opt}
        if batch_stats is not None:
            new["batch_stats"] = new_bs
        if ema_decay:
            new["ema_params"] = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                                       state["ema_params"], new_params)
        old = {k: state[k] for k in new}
        kept = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
        out = {**state, **kept, "step": step + 1,
               "nonfinite_streak": jnp.where(finite, 0, state["nonfinite_streak"] + 1)}
        metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
                   "train/param_norm": optax.global_norm(out["params"]),
                   "train/lr": schedule(_optimizer_count(state["opt_state"], step)),
                   **{f"train/{k}": v for k, v in task_metrics.items()},
                   "finite": finite, "nonfinite_streak": out["nonfinite_streak"],
                   "grad_finite": grad_finite, "param_finite": param_finite}
        return out, metrics

    return train_step


def make_eval_step(model: nn.Module, task: Task) -> Callable[[Any, Any, Any], dict]:
    """``eval_step(params, batch_stats, batch) -> metric sums`` (see ``Task.eval_sums``)."""

    def eval_step(params, batch_stats, batch):
        outputs, _ = _apply(model, task, params, batch_stats, batch, train=False)
        return task.eval_sums(outputs, batch)

    return eval_step


def batch_shardings(batch: dict[str, Any], mesh) -> dict[str, NamedSharding]:
    """The sharding of each array (or ``ShapeDtypeStruct``) of a global batch: batch axis split."""
    return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def batch_spec(fields: Mapping[str, Field], global_batch: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch that resolved ``fields`` (``input_pipeline.resolve_fields``) make: each
    ``(global_batch, *shape)`` of its dtype, batch axis split over data x fsdp. Used to jit and
    compile the step from the declaration, before any batch is read."""
    unresolved = [name for name, f in fields.items() if None in f.shape]
    if unresolved:
        raise ValueError(f"batch_spec needs resolved fields (input_pipeline.resolve_fields); "
                         f"{unresolved} have None sizes")
    return {name: jax.ShapeDtypeStruct((global_batch, *f.shape), f.dtype,
                                       sharding=batch_sharding(mesh, 1 + len(f.shape)))
            for name, f in fields.items()}


def to_global(local_batch: dict[str, np.ndarray], mesh, global_batch: int) -> dict[str, jax.Array]:
    """Host-local rows -> one global ``jax.Array`` per key, batch axis split over data x fsdp."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v),
                                                      (global_batch, *np.shape(v)[1:]))
            for k, v in local_batch.items()}


__all__ += ["batch_shardings", "batch_spec", "to_global"]
