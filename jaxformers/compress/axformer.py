"""AxFormer: accuracy-driven pruning and selective sparse hard attention of a fine-tuned transformer.

Paper: "AxFormer: Accuracy-driven Approximation of Transformers for Faster, Smaller and more
Accurate NLP Models", Nagarajan, Sen, Stevens, Raghunathan, arXiv 2010.03688. No official code was
found (``sytelus/axformer`` is unrelated); the choices the paper's description leaves open are below.

The method, on a model already fine-tuned for the task:

1. **Accuracy-driven pruning.** Elements of the model (whole attention sublayers, whole FFN
   sublayers, single attention heads; removing both sublayers of a block removes the layer) are
   ranked by an importance analysis: the change of the validation loss when the element alone is
   removed. In that order (least important first) each element is tentatively removed and the
   removal kept when the validation accuracy stays at or above the fine-tuned model's minus
   ``tolerance`` (``tolerance=0``: only removals that do not hurt, the paper's point that some
   parts hurt the downstream task). Greedy, validation-driven.
2. **Selective sparse hard attention.** In chosen layers each query attends only to its ``k``
   highest-scoring keys (the others get -inf before the softmax); layers are tried in order and
   the sparse attention kept where the validation accuracy holds.

Both are transforms of (module, variables): the search evaluates removals by zeroing the element's
output weights (the removed head's rows of ``proj``; the sublayer's output projection and bias),
which computes exactly what the removed element contributes (nothing), so one compiled evaluation
serves every candidate; :func:`prune` then removes the elements physically (a smaller model with
``block_overrides``: fewer heads, ``num_heads=0`` / ``mlp_hidden=0`` for removed sublayers) whose
outputs equal the zeroed model's. Top-k attention goes through the shared ``dot_product_attention``
with a mask (``topk_attention``), set per layer by ``block_overrides(attention_fn=...)``.

Host: ``VisionTransformer`` (``vit_*`` / ``deit_*``); the elements are its blocks' heads and sublayers.

Choices: importance = validation-loss increase when removed alone; the order of elements is that
importance, ascending; heads are pruned before whole sublayers inside the same ranking; top-k layers
are tried from the last layer down; accuracy is measured on the validation batch given.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.layers.attention import dot_product_attention

__all__ = ["Element", "topk_attention", "zero_elements", "prune", "search", "selective_topk", "evaluate"]


@dataclasses.dataclass(frozen=True, order=True)
class Element:
    """One prunable part of block ``block``: ``kind`` "head" (with ``index``), "attn" or "mlp"."""

    block: int
    kind: str
    index: int = -1


def topk_attention(q, k, v, *, segment_ids=None, scale=None, topk: int = 8):
    """Softmax attention where each query keeps only its ``topk`` highest logits (ties included)."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    kth = jax.lax.top_k(logits, min(topk, logits.shape[-1]))[0][..., -1:]
    mask = jax.lax.stop_gradient(logits >= kth)
    return dot_product_attention(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale)


def _heads(model, block: int) -> int:
    return model.block_fields(block).get("num_heads", model.num_heads)


def zero_elements(model, params: dict, elements: Sequence[Element]) -> dict:
    """``params`` with the output weights of ``elements`` zeroed (same shapes: the removal's effect)."""
    params = nn.unbox(params)  # plain arrays (an init's params carry logical-axis boxes)
    for e in elements:
        blk = dict(params[f"blocks_{e.block}"])
        if e.kind == "head":
            attn = dict(blk["attn"])
            proj = dict(attn["proj"])
            proj["kernel"] = proj["kernel"].at[e.index].set(0.0)
            attn["proj"] = proj
            blk["attn"] = attn
        elif e.kind in ("attn", "mlp"):
            sub, out = ("attn", "proj") if e.kind == "attn" else ("mlp", "fc2")
            layer = dict(blk[sub])
            layer[out] = jax.tree_util.tree_map(jnp.zeros_like, layer[out])
            blk[sub] = layer
        else:
            raise ValueError(f"unknown element kind {e.kind!r} (expected 'head', 'attn' or 'mlp')")
        params[f"blocks_{e.block}"] = blk
    return params


