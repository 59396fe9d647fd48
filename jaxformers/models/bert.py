"""BERT and RoBERTa encoders with their pretraining and fine-tuning heads.

Papers: "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding", Devlin
et al., NAACL 2019, arXiv 1810.04805 (google-research/bert); "RoBERTa: A Robustly Optimized BERT
Pretraining Approach", Liu et al. 2019, arXiv 1907.11692 (facebookresearch/fairseq). Variants:
Bioformer (Fang et al. 2023, arXiv 2302.01588, WGLab/Bioformer) and sentence-transformers'
all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM, arXiv 2002.10957). Checkpoints: Hugging Face
``transformers`` ``Bert*`` / ``Roberta*`` / ``Camembert*`` (Apache-2.0).

``Bert`` is one module for the whole family. Its fields carry Hugging Face's config names
(``hidden_size``, ``num_hidden_layers``...), so a ``config.json`` maps onto it one to one;
``model_type="roberta"`` switches RoBERTa/CamemBERT/XLM-R's differences on (positions offset by
``pad_token_id + 1`` and derived from the non-padding tokens, classification head on <s>). The
``head`` field picks what it returns (all heads are HF's, see ``bert_heads.py``):

=======================  ============================================  ==========================
head                     returns                                       Hugging Face class
=======================  ============================================  ==========================
None                     {"last_hidden_state", "pooler_output"}        BertModel / RobertaModel
"pretraining"            {"mlm_logits", "nsp_logits"}                  BertForPreTraining
"mlm"                    logits (B, L, vocab), tied decoder            BertForMaskedLM
"nsp"                    logits (B, 2)                                 BertForNextSentencePrediction
"classification"         logits (B, num_labels) (1 label: regression)  *ForSequenceClassification
"cross_encoder"          scores (B,) = the 1-label classifier          *ForSequenceClassification
"token_classification"   logits (B, L, num_labels)                     *ForTokenClassification
"qa"                     {"start_logits", "end_logits"} (B, L)         *ForQuestionAnswering
"embedding"              (B, E) pooled (mean/cls/max), L2-normalised   sentence-transformers
=======================  ============================================  ==========================

Registered names build the checkpoint's own model: BERT/Bioformer the pretraining model (MLM +
NSP heads: Bioformer-8L's published 42,820,610 parameters count exactly this), RoBERTa the MLM
model, MiniLM the sentence embedder (its checkpoint keeps BERT's pooler, so the pooler is built
and counted: 22,713,216). ``head=None`` gives the bare encoder (bert-base: 109,482,240).

Packed rows: pass ``segment_ids`` (B, L), sequences numbered 1..S per row, 0 = padding (see
``jaxformers.text.pack_sequences``): attention stays inside each sequence, positions restart per
sequence, and sequence-level heads return (B, num_segments, ...) per packed sequence.

Outlier-free attention (Bondarenko et al. 2023, see ``jaxformers.compress``): ``attn_softmax``
("clipped(γ:ζ)") and ``attn_gate`` / ``attn_gate_mlp`` / ``attn_gate_init`` are passed to every
layer's ``MultiHeadAttention``; ``jaxformers.compress.OUTLIER_PRESETS`` holds the official settings.
Such a model has no transformers counterpart: ``save_pretrained`` refuses it.

Longformer-style attention (for Recformer): ``attention_window=w`` lets each token attend to
±w neighbours and ``global_tokens=g`` makes the first g tokens of every row global, through
``jaxformers.kernels.local_global_attention``. Note Hugging Face Longformer's ``attention_window``
is the full window (one side = half of it): its ``attention_window=64`` (Recformer) is our 32.

Deviations: ``MultiHeadAttention``'s fused qkv kernel is truncated-normal initialised (HF: normal);
Longformer's separate global q/k/v projections are not built (global tokens share the local ones);
cross-attention / decoder use (``is_decoder``) is not supported (a clear error on such configs).
Padded query rows (attention_mask 0) hold undefined values, as in HF; only real tokens are compared.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.hf import register_hf_family
from jaxformers.layers import Dense, LayerNorm, MultiHeadAttention, Mlp, check_token_ids, maybe_remat
from jaxformers.layers.attention import AttentionImpl
from jaxformers.models import bert_convert
from jaxformers.models.bert_longformer import longformer_attention_fn
from jaxformers.models.bert_heads import (MaskedLMHead, Pooler, RobertaClassificationHead, activation, bert_init,
                                          normalize, pool_tokens)
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain
from jaxformers.text import hf_config

HEADS = (None, "pretraining", "mlm", "nsp", "classification", "cross_encoder", "token_classification", "qa",
         "embedding")
MODEL_TYPES = ("bert", "roberta")
_ACT = ("act_batch", "act_len", "act_embed")


def positions_in_segments(segment_ids: jax.Array) -> jax.Array:
    """0, 1, 2, ... restarting where ``segment_ids`` changes along a row (packed sequences)."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings -> LayerNorm -> dropout (``BertEmbeddings``)."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    dropout: float
    dtype: Any = None
    param_dtype: Any = jnp.float32
    binary: Any = None

    def setup(self):
        def embed(num, axes, name):
            return nn.Embed(num, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                            embedding_init=nn.with_logical_partitioning(bert_init, axes), name=name)

        if self.binary is None:
            self.word_embeddings = embed(self.vocab_size, ("vocab", "embed"), "word_embeddings")
        else:  # binarized word embeddings (position / token-type embeddings stay float)
            self.word_embeddings = self.binary.embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                                                     param_dtype=self.param_dtype, embedding_init=bert_init,
                                                     name="word_embeddings")
        self.position_embeddings = embed(self.max_position_embeddings, (None, "embed"), "position_embeddings")
        if self.type_vocab_size:
            self.token_type_embeddings = embed(self.type_vocab_size, (None, "embed"), "token_type_embeddings")
        self.norm = LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, input_ids, token_type_ids, position_ids, *, train: bool = False) -> jax.Array:
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if self.type_vocab_size:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.drop(self.norm(x), deterministic=not train)

    def attend(self, x: jax.Array) -> jax.Array:
        """x @ word_embeddingsᵀ: the tied MLM decoder."""
        return self.word_embeddings.attend(x)


