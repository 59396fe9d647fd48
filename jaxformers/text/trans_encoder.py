"""Trans-Encoder: unsupervised sentence-pair modelling by bi-encoder <-> cross-encoder self-distillation.

Paper: "Trans-Encoder: Unsupervised sentence-pair modelling through self- and mutual-distillations",
Liu et al., ICLR 2022, arXiv 2109.13059; official code amzn/trans-encoder (``src/self_distill.py``,
``src/mutual_distill_parallel.py``), on sentence-transformers 2.0.

The self-distillation loop (``self_distill``), each cycle (3 by default):

1. the current bi-encoder labels every unlabelled pair with the **cosine** of the two embeddings;
   both orders (a, b) and (b, a) are kept (the official code's default; it skips it for QNLI only);
2. the **cross-encoder** is re-initialised from the plain pretrained model (``--init_with_new_models``)
   and trained on those soft labels with **binary cross-entropy on its one logit** (sentence-
   transformers' ``CrossEncoder.fit`` default for ``num_labels == 1``): 1 epoch, batch 32, warm-up 10%;
3. the cross-encoder scores every pair (one order) with **sigmoid(logit)** (``CrossEncoder.predict``);
4. the **bi-encoder** is re-initialised from its starting checkpoint and trained on those silver
   scores with ``CosineSimilarityLoss`` (**MSE** between cos(u, v) and the label): 10 epochs, batch 128,
   lr 5e-5, no warm-up (the paper's settings; every setting is an argument here);
5. both are scored on the dev pairs (Spearman); the best cycle of each encoder is kept.

``mutual_distill`` runs the same loop with two bi-encoders and two cross-encoders whose pseudo-labels
are averaged (mean of the two bi-encoders' cosines, then mean of the two cross-encoders' sigmoids).

``synthetic_sts`` builds the offline pair set the project uses: template sentences of events
(subject, action, place) rendered with synonyms, gold similarity 0.5 [same action] + 0.3 [same
subject] + 0.2 [same place], plus a paraphrase-retrieval split (query = one rendering of an event,
its relevant document = another rendering, among all events' renderings).

Deviations: AMP and evaluation every 200 steps inside an epoch are not reproduced (selection is per
cycle); the official code starts from SimCSE (CLS pooling); any encoder works here (the project's
check starts from all-MiniLM-L6-v2 with mean pooling, the cross-encoder from the same weights with a
fresh one-logit head, since the plain PLM is not available offline).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.text.encoders import Encoder, cosine, cosine_jnp, cross_scores, embed, module_inputs, pair_batch, text_batch
from jaxformers.text.metrics import spearman
from jaxformers.text.retrieval import retrieval_metrics
from jaxformers.text.training import Fitter, batched

Pair = tuple[str, str]


def cosine_similarity_loss(u: jax.Array, v: jax.Array, labels: jax.Array) -> jax.Array:
    """sentence-transformers' ``CosineSimilarityLoss``: mean((cos(u, v) - label)^2)."""
    return jnp.mean((cosine_jnp(u, v) - labels.astype(jnp.float32)) ** 2)


