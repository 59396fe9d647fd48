"""MPNet: a BERT-shaped encoder with a shared relative-position bias (the sentence-transformers MPNets).

Paper: "MPNet: Masked and Permuted Pre-training for Language Understanding", Song et al., NeurIPS 2020,
arXiv 2004.09297 (microsoft/MPNet); the reference is Hugging Face ``transformers``' ``MPNetModel``
(Apache-2.0), whose ``config.json`` maps onto the fields here one to one. sentence-transformers'
``all-mpnet-base-v2`` and News Deja Vu's ``same-story`` are this model with mean pooling.

Differences from BERT (everything else reuses ``bert.py``'s embeddings, layers and heads):

- no token-type embeddings; positions are RoBERTa-numbered from the padding id (HF hard-codes
  ``padding_idx = 1`` in ``MPNetEmbeddings`` whatever ``pad_token_id`` says; so do we);
- every layer adds the same learnt bias ``relative_attention_bias[bucket(j - i), head]`` to its
  attention logits. Buckets are T5's bidirectional ones: 16 per direction, distances 0..7 exact,
  then logarithmic up to 128 (``relative_position_bucket``). HF computes the buckets from the row
  positions 0..L-1 (not ``position_ids``) with ``num_buckets=32`` whatever
  ``relative_attention_num_buckets`` is (that only sizes the table); we do the same, so tables of
  other sizes behave as in HF.

Heads (``head``): None -> {"last_hidden_state", "pooler_output"} (MPNetModel); "mlm"
(MPNetForMaskedLM, tied decoder); "classification" (on <s>, RoBERTa-style head); "token_classification";
"qa"; "embedding" (mean/cls/max pooling, L2-normalised: sentence-transformers).

Packed rows (``segment_ids``, 1..S per row, 0 = padding) keep attention within each sequence;
positions restart per sequence and relative positions are differences of row positions, so every
sequence gets the same output as when padded alone.
Deviations: none in the computation. Initialisation: N(0, 0.02) weights (HF's), the fused qkv included.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert import hf_encoder
from jaxformers.hf import register_hf_family
from jaxformers.layers import Dense, check_token_ids, maybe_remat
from jaxformers.layers.attention import AttentionImpl
from jaxformers.models import mpnet_convert
from jaxformers.models.bert import BertEmbeddings, BertLayer, positions_in_segments
from jaxformers.models.bert_heads import (MaskedLMHead, Pooler, RobertaClassificationHead, bert_init, normalize,
                                          pool_tokens)
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain
from jaxformers.text import hf_config

HEADS = (None, "mlm", "classification", "token_classification", "qa", "embedding")
PADDING_IDX = 1  # MPNetEmbeddings.padding_idx (hard-coded in transformers)
_ACT = ("act_batch", "act_len", "act_embed")


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = 128
                             ) -> np.ndarray:
    """T5's bidirectional bucket of ``relative_position`` = key - query (MPNet's), computed in float32
    as torch does: half the buckets per direction, exact below num_buckets // 4, log-spaced above."""
    n = -np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    ret = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(n.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
                  * np.float32(half - max_exact))
    large = max_exact + np.where(n < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return ret + np.where(n < max_exact, n, large)


class MPNet(nn.Module):
    """MPNet encoder plus the head named by ``head`` (see the module docstring)."""

    vocab_size: int = 30527
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 514
    layer_norm_eps: float = 1e-5
    relative_attention_num_buckets: int = 32
    pad_token_id: int = 1
    head: str | None = None
    num_labels: int = 2
    add_pooler: bool | None = None
    pooling: Literal["mean", "cls", "max"] = "mean"
    normalize_embeddings: bool = True
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings - PADDING_IDX - 1

    @property
    def has_pooler(self) -> bool:
        return self.head is None if self.add_pooler is None else self.add_pooler

    @nn.nowrap
    def example_inputs(self, batch_size: int = 1):
        return (jnp.zeros((batch_size, min(8, self.max_length)), jnp.int32),)

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 num_segments: int | None = None, *, train: bool = False, return_features: bool = False):
        """Encode ``input_ids`` (B, L) (HF's argument order: input_ids, attention_mask, position_ids)
        and apply the head. ``attention_mask``: 1 = token, 0 = padding; or packed ``segment_ids``."""
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                             f"{self.num_attention_heads}")
        if self.attention_impl == "pallas":
            raise ValueError("MPNet adds a relative-position bias to the logits, which the Pallas kernels do not "
                             "take; use attention_impl='xla', 'cudnn' or 'auto'")
        check_token_ids(input_ids, vocab_size=self.vocab_size, max_len=self.max_length)
        batch, length = input_ids.shape
        for name, arr in (("attention_mask", attention_mask), ("position_ids", position_ids),
                          ("segment_ids", segment_ids)):
            if arr is not None and tuple(arr.shape) != (batch, length):
                raise ValueError(f"{name} must have the shape of input_ids {(batch, length)}; got {tuple(arr.shape)}")
        if segment_ids is not None and attention_mask is not None:
            raise ValueError("pass either segment_ids (packed rows, 0 = padding) or attention_mask, not both")
        if position_ids is None:
            if segment_ids is not None:
                position_ids = positions_in_segments(segment_ids) + PADDING_IDX + 1
            else:
                not_pad = (input_ids != PADDING_IDX).astype(jnp.int32)
                position_ids = jnp.cumsum(not_pad, axis=1) * not_pad + PADDING_IDX

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embeddings = BertEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings, 0,
                                    self.layer_norm_eps, self.hidden_dropout_prob, name="embeddings", **kw)
        x = constrain(embeddings(input_ids, None, position_ids, train=train), _ACT)
        table = nn.Embed(self.relative_attention_num_buckets, self.num_attention_heads, param_dtype=self.param_dtype,
                         embedding_init=nn.with_logical_partitioning(bert_init, (None, "heads")),
                         name="relative_attention_bias")
        pos = np.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None])  # (L, L), static
        bias = jnp.transpose(table(jnp.asarray(buckets, jnp.int32)), (2, 0, 1))[None]  # (1, H, L, L)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        layer_cls = maybe_remat(BertLayer, self.remat)
        for i in range(self.num_hidden_layers):
            x = layer_cls(self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                          self.hidden_dropout_prob, self.attention_probs_dropout_prob, self.attention_impl,
                          name=f"layer_{i}", **kw)(x, train, mask, segment_ids, bias)
        features: dict[str, jax.Array] = {"last_hidden_state": x}
        packed = segment_ids is not None
        pool_kw = dict(segment_ids=segment_ids if packed else None, num_segments=num_segments)
        first = pool_tokens(x, "cls", **pool_kw)
        if self.has_pooler:
            features["pooler_output"] = Pooler(name="pooler", **kw)(first)
        out = self._head(x, features, first, embeddings, attention_mask, pool_kw, train)
        if return_features:
            return {**features, **(out if isinstance(out, dict) else {"output": out})}
        return out

    def _head(self, x, features, first, embeddings, attention_mask, pool_kw, train):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.head is None:
            return features
        if self.head == "mlm":
            return MaskedLMHead(self.vocab_size, "gelu", self.layer_norm_eps, name="mlm", **kw)(x, embeddings.attend)
        if self.head == "classification":
            return RobertaClassificationHead(self.num_labels, self.hidden_dropout_prob, name="classifier",
                                             **kw)(first, train=train)
        if self.head == "token_classification":
            y = nn.Dropout(self.hidden_dropout_prob)(x, deterministic=not train)
            return Dense(self.num_labels, axes=("embed", "classes"), kernel_init=bert_init, name="classifier", **kw)(y)
        if self.head == "qa":
            logits = Dense(2, axes=("embed", "classes"), kernel_init=bert_init, name="qa_outputs", **kw)(x)
            return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}
        pooled = pool_tokens(x, self.pooling, attention_mask=attention_mask, **pool_kw)
        return normalize(pooled) if self.normalize_embeddings else pooled


