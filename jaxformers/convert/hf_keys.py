"""Table-driven Hugging Face <-> jaxformers key maps for text encoders (BERT, Longformer, MPNet, ...).

A model's converter lists its variables as rows ``(ours, hf, kind)``, where ``ours`` is the flat
``params/a/b`` path and ``hf`` the torch state-dict key, and ``kind`` says how the tensor moves:

- ``"copy"``: unchanged (embeddings, biases);
- ``"norm"``: a LayerNorm's weight / bias, unchanged, read as ``gamma`` / ``beta`` where an old
  TF-converted checkpoint names them so;
- ``"linear"``: a torch Linear weight (out, in) <-> a Dense kernel (in, out);
- ``"heads_out"``: a torch Linear (E, H*D) <-> a DenseGeneral kernel over (heads, head_dim): (H, D, E).

and fused projections as ``(ours prefix, (hf prefix, ...), heads)``: n torch Linears (H*D, E) +
biases become one DenseGeneral kernel (E, n, H, D) and bias (n, H, D) (n = 1: (E, H, D), (H, D)).
``import_tensors`` applies a table to a ``StateDict`` (keys it lacks are left out, so the caller
reports them as missing), ``export_tensors`` runs it backwards for ``save_pretrained``.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

from jaxformers.convert.common import StateDict, heads_out, linear

Row = tuple[str, str, str]
Fused = tuple[str, tuple[str, ...], int]


def dense_rows(ours: str, hf: str) -> list[Row]:
    """A Dense layer ``ours`` (kernel, bias) <-> torch Linear ``hf`` (weight, bias)."""
    return [(f"{ours}/kernel", f"{hf}.weight", "linear"), (f"{ours}/bias", f"{hf}.bias", "copy")]


def norm_rows(ours: str, hf: str) -> list[Row]:
    """A LayerNorm ``ours`` (scale, bias) <-> torch LayerNorm ``hf`` (weight, bias)."""
    return [(f"{ours}/scale", f"{hf}.weight", "norm"), (f"{ours}/bias", f"{hf}.bias", "norm")]


def find_base(sd: StateDict | Mapping, prefixes: Sequence[str], probe: str = "embeddings.word_embeddings.weight",
              default: str = "") -> str:
    """The prefix under which a checkpoint stores the encoder (``""`` for ``*Model``, ``"longformer."``
    for the task classes, ``"0.auto_model."`` in some sentence-transformers exports...)."""
    for prefix in prefixes:
        if prefix + probe in sd:
            return prefix
    return default


def import_tensors(sd: StateDict, rows: Sequence[Row], fused: Sequence[Fused]) -> dict[str, np.ndarray]:
    """Our flat ``params/...`` arrays from ``sd`` through the table (absent keys are skipped)."""
    out: dict[str, np.ndarray] = {}
    for ours, hf, kind in rows:
        if hf not in sd and kind == "norm":
            hf = hf[:-len(".weight")] + ".gamma" if hf.endswith(".weight") else hf[:-len(".bias")] + ".beta"
        if hf not in sd:
            continue
        w = sd[hf]
        out[ours] = (linear(w) if kind == "linear" else heads_out(w, int(kind.split(":")[1]))
                     if kind.startswith("heads_out") else w)
    for ours, names, heads in fused:
        if all(n + ".weight" in sd for n in names):
            w = np.stack([sd[n + ".weight"] for n in names])  # (n, H*D, E)
            w = w.reshape(len(names), heads, -1, w.shape[-1]).transpose(3, 0, 1, 2)  # (E, n, H, D)
            out[ours + "/kernel"] = np.ascontiguousarray(w[:, 0] if len(names) == 1 else w)
        if all(n + ".bias" in sd for n in names):
            b = np.stack([sd[n + ".bias"] for n in names]).reshape(len(names), heads, -1)
            out[ours + "/bias"] = b[0] if len(names) == 1 else b
    return out


def export_tensors(flat: Mapping[str, np.ndarray], rows: Sequence[Row], fused: Sequence[Fused]
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf key, tensor)`` for every row of the table, from our flat ``params/...`` arrays."""
    for ours, hf, kind in rows:
        w = np.asarray(flat[ours])
        if kind == "linear":
            w = w.T
        elif kind.startswith("heads_out"):
            w = w.reshape(-1, w.shape[-1]).T  # (H, D, E) -> (E, H*D)
        yield hf, w
    for ours, names, heads in fused:
        k, b = np.asarray(flat[ours + "/kernel"]), np.asarray(flat[ours + "/bias"])
        if len(names) == 1:
            k, b = k[:, None], b[None]
        w = k.transpose(1, 2, 3, 0).reshape(len(names), -1, k.shape[0])  # (n, H*D, E)
        for i, name in enumerate(names):
            yield f"{name}.weight", w[i]
            yield f"{name}.bias", b[i].reshape(-1)


def heads_out_kind(num_heads: int) -> str:
    """The row kind of an output projection over ``num_heads`` heads."""
    return f"heads_out:{num_heads}"
