"""DSFormer: every linear layer W ~ D S with D dense and S N:M semi-structured sparse.

Paper: "DSFormer: Effective Compression of Text-Transformers by Dense-Sparse Weight
Factorization", Chand, Prabhu, Kumar, arXiv 2312.13211. No official code was found (every
"DSFormer" repository is another paper); the choices the abstract leaves open are listed below.

The method: a weight W (in x out, our Dense kernel layout) is replaced by D (in x k, dense) times
S (k x out) whose every output column keeps at most N non-zeros in each group of M consecutive
rows (N:M semi-structured sparsity, the pattern sparse tensor cores run). With sparse S the inner
width k can be larger than a low-rank factorization's at the same parameter count, which is where
DSFormer's better compression comes from. All factorizations are trained jointly on the task loss
by the **straight-through factorizer (STF)**: the forward pass uses S projected to its N:M pattern
(the N largest magnitudes of every group), the backward pass treats the projection as the identity,
so D and every entry of S get gradients and the pattern may change while training. SVD is the
task-unaware initialization (and, with N = M, the low-rank baseline DSFormer is compared with).

Use (any Flax model whose linears are ``nn.Dense`` / ``nn.DenseGeneral``, i.e. every jaxformers model)::

    plan = dsformer.discover(model, x)                    # the model's linear layers
    v = dsformer.factorize(variables, plan, ratio=0.5, n=2, m=4)
    logits = dsformer.apply(model, v, x)                   # jit / grad / mesh as usual

``factorize`` removes the factorized kernels from ``params`` and adds a ``dsformer`` collection
(``D``, ``S`` per layer; bias stays in ``params``); ``apply`` runs the model with the factorized
layers through ``flax.linen.intercept_methods`` (no model code changes). Train D and S by
differentiating ``dsformer.apply`` with respect to the ``dsformer`` collection (and the rest).

Choices: the sparsity is on the factor S (the output side), along its inner (k) axis; k is chosen
per layer so D and S's kept entries hold ``ratio`` of the layer's weights (rounded down to a
multiple of M, at least M); layers whose name matches ``exclude`` (default: the classifier ``head``)
stay dense; the STF gradient is the plain straight-through estimator (dense).
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = ["discover", "factorize", "apply", "intercept", "nm_mask", "straight_through_factorizer", "inner_width",
           "effective_kernel", "export_sparse", "count_params"]


def _check_nm(n: int, m: int, width: int | None = None) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 1 or n > m:
        raise ValueError(f"N:M sparsity needs integers 1 <= N <= M; got {n}:{m}")
    if width is not None and width % m:
        raise ValueError(f"N:M sparsity with M={m} needs a width divisible by {m}; got width {width}")


def nm_mask(s: jax.Array, n: int, m: int) -> jax.Array:
    """Boolean mask of the N largest |s| in every group of M consecutive rows, per column; s (k, out)."""
    k = s.shape[0]
    _check_nm(n, m, k)
    groups = jnp.abs(s).reshape(k // m, m, *s.shape[1:])
    rank = jnp.argsort(jnp.argsort(-groups, axis=1, stable=True), axis=1)  # 0 = largest in its group
    return (rank < n).reshape(s.shape)


def straight_through_factorizer(s: jax.Array, n: int, m: int) -> jax.Array:
    """S projected to its N:M pattern in the forward pass, identity in the backward pass."""
    mask = jax.lax.stop_gradient(nm_mask(s, n, m))
    return s + jax.lax.stop_gradient(jnp.where(mask, s, 0.0) - s)


def _in_dims(module) -> int:
    if isinstance(module, nn.Dense):
        return 1
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    return len(axis)


def _supported(module, x) -> bool:
    if isinstance(module, nn.Dense):
        return True
    if not isinstance(module, nn.DenseGeneral) or module.batch_dims:
        return False
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axis = sorted(a % x.ndim for a in axis)
    return axis == list(range(x.ndim - len(axis), x.ndim))  # the contracted dims are the trailing ones


def discover(model: nn.Module, *inputs: Any, **kwargs: Any) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The model's linear layers: ``{"path/to/layer": (number of input dims, kernel shape)}``,
    found by tracing ``model.init`` (nothing is computed)."""
    found: dict[str, tuple[int, tuple[int, ...]]] = {}

    def record(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.DenseGeneral)) and args \
                and _supported(mod, args[0]):
            kernel = nn.unbox(mod.get_variable("params", "kernel"))
            found["/".join(mod.scope.path)] = (_in_dims(mod), tuple(kernel.shape))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))
    return found