class BertLayer(nn.Module):
    """Post-LN block: LN(x + Attn(x)) then LN(x + FFN(x)) (``BertLayer``; HF's dropout placement).
    ``bias`` (broadcast to (B, H, L, L)) is added to the attention logits (MPNet's relative positions)."""

    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    attention_impl: AttentionImpl = "xla"
    attention_window: int | None = None
    global_tokens: int = 0
    attn_softmax: str = "softmax"
    attn_gate: str | None = None
    attn_gate_mlp: bool = False
    attn_gate_init: float | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    binary: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention_fn = None
        if self.attention_window is not None:
            attention_fn = longformer_attention_fn(self.attention_window, self.global_tokens, self.attention_impl)
        y = MultiHeadAttention(self.num_attention_heads, attention_dropout=self.attention_probs_dropout_prob,
                               proj_dropout=self.hidden_dropout_prob, attention_impl=self.attention_impl,
                               attention_fn=attention_fn, softmax=self.attn_softmax, gate=self.attn_gate,
                               gate_mlp=self.attn_gate_mlp, gate_init=self.attn_gate_init,
                               binary=self.binary, name="attn", **kw)(
                                   x, mask=mask, segment_ids=segment_ids, bias=bias, train=train)
        return post_norm_sublayers(self, x, y, train)


