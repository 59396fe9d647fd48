r"""Forecast a stock's next return (so its next price) from its sector: Time2Vec transformer encoder,
walk-forward.

    python -m train.main --config train/configs/time2vec_forecast.py --workdir /tmp/jaxformers_t2v
    python -m train.main --config train/configs/time2vec_forecast.py:source=arch_sp500 --workdir /tmp/t2v_sp500

Data (``source=``, see ``train/tasks_series.py``): ``generated`` (default, dataset ``sector_series``): 8
generated correlated price series of one sector (shared market factor, a one-day lead-lag, a 20-day
season); ``arch_sp500``: the daily S&P 500 close 1999-2018 with NASDAQ / S&P open-high-low / WTI as
candidate peers, from the files the ``arch`` package ships (``pip install --no-deps arch``);
``plotly_stocks``: weekly closes of six technology stocks 2018-2019 shipped by ``plotly`` (8-week
windows; a demonstration, 104 returns only). The target's inputs are itself and its most correlated
peers (training range only), standardised log returns in ``window``-step windows.
Model: ``time2vec_forecaster`` (Time2Vec of the step instead of positions, 2 pre-norm encoder blocks of
width 64). Loss MSE; evaluation MSE / MAE and ``naive_mse`` (the zero-return forecast: the random walk
on prices) on the steps after the training range. This command trains the last walk-forward fold;
``train.tasks_series.walk_forward(config, workdir)`` runs every fold. Measured on ``generated`` (shared
2-core CPU, 1500 steps): test MSE 0.720 (MAE 0.671) at step 500 against 1.095 for the zero forecast;
longer training overfits (0.754 at step 1500), hence 500 steps by default. On the real S&P 500 the
random walk is not beaten (``benchmarks/time2vec_real_series.py``, ``benchmarks/RESULTS.md``).
Arguments: ``source``, ``steps``, ``batch``, ``smoke``; the source's dataset name lands in
``input.dataset`` (``sector_series``, ``arch_sp500`` or ``plotly_stocks``), which is what training reads.
"""
from train import config_lib, tasks_series


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=500, batch=64, source="generated")
    if args.source not in tasks_series.SOURCES:
        raise config_lib.ConfigError(f"source={args.source!r}: choose one of {sorted(tasks_series.SOURCES)}")
    spec = tasks_series.SOURCES[args.source]
    c = config_lib.base_config()
    c.model.name = "time2vec_forecaster"
    c.model.overrides = dict(window=spec.window, num_features=spec.peers + 1, horizon=1,
                             num_targets=1, k=16, embed_dim=64, depth=2, num_heads=4, dropout=0.1)
    c.task = "forecasting"
    c.task_args = {}

    c.input.source = "embedded"
    c.input.dataset = spec.dataset
    c.input.train_pp = ""
    c.input.eval_pp = ""

    c.batch_size = args.batch
    c.eval_batch_size = 64
    c.num_train_steps = args.steps
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 50

    c.log_every_steps = 100
    c.eval_every_steps = 250
    c.checkpoint_every_steps = 250
    c.smoke = args.smoke
    c.smoke_overrides = {"model": {"overrides": {"depth": 1, "embed_dim": 32, "k": 4}}}
    return c