def inner_width(in_features: int, out_features: int, ratio: float, n: int, m: int) -> int:
    """k such that D (in x k) plus S's kept entries (k x out x N/M) hold ``ratio`` of in x out weights,
    rounded down to a multiple of M (at least M)."""
    k = ratio * in_features * out_features / (in_features + out_features * n / m)
    return max(m, int(k) // m * m)


def count_params(in_features: int, out_features: int, k: int, n: int, m: int) -> int:
    """Stored weights of one factorized layer: D plus the kept entries of S."""
    return in_features * k + k * out_features * n // m


def factorize(variables: dict, plan: dict[str, tuple[int, tuple[int, ...]]], *, ratio: float = 0.5, n: int = 2,
              m: int = 4, exclude: str | Callable[[str], bool] = r"(^|/)head(_dist)?$") -> dict:
    """SVD-initialized D, S for every layer of ``plan`` (from :func:`discover`) not matching ``exclude``,
    sized to ``ratio`` of its weights; kernels move out of ``params`` into the ``dsformer`` collection.
    ``n == m`` gives the dense low-rank (truncated SVD) baseline at the same parameter budget."""
    _check_nm(n, m)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio (kept fraction of each layer's weights) must be in (0, 1), got {ratio}")
    skip = exclude if callable(exclude) else (lambda p, rx=re.compile(exclude): bool(rx.search(p)))
    variables = nn.unbox(variables)
    params = flatten_dict(variables["params"], sep="/")
    factors: dict[str, Any] = {}
    for path, (n_in, shape) in plan.items():
        if skip(path):
            continue
        key = f"{path}/kernel"
        if key not in params:
            raise KeyError(f"{key} is not in the variables (was the plan discovered on this model?)")
        w = np.asarray(params.pop(key), np.float32)
        fin, fout = math.prod(shape[:n_in]), math.prod(shape[n_in:])
        k = min(inner_width(fin, fout, ratio, n, m), (min(fin, fout) // m) * m or m)
        u, sv, vt = np.linalg.svd(w.reshape(fin, fout), full_matrices=False)
        kk = min(k, sv.size)
        d = np.zeros((fin, k), np.float32)
        s = np.zeros((k, fout), np.float32)
        d[:, :kk] = u[:, :kk] * np.sqrt(sv[:kk])
        s[:kk] = np.sqrt(sv[:kk])[:, None] * vt[:kk]
        factors[f"{path}/D"] = jnp.asarray(d)
        factors[f"{path}/S"] = jnp.asarray(s)
    if not factors:
        raise ValueError("no layer was factorized: the plan is empty or every layer matched `exclude`")
    rest = {k: v for k, v in variables.items() if k not in ("params", "dsformer")}
    return {**rest, "params": unflatten_dict(params, sep="/"), "dsformer": {**variables.get("dsformer", {}),
                                                                             **unflatten_dict(factors, sep="/")}}


def effective_kernel(D: jax.Array, S: jax.Array, n: int, m: int) -> jax.Array:
    """D times the N:M projection of S (what the layer multiplies by), (in_flat, out_flat)."""
    return D @ straight_through_factorizer(S, n, m)


def _interceptor(n: int, m: int):
    def run(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.DenseGeneral)) \
                or not mod.has_variable("dsformer", "D"):
            return next_fun(*args, **kwargs)
        x = args[0]
        n_in = _in_dims(mod)
        D, S = mod.get_variable("dsformer", "D"), mod.get_variable("dsformer", "S")
        dtype = mod.dtype or jnp.result_type(x, D)
        lead = x.shape[: x.ndim - n_in]
        features = (mod.features,) if isinstance(mod.features, int) else tuple(mod.features)
        xf = x.reshape(lead + (-1,)).astype(dtype)
        y = (xf @ D.astype(dtype)) @ straight_through_factorizer(S, n, m).astype(dtype)
        y = y.reshape(lead + features)
        if mod.use_bias:
            y = y + mod.get_variable("params", "bias").astype(dtype)
        return y

    return run


@contextlib.contextmanager
def intercept(n: int = 2, m: int = 4):
    """Inside this context, Dense layers that have a ``dsformer`` D and S compute x D S_{N:M} (+ bias)."""
    _check_nm(n, m)
    with nn.intercept_methods(_interceptor(n, m)):
        yield


def apply(model: nn.Module, variables: dict, *args: Any, n: int = 2, m: int = 4, **kwargs: Any):
    """``model.apply`` with the factorized layers (see :func:`factorize`)."""
    with intercept(n, m):
        return model.apply(variables, *args, **kwargs)


def export_sparse(variables: dict, n: int = 2, m: int = 4) -> dict:
    """The ``dsformer`` collection with every S replaced by its N:M projection (zeros elsewhere)."""
    flat = flatten_dict(variables["dsformer"], sep="/")
    out = {k: (jnp.where(nm_mask(v, n, m), v, 0.0) if k.endswith("/S") else v) for k, v in flat.items()}
    return {**variables, "dsformer": unflatten_dict(out, sep="/")}
