r"""Recformer on a generated item catalogue: pretraining, two-stage fine-tuning, ranking evaluation.

    python -m train.recformer                       # the defaults below (a CPU run of a few minutes)
    python -m train.recformer layers=2 width=64 finetune_epochs=4

Data (``catalogue``, ``user_histories``): a music-instrument catalogue (Recformer fine-tunes on
Amazon "Instruments" among others) of 60 items with three text attributes (title, brand, category),
and users with a hidden taste (a category and a brand): each history draws 80% of its items from the
taste's category (preferring the brand), the rest anywhere, and the next item always comes from the
taste. Per user: training examples predict every item from the third on from the items before it,
validation the second-to-last item, test the last (the official split). The tokenizer is a WordPiece
learnt on the catalogue text.

Pipeline (Recformer's, see ``jaxformers/models/recformer.py``): (1) pretraining: two views of a
training user (history, next item) with the in-batch contrastive loss on cos / 0.05 plus 0.1 x MLM of
each view; (2) fine-tuning stage 1: before every epoch every item is re-encoded into the item table,
then the encoder trains on the full-softmax loss over all items; the best epoch by validation
NDCG@10 is kept; (3) stage 2: from stage 1's best, training continues with that table frozen, again
keeping the best; (4) test NDCG@10/50, Recall@10/50, MRR of the best. The zero-shot scores (after
pretraining, before fine-tuning) are reported too.
"""
from __future__ import annotations

import functools
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxformers.models.recformer import (RECFORMER, RecformerTokenizer, cosine_scores, encode_items, finetune_loss,
                                         pretraining_loss, ranking_metrics, recformer_inputs)
from jaxformers.models.longformer import Longformer
from jaxformers.text import Tokenizer
from jaxformers.text.mlm import mask_tokens
from jaxformers.text.training import Fitter, batched, fit

CATEGORIES = ("guitar", "violin", "piano", "drum kit", "flute", "trumpet")
BRANDS = ("yamaha", "fender", "roland", "gibson", "casio", "pearl", "selmer", "stagg", "kawai", "ibanez")
STYLES = ("classic", "studio", "travel", "junior", "pro", "vintage", "electric", "acoustic", "concert", "student")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_users = 300
    c.layers, c.width, c.heads, c.window = 2, 64, 2, 16
    c.max_items = 8                      # history items kept (most recent first), <= 50
    c.batch_size = 16
    c.pretrain_epochs, c.pretrain_lr = 2, 1e-3
    c.finetune_epochs, c.finetune_lr = 3, 5e-4
    c.stage2_epochs = 2
    c.temperature, c.mlm_weight = 0.05, 0.1
    c.compiler_options = ml_collections.FieldReference(None, field_type=dict)
    return c


