"""Bi-encoder and cross-encoder helpers over any jaxformers text encoder (``Bert``, ``MPNet``, ...).

An ``Encoder`` bundles a module, its parameters and a tokenizer. ``embed`` runs a bi-encoder
(``head="embedding"``) over texts, ``cross_scores`` a cross-encoder (``head="cross_encoder"``, one
logit per pair: ``[CLS] a [SEP] b [SEP]``), both in fixed-size padded batches through one cached jit
per module and batch shape. ``text_batch`` / ``pair_batch`` give the int32 arrays the training
losses of the text methods consume.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Encoder:
    """``module.apply({"params": params}, input_ids, attention_mask, token_type_ids)`` with a tokenizer;
    ``max_length``: tokens per text (bi-encoder) or per pair (cross-encoder)."""

    module: Any
    params: Any
    tokenizer: Any
    max_length: int = 64

    def replace(self, **changes: Any) -> "Encoder":
        return dataclasses.replace(self, **changes)


def text_batch(tokenizer, texts: Sequence[str], max_length: int, prefix: str = "") -> dict[str, np.ndarray]:
    """``{prefix}input_ids / attention_mask / token_type_ids`` int32 (N, max_length) of ``texts``."""
    enc = tokenizer.encode(list(texts), max_length=max_length, padding="max_length")
    return {prefix + k: np.asarray(v, np.int32) for k, v in enc.items()}


def pair_batch(tokenizer, first: Sequence[str], second: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """Cross-encoder inputs ``[CLS] a [SEP] b [SEP]`` int32 (N, max_length)."""
    enc = tokenizer.encode(list(first), list(second), max_length=max_length, padding="max_length")
    return {k: np.asarray(v, np.int32) for k, v in enc.items()}


def module_inputs(module, ids, mask, types) -> tuple[tuple, dict]:
    """Positional and keyword inputs for ``module``: token types only where its ``__call__`` takes them
    (MPNet has none; its third argument is ``position_ids``)."""
    takes_types = "token_type_ids" in inspect.signature(type(module).__call__).parameters
    return (ids,), {"attention_mask": mask, **({"token_type_ids": types} if takes_types else {})}


@functools.lru_cache(maxsize=32)
def _apply(module):
    def run(params, ids, mask, types):
        args, kwargs = module_inputs(module, ids, mask, types)
        return module.apply({"params": params}, *args, **kwargs)

    return jax.jit(run)


def _batched(encoder: Encoder, batch: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    n = len(batch["input_ids"])
    fn = _apply(encoder.module)
    pad = -n % batch_size
    padded = {k: np.concatenate([v, np.repeat(v[:1], pad, 0)]) for k, v in batch.items()}
    outs = [np.asarray(fn(encoder.params, *(padded[k][i:i + batch_size]
                                            for k in ("input_ids", "attention_mask", "token_type_ids"))))
            for i in range(0, n + pad, batch_size)]
    return np.concatenate(outs)[:n]


def embed(encoder: Encoder, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Bi-encoder embeddings (N, E) of ``texts`` (as the module returns them: pooled, maybe normalised)."""
    return _batched(encoder, text_batch(encoder.tokenizer, texts, encoder.max_length), batch_size)


def cross_scores(encoder: Encoder, first: Sequence[str], second: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Cross-encoder logits (N,) of the pairs (first[i], second[i])."""
    return _batched(encoder, pair_batch(encoder.tokenizer, first, second, encoder.max_length), batch_size)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, E) arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def cosine_jnp(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Row-wise cosine similarity in jnp (``torch.cosine_similarity``'s eps)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return (a * b).sum(-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)
