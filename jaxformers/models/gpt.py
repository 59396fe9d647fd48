"""Decoder-only causal language models: GPT-2 and OPT, with KV-cached generation.

Papers: "Language Models are Unsupervised Multitask Learners", Radford et al. 2019 (openai/gpt-2;
no arXiv id); "OPT: Open Pre-trained Transformer Language Models", Zhang et al. 2022, arXiv
2205.01068 (facebookresearch/metaseq). Checkpoints and reference implementation: Hugging Face
``transformers`` ``GPT2LMHeadModel`` / ``OPTForCausalLM`` (Apache-2.0), whose ``config.json`` maps
onto ``CausalLM`` (``gpt_convert.fields_from_config``) and whose parameter counts ours equal.

``CausalLM`` is one module for both families (``model_type``): token + learned position
embeddings, ``num_hidden_layers`` decoder blocks on the shared ``MultiHeadAttention(causal=True)``
(fused ``qkv``; OPT's separate q/k/v are stacked by the converter), a final LayerNorm and an LM
head tied to the token embedding. The differences are fields:

==========================  =====================  ================================================
                            GPT-2                  OPT
==========================  =====================  ================================================
positions                   0..L-1                 from ``attention_mask`` (cumsum - 1), table
                                                   offset by 2 (``OPTLearnedPositionalEmbedding``)
activation                  gelu_new (tanh)        relu
embedding dropout           embd_pdrop             none
LayerNorm placement         pre-LN                 pre-LN; OPT-350m post-LN (``do_layer_norm_before
                                                   =False``: no final LayerNorm)
width of the embeddings     hidden_size            ``word_embed_proj_dim`` (OPT-350m: 512, with
                                                   ``project_in`` / ``project_out``, no bias)
==========================  =====================  ================================================

``module.apply(variables, input_ids, attention_mask=...)`` returns logits (B, L, vocab) like the
HF classes. Packed documents: ``segment_ids`` (B, L), documents numbered 1..S per row, 0 =
padding: attention stays inside each document, positions restart per document, and
``causal_lm_loss(logits, input_ids, segment_ids=...)`` never predicts across a boundary.

Decoding: ``init_cache(module, batch, max_len)`` gives one ``KVCache`` per layer; a call with
``cache=`` processes the new positions only and returns ``(logits, cache)``. ``generate`` (greedy,
temperature, top-k and top-p sampling, an optional EOS) runs the whole loop in one ``jit`` with a
``lax.fori_loop``, cached or not (the same tokens either way); under an active mesh it runs
tensor-parallel with the variables in their logical shardings.

Outlier-free attention (Bondarenko et al. 2023, see ``jaxformers.compress``): ``attn_softmax``
("clipped(γ:ζ)") and ``attn_gate`` / ``attn_gate_mlp`` / ``attn_gate_init`` go to every layer's
``MultiHeadAttention`` (``jaxformers.compress.OUTLIER_PRESETS`` holds the official OPT settings);
transformers has neither, so ``save_pretrained`` refuses such a model.

Deviations: kernels are initialised truncated-normal(0.02) (HF: normal(0.02), GPT-2's scaled
residual init not applied); OPT's ``padding_idx`` (no gradient into the pad token's embedding) is
not reproduced; ``layerdrop`` is ignored; GPT-2's ``reorder_and_upcast_attn`` is moot (attention
logits are float32 here). Padded query rows hold undefined values, as in HF; compare real tokens.
GPT-2 numbers positions 0..L-1 even with an ``attention_mask`` (as HF's forward does), so prompts
for GPT-2 are right-padded for a forward pass; ``generate`` takes left-padded prompts and derives
positions from the mask for both families (as HF's ``generate`` does).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.hf import register_hf_family
from jaxformers.layers import Dense, KVCache, LayerNorm, Mlp, MultiHeadAttention, check_token_ids, init_kv_cache
from jaxformers.layers import maybe_remat
from jaxformers.layers.attention import AttentionImpl
from jaxformers.models import gpt_convert
from jaxformers.models.bert import positions_in_segments
from jaxformers.models.bert_heads import activation
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain
from jaxformers.text import hf_config

_ACT = ("act_batch", "act_len", "act_embed")
_init = nn.initializers.normal(0.02)


class DecoderLayer(nn.Module):
    """Pre-LN x + Attn(LN(x)), x + FFN(LN(x)) (GPT-2 ``GPT2Block``, OPT ``OPTDecoderLayer``) or, with
    ``pre_norm=False`` (OPT-350m), post-LN LN(x + Attn(x)), LN(x + FFN(x))."""

    num_heads: int
    ffn_dim: int
    hidden_act: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pre_norm: bool = True
    use_bias: bool = True
    scale: float | None = None
    attention_impl: AttentionImpl = "xla"
    attn_softmax: str = "softmax"
    attn_gate: str | None = None
    attn_gate_mlp: bool = False
    attn_gate_init: float | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None, bias: jax.Array | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_norm = LayerNorm(self.layer_norm_eps, name="attn_norm", **kw)
        mlp_norm = LayerNorm(self.layer_norm_eps, name="mlp_norm", **kw)
        y = attn_norm(x) if self.pre_norm else x
        y = MultiHeadAttention(self.num_heads, qkv_bias=self.use_bias, out_bias=self.use_bias, scale=self.scale,
                               attention_dropout=self.attention_dropout, proj_dropout=self.dropout, causal=True,
                               attention_impl=self.attention_impl, softmax=self.attn_softmax, gate=self.attn_gate,
                               gate_mlp=self.attn_gate_mlp, gate_init=self.attn_gate_init, name="attn", **kw)(
            y, mask=mask, bias=bias, segment_ids=segment_ids, train=train, cache=cache)
        if cache is not None:
            y, cache = y
        x = x + y
        if not self.pre_norm:
            x = attn_norm(x)
        y = mlp_norm(x) if self.pre_norm else x
        y = Mlp(self.ffn_dim, activation=activation(self.hidden_act), use_bias=self.use_bias, name="mlp", **kw)(y)
        x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
        if not self.pre_norm:
            x = mlp_norm(x)
        x = constrain(x, _ACT)
        return x if cache is None else (x, cache)


class CausalLM(nn.Module):
    """GPT-2 / OPT decoder with its tied LM head (see the module docstring). Field names follow the
    OPT ``config.json``; ``gpt_convert.fields_from_config`` maps GPT-2's (``n_embd``...)."""

    model_type: Literal["gpt2", "opt"] = "gpt2"
    vocab_size: int = 50257
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int | None = None
    max_position_embeddings: int = 1024
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    hidden_act: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    embed_dropout: float = 0.1
    attention_dropout: float = 0.1
    enable_bias: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    attention_impl: AttentionImpl = "xla"
    attn_softmax: str = "softmax"
    attn_gate: str | None = None
    attn_gate_mlp: bool = False
    attn_gate_init: float | None = None
    remat: bool = False
    # A module giving ``jaxformers.layers.PositionTerms`` from the positions (e.g. SeqPE): replaces the
    # learned position table; its input term is added to the embeddings and its per-layer biases to the
    # attention logits. It reads the positions of the batch's first row for every row (left-padded rows
    # whose padding differs from the first row's see shifted positions).
    position_encoder: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    # ------------------------------------------------------------------ derived configuration
    @property
    def position_offset(self) -> int:
        """OPT's position table starts at row 2 (``OPTLearnedPositionalEmbedding.offset``); GPT-2's at 0."""
        return 2 if self.model_type == "opt" else 0

    @property
    def intermediate_size(self) -> int:
        return self.ffn_dim or 4 * self.hidden_size

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (OPT-350m: 512, projected to hidden_size)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_final_norm(self) -> bool:
        """OPT's post-LN variant (350m) has no final LayerNorm."""
        return self.do_layer_norm_before

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    def _validate(self) -> None:
        if self.model_type not in gpt_convert.MODEL_TYPES:
            raise ValueError(f"model_type must be one of {gpt_convert.MODEL_TYPES}, got {self.model_type!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                             f"{self.num_attention_heads}")
        if self.model_type == "gpt2" and not self.do_layer_norm_before:
            raise ValueError("GPT-2 is pre-LN: do_layer_norm_before must be True")

    @nn.nowrap
    def example_inputs(self, batch_size: int = 1):
        return (jnp.zeros((batch_size, min(8, self.max_position_embeddings)), jnp.int32),)

    # ------------------------------------------------------------------ forward
    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        cache: tuple[KVCache, ...] | None = None,
        train: bool = False,
        return_hidden: bool = False,
    ):
        """Logits (B, L, vocab) for ``input_ids`` (B, L); HF's positional order (input_ids,
        attention_mask, position_ids), then ``segment_ids`` for packed documents.

        ``attention_mask`` (B, L): 1 = token, 0 = padding. With ``cache`` (``init_cache``) the call
        is a decoding step over the L new positions, written at ``cache[0].index``; its
        ``attention_mask`` then covers every cache slot (B, max_len) (0 = a prompt's padding), the
        positions default to index + 0..L-1, and it returns ``(logits, cache)``.
        ``return_hidden``: the final hidden states (B, L, embed_dim) instead of logits.
        """
        self._validate()
        check_token_ids(input_ids, vocab_size=self.vocab_size,
                        max_len=None if cache is not None or self.position_encoder is not None
                        else self.max_position_embeddings)
        if self.position_encoder is not None and segment_ids is not None:
            raise ValueError("a position_encoder reads one row of positions for the batch: packed documents "
                             "(segment_ids, positions restarting per document) need the learned position table")
        batch, length = input_ids.shape
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed documents) are for training and scoring, not cached decoding")
            if not isinstance(cache, (tuple, list)) or len(cache) != self.num_hidden_layers:
                raise ValueError(f"cache must be init_cache(module, ...): a tuple of {self.num_hidden_layers} KVCache "
                                 f"(one per layer); got {type(cache).__name__}"
                                 + (f" of length {len(cache)}" if isinstance(cache, (tuple, list)) else ""))
            slots = cache[0].k.shape[1]
            if attention_mask is not None and tuple(attention_mask.shape) != (batch, slots):
                raise ValueError(f"with a cache, attention_mask covers every cache slot: (batch, max_len) = "
                                 f"({batch}, {slots}); got {tuple(attention_mask.shape)}")
        else:
            for name, arr in (("attention_mask", attention_mask), ("segment_ids", segment_ids)):
                if arr is not None and tuple(arr.shape) != (batch, length):
                    raise ValueError(f"{name} must have the shape of input_ids {(batch, length)}; "
                                     f"got {tuple(arr.shape)}")
            if segment_ids is not None and attention_mask is not None:
                raise ValueError("pass either segment_ids (packed documents, 0 = padding) or attention_mask, not both")
        if position_ids is None:
            position_ids = self._default_positions(input_ids, attention_mask, segment_ids, cache)
        elif tuple(position_ids.shape) != (batch, length):
            raise ValueError(f"position_ids must have the shape of input_ids {(batch, length)}; "
                             f"got {tuple(position_ids.shape)}")
        else:
            try:
                lo, hi = int(position_ids.min()), int(position_ids.max())
            except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
                lo, hi = 0, 0
            if lo < -self.position_offset or hi >= self.max_position_embeddings:
                raise ValueError(f"position_ids hold positions in [{lo}, {hi}] but the position table holds "
                                 f"max_position_embeddings={self.max_position_embeddings}")

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed_tokens = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=nn.with_logical_partitioning(
            _init, ("vocab", "embed")), name="embed_tokens", **kw)
        x = embed_tokens(input_ids)
        if self.word_embed_proj_dim is not None:
            x = Dense(self.hidden_size, axes=("embed", "mlp"), use_bias=False, name="project_in", **kw)(x)
        terms = None
        if self.position_encoder is None:
            embed_positions = nn.Embed(self.max_position_embeddings + self.position_offset, self.hidden_size,
                                       embedding_init=nn.with_logical_partitioning(_init, (None, "embed")),
                                       name="embed_positions", **kw)
            x = x + embed_positions(position_ids + self.position_offset)
        else:
            q_pos = jnp.maximum(position_ids[0], 0).astype(jnp.int32)[:, None]
            k_pos = q_pos
            if cache is not None:  # cache slot s holds position s - (index - position of the first new token)
                offset = cache[0].index - position_ids[0, 0]
                k_pos = jnp.maximum(jnp.arange(cache[0].k.shape[1], dtype=jnp.int32) - offset, 0)[:, None]
            terms = self.position_encoder(q_pos, k_pos, num_layers=self.num_hidden_layers,
                                          num_heads=self.num_attention_heads, head_dim=self.head_dim,
                                          width=self.hidden_size, train=train)
            if terms.inputs is not None:
                x = x + terms.inputs[None].astype(x.dtype)
        x = nn.Dropout(self.embed_dropout)(x, deterministic=not train)
        x = constrain(x, _ACT)

        mask = None
        if attention_mask is not None:
            mask = attention_mask.astype(bool)[:, None, None, :]
        layer_cls = maybe_remat(DecoderLayer, self.remat)
        new_cache = []
        for i in range(self.num_hidden_layers):
            scale = self.head_dim ** -0.5 if self.scale_attn_weights else 1.0
            if self.scale_attn_by_inverse_layer_idx:
                scale /= i + 1
            layer = layer_cls(self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                              self.dropout, self.attention_dropout, self.do_layer_norm_before, self.enable_bias, scale,
                              self.attention_impl, self.attn_softmax, self.attn_gate, self.attn_gate_mlp,
                              self.attn_gate_init, name=f"layer_{i}", **kw)
            bias = None if terms is None or terms.biases is None else terms.biases[i][None]
            if cache is None:
                x = layer(x, train, mask, segment_ids, bias=bias)
            else:
                x, c = layer(x, train, mask, None, cache[i], bias=bias)
                new_cache.append(c)
        if self.has_final_norm:
            x = LayerNorm(self.layer_norm_eps, name="final_norm", **kw)(x)
        if self.word_embed_proj_dim is not None:
            x = Dense(self.word_embed_proj_dim, axes=("mlp", "embed"), use_bias=False, name="project_out", **kw)(x)
        if return_hidden:
            out = x
        elif self.tie_word_embeddings:
            out = embed_tokens.attend(x)
        else:
            out = Dense(self.vocab_size, axes=("embed", "vocab"), use_bias=False, name="lm_head", **kw)(x)
        return out if cache is None else (out, tuple(new_cache))

    def _default_positions(self, input_ids, attention_mask, segment_ids, cache):
        batch, length = input_ids.shape
        if segment_ids is not None:
            return positions_in_segments(segment_ids)
        if cache is not None:
            start = jnp.asarray(cache[0].index, jnp.int32)
            if self.model_type == "opt" and attention_mask is not None:  # OPT counts real tokens only
                full = mask_positions(attention_mask)
                return jax.lax.dynamic_slice_in_dim(full, start, length, axis=1)
            return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
        if self.model_type == "opt" and attention_mask is not None:
            return mask_positions(attention_mask, pad_value=-1)
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def mask_positions(attention_mask: jax.Array, pad_value: int = 0) -> jax.Array:
    """Positions counting real tokens only: cumsum(mask) - 1 (OPT's; HF ``generate``'s for GPT-2),
    ``pad_value`` at padding (OPT's forward uses -1, i.e. table row 1)."""
    m = attention_mask.astype(jnp.int32)
    return jnp.where(m > 0, jnp.cumsum(m, axis=1) - 1, pad_value).astype(jnp.int32)


