"""Entity-level F1 (seqeval's rules), SQuAD EM/F1, Spearman and QA span targets against worked examples."""
import jax
import numpy as np
import pytest

from jaxformers.text import Tokenizer, char_span_to_tokens, entity_f1, get_entities, spearman, squad_scores
from jaxformers.text.metrics import entity_counts_jnp, normalize_answer, squad_metrics, tag_codes


@pytest.mark.parametrize("tags, entities", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["I-PER", "I-PER", "I-LOC", "O"], [("PER", 0, 1), ("LOC", 2, 2)]),        # IOB1: a type change starts a chunk
    (["B-PER", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 1)]),
    (["O", "I-PER", "B-PER"], [("PER", 1, 1), ("PER", 2, 2)]),                 # B always starts a new chunk
    (["S-PER", "B-LOC", "E-LOC", "O", "E-ORG"], [("PER", 0, 0), ("LOC", 1, 2), ("ORG", 4, 4)]),  # IOBES
    (["B-MISC", "E-MISC", "I-MISC"], [("MISC", 0, 1), ("MISC", 2, 2)]),       # I after E opens a chunk
])
def test_entities_follow_seqeval_rules(tags, entities):
    assert get_entities(tags) == entities


def test_entity_f1_worked_example_and_jit_counts():
    # seqeval's README example: the MISC span is one token too long, PER is right -> P = R = F1 = 0.5
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = entity_f1(y_true, y_pred)
    assert scores["precision"] == scores["recall"] == scores["f1"] == 0.5
    assert scores["f1/PER"] == 1.0 and scores["f1/MISC"] == 0.0
    assert entity_f1([["O", "O"]], [["O", "O"]])["f1"] == 0.0  # nothing to find: 0 (seqeval's zero_division)

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-PER"]
    prefix_of, type_of = tag_codes(labels)
    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 7, (64, 12)), rng.integers(0, 7, (64, 12))
    keep = rng.random((64, 12)) < 0.8  # e.g. first sub-tokens of words
    n_true, n_pred, n_correct = jax.jit(entity_counts_jnp, static_argnums=(2, 3))(
        true, pred, tuple(prefix_of), tuple(type_of), keep)
    for i in range(64):
        t = set(get_entities([labels[j] for j in true[i][keep[i]]]))
        p = set(get_entities([labels[j] for j in pred[i][keep[i]]]))
        assert (int(n_true[i]), int(n_pred[i]), int(n_correct[i])) == (len(t), len(p), len(t & p)), i


def test_squad_scores_worked_examples():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    s = squad_scores("the cat sat", ["a cat sat down", "dog"])
    assert s["exact_match"] == 0.0 and s["precision"] == 1.0 and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(0.8)
    assert squad_scores("An apple.", ["apple", "pear"]) == {"exact_match": 1.0, "f1": 1.0, "precision": 1.0,
                                                           "recall": 1.0}
    assert squad_metrics(["apple", "x"], [["apple"], ["y"]])["exact_match"] == 0.5
    with pytest.raises(ValueError, match="non-empty list"):
        squad_scores("a", "a")


def test_spearman_equals_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    x = [1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5]
    y = [2.0, 1.0, 4.0, 4.0, 3.0, 6.0, 6.0, 0.0]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_answer_span_targets_and_errors():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "where", "is", "the", "capital", "?", "ankara", "of",
             "turkey", "."]
    tok = Tokenizer.from_vocab(vocab)
    context = "The capital of Turkey is Ankara."
    enc = tok.encode(["Where is the capital?"], [context], return_offsets=True)
    start, end = char_span_to_tokens(enc["offsets"][0], enc["sequence_ids"][0], context.index("Ankara"),
                                     context.index("Ankara") + 6)
    assert tok.decode(enc["input_ids"][0][start:end + 1]) == "ankara"
    start, end = char_span_to_tokens(enc["offsets"][0], enc["sequence_ids"][0], 0, 14)
    assert tok.decode(enc["input_ids"][0][start:end + 1]) == "the capital of"
    with pytest.raises(ValueError, match=r"answer span \[30, 40\) is outside the encoded context"):
        char_span_to_tokens(enc["offsets"][0], enc["sequence_ids"][0], 30, 40)
