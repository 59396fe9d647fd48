"""Outlier-free attention presets and the outlier metrics of "Quantizable Transformers".

Bondarenko, Nagel, Blankevoort, NeurIPS 2023, arXiv 2306.12929; official code
Qualcomm-AI-research/outlier-free-transformers. The two attention changes themselves are options of
``jaxformers.layers.MultiHeadAttention`` (``softmax="clipped(γ:ζ)"``, ``gate=...``) that BERT,
GPT-2/OPT and ViT expose as ``attn_softmax`` / ``attn_gate`` / ``attn_gate_mlp`` /
``attn_gate_init``. ``OUTLIER_PRESETS`` are the official scripts' settings (``scripts/*.sh``):

- BERT clipped softmax ``--attn_softmax "clipped(-.025:1)"``: γ = -0.025, ζ = 1.
- BERT gated attention ``--attn_gate_type conditional_per_token --attn_gate_mlp``: a per-head MLP
  gate (the bias init is not applied to the MLP gate).
- OPT clipped softmax ``--alpha 12`` with γ = -α / T, T = ``block_size`` = 512 (``run_clm.py``
  passes ``max_seq_length=args.block_size``): γ = -0.0234375, ζ = 1.
- OPT gated attention (125m, 350m) ``--attn_gate_type conditional_per_token --attn_gate_init 0.25``:
  a per-head linear gate, bias logit(0.25).

Not provided: OPT-1.3B's gate (``--attn_gate_linear_all_features``: one Linear from all features to
the heads) and ViT presets (the repository has no ViT code; the paper's ViT settings are not
verified here).

``outlier_metrics`` measures what ``validate_mlm.py`` / ``validate_clm.py`` report, with a Flax
interceptor (no model file is edited): per example, the infinity norm of a tensor flattened over
(tokens x features) and its kurtosis μ4 / (σ⁴ + 1e-6) with the **unbiased** σ (``kurtosis``), each
averaged over the examples (padding positions included, as the official code does). BERT: the FFN
output (``mlp/fc2``) and the output LayerNorm (``mlp_norm``, its output and its input = FFN output
+ residual) of every layer; reported: the max FFN-output inf-norm, max LN-input ("FFN input +
output") and LN-output inf-norms, and the average / max kurtosis over the FFN-output and
LN-output tensors. Causal LMs (OPT): the final LayerNorm and every layer's output, fc2, FFN
LayerNorm, attention output projection and attention LayerNorm; reported: max inf-norm overall,
of the FFN outputs and of the layer outputs, average / max kurtosis and the max over layer outputs.
"""
from __future__ import annotations

import collections
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.compress.quantize import as_call

OUTLIER_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "bert": {"clipped_softmax": {"attn_softmax": "clipped(-0.025:1)"},
             "gated_attention": {"attn_gate": "conditional_per_token", "attn_gate_mlp": True}},
    "opt": {"clipped_softmax": {"attn_softmax": f"clipped({-12 / 512}:1)"},
            "gated_attention": {"attn_gate": "conditional_per_token", "attn_gate_init": 0.25}},
}


def outlier_preset(family: str, method: str) -> dict[str, Any]:
    """Model overrides of the official setting, e.g. ``create_model("opt_125m",
    **outlier_preset("opt", "gated_attention"))``; ``method`` "vanilla" gives {}."""
    if family not in OUTLIER_PRESETS:
        raise ValueError(f"no outlier-free presets for {family!r}; families: {', '.join(OUTLIER_PRESETS)}")
    if method == "vanilla":
        return {}
    if method not in OUTLIER_PRESETS[family]:
        raise ValueError(f"unknown outlier-free method {method!r}; valid: vanilla, "
                         f"{', '.join(OUTLIER_PRESETS[family])}")
    return dict(OUTLIER_PRESETS[family][method])


def clipped_softmax_alpha(alpha: float, seq_len: int, zeta: float = 1.0) -> str:
    """The ``attn_softmax`` spec of the official ``--alpha``: γ = -α / seq_len."""
    return f"clipped({-alpha / seq_len}:{zeta})"