def soft_bce_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``torch.nn.BCEWithLogitsLoss`` (mean) with soft targets in [0, 1]."""
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32)).mean()


def bi_encoder_labels(bi: Encoder, pairs: Sequence[Pair], *, both_orders: bool = True) -> tuple[list[Pair], np.ndarray]:
    """Cosine pseudo-labels of the pairs from the bi-encoder; with ``both_orders`` every pair is also
    added reversed, with the same label (step 1)."""
    texts = sorted({t for pair in pairs for t in pair})
    index = {t: i for i, t in enumerate(texts)}
    emb = embed(bi, texts)
    labels = cosine(emb[[index[a] for a, _ in pairs]], emb[[index[b] for _, b in pairs]]).astype(np.float32)
    pairs = list(pairs)
    if both_orders:
        return pairs + [(b, a) for a, b in pairs], np.concatenate([labels, labels])
    return pairs, labels


def cross_predict(cross: Encoder, pairs: Sequence[Pair]) -> np.ndarray:
    """sigmoid(logit) of each pair (``CrossEncoder.predict`` for one label)."""
    logits = cross_scores(cross, [a for a, _ in pairs], [b for _, b in pairs])
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def bi_scores(bi: Encoder, pairs: Sequence[Pair]) -> np.ndarray:
    texts = sorted({t for pair in pairs for t in pair})
    index = {t: i for i, t in enumerate(texts)}
    emb = embed(bi, texts)
    return cosine(emb[[index[a] for a, _ in pairs]], emb[[index[b] for _, b in pairs]])


def train_cross_encoder(init: Encoder, pairs: Sequence[Pair], labels: np.ndarray, *, epochs: int = 1,
                        batch_size: int = 32, learning_rate: float = 2e-5, warmup_fraction: float = 0.1,
                        seed: int = 0, compiler_options: dict | None = None) -> tuple[Encoder, list[float]]:
    """Step 2: soft-label BCE on the cross-encoder's logit, from ``init``'s parameters."""
    data = {**pair_batch(init.tokenizer, [a for a, _ in pairs], [b for _, b in pairs], init.max_length),
            "label": np.asarray(labels, np.float32)}
    batches = batched(data, min(batch_size, len(labels)), epochs=epochs, seed=seed)

    def loss(params, batch, key):
        args, kwargs = module_inputs(init.module, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits = init.module.apply({"params": params}, *args, **kwargs, train=True, rngs={"dropout": key})
        return soft_bce_loss(logits, batch["label"])

    fitter = Fitter(loss, init.params, learning_rate=learning_rate, total_steps=len(batches),
                    warmup_steps=int(warmup_fraction * len(batches)), seed=seed, compiler_options=compiler_options)
    losses = fitter.run(batches)
    return init.replace(params=fitter.params), losses


def train_bi_encoder(init: Encoder, pairs: Sequence[Pair], labels: np.ndarray, *, epochs: int = 10,
                     batch_size: int = 128, learning_rate: float = 5e-5, warmup_steps: int = 0, seed: int = 0,
                     compiler_options: dict | None = None) -> tuple[Encoder, list[float]]:
    """Step 4: ``CosineSimilarityLoss`` on the silver labels, from ``init``'s parameters."""
    tok, n = init.tokenizer, init.max_length
    data = {**text_batch(tok, [a for a, _ in pairs], n, "a_"), **text_batch(tok, [b for _, b in pairs], n, "b_"),
            "label": np.asarray(labels, np.float32)}
    batches = batched(data, min(batch_size, len(labels)), epochs=epochs, seed=seed)

    def loss(params, batch, key):
        def emb(prefix, k):
            args, kwargs = module_inputs(init.module, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                                         batch[prefix + "token_type_ids"])
            return init.module.apply({"params": params}, *args, **kwargs, train=True, rngs={"dropout": k})

        ka, kb = jax.random.split(key)
        return cosine_similarity_loss(emb("a_", ka), emb("b_", kb), batch["label"])

    fitter = Fitter(loss, init.params, learning_rate=learning_rate, total_steps=len(batches), warmup_steps=warmup_steps,
                    seed=seed, compiler_options=compiler_options)
    losses = fitter.run(batches)
    return init.replace(params=fitter.params), losses


@dataclasses.dataclass
class CycleResult:
    cycle: int
    bi_spearman: float
    cross_spearman: float
    cross_losses: list[float]
    bi_losses: list[float]


@dataclasses.dataclass
class DistillResult:
    best_bi: Encoder
    best_cross: Encoder
    start_bi_spearman: float
    cycles: list[CycleResult]