def post_norm_sublayers(layer: nn.Module, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
    """The rest of a post-norm encoder layer after its attention output ``y`` (dropout applied):
    ``LN(x + y)``, then ``LN(h + Dropout(FFN(h)))``, as ``layer``'s submodules ``attn_norm``, ``mlp`` and
    ``mlp_norm`` (call it inside ``layer``'s compact ``__call__``). ``layer`` supplies the configuration
    fields of ``BertLayer`` (``binary`` optional); BERT's, Longformer's and MPNet's layers share it."""
    kw = dict(dtype=layer.dtype, param_dtype=layer.param_dtype)
    binary = getattr(layer, "binary", None)
    x = LayerNorm(layer.layer_norm_eps, name="attn_norm", **kw)(x + y)
    y = Mlp(layer.intermediate_size, activation=activation(layer.hidden_act), binary=binary, name="mlp", **kw)(x)
    y = nn.Dropout(layer.hidden_dropout_prob)(y, deterministic=not train)
    x = LayerNorm(layer.layer_norm_eps, name="mlp_norm", **kw)(x + y)
    return constrain(x, _ACT)


class Bert(nn.Module):
    """BERT / RoBERTa encoder plus the head named by ``head`` (see the module docstring)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: Literal["bert", "roberta"] = "bert"
    head: str | None = None
    num_labels: int = 2
    classifier_dropout: float | None = None
    add_pooler: bool | None = None
    pooling: Literal["mean", "cls", "max"] = "mean"
    normalize_embeddings: bool = True
    attention_impl: AttentionImpl = "xla"
    attention_window: int | None = None
    global_tokens: int = 0
    attn_softmax: str = "softmax"
    attn_gate: str | None = None
    attn_gate_mlp: bool = False
    attn_gate_init: float | None = None
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    binary: Any = None  # jaxformers.compress.binary.BinaryRecipe (BIBERT, BIPFT...): a binarized encoder

    # ------------------------------------------------------------------ derived configuration
    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from pad_token_id + 1 (fairseq's make_positions); BERT from 0."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @property
    def max_length(self) -> int:
        """Longest sequence the position table holds."""
        return self.max_position_embeddings - self.position_offset

    @property
    def num_classes(self) -> int:
        """Outputs of the classifier (timm's name): num_labels for classification heads, else 0."""
        if self.head in ("classification", "token_classification"):
            return self.num_labels
        return 1 if self.head == "cross_encoder" else 0

    @property
    def has_pooler(self) -> bool:
        if self.add_pooler is not None:
            return self.add_pooler
        if self.head in ("mlm", "token_classification", "qa"):
            return False
        if self.head in ("classification", "cross_encoder"):
            return self.model_type == "bert"
        return True

    def _validate(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                             f"{self.num_attention_heads}")
        if self.binary is not None and (self.attention_window is not None or self.attention_impl == "pallas"):
            raise ValueError("a binarized BERT (binary=...) runs its own attention core: it takes no "
                             "attention_window and attention_impl='pallas'")
        needs_pooler = self.head in ("nsp", "pretraining") or (
            self.head in ("classification", "cross_encoder") and self.model_type == "bert")
        if needs_pooler and not self.has_pooler:
            raise ValueError(f"head={self.head!r} (model_type={self.model_type!r}) classifies the pooler output; "
                             f"it needs add_pooler=True or None, got add_pooler={self.add_pooler}")

    @nn.nowrap
    def example_inputs(self, batch_size: int = 1):
        return (jnp.zeros((batch_size, min(8, self.max_length)), jnp.int32),)

    # ------------------------------------------------------------------ forward
    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        num_segments: int | None = None,
        *,
        train: bool = False,
        return_features: bool = False,
    ):
        """Encode ``input_ids`` (B, L) and apply the head. The positional order is Hugging Face's
        (input_ids, attention_mask, token_type_ids, position_ids), then ours.

        ``attention_mask`` (B, L): 1 = token, 0 = padding (HF's). ``token_type_ids`` default 0.
        ``position_ids`` default: 0..L-1 (BERT), RoBERTa's pad-aware numbering, or per-segment
        restarts with ``segment_ids``. ``num_segments``: the most sequences a packed row holds
        (needed by sequence-level heads on packed rows). ``return_features``: a dict with
        ``last_hidden_state``, ``pooler_output`` (if any) and the head's outputs.
        """
        self._validate()
        check_token_ids(input_ids, vocab_size=self.vocab_size, max_len=self.max_length)
        batch, length = input_ids.shape
        for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                          ("position_ids", position_ids), ("segment_ids", segment_ids)):
            if arr is not None and tuple(arr.shape) != (batch, length):
                raise ValueError(f"{name} must have the shape of input_ids {(batch, length)}; got {tuple(arr.shape)}")
        if segment_ids is not None and attention_mask is not None:
            raise ValueError("pass either segment_ids (packed rows, 0 = padding) or attention_mask, not both")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        elif self.type_vocab_size:
            check_token_ids(token_type_ids, vocab_size=self.type_vocab_size, name="token_type_ids")
        if position_ids is None:
            if segment_ids is not None:
                position_ids = positions_in_segments(segment_ids) + self.position_offset
            elif self.model_type == "roberta":
                not_pad = (input_ids != self.pad_token_id).astype(jnp.int32)
                position_ids = jnp.cumsum(not_pad, axis=1) * not_pad + self.pad_token_id
            else:
                position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        else:
            try:
                lo, hi = int(position_ids.min()), int(position_ids.max())
            except Exception:  # traced: values unknown
                lo, hi = 0, 0
            if lo < 0 or hi >= self.max_position_embeddings:
                raise ValueError(f"position_ids hold positions in [{lo}, {hi}] but the position table has "
                                 f"max_position_embeddings={self.max_position_embeddings} rows")

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embeddings = BertEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                                    self.type_vocab_size, self.layer_norm_eps, self.hidden_dropout_prob,
                                    binary=self.binary, name="embeddings", **kw)
        x = constrain(embeddings(input_ids, token_type_ids, position_ids, train=train), _ACT)

        mask = None
        if attention_mask is not None:
            if self.attention_impl == "pallas" or self.attention_window is not None:
                segment_ids = attention_mask.astype(jnp.int32)  # the kernels take padding as segment 0
            else:
                mask = attention_mask.astype(bool)[:, None, None, :]
        layer_cls = maybe_remat(BertLayer, self.remat)
        for i in range(self.num_hidden_layers):
            x = layer_cls(self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                          self.hidden_dropout_prob, self.attention_probs_dropout_prob, self.attention_impl,
                          self.attention_window, self.global_tokens, attn_softmax=self.attn_softmax,
                          attn_gate=self.attn_gate, attn_gate_mlp=self.attn_gate_mlp,
                          attn_gate_init=self.attn_gate_init, binary=self.binary, name=f"layer_{i}", **kw)(
                              x, train, mask, segment_ids)
        packed = segment_ids is not None and attention_mask is None
        features: dict[str, jax.Array] = {"last_hidden_state": x}
        pool_kw = dict(segment_ids=segment_ids if packed else None, num_segments=num_segments)
        first = None
        if self.has_pooler or self.head in ("classification", "cross_encoder") or (
                self.head == "embedding" and self.pooling == "cls"):
            first = pool_tokens(x, "cls", **pool_kw)
        if self.has_pooler:
            features["pooler_output"] = Pooler(binary=self.binary, layer_norm_eps=self.layer_norm_eps, name="pooler",
                                               **kw)(first)
        out = self._head(x, features, first, embeddings, attention_mask, pool_kw, train)
        if return_features:
            return {**features, **(out if isinstance(out, dict) else {"output": out})}
        return out

    def _head(self, x, features, first, embeddings, attention_mask, pool_kw, train):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=bert_init)
        drop = nn.Dropout(self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout)
        if self.head is None:
            return features
        if self.head in ("pretraining", "mlm"):
            mlm = MaskedLMHead(self.vocab_size, self.hidden_act if self.model_type == "bert" else "gelu",
                               self.layer_norm_eps, name="mlm", dtype=self.dtype,
                               param_dtype=self.param_dtype)(x, embeddings.attend)
            if self.head == "mlm":
                return mlm
            nsp = Dense(2, axes=("embed", "classes"), name="nsp", **kw)(features["pooler_output"])
            return {"mlm_logits": mlm, "nsp_logits": nsp}
        if self.head == "nsp":
            return Dense(2, axes=("embed", "classes"), name="nsp", **kw)(features["pooler_output"])
        if self.head in ("classification", "cross_encoder"):
            labels = 1 if self.head == "cross_encoder" else self.num_labels
            if self.model_type == "roberta":
                logits = RobertaClassificationHead(labels, drop.rate, name="classifier", dtype=self.dtype,
                                                   param_dtype=self.param_dtype)(first, train=train)
            else:
                pooled = drop(features["pooler_output"], deterministic=not train)
                logits = Dense(labels, axes=("embed", "classes"), name="classifier", **kw)(pooled)
            return logits[..., 0] if self.head == "cross_encoder" else logits
        if self.head == "token_classification":
            y = drop(x, deterministic=not train)
            return Dense(self.num_labels, axes=("embed", "classes"), name="classifier", **kw)(y)
        if self.head == "qa":
            logits = Dense(2, axes=("embed", "classes"), name="qa_outputs", **kw)(x)
            return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}
        # embedding
        pooled = pool_tokens(x, self.pooling, attention_mask=attention_mask, **pool_kw)
        return normalize(pooled) if self.normalize_embeddings else pooled


