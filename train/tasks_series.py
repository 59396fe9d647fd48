"""Time-series forecasting: generated correlated price series of one sector, walk-forward splits, and
the ``forecasting`` task (MSE loss; MSE and MAE metrics).

Importing this module (the ``time2vec_forecast`` config does) registers the task and the embedded
dataset ``sector_series``:

- ``sector_prices``: N log-price paths of one "sector" over T days: returns r_{i,t} = β_i m_t + 0.5 r_{1,t-1}
  (series 1 leads the others by a day) + a 20-day seasonal term + idiosyncratic noise, m_t a shared
  market factor. Deterministic in ``seed``.
- The inputs of the target (series 0) are chosen like the paper does, by correlation
  (``jaxformers.models.time2vec.select_correlated_series``, lags 0..2) on the *training* range; returns
  are standardised with training statistics. An example is a window of ``WINDOW`` days of the selected
  series' returns (``window`` (WINDOW, F)) and the target's next return (``target`` (1, 1)).
- Splits are walk-forward: fold i trains on days [0, e_i) and tests on [e_i, e_i + test) with
  e_i = T - (FOLDS - i)·test, so every test day comes after every training day. ``"train"`` /
  ``"test"`` are the last fold; ``"fold{i}_train"`` / ``"fold{i}_test"`` the others (``walk_forward``
  runs them all through the trainer and averages the metrics).
"""
from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import input_pipeline
from train.input_pipeline import Field
from train.tasks import Batch, Task, register_task

NUM_SERIES, DAYS, WINDOW, FOLDS, TEST_DAYS, PEERS, MAX_LAG = 8, 1500, 32, 3, 150, 3, 2


def sector_prices(num_series: int = NUM_SERIES, days: int = DAYS, seed: int = 0) -> np.ndarray:
    """(days, num_series) log prices of one sector (see the module docstring)."""
    rng = np.random.default_rng(seed)
    market = rng.normal(0, 0.01, days)
    beta = rng.uniform(0.5, 1.5, num_series)
    noise = rng.normal(0, 0.01, (days, num_series))
    season = 0.004 * np.sin(2 * np.pi * np.arange(days) / 20.0)
    r = market[:, None] * beta + noise + season[:, None]
    r[1:, [0, 2, 3]] += 0.5 * r[:-1, [1]]  # series 1 leads the target and two peers by one day
    return np.cumsum(r, axis=0) + np.log(100.0)


def fold_bounds(days: int = DAYS, folds: int = FOLDS, test_days: int = TEST_DAYS) -> list[tuple[int, int]]:
    """(train_end, test_end) of each walk-forward fold, expanding training windows."""
    if folds * test_days >= days - 2 * WINDOW:
        raise ValueError(f"{folds} folds of {test_days} test days leave too little training data in {days} days")
    return [(days - (folds - i) * test_days, days - (folds - i - 1) * test_days) for i in range(folds)]


@functools.lru_cache(maxsize=8)
def _fold_arrays(fold: int) -> dict[str, np.ndarray]:
    from jaxformers.models.time2vec import select_correlated_series

    returns = np.diff(sector_prices(), axis=0)
    train_end, test_end = fold_bounds(len(returns))[fold]
    columns = select_correlated_series(returns[:train_end], 0, PEERS, MAX_LAG)
    mean, std = returns[:train_end, columns].mean(0), returns[:train_end, columns].std(0)
    z = ((returns[:, columns] - mean) / std).astype(np.float32)

    def examples(start: int, end: int) -> dict[str, np.ndarray]:
        # the target day t is in [start, end); its window is the WINDOW days before it
        days = np.arange(max(start, WINDOW), end)
        window = np.stack([z[t - WINDOW:t] for t in days])
        return {"window": window, "target": z[days, :1][:, None, :], "columns": np.tile(columns, (len(days), 1))}

    return {"train": examples(0, train_end), "test": examples(train_end, test_end)}


def load_sector_series(split: str) -> dict[str, np.ndarray]:
    """Split ``"train"`` / ``"test"`` (the last fold) or ``"fold{i}_train"`` / ``"fold{i}_test"``."""
    match = re.fullmatch(r"(?:fold(\d+)_)?(train|test)", split)
    if match is None or (match.group(1) is not None and not 0 <= int(match.group(1)) < FOLDS):
        raise ValueError(f"sector_series has splits 'train', 'test' and 'fold{{i}}_train' / 'fold{{i}}_test' for "
                         f"i < {FOLDS}; got {split!r}")
    fold = FOLDS - 1 if match.group(1) is None else int(match.group(1))
    arrays = _fold_arrays(fold)[match.group(2)]
    return {"window": arrays["window"], "target": arrays["target"]}


input_pipeline.EMBEDDED.setdefault("sector_series", (load_sector_series, 0))


@register_task("forecasting")
class ForecastingTask(Task):
    """``batch["window"]`` (L, F) -> forecasts (horizon, targets) against ``batch["target"]``: mean squared
    error loss; evaluation sums of squared and absolute errors (MSE, MAE per forecast value) and of the
    squared error of the zero forecast (``naive_mse``: the "no change" baseline for standardised returns)."""

    def __init__(self):
        self.fields = {"window": Field("float32", (None, None)), "target": Field("float32", (None, None))}

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return (batch["window"],)

    def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        err = outputs.astype(jnp.float32) - batch["target"]
        return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}

    def eval_sums(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        mask = batch["mask"].astype(jnp.float32)
        err = (outputs.astype(jnp.float32) - batch["target"]).reshape(mask.shape[0], -1)
        target = batch["target"].reshape(mask.shape[0], -1)
        return {"mse": jnp.sum(jnp.mean(err ** 2, -1) * mask), "mae": jnp.sum(jnp.mean(jnp.abs(err), -1) * mask),
                "naive_mse": jnp.sum(jnp.mean(target ** 2, -1) * mask), "count": jnp.sum(mask)}

    def predict(self, outputs: jax.Array) -> jax.Array:
        return outputs


def walk_forward(config: Any, workdir, folds: int = FOLDS) -> dict[str, Any]:
    """Trains and evaluates ``config`` (on ``sector_series``) once per walk-forward fold, in
    ``workdir/fold{i}``; returns the per-fold metrics and their means."""
    import pathlib

    from train import trainer

    rows = []
    for i in range(folds):
        fold = config.copy_and_resolve_references()
        fold.input.train_split, fold.input.eval_split = f"fold{i}_train", f"fold{i}_test"
        out = trainer.train_and_evaluate(fold, pathlib.Path(workdir) / f"fold{i}")
        rows.append({k: float(out[f"eval/{k}"]) for k in ("mse", "mae", "naive_mse")})
    return {"folds": rows, **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}}
