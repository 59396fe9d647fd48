"""Longformer: sliding-window + global attention for long documents, exactly as ``transformers`` computes it.

Paper: "Longformer: The Long-Document Transformer", Beltagy, Peters and Cohan 2020, arXiv 2004.05150
(allenai/longformer); the reference is Hugging Face ``transformers``' ``LongformerModel`` (Apache-2.0),
whose ``config.json`` maps onto the fields here one to one (``from_pretrained`` / ``save_pretrained``).

The model is RoBERTa with Longformer self-attention in every layer:

- Embeddings: word + position (RoBERTa numbering: ``cumsum(ids != pad) * (ids != pad) + pad``, so the
  first token is position ``pad + 1``) + token type, LayerNorm, dropout. ``max_item_embeddings > 0``
  adds Recformer's item-position table (see ``recformer.py``).
- Local attention: token i attends to keys j with ``|i - j| <= attention_window // 2`` (HF's
  ``attention_window`` is the whole window; it must be even), padding keys masked. It runs through
  ``jaxformers.kernels.local_global_attention`` (``attention_impl="pallas"``: the block-sparse
  kernels; ``"xla"``: the reference, whose banded layout keeps memory linear in length and window).
- Global tokens (``global_attention_mask == 1``): every token also attends to every global token,
  through the *local* key/value projections, and each global key counts once (HF removes global keys
  from the sliding window and adds them as extra columns). We gather the G global keys into a prefix
  of the sequence, mark the prefix as the op's ``global_tokens`` and take the original global positions
  out of the band with segment id 0: the op's one softmax then covers exactly HF's columns.
- Global rows: each global token's output is recomputed with full attention through the separate
  ``query_global`` / ``key_global`` / ``value_global`` projections over all (non-padding) tokens
  (``dot_product_attention``), overwriting its local row, as HF does.
- Then ``attention.output.dense`` + dropout + LayerNorm and the RoBERTa feed-forward block (post-LN).

Heads (``head``): None -> {"last_hidden_state", "pooler_output"} (LongformerModel); "mlm" (tied
decoder, LongformerForMaskedLM); "classification" (on <s>; global attention on <s> when no
``global_attention_mask`` is given, as HF does); "token_classification"; "qa" (global attention on the
question tokens, those before the first ``sep_token_id``, when none is given, as HF does); "embedding"
(pooled <s> or mean, optionally L2-normalised; global attention on <s> by default, Recformer's layout).

The number of global tokens is a static shape: it is read from a concrete ``global_attention_mask``
(eager calls); under ``jit`` with a traced mask set ``max_global_tokens`` (rows may hold fewer; a row
holding more than ``max_global_tokens`` under ``jit`` keeps its first ``max_global_tokens``).

Deviations: HF pads the sequence to a multiple of the window (``_pad_to_window_size``); the padding is
masked and changes no output, so we do not pad. Attention-probability dropout applies to the global
rows only (the local op has no dropout; at inference nothing differs). Padded query rows hold the
local attention of nothing (zeros before the output projection), as in HF.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert import hf_encoder
from jaxformers.hf import register_hf_family
from jaxformers.layers import LayerNorm, check_token_ids, dot_product_attention, logical, maybe_remat
from jaxformers.models import longformer_convert
from jaxformers.models.bert import post_norm_sublayers
from jaxformers.models.bert_heads import (MaskedLMHead, Pooler, RobertaClassificationHead, bert_init,
                                          normalize, pool_tokens)
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain
from jaxformers.text import hf_config

HEADS = (None, "mlm", "classification", "token_classification", "qa", "embedding")
ATTENTION_IMPLS = ("xla", "pallas", "auto")
_ACT = ("act_batch", "act_len", "act_embed")


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def question_global_mask(input_ids: jax.Array, sep_token_id: int) -> jax.Array:
    """HF's ``_compute_global_attention_mask`` for QA: the tokens before each row's first ``sep``."""
    is_sep = input_ids == sep_token_id
    first = jnp.where(is_sep.any(axis=1), jnp.argmax(is_sep, axis=1), input_ids.shape[1])
    return (jnp.arange(input_ids.shape[1])[None, :] < first[:, None]).astype(jnp.int32)


class LongformerEmbeddings(nn.Module):
    """word + position + token type (+ item position) -> LayerNorm -> dropout."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    type_vocab_size: int
    max_item_embeddings: int
    layer_norm_eps: float
    dropout: float
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        def embed(num, axes, name):
            return nn.Embed(num, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                            embedding_init=nn.with_logical_partitioning(bert_init, axes), name=name)

        self.word_embeddings = embed(self.vocab_size, ("vocab", "embed"), "word_embeddings")
        self.position_embeddings = embed(self.max_position_embeddings, (None, "embed"), "position_embeddings")
        if self.type_vocab_size:
            self.token_type_embeddings = embed(self.type_vocab_size, (None, "embed"), "token_type_embeddings")
        if self.max_item_embeddings:
            self.item_position_embeddings = embed(self.max_item_embeddings, (None, "embed"),
                                                  "item_position_embeddings")
        self.norm = LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, input_ids, token_type_ids, position_ids, item_position_ids, *, train: bool = False):
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if self.type_vocab_size:
            x = x + self.token_type_embeddings(token_type_ids)
        if self.max_item_embeddings:
            x = x + self.item_position_embeddings(item_position_ids)
        return self.drop(self.norm(x), deterministic=not train)

    def attend(self, x: jax.Array) -> jax.Array:
        return self.word_embeddings.attend(x)