# ---------------------------------------------------------------------------------------------
# Variants. Configs: the checkpoints' Hugging Face config.json. Params: the registered default
# head (see the docstring); ``count_params(name, head=None)`` gives the bare encoder.

VARIANTS: dict[str, dict[str, Any]] = {
    "bert_base_uncased": dict(head="pretraining"),
    "bert_large_uncased": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                               intermediate_size=4096, head="pretraining"),
    "roberta_base": dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                         pad_token_id=1, model_type="roberta", head="mlm"),
    "bioformer_8l": dict(vocab_size=32768, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                         intermediate_size=2048, head="pretraining"),
    "bioformer_16l": dict(vocab_size=32768, hidden_size=384, num_hidden_layers=16, num_attention_heads=6,
                          intermediate_size=1536, max_position_embeddings=1024, head="pretraining"),
    "minilm_l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                      head="embedding", pooling="mean", add_pooler=True),
}


def _info(paper, arxiv, repo, params_m, **kw):
    return ModelInfo(paper=paper, arxiv=arxiv, repo=repo, input_size=(512,), params_m=params_m,
                     converter=bert_convert.convert_hf_bert, **kw)


_BERT = ("BERT: Pre-training of Deep Bidirectional Transformers", "1810.04805", "google-research/bert")
_BIOFORMER = ("Bioformer: an efficient transformer language model for biomedical text mining", "2302.01588",
              "WGLab/Bioformer")


