"""Live parity with Hugging Face transformers (PyTorch, random perturbed weights, tiny configs)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxformers.convert import StateDict  # noqa: E402
from jaxformers.models.bert import Bert, from_pretrained, save_pretrained  # noqa: E402
from jaxformers.models.bert_convert import convert_hf_bert  # noqa: E402
from flax.traverse_util import unflatten_dict  # noqa: E402

TOL = 1e-4
TINY = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=40)


def _hf(cls_name, model_type="bert", **extra):
    kw = dict(TINY, **extra)
    if model_type == "bert":
        config = transformers.BertConfig(**kw)
    else:
        kw.setdefault("max_position_embeddings", 42)
        kw.update(pad_token_id=1, layer_norm_eps=1e-5, type_vocab_size=1)
        config = getattr(transformers, {"roberta": "RobertaConfig", "camembert": "CamembertConfig"}[model_type])(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # perturb: HF inits biases to 0 and LayerNorms to 1, which would hide mix-ups
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, config


def _ours(model, config, **fields):
    mt = "bert" if config.model_type == "bert" else "roberta"
    module = Bert(**{k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                     "num_attention_heads", "intermediate_size",
                                                     "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
                                                     "pad_token_id")}, model_type=mt, **fields)
    sd = StateDict({k: v.detach().numpy() for k, v in model.state_dict().items()})
    flat = convert_hf_bert(sd, module)
    assert not [k for k in sd.unused()], sd.unused()
    return module, unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})


def _inputs(pad_id=0, types=True, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, TINY["vocab_size"], (3, 13))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = pad_id
    tt = (np.arange(13)[None] >= rng.randint(3, 8, (3, 1))).astype(np.int64) if types else np.zeros_like(ids)
    return ids, mask, tt


def _run_torch(model, ids, mask, tt=None):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if tt is not None:
        kw["token_type_ids"] = torch.tensor(tt)
    with torch.no_grad():
        return model(**kw)


def _close(ours, ref, mask=None):
    ours, ref = np.asarray(ours), ref.detach().numpy()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref)
    if mask is not None:
        err = err[mask.astype(bool)]
    assert err.max() < TOL, err.max()


def test_bert_model_matches_transformers():
    model, config = _hf("BertModel")
    module, variables = _ours(model, config)
    ids, mask, tt = _inputs()
    ref = _run_torch(model, ids, mask, tt)
    out = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(tt))
    _close(out["last_hidden_state"], ref.last_hidden_state, mask)
    _close(out["pooler_output"], ref.pooler_output)


@pytest.mark.parametrize("model_type", ["roberta", "camembert"])
def test_roberta_and_camembert_match_transformers(model_type):
    prefix = "Roberta" if model_type == "roberta" else "Camembert"
    model, config = _hf(prefix + "Model", model_type)
    module, variables = _ours(model, config)
    ids, mask, _ = _inputs(pad_id=1, types=False)
    ref = _run_torch(model, ids, mask)
    out = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    _close(out["last_hidden_state"], ref.last_hidden_state, mask)
    _close(out["pooler_output"], ref.pooler_output)
    # RoBERTa's MLM head (gelu + layer_norm + tied decoder) too
    mlm, config = _hf(prefix + "ForMaskedLM", model_type)
    module, variables = _ours(mlm, config, head="mlm")
    _close(module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
           _run_torch(mlm, ids, mask).logits, mask)


def test_masked_lm_and_pretraining_heads_match_transformers():
    ids, mask, tt = _inputs()
    model, config = _hf("BertForMaskedLM")
    module, variables = _ours(model, config, head="mlm")
    _close(module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(tt)),
           _run_torch(model, ids, mask, tt).logits, mask)
    model, config = _hf("BertForPreTraining")
    module, variables = _ours(model, config, head="pretraining")
    out = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(tt))
    ref = _run_torch(model, ids, mask, tt)
    _close(out["mlm_logits"], ref.prediction_logits, mask)
    _close(out["nsp_logits"], ref.seq_relationship_logits)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_qa_token_and_sequence_classification_heads_match_transformers(model_type):
    prefix = "Bert" if model_type == "bert" else "Roberta"
    ids, mask, tt = _inputs(pad_id=0 if model_type == "bert" else 1, types=model_type == "bert")
    tt_arg = tt if model_type == "bert" else None
    kw = dict(attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(tt))

    model, config = _hf(prefix + "ForQuestionAnswering", model_type)
    module, variables = _ours(model, config, head="qa")
    out, ref = module.apply(variables, jnp.asarray(ids), **kw), _run_torch(model, ids, mask, tt_arg)
    _close(out["start_logits"], ref.start_logits, mask)
    _close(out["end_logits"], ref.end_logits, mask)

    model, config = _hf(prefix + "ForTokenClassification", model_type, num_labels=5)
    module, variables = _ours(model, config, head="token_classification", num_labels=5)
    _close(module.apply(variables, jnp.asarray(ids), **kw), _run_torch(model, ids, mask, tt_arg).logits, mask)

    model, config = _hf(prefix + "ForSequenceClassification", model_type, num_labels=3)
    module, variables = _ours(model, config, head="classification", num_labels=3)
    _close(module.apply(variables, jnp.asarray(ids), **kw), _run_torch(model, ids, mask, tt_arg).logits)


def test_export_to_hf_directory_round_trips(tmp_path):
    """Our random weights -> save_pretrained -> transformers loads them and agrees; and back."""
    for head, cls, extra in [("pretraining", "BertForPreTraining", {}),
                             ("classification", "RobertaForSequenceClassification", {"model_type": "roberta"})]:
        fields = dict(TINY, head=head, num_labels=2, **extra)
        if extra:
            fields.update(pad_token_id=1, max_position_embeddings=42, type_vocab_size=1)
        module = Bert(**fields)
        ids, mask, _ = _inputs(pad_id=module.pad_token_id, types=False)
        variables = nn.unbox(jax.jit(module.init)(jax.random.key(1), jnp.asarray(ids)))
        rng = np.random.RandomState(2)
        variables = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                                 variables)
        d = tmp_path / head
        save_pretrained(module, variables, d)
        hf = getattr(transformers, cls).from_pretrained(d).eval()
        ours = module.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
        ref = _run_torch(hf, ids, mask)
        if head == "pretraining":
            _close(ours["mlm_logits"], ref.prediction_logits, mask)
            _close(ours["nsp_logits"], ref.seq_relationship_logits)
        else:
            _close(ours, ref.logits)
        module2, variables2 = from_pretrained(d)
        assert module2.head == head and module2.model_type == module.model_type
        same = jax.tree.map(lambda a, b: bool(np.allclose(a, b)), variables, variables2)
        assert all(jax.tree.leaves(same))


def test_pytorch_model_bin_directory_loads(tmp_path):
    """A transformers directory saved as pytorch_model.bin (read with weights_only) loads too."""
    model, config = _hf("BertForTokenClassification", num_labels=4)
    model.config.architectures = ["BertForTokenClassification"]
    model.config.save_pretrained(tmp_path)  # a legacy directory: config.json + pytorch_model.bin
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    module, variables = from_pretrained(tmp_path)
    assert module.head == "token_classification" and module.num_labels == 4
    ids, mask, tt = _inputs()
    out = module.apply(variables, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tt))
    _close(out, _run_torch(model, ids, mask, tt).logits, mask)
