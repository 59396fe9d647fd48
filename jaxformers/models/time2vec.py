"""Time2Vec + transformer encoder forecaster with correlation-based feature selection.

Paper: Bui, Chien, Kovács, Bognár, arXiv 2504.13801 (stock price forecasting with a Time2Vec transformer
encoder, "TT2VFin"): a transformer *encoder* whose position information is a Time2Vec embedding (Kazemi et al. 2019, arXiv 1907.05321) instead of a positional encoding, fed with several
stocks of one sector chosen by correlation with the target. No official code was found.

Model: a window x (B, L, F) of F series (e.g. standardised returns of the target and its most
correlated peers); each step's token is Dense([x_t ; t2v(τ_t)]) with τ_t = t / L (``time_input="time"``:
Time2Vec of the step replaces the position table) or Dense(t2v(x_t)) (``"features"``: Time2Vec of
every input value, the common Keras usage); ``depth`` pre-norm encoder blocks (the shared
``TransformerBlock``); the last token (``pool="last"``) or the mean (``"mean"``) -> Dense(horizon x
targets). ``select_correlated_series`` picks the inputs: the target plus the k series whose returns
(led by 0..max_lag steps) have the largest absolute Pearson correlation with the target's, measured on
the training range only.

Deviations (the paper gives no exact sizes): width, depth, heads, window and k are configuration;
the blocks are pre-norm (the jaxformers encoder block) rather than PyTorch's default post-norm. The paper
forecasts stock prices; the training task (``train/tasks_series.py``) feeds standardised log
returns and forecasts the next one, r̂, which is the price forecast P_t·exp(r̂): the same target without
the non-stationary price level in the inputs, and the random walk (r̂ = 0) as its natural baseline.
"""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers import Dense, LayerNorm, TransformerBlock
from jaxformers.layers.time2vec import Time2Vec
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

__all__ = ["Time2VecForecaster", "select_correlated_series"]


def select_correlated_series(returns: np.ndarray, target: int, k: int, max_lag: int = 0) -> list[int]:
    """``[target, i_1, ..., i_k]``: the k series (columns of ``returns`` (T, N)) whose returns, leading the
    target's by 0..``max_lag`` steps, have the largest absolute Pearson correlation with it. Pass the
    training range only (selection on test data would leak)."""
    returns = np.asarray(returns, np.float64)
    t, n = returns.shape
    if not 0 <= target < n:
        raise ValueError(f"target {target} is not a column of a {n}-series array")
    if not 0 <= k < n:
        raise ValueError(f"k={k} must be in [0, {n - 1}] for {n} series")
    if t <= max_lag + 2:
        raise ValueError(f"{t} steps are too few for lags up to {max_lag}")
    scores = np.zeros(n)
    for lag in range(max_lag + 1):
        y = returns[lag:, target]
        x = returns[: t - lag]
        xc, yc = x - x.mean(0), y - y.mean()
        corr = (xc * yc[:, None]).sum(0) / np.sqrt((xc ** 2).sum(0) * (yc ** 2).sum() + 1e-300)
        scores = np.maximum(scores, np.abs(corr))
    scores[target] = -np.inf
    order = [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
    return [target, *order]


class Time2VecForecaster(nn.Module):
    """Window (B, L, F) -> forecasts (B, horizon, num_targets)."""

    window: int = 32
    num_features: int = 4
    horizon: int = 1
    num_targets: int = 1
    k: int = 16
    embed_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    time_input: Literal["time", "features"] = "time"
    pool: Literal["last", "mean"] = "last"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def example_inputs(self, batch_size: int = 1) -> tuple[jax.Array]:
        return (jnp.zeros((batch_size, self.window, self.num_features), jnp.float32),)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if x.ndim != 3 or x.shape[1:] != (self.window, self.num_features):
            raise ValueError(f"x must be (batch, window={self.window}, num_features={self.num_features}); "
                             f"got shape {x.shape}")
        if self.time_input not in ("time", "features") or self.pool not in ("last", "mean"):
            raise ValueError(f"time_input must be 'time' or 'features' and pool 'last' or 'mean'; got "
                             f"{self.time_input!r}, {self.pool!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, length, _ = x.shape
        if self.time_input == "time":
            tau = jnp.broadcast_to((jnp.arange(length, dtype=jnp.float32) / length)[None, :, None], (b, length, 1))
            tokens = jnp.concatenate([x.astype(jnp.float32), Time2Vec(self.k, flatten=True, name="t2v")(tau)], -1)
        else:
            tokens = Time2Vec(self.k, flatten=True, name="t2v")(x)
        h = Dense(self.embed_dim, axes=(None, "embed"), name="embed", **kw)(tokens)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = constrain(h, ("act_batch", "act_len", "act_embed"))
        for i in range(self.depth):
            h = TransformerBlock(self.num_heads, self.mlp_ratio, dropout=self.dropout, name=f"blocks_{i}", **kw)(h, train)
        h = LayerNorm(1e-6, name="norm", **kw)(h)
        pooled = h[:, -1] if self.pool == "last" else h.mean(axis=1)
        out = Dense(self.horizon * self.num_targets, axes=("embed", None), name="head", **kw)(pooled)
        return out.reshape(b, self.horizon, self.num_targets).astype(jnp.float32)


@register_model(ModelInfo(paper="Time2Vec transformer encoder for stock price forecasting (Bui et al., TT2VFin)",
                          arxiv="2504.13801", repo=None, input_size=(32, 4)))
def time2vec_forecaster(**overrides: Any) -> Time2VecForecaster:
    """A 2-block, 64-wide encoder over 32-step windows of 4 series (the target + 3 selected peers)."""
    return Time2VecForecaster(**overrides)