def _build(name: str, overrides: dict[str, Any]) -> Bert:
    return Bert(**{**VARIANTS[name], **overrides})


@register_model(_info(*_BERT, 110.106428))
def bert_base_uncased(**overrides: Any) -> Bert:
    """bert-base-uncased with MLM + NSP heads (BertForPreTraining: 110,106,428; encoder 109,482,240)."""
    return _build("bert_base_uncased", overrides)


@register_model(_info(*_BERT, 336.226108))
def bert_large_uncased(**overrides: Any) -> Bert:
    """bert-large-uncased with MLM + NSP heads (BertForPreTraining; encoder 335,141,888)."""
    return _build("bert_large_uncased", overrides)


@register_model(_info("RoBERTa: A Robustly Optimized BERT Pretraining Approach", "1907.11692",
                      "facebookresearch/fairseq", 124.697433))
def roberta_base(**overrides: Any) -> Bert:
    """roberta-base with its MLM head (RobertaForMaskedLM; encoder with pooler 124,645,632)."""
    return _build("roberta_base", overrides)


@register_model(_info(*_BIOFORMER, 42.820610))
def bioformer_8l(**overrides: Any) -> Bert:
    """Bioformer-8L (bioformers/bioformer-8L) with MLM + NSP heads: 42,820,610 as published."""
    return _build("bioformer_8l", overrides)