def self_distill(bi: Encoder, cross: Encoder, pairs: Sequence[Pair], dev_pairs: Sequence[Pair], dev_scores: Sequence[float],
                 *, cycles: int = 3, cross_epochs: int = 1, cross_batch_size: int = 32, cross_lr: float = 2e-5,
                 bi_epochs: int = 10, bi_batch_size: int = 128, bi_lr: float = 5e-5, seed: int = 0,
                 compiler_options: dict | None = None, log=None) -> DistillResult:
    """The Trans-Encoder loop (module docstring). ``bi`` and ``cross`` are the starting points every
    cycle re-initialises from; ``pairs`` are unlabelled; the dev set selects the best cycles."""
    current = bi
    best_bi = (spearman(bi_scores(bi, dev_pairs), dev_scores), bi)
    start = best_bi[0]
    best_cross: tuple[float, Encoder] = (-np.inf, cross)
    history = []
    for cycle in range(cycles):
        sym_pairs, labels = bi_encoder_labels(current, pairs)
        trained_cross, cross_losses = train_cross_encoder(cross, sym_pairs, labels, epochs=cross_epochs,
                                                          batch_size=cross_batch_size, learning_rate=cross_lr,
                                                          seed=seed + cycle, compiler_options=compiler_options)
        silver = cross_predict(trained_cross, pairs)
        current, bi_losses = train_bi_encoder(bi, pairs, silver, epochs=bi_epochs, batch_size=bi_batch_size,
                                              learning_rate=bi_lr, seed=seed + cycle, compiler_options=compiler_options)
        result = CycleResult(cycle, spearman(bi_scores(current, dev_pairs), dev_scores),
                             spearman(cross_predict(trained_cross, dev_pairs), dev_scores), cross_losses, bi_losses)
        history.append(result)
        if log:
            log(f"cycle {cycle}: dev Spearman bi {result.bi_spearman:.4f}, cross {result.cross_spearman:.4f}")
        if result.bi_spearman > best_bi[0]:
            best_bi = (result.bi_spearman, current)
        if result.cross_spearman > best_cross[0]:
            best_cross = (result.cross_spearman, trained_cross)
    return DistillResult(best_bi[1], best_cross[1], start, history)


def mutual_distill(bis: Sequence[Encoder], crosses: Sequence[Encoder], pairs: Sequence[Pair], dev_pairs, dev_scores, *,
                   cycles: int = 3, cross_epochs: int = 1, cross_batch_size: int = 32, cross_lr: float = 2e-5,
                   bi_epochs: int = 10, bi_batch_size: int = 128, bi_lr: float = 5e-5, seed: int = 0,
                   compiler_options: dict | None = None, log=None) -> list[dict[str, Any]]:
    """Mutual distillation of several (official: two) bi/cross-encoder pairs: every pseudo-label is the
    mean over the models (bi cosines, then cross sigmoids); each model trains as in ``self_distill``.
    Returns per cycle the dev Spearman of each model and of the ensembles (mean scores)."""
    current = list(bis)
    history = []
    for cycle in range(cycles):
        labelled = [bi_encoder_labels(b, pairs) for b in current]
        sym_pairs, labels = labelled[0][0], np.mean([lab for _, lab in labelled], axis=0)
        trained = [train_cross_encoder(c, sym_pairs, labels, epochs=cross_epochs, batch_size=cross_batch_size,
                                       learning_rate=cross_lr, seed=seed + cycle,
                                       compiler_options=compiler_options)[0] for c in crosses]
        silver = np.mean([cross_predict(c, pairs) for c in trained], axis=0)
        current = [train_bi_encoder(b, pairs, silver, epochs=bi_epochs, batch_size=bi_batch_size, learning_rate=bi_lr,
                                    seed=seed + cycle, compiler_options=compiler_options)[0] for b in bis]
        bi_dev = [bi_scores(b, dev_pairs) for b in current]
        cross_dev = [cross_predict(c, dev_pairs) for c in trained]
        row = {"cycle": cycle, "bi": [spearman(s, dev_scores) for s in bi_dev],
               "cross": [spearman(s, dev_scores) for s in cross_dev],
               "bi_ensemble": spearman(np.mean(bi_dev, 0), dev_scores),
               "cross_ensemble": spearman(np.mean(cross_dev, 0), dev_scores), "encoders": (current, trained)}
        history.append(row)
        if log:
            log(f"cycle {cycle}: bi {row['bi']}, cross {row['cross']}")
    return history


# ----------------------------------------------------------------------------- generated pair set

