"""Knowledge distillation for binarized students: BiBERT's direction-matching distillation (DMD) with
hidden-state and prediction distillation, and BiPFT's pretraining objective.

Features are read with Flax's ``capture_intermediates`` (no model edits): the embeddings output and
every layer output (``hidden``, BiBERT's reps) and the fused q/k/v projection output of every
attention (``qkv``: for a binarized student the float outputs of its binarized linears, before q, k,
v are binarized: what BiBERT distils).

BiBERT (htqin/BiBERT ``quant_task_glue.py``):

- ``normalized_l2(a, b) = ‖a/‖a‖₂ − b/‖b‖₂‖₂`` with Frobenius norms over the **whole batch tensor**
  (``att_loss_r2b``);
- DMD: per student layer i (teacher layer i·r + r − 1, r = teacher/student depth), the sum over
  q, k, v of ``normalized_l2`` of the Gram matrices X Xᵀ/√d per head (B, H, L, L), entries ≤ −100
  zeroed;
- hidden states: Σ ``normalized_l2(h_s[i], h_t[i·r])`` over embeddings + layers;
- prediction: soft cross-entropy to the teacher's logits + 0.5·CE(labels), or MSE for a regression
  (or embedding) output. The total is the unweighted sum.

BiPFT (Xingrun-Xing/BiPFT ``learner.py``): soft-CE(NSP logits, T = 1) + mean over hidden states
(embeddings + layers) of MSE(h_s, h_t) + the student's own MLM + NSP cross-entropies.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

_LAYER = re.compile(r"(layer|blocks)_\d+")


def normalized_l2(a: jax.Array, b: jax.Array) -> jax.Array:
    """‖a/‖a‖ − b/‖b‖‖ with Frobenius norms over the whole tensors (BiBERT ``att_loss_r2b``)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.linalg.norm((a / jnp.linalg.norm(a)) - (b / jnp.linalg.norm(b)))


