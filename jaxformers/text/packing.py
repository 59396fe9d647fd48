"""Packing variable-length sequences into fixed rows (ByteTransformer's padding-free idea, the JAX way).

XLA wants static shapes; padding every sequence to the longest wastes the compute of every pad
token. ``pack_sequences`` fills rows of ``row_length`` with several sequences (first-fit
decreasing), numbering them 1..S per row in ``segment_ids`` (0 = padding). ``Bert`` restricts
attention to each segment and restarts positions per segment, so every sequence's outputs equal
those of the padded path; ``unpack`` cuts per-sequence outputs back out of the rows.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class PackedBatch:
    """Rows of packed sequences.

    ``input_ids``, ``segment_ids`` (1..S per row, 0 = padding), ``position_ids`` (0-based position
    within its sequence; ``Bert`` derives the same from ``segment_ids``), ``token_type_ids``: (R, L)
    int32. ``placements[i] = (row, start, length)`` locates input sequence i.
    """

    input_ids: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    token_type_ids: np.ndarray
    placements: list[tuple[int, int, int]]

    @property
    def num_segments(self) -> int:
        """The most sequences one row holds (the ``num_segments`` of sequence-level heads)."""
        return int(self.segment_ids.max()) if self.segment_ids.size else 0

    @property
    def fill(self) -> float:
        """Fraction of row slots holding real tokens."""
        return float((self.segment_ids > 0).mean())

    def model_inputs(self) -> dict[str, np.ndarray]:
        """Keyword arguments for ``Bert.apply`` (input_ids, token_type_ids, segment_ids)."""
        return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids, "segment_ids": self.segment_ids}


def pack_sequences(
    sequences: Sequence[Sequence[int]],
    row_length: int,
    *,
    token_type_ids: Sequence[Sequence[int]] | None = None,
    pad_id: int = 0,
    max_segments: int | None = None,
    num_rows: int | None = None,
) -> PackedBatch:
    """Packs ``sequences`` (lists of token ids) into rows of ``row_length`` tokens.

    First-fit decreasing: longest first, each into the first row with room (and fewer than
    ``max_segments`` sequences). ``num_rows`` fixes the row count (padding with empty rows; an
    error if they do not suffice), so a training step sees one static shape.
    """
    if row_length < 1:
        raise ValueError(f"row_length must be >= 1, got {row_length}")
    lengths = [len(s) for s in sequences]
    too_long = [i for i, n in enumerate(lengths) if n > row_length]
    if too_long:
        raise ValueError(f"sequence(s) {too_long[:5]} are longer than row_length={row_length} "
                         f"(lengths {[lengths[i] for i in too_long[:5]]}); truncate them first")
    if any(n == 0 for n in lengths):
        raise ValueError("empty sequences cannot be packed")
    if token_type_ids is not None and [len(t) for t in token_type_ids] != lengths:
        raise ValueError("token_type_ids must have one entry per token of every sequence")
    free: list[int] = []
    counts: list[int] = []
    placements: list[tuple[int, int, int] | None] = [None] * len(sequences)
    for i in sorted(range(len(sequences)), key=lambda j: -lengths[j]):
        n = lengths[i]
        for r, room in enumerate(free):
            if room >= n and (max_segments is None or counts[r] < max_segments):
                break
        else:
            free.append(row_length)
            counts.append(0)
            r = len(free) - 1
        placements[i] = (r, row_length - free[r], n)
        free[r] -= n
        counts[r] += 1
    rows = len(free)
    if num_rows is not None:
        if rows > num_rows:
            raise ValueError(f"{len(sequences)} sequences need {rows} rows of {row_length}, more than num_rows={num_rows}")
        rows = num_rows
    ids = np.full((rows, row_length), pad_id, np.int32)
    seg = np.zeros((rows, row_length), np.int32)
    pos = np.zeros((rows, row_length), np.int32)
    types = np.zeros((rows, row_length), np.int32)
    next_segment = [0] * rows
    for i in sorted(range(len(sequences)), key=lambda j: placements[j][:2]):  # left to right within rows
        r, start, n = placements[i]
        next_segment[r] += 1
        ids[r, start:start + n] = sequences[i]
        seg[r, start:start + n] = next_segment[r]
        pos[r, start:start + n] = np.arange(n)
        if token_type_ids is not None:
            types[r, start:start + n] = token_type_ids[i]
    return PackedBatch(ids, seg, pos, types, [p for p in placements])  # type: ignore[misc]


def unpack(rows: np.ndarray, placements: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
    """Per-sequence slices (length, ...) of a packed output ``rows`` (R, L, ...)."""
    rows = np.asarray(rows)
    return [rows[r, start:start + n] for r, start, n in placements]


def segment_index(placements: Sequence[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """(row, segment slot) of every sequence: where sequence-level outputs (B, S, ...) put it."""
    by_row: dict[int, list[tuple[int, int]]] = {}
    for i, (r, start, _) in enumerate(placements):
        by_row.setdefault(r, []).append((start, i))
    out: list[tuple[int, int]] = [(0, 0)] * len(placements)
    for r, items in by_row.items():
        for slot, (_, i) in enumerate(sorted(items)):
            out[i] = (r, slot)
    return out


def pad_sequences(sequences: Sequence[Sequence[int]], length: int | None = None, *, pad_id: int = 0,
                  token_type_ids: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """The padded layout of the same sequences: ``input_ids``, ``attention_mask``, ``token_type_ids``."""
    length = length or max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, s in enumerate(sequences):
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than length={length}")
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
        if token_type_ids is not None:
            types[i, :len(s)] = token_type_ids[i]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
