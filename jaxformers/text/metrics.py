"""Task metrics for text models: entity-level F1 (seqeval's rules), SQuAD exact match / F1, Spearman.

**Entity F1.** ``get_entities`` follows ``seqeval``'s default (lenient, conlleval-style) chunking of
IOB1 / IOB2 / IOE / IOBES tags: a chunk ends before a tag when the previous tag is E or S, when B/I is
followed by B, S or O, or when the type changes; it starts at B or S, at E/I after E, S or O, and at
any type change (``end_of_chunk`` / ``start_of_chunk`` below). Entities are (type, first, last) and a
prediction counts only if type and both boundaries match; micro precision = correct / predicted,
recall = correct / true, F1 their harmonic mean (0 when undefined, seqeval's ``zero_division``
default after its warning). ``entity_counts_jnp`` computes the same counts inside ``jit`` from label
ids (the trainer's eval sums), ``entity_f1`` on string tags.

**SQuAD.** The official v1.1 evaluation: answers are normalised (lower case, punctuation and the
articles a/an/the removed, whitespace collapsed); exact match compares the normalised strings, F1
the bags of normalised tokens; each prediction takes its best score over the gold answers. We also
return token precision and recall (the schizophrenia-forum QA study reports them).

**Spearman.** Pearson correlation of average ranks (ties share their mean rank), as
``scipy.stats.spearmanr``: Trans-Encoder selects cycles by STS-dev Spearman.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PREFIXES = ("O", "B", "I", "E", "S")


def split_tag(tag: str) -> tuple[str, str]:
    """(prefix, type) of an IOB-style tag, seqeval's way: "B-PER" -> ("B", "PER"), "O" -> ("O", "_")."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether a chunk ended just before the current token (seqeval's rules)."""
    return (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether a chunk starts at the current token (seqeval's rules)."""
    return (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of every chunk of one tag sequence (a list of lists is joined with an "O"
    between sentences, as seqeval does)."""
    if any(isinstance(t, (list, tuple)) for t in tags):
        tags = [t for sentence in tags for t in list(sentence) + ["O"]]
    prev_tag, prev_type, begin, chunks = "O", "", 0, []
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, type_ = split_tag(tag)
        if end_of_chunk(prev_tag, prefix, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if start_of_chunk(prev_tag, prefix, prev_type, type_):
            begin = i
        prev_tag, prev_type = prefix, type_
    return chunks


def entity_f1(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro entity-level precision / recall / F1 over sentences of tags, and F1 per type
    (``"f1/PER"``...), seqeval's ``classification_report`` numbers."""
    if len(y_true) != len(y_pred) or any(len(a) != len(b) for a, b in zip(y_true, y_pred)):
        raise ValueError("y_true and y_pred must hold the same number of sentences with the same lengths")
    true, pred = set(get_entities([list(s) for s in y_true])), set(get_entities([list(s) for s in y_pred]))
    out = _prf(len(true & pred), len(true), len(pred))
    for type_ in sorted({t for t, _, _ in true | pred}):
        t = {e for e in true if e[0] == type_}
        p = {e for e in pred if e[0] == type_}
        out[f"f1/{type_}"] = _prf(len(t & p), len(t), len(p))["f1"]
    return out


def _prf(correct: float, true: float, pred: float) -> dict[str, float]:
    precision = correct / pred if pred else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def tag_codes(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per label id: its prefix code (index in ``PREFIXES``) and type code (0 = "_", i.e. O)."""
    parts = [split_tag(t) for t in labels]
    bad = [t for t, (p, _) in zip(labels, parts) if p not in PREFIXES]
    if bad:
        raise ValueError(f"labels {bad} are not IOB/IOBES tags (O, B-x, I-x, E-x, S-x)")
    types = ["_"] + sorted({ty for p, ty in parts if ty != "_"})
    return (np.array([PREFIXES.index(p) for p, _ in parts], np.int32),
            np.array([types.index(ty) for _, ty in parts], np.int32))


def _chunk_ends(prefix: jax.Array, type_: jax.Array):
    """For (B, L) prefix/type codes: ``is_end`` (B, L) (a chunk's last token), its ``begin`` and type."""
    O, B, I, E, S = range(5)  # noqa: E741
    batch = prefix.shape[0]
    pad_p, pad_t = jnp.full((batch, 1), O, prefix.dtype), jnp.zeros((batch, 1), type_.dtype)
    prev_p, prev_t = jnp.concatenate([pad_p, prefix], 1), jnp.concatenate([pad_t, type_], 1)  # tokens -1..L-1
    cur_p, cur_t = jnp.concatenate([prefix, pad_p], 1), jnp.concatenate([type_, pad_t], 1)  # tokens 0..L
    isin = lambda x, values: jnp.isin(x, jnp.asarray(values, x.dtype))  # noqa: E731
    end = (isin(prev_p, (E, S)) | (isin(prev_p, (B, I)) & isin(cur_p, (B, S, O)))
           | ((prev_p != O) & (prev_t != cur_t)))
    start = (isin(cur_p, (B, S)) | (isin(prev_p, (E, S, O)) & isin(cur_p, (E, I))) | ((cur_p != O) & (prev_t != cur_t)))
    idx = jnp.arange(prefix.shape[1] + 1)
    begin = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)  # the latest start at or before each token
    # end[i] closes the chunk (prev_t[i], begin[i - 1], i - 1): index the results by the last token
    return end[:, 1:], begin[:, :-1], prev_t[:, 1:]


def entity_counts_jnp(true_ids: jax.Array, pred_ids: jax.Array, prefix_of: np.ndarray, type_of: np.ndarray,
                      keep: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per sequence (B,): true entities, predicted entities and correctly predicted ones, from label ids
    (B, L), seqeval's chunking (``tag_codes`` gives ``prefix_of`` / ``type_of``). ``keep`` (B, L) bool
    selects the tokens that carry a tag (e.g. each word's first sub-token); the others are dropped
    (moved past the end) before chunking. jit-friendly."""
    if keep is not None:
        order = jnp.argsort(~keep, axis=1, stable=True)
        kept = jnp.take_along_axis(keep, order, axis=1)
        true_ids = jnp.where(kept, jnp.take_along_axis(true_ids, order, axis=1), 0)
        pred_ids = jnp.where(kept, jnp.take_along_axis(pred_ids, order, axis=1), 0)
    else:
        kept = jnp.ones(true_ids.shape, bool)
    prefix_of, type_of = jnp.asarray(prefix_of), jnp.asarray(type_of)

    def codes(ids):
        ids = jnp.clip(ids, 0, prefix_of.shape[0] - 1)
        return jnp.where(kept, prefix_of[ids], 0), jnp.where(kept, type_of[ids], 0)

    end_t, begin_t, type_t = _chunk_ends(*codes(true_ids))
    end_p, begin_p, type_p = _chunk_ends(*codes(pred_ids))
    correct = end_t & end_p & (begin_t == begin_p) & (type_t == type_p)
    return end_t.sum(1), end_p.sum(1), correct.sum(1)


# ------------------------------------------------------------------------------------- SQuAD


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_scores(prediction: str, ground_truths: Sequence[str]) -> dict[str, float]:
    """exact_match, f1, precision, recall of one prediction: the best over the gold answers."""
    if isinstance(ground_truths, str) or not ground_truths:
        raise ValueError("ground_truths must be a non-empty list of answer strings")
    best: dict[str, float] = {"exact_match": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    pred_tokens = normalize_answer(prediction).split()
    for truth in ground_truths:
        truth_tokens = normalize_answer(truth).split()
        common = collections.Counter(pred_tokens) & collections.Counter(truth_tokens)
        same = sum(common.values())
        scores = {"exact_match": float(normalize_answer(prediction) == normalize_answer(truth))}
        if same:
            p, r = same / len(pred_tokens), same / len(truth_tokens)
            scores.update(precision=p, recall=r, f1=2 * p * r / (p + r))
        else:
            scores.update(precision=0.0, recall=0.0, f1=0.0)
        for k, v in scores.items():
            best[k] = max(best[k], v)
    return best


def squad_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Averages of ``squad_scores`` over examples (fractions in [0, 1]; the official script prints x100)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    rows = [squad_scores(p, r) for p, r in zip(predictions, references)]
    return {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}


# ------------------------------------------------------------------------------------- Spearman


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their mean rank (``scipy.stats.rankdata(method="average")``)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (NaN if either is constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"spearman needs two 1-D sequences of the same length >= 2; got {x.shape} and {y.shape}")
    rx, ry = average_ranks(x) - (len(x) + 1) / 2, average_ranks(y) - (len(y) + 1) / 2
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denom) if denom else float("nan")