def init_cache(module: CausalLM, batch: int, max_len: int, dtype: Any = jnp.float32) -> tuple[KVCache, ...]:
    """An empty ``KVCache`` of ``max_len`` positions for every layer of ``module``."""
    return tuple(init_kv_cache(batch, max_len, module.num_attention_heads, module.head_dim, dtype)
                 for _ in range(module.num_hidden_layers))


# ---------------------------------------------------------------------------------------------
# loss and generation


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, *, segment_ids: jax.Array | None = None,
                   attention_mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy: position t predicts token t + 1 where both are real tokens of
    the same document (``segment_ids``: packed documents 1..S, 0 = padding; or ``attention_mask``)."""
    import optax

    pred, target = logits[:, :-1].astype(jnp.float32), input_ids[:, 1:]
    valid = jnp.ones(target.shape, bool)
    if segment_ids is not None:
        valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    if attention_mask is not None:
        valid = valid & (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(pred, target)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def sample_logits(logits: jax.Array, rng: jax.Array | None, *, do_sample: bool = False, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Next tokens (B,) from logits (B, V): argmax, or a draw after temperature, top-k (keep the k
    largest) and top-p (keep the smallest set of most likely tokens whose probability reaches p,
    at least one) filtering, as transformers' logits warpers do."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "do_sample", "top_k", "top_p", "use_cache",
                                             "eos_token_id", "pad_token_id", "cache_dtype", "return_scores"))
def _generate(module, variables, input_ids, attention_mask, rng, temperature, *, top_p, max_new_tokens, do_sample,
              top_k, use_cache, eos_token_id, pad_token_id, cache_dtype, return_scores):
    batch, prompt = input_ids.shape
    total = prompt + max_new_tokens
    full_mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.ones((batch, max_new_tokens), jnp.int32)], 1)
    positions = mask_positions(full_mask)
    tokens = jnp.concatenate([input_ids.astype(jnp.int32), jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)],
                             axis=1)
    sample = functools.partial(sample_logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    scores = jnp.zeros((batch, max_new_tokens, module.vocab_size), jnp.float32) if return_scores else None
    done = jnp.zeros((batch,), bool)

    def pick(i, logits, tokens, done, scores):
        tok = sample(logits, jax.random.fold_in(rng, i))
        if eos_token_id is not None:
            tok = jnp.where(done, pad_token_id, tok)
            done = done | (tok == eos_token_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], prompt + i, axis=1)
        if scores is not None:
            scores = jax.lax.dynamic_update_slice_in_dim(scores, logits[:, None].astype(jnp.float32), i, axis=1)
        return tok, tokens, done, scores

    if use_cache:
        cache = init_cache(module, batch, total, cache_dtype)
        logits, cache = module.apply(variables, input_ids, full_mask, positions[:, :prompt], cache=cache)

        def body(i, carry):
            tokens, cache, logits, done, scores = carry
            tok, tokens, done, scores = pick(i, logits, tokens, done, scores)
            pos = jax.lax.dynamic_slice_in_dim(positions, prompt + i, 1, axis=1)
            out, cache = module.apply(variables, tok[:, None], full_mask, pos, cache=cache)
            return tokens, cache, out[:, -1], done, scores

        tokens, _, _, _, scores = jax.lax.fori_loop(0, max_new_tokens, body,
                                                    (tokens, cache, logits[:, -1], done, scores))
    else:
        def body(i, carry):
            tokens, done, scores = carry
            logits = module.apply(variables, tokens, full_mask, positions)
            last = jax.lax.dynamic_index_in_dim(logits, prompt + i - 1, axis=1, keepdims=False)
            _, tokens, done, scores = pick(i, last, tokens, done, scores)
            return tokens, done, scores

        tokens, _, scores = jax.lax.fori_loop(0, max_new_tokens, body, (tokens, done, scores))
    return (tokens, scores) if return_scores else tokens


def generate(module: CausalLM, variables: Any, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             rng: jax.Array | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None,
             use_cache: bool = True, cache_dtype: Any = jnp.float32, return_scores: bool = False):
    """``input_ids`` (B, L) left-padded prompts (``attention_mask`` 0 = padding) followed by
    ``max_new_tokens`` generated tokens: (B, L + max_new_tokens) int32.

    Greedy by default; ``do_sample=True`` draws after ``temperature``, ``top_k`` (0 = off) and
    ``top_p`` (1.0 = off) filtering, step i with ``jax.random.fold_in(rng, i)``. After
    ``eos_token_id`` a row continues with ``pad_token_id`` (default: the module's, else 0).
    ``use_cache=False`` recomputes the whole prefix every step (same tokens; a reference).
    ``return_scores``: also the (B, max_new_tokens, vocab) logits each token was drawn from.
    One compiled program per shape and option set; under ``jaxformers.sharding.activate(mesh)``
    with sharded variables it runs tensor-parallel."""
    if not isinstance(module, CausalLM):
        raise TypeError(f"generate needs a CausalLM; got {type(module).__name__}")
    input_ids = jnp.asarray(input_ids)
    check_token_ids(input_ids, vocab_size=module.vocab_size)
    batch, prompt = input_ids.shape
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if prompt + max_new_tokens > module.max_position_embeddings:
        raise ValueError(f"prompt length {prompt} + max_new_tokens {max_new_tokens} exceeds the position table's "
                         f"max_position_embeddings={module.max_position_embeddings}")
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {input_ids.shape}; "
                         f"got {attention_mask.shape}")
    m = np.asarray(attention_mask) > 0
    if (np.diff(m.astype(np.int8), axis=1) < 0).any():
        raise ValueError("generate takes left-padded prompts (padding before the tokens, as for any decoder-only "
                         "model: tokenizer padding_side='left'); attention_mask has padding after a token")
    if not m[:, -1].all():
        raise ValueError("every prompt needs at least one token (an attention_mask row is all padding)")
    if do_sample:
        if rng is None:
            raise ValueError("do_sample=True needs rng (a jax.random.key)")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0 or top_k > module.vocab_size:
            raise ValueError(f"top_k must be in [0, vocab_size={module.vocab_size}], got {top_k}")
    pad = pad_token_id if pad_token_id is not None else (module.pad_token_id or 0)
    return _generate(module, variables, input_ids, attention_mask, jax.random.key(0) if rng is None else rng,
                     jnp.float32(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                     do_sample=do_sample, top_k=int(top_k), use_cache=use_cache, eos_token_id=eos_token_id,
                     pad_token_id=int(pad), cache_dtype=jnp.dtype(cache_dtype), return_scores=return_scores)


# ---------------------------------------------------------------------------------------------
# Variants: the checkpoints' config.json (openai-community/gpt2*, facebook/opt-*). Parameter
# counts: GPT2LMHeadModel / OPTForCausalLM (tied head counted once), checked on torch's meta device.

_GPT2 = dict(model_type="gpt2", vocab_size=50257, max_position_embeddings=1024, hidden_act="gelu_new",
             dropout=0.1, embed_dropout=0.1, attention_dropout=0.1, bos_token_id=50256, eos_token_id=50256)
_OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, hidden_act="relu", dropout=0.1,
            embed_dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)

VARIANTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "gpt2_medium": dict(_GPT2, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "gpt2_large": dict(_GPT2, hidden_size=1280, num_hidden_layers=36, num_attention_heads=20),
    "gpt2_xl": dict(_GPT2, hidden_size=1600, num_hidden_layers=48, num_attention_heads=25),
    "opt_125m": dict(_OPT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "opt_350m": dict(_OPT, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt_1_3b": dict(_OPT, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
}

_GPT2_PAPER = ("Language Models are Unsupervised Multitask Learners (GPT-2)", None, "openai/gpt-2")
_OPT_PAPER = ("OPT: Open Pre-trained Transformer Language Models", "2205.01068", "facebookresearch/metaseq")


def _info(paper, arxiv, repo, params_m, length):
    return ModelInfo(paper=paper, arxiv=arxiv, repo=repo, input_size=(length,), params_m=params_m,
                     converter=gpt_convert.convert_hf_causal_lm)


def _build(name: str, overrides: dict[str, Any]) -> CausalLM:
    return CausalLM(**{**VARIANTS[name], **overrides})


@register_model(_info(*_GPT2_PAPER, 124.439808, 1024))
def gpt2(**overrides: Any) -> CausalLM:
    """GPT-2 small (openai-community/gpt2): 12 layers, width 768; GPT2LMHeadModel 124,439,808."""
    return _build("gpt2", overrides)


@register_model(_info(*_GPT2_PAPER, 354.823168, 1024))
def gpt2_medium(**overrides: Any) -> CausalLM:
    """GPT-2 medium: 24 layers, width 1024; 354,823,168 parameters."""
    return _build("gpt2_medium", overrides)


@register_model(_info(*_GPT2_PAPER, 774.030080, 1024))
def gpt2_large(**overrides: Any) -> CausalLM:
    """GPT-2 large: 36 layers, width 1280; 774,030,080 parameters."""
    return _build("gpt2_large", overrides)


@register_model(_info(*_GPT2_PAPER, 1557.611200, 1024))
def gpt2_xl(**overrides: Any) -> CausalLM:
    """GPT-2 XL: 48 layers, width 1600, 25 heads; 1,557,611,200 parameters."""
    return _build("gpt2_xl", overrides)


@register_model(_info(*_OPT_PAPER, 125.239296, 2048))
def opt_125m(**overrides: Any) -> CausalLM:
    """OPT-125m (facebook/opt-125m): 12 pre-LN layers, width 768; OPTForCausalLM 125,239,296."""
    return _build("opt_125m", overrides)


@register_model(_info(*_OPT_PAPER, 331.196416, 2048))
def opt_350m(**overrides: Any) -> CausalLM:
    """OPT-350m: 24 post-LN layers, width 1024, 512-wide embeddings with project_in/out; 331,196,416."""
    return _build("opt_350m", overrides)


@register_model(_info(*_OPT_PAPER, 1315.758080, 2048))
def opt_1_3b(**overrides: Any) -> CausalLM:
    """OPT-1.3b: 24 pre-LN layers, width 2048, 32 heads; 1,315,758,080 parameters."""
    return _build("opt_1_3b", overrides)


def from_pretrained(path, *, strict: bool = True, seed: int = 0, mesh: Any = None, rules: Any = None,
                    **overrides: Any) -> tuple[CausalLM, dict]:
    """``(module, variables)`` from a GPT-2 or OPT Hugging Face directory (config.json +
    model.safetensors or pytorch_model.bin); ``jaxformers.from_pretrained(dir)`` comes here for the
    model_types gpt2 and opt. ``overrides`` replace module fields (e.g. ``dtype=jnp.bfloat16``);
    with ``mesh`` the variables are placed in their logical shardings (``rules``: DEFAULT_RULES)."""
    path = pathlib.Path(path)
    fields = gpt_convert.fields_from_config(hf_config.read_config(path), source=os.fspath(path / "config.json"))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(CausalLM)}
    if unknown:
        raise TypeError(f"unknown CausalLM field(s) {sorted(unknown)}")
    module = CausalLM(**{**fields, **overrides})
    return module, gpt_convert.load_directory(module, path, strict=strict, seed=seed, mesh=mesh, rules=rules)


def save_pretrained(module: CausalLM, variables: Any, path) -> pathlib.Path:
    """Writes ``config.json`` + ``model.safetensors`` that ``transformers.AutoModelForCausalLM`` loads."""
    if (module.attn_softmax, module.attn_gate) != ("softmax", None):
        raise ValueError(f"save_pretrained: transformers' {module.model_type} has no clipped softmax or gated "
                         f"attention (attn_softmax={module.attn_softmax!r}, attn_gate={module.attn_gate!r}); save "
                         f"the variables with jaxformers' checkpointing instead")
    return gpt_convert.save_directory(module, variables, path)


register_hf_family(gpt_convert.MODEL_TYPES, module_type=CausalLM, load=from_pretrained, save=save_pretrained)
