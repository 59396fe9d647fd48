"""SeqPE: positions written as digit sequences and encoded by a small causal transformer.

Paper: "SeqPE: Transformer with Sequential Position Encoding", Li et al. 2025, arXiv 2506.13277.
Official code: ghrua/seqpe (``text_seqpe/src/transformers/custom_modules/{sequential_pe, pe_criterion,
pe_utils, pe_sampler}.py``, ``image_seqpe/``).

A position p (1-D) or (h, w) (2-D) becomes the decimal digits of each coordinate, left-padded to
``max_digits`` = len(str(max_position - 1)) (123 -> 0 0 1 2 3, the padding masked), concatenated over the
coordinates (``positions_to_digits``). ``SeqPEEncoder`` embeds the digits (token embedding over 0-9 +
an embedding of the digit's slot + a learned per-coordinate embedding in 2-D), appends a learned CLS
token, runs two GPT-2-style causal pre-LN blocks (the shared ``jaxformers.models.gpt.DecoderLayer``,
padding digits masked as keys), a final LayerNorm, and reads out Linear(h_CLS) / temperature. Unseen
positions are just unseen digit strings, so the encoding exists for any position within the digit
budget (a position beyond it is a clear error).

``SeqPE`` is a *position encoder* for the models' ``position_encoder`` field (``CausalLM`` for the 1-D
language model, ``VisionTransformer`` for 2-D images): from the query and key positions it returns
``jaxformers.layers.PositionTerms`` -- for ``mode="input_add"`` an input term, for ``"attn_scalar"``
per-layer attention biases (pe_q · pe_k) / sqrt(d_h) (the paper's language-model setting), for
``"attn_add"`` / ``"attn_mul"`` per-layer (q, k) transforms q + pe_q, k + pe_k / q * pe_q, k * pe_k (the
image setting: ``attn_mul``). pe_q and pe_k come from a projection of the encoding shared by all layers
(``pe_qk="single"``), one per layer (``"multi"``) or none (``"none"``: the encoding is both).

Regularisers for extrapolation (``seqpe_losses``): a **contrastive** loss -- for a pivot position and
``K`` candidates (random positions, positions near the pivot, and "hard" digit edits of the pivot:
``contrastive_batch``), cross-entropy picks the candidate nearest to the pivot from per-head dot
products of encodings -- and a **transfer** loss -- the symmetric KL divergence between the
softmax Gram matrices of encodings of positions in the training range and of the same positions
shifted beyond it (the training range's one as a fixed target, ``transfer_batch``).

Training positions (the official ``SeqPeMainTaskPosSampler`` in ``image_seqpe/pe_sampler.py`` and
``text_seqpe/.../pe_sampler.py``): ``block_positions(start, shape)`` writes the positions of a block the
way the official code does -- 1-D ``start .. start+L-1``; 2-D row by row, (h0, w0), (h0, w0+1), ...,
(h0+1, w0), ... (``PeUtils.create_2d_pos_list``), each (row, column) becoming the row's digits then the
column's. ``MainTaskPositions`` draws the main task's positions: with probability ``rate`` (the run
scripts' ``pe_random_shift_rate`` 0.1) a block starting at a random shift -- 1-D shifts 0 ..
max_position - L, 2-D shifts (i, j) with the whole block inside [0, max_position)² -- from a fixed random
subset of ``downsample`` (320) shifts visited in order from a random pointer, otherwise the block at 0.
The transfer loss is applied only on unshifted steps (as the official training loop does).

For 2-D, ``max_position`` counts positions per coordinate: the official ``--pe_max_position 10000`` with
``--pe_data_dim 2`` means 100 per side (two digits per coordinate), i.e. ``max_position=100`` here.

``SinCosPositions`` (fixed sinusoidal input term; 2-D: half the channels for the row, half for the
column) is the same hook for the sin-cos baseline of the extrapolation benchmarks. Deviations: the
contrastive and transfer samplers follow the paper's description (random / local window / digit-edit
candidates, shifted transfer positions) with this module's defaults rather than the repo's exact sampling
code; a shifted step shifts the whole batch by one offset (the official loop splits a shifted batch of
256 into 32 groups with 32 offsets). The per-head contrastive and transfer losses and the 0.1 / 0.1
weights follow the run scripts.
"""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.layers import Dense, LayerNorm, PositionTerms
from jaxformers.models.gpt import DecoderLayer