class LongformerSelfAttention(nn.Module):
    """Local (sliding window + global columns) attention with global rows recomputed; see the module
    docstring. Returns (B, L, E) after the output projection ``proj``."""

    num_heads: int
    one_sided_window: int
    num_global: int
    attention_impl: str = "xla"
    attention_dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _dense(self, features, axes, name):
        return nn.DenseGeneral(features, dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=logical(bert_init, axes),
                               bias_init=logical(nn.initializers.zeros_init(), axes[1:]), name=name)

    @nn.compact
    def __call__(self, x, valid, is_global, global_index, global_valid, train: bool = False):
        from jaxformers.kernels import local_global_attention

        batch, length, dim = x.shape
        heads = (self.num_heads, dim // self.num_heads)
        qkv = self._dense((3,) + heads, ("embed", None, "heads", "kv"), "qkv")(x)
        names = ("act_batch", "act_len", "act_heads", None)
        q, k, v = (constrain(qkv[..., i, :, :], names) for i in range(3))
        window = (self.one_sided_window, self.one_sided_window)
        g = self.num_global
        global_q = self._dense(heads, ("embed", "heads", "kv"), "global_q")
        global_kv = self._dense((2,) + heads, ("embed", None, "heads", "kv"), "global_kv")
        if g == 0:
            global_q(x[:, :0]), global_kv(x[:, :0])  # the parameters exist whatever the input (empty calls)
            out = local_global_attention(q, k, v, window=window, segment_ids=valid.astype(jnp.int32),
                                         implementation=self.attention_impl)
        else:
            def with_globals(t):  # the G global tokens' projections as a prefix of the sequence
                return jnp.concatenate([jnp.take_along_axis(t, global_index[:, :, None, None], axis=1), t], axis=1)

            # segment 1 = attendable; 0 = padding, unused prefix slots and the global tokens' own
            # positions (they are keys through the prefix, counted once, and their rows are replaced)
            seg = jnp.concatenate([global_valid, valid & ~is_global], axis=1).astype(jnp.int32)
            out = local_global_attention(with_globals(q), with_globals(k), with_globals(v), window=window,
                                         global_tokens=g, segment_ids=seg,
                                         implementation=self.attention_impl)[:, g:]
            x_global = jnp.take_along_axis(x, global_index[:, :, None], axis=1)  # (B, G, E)
            q_g, kv_g = global_q(x_global), global_kv(x)
            rate = self.attention_dropout if train else 0.0
            rows = dot_product_attention(q_g, kv_g[..., 0, :, :], kv_g[..., 1, :, :], mask=valid[:, None, None, :],
                                         implementation="xla", dropout_rate=rate,
                                         dropout_rng=self.make_rng("dropout") if rate > 0 else None)
            target = jnp.where(global_valid, global_index, length)  # unused slots write nowhere
            out = out.at[jnp.arange(batch)[:, None], target].set(rows.astype(out.dtype), mode="drop")
        out = constrain(out, names)
        return nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=logical(bert_init, ("heads", "kv", "embed")),
                               bias_init=logical(nn.initializers.zeros_init(), ("embed",)), name="proj")(out)


