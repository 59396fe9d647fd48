"""The forecasting task's real data sources (train/tasks_series.py): the files that arch / plotly ship, read
without importing the packages, their walk-forward folds, the config's ``source=`` choice, a clear error
when the package is missing, and the forecaster learning on the real S&P 500 series."""
import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from tests.helpers import numpy_variables, train_classifier

# source -> package, (steps, series), first / last date, first target price, selected inputs of the last fold
REAL = {
    "arch_sp500": ("arch", (5031, 9), "1999-01-04", "2018-12-31", 1228.099976,
                   ["sp500_close", "nasdaq_close", "sp500_low", "sp500_high"]),
    "plotly_stocks": ("plotly", (105, 6), "2018-01-01", "2019-12-30", 1.0, ["GOOG", "MSFT", "AMZN"]),
}


@pytest.mark.parametrize("source", sorted(REAL))
def test_real_source_shapes_dates_and_walk_forward_folds(source):
    package, shape, first, last, price0, inputs = REAL[source]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    from train import config_lib, tasks_series

    spec = tasks_series.SOURCES[source]
    series = spec.load()
    assert series.prices.shape == shape and series.dates.shape == shape[:1]
    assert str(series.dates[0]) == first and str(series.dates[-1]) == last
    assert np.all(np.diff(series.dates).astype(int) > 0) and np.all(series.prices > 0)
    assert series.prices[0, series.target] == pytest.approx(price0)
    ends = []
    for fold in range(spec.folds):
        data = tasks_series.fold_data(source, fold)
        train, test = data["train"], data["test"]
        assert train["window"].shape[1:] == (spec.window, spec.peers + 1) and test["target"].shape[1:] == (1, 1)
        assert len(test["window"]) == spec.test_steps and train["date"][-1] < test["date"][0]  # no look-ahead
        # the target is the standardised log return from last_price to price
        r = np.log(test["price"] / test["last_price"])
        np.testing.assert_allclose(test["target"][:, 0, 0], (r - train["mean"][0]) / train["std"][0], rtol=1e-4,
                                   atol=1e-4)
        np.testing.assert_allclose(test["window"][1:, -1, 0], test["target"][:-1, 0, 0])  # windows end the day before
        ends.append(test["date"][-1])
    assert str(ends[-1]) == last and [series.columns[c] for c in train["columns"]] == inputs
    split = tasks_series.load_series(source, "test")
    assert set(split) == {"window", "target"} and len(split["window"]) == spec.test_steps
    config = config_lib.resolve_config(str(config_lib.pathlib.Path(__file__).resolve().parents[2] / "train" /
                                           "configs" / "time2vec_forecast.py") + f":source={source}", [])
    assert config.input.dataset == spec.dataset and config.model.overrides.window == spec.window
    assert config.model.overrides.num_features == spec.peers + 1
    assert tasks_series.source_of(config.input.dataset) == source


def test_missing_package_and_unknown_source_are_clear_errors(monkeypatch):
    from train import tasks_series

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "arch" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"'arch_sp500' reads a file that the 'arch' package ships; "
                                                  r"install it with `pip install --no-deps arch`"):
        tasks_series._arch_sp500()
    with pytest.raises(ValueError, match="unknown forecasting data source 'yahoo'"):
        tasks_series.load_series("yahoo", "train")
    with pytest.raises(ValueError, match="arch_sp500 has splits"):
        tasks_series.load_series("arch_sp500", "fold3_test")


def test_forecaster_training_loss_falls_on_the_sp500():
    if importlib.util.find_spec("arch") is None:
        pytest.skip("arch is not installed")
    from train import tasks_series

    train = tasks_series.fold_data("arch_sp500", 0)["train"]
    x, y = jnp.asarray(train["window"][-128:]), jnp.asarray(train["target"][-128:])  # the last half of 2015
    model = jf.create_model("time2vec_forecaster", k=4, embed_dim=16, depth=1, num_heads=2, dropout=0.0)
    losses, _ = train_classifier(model, numpy_variables(model, x[:1]), x, y, steps=30,
                                 loss=lambda out, target: jnp.mean((out - target) ** 2))
    assert np.mean(losses[-5:]) < 0.8 * losses[0], losses
    assert losses[-1] < float(jnp.mean(y ** 2)), losses  # below the zero forecast: it uses its inputs
