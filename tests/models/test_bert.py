"""BERT family: parameter counts, packed == padded, sharded == single device, Longformer option, errors."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers import count_params, create_model
from jaxformers.convert.pretrained import CheckpointMismatchError
from jaxformers.models.bert import Bert, from_pretrained, positions_in_segments, save_pretrained
from jaxformers.text import pack_sequences, pad_sequences, segment_index, unpack
from jaxformers.text.hf_config import ConfigError
from tests.helpers import fast_jit, numpy_variables

TINY = dict(vocab_size=67, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24)

# Parameter counts of the Hugging Face classes built from each checkpoint's config.json (verified live
# below on torch's meta device when transformers is installed). Bioformer-8L's is its README's number.
PUBLISHED = {
    ("bert_base_uncased", None): 109_482_240,        # BertModel
    ("bert_base_uncased", "pretraining"): 110_106_428,  # BertForPreTraining
    ("bert_large_uncased", "pretraining"): 336_226_108,
    ("roberta_base", "mlm"): 124_697_433,             # RobertaForMaskedLM
    ("bioformer_8l", "pretraining"): 42_820_610,      # README: "42,820,610"
    ("bioformer_16l", "pretraining"): 41_699_074,
    ("minilm_l6", "embedding"): 22_713_216,           # BertModel incl. pooler (the checkpoint's tensors)
}


def test_param_counts_equal_published():
    for (name, head), expected in PUBLISHED.items():
        got = count_params(name, head=head) if head is None else count_params(name)
        assert create_model(name).head == head or head is None
        assert got == expected, (name, head, got, expected)


def test_param_counts_equal_transformers_classes():
    torch = pytest.importorskip("torch")
    t = pytest.importorskip("transformers")
    configs = {
        "bert_base_uncased": (t.BertConfig(), t.BertForPreTraining),
        "bert_large_uncased": (t.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                            intermediate_size=4096), t.BertForPreTraining),
        "roberta_base": (t.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                         layer_norm_eps=1e-5), t.RobertaForMaskedLM),
        "bioformer_8l": (t.BertConfig(vocab_size=32768, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                      intermediate_size=2048), t.BertForPreTraining),
        "bioformer_16l": (t.BertConfig(vocab_size=32768, hidden_size=384, num_hidden_layers=16, num_attention_heads=6,
                                       intermediate_size=1536, max_position_embeddings=1024), t.BertForPreTraining),
        "minilm_l6": (t.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                   intermediate_size=1536), t.BertModel),
    }
    with torch.device("meta"):
        for name, (config, cls) in configs.items():
            hf = sum(p.numel() for p in cls(config).parameters())
            assert PUBLISHED[(name, create_model(name).head)] == hf, (name, hf)


def test_positions_restart_per_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_in_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_packed_equals_padded_per_sequence(model_type):
    extra = dict(model_type="roberta", pad_token_id=1, max_position_embeddings=26) if model_type == "roberta" else {}
    rng = np.random.RandomState(0)
    lengths = [9, 3, 7, 5, 2, 11, 4]
    seqs = [list(rng.randint(3, TINY["vocab_size"], n)) for n in lengths]
    types = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]
    pad_id = extra.get("pad_token_id", 0)
    packed = pack_sequences(seqs, 16, token_type_ids=types if model_type == "bert" else None, pad_id=pad_id)
    padded = pad_sequences(seqs, pad_id=pad_id, token_type_ids=types if model_type == "bert" else None)
    assert packed.input_ids.shape[0] < len(seqs) and packed.fill > 0.7
    module = Bert(**{**TINY, **extra}, head="pretraining", add_pooler=True)
    variables = numpy_variables(module, jnp.asarray(padded["input_ids"]))
    S = packed.num_segments
    run = fast_jit(lambda v, b, **kw: module.apply(v, **b, return_features=True, **kw), static_argnames="num_segments")
    out_packed = run(variables, {k: jnp.asarray(v) for k, v in packed.model_inputs().items()}, num_segments=S)
    out_padded = run(variables, {k: jnp.asarray(v) for k, v in padded.items()})
    for key in ("last_hidden_state", "mlm_logits"):
        per_seq = unpack(out_packed[key], packed.placements)
        for i, n in enumerate(lengths):
            np.testing.assert_allclose(per_seq[i], out_padded[key][i, :n], atol=1e-5, rtol=1e-5)
    # sequence-level outputs: (rows, num_segments, ...) in packed form
    for i, (r, slot) in enumerate(segment_index(packed.placements)):
        np.testing.assert_allclose(out_packed["pooler_output"][r, slot], out_padded["pooler_output"][i], atol=1e-5)
        np.testing.assert_allclose(out_packed["nsp_logits"][r, slot], out_padded["nsp_logits"][i], atol=1e-5)


def test_packed_sentence_embeddings_equal_padded():
    rng = np.random.RandomState(1)
    seqs = [list(rng.randint(3, TINY["vocab_size"], n)) for n in (6, 3, 9, 4)]
    packed, padded = pack_sequences(seqs, 12), pad_sequences(seqs)
    module = Bert(**TINY, head="embedding")
    variables = numpy_variables(module, jnp.asarray(padded["input_ids"]))
    run = fast_jit(lambda v, ids, **kw: module.apply(v, ids, **kw), static_argnames="num_segments")
    emb_padded = run(variables, padded["input_ids"], attention_mask=padded["attention_mask"])
    emb_packed = run(variables, packed.input_ids, segment_ids=packed.segment_ids, num_segments=packed.num_segments)
    for i, (r, slot) in enumerate(segment_index(packed.placements)):
        np.testing.assert_allclose(emb_packed[r, slot], emb_padded[i], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb_padded, axis=-1), 1.0, atol=1e-5)


def test_sharded_equals_single_device():
    from jaxformers.sharding import activate, check_sharded, init_sharded, make_mesh, shard_batch

    module = Bert(**{**TINY, "vocab_size": 64}, head="pretraining")
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (8, 12)))
    mask = jnp.asarray((np.arange(12)[None] < np.array([12, 9, 5, 12, 7, 3, 12, 10])[:, None]).astype(np.int32))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = init_sharded(module, jax.random.key(0), ids, mesh=mesh)
    check_sharded(sharded, mesh, min_size=1024)
    emb = sharded["params"]["embeddings"]["word_embeddings"]["embedding"]
    assert not emb.sharding.is_fully_replicated  # vocab x embed split over tensor x fsdp
    single = jax.device_get(sharded)
    fn = fast_jit(lambda v, i, m: module.apply(v, i, attention_mask=m))
    ref = fn(single, ids, mask)
    with activate(mesh):
        out = fn(sharded, *shard_batch((ids, mask), mesh))
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), atol=2e-5, rtol=2e-5)


def test_local_global_attention_option():
    ids = jnp.asarray(np.random.RandomState(2).randint(3, TINY["vocab_size"], (2, 20)))
    one_layer = {**TINY, "num_hidden_layers": 1}
    dense = Bert(**one_layer)
    variables = numpy_variables(dense, ids)

    def run(module, x):
        return fast_jit(lambda v, x: module.apply(v, x)["last_hidden_state"])(variables, x)

    ref = run(dense, ids)
    wide = run(Bert(**one_layer, attention_window=32, global_tokens=1), ids)
    np.testing.assert_allclose(wide, ref, atol=1e-5)
    local = Bert(**one_layer, attention_window=2, global_tokens=1)
    base = run(local, ids)
    changed = run(local, ids.at[:, 12].set(5))
    moved = np.abs(np.asarray(changed - base)).max(-1)[0]
    # one layer: token 12 reaches tokens 10..14 and the global token 0, nobody else
    assert set(np.nonzero(moved > 1e-6)[0]) == {0, 10, 11, 12, 13, 14}


def test_bad_inputs_raise_clear_errors(tmp_path):
    module = Bert(**TINY)
    ids = jnp.zeros((1, 5), jnp.int32)
    variables = nn.unbox(fast_jit(module.init)(jax.random.key(0), ids))
    with pytest.raises(ValueError, match=r"input_ids holds ids in \[0, 67\].*67 entries"):
        module.apply(variables, ids.at[0, 2].set(67))
    with pytest.raises(ValueError, match="input_ids has length 25 but the position table holds 24"):
        module.apply(variables, jnp.zeros((1, 25), jnp.int32))
    with pytest.raises(ValueError, match="token_type_ids"):
        module.apply(variables, ids, token_type_ids=jnp.full((1, 5), 2))
    with pytest.raises(ValueError, match=r"position_ids hold positions in \[0, 30\].*max_position_embeddings=24"):
        module.apply(variables, ids, position_ids=jnp.array([[0, 1, 2, 3, 30]]))
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        module.apply(variables, ids, attention_mask=jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="head must be one of"):
        Bert(**TINY, head="lm").init(jax.random.key(0), ids)
    # a config.json of another architecture
    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="model_type='gpt2'.*GPT2LMHeadModel"):
        from_pretrained(gpt)
    # a checkpoint that does not fit its config.json
    good = tmp_path / "good"
    save_pretrained(module, variables, good)
    cfg = json.loads((good / "config.json").read_text())
    cfg["hidden_size"], cfg["num_attention_heads"] = 48, 4
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="shape mismatch.*word_embeddings"):
        from_pretrained(good)
    cfg["hidden_size"], cfg["num_hidden_layers"] = 32, 3
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="missing in the checkpoint.*layer_2"):
        from_pretrained(good)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)


@pytest.mark.slow
def test_pallas_kernel_paths_equal_xla():
    """attention_impl="pallas" (interpret mode on CPU): dense with padding, and Longformer-style."""
    cfg = {**TINY, "num_hidden_layers": 1}
    ids = jnp.asarray(np.random.RandomState(3).randint(3, TINY["vocab_size"], (2, 20)))
    mask = jnp.asarray((np.arange(20)[None] < np.array([[20], [13]])).astype(np.int32))
    valid = np.asarray(mask).astype(bool)
    variables = numpy_variables(Bert(**cfg), ids)
    for extra in ({}, {"attention_window": 3, "global_tokens": 2}):
        ref, out = (fast_jit(lambda v, m=Bert(**cfg, **extra, attention_impl=impl): m.apply(v, ids, mask))(variables)
                    for impl in ("xla", "pallas"))
        np.testing.assert_allclose(np.asarray(out["last_hidden_state"])[valid],
                                   np.asarray(ref["last_hidden_state"])[valid], atol=1e-5)


def test_cross_encoder_is_the_one_label_classifier_and_legacy_names_load():
    from jaxformers.convert import StateDict
    from jaxformers.models.bert_convert import convert_hf_bert

    ids = jnp.asarray(np.random.RandomState(4).randint(3, TINY["vocab_size"], (3, 9)))
    clf = Bert(**TINY, head="classification", num_labels=1)
    variables = numpy_variables(clf, ids)
    cross = Bert(**TINY, head="cross_encoder")
    np.testing.assert_allclose(cross.apply(variables, ids), clf.apply(variables, ids)[:, 0], atol=1e-6)
    assert cross.num_classes == 1 and clf.num_classes == 1
    # TF-converted checkpoints name LayerNorm parameters gamma / beta
    from jaxformers.models.bert_convert import hf_tensors

    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in hf_tensors(clf, variables)}
    assert any(k.endswith("LayerNorm.gamma") for k in sd)
    flat = convert_hf_bert(StateDict(sd), clf)
    np.testing.assert_array_equal(flat["params/layer_0/attn_norm/scale"],
                                  variables["params"]["layer_0"]["attn_norm"]["scale"])
