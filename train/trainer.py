"""The training loop: ``train_and_evaluate(config, workdir)``.

Order of work, so that every user error surfaces before anything compiles: check the workdir and
batch/mesh arithmetic, open the data and check its first train and eval examples against the
task's declared batch fields (``Task.fields``: a missing field or a wrong dtype/shape is named),
build the model (its overrides are checked by the registry),
derive the state's shapes and shardings with ``jax.eval_shape``, and compare them with the
workdir's checkpoint (a checkpoint of another model is an error). Then restore (or init) the state,
compile ``train_step`` once ahead of time from the state's and the declared batch's shapes and
shardings (the state donated) and loop:

* every step: one batch, one ``train_step``; the previous step's finiteness is read back (the device
  stays one step ahead) so a NaN/Inf is reported with its step and parameter group, and the run
  stops after ``max_nonfinite_steps`` in a row; SIGTERM is checked;
* every ``log_every_steps``: averaged train metrics, throughput and MFU to stdout / metrics.jsonl /
  TensorBoard and the progress line;
* every ``eval_every_steps`` and at the end: evaluation (with EMA weights too if enabled);
* every ``checkpoint_every_steps``, at the end, and on SIGTERM: an async checkpoint.

The same command on the same workdir resumes from the newest good checkpoint, bit-identically.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxformers
from jaxformers.sharding import DEFAULT_RULES, FSDP_RULES, MeshConfig, activate, make_mesh
from train import config_lib, input_pipeline, optim, steps
from train.metrics_writer import MetricsWriter, ProgressLine
from train.tasks import get_task

__all__ = ["train_and_evaluate", "build_model", "TrainingStopped", "PEAK_FLOPS"]

# Dense bf16 peak FLOP/s per device, for the MFU estimate (None: unknown -> no MFU reported).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); the last good checkpoint is kept."""


