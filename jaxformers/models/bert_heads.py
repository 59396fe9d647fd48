"""Task heads on top of the BERT encoder, and pooling that also works on packed rows.

Every head mirrors one Hugging Face ``Bert*`` / ``Roberta*`` class so that checkpoints convert
one to one (see ``bert_convert.py`` for the key map):

- ``Pooler``: tanh(dense(h[CLS])) (``BertPooler``).
- ``MaskedLMHead``: dense -> activation -> LayerNorm -> tied word-embedding decoder + bias
  (``BertLMPredictionHead`` / ``RobertaLMHead``).
- ``RobertaClassificationHead``: dropout -> dense -> tanh -> dropout -> out_proj on <s>.
- Linear heads (NSP ``seq_relationship``, ``classifier``, ``qa_outputs``) are plain ``Dense``.

Packed rows hold several sequences; ``pool_tokens`` pools per segment (B, S, E) using
``segment_ids`` (1..S, 0 = padding) so that sequence-level heads work on packed batches too.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers import Dense, LayerNorm, gelu
from jaxformers.sharding import constrain

bert_init = nn.initializers.normal(0.02)  # BERT's init: N(0, 0.02) weights, zero biases

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,  # exact erf GELU (BERT, RoBERTa)
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called ``name`` in a Hugging Face config (``hidden_act``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def pool_tokens(
    x: jax.Array,
    mode: Literal["cls", "mean", "max"],
    *,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    num_segments: int | None = None,
) -> jax.Array:
    """Pools token states (B, L, E) into sequence vectors.

    Padded rows: ``attention_mask`` (B, L) (1 = token) -> (B, E). Packed rows: ``segment_ids``
    (B, L) with sequences numbered 1..``num_segments`` (0 = padding) -> (B, num_segments, E);
    absent segments pool to zeros. ``cls`` takes each sequence's first token, ``mean`` averages its
    tokens (sentence-transformers' mean pooling), ``max`` takes the element-wise max.
    """
    if mode not in ("cls", "mean", "max"):
        raise ValueError(f"pooling must be 'cls', 'mean' or 'max', got {mode!r}")
    if segment_ids is None:
        weights = (jnp.ones(x.shape[:2], x.dtype) if attention_mask is None else attention_mask.astype(x.dtype))
        weights = weights[:, None, :]  # (B, 1, L)
    else:
        if num_segments is None:
            raise ValueError("pooling packed rows (segment_ids given) needs num_segments, the most "
                             "sequences a row holds")
        ids = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
        weights = (segment_ids[:, None, :] == ids[None, :, None]).astype(x.dtype)  # (B, S, L)
    if mode == "cls":
        first = jnp.argmax(weights > 0, axis=-1)  # (B, S)
        out = jnp.take_along_axis(x, first[..., None], axis=1)
        out = jnp.where(weights.sum(-1, keepdims=True) > 0, out, 0)
    elif mode == "mean":
        total = jnp.einsum("bsl,ble->bse", weights, x, preferred_element_type=jnp.float32)
        count = jnp.maximum(weights.sum(-1, keepdims=True).astype(jnp.float32), 1e-9)
        out = (total / count).astype(x.dtype)
    else:
        masked = jnp.where(weights[..., None] > 0, x[:, None], jnp.finfo(x.dtype).min)
        out = jnp.where(weights.sum(-1)[..., None] > 0, masked.max(axis=2), 0)
    return out[:, 0] if segment_ids is None else out


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """L2-normalised along the last axis (torch.nn.functional.normalize's eps convention)."""
    norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


class Pooler(nn.Module):
    """tanh(W h + b) of the first token (``BertPooler``); applied to already-selected tokens.
    ``binary`` (a ``jaxformers.compress.binary.BinaryRecipe``): the dense binarized (unless its
    ``pooler`` is "float"); BiPFT's ``pooler="bipft"`` is tanh(LN(dense(h)) + h)."""

    dtype: Any = None
    param_dtype: Any = jnp.float32
    binary: Any = None
    layer_norm_eps: float = 1e-12

    @nn.compact
    def __call__(self, first_token: jax.Array) -> jax.Array:
        dim = first_token.shape[-1]
        binary = self.binary if self.binary is not None and self.binary.pooler != "float" else None
        dense = Dense if binary is None else functools.partial(binary.dense, role="pooler")
        y = dense(dim, axes=("embed", "mlp"), kernel_init=bert_init, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="dense")(first_token)
        if binary is not None and binary.pooler == "bipft":
            y = LayerNorm(self.layer_norm_eps, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(y) + first_token
        return jnp.tanh(y)


class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> ``decode`` (the tied word embeddings) + per-token bias."""

    vocab_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, decode: Callable[[jax.Array], jax.Array]) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(x.shape[-1], axes=("embed", "mlp"), kernel_init=bert_init, name="dense", **kw)(x)
        x = activation(self.hidden_act)(x)
        x = LayerNorm(self.layer_norm_eps, axis_name="embed", name="norm", **kw)(x)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                          (self.vocab_size,), self.param_dtype)
        logits = decode(x) + bias.astype(x.dtype if self.dtype is None else self.dtype)
        return constrain(logits, ("act_batch",) + (None,) * (logits.ndim - 2) + ("act_vocab",))


class RobertaClassificationHead(nn.Module):
    """RoBERTa's sequence classifier on <s>: dropout -> dense -> tanh -> dropout -> out_proj."""

    num_labels: int
    dropout: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, first_token: jax.Array, *, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=bert_init)
        x = nn.Dropout(self.dropout)(first_token, deterministic=not train)
        x = jnp.tanh(Dense(x.shape[-1], axes=("embed", "mlp"), name="dense", **kw)(x))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return Dense(self.num_labels, axes=("mlp", "classes"), name="out_proj", **kw)(x)