class LongformerLayer(nn.Module):
    """LN(x + Dropout(Attn(x))) then LN(x + FFN(x)) (``LongformerLayer``)."""

    num_attention_heads: int
    intermediate_size: int
    one_sided_window: int
    num_global: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    attention_impl: str = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train, valid, is_global, global_index, global_valid):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = LongformerSelfAttention(self.num_attention_heads, self.one_sided_window, self.num_global,
                                    self.attention_impl, self.attention_probs_dropout_prob, name="attn",
                                    **kw)(x, valid, is_global, global_index, global_valid, train)
        y = nn.Dropout(self.hidden_dropout_prob)(y, deterministic=not train)
        return post_norm_sublayers(self, x, y, train)


class Longformer(nn.Module):
    """Longformer encoder plus the head named by ``head`` (see the module docstring)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 4098
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    sep_token_id: int = 2
    attention_window: int | tuple[int, ...] = 512
    max_global_tokens: int | None = None
    max_item_embeddings: int = 0
    head: str | None = None
    num_labels: int = 2
    add_pooler: bool | None = None
    pooling: Literal["cls", "mean"] = "cls"
    normalize_embeddings: bool = False
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    # ------------------------------------------------------------------ derived configuration
    @property
    def max_length(self) -> int:
        """Longest sequence the position table holds (positions start at pad_token_id + 1)."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @property
    def windows(self) -> tuple[int, ...]:
        """HF's per-layer ``attention_window`` (whole windows)."""
        w = self.attention_window
        return tuple(int(x) for x in w) if isinstance(w, (list, tuple)) else (int(w),) * self.num_hidden_layers

    @property
    def has_pooler(self) -> bool:
        return self.head is None if self.add_pooler is None else self.add_pooler

    def _validate(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                             f"{self.num_attention_heads}")
        windows = self.windows
        if len(windows) != self.num_hidden_layers:
            raise ValueError(f"attention_window has {len(windows)} entries; expected one per layer "
                             f"(num_hidden_layers={self.num_hidden_layers}) or a single int")
        for i, w in enumerate(windows):
            if w <= 0 or w % 2:
                raise ValueError(f"attention_window of layer {i} must be a positive even number (the whole "
                                 f"window; each side sees attention_window // 2 tokens); got {w}")
            if w > self.max_length:
                raise ValueError(f"attention_window of layer {i} is {w}, longer than the {self.max_length} "
                                 f"positions the model has (max_position_embeddings={self.max_position_embeddings})")
        if self.max_global_tokens is not None and self.max_global_tokens < 0:
            raise ValueError(f"max_global_tokens must be >= 0 or None, got {self.max_global_tokens}")

    @nn.nowrap
    def example_inputs(self, batch_size: int = 1):
        return (jnp.zeros((batch_size, min(8, self.max_length)), jnp.int32),)

    @nn.nowrap
    def _global_count(self, mask: jax.Array, default: int | None) -> int:
        """The static number of global slots G (see the module docstring)."""
        if default is not None:
            return default if self.max_global_tokens is None else max(default, self.max_global_tokens)
        if _is_traced(mask):
            if self.max_global_tokens is None and self.is_initializing():
                return 1  # the parameters do not depend on the count
            if self.max_global_tokens is None:
                raise ValueError("global_attention_mask is traced (inside jit/grad), so the number of global tokens "
                                 "is unknown: set Longformer(max_global_tokens=...) to the most a row holds")
            return self.max_global_tokens
        most = int(np.asarray(mask).astype(bool).sum(axis=1).max()) if mask.size else 0
        if self.max_global_tokens is None:
            return most
        if most > self.max_global_tokens:
            raise ValueError(f"a row has {most} global tokens, more than max_global_tokens={self.max_global_tokens}")
        return self.max_global_tokens

    # ------------------------------------------------------------------ forward
    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        global_attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        item_position_ids: jax.Array | None = None,
        *,
        train: bool = False,
        return_features: bool = False,
    ):
        """Encode ``input_ids`` (B, L) and apply the head. Argument order is HF's ``LongformerModel``
        (input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids), then
        Recformer's ``item_position_ids``. ``attention_mask``: 1 = token, 0 = padding;
        ``global_attention_mask``: 1 = global token (same shape)."""
        self._validate()
        check_token_ids(input_ids, vocab_size=self.vocab_size, max_len=self.max_length)
        batch, length = input_ids.shape
        for name, arr in (("attention_mask", attention_mask), ("global_attention_mask", global_attention_mask),
                          ("token_type_ids", token_type_ids), ("position_ids", position_ids),
                          ("item_position_ids", item_position_ids)):
            if arr is not None and tuple(arr.shape) != (batch, length):
                raise ValueError(f"{name} must have the shape of input_ids {(batch, length)}; got {tuple(arr.shape)}")
        if token_type_ids is not None and self.type_vocab_size:
            check_token_ids(token_type_ids, vocab_size=self.type_vocab_size, name="token_type_ids")
        if item_position_ids is not None and self.max_item_embeddings:
            check_token_ids(item_position_ids, vocab_size=self.max_item_embeddings, name="item_position_ids")

        default_count = None
        if global_attention_mask is None:
            if self.head in ("classification", "embedding"):
                global_attention_mask, default_count = (jnp.arange(length) == 0)[None].repeat(batch, 0), 1
            elif self.head == "qa":
                global_attention_mask = question_global_mask(input_ids, self.sep_token_id)
            else:
                global_attention_mask, default_count = jnp.zeros((batch, length), jnp.int32), 0
        num_global = self._global_count(global_attention_mask, default_count)
        valid = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
        is_global = global_attention_mask.astype(bool) & valid
        global_index = jnp.argsort(~is_global, axis=1, stable=True)[:, :num_global].astype(jnp.int32)
        global_valid = jnp.arange(num_global)[None, :] < is_global.sum(axis=1, keepdims=True)

        if position_ids is None:
            not_pad = (input_ids != self.pad_token_id).astype(jnp.int32)
            position_ids = jnp.cumsum(not_pad, axis=1) * not_pad + self.pad_token_id
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if item_position_ids is None:
            item_position_ids = jnp.zeros_like(input_ids)

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embeddings = LongformerEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                                          self.type_vocab_size, self.max_item_embeddings, self.layer_norm_eps,
                                          self.hidden_dropout_prob, name="embeddings", **kw)
        x = constrain(embeddings(input_ids, token_type_ids, position_ids, item_position_ids, train=train), _ACT)
        layer_cls = maybe_remat(LongformerLayer, self.remat)
        for i, window in enumerate(self.windows):
            x = layer_cls(self.num_attention_heads, self.intermediate_size, window // 2, num_global, self.hidden_act,
                          self.layer_norm_eps, self.hidden_dropout_prob, self.attention_probs_dropout_prob,
                          self.attention_impl, name=f"layer_{i}", **kw)(x, train, valid, is_global, global_index,
                                                                         global_valid)
        features: dict[str, jax.Array] = {"last_hidden_state": x}
        if self.has_pooler:
            features["pooler_output"] = Pooler(name="pooler", **kw)(x[:, 0])
        out = self._head(x, features, embeddings, valid, train)
        if return_features:
            return {**features, "global_attention_mask": is_global.astype(jnp.int32),
                    **(out if isinstance(out, dict) else {"output": out})}
        return out

    def _head(self, x, features, embeddings, valid, train):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.head is None:
            return features
        if self.head == "mlm":
            return MaskedLMHead(self.vocab_size, "gelu", self.layer_norm_eps, name="mlm", **kw)(x, embeddings.attend)
        if self.head == "classification":
            return RobertaClassificationHead(self.num_labels, self.hidden_dropout_prob, name="classifier",
                                             **kw)(x[:, 0], train=train)
        dense = lambda n, name: nn.Dense(n, kernel_init=logical(bert_init, ("embed", "classes")),  # noqa: E731
                                         bias_init=logical(nn.initializers.zeros_init(), ("classes",)), name=name,
                                         **kw)
        if self.head == "token_classification":
            y = nn.Dropout(self.hidden_dropout_prob)(x, deterministic=not train)
            return dense(self.num_labels, "classifier")(y)
        if self.head == "qa":
            logits = dense(2, "qa_outputs")(x)
            return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}
        pooled = pool_tokens(x, self.pooling, attention_mask=valid)
        return normalize(pooled) if self.normalize_embeddings else pooled