def kurtosis(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per-row kurtosis of (B, N): mean((x - μ)⁴) / (σ⁴ + eps) with the unbiased σ (official ``kurtosis``)."""
    x = x.astype(jnp.float32)
    mu = jnp.mean(x, axis=1, keepdims=True)
    s = jnp.std(x, axis=1, ddof=1)
    return jnp.mean((x - mu) ** 4, axis=1) / (s ** 4 + eps)


def inf_norm(x: jax.Array) -> jax.Array:
    """Per-row infinity norm of (B, N)."""
    return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1)


def default_taps(module: nn.Module) -> dict[str, tuple[str, str, str]]:
    """{metric key: (module path, "in" | "out", kind)} of the official metrics for ``module``'s family;
    kind: "ffn" (FFN output), "ln_out", "ln_in", "layer" (block output) or "other"."""
    name = type(module).__name__
    taps: dict[str, tuple[str, str, str]] = {}
    if name == "Bert":
        for j in range(module.num_hidden_layers):
            taps[f"layer_{j}/mlp/fc2"] = (f"layer_{j}/mlp/fc2", "out", "ffn")
            taps[f"layer_{j}/mlp_norm"] = (f"layer_{j}/mlp_norm", "out", "ln_out")
            taps[f"layer_{j}/mlp_norm.input"] = (f"layer_{j}/mlp_norm", "in", "ln_in")
    elif name == "CausalLM":
        if module.has_final_norm:
            taps["final_norm"] = ("final_norm", "out", "other")
        for j in range(module.num_hidden_layers):
            taps[f"layer_{j}"] = (f"layer_{j}", "out", "layer")
            taps[f"layer_{j}/mlp/fc2"] = (f"layer_{j}/mlp/fc2", "out", "ffn")
            taps[f"layer_{j}/mlp_norm"] = (f"layer_{j}/mlp_norm", "out", "other")
            taps[f"layer_{j}/attn/proj"] = (f"layer_{j}/attn/proj", "out", "other")
            taps[f"layer_{j}/attn_norm"] = (f"layer_{j}/attn_norm", "out", "other")
    elif hasattr(module, "depth"):  # ViT-style: blocks_{j} with norm1/attn/norm2/mlp
        for j in range(module.depth):
            taps[f"blocks_{j}"] = (f"blocks_{j}", "out", "layer")
            taps[f"blocks_{j}/mlp/fc2"] = (f"blocks_{j}/mlp/fc2", "out", "ffn")
            taps[f"blocks_{j}/norm2"] = (f"blocks_{j}/norm2", "out", "other")
    else:
        raise ValueError(f"outlier_metrics has no default taps for {name}; pass taps={{key: (module path, "
                         f"'in' | 'out', kind)}}")
    return taps


def outlier_metrics(module: nn.Module, variables: Any, batches: Iterable[Any], *,
                    taps: dict[str, tuple[str, str, str]] | None = None, kurtosis_batches: int | None = 257,
                    apply: Any = None) -> dict[str, Any]:
    """The paper's outlier metrics of ``module`` on ``batches`` (as ``quantize``'s calibration: an
    array, a tuple or a dict of inputs per batch). Returns ``{"inf_norm": {key: mean}, "kurtosis":
    {key: mean}}`` plus the summaries (see the module docstring). ``kurtosis_batches``: only the
    first so many batches enter the kurtosis (official: 257 for BERT, 101 for OPT). ``apply``:
    a callable ``(variables, *args, **kwargs)`` to run instead of ``module.apply`` (e.g. a
    quantised model's)."""
    taps = default_taps(module) if taps is None else taps
    by_path = collections.defaultdict(list)
    for key, (path, where, _) in taps.items():
        by_path[path].append((key, where))
    run_model = apply if apply is not None else module.apply

    @jax.jit
    def stats(variables, args, kwargs):
        found: dict[str, tuple[jax.Array, jax.Array]] = {}

        def tap(next_fun, a, k, context):
            out = next_fun(*a, **k)
            path = "/".join(str(p) for p in context.module.path)
            if context.method_name == "__call__" and path in by_path:
                for key, where in by_path[path]:
                    x = a[0] if where == "in" else (out[0] if isinstance(out, tuple) else out)
                    x = x.reshape(x.shape[0], -1)
                    found[key] = (inf_norm(x), kurtosis(x))
            return out

        with nn.intercept_methods(tap):
            run_model(variables, *args, **kwargs)
        return found

    norms: dict[str, list] = collections.defaultdict(list)
    kurts: dict[str, list] = collections.defaultdict(list)
    for i, batch in enumerate(batches):
        for key, (n, k) in stats(variables, *as_call(batch)).items():
            norms[key].append(np.asarray(n))
            if kurtosis_batches is None or i < kurtosis_batches:
                kurts[key].append(np.asarray(k))
    missing = sorted(set(taps) - set(norms))
    if missing:
        raise ValueError(f"outlier_metrics: no module ran at {missing}; the model's module paths differ from the taps")
    inf = {k: float(np.concatenate(norms[k]).mean()) for k in taps}
    kinds = {k: kind for k, (_, where, kind) in taps.items()}
    kurt_keys = [k for k in taps if kinds[k] != "ln_in"]
    kurt = {k: float(np.concatenate(kurts[k]).mean()) for k in kurt_keys}
    out: dict[str, Any] = {"inf_norm": inf, "kurtosis": kurt,
                           "avg_kurtosis": float(np.mean(list(kurt.values()))),
                           "max_kurtosis": float(np.max(list(kurt.values())))}

    def top(kind):
        values = [v for k, v in inf.items() if kinds[k] == kind]
        return float(max(values)) if values else None

    out["max_inf_norm"] = float(max(inf.values()))
    out["max_ffn_out_inf_norm"] = top("ffn")
    for kind, name in (("ln_out", "max_LN_out_inf_norm"), ("ln_in", "max_LN_inp_inf_norm"),
                       ("layer", "max_layer_inf_norm")):
        if top(kind) is not None:
            out[name] = top(kind)
    layers = [kurt[k] for k in kurt_keys if kinds[k] == "layer"]
    if layers:
        out["max_kurtosis_layers"] = float(max(layers))
    return out