# microsoft/mpnet-base config.json (sentence-transformers/all-mpnet-base-v2 has the same shapes).
@register_model(ModelInfo(paper="MPNet: Masked and Permuted Pre-training for Language Understanding",
                          arxiv="2004.09297", repo="microsoft/MPNet", input_size=(512,), params_m=109.486464,
                          converter=mpnet_convert.convert_hf_mpnet))
def mpnet_base(**overrides: Any) -> MPNet:
    """microsoft/mpnet-base encoder (MPNetModel with the pooler: 109,486,464 parameters)."""
    return MPNet(**overrides)


def from_pretrained(path, *, strict: bool = True, seed: int = 0, mesh: Any = None, rules: Any = None,
                    **overrides: Any) -> tuple[MPNet, dict]:
    """``(module, variables)`` from a HF MPNet directory; a sentence-transformers directory gives
    ``head="embedding"`` with its pooling. ``jaxformers.from_pretrained(dir)`` comes here for
    model_type "mpnet"; ``overrides`` replace module fields."""
    path = pathlib.Path(path)
    fields = mpnet_convert.fields_from_config(hf_config.read_config(path), source=os.fspath(path / "config.json"))
    st = hf_config.sentence_transformers_pooling(path)
    if st is not None and fields["head"] is None:
        fields.update(head="embedding", **st)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(MPNet)}
    if unknown:
        raise TypeError(f"unknown MPNet field(s) {sorted(unknown)}")
    module = MPNet(**{**fields, **overrides})
    variables = hf_encoder.load_directory(module, path, mpnet_convert.convert_hf_mpnet, strict=strict, seed=seed, mesh=mesh,
                                          rules=rules)
    return module, variables


def save_pretrained(module: MPNet, variables: Any, path, *, id2label: dict | None = None,
                    tokenizer: Any = None) -> pathlib.Path:
    """Writes a directory ``transformers.MPNet*.from_pretrained`` loads (``head="embedding"`` is
    exported as the bare encoder; pooling is sentence-transformers' side)."""
    return mpnet_convert.save_directory(module, variables, path, id2label=id2label, tokenizer=tokenizer)


register_hf_family("mpnet", module_type=MPNet, load=from_pretrained, save=save_pretrained)