def gram(x: jax.Array) -> jax.Array:
    """X Xᵀ/√d per head: (B, L, H, D) → (B, H, L, L)."""
    return jnp.einsum("blhd,bmhd->bhlm", x, x, precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(x.shape[-1]).astype(x.dtype)


def _depth_ratio(student: Sequence, teacher: Sequence) -> int:
    if len(teacher) % len(student):
        raise ValueError(f"the teacher's {len(teacher)} layers are not a multiple of the student's {len(student)}")
    return len(teacher) // len(student)


def dmd_loss(student_qkv: Sequence[jax.Array], teacher_qkv: Sequence[jax.Array]) -> jax.Array:
    """BiBERT's direction-matching distillation over layers; each entry a fused q/k/v projection output
    (B, L, 3, H, D) (or a (q, k, v) triple). Student layer i matches teacher layer i·r + r − 1."""
    r = _depth_ratio(student_qkv, teacher_qkv)
    total = jnp.zeros((), jnp.float32)
    for i, s in enumerate(student_qkv):
        t = teacher_qkv[i * r + r - 1]
        for j in range(3):
            gs, gt = (gram(x[:, :, j] if not isinstance(x, (tuple, list)) else x[j]) for x in (s, t))
            gs, gt = jnp.where(gs <= -1e2, 0.0, gs), jnp.where(gt <= -1e2, 0.0, gt)
            total = total + normalized_l2(gs, gt)
    return total


def hidden_loss(student_hidden: Sequence[jax.Array], teacher_hidden: Sequence[jax.Array],
                kind: str = "normalized_l2") -> jax.Array:
    """BiBERT: Σ normalized_l2(h_s[i], h_t[i·r]) (embeddings + layers); BiPFT ("mse"): the mean over
    the pairs of MSE(h_s, h_t) (equal depths)."""
    if kind == "mse":
        if len(student_hidden) != len(teacher_hidden):
            raise ValueError("BiPFT's hidden-state MSE pairs equal depths; got "
                             f"{len(student_hidden)} and {len(teacher_hidden)} hidden states")
        return sum(jnp.mean((s.astype(jnp.float32) - t.astype(jnp.float32)) ** 2)
                   for s, t in zip(student_hidden, teacher_hidden)) / len(student_hidden)
    if kind != "normalized_l2":
        raise ValueError(f"hidden-state loss must be 'normalized_l2' or 'mse', got {kind!r}")
    r = _depth_ratio(student_hidden[1:], teacher_hidden[1:])
    return sum(normalized_l2(s, teacher_hidden[i * r]) for i, s in enumerate(student_hidden))


def soft_cross_entropy(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """mean(−softmax(t)·log_softmax(s)) over every element (the official code's ``.mean()``)."""
    s, t = student_logits.astype(jnp.float32), teacher_logits.astype(jnp.float32)
    return jnp.mean(-jax.nn.softmax(t, axis=-1) * jax.nn.log_softmax(s, axis=-1))


def collect(module, variables, *args, **kwargs) -> dict[str, Any]:
    """``module.apply(variables, *args, **kwargs)`` with the distillation features:
    {"output": its output, "hidden": [embeddings, layer_0, ...], "qkv": [fused q/k/v outputs]}.
    Hidden states are the outputs of the children named ``embeddings`` and ``layer_<i>`` /
    ``blocks_<i>``; q/k/v the outputs of modules named ``qkv``."""

    def wanted(mdl, method):
        return method == "__call__" and (mdl.name == "embeddings" or mdl.name == "qkv"
                                         or bool(_LAYER.fullmatch(mdl.name or "")))

    mutable = kwargs.pop("mutable", [])
    mutable = [mutable] if isinstance(mutable, str) else list(mutable)
    out, state = module.apply(variables, *args, capture_intermediates=wanted, mutable=mutable + ["intermediates"],
                              **kwargs)
    inter = state["intermediates"]
    layers = sorted((k for k in inter if _LAYER.fullmatch(k)), key=lambda k: int(k.rsplit("_", 1)[1]))
    hidden = ([inter["embeddings"]["__call__"][0]] if "embeddings" in inter else []) + \
             [inter[k]["__call__"][0] for k in layers]
    qkv = [inter[k]["attn"]["qkv"]["__call__"][0] for k in layers if "qkv" in inter[k].get("attn", {})]
    return {"output": out, "hidden": hidden, "qkv": qkv,
            "state": {k: v for k, v in state.items() if k != "intermediates"}}


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Which distillation terms a training step sums (all weights 1, as both papers).

    ``prediction``: "soft_ce" (logits), "mse" (regression outputs or sentence embeddings), None;
    ``label_weight``: the weight of the student's own CE on labels (BiBERT 0.5, BiPFT 1);
    ``hidden``: "normalized_l2" (BiBERT), "mse" (BiPFT), None; ``dmd``: BiBERT's q/k/v DMD."""

    prediction: str | None = "soft_ce"
    label_weight: float = 0.5
    hidden: str | None = "normalized_l2"
    dmd: bool = True


BIBERT_DISTILL = DistillConfig(prediction="soft_ce", label_weight=0.5, hidden="normalized_l2", dmd=True)
BIPFT_DISTILL = DistillConfig(prediction="soft_ce", label_weight=1.0, hidden="mse", dmd=False)


def distillation_loss(config: DistillConfig, student: dict, teacher: dict,
                      labels: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The configured sum over ``collect`` features of a student and a teacher; returns (loss, terms)."""
    terms: dict[str, jax.Array] = {}
    s_out, t_out = student["output"], jax.lax.stop_gradient(teacher["output"])
    if config.prediction == "soft_ce":
        terms["prediction"] = soft_cross_entropy(s_out, t_out)
    elif config.prediction == "mse":
        terms["prediction"] = jnp.mean((s_out.astype(jnp.float32) - t_out.astype(jnp.float32)) ** 2)
    elif config.prediction is not None:
        raise ValueError(f"prediction must be 'soft_ce', 'mse' or None, got {config.prediction!r}")
    if labels is not None and config.label_weight:
        terms["labels"] = config.label_weight * optax.softmax_cross_entropy_with_integer_labels(
            s_out.astype(jnp.float32), labels).mean()
    if config.hidden is not None:
        terms["hidden"] = hidden_loss(student["hidden"], jax.lax.stop_gradient(teacher["hidden"]), config.hidden)
    if config.dmd:
        terms["dmd"] = dmd_loss(student["qkv"], jax.lax.stop_gradient(teacher["qkv"]))
    return sum(terms.values()), terms


def bipft_pretraining_loss(student: dict, teacher: dict, mlm_labels: jax.Array,
                           nsp_labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """BiPFT's pretraining objective on ``collect`` features of ``head="pretraining"`` models:
    soft-CE of the NSP logits + mean hidden-state MSE + MLM CE (labels −100 / < 0 ignored) + NSP CE."""
    s, t = student["output"], jax.lax.stop_gradient(teacher["output"])
    valid = mlm_labels >= 0
    mlm = optax.softmax_cross_entropy_with_integer_labels(s["mlm_logits"].astype(jnp.float32),
                                                          jnp.where(valid, mlm_labels, 0))
    terms = {"nsp_distill": soft_cross_entropy(s["nsp_logits"], t["nsp_logits"]),
             "hidden": hidden_loss(student["hidden"], jax.lax.stop_gradient(teacher["hidden"]), "mse"),
             "mlm": jnp.sum(mlm * valid) / jnp.maximum(valid.sum(), 1),
             "nsp": optax.softmax_cross_entropy_with_integer_labels(s["nsp_logits"].astype(jnp.float32),
                                                                    nsp_labels).mean()}
    return sum(terms.values()), terms