def peak_flops(device: jax.Device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def build_model(config: Any, num_classes: int | None = None):
    """``jaxformers.create_model(config.model.name, **overrides)`` plus the run's switches:
    ``compute_dtype`` -> the model's ``dtype``, ``remat`` -> its ``remat``, and the dataset's class
    count -> ``num_classes`` unless the overrides set it."""
    overrides = dict(config.model.overrides)
    probe = jaxformers.create_model(config.model.name, **overrides)  # validates the overrides
    fields = {f.name for f in dataclasses.fields(type(probe))}
    if num_classes is not None and "num_classes" in fields and "num_classes" not in overrides:
        overrides["num_classes"] = num_classes
    if config.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {config.compute_dtype!r}")
    if config.compute_dtype == "bfloat16":
        if "dtype" not in fields:
            raise ValueError(f"compute_dtype='bfloat16': model {config.model.name!r} has no 'dtype' field")
        overrides["dtype"] = jnp.bfloat16
    if config.remat:
        if "remat" not in fields:
            raise ValueError(f"remat=True: model {config.model.name!r} has no 'remat' field")
        overrides["remat"] = True
    model = jaxformers.create_model(config.model.name, **overrides)
    if num_classes is not None and getattr(model, "num_classes", num_classes) not in (0, None) \
            and model.num_classes < num_classes:
        raise ValueError(f"model.overrides.num_classes={model.num_classes} but the dataset has {num_classes} classes")
    return model


def _check_workdir(workdir: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(workdir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--workdir {str(workdir)!r} exists and is a file, not a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"--workdir {str(workdir)!r}: {parent} is a file")
            break
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_batch(config: Any, mesh, accum: int) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    for name, size in (("batch_size", config.batch_size), ("eval_batch_size", config.eval_batch_size)):
        if size <= 0 or size % n or size % jax.process_count():
            raise ValueError(f"{name}={size} is not divisible by the {n} devices of the batch axes "
                             f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}) and the "
                             f"{jax.process_count()} process(es); use a multiple of {math.lcm(n, jax.process_count())}")
    if accum < 1 or config.batch_size % accum or (config.batch_size // accum) % n:
        raise ValueError(f"accumulation_steps={accum}: batch_size={config.batch_size} must split into {accum} "
                         f"micro-batches each divisible by {n} devices")


def _resolve_steps(config: Any, train_size: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    if config.num_epochs <= 0:
        raise ValueError("set num_train_steps > 0 or num_epochs > 0")
    return max(1, int(math.ceil(config.num_epochs * train_size / config.batch_size)))


def _task_init(task, model, config: Any, train_source):
    """``Task.init_variables`` bound to the model and the first training batch (read without the
    train iterator, the same on every host), or None for tasks that keep the fresh init."""
    from train.tasks import Task

    if type(task).init_variables is Task.init_variables:
        return None
    first = next(input_pipeline.eval_batches(train_source, config.input.eval_pp, fields=task.fields,
                                             global_batch=config.batch_size, num_threads=1,
                                             what=_data_what(config, config.input.train_split, config.input.eval_pp)))
    inputs = task.model_inputs({k: np.asarray(v) for k, v in first.items()})
    return lambda variables: task.init_variables(model, variables, inputs)


def _expected_meta(config: Any, model, spec: steps.StateSpec) -> dict:
    overrides = {k: v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v)
                 for k, v in dict(config.model.overrides).items()}
    return {"model": config.model.name, "model_overrides": overrides, "task": config.task,
            "param_shapes": {k: list(v) for k, v in spec.param_shapes.items()},
            "state_structure": str(jax.tree_util.tree_structure(spec.abstract))}


class _Preemption:
    """SIGTERM -> a flag the loop checks at step boundaries (all hosts agree before acting)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler (e.g. inside some notebook runners)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def _data_what(config: Any, split: str, pp: str) -> str:
    return f"input.dataset {config.input.dataset!r} split {split!r} after pp {pp!r}"


def _evaluate(eval_fn, state, config, source, fields, mesh, use_ema: bool, finish=None) -> dict[str, float]:
    params = state["ema_params"] if use_ema else state["params"]
    totals: dict[str, float] = {}
    for local in input_pipeline.eval_batches(source, config.input.eval_pp, fields=fields,
                                             global_batch=config.eval_batch_size,
                                             process_index=jax.process_index(), process_count=jax.process_count(),
                                             num_threads=config.input.num_threads,
                                             what=_data_what(config, config.input.eval_split, config.input.eval_pp)):
        sums = jax.device_get(eval_fn(params, state.get("batch_stats"),
                                      steps.to_global(local, mesh, config.eval_batch_size)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.pop("count", 0.0), 1.0)
    prefix = "eval_ema" if use_ema else "eval"
    means = {k: v / count for k, v in totals.items()}
    if finish is not None:  # ratios of sums (e.g. entity-level F1), see Task.finish_eval
        means = finish(means)
    return {f"{prefix}/{k}": v for k, v in means.items()}


def _report_nonfinite(metrics: dict, step: int, names: list[str]) -> str:
    grads_ok, params_ok = np.asarray(metrics["grad_finite"]), np.asarray(metrics["param_finite"])
    bad = [names[i] for i in np.flatnonzero(~grads_ok)] or [names[i] for i in np.flatnonzero(~params_ok)]
    groups = sorted({n.rsplit("/", 1)[0] if "/" in n else n for n in bad})
    what = "gradient" if (~grads_ok).any() else "updated parameters" if (~params_ok).any() else "loss"
    shown = ", ".join(groups[:8]) + (f" (+{len(groups) - 8} more)" if len(groups) > 8 else "")
    return (f"step {step}: non-finite {what}" + (f" in {shown}" if shown else "")
            + f" (loss={float(metrics['train/loss']):.4g}); update skipped "
            f"({int(metrics['nonfinite_streak'])} in a row)")


def train_and_evaluate(config: Any, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints).

    Returns the final eval metrics plus ``step``, ``history`` (the logged train rows) and ``state``
    (the final train state)."""
    from train.checkpoint import Checkpointer, CheckpointMismatchError, describe_mismatch

    workdir = _check_workdir(workdir)
    is_main = jax.process_index() == 0
    mesh = make_mesh(MeshConfig(**dict(config.mesh)))
    if config.sharding_rules not in ("default", "fsdp"):
        raise ValueError(f"sharding_rules must be 'default' or 'fsdp', got {config.sharding_rules!r}")
    rules = DEFAULT_RULES if config.sharding_rules == "default" else FSDP_RULES
    _check_batch(config, mesh, config.accumulation_steps)
    task = get_task(config.task, **dict(config.task_args))

    train_source, train_info = input_pipeline.open_source(config.input, config.input.train_split)
    eval_source, eval_info = input_pipeline.open_source(config.input, config.input.eval_split)
    try:  # the first train and eval examples against the task's fields: bad data fails now, named
        train_iter = input_pipeline.TrainIterator(
            train_source, config.input.train_pp, fields=task.fields, global_batch=config.batch_size,
            seed=config.input.shuffle_seed, process_index=jax.process_index(), process_count=jax.process_count(),
            num_threads=config.input.num_threads, prefetch=config.input.prefetch,
            what=_data_what(config, config.input.train_split, config.input.train_pp))
        input_pipeline.resolve_fields(task.fields, eval_source, config.input.eval_pp,
                                      _data_what(config, config.input.eval_split, config.input.eval_pp))
    except input_pipeline.FieldError as e:
        raise input_pipeline.FieldError(f"config.task={config.task!r}: {e}") from None
    total_steps = _resolve_steps(config, train_info.num_examples)
    model = build_model(config, train_info.num_classes)
    schedule = optim.make_schedule(config, total_steps)
    tx = optim.make_optimizer(config, schedule)
    spec = steps.state_spec(model, tx, mesh=mesh, rules=rules, seed=config.seed, ema=config.ema_decay > 0,
                            init_variables=_task_init(task, model, config, train_source))
    meta = _expected_meta(config, model, spec)

    ckpt = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints,
                        best_metric=config.best_metric, best_mode=config.best_mode,
                        async_save=config.async_checkpointing)
    latest = ckpt.latest_meta()
    if latest is not None:
        problem = describe_mismatch(latest[1], meta)
        if problem:
            ckpt.close()
            raise CheckpointMismatchError(f"--workdir {workdir} holds a checkpoint (step {latest[0]}) that does not "
                                          f"fit this config: {problem}. Use a new --workdir.")
    if is_main:
        (workdir / "config.json").write_text(config_lib.to_json(config))

    loop = _Loop(config=config, mesh=mesh, spec=spec, ckpt=ckpt, meta=meta, train_iter=train_iter,
                 eval_source=eval_source, eval_fields=task.fields, total_steps=total_steps, is_main=is_main,
                 names=steps.param_paths(spec.abstract["params"]),
                 writer=MetricsWriter(workdir, enabled=is_main),
                 progress=ProgressLine(total_steps, enabled=is_main and config.progress_bar))
    loop.eval_fn = jax.jit(steps.make_eval_step(model, task), out_shardings=NamedSharding(mesh, P()))
    loop.finish_eval = task.finish_eval
    try:
        with activate(mesh, rules), _Preemption() as preemption:
            restored = ckpt.restore_latest(spec.abstract)
            if restored is None:
                state, start = steps.init_state(spec), 0
            else:
                start, state, data_state, _ = restored
                train_iter.set_state(data_state)
                print(f"Resuming from checkpoint at step {start} in {workdir / 'checkpoints'}", flush=True)
            if start >= total_steps:
                loop.final.update(loop.evaluate(state))
                print(f"Already trained to step {start} of {total_steps}.", flush=True)
                step = start
            else:
                batch = steps.batch_spec(train_iter.fields, config.batch_size, mesh)
                train_step = jax.jit(steps.make_train_step(model, task, tx, schedule, config),
                                     in_shardings=(spec.shardings, steps.batch_shardings(batch, mesh)),
                                     out_shardings=(spec.shardings, NamedSharding(mesh, P())), donate_argnums=0)
                state, step = loop.run(train_step, state, start, preemption)
            ckpt.wait()
    finally:
        loop.progress.close()
        loop.writer.close()
        ckpt.close()
    final = {**loop.final, "step": step, "history": loop.history, "state": state}
    if is_main and "eval/accuracy" in final:
        print(f"Final test accuracy: {final['eval/accuracy']:.4f} (step {step}, {eval_info.num_examples} "
              f"{eval_info.name} {eval_info.split} examples)", flush=True)
    return final


