"""Checkpoints: the only module that talks to orbax.

A checkpoint at step ``s`` holds three items: ``state`` (the train-state pytree: params, optimizer
state, step, RNG, EMA, batch stats; saved sharded, restored straight into the target shardings),
``data`` (the input iterator's position) and ``meta`` (JSON: model name and overrides, parameter
shapes, and a checksum of the state). Guarantees:

* atomic: orbax writes into a temporary directory and renames it when complete, so a process
  killed mid-save leaves the previous checkpoints intact (the temporary is removed on restart);
* verified: after a restore the state's checksum is recomputed and compared with the one saved;
  a checkpoint that cannot be read or does not match (truncated, corrupted) is moved aside to
  ``<workdir>/checkpoints_corrupt/`` with a warning and the previous one is used;
* finite: a state with NaN/Inf anywhere is never written;
* retention: the last ``keep`` checkpoints plus the ``keep_best`` best by an eval metric;
* async: the write happens in the background; ``wait()`` blocks until it is on disk.
"""
from __future__ import annotations

import logging
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

__all__ = ["Checkpointer", "state_checksum", "CheckpointMismatchError"]

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint belongs to a different model or state layout than the config."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Wrapping uint32 sum of the raw bits of ``x`` (exact and order-independent, so sharded and
    unsharded states give the same value)."""
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:  # 64-bit (only with jax_enable_x64): both halves
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.sum(bits, dtype=jnp.uint32)


@jax.jit
def _checksum_and_finite(state: Any) -> tuple[jax.Array, jax.Array]:
    leaves = jax.tree_util.tree_leaves(state)
    total = jnp.uint32(0)
    for i, leaf in enumerate(leaves):  # weight by position: swapped leaves change the sum
        total = total + _leaf_checksum(jnp.asarray(leaf)) * jnp.uint32(2 * i + 1)
    floats = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return total, jnp.all(jnp.stack(floats)) if floats else jnp.bool_(True)


def state_checksum(state: Any) -> tuple[int, bool]:
    """(uint32 checksum of every bit of the state, whether all its floats are finite)."""
    total, finite = _checksum_and_finite(state)
    return int(total), bool(finite)


class Checkpointer:
    """Periodic, async, verified checkpoints under ``directory`` (= ``<workdir>/checkpoints``)."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, keep_best: int = 1,
                 best_metric: str = "eval/accuracy", best_mode: str = "max", async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        policies = [ocm.LatestN(n=max(1, keep))]
        if keep_best > 0:
            policies.append(ocm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                      n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.best_metric = best_metric
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    # --- reading -------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_state(self, step: int, abstract_state: Any = None) -> Any:
        """The ``state`` item of ``step`` as saved (no verification); into ``abstract_state``'s
        shapes and shardings if given, else with the shardings it was saved with (same topology)."""
        restore = ocp.args.StandardRestore(abstract_state) if abstract_state is not None else ocp.args.StandardRestore()
        return self._manager.restore(step, args=ocp.args.Composite(state=restore)).state

    def read_meta(self, step: int) -> dict | None:
        """The JSON ``meta`` item of ``step`` (cheap: no arrays are read); None if unreadable."""
        try:
            return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as e:  # noqa: BLE001
            log.warning("checkpoint %d: cannot read its metadata (%s)", step, e)
            return None

    def latest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint whose metadata reads; None when there is none."""
        for step in reversed(self.all_steps()):
            meta = self.read_meta(step)
            if meta is not None:
                return step, meta
        return None

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """Restores the newest good checkpoint into ``abstract_state``'s shapes and shardings.

        Returns ``(step, state, data_state, meta)``, or None when no checkpoint exists. A checkpoint
        that fails to read or to verify is moved aside and the next older one is tried."""
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                state, data, meta = restored.state, dict(restored.data), dict(restored.meta)
                checksum, finite = state_checksum(state)
                if checksum != meta.get("checksum") or not finite:
                    raise ValueError(f"checksum {checksum} != saved {meta.get('checksum')}, finite={finite}")
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means "this one is damaged"
                self._quarantine(step, e)
                continue
            return step, state, data, meta
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        target = self.directory.parent / "checkpoints_corrupt" / f"{step}-{int(time.time())}"
        log.warning("checkpoint %d in %s is damaged (%s: %s); moving it to %s and using the previous one",
                    step, self.directory, type(error).__name__, str(error).splitlines()[0][:300] if str(error)
                    else "", target)
        print(f"WARNING: checkpoint {step} is damaged ({type(error).__name__}); moved to {target}; "
              f"falling back to the previous checkpoint", flush=True)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        _barrier(f"quarantine_{step}")
        self._manager.reload()

    # --- writing -------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, data_state: dict, meta: dict, metrics: dict | None = None) -> bool:
        """Starts an (async) save of ``state`` at ``step``. Refuses, with a warning, a state with
        NaN/Inf (returns False). Saving a step that already exists is a no-op."""
        if step in self._manager.all_steps():
            return True
        checksum, finite = state_checksum(state)
        if not finite:
            log.error("step %d: the state has non-finite values; NOT saving a checkpoint", step)
            print(f"ERROR: step {step}: non-finite values in the train state; checkpoint NOT saved", flush=True)
            return False
        meta = {**meta, "checksum": checksum, "step": int(step)}
        metric = {self.best_metric: float(metrics[self.best_metric])} if metrics and self.best_metric in metrics else None
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
            metrics=metric, force=True)
        return True

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def describe_mismatch(saved: dict, expected: dict) -> str | None:
    """Human-readable difference between a checkpoint's ``meta`` and the one this config would save
    (model name, overrides, parameter shapes); None when they agree."""
    problems = []
    if saved.get("model") != expected.get("model"):
        problems.append(f"model {saved.get('model')!r} (overrides {saved.get('model_overrides')}) vs this config's "
                        f"{expected.get('model')!r} (overrides {expected.get('model_overrides')})")
    s_shapes, e_shapes = saved.get("param_shapes", {}), expected.get("param_shapes", {})
    if s_shapes != e_shapes:
        missing = sorted(set(e_shapes) - set(s_shapes))
        extra = sorted(set(s_shapes) - set(e_shapes))
        changed = sorted(k for k in set(s_shapes) & set(e_shapes) if list(s_shapes[k]) != list(e_shapes[k]))
        if missing:
            problems.append(f"parameters missing from the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            problems.append(f"parameters only in the checkpoint: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        for k in changed[:5]:
            problems.append(f"{k}: checkpoint shape {tuple(s_shapes[k])} vs {tuple(e_shapes[k])}")
    if saved.get("state_structure") and expected.get("state_structure") and \
            saved["state_structure"] != expected["state_structure"] and not problems:
        problems.append("train-state layout differs (optimizer, EMA or batch-stats settings changed)")
    return "; ".join(problems) or None


def host_tree(tree: Any) -> Any:
    """Fully-replicated/addressable arrays to numpy (for small trees such as metrics)."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


__all__ += ["describe_mismatch", "host_tree"]
