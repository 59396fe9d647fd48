"""Curved Contrastive Learning (imaginary embeddings): bi-encoders whose cosine encodes turn distance.

Paper: "Imagination is All You Need! Curved Contrastive Learning for Abstract Sequence Modeling
Utilized on Long Short-Term Dialogue Planning", Erker, Schaffer and Spanakis, Findings of ACL 2023,
arXiv 2211.07591; code Justus-Jonas/imaginaryNLP (``trainer.py``, ``ImaginaryEmbeddingsForLTP.py``).

- **Tokens** (``add_tokens``): ``[BEFORE]``, ``[AFTER]`` and the speaker tokens ``[O]`` / ``[E]`` are
  added to the tokenizer and the embedding table grows by their rows (``resize_token_embeddings``:
  new rows = the mean of the existing ones, transformers' default ``mean_resizing``).
- **Data** (``ccl_examples``, the official generator with its quirks): windows of ``w`` (5)
  utterances slide over each dialogue starting at 0 .. len - w - 1 (the last full window is not used).
  In a window, anchor ``"{spk} [BEFORE] " + u_0`` and target ``"[AFTER] " + u_d`` get the label
  (w - d) / w for d = 1 .. w - 1 (w = 5: 0.8, 0.6, 0.4, 0.2), ``spk`` = ``[E]`` for even d, ``[O]``
  for odd. Negatives (label 0): the reversed pair ``"{spk} [BEFORE] " + u_d`` / ``"[AFTER] " + u_0``
  for every d, and one random pair per d, picked among four shapes (random target or random anchor,
  ``[O]`` or ``[E]``; the speaker token here follows the shape, not d).
- **Loss**: ``CosineSimilarityLoss`` (MSE between cos and label) through ``trans_encoder.train_bi_encoder``
  (mean pooling; AdamW 2e-5, WarmupLinear).
- **Planning** (``greedy_curving``): candidates (goals) are embedded as ``"[AFTER]  " + goal``; the
  context utterances as ``"[E]/[O] [BEFORE]  " + u``, the speaker token alternating from the last
  utterance backwards ([O] for the last one when ``goal_distance_odd``); a candidate's score is the
  sum of its cosines with every context embedding, and the best is the argmax.

Deviation: the official trainer mixes in an AllNLI ``ContrastiveLoss`` objective (``mixed_with_nli``),
a dataset that is not available offline; it is left out. ``synthetic_dialogs`` generates scripted
dialogues (a fixed sequence of dialogue acts, each written several ways) for training and evaluation.
"""
from __future__ import annotations

import random
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.text.encoders import Encoder, embed

TOKENS = ("[BEFORE]", "[AFTER]", "[O]", "[E]")


def label_schedule(window: int = 5) -> dict[int | None, float]:
    """{d: (w - d) / w for d = 1 .. w - 1, None: 0.0} (the official ``ltp_labels_dict``)."""
    out: dict[int | None, float] = {None: 0.0}
    out.update({d: (window - d) / window for d in range(1, window)})
    return out


def ccl_examples(dialogs: Sequence[Sequence[str]], window: int = 5, speaker_tokens: bool = True,
                 seed: int = 0, random_pool: Sequence[str] | None = None) -> list[tuple[str, str, float]]:
    """(anchor, target, label) examples of the curved objective, in the official order (see the module
    docstring). ``random_pool``: the utterances random negatives draw from (default: all of ``dialogs``)."""
    labels = label_schedule(window)
    even, odd = ("[E] ", "[O] ") if speaker_tokens else ("", "")
    pool = list(random_pool) if random_pool is not None else [u for d in dialogs for u in d]
    rng = random.Random(seed)
    out = []
    for dialog in dialogs:
        for i in range(0, len(dialog) - window):
            win = dialog[i:i + window]
            for d in range(1, len(win)):
                out.append(((even if d % 2 == 0 else odd) + "[BEFORE] " + win[0], "[AFTER] " + win[d], labels[d]))
            for d in range(1, len(win)):
                out.append(((even if d % 2 == 0 else odd) + "[BEFORE] " + win[d], "[AFTER] " + win[0], 0.0))
                choice, r1, r2 = rng.choice([1, 2, 3, 4]), rng.choice(pool), rng.choice(pool)
                out.append({1: (odd + "[BEFORE] " + win[d], "[AFTER] " + r1, 0.0),
                            2: (even + "[BEFORE] " + win[d], "[AFTER] " + r2, 0.0),
                            3: (odd + "[BEFORE] " + r1, "[AFTER] " + win[d], 0.0),
                            4: (even + "[BEFORE] " + r2, "[AFTER] " + win[d], 0.0)}[choice])
    return out