__all__ = ["SeqPE", "SeqPEEncoder", "SinCosPositions", "positions_to_digits", "max_digits_for", "contrastive_loss",
           "transfer_loss", "contrastive_batch", "transfer_batch", "seqpe_losses", "block_positions",
           "MainTaskPositions"]

Mode = Literal["input_add", "attn_scalar", "attn_add", "attn_mul"]
_init = nn.initializers.normal(0.02)


def max_digits_for(max_position: int) -> int:
    """Digits per coordinate for positions 0..max_position-1 (len(str(max_position - 1)))."""
    return len(str(max(int(max_position) - 1, 0)))


def positions_to_digits(positions: jax.Array | np.ndarray, max_digits: int) -> tuple[jax.Array, jax.Array]:
    """(N, D) int positions -> digits (N, D·max_digits) int32, left-padded with 0, and the mask (True = a
    real digit; position 0 has one real digit "0"). Coordinates are concatenated: (12, 3), 3 digits ->
    0 1 2 0 0 3. A concrete position needing more than ``max_digits`` digits is a ValueError."""
    positions = jnp.asarray(positions, jnp.int32)
    if positions.ndim != 2:
        raise ValueError(f"positions must be (N, dims) integers; got shape {positions.shape}")
    try:
        hi, lo = int(np.max(np.asarray(positions))), int(np.min(np.asarray(positions)))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        hi = lo = 0
    if lo < 0:
        raise ValueError(f"positions must be >= 0; got {lo}")
    if hi >= 10 ** max_digits:
        raise ValueError(f"position {hi} needs {len(str(hi))} digits but this SeqPE writes positions with "
                         f"max_digits={max_digits} (positions < {10 ** max_digits}); build it with a larger "
                         f"max_position")
    powers = 10 ** jnp.arange(max_digits - 1, -1, -1, dtype=jnp.int32)  # most significant first
    digits = (positions[..., None] // powers) % 10  # (N, D, max_digits)
    real = (positions[..., None] >= powers) | (powers == 1)
    n = positions.shape[0]
    return digits.reshape(n, -1).astype(jnp.int32), real.reshape(n, -1)


class SeqPEEncoder(nn.Module):
    """Digit sequences of positions -> (N, out_dim) encodings (see the module docstring)."""

    d_pe: int = 64
    out_dim: int = 64
    data_dim: int = 1
    max_digits: int = 5
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.0
    temperature: float = 1.0
    last_layernorm: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, positions: jax.Array, *, train: bool = False) -> jax.Array:
        if positions.ndim != 2 or positions.shape[-1] != self.data_dim:
            raise ValueError(f"SeqPE with data_dim={self.data_dim} takes (N, {self.data_dim}) positions; got "
                             f"{positions.shape}")
        digits, real = positions_to_digits(positions, self.max_digits)
        n, s = digits.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = lambda num, name: nn.Embed(num, self.d_pe, embedding_init=nn.with_logical_partitioning(  # noqa: E731
            _init, (None, "embed")), name=name, **kw)
        x = emb(10, "token_embed")(digits) + emb(s, "digit_position_embed")(jnp.arange(s))[None]
        if self.data_dim > 1:
            dim_embed = self.param("dim_embed", nn.with_logical_partitioning(_init, (None, "embed")),
                                   (self.data_dim, self.d_pe), self.param_dtype)
            x = x + jnp.repeat(dim_embed, self.max_digits, axis=0)[None].astype(x.dtype)
        cls = self.param("cls", nn.with_logical_partitioning(_init, (None, "embed")), (1, self.d_pe), self.param_dtype)
        x = jnp.concatenate([x, jnp.broadcast_to(cls[None].astype(x.dtype), (n, 1, self.d_pe))], axis=1)
        keys = jnp.concatenate([real, jnp.ones((n, 1), bool)], axis=1)[:, None, None, :]
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        for i in range(self.num_layers):
            x = DecoderLayer(self.num_heads, 4 * self.d_pe, "gelu_new", 1e-5, self.dropout, 0.0,
                             name=f"layer_{i}", **kw)(x, train, keys)
        h = x[:, -1]
        if self.last_layernorm:
            h = LayerNorm(1e-5, name="final_norm", **kw)(h)
        return Dense(self.out_dim, axes=("embed", None), kernel_init=_init, name="out", **kw)(h) / self.temperature