@register_model(_info(*_BIOFORMER, 41.699074))
def bioformer_16l(**overrides: Any) -> Bert:
    """Bioformer-16L (bioformers/bioformer-16L, max_position 1024) with MLM + NSP heads."""
    return _build("bioformer_16l", overrides)


@register_model(_info("MiniLM: Deep Self-Attention Distillation (sentence-transformers all-MiniLM-L6-v2)",
                      "2002.10957", "UKPLab/sentence-transformers", 22.713216))
def minilm_l6(**overrides: Any) -> Bert:
    """all-MiniLM-L6-v2: mean-pooled, normalised sentence embeddings (22,713,216 with the pooler)."""
    return _build("minilm_l6", overrides)


def from_pretrained(path, *, strict: bool = True, seed: int = 0, mesh: Any = None, rules: Any = None,
                    **overrides: Any) -> tuple[Bert, dict]:
    """``(module, variables)`` from a HF model directory (config.json + model.safetensors or
    pytorch_model.bin; a sentence-transformers directory gives ``head="embedding"`` with its pooling).
    ``jaxformers.from_pretrained(dir)`` comes here for the model_types bert, roberta, camembert, xlm-roberta.

    ``overrides`` replace module fields, e.g. ``head="classification", num_labels=3`` to fine-tune:
    head weights the checkpoint lacks are initialised fresh (warning); everything else must match
    (``CheckpointMismatchError`` naming the keys, unless ``strict=False``). With ``mesh`` the
    variables are placed in their logical shardings (``rules``: default ``DEFAULT_RULES``).
    """
    path = pathlib.Path(path)
    fields = hf_config.bert_fields_from_config(hf_config.read_config(path), source=os.fspath(path / "config.json"))
    st = hf_config.sentence_transformers_pooling(path)
    if st is not None and fields["head"] is None:
        fields.update(head="embedding", add_pooler=None, **st)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Bert)}
    if unknown:
        raise TypeError(f"unknown Bert field(s) {sorted(unknown)}")
    module = Bert(**{**fields, **overrides})
    return module, bert_convert.load_directory(module, path, strict=strict, seed=seed, mesh=mesh, rules=rules)


def save_pretrained(module: Bert, variables: Any, path, *, model_type: str | None = None,
                    id2label: dict | None = None, tokenizer: Any = None) -> pathlib.Path:
    """Writes ``config.json`` + ``model.safetensors`` (float32, HF key names) that
    ``transformers.AutoModel*.from_pretrained`` loads; ``tokenizer`` (a ``jaxformers.text.Tokenizer``)
    is saved beside them. ``model_type`` keeps e.g. "camembert" / "xlm-roberta" for RoBERTa-style models."""
    if (module.attn_softmax, module.attn_gate) != ("softmax", None):
        raise ValueError(f"save_pretrained: transformers' BERT has no clipped softmax or gated attention "
                         f"(attn_softmax={module.attn_softmax!r}, attn_gate={module.attn_gate!r}); save the "
                         f"variables with jaxformers' checkpointing instead")
    return bert_convert.save_directory(module, variables, path, model_type=model_type, id2label=id2label,
                                       tokenizer=tokenizer)


register_hf_family(tuple(hf_config.SUPPORTED_MODEL_TYPES), module_type=Bert, load=from_pretrained,
                   save=save_pretrained)
