"""jaxformers.text: packer, retrieval metrics, QA decoding, tokenizer wrapper."""
import numpy as np
import pytest

from jaxformers.text import (Tokenizer, decode_answer, mrr_at_k, ndcg_at_k, pack_sequences, pad_sequences,
                             recall_at_k, retrieval_metrics, segment_index, unpack)
from jaxformers.text.hf_config import ConfigError, bert_fields_from_config


def test_pack_sequences_places_every_token_once():
    rng = np.random.RandomState(0)
    seqs = [list(rng.randint(1, 50, n)) for n in rng.randint(1, 17, 40)]
    packed = pack_sequences(seqs, 32, max_segments=4)
    assert packed.input_ids.shape[1] == 32 and packed.num_segments <= 4
    total = sum(len(s) for s in seqs)
    assert (packed.segment_ids > 0).sum() == total
    assert packed.input_ids.shape[0] <= -(-total // 32) + 2  # first-fit decreasing is near optimal here
    for seq, got in zip(seqs, unpack(packed.input_ids, packed.placements)):
        np.testing.assert_array_equal(got, seq)
    for i, (r, slot) in enumerate(segment_index(packed.placements)):
        row, start, n = packed.placements[i]
        assert r == row and (packed.segment_ids[r, start:start + n] == slot + 1).all()
        np.testing.assert_array_equal(packed.position_ids[r, start:start + n], np.arange(n))
    fixed = pack_sequences(seqs[:3], 32, num_rows=4)
    assert fixed.input_ids.shape == (4, 32)
    with pytest.raises(ValueError, match="longer than row_length=4"):
        pack_sequences([[1] * 5], 4)
    with pytest.raises(ValueError, match="more than num_rows=1"):
        pack_sequences([[1] * 4, [2] * 4], 4, num_rows=1)
    padded = pad_sequences([[5, 6], [7]], pad_id=1)
    np.testing.assert_array_equal(padded["input_ids"], [[5, 6], [7, 1]])
    np.testing.assert_array_equal(padded["attention_mask"], [[1, 1], [1, 0]])


def test_retrieval_metrics_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.3],    # relevant doc 2 ranked 2nd
                       [0.2, 0.8, 0.7, 0.1],    # relevant docs 0 (4th... rank 3) and 1 (rank 1)
                       [0.1, 0.2, 0.3, 0.4]])   # nothing relevant: excluded from averages
    rel = np.array([[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(mrr_at_k(scores, rel, 10), (1 / 2 + 1) / 2, rtol=1e-6)
    np.testing.assert_allclose(mrr_at_k(scores, rel, 1), (0 + 1) / 2, rtol=1e-6)
    np.testing.assert_allclose(recall_at_k(scores, rel, 2), (1 + 0.5) / 2, rtol=1e-6)
    # query 0: dcg = 1/log2(3), idcg = 1; query 1: ranks 1 and 3 -> (1 + 1/log2(4)) / (1 + 1/log2(3))
    q0 = 1 / np.log2(3)
    q1 = (1 + 0.5) / (1 + 1 / np.log2(3))
    np.testing.assert_allclose(ndcg_at_k(scores, rel, 10), (q0 + q1) / 2, rtol=1e-6)
    ident = retrieval_metrics(np.eye(5) + 0.01, k=10)
    assert all(abs(float(v) - 1.0) < 1e-6 for v in ident.values())
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(np.zeros((2, 3)))


def test_decode_answer_returns_text_span():
    context = "The Eiffel Tower is in Paris, France."
    offsets = np.array([[0, 0], [0, 5], [0, 0], [0, 3], [4, 10], [11, 16], [17, 19], [20, 22], [23, 28], [28, 29],
                        [30, 36], [36, 37], [0, 0]])
    seq_ids = np.array([-1, 0, -1] + [1] * 9 + [-1])
    start = np.full(13, -5.0)
    end = np.full(13, -5.0)
    start[8], end[8] = 4.0, 3.0        # "Paris"
    start[1], end[1] = 9.0, 9.0        # a question token: must be ignored
    end[7] = 3.5                       # end before start: must be ignored
    ans = decode_answer(start, end, offsets, seq_ids, context)
    assert ans.text == "Paris" and context[ans.start:ans.end] == "Paris"
    end[10] = 3.9                      # a longer span "Paris, France" now scores higher
    assert decode_answer(start, end, offsets, seq_ids, context).text == "Paris, France"
    assert decode_answer(start, end, offsets, seq_ids, context, max_answer_tokens=1).text == "Paris"


def test_tokenizer_from_vocab_pairs_offsets_and_save(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s", "."]
    tok = Tokenizer.from_vocab(vocab)
    out = tok.encode(["The cats sat.", "on the mat"], ["the mat", "cat"], return_offsets=True)
    np.testing.assert_array_equal(out["input_ids"][0], [2, 5, 6, 10, 7, 11, 3, 5, 9, 3])
    np.testing.assert_array_equal(out["token_type_ids"][0], [0] * 7 + [1] * 3)
    np.testing.assert_array_equal(out["attention_mask"][1], [1] * 7 + [0] * 3)
    assert out["sequence_ids"][0].tolist() == [-1, 0, 0, 0, 0, 0, -1, 1, 1, -1]
    assert tuple(out["offsets"][0][3]) == (7, 8)  # "##s" of "cats"
    assert tok.encode(["the"] * 2, max_length=8, padding="max_length")["input_ids"].shape == (2, 8)
    assert tok.encode(["the cat sat on the mat"], max_length=4)["input_ids"].shape == (1, 4)
    with pytest.raises(ValueError, match="more than max_length=4"):
        tok.encode(["the cat sat on the mat"], max_length=4, truncation=False)
    assert tok.decode(out["input_ids"][1]) == "on the mat cat"
    assert (tok.pad_token_id, tok.mask_token_id, tok.vocab_size) == (0, 4, 12)
    tok.save(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    np.testing.assert_array_equal(again.encode(["The cats sat."])["input_ids"], tok.encode(["The cats sat."])["input_ids"])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "nothing")


def test_hf_config_fields_and_errors():
    fields = bert_fields_from_config({"model_type": "camembert", "architectures": ["CamembertForMaskedLM"],
                                      "hidden_size": 64, "pad_token_id": 1, "id2label": {"0": "a", "1": "b", "2": "c"}})
    assert fields["model_type"] == "roberta" and fields["head"] == "mlm" and fields["num_labels"] == 3
    with pytest.raises(ConfigError, match="position_embedding_type='relative_key'"):
        bert_fields_from_config({"model_type": "bert", "position_embedding_type": "relative_key"})
    with pytest.raises(ConfigError, match="is_decoder"):
        bert_fields_from_config({"model_type": "bert", "is_decoder": True})
    with pytest.raises(ConfigError, match="BertLMHeadModel"):
        bert_fields_from_config({"model_type": "bert", "architectures": ["BertLMHeadModel"]})


def test_roberta_bpe_files_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers.implementations import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    texts = ["The quick brown fox jumps over the lazy dog.", "Packing sequences saves compute.", "Hello JAX!"] * 20
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))  # vocab.json + merges.txt, no tokenizer.json
    ours = Tokenizer.from_pretrained(tmp_path)
    ref = transformers.RobertaTokenizer.from_pretrained(str(tmp_path))
    a, b = ["Hello fox, the dog!", "quick"], ["Packing saves.", "lazy"]
    got, want = ours.encode(a, b), ref(a, b, padding=True, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    assert ours.pad_token_id == ref.pad_token_id == 1