class SeqPE(nn.Module):
    """SeqPE as a ``position_encoder``: ``(q_positions, k_positions, num_layers=, num_heads=, head_dim=,
    width=, num_prefix=) -> PositionTerms``; ``encode(positions)`` gives the raw encodings (for the
    regularisers)."""

    mode: Mode = "attn_scalar"
    max_position: int = 10000
    data_dim: int = 1
    d_pe: int = 64
    num_layers: int = 2
    num_heads: int = 4
    pe_qk: Literal["single", "multi", "none"] = "single"
    dropout: float = 0.0
    temperature: float = 1.0
    last_layernorm: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def max_digits(self) -> int:
        return max_digits_for(self.max_position)

    @nn.nowrap
    def encoder_module(self) -> SeqPEEncoder:
        """The digit-sequence encoder alone; its variables are this module's ``params["encoder"]``."""
        return SeqPEEncoder(self.d_pe, self.d_pe, self.data_dim, self.max_digits, self.num_layers, self.num_heads,
                            self.dropout, self.temperature, self.last_layernorm, dtype=self.dtype,
                            param_dtype=self.param_dtype)

    @nn.nowrap
    def encode(self, params: Any, positions: Any, *, train: bool = False, rngs: Any = None) -> jax.Array:
        """(N, data_dim) positions -> (N, d_pe) with this module's parameters ``params`` (outside ``apply``)."""
        return self.encoder_module().apply({"params": params["encoder"]}, jnp.asarray(positions), train=train,
                                           rngs=rngs)

    @nn.compact
    def __call__(self, q_positions: jax.Array, k_positions: jax.Array, *, num_layers: int, num_heads: int,
                 head_dim: int, width: int, num_prefix: int = 0, train: bool = False) -> PositionTerms:
        if self.mode not in ("input_add", "attn_scalar", "attn_add", "attn_mul"):
            raise ValueError(f"mode must be 'input_add', 'attn_scalar', 'attn_add' or 'attn_mul'; got {self.mode!r}")
        lq = q_positions.shape[0]
        same = q_positions is k_positions
        encoder = SeqPEEncoder(self.d_pe, self.d_pe, self.data_dim, self.max_digits, self.num_layers, self.num_heads,
                               self.dropout, self.temperature, self.last_layernorm, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="encoder")
        enc = encoder(q_positions if same else jnp.concatenate([q_positions, k_positions]), train=train)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.mode == "input_add":
            return PositionTerms(inputs=Dense(width, axes=(None, "embed"), kernel_init=_init, name="input_proj",
                                              **kw)(enc[:lq]))
        inner = num_heads * head_dim
        if self.pe_qk == "none" and self.d_pe != inner:
            raise ValueError(f"pe_qk='none' needs d_pe = heads x head_dim = {inner}; got d_pe={self.d_pe}")

        def project(name):
            if self.pe_qk == "none":
                return enc, enc
            both = nn.DenseGeneral((2, inner), kernel_init=_init, name=name, **kw)(enc)
            return both[:, 0], both[:, 1]

        shared = project("pe_qk") if self.pe_qk != "multi" else None
        terms = []
        for i in range(num_layers):
            pq, pk = shared if shared is not None else project(f"pe_qk_{i}")
            pq = pq[:lq].reshape(lq, num_heads, head_dim)
            pk = pk[(0 if same else lq):].reshape(-1, num_heads, head_dim)
            if self.mode == "attn_scalar":
                terms.append(jnp.einsum("qhd,khd->hqk", pq, pk) * head_dim ** -0.5)
            else:
                terms.append(_qk_transform(self.mode, pq, pk, num_prefix))
        return PositionTerms(biases=tuple(terms)) if self.mode == "attn_scalar" else PositionTerms(qk_fns=tuple(terms))


