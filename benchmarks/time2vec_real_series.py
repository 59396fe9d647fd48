"""Walk-forward forecasting on a real price series: the Time2Vec transformer encoder against the random walk
and linear autoregressions, in the same run on the same folds.

    PYTHONPATH=. python benchmarks/time2vec_real_series.py --source arch_sp500 --steps 500 --seeds 0 1

Data: a ``train/tasks_series.py`` source (``arch_sp500``: the daily S&P 500 close with its correlation-
selected peers, files shipped by the ``arch`` package; ``plotly_stocks``; ``generated``) and its walk-forward
folds (each fold trains on everything before its test block). Per fold and seed the forecaster
(``time2vec_forecaster``: Time2Vec of the step, 2 pre-norm blocks of width 64, 4 heads, k=16, dropout 0.1)
trains ``--steps`` AdamW steps (lr 1e-3, weight decay 0.01, cosine with 50 warm-up steps, batch 64: the
``time2vec_forecast`` config, run by ``train.trainer.train_and_evaluate`` as the CLI runs it) on standardised
log returns of the selected series and forecasts the target's next log return r̂, i.e. its next price
P_t·exp(r̂). Baselines on the same test steps:

- ``random walk``: tomorrow's price = today's (r̂ = 0);
- ``AR(p)``: r̂ = a + Σ b_i r_{t-i}, the target's own last ``--lags`` returns, least squares on the fold's
  training range;
- ``linear (window)``: the same least squares on the forecaster's whole input window (every selected
  series, every step of the window; ridge 1e-3 on standardised inputs).

Reported: MSE and MAE of the price (index points), MSE of the log return (x 1e4), the fraction of days whose
direction (up / down) is right, each price MSE over the random walk's and the Diebold-Mariano t statistic of
the squared price errors against the random walk's (negative: better; |t| < 2: not significant), pooled over
all folds' test steps.
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np


def _train_forecaster(source: str, fold: int, train: dict, test: dict, *, steps: int, seed: int, workdir: str):
    """The ``time2vec_forecast`` config on this fold, through the training library (``train_and_evaluate``:
    the CLI's loop, shuffled epochs, the config's AdamW and schedule); returns the test forecasts
    (standardised), the training loss of the first and last 20 steps and the MSE on the whole training
    range."""
    import jax
    import jax.numpy as jnp

    from train import config_lib, trainer

    spec = pathlib.Path(__file__).resolve().parents[1] / "train" / "configs" / "time2vec_forecast.py"
    config = config_lib.resolve_config(f"{spec}:source={source},steps={steps}", [])
    config.seed = config.input.shuffle_seed = seed
    config.input.train_split, config.input.eval_split = f"fold{fold}_train", f"fold{fold}_test"
    config.log_every_steps, config.progress_bar = 20, False
    out = trainer.train_and_evaluate(config, workdir)
    losses = [row["train/loss"] for row in out["history"]]
    apply = jax.jit(lambda x: trainer.build_model(config).apply({"params": out["state"]["params"]}, x))
    x = np.asarray(train["window"])
    fitted = np.concatenate([np.asarray(apply(jnp.asarray(x[i:i + 512]))) for i in range(0, len(x), 512)])
    train_mse = float(np.mean((fitted - train["target"]) ** 2))
    pred = np.asarray(apply(jnp.asarray(test["window"])))
    return pred[:, 0, 0].astype(np.float64), (losses[0], losses[-1]), train_mse


def _least_squares(a: np.ndarray, b: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    a1 = np.column_stack([np.ones(len(a)), a])
    reg = ridge * len(a) * np.eye(a1.shape[1])
    reg[0, 0] = 0.0
    return np.linalg.solve(a1.T @ a1 + reg, a1.T @ b)


def _linear_baselines(train: dict, test: dict, lags: int) -> dict[str, np.ndarray]:
    """Standardised-return forecasts of AR(lags) on the target and of a ridge regression on the window."""
    out = {}
    tr, te = train["window"][:, -lags:, 0], test["window"][:, -lags:, 0]
    coef = _least_squares(tr, train["target"][:, 0, 0])
    out[f"AR({lags})"] = coef[0] + te @ coef[1:]
    tr, te = train["window"].reshape(len(train["window"]), -1), test["window"].reshape(len(test["window"]), -1)
    coef = _least_squares(tr, train["target"][:, 0, 0], ridge=1e-3)
    out["linear (window)"] = coef[0] + te @ coef[1:]
    return out


def _metrics(r_hat: np.ndarray, r: np.ndarray, last: np.ndarray, price: np.ndarray) -> dict[str, float]:
    p_hat = last * np.exp(r_hat)
    # Diebold-Mariano statistic of the squared price error against the random walk's (one-step forecasts:
    # plain standard error); negative = better than the random walk, |t| < 2 = no significant difference
    d = (p_hat - price) ** 2 - (last - price) ** 2
    dm = float(np.mean(d) / (np.std(d, ddof=1) / np.sqrt(len(d)))) if np.any(d) else 0.0
    return {"price_mse": float(np.mean((p_hat - price) ** 2)), "price_mae": float(np.mean(np.abs(p_hat - price))),
            "dm": dm,
            "ret_mse": float(np.mean((r_hat - r) ** 2)),
            "direction": float(np.mean(np.sign(r_hat) == np.sign(r))) if np.any(r_hat) else float("nan")}


def main(argv: list[str] | None = None) -> dict:
    from train import tasks_series

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="arch_sp500", choices=sorted(tasks_series.SOURCES))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lags", type=int, default=5)
    parser.add_argument("--folds", type=int, default=None, help="the first N folds only (default: all)")
    args = parser.parse_args(argv)

    spec = tasks_series.SOURCES[args.source]
    series = spec.load()
    print(f"source {args.source}: {series.prices.shape[0]} steps x {series.prices.shape[1]} series, "
          f"{series.dates[0]} .. {series.dates[-1]}; target {series.columns[series.target]}")
    pooled: dict[str, list] = {}
    truth = {"r": [], "last": [], "price": []}
    folds = spec.folds if args.folds is None else args.folds
    for fold in range(folds):
        data = tasks_series.fold_data(args.source, fold)
        train, test = data["train"], data["test"]
        mean, std = float(train["mean"][0]), float(train["std"][0])
        raw = lambda z: mean + std * np.asarray(z, np.float64)  # noqa: E731  standardised -> log return
        r = raw(test["target"][:, 0, 0])
        truth["r"].append(r), truth["last"].append(test["last_price"]), truth["price"].append(test["price"])
        print(f"fold {fold}: train {len(train['window'])} windows, test {len(test['window'])} steps "
              f"{test['date'][0]} .. {test['date'][-1]}, inputs {[series.columns[c] for c in train['columns']]}")
        forecasts = {"random walk": np.zeros_like(r)}
        forecasts.update({k: raw(v) for k, v in _linear_baselines(train, test, args.lags).items()})
        for seed in args.seeds:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as workdir:
                z_hat, (first, last), train_mse = _train_forecaster(args.source, fold, train, test, steps=args.steps,
                                                                    seed=seed, workdir=workdir)
            forecasts[f"Time2Vec encoder (seed {seed})"] = raw(z_hat)
            print(f"  seed {seed}: training loss {first:.3f} (first 20 steps) -> {last:.3f} (last 20); whole "
                  f"training range MSE {train_mse:.3f} vs {np.mean(train['target'] ** 2):.3f} for the zero forecast "
                  f"(standardised); {time.perf_counter() - start:.0f} s")
        for name, f in forecasts.items():
            pooled.setdefault(name, []).append(f)
            m = _metrics(f, r, test["last_price"], test["price"])
            print(f"  {name:28s} price MSE {m['price_mse']:10.4g}  MAE {m['price_mae']:8.4g}  "
                  f"return MSE x1e4 {1e4 * m['ret_mse']:.4f}  direction {m['direction']:.3f}")
    r, last, price = (np.concatenate(truth[k]) for k in ("r", "last", "price"))
    results = {name: _metrics(np.concatenate(f), r, last, price) for name, f in pooled.items()}
    base = results["random walk"]
    print(f"\npooled over {folds} folds ({len(r)} test steps); up days {np.mean(r > 0):.3f}\n")
    print("| forecast | price MSE | price MAE | return MSE x1e4 | MSE / random walk | DM t vs random walk | "
          "direction right |")
    print("|---|---|---|---|---|---|---|")
    for name, m in results.items():
        direction = "–" if np.isnan(m["direction"]) else f"{m['direction']:.3f}"
        print(f"| {name} | {m['price_mse']:.4g} | {m['price_mae']:.4g} | {1e4 * m['ret_mse']:.4f} | "
              f"{m['price_mse'] / base['price_mse']:.4f} | {m['dm']:+.2f} | {direction} |")
    return results


if __name__ == "__main__":
    main()
