r"""Sequence mixing at growing lengths: Mamba's selective scan against dense and local attention; SeqPE length
extrapolation; the one-layer universal-approximation demonstrations.

    python benchmarks/sequence_scaling.py                      # everything (CPU: a few minutes)
    python benchmarks/sequence_scaling.py --only scaling --max-len 65536
    python benchmarks/sequence_scaling.py --only extrapolation --steps 300

Parts (``--only``, comma-separated):

- ``scaling``: forward time and compiled temporary memory (XLA's ``memory_analysis``) of one mixing
  layer's core at L = 1K ... ``--max-len`` tokens, measured in the same run: Mamba's selective scan
  (``jaxformers.layers.ssm.selective_scan``, associative and chunked), dense softmax attention
  (``dot_product_attention``) and block-local attention (``local_global_attention(group_size=w)``, XLA
  path); the exponent b of time ~ L^b fitted by least squares in log-log. Dense attention is timed up
  to ``--dense-max`` (its L x L logits), compiled beyond.
- ``scans``: the three scan formulations at one size (the case for or against a Pallas scan kernel).
- ``extrapolation``: a small GPT-2-style LM trained at length 32 on a periodic copy task with learned,
  sin-cos and SeqPE positions; accuracy at 1x, 2x, 4x the training length
  (``jaxformers.models.seqpe.extrapolation_run``).
- ``universal``: the one-layer universal-approximation demonstrations
  (``jaxformers.models.one_layer_transformer``): separation of distinct inputs by rank-1 attention vs
  averaging, approximation error against FFN width on a permutation-equivariant target, memorisation of
  random labels.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _temp_bytes(fn, *args) -> int:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis is not None else -1


def _slope(lengths, values) -> float:
    ok = [(math.log(n), math.log(v)) for n, v in zip(lengths, values) if v and v > 0 and math.isfinite(v)]
    if len(ok) < 2:
        return float("nan")
    x, y = np.asarray(ok).T
    return float(np.polyfit(x, y, 1)[0])


def scaling(max_len: int, dense_max: int, inner: int = 64, state: int = 16, heads: int = 4, head_dim: int = 16,
            window: int = 256, chunk: int = 256) -> dict:
    from jaxformers.kernels import local_global_attention
    from jaxformers.layers import dot_product_attention
    from jaxformers.layers.ssm import selective_scan

    rng = np.random.default_rng(0)
    lengths = [1024 * 2 ** i for i in range(int(math.log2(max_len // 1024)) + 1)]
    a = -jnp.asarray(rng.uniform(0.5, 2.0, (inner, state)), jnp.float32)
    ops = {
        "mamba_scan_associative": lambda x, dt, b, c: selective_scan(x, dt, a, b, c, method="associative")[0],
        "mamba_scan_chunked": lambda x, dt, b, c: selective_scan(x, dt, a, b, c, method="chunked",
                                                                  chunk_size=chunk)[0],
        "attention_dense": lambda q, k, v: dot_product_attention(q, k, v),
        f"attention_local_{window}": lambda q, k, v: local_global_attention(q, k, v, group_size=window,
                                                                            implementation="xla"),
    }
    rows = {name: {"time_s": [], "temp_mb": []} for name in ops}
    for n in lengths:
        ssm_args = [jnp.asarray(rng.normal(size=(1, n, inner)), jnp.float32) for _ in range(2)] + \
                   [jnp.asarray(rng.normal(size=(1, n, state)), jnp.float32) for _ in range(2)]
        att_args = [jnp.asarray(rng.normal(size=(1, n, heads, head_dim)), jnp.float32) for _ in range(3)]
        for name, fn in ops.items():
            args = ssm_args if name.startswith("mamba") else att_args
            mem = _temp_bytes(fn, *args)
            rows[name]["temp_mb"].append(mem / 2 ** 20)
            too_big = name == "attention_dense" and n > dense_max
            rows[name]["time_s"].append(None if too_big else _time(jax.jit(fn), *args))
            print(f"L={n:6d} {name:28s} time {rows[name]['time_s'][-1] or float('nan'):9.4f} s  "
                  f"temp {mem / 2 ** 20:10.1f} MiB", flush=True)
    for r in rows.values():
        r["time_exponent"] = _slope(lengths, r["time_s"])
        r["memory_exponent"] = _slope(lengths, r["temp_mb"])
    return {"lengths": lengths, "inner": inner, "state": state, "heads": heads, "head_dim": head_dim,
            "window": window, "ops": rows}


def scans(length: int = 4096, inner: int = 64, state: int = 16) -> dict:
    from jaxformers.layers.ssm import selective_scan

    rng = np.random.default_rng(1)
    x, dt = (jnp.asarray(rng.normal(size=(2, length, inner)), jnp.float32) for _ in range(2))
    b, c = (jnp.asarray(rng.normal(size=(2, length, state)), jnp.float32) for _ in range(2))
    a = -jnp.asarray(rng.uniform(0.5, 2.0, (inner, state)), jnp.float32)
    out = {}
    for method in ("associative", "chunked", "sequential"):
        fwd = jax.jit(lambda x, m=method: selective_scan(x, dt, a, b, c, method=m)[0])
        grad = jax.jit(jax.grad(lambda x, m=method: selective_scan(x, dt, a, b, c, method=m)[0].sum()))
        out[method] = {"forward_s": _time(fwd, x), "forward_backward_s": _time(grad, x)}
        print(f"scan {method:12s} fwd {out[method]['forward_s']:.4f} s  fwd+bwd {out[method]['forward_backward_s']:.4f} s",
              flush=True)
    return {"length": length, "inner": inner, "state": state, "methods": out}


def extrapolation(steps: int) -> dict:
    from jaxformers.models.seqpe import extrapolation_run

    out = {}
    for position in ("learned", "sincos", "seqpe"):
        t = time.perf_counter()
        out[position] = extrapolation_run(position, steps=steps)
        out[position]["seconds"] = time.perf_counter() - t
        print(position, out[position], flush=True)
    return out


def universal(steps: int = 400) -> dict:
    import optax

    from jaxformers.models.one_layer_transformer import OneLayerTransformer, min_separation

    values = np.arange(1.0, 5.0)
    separation = {f"delta={d}": min_separation(values, 3, d) for d in (0.0, 0.1, 0.5, 1.0, 2.0)}
    print("separation", separation, flush=True)

    rng = np.random.default_rng(0)
    d, length = 2, 6

    def target(x):  # a permutation-equivariant function: each token times the sequence's softmax-pooled mean
        w = jax.nn.softmax(x[..., :1], axis=-2)
        return x[..., :1] * jnp.sum(w * x, axis=-2, keepdims=True)[..., :1]

    train_x = jnp.asarray(rng.uniform(-1, 1, (512, length, d)), jnp.float32)
    test_x = jnp.asarray(rng.uniform(-1, 1, (512, length, d)), jnp.float32)

    def fit(model, x, y, loss_fn, steps):
        params = model.init(jax.random.key(0), x[:1])["params"]
        tx = optax.adam(3e-3)

        @jax.jit
        def run(params):
            def one(carry, _):
                params, opt = carry
                loss, g = jax.value_and_grad(lambda p: loss_fn(model.apply({"params": p}, x), y))(params)
                updates, opt = tx.update(g, opt, params)
                return (optax.apply_updates(params, updates), opt), loss

            (params, _), losses = jax.lax.scan(one, (params, tx.init(params)), None, length=steps)
            return params, losses

        return run(params)

    mse = lambda out, y: jnp.mean((out - y) ** 2)  # noqa: E731
    widths = {}
    for width in (4, 16, 64, 256):
        model = OneLayerTransformer(d_model=d, hidden=width, out_features=1)
        params, _ = fit(model, train_x, target(train_x), mse, steps)
        widths[width] = float(mse(model.apply({"params": params}, test_x), target(test_x)))
        print(f"width {width}: test MSE {widths[width]:.5f}", flush=True)
    xm = jnp.asarray(rng.normal(size=(64, 4, 4)), jnp.float32)
    ym = jnp.asarray(rng.integers(0, 4, (64, 4)))
    model = OneLayerTransformer(d_model=4, hidden=128, out_features=4)
    params, _ = fit(model, xm, ym, lambda out, y: optax.softmax_cross_entropy_with_integer_labels(out, y).mean(),
                    steps * 2)
    memorised = float(jnp.mean(jnp.argmax(model.apply({"params": params}, xm), -1) == ym))
    print(f"memorised {memorised:.3f} of 256 random token labels", flush=True)
    return {"separation": separation, "test_mse_by_width": widths, "target_variance": float(jnp.var(target(test_x))),
            "memorised_fraction": memorised}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="scaling,scans,extrapolation,universal")
    parser.add_argument("--max-len", type=int, default=65536)
    parser.add_argument("--dense-max", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    parts = args.only.split(",")
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    if "scaling" in parts:
        results["scaling"] = scaling(args.max_len, args.dense_max)
    if "scans" in parts:
        results["scans"] = scans()
    if "extrapolation" in parts:
        results["extrapolation"] = extrapolation(args.steps)
    if "universal" in parts:
        results["universal"] = universal()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