SUBJECTS = (("a man", "a guy"), ("a woman", "a lady"), ("a boy", "a young boy"), ("a girl", "a young girl"),
            ("a chef", "a cook"), ("an old man", "an elderly man"), ("a police officer", "a cop"),
            ("a musician", "a performer"), ("a student", "a pupil"), ("a doctor", "a physician"))
ACTIONS = (("is playing a guitar", "is strumming a guitar"), ("is slicing an onion", "is cutting up an onion"),
           ("is riding a horse", "is on horseback"), ("is swimming in a pool", "is swimming laps in the water"),
           ("is reading a book", "is looking through a book"), ("is cooking pasta", "is making spaghetti"),
           ("is driving a car", "is behind the wheel of a car"), ("is playing the piano", "is playing a keyboard"),
           ("is painting a wall", "is putting paint on a wall"), ("is talking on the phone", "is on a phone call"),
           ("is walking a dog", "is taking a dog for a walk"), ("is dancing", "is moving to the music"),
           ("is eating an apple", "is biting into an apple"), ("is writing a letter", "is writing a note"))
PLACES = (("in the park", "at the park"), ("on the street", "on the road"), ("at home", "in the house"),
          ("on a stage", "on the stage"), ("in the kitchen", "in a kitchen"), ("near the river", "by the river"))


def render(event: tuple[int, int, int], rng: np.random.Generator) -> str:
    """One sentence for (subject, action, place) indices, each slot's wording picked at random."""
    s, a, p = event
    return " ".join([SUBJECTS[s][rng.integers(2)], ACTIONS[a][rng.integers(2)], PLACES[p][rng.integers(2)]]) + "."


def gold_similarity(e1, e2) -> float:
    return 0.5 * (e1[1] == e2[1]) + 0.3 * (e1[0] == e2[0]) + 0.2 * (e1[2] == e2[2])


def synthetic_sts(seed: int = 0, num_pairs: int = 600, num_dev: int = 300, num_retrieval: int = 120) -> dict[str, Any]:
    """``{"pairs": unlabelled train pairs, "dev_pairs", "dev_scores", "queries", "corpus", "relevance"}``.
    Pairs mix renderings of one event (similarity 1), events sharing the action, the subject or the
    place, and unrelated events; retrieval events are disjoint from the train/dev ones."""
    rng = np.random.Generator(np.random.PCG64(seed))
    shape = (len(SUBJECTS), len(ACTIONS), len(PLACES))
    events = [tuple(int(x) for x in np.unravel_index(i, shape)) for i in rng.permutation(int(np.prod(shape)))]
    retrieval_events, pool = events[:num_retrieval], events[num_retrieval:]

    def pair_set(n):
        out, scores = [], []
        for _ in range(n):
            e1 = pool[rng.integers(len(pool))]
            kind = rng.integers(4)
            if kind == 0:
                e2 = e1
            else:
                keep = {1: (1,), 2: (0, 2), 3: ()}[int(kind)]
                e2 = tuple(e1[k] if k in keep else int(rng.integers(shape[k])) for k in range(3))
            out.append((render(e1, rng), render(e2, rng)))
            scores.append(gold_similarity(e1, e2))
        return out, np.asarray(scores, np.float32)

    pairs, _ = pair_set(num_pairs)
    dev_pairs, dev_scores = pair_set(num_dev)
    queries = [render(e, rng) for e in retrieval_events]
    corpus = [render(e, rng) for e in retrieval_events]
    return {"pairs": pairs, "dev_pairs": dev_pairs, "dev_scores": dev_scores, "queries": queries, "corpus": corpus,
            "relevance": np.eye(len(retrieval_events), dtype=np.float32)}


def retrieval_eval(bi: Encoder, queries: Sequence[str], corpus: Sequence[str], relevance: np.ndarray) -> dict[str, float]:
    """MRR@10, nDCG@10, recall@1/5/10 of cosine search of ``queries`` over ``corpus``."""
    q, d = embed(bi, queries), embed(bi, corpus)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    return {k: float(v) for k, v in retrieval_metrics(jnp.asarray(q @ d.T), jnp.asarray(relevance)).items()}
