"""BPDec: the gradual-unmasking schedule, depth 0 == BertForMaskedLM, parameter counts (pretraining and
exported), and masked-LM training with the decoder, then export to a plain BERT."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.models.bert import Bert
from jaxformers.models.bpdec import BPDec, export_encoder, gua_masks
from tests.helpers import fast_jit, numpy_variables

ENCODER = dict(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=24)


def test_gradual_unmasking_schedule():
    targets = jnp.zeros((4, 40), bool).at[:, ::3].set(True)
    valid = jnp.ones((4, 40), bool).at[1, 30:].set(False)
    m1, m2 = np.asarray(gua_masks(targets, valid, 2, jax.random.key(0)))
    t, v = np.asarray(targets), np.asarray(valid)
    eye = np.eye(40, dtype=bool)
    for m in (m1, m2):
        assert m[:, eye].all()                                  # a position always sees itself
        assert m.transpose(0, 2, 1)[~t & v].all()               # non-target keys: visible to every query
        assert not (m[1][:, 30:] & ~eye[:, 30:]).any()          # padding keys: never
    assert (m2 == (v[:, None, :] | eye)).all()                  # last layer: every real key
    hidden = (t & v & ~m1[:, 5, :])                             # targets query 5 cannot see in layer 1
    hidden[:, 5] = False
    assert 0.3 < hidden[t].mean() < 0.7                         # about half of them (n = 2)


@pytest.fixture(scope="module")
def model_and_batch():
    from jaxformers.text.mlm import mask_tokens

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 97, (8, 20)).astype(np.int32)
    mask = (np.arange(20)[None] < rng.integers(12, 21, (8, 1))).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    corrupted, labels = mask_tokens(ids, rng, mask_id=4, vocab_size=97, special_ids=[0, 1, 2, 3, 4])
    module = BPDec(encoder=ENCODER, decoder_layers=2)
    variables = numpy_variables(module, jnp.asarray(ids))
    return module, variables, ids, mask, corrupted, labels


def test_depth_zero_is_bert_for_masked_lm(model_and_batch):
    module, variables, ids, mask, *_ = model_and_batch
    bert, exported = export_encoder(module, variables)
    assert isinstance(bert, Bert) and bert.head == "mlm" and "decoder_0" not in exported["params"]
    plain = module.clone(decoder_layers=0, encoder_output_prob=0.0)
    a, b = fast_jit(lambda v, e, i, m: (plain.apply(v, i, m), bert.apply(e, i, m)))(variables, exported, ids, mask)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_param_counts():
    assert jf.count_params("bpdec_bert_base") == 123_690_042
    module = jf.create_model("bpdec_bert_base")
    bert = export_encoder(module, {"params": {"bert": {}, "mlm": {}}})[0]
    assert jf.count_params(bert) == 109_514_298
    torch = pytest.importorskip("torch")
    t = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = t.BertForMaskedLM(t.BertConfig())
    assert sum(p.numel() for p in hf.parameters()) == 109_514_298


def test_mlm_training_with_the_decoder_and_export(model_and_batch):
    """The loss falls with GUA and output randomness on (train mode); the exported BERT predicts too."""
    from jaxformers.text.mlm import mlm_cross_entropy

    module, variables, ids, mask, corrupted, labels = model_and_batch
    tx = optax.adam(3e-3)

    def step(params, opt_state, key):
        def loss(p):
            logits = module.apply({"params": p}, corrupted, mask, None, labels, train=True, rngs={"dropout": key})
            return mlm_cross_entropy(logits, labels)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value, grads

    step = fast_jit(step)
    params, opt_state, losses = variables["params"], tx.init(variables["params"]), []
    for i in range(30):
        params, opt_state, value, grads = step(params, opt_state, jax.random.key(i))
        losses.append(float(value))
    assert np.mean(losses[-3:]) < 0.65 * losses[0], losses
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["decoder_1"]))
    bert, exported = export_encoder(module, {"params": params})
    logits = fast_jit(bert.apply)(exported, corrupted, mask)
    assert logits.shape == (8, 20, 97) and np.isfinite(np.asarray(logits)).all()
