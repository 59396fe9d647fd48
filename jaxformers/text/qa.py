"""Extractive question answering: start/end logits -> the answer span in the original text."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Answer:
    """A span of the context: ``text == context[start:end]``; ``score`` = start + end logit."""

    text: str
    start: int
    end: int
    score: float


def decode_answer(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    sequence_ids: np.ndarray,
    context: str,
    *,
    context_sequence: int = 1,
    max_answer_tokens: int = 30,
    n_best: int = 20,
) -> Answer | None:
    """Best span for one example (the usual SQuAD post-processing).

    ``start_logits`` / ``end_logits`` (L,) from ``Bert(head="qa")``; ``offsets`` (L, 2) and
    ``sequence_ids`` (L,) from ``Tokenizer.encode(question, context, return_offsets=True)``. Spans
    must lie inside the context (``sequence_ids == context_sequence``), end >= start and be at
    most ``max_answer_tokens`` long; the n_best starts and ends are searched. None if no span fits.
    """
    start_logits, end_logits = np.asarray(start_logits, np.float64), np.asarray(end_logits, np.float64)
    offsets, sequence_ids = np.asarray(offsets), np.asarray(sequence_ids)
    if not (start_logits.shape == end_logits.shape == sequence_ids.shape == offsets.shape[:1]):
        raise ValueError(f"start_logits {start_logits.shape}, end_logits {end_logits.shape}, offsets "
                         f"{offsets.shape} and sequence_ids {sequence_ids.shape} must describe the same tokens")
    in_context = sequence_ids == context_sequence
    starts = [i for i in np.argsort(-start_logits)[:n_best] if in_context[i]]
    ends = [j for j in np.argsort(-end_logits)[:n_best] if in_context[j]]
    best = None
    for i in starts:
        for j in ends:
            if j < i or j - i + 1 > max_answer_tokens:
                continue
            score = start_logits[i] + end_logits[j]
            if best is None or score > best[0]:
                best = (score, i, j)
    if best is None:
        return None
    score, i, j = best
    lo, hi = int(offsets[i][0]), int(offsets[j][1])
    return Answer(context[lo:hi], lo, hi, float(score))


def char_span_to_tokens(offsets: np.ndarray, sequence_ids: np.ndarray, start_char: int, end_char: int, *,
                        context_sequence: int = 1) -> tuple[int, int]:
    """First and last token (inclusive) of the answer ``context[start_char:end_char]`` in one encoded
    example (``offsets`` (L, 2), ``sequence_ids`` (L,) from ``Tokenizer.encode(question, context,
    return_offsets=True)``): the training targets of an extractive-QA head.

    A span that is empty, or not inside the encoded context (outside the text, or cut off by
    truncation), is a ``ValueError`` naming the span and the context's character range.
    """
    offsets, sequence_ids = np.asarray(offsets), np.asarray(sequence_ids)
    in_context = np.flatnonzero(sequence_ids == context_sequence)
    if in_context.size == 0:
        raise ValueError(f"the example has no tokens of sequence {context_sequence} (the context)")
    lo, hi = int(offsets[in_context[0], 0]), int(offsets[in_context[-1], 1])
    if not 0 <= start_char < end_char or start_char < lo or end_char > hi:
        raise ValueError(f"answer span [{start_char}, {end_char}) is outside the encoded context, which covers "
                         f"characters [{lo}, {hi}) (truncated?)")
    tokens = in_context[(offsets[in_context, 1] > start_char) & (offsets[in_context, 0] < end_char)]
    if tokens.size == 0:
        raise ValueError(f"answer span [{start_char}, {end_char}) covers no token of the context (whitespace only?)")
    return int(tokens[0]), int(tokens[-1])
