"""Trans-Encoder, News Deja Vu and Curved Contrastive Learning: labels, masks and losses against worked
examples and torch, the NER grouping against transformers' pipeline, and each loop's mechanics on a tiny
encoder (the real checks from all-MiniLM-L6-v2 are benchmarks/text_methods.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.models.bert import Bert
from jaxformers.text import Tokenizer
from jaxformers.text import ccl, news_dejavu as ndv, trans_encoder as te
from jaxformers.text.encoders import Encoder
from tests.helpers import FAST_COMPILE, numpy_variables

WORDS = sorted({w for s in te.SUBJECTS + te.ACTIONS + te.PLACES for v in s for w in v.split()} | {"."})
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


@pytest.fixture(scope="module")
def tiny():
    """A 1-layer width-32 bi-encoder (mean pooling) and cross-encoder over the generated STS words."""
    tok = Tokenizer.from_vocab(VOCAB)
    kw = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=32)
    ids = jnp.zeros((2, 16), jnp.int32)
    bi_module, cross_module = Bert(**kw, head="embedding"), Bert(**kw, head="cross_encoder")
    bi = Encoder(bi_module, numpy_variables(bi_module, ids)["params"], tok, max_length=16)
    cross = Encoder(cross_module, numpy_variables(cross_module, ids, seed=1)["params"], tok, max_length=32)
    return bi, cross


def test_losses_equal_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((2, 5, 8)).astype(np.float32)
    y = rng.random(5).astype(np.float32)
    want = torch.nn.MSELoss()(torch.cosine_similarity(torch.tensor(u), torch.tensor(v)), torch.tensor(y))
    assert float(te.cosine_similarity_loss(u, v, y)) == pytest.approx(float(want), rel=1e-5)
    logits = rng.standard_normal(5).astype(np.float32)
    want = torch.nn.BCEWithLogitsLoss()(torch.tensor(logits), torch.tensor(y))
    assert float(te.soft_bce_loss(logits, y)) == pytest.approx(float(want), rel=1e-5)
    n = rng.standard_normal((5, 8)).astype(np.float32)
    scores = 20 * torch.nn.functional.normalize(torch.tensor(u), dim=-1) @ torch.nn.functional.normalize(
        torch.cat([torch.tensor(v), torch.tensor(n)]), dim=-1).T
    want = torch.nn.CrossEntropyLoss()(scores, torch.arange(5))
    assert float(ndv.mnrl_loss(u, v, n)) == pytest.approx(float(want), rel=1e-5)


def test_trans_encoder_cycle_mechanics(tiny):
    """Labels in both orders; the cross-encoder and the bi-encoder restart from their initial weights
    each cycle and learn (loss falls); dev Spearman and retrieval metrics come out of each cycle."""
    bi, cross = tiny
    data = te.synthetic_sts(seed=0, num_pairs=64, num_dev=32, num_retrieval=16)
    pairs, labels = te.bi_encoder_labels(bi, data["pairs"][:3])
    assert pairs[3:] == [(b, a) for a, b in pairs[:3]] and np.array_equal(labels[:3], labels[3:])
    assert np.allclose(labels[:3], te.bi_scores(bi, data["pairs"][:3]), atol=1e-6)
    assert {round(float(x), 3) for x in data["dev_scores"]} <= {0.0, 0.2, 0.3, 0.5, 0.7, 0.8, 1.0}
    result = te.self_distill(bi, cross, data["pairs"], data["dev_pairs"], data["dev_scores"], cycles=1, cross_epochs=3,
                             cross_batch_size=32, cross_lr=3e-3, bi_epochs=3, bi_batch_size=32, bi_lr=3e-3,
                             compiler_options=FAST_COMPILE)
    cycle = result.cycles[0]
    assert cycle.cross_losses[-1] < cycle.cross_losses[0] and cycle.bi_losses[-1] < cycle.bi_losses[0]
    assert np.isfinite([result.start_bi_spearman, cycle.bi_spearman, cycle.cross_spearman]).all()
    metrics = te.retrieval_eval(result.best_bi, data["queries"], data["corpus"], data["relevance"])
    assert 0 < metrics["mrr@10"] <= 1 and metrics["recall@1"] <= metrics["recall@10"]


def test_mutual_distill_averages_the_two_models_labels(tiny, monkeypatch):
    """Mutual distillation (``src/mutual_distill_parallel.py``): both cross-encoders train on the mean of
    the two bi-encoders' cosines (both orders), both bi-encoders on the mean of the two trained
    cross-encoders' sigmoids; every model restarts from its own starting weights each cycle, the next
    cycle labels with the newly trained bi-encoders, and the dev rows score what was trained. The
    trainers are replaced by recorders that return perturbed weights (training itself: the test above)."""
    from jaxformers.text.encoders import cross_scores, embed
    from jaxformers.text.metrics import spearman

    def perturbed(encoder, seed):
        rng = np.random.default_rng(seed)
        return encoder.replace(params=jax.tree.map(
            lambda p: np.asarray(p) + 0.1 * rng.standard_normal(np.shape(p)).astype(np.float32), encoder.params))

    bi1, cross1 = tiny
    bi2, cross2 = perturbed(bi1, 100), perturbed(cross1, 101)
    data = te.synthetic_sts(seed=0, num_pairs=12, num_dev=8, num_retrieval=4)
    pairs, dev = data["pairs"], data["dev_pairs"]
    calls = {"cross": [], "bi": []}

    def recorder(kind):
        def train(init, train_pairs, labels, **kwargs):
            trained = perturbed(init, len(calls["cross"]) + 10 * len(calls["bi"]))
            calls[kind].append({"init": init, "pairs": list(train_pairs), "labels": np.asarray(labels),
                                "trained": trained})
            return trained, [1.0, 0.5]
        return train

    monkeypatch.setattr(te, "train_cross_encoder", recorder("cross"))
    monkeypatch.setattr(te, "train_bi_encoder", recorder("bi"))
    history = te.mutual_distill([bi1, bi2], [cross1, cross2], pairs, dev, data["dev_scores"], cycles=2)

    def cos(bi, which):
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        return np.sum(unit(embed(bi, [a for a, _ in which])) * unit(embed(bi, [b for _, b in which])), -1)

    def sigmoid(cross, which):
        return 1 / (1 + np.exp(-cross_scores(cross, [a for a, _ in which], [b for _, b in which])))

    assert len(calls["cross"]) == len(calls["bi"]) == 4 and len(history) == 2
    labellers = [bi1, bi2]
    for cycle in range(2):
        cross_calls, bi_calls = calls["cross"][2 * cycle:2 * cycle + 2], calls["bi"][2 * cycle:2 * cycle + 2]
        first, second = (cos(b, pairs) for b in labellers)
        assert np.abs(first - second).max() > 1e-3  # two different labellers: the mean is a real check
        mean = (first + second) / 2
        for call, start in zip(cross_calls, [cross1, cross2]):
            assert call["init"] is start  # re-initialised from its own start every cycle
            assert call["pairs"] == list(pairs) + [(b, a) for a, b in pairs]
            np.testing.assert_allclose(call["labels"], np.concatenate([mean, mean]), rtol=0, atol=1e-6)
        first, second = (sigmoid(c["trained"], pairs) for c in cross_calls)
        assert np.abs(first - second).max() > 1e-3
        silver = (first + second) / 2
        for call, start in zip(bi_calls, [bi1, bi2]):
            assert call["init"] is start and call["pairs"] == list(pairs)
            np.testing.assert_allclose(call["labels"], silver, rtol=0, atol=1e-6)
        labellers = [c["trained"] for c in bi_calls]  # the next cycle labels with these
        row = history[cycle]
        bi_dev = [cos(b, dev) for b in labellers]
        cross_dev = [sigmoid(c["trained"], dev) for c in cross_calls]
        np.testing.assert_allclose(row["bi"], [spearman(s, data["dev_scores"]) for s in bi_dev], atol=1e-6)
        np.testing.assert_allclose(row["cross"], [spearman(s, data["dev_scores"]) for s in cross_dev], atol=1e-6)
        assert row["bi_ensemble"] == pytest.approx(spearman(np.mean(bi_dev, 0), data["dev_scores"]), abs=1e-6)
        assert row["cross_ensemble"] == pytest.approx(spearman(np.mean(cross_dev, 0), data["dev_scores"]), abs=1e-6)


@pytest.mark.parametrize("groups, same, by_type", [
    ([("PER", "John Doe"), ("O", "works at"), ("ORG", "OpenAI"), ("O", "in"), ("LOC", "San Francisco"), ("O", ".")],
     "[MASK] works at [MASK] in [MASK] .", "PER works at ORG in LOC ."),
    ([("O", "said"), ("PER", "Smith,"), ("O", "who"), ("LOC", ".Boston")],
     "said [MASK], who . [MASK]", "said PER, who . LOC"),                       # punctuation kept outside
    ([("DATE", "Monday"), ("MISC", "French")], "Monday [MASK]", "Monday MISC"),  # only the four types
])
def test_entity_masking_rules(groups, same, by_type):
    groups = [ndv.EntityGroup(*g) for g in groups]
    assert ndv.mask_entities(groups) == same
    assert ndv.mask_entities(groups, all_masks_same=False) == by_type


def test_grouping_and_search_worked_examples():
    words = ["John", "Doe", "met", "Jane", "in", "New", "York", "City", "."]
    labels = ["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC", "I-LOC", "I-LOC", "O"]
    assert ndv.group_entities(words, labels) == [ndv.EntityGroup("PER", "John Doe"), ndv.EntityGroup("O", "met"),
                                                 ndv.EntityGroup("PER", "Jane"), ndv.EntityGroup("O", "in"),
                                                 ndv.EntityGroup("LOC", "New York City"), ndv.EntityGroup("O", ".")]
    assert [g.entity_group for g in ndv.group_entities(["A", "B"], ["B-PER", "B-PER"])] == ["PER", "PER"]
    probs = np.array([[0.1, 0.9, 0.0], [0.3, 0.3, 0.4], [0.8, 0.1, 0.1]])  # word 0 = tokens 0, 1
    assert ndv.word_labels(probs, [0, 0, 1], ["O", "B-PER", "I-PER"]) == ["B-PER", "O"]  # its surest token
    bert = Tokenizer.from_vocab(VOCAB)
    assert ndv.model_text("a [MASK] b [SEP] c", bert) == "a [MASK] b  [SEP]  c"
    rng = np.random.default_rng(0)
    corpus, queries = rng.standard_normal((7, 4)), rng.standard_normal((3, 4))
    scores, index = ndv.search(queries, corpus, k=2)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_array_equal(index, np.argsort(-(unit(queries) @ unit(corpus).T), axis=1)[:, :2])
    hard = ndv.mine_hard_negatives(queries, corpus, [0, 1, 2], [0, 0, 1, 1, 2, 2, 3])
    sims = unit(queries) @ unit(corpus).T
    assert all(hard[i] == max((j for j in range(7) if [0, 0, 1, 1, 2, 2, 3][j] != i), key=lambda j: sims[i, j])
               for i in range(3))
    data = ndv.synthetic_news(seed=0, ner_sentences=10)
    assert data["relevance"].sum(1).min() >= 1 and len(data["corpus"]) == data["relevance"].shape[1]


def test_ner_grouping_equals_transformers_pipeline(tmp_path):
    """Our tagger -> word labels (max) -> groups equals transformers' pipeline("ner",
    aggregation_strategy="max", ignore_labels=[]) on the exported model and tokenizer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    import jaxformers as jf

    labels = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
    vocab = VOCAB + ["john", "miller", "bost", "##on", "visited", "##s"]
    tok = Tokenizer.from_vocab(vocab)
    module = Bert(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=32, head="token_classification", num_labels=5)
    variables = numpy_variables(module, jnp.zeros((1, 8), jnp.int32), seed=2)
    params = variables["params"]  # a sharper classifier: token-dependent labels, several groups per text
    variables = {"params": {**params, "classifier": jax.tree.map(lambda x: 30 * x, params["classifier"])}}
    path = jf.save_pretrained(module, variables, tmp_path / "tagger", tokenizer=tok,
                              id2label=dict(enumerate(labels)))
    texts = ["john miller visited boston .", "John Millers visited Boston. Zorg!", "a man is reading a book ."]
    ours = ndv.ner(Encoder(module, variables["params"], tok, max_length=16), texts, labels)
    pipe = transformers.pipeline("ner", model=str(path), aggregation_strategy="max", ignore_labels=[])
    for mine, theirs in zip(ours, pipe(texts)):
        assert [(g.entity_group, g.word) for g in mine] == [(t["entity_group"], t["word"]) for t in theirs]
    assert sum(len(g) for g in ours) > len(texts)  # not one group per text
    config = json.loads((path / "config.json").read_text())
    assert config["id2label"]["1"] == "B-PER"


