"""BPDec (formerly DrBERT): an MLM decoder used only in BERT pretraining, with gradual unmasking attention.

Paper: "BPDec: Unveiling the Potential of Masked Language Modeling Decoder in BERT pretraining",
Wen Liang and Youzhi Liang, arXiv 2401.15861 (v1 titled "DrBERT"). No official code was found.

The encoder is an unchanged BERT (``Bert``: the exported fine-tuning model is exactly it). During
pretraining, ``decoder_layers`` extra BERT layers sit between the encoder and the MLM output layer:

- **Gradual unmasking attention (GUA)** (``gua_masks``): in the decoder, keys at the masked positions
  start out hidden and are unmasked gradually: with n decoder layers, masked position j becomes
  visible from layer ``ceil(n * u_j)`` on, u_j ~ U(0, 1) drawn per position: layer 1 already sees a
  random portion of them, and the last layer sees all of them (for n = 2: layer 1 a random half, layer
  2 the rest, the schedule the paper describes). Every position always sees itself; unmasked
  positions are visible everywhere; padding never.
- **Output randomness**: the MLM head reads, per token, the decoder output, or with probability
  ``encoder_output_prob`` the encoder output (only while training; evaluation reads the decoder).
- The MLM head is BERT's (dense, activation, LayerNorm, the tied word-embedding decoder + bias), so
  with ``decoder_layers=0`` and no randomness the model is ``BertForMaskedLM`` exactly.

``export_encoder(module, variables)`` returns ``(Bert(head="mlm"), variables)`` without the decoder:
a plain BERT checkpoint (``jaxformers.save_pretrained`` writes a ``BertForMaskedLM`` directory).

Choices we had to make (the paper's full text was not retrievable here; the abstract and reviews
describe the mechanism but not these numbers; each is a field): ``decoder_layers=2`` (the two-layer
schedule the description walks through), the unmasking schedule ``ceil(n * u)`` (uniform portions
per layer), "masked positions" = the MLM target positions (``labels != -100``, the 80/10/10
corrupted ones), ``encoder_output_prob=0.5`` per token, and the decoder layers initialised fresh.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.models.bert import VARIANTS, Bert, BertLayer
from jaxformers.models.bert_heads import MaskedLMHead
from jaxformers.registry import ModelInfo, register_model


def gua_masks(targets: jax.Array, valid: jax.Array, num_layers: int, key: jax.Array) -> jax.Array:
    """(num_layers, B, L, L) boolean attention masks of the decoder layers: query i may attend key j
    when j is a real token and (j is not a target, or j == i, or j was unmasked by this layer)."""
    batch, length = targets.shape
    u = jax.random.uniform(key, (batch, length))
    first_layer = jnp.ceil(num_layers * u).clip(1, num_layers)  # layer (1-based) from which a target is visible
    layers = jnp.arange(1, num_layers + 1)[:, None, None]
    visible = valid[None] & (~targets[None] | (first_layer[None] <= layers))  # (n, B, L)
    eye = jnp.eye(length, dtype=bool)[None, None]
    return ((visible[:, :, None, :] | eye) & valid[None, :, None, :]) | eye  # (n, B, L, L)


_BERT_FIELDS = [f.name for f in dataclasses.fields(Bert) if f.name not in ("parent", "name")]


class BPDec(nn.Module):
    """BERT encoder (``encoder`` fields) + GUA decoder layers + the MLM head; returns MLM logits."""

    encoder: dict = None  # Bert fields (vocab_size, hidden_size, ...); head / pooler are set here
    decoder_layers: int = 2
    encoder_output_prob: float = 0.5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def bert(self) -> Bert:
        return Bert(**{**(self.encoder or {}), "head": None, "add_pooler": False}, dtype=self.dtype,
                    param_dtype=self.param_dtype)

    @nn.nowrap
    def example_inputs(self, batch_size: int = 1):
        return self.bert.example_inputs(batch_size)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, *, train: bool = False):
        """MLM logits (B, L, vocab). ``labels`` (B, L): the MLM targets (-100 elsewhere) whose keys GUA
        hides in the decoder (None: nothing is hidden)."""
        bert = self.bert
        encoder = Bert(**{f: getattr(bert, f) for f in _BERT_FIELDS}, name="bert")
        hidden = encoder(input_ids, attention_mask, token_type_ids, train=train)["last_hidden_state"]
        valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        targets = jnp.zeros(input_ids.shape, bool) if labels is None else (labels != -100) & valid
        x = hidden
        if self.decoder_layers:
            if self.has_rng("gua"):
                key = self.make_rng("gua")
            else:  # a fresh unmasking pattern per step while training (the dropout stream), fixed in eval
                key = self.make_rng("dropout") if train and self.has_rng("dropout") else jax.random.key(0)
            masks = gua_masks(targets, valid, self.decoder_layers, key)
            for i in range(self.decoder_layers):
                x = BertLayer(bert.num_attention_heads, bert.intermediate_size, bert.hidden_act, bert.layer_norm_eps,
                              bert.hidden_dropout_prob, bert.attention_probs_dropout_prob, bert.attention_impl,
                              name=f"decoder_{i}", dtype=self.dtype, param_dtype=self.param_dtype)(
                                  x, train, masks[i][:, None])
            if train and self.encoder_output_prob > 0:
                take_encoder = jax.random.bernoulli(self.make_rng("dropout"), self.encoder_output_prob, x.shape[:2])
                x = jnp.where(take_encoder[..., None], hidden, x)
        embedding = nn.unbox(self.variables["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"])
        decode = lambda h: h @ embedding.astype(h.dtype).T  # noqa: E731 - the tied decoder (Embed.attend)
        act = bert.hidden_act if bert.model_type == "bert" else "gelu"
        return MaskedLMHead(bert.vocab_size, act, bert.layer_norm_eps, name="mlm", dtype=self.dtype,
                            param_dtype=self.param_dtype)(x, decode)


def export_encoder(module: BPDec, variables: Any) -> tuple[Bert, dict]:
    """The fine-tuning model: ``Bert(head="mlm", add_pooler=False)`` and its variables (encoder + MLM
    head; the decoder layers are dropped)."""
    params = variables["params"]
    bert = module.bert.clone(head="mlm", add_pooler=False)
    return bert, {"params": {**params["bert"], "mlm": params["mlm"]}}


@register_model(ModelInfo(paper="BPDec: Unveiling the Potential of Masked Language Modeling Decoder in BERT "
                                "pretraining", arxiv="2401.15861", repo=None, input_size=(512,), params_m=123.690042,
                          converter=None))
def bpdec_bert_base(**overrides: Any) -> BPDec:
    """bert-base-uncased encoder (no pooler) + 2 GUA decoder layers + the MLM head: 123,690,042 parameters
    in pretraining; the exported BertForMaskedLM has 109,514,298."""
    encoder = {k: v for k, v in VARIANTS["bert_base_uncased"].items() if k != "head"}
    encoder.update(overrides.pop("encoder", {}))
    return BPDec(encoder=encoder, **overrides)