# ---------------------------------------------------------------------------------------------
# Variants: allenai/longformer-{base,large}-4096 config.json (RoBERTa shapes, window 512 in all
# layers, 4098 positions). Params: LongformerModel with its pooler (transformers' count).

VARIANTS: dict[str, dict[str, Any]] = {
    "longformer_base_4096": dict(),
    "longformer_large_4096": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  intermediate_size=4096),
}

_PAPER = ("Longformer: The Long-Document Transformer", "2004.05150", "allenai/longformer")


def _info(params_m: float) -> ModelInfo:
    return ModelInfo(paper=_PAPER[0], arxiv=_PAPER[1], repo=_PAPER[2], input_size=(4096,), params_m=params_m,
                     converter=longformer_convert.convert_hf_longformer)


@register_model(_info(148.659456))
def longformer_base_4096(**overrides: Any) -> Longformer:
    """allenai/longformer-base-4096 (LongformerModel: 148,659,456 parameters with the pooler)."""
    return Longformer(**{**VARIANTS["longformer_base_4096"], **overrides})


@register_model(_info(434.600960))
def longformer_large_4096(**overrides: Any) -> Longformer:
    """allenai/longformer-large-4096 (LongformerModel: 434,600,960 parameters with the pooler)."""
    return Longformer(**{**VARIANTS["longformer_large_4096"], **overrides})


