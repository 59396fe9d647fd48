"""Recformer: sequential recommendation from item text with a Longformer (language as the item id).

Paper: "Text Is All You Need: Learning Language Representations for Sequential Recommendation",
Li et al., KDD 2023, arXiv 2305.13731 (official code: JiachengLi1995/Recformer; read here through the
AaronHeee/RecFormer copy: ``recformer/models.py``, ``recformer/tokenization.py``, ``finetune.py``).

The model is ``Longformer`` (``longformer.py``, transformers' attention) with Recformer's embeddings:
word + RoBERTa position + **token type** (4: 0 = ``<s>``, 1 = attribute key, 2 = attribute value,
3 = padding) + **item position** (51: 0 = ``<s>``, 1..50 = the items, most recent first; 50 also for
padding) -> LayerNorm. Global attention on ``<s>`` only, a window of 64 (32 per side) in all 12
layers, and the representation of a sequence (or of one item) is ``<s>``'s hidden state (no pooler
layer: ``pooler_type="cls"``). Similarities are cosines divided by the temperature 0.05.

``RecformerTokenizer`` lays a user's history out as the official tokenizer does: items reversed (most
recent first) and cut to 50; each item's attributes (at most ``max_attr_num`` = 3) flattened as
key tokens (type 1) then value tokens (type 2), each key+value cut to ``max_attr_length`` = 32
tokens; ``<s>`` (type 0, item position 0) first; the whole cut to ``max_token_num`` (1024 in
fine-tuning); padding with the pad id, type 3 and item position 50.

Objectives (``pretraining_loss``, ``finetune_loss``): pretraining pairs two views of a user (the
history and its next item) through an in-batch contrastive cross-entropy on cos / 0.05 (labels =
the diagonal) plus 0.1 x the masked-LM loss of each view (the MLM passes use the masked ids with
the same masks and positions); fine-tuning scores the user's ``<s>`` against a table of every item's
``<s>`` embedding (each item encoded alone) with a full softmax over all items. The two-stage
schedule (stage 1 re-encodes the item table before every epoch; stage 2 continues from stage 1's
best checkpoint with that table frozen; selection by validation NDCG@10) is ``train/recformer.py``.
Ranking metrics (``ranking_metrics``): NDCG@k and Recall@k with one target item, and MRR over the full
ranking (rank = 1 + items scored strictly higher than the target).

Deviations: the official pretraining uses the RoBERTa BPE of ``allenai/longformer-base-4096``; any
``jaxformers.text.Tokenizer`` works here (its ``cls`` id plays ``<s>``, so the generated catalogue
uses a WordPiece learnt on it). ``recformer_base`` is the architecture; Recformer's pretrained
weights are a torch state dict, which ``longformer_convert.convert_hf_longformer`` reads
(``longformer.`` prefix, ``item_position_embeddings`` included).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.models import longformer_convert
from jaxformers.models.longformer import Longformer
from jaxformers.registry import ModelInfo, register_model

TOKEN_TYPES = {"cls": 0, "key": 1, "value": 2, "pad": 3}

# RecformerConfig as finetune.py sets it, on allenai/longformer-base-4096's shapes.
RECFORMER = dict(type_vocab_size=4, max_item_embeddings=51, attention_window=64, head="embedding", pooling="cls",
                 normalize_embeddings=False, add_pooler=False, max_global_tokens=1)


@dataclasses.dataclass(frozen=True)
class RecformerTokenizer:
    """The official ``RecformerTokenizer`` layout over a ``jaxformers.text.Tokenizer`` (see the module
    docstring). Items are mappings attribute name -> value text, in their own order."""

    tokenizer: Any
    max_attr_num: int = 3
    max_attr_length: int = 32
    max_item_embeddings: int = 51
    max_token_num: int = 1024

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer.backend.encode(str(text), add_special_tokens=False).ids)

    def encode_item(self, item: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        """(token ids, token types) of one item's first ``max_attr_num`` attributes."""
        ids, types = [], []
        for name, value in list(item.items())[:self.max_attr_num]:
            key, val = self._ids(name), self._ids(value)
            ids += (key + val)[:self.max_attr_length]
            types += ([TOKEN_TYPES["key"]] * len(key) + [TOKEN_TYPES["value"]] * len(val))[:self.max_attr_length]
        return ids, types

    def encode(self, items: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
        """One history (oldest first) -> ``input_ids``, ``item_position_ids``, ``token_type_ids``,
        ``attention_mask``, ``global_attention_mask`` (lists), most recent item first."""
        items = list(items)[::-1][:self.max_item_embeddings - 1]
        ids, positions, types = [self.tokenizer.token_id("cls")], [0], [TOKEN_TYPES["cls"]]
        for index, item in enumerate(items):
            item_ids, item_types = self.encode_item(item)
            ids += item_ids
            types += item_types
            positions += [index + 1] * len(item_ids)
        ids, positions, types = (x[:self.max_token_num] for x in (ids, positions, types))
        return {"input_ids": ids, "item_position_ids": positions, "token_type_ids": types,
                "attention_mask": [1] * len(ids), "global_attention_mask": [1] + [0] * (len(ids) - 1)}

    def batch_encode(self, histories: Sequence[Sequence[Mapping[str, Any]]], *, length: int | None = None
                     ) -> dict[str, np.ndarray]:
        """Padded int32 arrays (B, length) of ``encode`` for each history (``length`` default: the longest;
        ``max_token_num`` at most)."""
        rows = [self.encode(h) for h in histories]
        length = length or max(len(r["input_ids"]) for r in rows)
        if length > self.max_token_num:
            raise ValueError(f"length={length} is longer than max_token_num={self.max_token_num}")
        pads = {"input_ids": self.tokenizer.pad_token_id, "item_position_ids": self.max_item_embeddings - 1,
                "token_type_ids": TOKEN_TYPES["pad"], "attention_mask": 0, "global_attention_mask": 0}
        return {k: np.asarray([r[k][:length] + [pad] * (length - len(r[k])) for r in rows], np.int32)
                for k, pad in pads.items()}


def recformer_inputs(batch: Mapping[str, Any], ids_key: str = "input_ids") -> tuple:
    """Positional ``Longformer`` inputs of a ``batch_encode`` dict (``ids_key``: e.g. the MLM ids)."""
    return (batch[ids_key], batch["attention_mask"], batch["global_attention_mask"], batch["token_type_ids"], None,
            batch["item_position_ids"])


def cosine_scores(x: jax.Array, y: jax.Array, temperature: float = 0.05) -> jax.Array:
    """cos(x_i, y_j) / temperature, (N, E) x (M, E) -> (N, M) (``torch.nn.CosineSimilarity``, eps 1e-8)."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    xn = jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
    yn = jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-8)
    return (x / xn) @ (y / yn).T / temperature


def contrastive_loss(z_a: jax.Array, z_b: jax.Array, temperature: float = 0.05) -> jax.Array:
    """In-batch cross-entropy of cos(z_a_i, z_b_j) / temperature with labels i (one direction)."""
    scores = cosine_scores(z_a, z_b, temperature)
    return optax.softmax_cross_entropy_with_integer_labels(scores, jnp.arange(scores.shape[0])).mean()


def pretraining_loss(model: Longformer, params: Any, view_a: Mapping, view_b: Mapping, *, temperature: float = 0.05,
                     mlm_weight: float = 0.1, train: bool = False, rngs: Any = None) -> tuple[jax.Array, dict]:
    """Recformer's pretraining objective: CE(cos(z_a, z_b) / temperature, diagonal) + mlm_weight x (MLM_a +
    MLM_b), each MLM the mean cross-entropy over its view's targets (PyTorch's CrossEntropyLoss).
    ``model`` has ``head="mlm"``; each view is a ``batch_encode`` dict plus ``mlm_input_ids`` /
    ``mlm_labels`` (-100 = not a target). Returns (loss, metrics)."""
    from jaxformers.text.mlm import mlm_cross_entropy

    kw = dict(train=train, rngs=rngs or {})
    encode = lambda view, key: model.apply({"params": params}, *recformer_inputs(view, key),  # noqa: E731
                                           return_features=True, **kw)
    n = view_a["input_ids"].shape[0]
    same = view_a["input_ids"].shape == view_b["input_ids"].shape
    if same:  # one encoder call over both views (rows are independent): half the program to compile
        both = {k: jnp.concatenate([view_a[k], view_b[k]]) for k in view_a if k in view_b}
        z = encode(both, "input_ids")["last_hidden_state"][:, 0]
        z_a, z_b = z[:n], z[n:]
    else:
        z_a, z_b = (encode(v, "input_ids")["last_hidden_state"][:, 0] for v in (view_a, view_b))
    scores = cosine_scores(z_a, z_b, temperature)
    labels = jnp.arange(scores.shape[0])
    loss = optax.softmax_cross_entropy_with_integer_labels(scores, labels).mean()
    metrics = {"contrastive": loss, "accuracy": jnp.mean(jnp.argmax(scores, -1) == labels)}
    if "mlm_input_ids" in view_a and "mlm_input_ids" in view_b and mlm_weight:
        if same:
            logits = encode(both, "mlm_input_ids")["output"]
            mlm = [mlm_cross_entropy(logits[:n], view_a["mlm_labels"]), mlm_cross_entropy(logits[n:], view_b["mlm_labels"])]
        else:
            mlm = [mlm_cross_entropy(encode(v, "mlm_input_ids")["output"], v["mlm_labels"]) for v in (view_a, view_b)]
        metrics.update(mlm_a=mlm[0], mlm_b=mlm[1])
        loss = loss + mlm_weight * (mlm[0] + mlm[1])
    return loss, metrics


def finetune_loss(user: jax.Array, item_table: jax.Array, targets: jax.Array, temperature: float = 0.05) -> jax.Array:
    """Full-softmax cross-entropy of cos(user, every item) / temperature against the target item ids."""
    return optax.softmax_cross_entropy_with_integer_labels(cosine_scores(user, item_table, temperature), targets).mean()


def ranking_metrics(scores: np.ndarray, targets: np.ndarray, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    """NDCG@k, Recall@k (one relevant item per row) and MRR over the full ranking, averaged over rows;
    rank = 1 + the number of items scored strictly higher than the target."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets)
    target_scores = scores[np.arange(len(targets)), targets]
    rank = 1 + (scores > target_scores[:, None]).sum(1)
    out = {}
    for k in ks:
        hit = rank <= k
        out[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(rank + 1), 0.0)))
        out[f"recall@{k}"] = float(np.mean(hit))
    out["mrr"] = float(np.mean(1.0 / rank))
    return out