def prune(model, params: dict, elements: Sequence[Element]):
    """The model without ``elements``: (smaller module, its params), computing what the zeroed model
    computes. Heads are sliced out of qkv / proj; a removed sublayer loses its parameters
    (``num_heads=0`` / ``mlp_hidden=0``). A block whose heads are all removed one by one (not as
    "attn") still adds ``proj``'s bias: it keeps one zeroed head that carries it."""
    overrides = [model.block_fields(i) for i in range(model.depth)]
    params = dict(nn.unbox(params))
    by_block: dict[int, list[Element]] = {}
    for e in elements:
        by_block.setdefault(e.block, []).append(e)
    for b, elems in by_block.items():
        kinds = {e.kind for e in elems}
        blk = dict(params[f"blocks_{b}"])
        heads = _heads(model, b)
        drop_heads = sorted({e.index for e in elems if e.kind == "head"})
        if "attn" in kinds or len(drop_heads) == heads:
            if "attn" not in kinds and np.any(np.asarray(blk["attn"]["proj"]["bias"])):
                # All heads gone but proj's bias still adds a constant: keep one zeroed head carrying it.
                keep = np.array([0])
                attn = dict(blk["attn"])
                attn["qkv"] = jax.tree_util.tree_map(lambda a: a[..., keep, :] if a.ndim >= 3 else a, attn["qkv"])
                attn["proj"] = {"kernel": jnp.zeros_like(attn["proj"]["kernel"][keep]), "bias": attn["proj"]["bias"]}
                blk["attn"] = attn
                overrides[b]["num_heads"] = 1
                overrides[b].setdefault("head_dim", model.embed_dim // model.num_heads)
                overrides[b].setdefault("scale", (model.embed_dim // model.num_heads) ** -0.5)
            else:
                for name in ("norm1", "attn", "ls1"):
                    blk.pop(name, None)
                overrides[b]["num_heads"] = 0
        elif drop_heads:
            keep = np.array([h for h in range(heads) if h not in drop_heads])
            attn = dict(blk["attn"])
            qkv = dict(attn["qkv"])
            qkv["kernel"] = qkv["kernel"][:, :, keep]
            if "bias" in qkv:
                qkv["bias"] = qkv["bias"][:, keep]
            attn["qkv"] = qkv
            attn["proj"] = {**attn["proj"], "kernel": attn["proj"]["kernel"][keep]}
            blk["attn"] = attn
            head_dim = model.embed_dim // model.num_heads
            overrides[b].update(num_heads=len(keep), head_dim=overrides[b].get("head_dim", head_dim),
                                scale=overrides[b].get("scale", head_dim ** -0.5))
        if "mlp" in kinds:
            for name in ("norm2", "mlp", "ls2"):
                blk.pop(name, None)
            overrides[b]["mlp_hidden"] = 0
        params[f"blocks_{b}"] = blk
    return model.clone(block_overrides=tuple(overrides)), params


def evaluate(model, variables: dict, x: jax.Array, y: jax.Array, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on (x, y)."""
    fn = _eval_fn(model)
    correct, loss = 0.0, 0.0
    for i in range(0, x.shape[0], batch_size):
        c, l_ = fn(variables, x[i:i + batch_size], y[i:i + batch_size])
        correct, loss = correct + float(c), loss + float(l_)
    return correct / x.shape[0], loss / x.shape[0]


_EVAL_FNS: dict[int, tuple[Any, Callable]] = {}


def _eval_fn(model):
    if id(model) not in _EVAL_FNS:
        @jax.jit
        def fn(variables, x, y):
            logits = model.apply(variables, x)
            return (jnp.sum(jnp.argmax(logits, -1) == y),
                    jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)))
        if len(_EVAL_FNS) > 64:
            _EVAL_FNS.clear()
        _EVAL_FNS[id(model)] = (model, fn)  # the module is kept alive so its id stays its own
    return _EVAL_FNS[id(model)][1]


def candidates(model, kinds: Sequence[str] = ("head", "attn", "mlp")) -> list[Element]:
    out = []
    for b in range(model.depth):
        heads = _heads(model, b)
        if "head" in kinds and heads > 1:
            out += [Element(b, "head", h) for h in range(heads)]
        if "attn" in kinds and heads:
            out.append(Element(b, "attn"))
        if "mlp" in kinds:
            out.append(Element(b, "mlp"))
    return out


def search(model, variables: dict, x_val: jax.Array, y_val: jax.Array, *, tolerance: float = 0.0,
           kinds: Sequence[str] = ("head", "attn", "mlp"), max_removed: int | None = None,
           log: Callable[[str], None] | None = None) -> list[Element]:
    """Greedy accuracy-driven removal (see the module docstring); returns the removed elements."""
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    base_acc, base_loss = evaluate(model, variables, x_val, y_val)
    elems = candidates(model, kinds)
    importance = []
    for e in elems:
        _, loss = evaluate(model, {**rest, "params": zero_elements(model, params, [e])}, x_val, y_val)
        importance.append(loss - base_loss)
    order = [elems[i] for i in np.argsort(importance, kind="stable")]
    removed: list[Element] = []
    for e in order:
        if max_removed is not None and len(removed) >= max_removed:
            break
        if any(r.block == e.block and (r.kind == "attn" and e.kind == "head") for r in removed):
            continue
        trial = removed + [e]
        if e.kind == "attn":
            trial = [r for r in trial if not (r.block == e.block and r.kind == "head")]
        a, _ = evaluate(model, {**rest, "params": zero_elements(model, params, trial)}, x_val, y_val)
        if a >= base_acc - tolerance:
            removed = trial
            if log:
                log(f"removed {e} -> accuracy {a:.4f}")
    return removed


def selective_topk(model, variables: dict, x_val: jax.Array, y_val: jax.Array, *, topk: int = 8,
                   tolerance: float = 0.0, layers: Sequence[int] | None = None):
    """Top-k hard attention in the layers where validation accuracy holds (tried last layer first).
    Returns (model with ``attention_fn`` set in those layers, the chosen layers)."""
    base_acc, _ = evaluate(model, variables, x_val, y_val)
    chosen: list[int] = []
    fn = functools.partial(topk_attention, topk=topk)
    order = list(layers) if layers is not None else list(range(model.depth))[::-1]
    current = model
    for i in order:
        if _heads(model, i) == 0:
            continue
        overrides = [current.block_fields(j) for j in range(model.depth)]
        overrides[i]["attention_fn"] = fn
        trial = current.clone(block_overrides=tuple(overrides))
        a, _ = evaluate(trial, variables, x_val, y_val)
        if a >= base_acc - tolerance:
            current = trial
            chosen.append(i)
    return current, chosen