def catalogue() -> list[dict[str, str]]:
    """60 items: 10 per category, each a (brand, style) pair drawn once with a fixed seed."""
    rng = np.random.Generator(np.random.PCG64(7))
    items = []
    for category in CATEGORIES:
        pairs = rng.permutation(len(BRANDS) * len(STYLES))[:10]
        for p in pairs:
            brand, style = BRANDS[p // len(STYLES)], STYLES[p % len(STYLES)]
            items.append({"title": f"{brand} {style} {category}", "brand": brand, "category": category})
    return items


def user_histories(num_users: int, seed: int = 0) -> list[list[int]]:
    """Item-id histories (oldest first, 5-9 items): 80% from the user's category, the last always."""
    items = catalogue()
    by_category = {c: [i for i, it in enumerate(items) if it["category"] == c] for c in CATEGORIES}
    rng = np.random.Generator(np.random.PCG64(1000 + seed))
    out = []
    for _ in range(num_users):
        pool = by_category[CATEGORIES[rng.integers(len(CATEGORIES))]]
        brand = items[pool[rng.integers(len(pool))]]["brand"]
        liked = [i for i in pool if items[i]["brand"] == brand] * 2 + pool
        n = int(rng.integers(5, 10))
        history = [int(liked[rng.integers(len(liked))]) if rng.random() < 0.8 else int(rng.integers(len(items)))
                   for _ in range(n - 1)]
        out.append(history + [int(liked[rng.integers(len(liked))])])
    return out


@functools.lru_cache(maxsize=None)
def catalogue_tokenizer() -> Tokenizer:
    from train.tasks_text import wordpiece_vocab

    texts = [" ".join(f"{k} {v}" for k, v in it.items()) for it in catalogue()] * 2
    return Tokenizer.from_vocab(wordpiece_vocab(texts, 400))


def split_examples(histories: list[list[int]], split: str) -> list[tuple[list[int], int]]:
    """(history item ids, target item id) pairs of a split (see the module docstring)."""
    if split == "train":
        return [(h[:i], h[i]) for h in histories for i in range(2, len(h) - 2)]
    if split == "val":
        return [(h[:-2], h[-2]) for h in histories]
    if split == "test":
        return [(h[:-1], h[-1]) for h in histories]
    raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")


def run(config: ml_collections.ConfigDict | None = None, log=print) -> dict[str, Any]:
    """The whole pipeline; returns the zero-shot and fine-tuned test metrics and the loss curves."""
    c = config or default_config()
    t0 = time.time()
    items, tok = catalogue(), catalogue_tokenizer()
    layout = RecformerTokenizer(tok, max_item_embeddings=c.max_items + 1, max_token_num=512)
    histories = user_histories(c.num_users, c.seed)
    item_len = max(len(layout.encode([it])["input_ids"]) for it in items)
    seq_len = 1 + c.max_items * (item_len - 1)
    model = Longformer(**{**RECFORMER, "vocab_size": tok.vocab_size, "hidden_size": c.width,
                          "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
                          "intermediate_size": 4 * c.width, "max_position_embeddings": seq_len + tok.pad_token_id + 1,
                          "max_item_embeddings": c.max_items + 1, "attention_window": c.window,
                          "pad_token_id": tok.pad_token_id, "head": "mlm", "hidden_dropout_prob": 0.1,
                          "attention_probs_dropout_prob": 0.1})
    rng = np.random.default_rng(c.seed)
    specials = [tok.token_id(k) for k in ("cls", "sep", "pad", "mask")]

    def encode(examples, length):
        return layout.batch_encode([[items[i] for i in h][-c.max_items:] for h in examples], length=length)

    # ---- pretraining: (history, next item) views, contrastive + 0.1 MLM
    pairs = split_examples(histories, "train")
    view_a = encode([h for h, _ in pairs], seq_len)
    view_b = encode([[t] for _, t in pairs], seq_len)  # the views share a length: one encoder call for both
    for view in (view_a, view_b):
        view["mlm_input_ids"], view["mlm_labels"] = mask_tokens(view["input_ids"], rng, mask_id=tok.mask_token_id,
                                                                vocab_size=tok.vocab_size, special_ids=specials)
    arrays = {**{f"a/{k}": v for k, v in view_a.items()}, **{f"b/{k}": v for k, v in view_b.items()}}
    init_batch = {k: jnp.asarray(v[:2]) for k, v in view_a.items()}
    params = jax.jit(model.init)(jax.random.key(c.seed), *recformer_inputs(init_batch))["params"]

    def pre_loss(p, batch, key):
        a = {k[2:]: v for k, v in batch.items() if k.startswith("a/")}
        b = {k[2:]: v for k, v in batch.items() if k.startswith("b/")}
        return pretraining_loss(model, p, a, b, temperature=c.temperature, mlm_weight=c.mlm_weight, train=True,
                                rngs={"dropout": key})[0]

    pre_losses = []
    if c.pretrain_epochs:
        params, pre_losses = fit(pre_loss, params, batched(arrays, c.batch_size, epochs=c.pretrain_epochs, seed=c.seed),
                                 learning_rate=c.pretrain_lr, warmup_steps=10, compiler_options=c.compiler_options)
        log(f"pretraining: {len(pre_losses)} steps, loss {pre_losses[0]:.3f} -> {pre_losses[-1]:.3f} "
            f"({time.time() - t0:.0f} s)")

    # ---- fine-tuning: full softmax over the item table
    embedder = model.clone(head="embedding")
    score = jax.jit(lambda p, batch, table: cosine_scores(embedder.apply({"params": p}, *recformer_inputs(batch)),
                                                          table, c.temperature))

    def evaluate(p, table, split):
        examples = split_examples(histories, split)
        batch = encode([h for h, _ in examples], seq_len)
        n, size = len(examples), 100
        padded = {k: np.concatenate([v, v[:1].repeat(-n % size, 0)]) for k, v in batch.items()}  # one shape
        scores = np.concatenate([np.asarray(score(p, {k: v[i:i + size] for k, v in padded.items()}, table))
                                 for i in range(0, n, size)])[:n]
        return ranking_metrics(scores, np.asarray([t for _, t in examples]))

    train_arrays = {**encode([h for h, _ in pairs], seq_len), "target": np.asarray([t for _, t in pairs], np.int32)}

    def ft_loss(p, batch, key):
        user = embedder.apply({"params": p}, *recformer_inputs(batch), train=True, rngs={"dropout": key})
        return finetune_loss(user, batch["table"], batch["target"], c.temperature)

    def table_of(p):
        return encode_items(model, p, layout, items, length=item_len)

    zero_table = table_of(params)
    zero_shot = evaluate(params, zero_table, "test")
    log(f"zero-shot test: {_fmt(zero_shot)}")
    best = (evaluate(params, zero_table, "val")["ndcg@10"], params, zero_table)
    steps_per_epoch = len(train_arrays["target"]) // c.batch_size
    # One optimizer and one linear schedule for both stages (the official script shares them; its
    # schedule spans stage 1 only, ours both, so that stage 2 does not run at a decayed-to-zero rate).
    fitter = Fitter(ft_loss, params, learning_rate=c.finetune_lr, weight_decay=0.0, seed=c.seed,
                    total_steps=steps_per_epoch * (c.finetune_epochs + c.stage2_epochs),
                    compiler_options=c.compiler_options)
    curves = []
    for stage, epochs in ((1, c.finetune_epochs), (2, c.stage2_epochs)):
        fitter.set_params(best[1])  # stage 2 starts from stage 1's best checkpoint
        table = best[2]
        for epoch in range(epochs):
            if stage == 1:
                table = table_of(fitter.params)  # stage 1: a fresh item table before every epoch
            batches = [{**b, "table": table} for b in batched(train_arrays, c.batch_size, seed=c.seed + 10 * stage + epoch)]
            losses = fitter.run(batches)
            curves.append(losses)
            val = evaluate(fitter.params, table, "val")
            log(f"stage {stage} epoch {epoch}: loss {np.mean(losses):.3f}, val ndcg@10 {val['ndcg@10']:.3f}")
            if val["ndcg@10"] > best[0]:
                best = (val["ndcg@10"], fitter.params, table)
    test = evaluate(best[1], best[2], "test")
    log(f"fine-tuned test: {_fmt(test)} ({time.time() - t0:.0f} s in all)")
    return {"zero_shot": zero_shot, "test": test, "pretrain_losses": pre_losses, "finetune_losses": curves,
            "num_items": len(items), "seconds": time.time() - t0}


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def main(argv: list[str]) -> None:
    config = default_config()
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in config:
            raise SystemExit(f"unknown setting {key!r}; settings: {sorted(config)}")
        config[key] = type(config[key])(value)
    run(config)


if __name__ == "__main__":
    main(sys.argv[1:])
