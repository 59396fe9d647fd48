"""OFB (Once for Both): single-stage importance and sparsity search that compresses a ViT.

Paper: "Once for Both: Single Stage of Importance and Sparsity Search for Vision Transformer
Compression", Ye, Yu, Ye, Xia, Tang, Lu, Chen, Zhang, CVPR 2024, arXiv 2403.15835. Official code:
HankYe/Once-for-Both (``models/layers.py`` ``MAEPatchEmbed`` / ``MAESparseAttention`` /
``MAESparseMlp``, ``models/base_model.py``, ``models/vision_transformer.py``, ``losses.py``,
``engine.py``; MIT). Written from the official code's math; nothing copied.

**Search space** (exactly as the official code builds it, for a block of H heads of width d, MLP
width h, embedding width D; :func:`attention_candidates`, :func:`mlp_candidates`,
:func:`embed_candidates`): per attention block a joint grid of head counts ``2, 4, ..., H`` and
per-head q/k/v widths ``d/4, d/4 + max(d/8, 1), ..., d`` (DeiT-S: 3 x 7 cells); per MLP the hidden
widths ``h/4, h/4 + h/8, ..., h``; for the embedding ``D/2, D/2 + min(D/32, 12), ..., D`` (DeiT-S:
17). Each candidate is a prefix mask over *score-sorted* units.

**Bi-mask**: every searchable module has architecture logits alpha (uniform [0, 1) init) over its
active cells and an importance score per unit (normal, std 0.2). The weighted mask
``W = sum_c softmax(alpha)_c M_c`` is re-indexed so the highest-scoring units get the prefix
(attention: heads ranked by the sum of their sigmoid scores, channels by score inside each head),
and the unit multiplier is ``w_p sigmoid(score) + (1 - w_p) W_restored``, applied to q, k and v,
to the fc1 output, and to the patch embedding (with the position table and [CLS] token). ``w_p``
decays linearly from 0.99 to 0.1 over the warm-up (:func:`w_p_schedule`).

**Losses** (``losses.py`` / ``base_model.py``; :func:`sparsity_losses`, :func:`flops_loss`): per
module with more than one active cell, entropy of softmax(alpha) + ``tan(pi/2 - pi sigma^2 /
sigma^2_max) / #cells`` (the adaptive one-hot variance term, ``sigma^2_max = 1 - 1/#cells``) +
``lambda sum sigmoid(score)`` (lambda 4e-4 attention, 1e-4 otherwise); total
``w_head L_attn + w_mlp L_mlp + w_embed L_embed + w_flops ((F_search - F_target) / F_orig)^2``
(defaults 0.5, 0.5, 0.5, 5) added to the task loss. FLOPs follow the official ``get_flops``
formulas on the weighted masks (differentiable in alpha).

**Periodic compression** (:func:`compress`, about 3x per epoch, threshold 0.2): cells whose
normalized alpha is at most ``0.2 / #cells`` are switched off; when the largest candidates are off
the module is truncated to its largest active candidate (the lowest-scoring units are removed from
the weights); when one cell remains the module is finished: its weights are pruned to that
candidate and its score becomes the fixed-form multiplier ``w_p sigmoid(score) + (1 - w_p)`` (still
trained). Shapes change, so the search model is rebuilt (re-jitted) after a compression.

**Export** (:func:`export`): once every module is finished the multipliers are fused into the
weights and the subnet is a plain ``VisionTransformer`` (``block_overrides``: heads, head width,
MLP width per block; the attention scale stays the original ``d**-0.5``, as the official pruned
attention keeps ``qk_scale``). ``ofb_deit_a`` ... ``ofb_deit_e`` (``jaxformers.models.ofb_deit``)
are such subnets with the README's sizes.

The search loop (:func:`search`, and ``python -m train.ofb_search`` with
``train/configs/ofb_search.py``): AdamW on the weights, AdamW (betas 0.5, 0.999, weight decay 1e-3)
on alpha, task loss (label smoothing 0.1) + the architecture losses, w_p decay, compression every
third of an epoch, until every module is finished and the FLOPs target is met.

Deviations: the PMIM masked-image-modelling regulariser (``--mae``: patch masking 0.95 -> 0.75 and a
pixel decoder) and the optional patch-number search (``--patch_search``, off in the official
script) are not implemented; LayerNorm runs over all channels (the official code normalizes only
channels whose weighted mask is positive, which is all of them whenever the largest candidate is
active, the only state its compression leaves); one device (no all-reduce of alpha).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.layers import Dense, LayerNorm, dot_product_attention, gelu, logical, trunc_normal

__all__ = ["Space", "attention_candidates", "mlp_candidates", "embed_candidates", "OFBSearchViT", "init_search",
           "sparsity_losses", "flops", "flops_loss", "compress", "export", "search", "w_p_schedule", "finished",
           "weighted_mask", "restored_mask", "multiplier"]


# ---------------------------------------------------------------------------------------------
# Search space


def attention_candidates(num_heads: int, head_dim: int) -> tuple[list[int], list[int]]:
    """(head counts, per-head q/k/v widths): ``range(2, H + 1, 2)`` and ``range(d // 4, d + 1, max(d // 8, 1))``."""
    return list(range(2, num_heads + 1, 2)), list(range(head_dim // 4, head_dim + 1, max(head_dim // 8, 1)))


def mlp_candidates(hidden: int) -> list[int]:
    """MLP hidden widths: ``range(h // 4, h + 1, h // 8)``."""
    return list(range(hidden // 4, hidden + 1, hidden // 8))


def embed_candidates(embed_dim: int) -> list[int]:
    """Embedding widths: ``range(D // 2, D + 1, min(D // 32, 12))``."""
    return list(range(embed_dim // 2, embed_dim + 1, min(embed_dim // 32, 12)))


@dataclasses.dataclass(frozen=True)
class Space:
    """One searchable module: ``kind`` ("attn", "mlp", "embed"), its candidate values per axis
    (attn: head counts and head widths; others: widths), the active cells (flattened, row-major)
    and the current physical size (attn: (heads, head_dim); others: (width,))."""

    kind: str
    values: tuple[tuple[int, ...], ...]
    switch: tuple[bool, ...]
    size: tuple[int, ...]
    finished: bool = False

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.values)

    @property
    def active(self) -> int:
        return int(sum(self.switch))

    def mask(self) -> np.ndarray:
        """The candidates' prefix masks: attn (nh, H, nd, d), others (n, width)."""
        if self.kind == "attn":
            heads, dims = self.values
            H, d = self.size
            m = np.zeros((len(heads), H, len(dims), d), np.float32)
            for i, n in enumerate(heads):
                for j, w in enumerate(dims):
                    m[i, :n, j, :w] = 1.0
            return m
        (widths,) = self.values
        m = np.zeros((len(widths), self.size[0]), np.float32)
        for i, w in enumerate(widths):
            m[i, :w] = 1.0
        return m


def _space(kind, values, size, finished=False):
    grid = [len(v) for v in values]
    return Space(kind, tuple(tuple(int(x) for x in v) for v in values), (True,) * math.prod(grid), tuple(size),
                 finished or math.prod(grid) == 1)


def weighted_mask(space: Space, alpha: jax.Array) -> jax.Array:
    """``sum_c softmax(alpha over active cells)_c M_c``: attn (H, d), others (width,)."""
    switch = jnp.asarray(np.array(space.switch).reshape(alpha.shape))
    p = jax.nn.softmax(jnp.where(switch, alpha, -jnp.inf).reshape(-1)).reshape(alpha.shape)
    p = jnp.where(switch, p, 0.0)
    m = jnp.asarray(space.mask())
    if space.kind == "attn":
        return jnp.einsum("ij,ihjd->hd", p, m)
    return jnp.einsum("i,iw->w", p.reshape(-1), m)


def _ranks(score: jax.Array, axis: int = -1) -> jax.Array:
    """Position of every unit when sorted by descending score (0 = highest)."""
    return jnp.argsort(jnp.argsort(-score, axis=axis, stable=True), axis=axis, stable=True)


def restored_mask(space: Space, wm: jax.Array, score: jax.Array) -> jax.Array:
    """The weighted mask re-indexed to the units' score ranks (the official ``weight_restore``)."""
    score = jax.lax.stop_gradient(score)
    if space.kind == "attn":
        head_rank = _ranks(jax.nn.sigmoid(score).sum(-1))  # (H,)
        chan_rank = _ranks(score, axis=-1)  # (H, d)
        return wm[head_rank[:, None], chan_rank]
    return wm[_ranks(score.reshape(-1))]


def multiplier(space: Space, alpha: jax.Array, score: jax.Array, w_p: jax.Array) -> jax.Array:
    """Per-unit multiplier: attn (H, d), others (width,); a finished module's score itself."""
    if space.finished:
        return score.reshape(space.size)
    wm = weighted_mask(space, alpha)
    restored = restored_mask(space, wm, score.reshape(wm.shape))
    return (1.0 - w_p) * restored + w_p * jax.nn.sigmoid(score.reshape(wm.shape))


# ---------------------------------------------------------------------------------------------
# The search model (parameter names are the host VisionTransformer's; alpha / score in "ofb")


class OFBSearchViT(nn.Module):
    """A DeiT / ViT (class token, token pooling) with OFB's bi-masks; ``spaces``: (embed, attn_0,
    mlp_0, attn_1, mlp_1, ...). Variables: the host's ``params`` and the ``ofb`` collection."""

    spaces: tuple[Space, ...]
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    scale: float = 0.125
    qkv_bias: bool = True
    original: tuple[int, int, int, int] = (768, 12, 64, 3072)  # the host's (D, H, d, h): F_orig's sizes

    @property
    def depth(self) -> int:
        return (len(self.spaces) - 1) // 2

    @nn.compact
    def __call__(self, x: jax.Array, w_p: float | jax.Array = 0.99) -> jax.Array:
        w_p = jnp.asarray(w_p, jnp.float32)
        embed = self.spaces[0]
        D = embed.size[0]

        def arch(name, space, alpha_shape):
            alpha = self.variable("ofb", f"{name}_alpha", lambda: jnp.zeros(alpha_shape)).value
            score = self.variable("ofb", f"{name}_score", lambda: jnp.zeros(space.size if space.kind == "attn"
                                                                             else (space.size[0],))).value
            return multiplier(space, alpha, score, w_p)

        p = self.patch_size
        x = nn.Conv(D, (p, p), strides=p, padding="VALID", kernel_init=_init((None, None, None, "embed")),
                    bias_init=_init(("embed",), zeros=True), name="patch_embed_proj")(x)
        b = x.shape[0]
        x = x.reshape(b, -1, D)
        m_e = arch("embed", embed, embed.grid).astype(x.dtype)
        cls = self.param("cls_token", _init((None, None, "embed"), zeros=True), (1, 1, D))
        pos = self.param("pos_embed", _init((None, None, "embed"), zeros=True), (1, x.shape[1] + 1, D))
        x = x * m_e + pos[:, 1:] * m_e
        cls = jnp.broadcast_to((cls + pos[:, :1]) * m_e, (b, 1, D))
        x = jnp.concatenate([cls, x], axis=1)
        for i in range(self.depth):
            attn, mlp = self.spaces[1 + 2 * i], self.spaces[2 + 2 * i]
            H, d = attn.size
            y = LayerNorm(1e-6, name=f"blocks_{i}_norm1")(x)
            qkv = _dense((3, H, d), ("embed", None, "heads", "kv"), f"blocks_{i}_attn_qkv", self.qkv_bias)(y)
            m_a = arch(f"blocks_{i}_attn", attn, attn.grid)
            q, k, v = (qkv[..., j, :, :] * m_a for j in range(3))
            out = dot_product_attention(q, k, v, scale=self.scale)
            x = x + _dense(D, ("heads", "kv", "embed"), f"blocks_{i}_attn_proj", axis=(-2, -1))(out)
            y = LayerNorm(1e-6, name=f"blocks_{i}_norm2")(x)
            hdn = _dense(mlp.size[0], ("embed", "mlp"), f"blocks_{i}_mlp_fc1")(y) * arch(f"blocks_{i}_mlp", mlp, mlp.grid)
            x = x + _dense(D, ("mlp", "embed"), f"blocks_{i}_mlp_fc2")(gelu(hdn))
        x = LayerNorm(1e-6, name="norm")(x)
        return _dense(self.num_classes, ("embed", "classes"), "head")(x[:, 0])


def _init(names, zeros: bool = False):
    """Flax's default initializer (the values come from the host in ``init_search``) with the host
    ViT's logical axis names, so the search model shards like the host."""
    return logical(nn.initializers.zeros_init() if zeros else nn.initializers.lecun_normal(), names)


def _dense(features, names, name, use_bias: bool = True, axis=-1):
    n_in = 1 if isinstance(axis, int) else len(axis)
    return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, kernel_init=_init(names),
                           bias_init=_init(names[n_in:], zeros=True), name=name)


# Our flat search names <-> the host VisionTransformer's nested names.
def _to_search(params: dict) -> dict:
    out = {"patch_embed_proj": params["patch_embed"]["proj"], "cls_token": params["cls_token"],
           "pos_embed": params["pos_embed"], "norm": params["norm"], "head": params["head"]}
    i = 0
    while f"blocks_{i}" in params:
        blk = params[f"blocks_{i}"]
        out.update({f"blocks_{i}_norm1": blk["norm1"], f"blocks_{i}_norm2": blk["norm2"],
                    f"blocks_{i}_attn_qkv": blk["attn"]["qkv"], f"blocks_{i}_attn_proj": blk["attn"]["proj"],
                    f"blocks_{i}_mlp_fc1": blk["mlp"]["fc1"], f"blocks_{i}_mlp_fc2": blk["mlp"]["fc2"]})
        i += 1
    return out


def _to_host(params: dict, depth: int) -> dict:
    out = {"patch_embed": {"proj": params["patch_embed_proj"]}, "cls_token": params["cls_token"],
           "pos_embed": params["pos_embed"], "norm": params["norm"], "head": params["head"]}
    for i in range(depth):
        out[f"blocks_{i}"] = {"norm1": params[f"blocks_{i}_norm1"], "norm2": params[f"blocks_{i}_norm2"],
                              "attn": {"qkv": params[f"blocks_{i}_attn_qkv"], "proj": params[f"blocks_{i}_attn_proj"]},
                              "mlp": {"fc1": params[f"blocks_{i}_mlp_fc1"], "fc2": params[f"blocks_{i}_mlp_fc2"]}}
    return out


def init_search(host: nn.Module, variables: dict, rng: jax.Array, *, attn_search: bool = True,
                mlp_search: bool = True, embed_search: bool = True) -> tuple[OFBSearchViT, dict]:
    """The search model for a (trained) host ``VisionTransformer`` and its variables: the host's
    weights plus ``ofb`` alpha (uniform [0, 1)) and scores (normal, std 0.2) per searchable module."""
    if not getattr(host, "class_token", False) or host.global_pool != "token" or host.distilled:
        raise ValueError("OFB searches a DeiT/ViT with a [CLS] token and token pooling (not distilled)")
    if host.block_overrides is not None or host.token_reduction is not None or host.layer_scale_init is not None:
        raise ValueError("OFB starts from a uniform ViT (no block_overrides, token reduction or layer scale)")
    D, H = host.embed_dim, host.num_heads
    d, h = D // H, int(D * host.mlp_ratio)
    spaces = [_space("embed", [embed_candidates(D)] if embed_search else [[D]], (D,))]
    for _ in range(host.depth):
        heads, dims = attention_candidates(H, d) if attn_search else ([H], [d])
        spaces.append(_space("attn", [heads, dims], (H, d)))
        spaces.append(_space("mlp", [mlp_candidates(h)] if mlp_search else [[h]], (h,)))
    variables = nn.unbox(variables)
    model = OFBSearchViT(tuple(spaces), img_size=host.img_size, patch_size=host.patch_size, in_chans=host.in_chans,
                         num_classes=host.num_classes, scale=d ** -0.5, qkv_bias=host.qkv_bias, original=(D, H, d, h))
    keys = iter(jax.random.split(rng, 2 * len(spaces)))
    ofb = {}
    for name, space in _named(model):
        ofb[f"{name}_alpha"] = jax.random.uniform(next(keys), space.grid)
        shape = space.size if space.kind == "attn" else (space.size[0],)
        score = 0.2 * jax.random.truncated_normal(next(keys), -10.0, 10.0, shape)
        ofb[f"{name}_score"] = score if not space.finished else jnp.ones(shape)
    return model, {"params": _to_search(variables["params"]), "ofb": ofb}


def _named(model: OFBSearchViT) -> list[tuple[str, Space]]:
    out = [("embed", model.spaces[0])]
    for i in range(model.depth):
        out += [(f"blocks_{i}_attn", model.spaces[1 + 2 * i]), (f"blocks_{i}_mlp", model.spaces[2 + 2 * i])]
    return out


def finished(model: OFBSearchViT) -> bool:
    return all(s.finished for s in model.spaces)


def w_p_schedule(progress: float, warmup: float, hi: float = 0.99, lo: float = 0.1) -> float:
    """Official ``update_w``: linear from ``hi`` to ``lo`` over ``warmup`` (epochs or steps), then held."""
    return float(hi + (lo - hi) * min(progress, warmup) / warmup) if warmup > 0 else lo


# ---------------------------------------------------------------------------------------------
# Losses and FLOPs


def sparsity_losses(model: OFBSearchViT, ofb: dict, *, entropy: bool = True, var: bool = True,
                    norm: bool = True) -> dict[str, jax.Array]:
    """Official ``get_sparsity_loss``: {"attn", "mlp", "embed"} sums over modules with > 1 active cell."""
    out = {"attn": jnp.zeros(()), "mlp": jnp.zeros(()), "embed": jnp.zeros(())}
    for name, space in _named(model):
        if space.finished or space.active == 1:
            continue
        alpha = ofb[f"{name}_alpha"].reshape(-1)
        act = np.flatnonzero(np.array(space.switch))
        p = jax.nn.softmax(alpha[act])
        n = len(act)
        loss = -jnp.sum(p * jnp.log(p)) if entropy else jnp.zeros(())
        if var:
            sigma = jnp.sum((p - p.mean()) ** 2) / (1.0 - 1.0 / n)
            loss = loss + jnp.tan(jnp.pi / 2 - jnp.pi * sigma) / n
        if norm:
            loss = loss + jnp.sum(jax.nn.sigmoid(ofb[f"{name}_score"])) * (4e-4 if space.kind == "attn" else 1e-4)
        out[space.kind] = out[space.kind] + loss
    return out


def flops(model: OFBSearchViT, ofb: dict | None = None) -> tuple[jax.Array, jax.Array]:
    """(original, searched) GFLOPs by the official ``get_flops`` formulas; the searched value is
    differentiable in alpha (weighted-mask sums); ``ofb=None`` counts the physical sizes."""
    p = model.patch_size
    n = (model.img_size // p) ** 2
    nc = model.num_classes

    def active(name, space):
        if ofb is None or space.finished:
            return jnp.asarray(float(math.prod(space.size)))
        return weighted_mask(space, ofb[f"{name}_alpha"]).sum()

    named = dict(_named(model))
    embed = model.spaces[0]
    D0, H0, d0, h0 = model.original
    Hd0 = H0 * d0
    a_e = active("embed", embed)
    total = n * D0 * 3 * p * p + D0 * nc
    searched = n * a_e * 3 * p * p + a_e * nc
    for i in range(model.depth):
        attn, mlp = named[f"blocks_{i}_attn"], named[f"blocks_{i}_mlp"]
        H, d = attn.size
        sd = active(f"blocks_{i}_attn", attn)
        hd = active(f"blocks_{i}_mlp", mlp)
        total += 2 * D0 * n + (n * D0 * 3 * Hd0 + 3 * n * Hd0 + n * n * Hd0 + H0 * n * n + 5 * H0 * n * n + n * n * Hd0
                               + n * Hd0 * D0 + n * D0) + (2 * D0 * h0 + D0 + h0) * n
        searched = searched + 2 * embed.size[0] * n + (n * a_e * 3 * sd + 3 * n * sd + n * n * sd + H * n * n
                                                       + 5 * H * n * n + n * n * sd + n * sd * a_e + n * a_e)
        searched = searched + (2 * a_e * hd + a_e + hd) * n
    return jnp.asarray(total / 1e9), searched / 1e9


def flops_loss(model: OFBSearchViT, ofb: dict, target_gflops: float) -> jax.Array:
    """((F_search - F_target) / F_orig)^2 (official ``get_flops_loss``)."""
    total, searched = flops(model, ofb)
    return ((searched - target_gflops) / total) ** 2


# ---------------------------------------------------------------------------------------------
# Periodic compression (physical pruning) and export


def _softmax_np(a):
    e = np.exp(a - a.max())
    return e / e.sum()


def compress(model: OFBSearchViT, variables: dict, *, thresh: float = 0.2, w_p: float = 0.1,
             log: Callable[[str], None] | None = None) -> tuple[OFBSearchViT, dict, bool]:
    """One official ``compress`` pass. Returns (model, variables, changed): cells switched off,
    modules truncated or finished (weights physically pruned, see the module docstring)."""
    params = {k: dict(v) if isinstance(v, dict) else v for k, v in variables["params"].items()}
    params = jax.tree_util.tree_map(np.asarray, params)
    ofb = {k: np.asarray(v) for k, v in variables["ofb"].items()}
    spaces = list(model.spaces)
    changed = False
    for idx, (name, space) in enumerate(_named(model)):
        if space.finished:
            continue
        alpha = ofb[f"{name}_alpha"]
        sw = np.array(space.switch).reshape(alpha.shape)
        norm = _softmax_np(alpha[sw])
        threshold = thresh / sw.sum()
        if norm.min() > threshold:
            continue
        changed = True
        full = np.zeros_like(alpha)
        full[sw] = norm
        sw = full > threshold
        alpha = np.where(sw, alpha, 0.0)
        if log:
            log(f"OFB: {name}: {int(sw.sum())} of {sw.size} cells remain")
        score = ofb[f"{name}_score"]
        values = space.values
        if sw.sum() == 1:  # finished: prune to the single candidate; the score becomes the multiplier
            cell = np.argwhere(sw)[0] if space.kind == "attn" else (int(np.argmax(sw.reshape(-1))),)
            target = tuple(space.values[a][c] for a, c in enumerate(cell))
            keep = _keep(space, score, target)
            new_score = w_p * (1.0 / (1.0 + np.exp(-_take(space, score, keep)))) + (1.0 - w_p)
            space = Space(space.kind, tuple((v[c],) for v, c in zip(values, cell)), (True,), target, True)
            ofb[f"{name}_alpha"] = np.zeros(space.grid, np.float32)
            ofb[f"{name}_score"] = new_score.astype(np.float32)
            params = _prune(params, name, space.kind, keep, model.depth)
        else:
            last = _last_active(space, sw)
            if last is not None:  # the largest candidates are off: truncate to the largest active one
                target = tuple(space.values[a][last[a]] for a in range(len(values)))
                keep = _keep(space, score, target)
                values = tuple(v[: last[a] + 1] for a, v in enumerate(values))
                sw = sw[tuple(slice(0, i + 1) for i in last)]
                alpha = alpha[tuple(slice(0, i + 1) for i in last)]
                ofb[f"{name}_score"] = _take(space, score, keep).astype(np.float32)
                params = _prune(params, name, space.kind, keep, model.depth)
                space = Space(space.kind, values, tuple(bool(b) for b in sw.reshape(-1)), target, False)
            else:
                space = dataclasses.replace(space, switch=tuple(bool(b) for b in sw.reshape(-1)))
            ofb[f"{name}_alpha"] = alpha.astype(np.float32)
        spaces[0 if name == "embed" else 1 + 2 * int(name.split("_")[1]) + (name.endswith("mlp"))] = space
    new = model.clone(spaces=tuple(spaces))
    return new, {"params": jax.tree_util.tree_map(jnp.asarray, params),
                 "ofb": {k: jnp.asarray(v) for k, v in ofb.items()}}, changed


def _last_active(space, sw):
    """Indices of the largest active candidate per axis when the largest cells are all off, else None."""
    if space.kind == "attn":
        if sw[:, -1].any() and sw[-1, :].any():
            return None
        nz = np.argwhere(sw)
        return (int(nz[:, 0].max()), int(nz[:, 1].max()))
    flat = sw.reshape(-1)
    if flat[-1]:
        return None
    return (int(np.flatnonzero(flat).max()),)


def _keep(space, score, target):
    """Units kept (highest scores): attn (head indices, per-head channel indices), others indices."""
    if space.kind == "attn":
        n_heads, width = target
        heads = np.argsort(-(1.0 / (1.0 + np.exp(-score))).sum(-1), kind="stable")[:n_heads] if score.shape[0] > 1 \
            else np.arange(n_heads)
        chans = np.argsort(-score, axis=1, kind="stable")[:, :width][heads]
        return heads, chans
    return np.argsort(-score.reshape(-1), kind="stable")[: target[0]]


def _take(space, score, keep):
    if space.kind == "attn":
        heads, chans = keep
        return np.take_along_axis(score[heads], chans, axis=1)
    return score.reshape(-1)[keep]


def _prune(params, name, kind, keep, depth):
    """Slice the weights of module ``name`` (and, for the embedding, of every consumer) to ``keep``."""
    if kind == "attn":
        heads, chans = keep
        qkv, proj = dict(params[f"{name}_qkv"]), dict(params[f"{name}_proj"])
        qkv["kernel"] = np.stack([np.take_along_axis(qkv["kernel"][:, j][:, heads], chans[None], axis=2)
                                  for j in range(3)], axis=1)
        if "bias" in qkv:
            qkv["bias"] = np.stack([np.take_along_axis(qkv["bias"][j][heads], chans, axis=1) for j in range(3)])
        proj["kernel"] = np.take_along_axis(proj["kernel"][heads], chans[..., None], axis=1)
        params[f"{name}_qkv"], params[f"{name}_proj"] = qkv, proj
    elif kind == "mlp":
        fc1, fc2 = dict(params[f"{name}_fc1"]), dict(params[f"{name}_fc2"])
        fc1["kernel"], fc1["bias"] = fc1["kernel"][:, keep], fc1["bias"][keep]
        fc2["kernel"] = fc2["kernel"][keep]
        params[f"{name}_fc1"], params[f"{name}_fc2"] = fc1, fc2
    else:  # the embedding width: every tensor with an embedding axis
        pe = dict(params["patch_embed_proj"])
        pe["kernel"], pe["bias"] = pe["kernel"][..., keep], pe["bias"][keep]
        params["patch_embed_proj"] = pe
        params["cls_token"] = params["cls_token"][..., keep]
        params["pos_embed"] = params["pos_embed"][..., keep]
        params["norm"] = {k: v[keep] for k, v in params["norm"].items()}
        params["head"] = {**params["head"], "kernel": params["head"]["kernel"][keep]}
        for i in range(depth):
            for nrm in ("norm1", "norm2"):
                params[f"blocks_{i}_{nrm}"] = {k: v[keep] for k, v in params[f"blocks_{i}_{nrm}"].items()}
            qkv, proj = dict(params[f"blocks_{i}_attn_qkv"]), dict(params[f"blocks_{i}_attn_proj"])
            qkv["kernel"] = qkv["kernel"][keep]
            proj["kernel"], proj["bias"] = proj["kernel"][..., keep], proj["bias"][keep]
            fc1, fc2 = dict(params[f"blocks_{i}_mlp_fc1"]), dict(params[f"blocks_{i}_mlp_fc2"])
            fc1["kernel"] = fc1["kernel"][keep]
            fc2["kernel"], fc2["bias"] = fc2["kernel"][:, keep], fc2["bias"][keep]
            params[f"blocks_{i}_attn_qkv"], params[f"blocks_{i}_attn_proj"] = qkv, proj
            params[f"blocks_{i}_mlp_fc1"], params[f"blocks_{i}_mlp_fc2"] = fc1, fc2
    return params


def export(model: OFBSearchViT, variables: dict):
    """Fuse the finished search model's multipliers into its weights: (VisionTransformer, variables)."""
    from jaxformers.models.vit import VisionTransformer

    if not finished(model):
        raise ValueError("OFB export needs a finished search (every module down to one candidate); run compress "
                         "until ofb.finished(model)")
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    ofb = {k: np.asarray(v) for k, v in variables["ofb"].items()}
    s_e = ofb["embed_score"].reshape(-1)
    p["patch_embed_proj"] = {"kernel": p["patch_embed_proj"]["kernel"] * s_e, "bias": p["patch_embed_proj"]["bias"] * s_e}
    p["cls_token"], p["pos_embed"] = p["cls_token"] * s_e, p["pos_embed"] * s_e
    overrides = []
    for i in range(model.depth):
        attn, mlp = model.spaces[1 + 2 * i], model.spaces[2 + 2 * i]
        s_a = ofb[f"blocks_{i}_attn_score"]  # (H, d)
        qkv = dict(p[f"blocks_{i}_attn_qkv"])
        qkv["kernel"] = qkv["kernel"] * s_a[None, None]
        if "bias" in qkv:
            qkv["bias"] = qkv["bias"] * s_a[None]
        p[f"blocks_{i}_attn_qkv"] = qkv
        s_m = ofb[f"blocks_{i}_mlp_score"].reshape(-1)
        fc1 = dict(p[f"blocks_{i}_mlp_fc1"])
        fc1["kernel"], fc1["bias"] = fc1["kernel"] * s_m, fc1["bias"] * s_m
        p[f"blocks_{i}_mlp_fc1"] = fc1
        overrides.append({"num_heads": attn.size[0], "head_dim": attn.size[1], "mlp_hidden": mlp.size[0],
                          "scale": model.scale})
    host = VisionTransformer(img_size=model.img_size, patch_size=model.patch_size, in_chans=model.in_chans,
                             num_classes=model.num_classes, embed_dim=model.spaces[0].size[0], depth=model.depth,
                             num_heads=overrides[0]["num_heads"], qkv_bias=model.qkv_bias,
                             block_overrides=tuple(overrides))
    return host, {"params": jax.tree_util.tree_map(jnp.asarray, _to_host(p, model.depth))}


# ---------------------------------------------------------------------------------------------
# The search loop


def search(model: OFBSearchViT, variables: dict, batches: Iterable[tuple[jax.Array, jax.Array]], *,
           target_gflops: float, steps: int, steps_per_epoch: int, warmup_epochs: float = 2.0,
           lr: float = 1e-3, lr_arch: float = 1e-3, weight_decay: float = 1e-3, label_smoothing: float = 0.1,
           w_head: float = 0.5, w_mlp: float = 0.5, w_embed: float = 0.5, w_flops: float = 5.0,
           thresh: float = 0.2, compress_every: int | None = None,
           log: Callable[[str], None] | None = None,
           compiler_options: dict | None = None) -> tuple[OFBSearchViT, dict, list[dict]]:
    """Run the OFB search for ``steps`` steps on ``batches`` (an iterator of (images, labels)).
    Compression every ``compress_every`` steps (default a third of an epoch, as the official engine).
    Returns the final (model, variables) and per-step metrics (``gflops``: the searched FLOPs of the
    architecture the step trained, before its update). ``compiler_options`` go to ``jax.jit`` of the
    step (e.g. a lower XLA optimisation level for tiny models, where compiling dominates)."""
    compress_every = compress_every or max(steps_per_epoch // 3, 1)
    tx_w = optax.adamw(lr, weight_decay=0.05)
    tx_a = optax.adamw(lr_arch, b1=0.5, b2=0.999, weight_decay=weight_decay)
    history = []

    def build(model):
        named = _named(model)

        def loss_fn(train_vars, x, y, w_p):
            logits = model.apply(train_vars, x, w_p)
            targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
            task = optax.softmax_cross_entropy(logits, targets).mean()
            sp = sparsity_losses(model, train_vars["ofb"])
            arch = (w_head * sp["attn"] + w_mlp * sp["mlp"] + w_embed * sp["embed"]
                    + w_flops * flops_loss(model, train_vars["ofb"], target_gflops))
            acc = jnp.mean(jnp.argmax(logits, -1) == y)
            gflops = flops(model, jax.lax.stop_gradient(train_vars["ofb"]))[1]
            return task + arch, {"task": task, "arch": arch, "accuracy": acc, "gflops": gflops}

        @functools.partial(jax.jit, compiler_options=compiler_options)
        def step(train_vars, opt_w, opt_a, x, y, w_p):
            (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(train_vars, x, y, w_p)
            # alpha of finished modules is frozen (official: requires_grad False)
            g_ofb = {k: (jnp.zeros_like(v) if k.endswith("_alpha") and dict(named)[k[:-6]].finished else v)
                     for k, v in g["ofb"].items()}
            arch_keys = {k for k in g_ofb if k.endswith("_alpha")}
            g_w = {"params": g["params"], "ofb": {k: v for k, v in g_ofb.items() if k not in arch_keys}}
            g_a = {k: g_ofb[k] for k in arch_keys}
            w = {"params": train_vars["params"], "ofb": {k: v for k, v in train_vars["ofb"].items() if k not in arch_keys}}
            a = {k: train_vars["ofb"][k] for k in arch_keys}
            u_w, opt_w = tx_w.update(g_w, opt_w, w)
            u_a, opt_a = tx_a.update(g_a, opt_a, a)
            w, a = optax.apply_updates(w, u_w), optax.apply_updates(a, u_a)
            return {"params": w["params"], "ofb": {**w["ofb"], **a}}, opt_w, opt_a, loss, aux

        return step

    def opt_states(variables):
        arch = {k for k in variables["ofb"] if k.endswith("_alpha")}
        w = {"params": variables["params"], "ofb": {k: v for k, v in variables["ofb"].items() if k not in arch}}
        return tx_w.init(w), tx_a.init({k: variables["ofb"][k] for k in arch})

    step_fn = build(model)
    opt_w, opt_a = opt_states(variables)
    it = iter(batches)
    for s in range(steps):
        x, y = next(it)
        w_p = w_p_schedule(s / steps_per_epoch, warmup_epochs)
        variables, opt_w, opt_a, loss, aux = step_fn(variables, opt_w, opt_a, x, y, w_p)
        history.append({"step": s, "loss": float(loss), **{k: float(v) for k, v in aux.items()}, "w_p": w_p})
        if not finished(model) and (s + 1) % compress_every == 0:
            model, variables, changed = compress(model, variables, thresh=thresh, w_p=w_p, log=log)
            if changed:  # new shapes: new optimizer states (the official code re-indexes them) and a new step
                step_fn = build(model)
                opt_w, opt_a = opt_states(variables)
    return model, variables, history