def test_ccl_labels_examples_and_tokens(tiny):
    assert ccl.label_schedule(5) == {None: 0.0, 1: 0.8, 2: 0.6, 3: 0.4, 4: 0.2}
    dialog = [f"u{i}" for i in range(7)]
    examples = ccl.ccl_examples([dialog], window=5, seed=0, random_pool=["r"])
    assert len(examples) == 2 * (4 + 4 + 4)  # windows start at 0 and 1 (len - w of them), 12 examples each
    assert examples[:4] == [("[O] [BEFORE] u0", "[AFTER] u1", 0.8), ("[E] [BEFORE] u0", "[AFTER] u2", 0.6),
                            ("[O] [BEFORE] u0", "[AFTER] u3", 0.4), ("[E] [BEFORE] u0", "[AFTER] u4", 0.2)]
    assert examples[4] == ("[O] [BEFORE] u1", "[AFTER] u0", 0.0)  # reversed
    assert examples[5][2] == 0.0 and "r" in examples[5][0] + examples[5][1]  # one random negative per d
    assert ccl.ccl_examples([dialog], speaker_tokens=False, random_pool=["r"])[0] == ("[BEFORE] u0", "[AFTER] u1", 0.8)
    bi, _ = tiny
    grown = ccl.add_tokens(bi)
    table = grown.params["embeddings"]["word_embeddings"]["embedding"]
    assert grown.module.vocab_size == len(VOCAB) + 4 == table.shape[0]
    np.testing.assert_allclose(table[-1], bi.params["embeddings"]["word_embeddings"]["embedding"].mean(0), rtol=1e-6)
    ids = grown.tokenizer.encode(["[E] [BEFORE] a man"])["input_ids"][0].tolist()
    assert ids[1:3] == [len(VOCAB) + 3, len(VOCAB)] and bi.tokenizer.vocab_size == len(VOCAB)  # the copy grew
    from jaxformers.text.encoders import embed

    scores = ccl.greedy_curving(grown, ["a man .", "a cook ."], ["a boy .", "a girl .", "a lady ."])
    goals = embed(grown, ["[AFTER]  a boy .", "[AFTER]  a girl .", "[AFTER]  a lady ."])
    ctx = embed(grown, ["[O] [BEFORE]  a cook .", "[E] [BEFORE]  a man ."])
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(scores, (unit(ctx) @ unit(goals).T).sum(0), rtol=1e-5)
