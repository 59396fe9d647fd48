"""Time2Vec layer (shape, linear channel, periodicity), correlation-based selection, the forecasting task
and its walk-forward data, the forecaster (learns, beats the zero forecast, shards)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.layers.time2vec import Time2Vec
from jaxformers.models.time2vec import select_correlated_series
from jaxformers.sharding import make_mesh
from tests.helpers import fast_jit, numpy_variables, shard_like_init, single_and_sharded


def test_time2vec_shape_linear_channel_and_periodicity():
    layer = Time2Vec(k=3)
    tau = jnp.linspace(0.0, 5.0, 11)[None, :, None] * jnp.ones((2, 1, 2))  # (2, 11, 2)
    variables = nn.unbox(layer.init(jax.random.key(0), tau))
    out = layer.apply(variables, tau)
    assert out.shape == (2, 11, 2, 4)
    assert Time2Vec(k=3, flatten=True).apply(variables, tau).shape == (2, 11, 8)
    np.testing.assert_allclose(jnp.diff(out[..., 0], n=2, axis=1), 0.0, atol=1e-5)  # channel 0 is affine in τ
    omega, phi = variables["params"]["omega"], variables["params"]["phi"]
    np.testing.assert_allclose(out[0, 3, 1, 1:], jnp.sin(omega[1, 1:] * tau[0, 3, 1] + phi[1, 1:]), atol=1e-6)
    for i in range(1, 4):  # each periodic channel repeats after 2π / ω_i
        period = 2 * jnp.pi / omega[:, i]
        shifted = layer.apply(variables, tau + period)
        np.testing.assert_allclose(shifted[..., i], out[..., i], atol=1e-4)
    with pytest.raises(ValueError, match="k >= 1"):
        Time2Vec(k=0).init(jax.random.key(0), tau)


def test_correlation_selection_finds_the_leader_and_ignores_noise():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(500, 5))
    r[1:, 0] += 0.9 * r[:-1, 3]  # series 3 leads the target by a day
    r[:, 0] += 0.5 * r[:, 1]  # series 1 moves with it
    assert select_correlated_series(r, 0, 2, max_lag=1) == [0, 3, 1]
    assert select_correlated_series(r, 0, 1, max_lag=0) == [0, 1]  # without lags the leader is invisible
    with pytest.raises(ValueError, match="k=5 must be in"):
        select_correlated_series(r, 0, 5)


def test_walk_forward_splits_and_task_metrics():
    pytest.importorskip("grain")
    from train import config_lib, tasks_series

    root = config_lib.pathlib.Path(__file__).resolve().parents[2]
    config = config_lib.resolve_config(str(root / "train" / "configs" / "time2vec_forecast.py"), ["smoke=True"])
    assert config.task == "forecasting" and config.input.dataset == "sector_series"
    assert config.model.overrides.num_features == tasks_series.PEERS + 1
    bounds = tasks_series.fold_bounds()
    assert [e for _, e in bounds][-1] == tasks_series.DAYS and all(a < b for a, b in bounds)
    first = tasks_series.load_sector_series("fold0_train")
    test = tasks_series.load_sector_series("test")
    assert first["window"].shape[1:] == (tasks_series.WINDOW, tasks_series.PEERS + 1)
    assert test["target"].shape[1:] == (1, 1) and len(test["window"]) == tasks_series.TEST_DAYS
    with pytest.raises(ValueError, match="sector_series has splits"):
        tasks_series.load_sector_series("fold7_test")
    task = tasks_series.ForecastingTask()
    out = jnp.asarray([[[1.0]], [[0.0]], [[2.0]]])
    batch = {"target": jnp.asarray([[[0.0]], [[2.0]], [[2.0]]]), "mask": jnp.asarray([1, 1, 0])}
    sums = task.eval_sums(out, batch)
    assert {k: float(v) for k, v in sums.items()} == {"mse": 5.0, "mae": 3.0, "naive_mse": 4.0, "count": 2.0}
    loss, metrics = task.loss(out, batch)
    assert float(loss) == pytest.approx(5 / 3) and float(metrics["mae"]) == pytest.approx(1.0)


def test_forecaster_learns_the_sector_and_beats_the_zero_forecast():
    pytest.importorskip("grain")
    from train import tasks_series

    train, test = tasks_series.load_sector_series("train"), tasks_series.load_sector_series("test")
    model = jf.create_model("time2vec_forecaster", k=4, embed_dim=32, depth=1, dropout=0.0)
    x, y = jnp.asarray(train["window"]), jnp.asarray(train["target"])
    params = numpy_variables(model, x[:1])["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @fast_jit
    def step(params, opt, idx):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, x[idx]) - y[idx]) ** 2))(
            params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(0)
    for _ in range(60):
        params, opt, loss = step(params, opt, jnp.asarray(rng.integers(0, len(x), 128)))
    pred = fast_jit(model.apply)({"params": params}, jnp.asarray(test["window"]))
    mse = float(jnp.mean((pred - test["target"]) ** 2))
    naive = float(np.mean(test["target"] ** 2))
    assert mse < 0.9 * naive, (mse, naive)  # the lead-lag peer makes part of tomorrow predictable
    with pytest.raises(ValueError, match=r"x must be \(batch, window=32, num_features=4\)"):
        model.apply({"params": params}, x[:, :16])


def test_sharded_equals_single_device():
    model = jf.create_model("time2vec_forecaster", k=4, embed_dim=32, depth=1, time_input="features", pool="mean")
    x = jax.random.normal(jax.random.key(0), (4, 32, 4))
    variables = numpy_variables(model, x)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single, sharded = single_and_sharded(fast_jit(model.apply), variables, shard_like_init(model, variables, x, mesh),
                                         x, mesh)
    assert single.shape == (4, 1, 1)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)