@dataclasses.dataclass
class _Loop:
    """The stateful part of a run (writers, iterator, checkpointer) around the pure step."""

    config: Any
    mesh: Any
    spec: steps.StateSpec
    ckpt: Any
    meta: dict
    train_iter: input_pipeline.TrainIterator
    eval_source: Any
    eval_fields: dict
    total_steps: int
    is_main: bool
    names: list[str]
    writer: MetricsWriter
    progress: ProgressLine
    eval_fn: Any = None
    finish_eval: Any = None
    history: list = dataclasses.field(default_factory=list)
    final: dict = dataclasses.field(default_factory=dict)

    def evaluate(self, state) -> dict[str, float]:
        out = _evaluate(self.eval_fn, state, self.config, self.eval_source, self.eval_fields, self.mesh, use_ema=False,
                        finish=self.finish_eval)
        if self.config.ema_decay > 0:
            out.update(_evaluate(self.eval_fn, state, self.config, self.eval_source, self.eval_fields, self.mesh,
                                 use_ema=True, finish=self.finish_eval))
        return out

    def check(self, metrics: dict | None) -> None:
        """Reports a non-finite step; raises TrainingStopped after too many in a row."""
        if metrics is None or bool(metrics["finite"]):
            return
        m = jax.device_get(metrics)
        message = _report_nonfinite(m, int(m["_step"]), self.names)
        print("WARNING: " + message, flush=True)
        self.writer.write(int(m["_step"]), {"nonfinite/streak": int(m["nonfinite_streak"])})
        if int(m["nonfinite_streak"]) >= self.config.max_nonfinite_steps:
            raise TrainingStopped(f"stopping: {self.config.max_nonfinite_steps} non-finite steps in a row "
                                  f"(last: {message}); the last good checkpoint is kept")

    def run(self, train_step, state, start: int, preemption: _Preemption):
        config, batch_size = self.config, self.config.batch_size
        t0 = time.time()
        compiled = train_step.lower(state, steps.batch_spec(self.train_iter.fields, batch_size, self.mesh)).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops_per_step = float((cost or {}).get("flops", 0.0))
        peak = peak_flops(jax.devices()[0])
        if self.is_main:
            overrides = dict(config.model.get("overrides") or {})
            shown = ", ".join(f"{k}={v}" for k, v in overrides.items() if k != "num_classes")
            print(f"Model {config.model.name}" + (f" with {shown}" if shown else "") + ": "
                  f"{sum(math.prod(s) for s in self.spec.param_shapes.values()):,} params; "
                  f"{self.total_steps} steps of {batch_size}; mesh {dict(self.mesh.shape)}; "
                  f"compiled in {time.time() - t0:.1f}s", flush=True)

        batch = steps.to_global(next(self.train_iter), self.mesh, batch_size)
        pending, prev, step = [], None, start
        last_t, last_step = time.time(), start
        while step < self.total_steps:
            state, metrics = compiled(state, batch)
            step += 1
            metrics["_step"] = step  # 1-based: this update produces step `step` (logs, checkpoints)
            self.check(prev)  # the previous step: the device stays one step ahead of this check
            prev = metrics
            pending.append(metrics)
            if config.debug.kill_at_step == step:  # fault injection for tests
                jax.block_until_ready(state)
                os.kill(os.getpid(), signal.SIGKILL)
            done = step == self.total_steps
            if step % config.log_every_steps == 0 or done:
                self.check(prev)
                prev = None
                host = jax.device_get([{k: v for k, v in m.items() if "/" in k} for m in pending])
                row = {k: float(np.mean([h[k] for h in host])) for k in host[-1]}
                rate = (step - last_step) / max(time.time() - last_t, 1e-9)
                row["throughput/steps_per_sec"] = rate
                row["throughput/examples_per_sec"] = rate * batch_size
                if peak and flops_per_step:
                    row["throughput/mfu"] = flops_per_step * rate / peak
                self.writer.write(step, row)
                self.progress.update(step, steps_per_sec=rate, examples_per_sec=rate * batch_size,
                                     loss=row["train/loss"])
                self.history.append({"step": step, **row})
                pending = []
            eval_metrics = None
            if step % config.eval_every_steps == 0 or done:
                eval_metrics = self.evaluate(state)
                self.writer.write(step, eval_metrics, echo=self.is_main)
                self.final.update(eval_metrics)
            if step % config.checkpoint_every_steps == 0 or done:
                self.ckpt.save(step, state, data_state=self.train_iter.get_state(), meta=self.meta,
                               metrics=eval_metrics)
            if not done and (jax.process_count() == 1 or step % config.log_every_steps == 0) and preemption.agreed():
                self.check(prev)
                self.ckpt.save(step, state, data_state=self.train_iter.get_state(), meta=self.meta)
                self.ckpt.wait()
                print(f"SIGTERM: saved a checkpoint at step {step}; exiting cleanly. Run the same command to "
                      f"resume.", flush=True)
                self.final["preempted"] = True
                return state, step
            if step % config.log_every_steps == 0 or eval_metrics is not None:
                last_t, last_step = time.time(), step  # throughput excludes evaluation
            if not done:
                batch = steps.to_global(next(self.train_iter), self.mesh, batch_size)
        self.check(prev)
        return state, step
