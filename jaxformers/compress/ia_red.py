"""IA-RED^2: interpretability-aware redundancy reduction (a learned, input-dependent patch dropper).

Paper: "IA-RED^2: Interpretability-Aware Redundancy Reduction for Vision Transformers", Pan, Panda,
Jiang, Wang, Feris, Oliva, NeurIPS 2021, arXiv 2106.12620; project page
people.csail.mit.edu/bpan/ia-red ("code coming soon": no official code was released). Written from
the paper's description; the choices the description leaves open are listed below.

The method: the ViT's blocks are split into D groups; before each group a *multi-head interpreter*
(the policy network) scores every patch token and uninformative ones are dropped, so the dropping
is hierarchical and input-dependent. The interpreters are trained with REINFORCE: keep/drop actions
u_i ~ Bernoulli(p_i), reward R = 1 - (kept fraction)^2 when the prediction is right and -gamma
when it is wrong (efficiency only counts when the answer is right), first with the backbone
frozen, then jointly fine-tuned; at evaluation the policy is deterministic (keep p_i > 0.5).

Here: ``VisionTransformer(token_reduction=IARed2(group_starts=(0, 3, 6, 9), budgets=(...)))``.

- Interpreter (:class:`MultiHeadInterpreter`, reading the tokens through ``stop_gradient``: the
  policy gradient trains the interpreters only): LayerNorm, per-head query of the [CLS] token and
  key of every patch token (``heads`` heads of width ``dim / heads``), per-head score
  ``q_h . k_h,i / sqrt(d)``, averaged over the heads, plus a learned bias, through a sigmoid:
  the keep probability p_i. Its parameters live in the host's tree as ``interpreter_{g}``.
- Static shapes under ``jit``: group g keeps a fixed number of patch tokens, its *budget*
  ``budgets[g]``, so compiled FLOPs are fixed. The kept set is the ``budget`` tokens first by
  action (u_i = 1 before u_i = 0) then by p_i; a kept token whose action is "drop" (possible when
  fewer tokens than the budget were kept) gets size 0, which the proportional attention turns into
  a -inf logit: it is invisible to every later attention and to the average pool. Tokens beyond
  the budget are gone (gathered away). The reward uses the policy's own kept fraction (sum u / N).
- Training mode samples u (RNG stream ``policy``); evaluation thresholds at ``threshold`` (0.5).
  The log-probability of the sampled actions and the kept fraction of every group are sown into
  the ``ia_red`` collection; :func:`reinforce_loss` turns them into the policy-gradient loss with
  the batch-mean reward as baseline (our variance-reduction choice).
- :func:`interpreter_labels` labels parameters ``"policy"`` / ``"backbone"`` for
  ``optax.multi_transform`` (backbone frozen = ``optax.set_to_zero()`` on it).

Choices (no official code): the interpreter's exact layers, the batch-mean baseline, the fixed
per-group budgets (the paper's dropping is fully dynamic), gamma 0.5 by default.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.compress.token_reduction import TokenReduction
from jaxformers.layers.linear import logical, trunc_normal
from jaxformers.layers.norm import LayerNorm

__all__ = ["IARed2", "MultiHeadInterpreter", "reinforce_loss", "interpreter_labels", "reward"]


class MultiHeadInterpreter(nn.Module):
    """Keep probabilities (B, N_patch) of the patch tokens from (B, N, C) tokens ([CLS] first)."""

    heads: int = 4
    num_prefix_tokens: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.heads:
            raise ValueError(f"interpreter heads={self.heads} must divide the width {c}")
        d = c // self.heads
        y = LayerNorm(1e-6, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)

        def dense(name):
            return nn.DenseGeneral((self.heads, d), dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                                   kernel_init=logical(trunc_normal(0.02), ("embed", "heads", "kv")),
                                   bias_init=logical(nn.initializers.zeros_init(), ("heads", "kv")))

        q = dense("query")(y[:, 0])
        k = dense("key")(y[:, self.num_prefix_tokens:])
        scores = jnp.einsum("bhd,bnhd->bnh", q, k).mean(-1) * d ** -0.5
        bias = self.param("bias", nn.initializers.constant(2.0), (), self.param_dtype)  # start by keeping
        return jax.nn.sigmoid(scores.astype(jnp.float32) + bias)


@dataclasses.dataclass(frozen=True)
class IARed2(TokenReduction):
    """Interpreters before blocks ``group_starts``; group g keeps ``budgets[g]`` patch tokens."""

    group_starts: Sequence[int] = (0,)
    budgets: Sequence[int] = (0,)
    heads: int = 4
    threshold: float = 0.5
    proportional_attention: bool = True  # required: masked tokens are size 0 -> -inf logits

    def validate(self, depth: int) -> None:
        starts = tuple(self.group_starts)
        if len(starts) != len(tuple(self.budgets)):
            raise ValueError(f"IA-RED2 needs one budget per group: {len(starts)} group starts, "
                             f"{len(tuple(self.budgets))} budgets")
        if list(starts) != sorted(set(starts)) or not starts or starts[0] < 0 or starts[-1] >= depth:
            raise ValueError(f"group_starts must be increasing block indices in [0, {depth}); got {starts}")
        if any(b < 1 for b in self.budgets) or list(self.budgets) != sorted(self.budgets, reverse=True):
            raise ValueError(f"budgets must be >= 1 token per image and non-increasing; got {tuple(self.budgets)}")

    def before_block(self, module, i, x, size, *, train):
        starts = tuple(self.group_starts)
        if i not in starts:
            return x, size
        g = starts.index(i)
        npt = module.num_prefix_tokens
        n_patch = x.shape[1] - npt
        budget = int(self.budgets[g])
        if budget > n_patch:
            raise ValueError(f"IA-RED2 group {g} keeps {budget} patch tokens but only {n_patch} reach it")
        # The policy reads the tokens without sending its REINFORCE gradient into the backbone.
        p = MultiHeadInterpreter(self.heads, npt, dtype=module.dtype, param_dtype=module.param_dtype,
                                 name=f"interpreter_{g}")(jax.lax.stop_gradient(x))
        alive = size[:, npt:] > 0  # tokens not already dropped by an earlier group
        if train:
            u = jax.random.bernoulli(module.make_rng("policy"), jax.lax.stop_gradient(p)).astype(jnp.float32)
        else:
            u = (p > self.threshold).astype(jnp.float32)
        u = u * alive
        eps = 1e-6
        logp = jnp.where(alive, u * jnp.log(p + eps) + (1 - u) * jnp.log(1 - p + eps), 0.0).sum(-1)
        kept_fraction = u.sum(-1) / jnp.maximum(alive.sum(-1), 1)
        if not module.is_initializing():
            module.sow("ia_red", "log_prob", logp)
            module.sow("ia_red", "kept_fraction", kept_fraction)
        priority = jax.lax.stop_gradient(u * 2.0 + p)
        idx = jnp.sort(jax.lax.top_k(priority, budget)[1], axis=1) + npt
        idx = jnp.concatenate([jnp.broadcast_to(jnp.arange(npt), (x.shape[0], npt)), idx], axis=1)
        x = jnp.take_along_axis(x, idx[..., None], axis=1)
        keep = jnp.concatenate([jnp.ones((x.shape[0], npt)), jnp.take_along_axis(u, idx[:, npt:] - npt, axis=1)], 1)
        size = jnp.take_along_axis(size, idx, axis=1) * keep
        return x, size


def reward(logits: jax.Array, labels: jax.Array, kept_fraction: jax.Array, gamma: float = 0.5) -> jax.Array:
    """R = 1 - kept_fraction^2 for a right prediction, -gamma for a wrong one (per example)."""
    right = jnp.argmax(logits, -1) == labels
    return jnp.where(right, 1.0 - kept_fraction ** 2, -gamma)


def reinforce_loss(model: nn.Module, params: Any, x: jax.Array, labels: jax.Array, rng: jax.Array, *,
                   gamma: float = 0.5, other_variables: dict | None = None) -> tuple[jax.Array, dict]:
    """REINFORCE loss of the interpreters (one sampled policy per image): ``-(R - mean R) sum_g log pi_g``
    with R from :func:`reward` on the mean kept fraction over the groups. Returns (loss, metrics)."""
    variables = {"params": params, **(other_variables or {})}
    logits, state = model.apply(variables, x, train=True, mutable=["ia_red"],
                                rngs={"policy": rng, "dropout": jax.random.fold_in(rng, 1)})
    sown = state["ia_red"]
    logp = sum(sown["log_prob"])
    kept = jnp.stack(sown["kept_fraction"]).mean(0)
    r = jax.lax.stop_gradient(reward(logits, labels, kept, gamma))
    loss = -jnp.mean((r - r.mean()) * logp)
    return loss, {"reward": r.mean(), "kept_fraction": kept.mean(),
                  "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def interpreter_labels(params: Any) -> Any:
    """``"policy"`` for the interpreters' parameters, ``"backbone"`` for the rest (optax.multi_transform)."""
    return {k: jax.tree_util.tree_map(lambda _: "policy" if k.startswith("interpreter_") else "backbone", v)
            for k, v in params.items()}