def add_tokens(encoder: Encoder, tokens: Sequence[str] = TOKENS) -> Encoder:
    """The encoder with ``tokens`` added as special tokens to a copy of its tokenizer and its word
    embedding table grown to match (new rows = the mean of the old ones)."""
    from jaxformers.text import Tokenizer

    backend = type(encoder.tokenizer.backend).from_str(encoder.tokenizer.backend.to_str())
    tokenizer = Tokenizer(backend, model_max_length=encoder.tokenizer.model_max_length)
    tokenizer.backend.add_special_tokens(list(tokens))
    size = tokenizer.vocab_size
    params = jax.tree.map(lambda x: x, encoder.params)
    table = params["embeddings"]["word_embeddings"]["embedding"]
    if size > table.shape[0]:
        extra = jnp.broadcast_to(table.mean(0, keepdims=True), (size - table.shape[0], table.shape[1]))
        params["embeddings"]["word_embeddings"]["embedding"] = jnp.concatenate([table, extra.astype(table.dtype)])
    if "mlm" in params and "bias" in params["mlm"] and params["mlm"]["bias"].shape[0] < size:
        bias = params["mlm"]["bias"]
        params["mlm"]["bias"] = jnp.concatenate([bias, jnp.zeros((size - bias.shape[0],), bias.dtype)])
    return encoder.replace(module=encoder.module.clone(vocab_size=size), params=params, tokenizer=tokenizer)


def greedy_curving(bi: Encoder, context: Sequence[str], candidates: Sequence[str], *, speaker_tokens: bool = True,
                   goal_distance_odd: bool = True) -> np.ndarray:
    """Scores (C,) of candidate goals after ``context`` (oldest first): the sum over context utterances
    of cos(context "[BEFORE]" embedding, candidate "[AFTER]" embedding) (``greedy_curving``)."""
    goals = _unit(embed(bi, ["[AFTER]  " + c for c in candidates]))
    if speaker_tokens:
        rows = []
        for i, utterance in enumerate(reversed(list(context))):  # i = 0: the last utterance
            odd = (i % 2 == 0) == goal_distance_odd
            rows.append(("[O] " if odd else "[E] ") + "[BEFORE]  " + utterance)
    else:
        rows = ["[BEFORE]  " + u for u in context]
    return (_unit(embed(bi, rows)) @ goals.T).sum(0)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- generated dialogues

ACTS = (
    ("hello , welcome to the restaurant line .", "hi there , this is the restaurant .", "good evening , how can i help ?"),
    ("hi , i would like to book a table .", "hello , can i reserve a table please ?", "i want to make a reservation ."),
    ("sure , for how many people ?", "of course , how many guests ?", "certainly , what is the party size ?"),
    ("a table for four , please .", "we are four people .", "four guests , thank you ."),
    ("what time would you like to come ?", "at what time should we expect you ?", "which time suits you ?"),
    ("around eight in the evening .", "at eight o'clock tonight .", "eight pm would be great ."),
    ("may i have your name for the booking ?", "under what name is the reservation ?", "can i get a name please ?"),
    ("it is under smith .", "the name is smith .", "please put it under smith ."),
    ("your table is booked , see you tonight .", "all set , we will see you at eight .", "the reservation is confirmed ."),
    ("thank you very much , goodbye .", "thanks a lot , bye .", "great , thank you , goodbye ."),
)


def synthetic_dialogs(num: int, seed: int = 0) -> list[list[str]]:
    """``num`` dialogues following the 10 acts of ``ACTS`` in order, each act worded at random."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return [[act[rng.integers(len(act))] for act in ACTS] for _ in range(num)]


def planning_scores(bi: Encoder, dialogs: Sequence[Sequence[str]], *, context_len: int = 3,
                    speaker_tokens: bool = True) -> dict[str, float]:
    """Goal ranking after ``context_len`` utterances, candidates = the rest of the same dialogue (turn
    distances 1, 2, ...) scored by greedy curving: ``next_turn_top1`` (the next utterance ranks first)
    and ``distance_spearman`` (mean Spearman correlation of score and -distance: the curve)."""
    from jaxformers.text.metrics import spearman

    hits, corr = [], []
    for dialog in dialogs:
        candidates = list(dialog[context_len:])
        scores = greedy_curving(bi, dialog[:context_len], candidates, speaker_tokens=speaker_tokens)
        hits.append(int(np.argmax(scores)) == 0)
        corr.append(spearman(scores, -np.arange(1, len(candidates) + 1)))
    return {"next_turn_top1": float(np.mean(hits)), "distance_spearman": float(np.nanmean(corr))}


__all__ = ["TOKENS", "add_tokens", "ccl_examples", "greedy_curving", "label_schedule", "planning_scores",
           "synthetic_dialogs"]