@functools.lru_cache(maxsize=16)
def _item_encoder(embed: Longformer):
    """One jitted <s> encoder per module configuration (re-encoding the table every epoch reuses it)."""
    return jax.jit(lambda p, batch: embed.apply({"params": p}, *recformer_inputs(batch)))


def encode_items(model: Longformer, params: Any, tokenizer: RecformerTokenizer, items: Sequence[Mapping[str, Any]],
                 batch_size: int = 64, length: int | None = None) -> np.ndarray:
    """The item table: each item alone through the encoder, its ``<s>`` state (``encode_all_items``)."""
    length = length or max(len(tokenizer.encode([it])["input_ids"]) for it in items)
    fn = _item_encoder(model.clone(head="embedding", pooling="cls", normalize_embeddings=False, add_pooler=False))
    out = []
    for i in range(0, len(items), batch_size):
        chunk = list(items[i:i + batch_size])
        batch = tokenizer.batch_encode([[it] for it in chunk + chunk[:1] * (batch_size - len(chunk))], length=length)
        out.append(np.asarray(fn(params, batch))[:len(chunk)])
    return np.concatenate(out)


@register_model(ModelInfo(paper="Text Is All You Need: Learning Language Representations for Sequential "
                                "Recommendation (Recformer)", arxiv="2305.13731", repo="JiachengLi1995/Recformer",
                          input_size=(1024,), params_m=148.110336,
                          converter=longformer_convert.convert_hf_longformer))
def recformer_base(**overrides: Any) -> Longformer:
    """RecformerModel on longformer-base-4096 (token types 4, item positions 51, window 64, <s> pooling,
    no pooler layer): 148,110,336 parameters."""
    return Longformer(**{**RECFORMER, **overrides})