def from_pretrained(path, *, strict: bool = True, seed: int = 0, mesh: Any = None, rules: Any = None,
                    **overrides: Any) -> tuple[Longformer, dict]:
    """``(module, variables)`` from a HF Longformer directory (config.json + weights);
    ``jaxformers.from_pretrained(dir)`` comes here for model_type "longformer". ``overrides`` replace
    module fields (e.g. ``head="classification", num_labels=3``; new head weights are initialised with
    a warning, everything else must match unless ``strict=False``)."""
    path = pathlib.Path(path)
    fields = longformer_convert.fields_from_config(hf_config.read_config(path),
                                                   source=os.fspath(path / "config.json"))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Longformer)}
    if unknown:
        raise TypeError(f"unknown Longformer field(s) {sorted(unknown)}")
    module = Longformer(**{**fields, **overrides})
    variables = hf_encoder.load_directory(module, path, longformer_convert.convert_hf_longformer, strict=strict, seed=seed, mesh=mesh,
                                          rules=rules)
    return module, variables


def save_pretrained(module: Longformer, variables: Any, path, *, id2label: dict | None = None,
                    tokenizer: Any = None) -> pathlib.Path:
    """Writes a directory ``transformers.Longformer*.from_pretrained`` loads (config.json +
    model.safetensors, float32; ``tokenizer`` saved beside)."""
    return longformer_convert.save_directory(module, variables, path, id2label=id2label, tokenizer=tokenizer)


register_hf_family("longformer", module_type=Longformer, load=from_pretrained, save=save_pretrained)