def _qk_transform(mode: str, pq: jax.Array, pk: jax.Array, num_prefix: int):
    """q, k (B, L, H, Dh) -> transformed, the first ``num_prefix`` tokens (class tokens) untouched."""

    def fn(q, k):
        ident = 1.0 if mode == "attn_mul" else 0.0
        pad = lambda p: jnp.concatenate([jnp.full((num_prefix, *p.shape[1:]), ident, p.dtype), p])[None]  # noqa: E731
        if mode == "attn_mul":
            return q * pad(pq).astype(q.dtype), k * pad(pk).astype(k.dtype)
        return q + pad(pq).astype(q.dtype), k + pad(pk).astype(k.dtype)

    return fn


class SinCosPositions(nn.Module):
    """Transformer sinusoids as a ``position_encoder`` (an input term; no parameters): the sin-cos
    baseline of the extrapolation comparisons. With D-coordinate positions the width is split into D
    equal parts, one sin-cos code per coordinate (2-D: row, then column, as in MAE's 2-D sin-cos)."""

    @nn.compact
    def __call__(self, q_positions: jax.Array, k_positions: jax.Array, *, num_layers: int, num_heads: int,
                 head_dim: int, width: int, num_prefix: int = 0, train: bool = False) -> PositionTerms:
        del k_positions, num_layers, num_heads, head_dim, num_prefix, train
        dims = q_positions.shape[-1]
        if width % (2 * dims):
            raise ValueError(f"sin-cos positions of {dims} coordinates need a width divisible by {2 * dims}; "
                             f"got {width}")
        half = width // dims // 2
        omega = 1.0 / 10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half)
        codes = []
        for d in range(dims):
            ang = q_positions[:, d].astype(jnp.float32)[:, None] * omega[None]
            codes += [jnp.sin(ang), jnp.cos(ang)]
        return PositionTerms(inputs=jnp.concatenate(codes, axis=-1))


def block_positions(start: int | tuple[int, int], shape: int | tuple[int, int]) -> np.ndarray:
    """Positions of a block as the official code builds them: 1-D ``start`` / length L -> (L, 1)
    start .. start+L-1; 2-D ``(h0, w0)`` / ``(H, W)`` -> (H·W, 2) (row, column) row by row:
    (h0, w0), (h0, w0+1), ..., (h0, w0+W-1), (h0+1, w0), ... (``PeUtils.create_2d_pos_list``)."""
    if isinstance(shape, (int, np.integer)):
        return (int(start) + np.arange(int(shape)))[:, None].astype(np.int32)
    (h0, w0), (h, w) = start, shape
    rows, cols = np.meshgrid(np.arange(h0, h0 + h), np.arange(w0, w0 + w), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], -1).astype(np.int32)


class MainTaskPositions:
    """The main task's training positions with the official random start shift
    (``SeqPeMainTaskPosSampler``): ``next(rng)`` -> (positions (L, D), shifted). With probability
    ``rate`` the block starts at the next of ``downsample`` shifts drawn once at construction (from all
    shifts keeping the block inside [0, max_position) per coordinate; the official pointer starts at a
    random 0..31 and restarts there when the list is exhausted); otherwise it starts at 0. ``shape`` is
    the length L (1-D) or the patch grid (H, W) (2-D, ``max_position`` per coordinate)."""

    def __init__(self, shape: int | tuple[int, int], max_position: int, rng: np.random.Generator, *,
                 rate: float = 0.1, downsample: int = 320):
        self.shape = shape if isinstance(shape, (int, np.integer)) else tuple(shape)
        self.rate = float(rate)
        if isinstance(self.shape, tuple):
            h, w = self.shape
            if h > max_position or w > max_position:
                raise ValueError(f"a {h}x{w} grid does not fit max_position={max_position} per coordinate")
            starts = [(i, j) for i in range(max_position - h + 1) for j in range(max_position - w + 1)]
            self.default = block_positions((0, 0), self.shape)
        else:
            if self.shape > max_position:
                raise ValueError(f"length {self.shape} does not fit max_position={max_position}")
            starts = list(range(max_position - self.shape + 1))
            self.default = block_positions(0, self.shape)
        order = rng.permutation(len(starts))
        if downsample > 0:
            order = order[:downsample]
        self.starts = [starts[i] for i in order]
        self.pointer = int(32 * rng.random())

    def next(self, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        if self.pointer >= len(self.starts):
            self.pointer = int(32 * rng.random())
        if rng.random() < self.rate:
            start = self.starts[min(self.pointer, len(self.starts) - 1)]
            self.pointer += 1
            return block_positions(start, self.shape), True
        return self.default, False


# ---------------------------------------------------------------------------------------------
# Regularisers and their samplers


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
    d = x.shape[-1]
    if d % num_heads:
        raise ValueError(f"encoding width {d} is not divisible by num_heads={num_heads}")
    return x.reshape(*x.shape[:-1], num_heads, d // num_heads)


def contrastive_loss(pivot: jax.Array, candidates: jax.Array, labels: jax.Array, *, num_heads: int = 1,
                     label_smoothing: float = 0.0, logit_scale: float = 1.0) -> jax.Array:
    """Cross-entropy choosing, for each pivot encoding (P, d), the candidate (P, K, d) at ``labels`` (P,)
    (the nearest position) from dot products; with ``num_heads`` the encodings are split into heads and
    every (pivot, head) is one row (P·H rows)."""
    p = _heads(pivot, num_heads)  # (P, H, dh)
    c = _heads(candidates, num_heads)  # (P, K, H, dh)
    logits = jnp.einsum("phd,pkhd->phk", p, c) * logit_scale
    k = logits.shape[-1]
    targets = jax.nn.one_hot(jnp.broadcast_to(labels[:, None], logits.shape[:2]), k)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def transfer_loss(main: jax.Array, shifted: jax.Array, *, num_heads: int = 1) -> jax.Array:
    """Symmetric KL between the row-softmax Gram matrices of the encodings of positions in the training
    range (``main`` (T, d), a fixed target: stop-gradient) and of the same positions shifted beyond it
    (``shifted`` (T, d)): KL(s || m) + KL(m || s), summed over each row and averaged over rows and heads."""
    gram = lambda e: jnp.einsum("ihd,jhd->hij", _heads(e, num_heads), _heads(e, num_heads))  # noqa: E731
    log_m = jax.nn.log_softmax(jax.lax.stop_gradient(gram(main)).astype(jnp.float32), axis=-1)
    log_s = jax.nn.log_softmax(gram(shifted).astype(jnp.float32), axis=-1)
    kl = lambda lp, lq: jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)  # noqa: E731  KL(p || q) per row
    return jnp.mean(kl(log_s, log_m) + kl(log_m, log_s))


def _digit_edit(p: int, rng: np.random.Generator, max_position: int) -> int:
    """A "hard negative": the pivot with one digit changed, inserted, deleted, or two neighbours swapped."""
    s = list(str(p))
    op = rng.integers(4)
    i = int(rng.integers(len(s)))
    if op == 0:
        s[i] = str((int(s[i]) + 1 + rng.integers(9)) % 10)
    elif op == 1 and len(s) < len(str(max_position - 1)):
        s.insert(i, str(rng.integers(10)))
    elif op == 2 and len(s) > 1:
        del s[i]
    elif len(s) > 1:
        j = min(i + 1, len(s) - 1)
        s[i], s[j] = s[j], s[i]
    else:
        s[0] = str((int(s[0]) + 1) % 10)
    return min(int("".join(s)), max_position - 1)


def contrastive_batch(rng: np.random.Generator, num_pivots: int, num_candidates: int, max_position: int, *,
                      data_dim: int = 1, local_range: int = 256, hard_fraction: float = 0.25,
                      local_probability: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pivots (P, D), candidates (P, K, D) and labels (P,) for ``contrastive_loss``: per pivot, either
    uniform random candidates or candidates in a window of ±``local_range`` around it (probability
    ``local_probability``), ``hard_fraction`` of them replaced by digit edits of the pivot; the label
    is the candidate nearest to the pivot (squared distance; ties: the first)."""
    pivots = rng.integers(0, max_position, (num_pivots, data_dim))
    cands = np.empty((num_pivots, num_candidates, data_dim), np.int64)
    for i, p in enumerate(pivots):
        if rng.random() < local_probability:
            c = p + rng.integers(-local_range, local_range + 1, (num_candidates, data_dim))
        else:
            c = rng.integers(0, max_position, (num_candidates, data_dim))
        c = np.clip(c, 0, max_position - 1)
        hard = rng.random(num_candidates) < hard_fraction
        for j in np.flatnonzero(hard):
            d = int(rng.integers(data_dim))
            c[j] = p
            c[j, d] = _digit_edit(int(p[d]), rng, max_position)
        cands[i] = c
    labels = np.argmin(((cands - pivots[:, None]) ** 2).sum(-1), axis=1)
    return pivots.astype(np.int32), cands.astype(np.int32), labels.astype(np.int32)


def transfer_batch(rng: np.random.Generator, num: int, train_max: int, max_position: int, *,
                   data_dim: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``num`` positions in the training range [0, train_max) (D coordinates each) and the same
    positions shifted by one random offset per coordinate that moves them up to ``max_position``."""
    if train_max >= max_position:
        raise ValueError(f"train_max={train_max} must be < max_position={max_position}")
    main = rng.integers(0, train_max, (num, data_dim))
    span = main.max(0)
    shift = rng.integers(1, np.maximum(max_position - span, 2), data_dim)
    return main.astype(np.int32), np.minimum(main + shift, max_position - 1).astype(np.int32)


def seqpe_losses(seqpe: SeqPE, params: Any, rng: np.random.Generator, *, train_max: int, num_heads: int = 4,
                 num_pivots: int = 16, num_candidates: int = 32, transfer_num: int = 32,
                 local_range: int = 256) -> tuple[jax.Array, jax.Array]:
    """(contrastive, transfer) losses of ``seqpe`` with its parameters ``params`` (the subtree of the model's
    parameters it owns) on fresh samples from ``rng``: add ``0.1 * (contrastive + transfer)`` to the task
    loss (the paper's weights). Inside a jitted step, draw the samples outside (``contrastive_batch``,
    ``transfer_batch``) and pass them in as arrays."""
    pivots, cands, labels = contrastive_batch(rng, num_pivots, num_candidates, seqpe.max_position,
                                              data_dim=seqpe.data_dim, local_range=local_range)
    main, shifted = transfer_batch(rng, transfer_num, train_max, seqpe.max_position, data_dim=seqpe.data_dim)
    enc = lambda p: seqpe.encode(params, p)  # noqa: E731
    k = cands.shape[1]
    ct = contrastive_loss(enc(pivots), enc(cands.reshape(-1, seqpe.data_dim)).reshape(len(pivots), k, -1),
                          jnp.asarray(labels), num_heads=num_heads)
    return ct, transfer_loss(enc(main), enc(shifted), num_heads=num_heads)


# ---------------------------------------------------------------------------------------------
# Length extrapolation on a synthetic language-modelling task


def periodic_copy_batch(rng: np.random.Generator, batch: int, length: int, *, period: int = 8,
                        vocab: int = 16) -> np.ndarray:
    """(batch, length) int32 sequences that repeat a random block of ``period`` tokens: from step
    ``period`` on, token t equals token t - period, so predicting it needs the relative position (look
    back ``period`` steps) at every length."""
    block = rng.integers(0, vocab, (batch, period))
    reps = -(-length // period)
    return np.tile(block, (1, reps))[:, :length].astype(np.int32)


def extrapolation_run(position: Literal["seqpe", "learned", "sincos"], *, train_len: int = 32,
                      eval_lens: tuple[int, ...] = (32, 64, 128), steps: int = 300, batch: int = 32,
                      width: int = 32, layers: int = 2, heads: int = 2, period: int = 8, vocab: int = 16,
                      max_position: int = 1000, regularizer_weight: float = 0.1, lr: float = 3e-3,
                      seed: int = 0, random_shift_rate: float = 0.1) -> dict[str, Any]:
    """Trains a small GPT-2-style ``CausalLM`` on ``periodic_copy_batch`` at ``train_len`` with learned
    positions (a table of ``max(eval_lens)`` rows: the rows past ``train_len`` are never trained), fixed
    sin-cos positions, or SeqPE (``attn_scalar`` + the contrastive and transfer losses, weight
    ``regularizer_weight`` each, transfer to positions up to ``max_position``; with probability
    ``random_shift_rate`` a step's positions start at a random shift, ``MainTaskPositions``, and skip the
    transfer loss, as the official training loop); returns the final training
    loss and the next-token accuracy on the predictable tokens (t >= period) at each of ``eval_lens``."""
    from jaxformers.models.gpt import CausalLM

    rng = np.random.default_rng(seed)
    encoder = {"seqpe": SeqPE(mode="attn_scalar", max_position=max_position, d_pe=width, num_heads=heads),
               "sincos": SinCosPositions(), "learned": None}[position]
    model = CausalLM(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                     max_position_embeddings=max(max(eval_lens), train_len, max_position if position == "seqpe" else 0),
                     dropout=0.0, embed_dropout=0.0,
                     attention_dropout=0.0, position_encoder=encoder)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, train_len), jnp.int32)))["params"]
    tx = optax.adam(lr)
    opt = tx.init(params)

    def lm_loss(p, ids, position_ids=None):
        logits = model.apply({"params": p}, ids, position_ids=position_ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        return ce.mean()

    @jax.jit
    def step(p, opt, ids, pivots, cands, labels, main, shifted, position_ids, use_transfer):
        def loss_fn(p):
            loss = lm_loss(p, ids, position_ids)
            if encoder is not None and position == "seqpe":
                enc = lambda q: encoder.encode(p["position_encoder"], q)  # noqa: E731
                ct = contrastive_loss(enc(pivots), enc(cands.reshape(-1, 1)).reshape(*cands.shape[:2], -1), labels,
                                      num_heads=heads)
                tr = transfer_loss(enc(main), enc(shifted), num_heads=heads)
                loss = loss + regularizer_weight * (ct + use_transfer * tr)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    loss = None
    sampler = MainTaskPositions(train_len, max_position, rng, rate=random_shift_rate) if position == "seqpe" else None
    for _ in range(steps):
        ids = jnp.asarray(periodic_copy_batch(rng, batch, train_len, period=period, vocab=vocab))
        pivots, cands, labels = contrastive_batch(rng, 16, 16, max_position, local_range=64)
        main, shifted = transfer_batch(rng, 32, train_len, max_position)
        positions, moved = sampler.next(rng) if sampler is not None else (block_positions(0, train_len), False)
        position_ids = jnp.broadcast_to(jnp.asarray(positions[:, 0]), ids.shape)
        params, opt, loss = step(params, opt, ids, pivots, cands, labels, main, shifted, position_ids,
                                 jnp.float32(not moved))
    accuracy, apply = {}, jax.jit(model.apply)
    for length in eval_lens:
        ids = jnp.asarray(periodic_copy_batch(np.random.default_rng(seed + 1), 64, length, period=period, vocab=vocab))
        pred = jnp.argmax(apply({"params": params}, ids), -1)
        accuracy[length] = float(jnp.mean(pred[:, period - 1:-1] == ids[:, period:]))
    return {"position": position, "train_loss": float(loss), "accuracy": accuracy}
