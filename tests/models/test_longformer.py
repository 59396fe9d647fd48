"""Longformer: live parity with transformers (local / global attention, window padding), pallas == xla,
HF directories both ways, parameter counts, memory linear in length and window, sharding, errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.models.longformer import Longformer, question_global_mask
from jaxformers.text.hf_config import ConfigError
from tests.helpers import FAST_COMPILE, fast_jit, numpy_variables

TINY = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=70, attention_window=(4, 6))
# 21 tokens: not a multiple of the largest window (6), so transformers pads inside its forward.
IDS = np.random.RandomState(0).randint(3, 101, (3, 21))
MASK = (np.arange(21)[None] < np.array([21, 15, 9])[:, None]).astype(np.int64)
IDS[MASK == 0] = 1
GLOBAL = np.zeros_like(IDS)
GLOBAL[:, 0] = 1
GLOBAL[0, [5, 17]] = 1  # rows hold 3, 2 and 1 global tokens: the global slots are padded per row
GLOBAL[1, 3] = 1


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A perturbed random transformers LongformerModel saved as a directory, our load of it, and both
    models' outputs without and with global tokens (ours jitted: xla, and pallas with globals)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.helpers import perturbed_torch_model

    config = transformers.LongformerConfig(**{**TINY, "attention_window": list(TINY["attention_window"])},
                                           pad_token_id=1, type_vocab_size=1)
    model = perturbed_torch_model(lambda: transformers.LongformerModel(config))
    path = tmp_path_factory.mktemp("longformer")
    model.save_pretrained(path)

    def run(m, global_mask):
        with torch.no_grad():
            out = m(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                    global_attention_mask=None if global_mask is None else torch.tensor(global_mask))
        return out.last_hidden_state.numpy(), out.pooler_output.numpy()

    module, variables = jf.from_pretrained(path)
    ours = {}
    for name, global_mask in (("local", None), ("global", GLOBAL)):
        fn = fast_jit(lambda v, ids, mask: module.apply(v, ids, mask, global_mask))
        ours[name] = fn(variables, IDS, MASK)
    pallas = module.clone(attention_impl="pallas")
    ours["pallas"] = fast_jit(lambda v, ids, mask: pallas.apply(v, ids, mask, GLOBAL))(variables, IDS, MASK)
    refs = {"local": run(model, None), "global": run(model, GLOBAL)}
    return transformers, path, model, run, module, variables, ours, refs


@pytest.mark.parametrize("case", ["local", "global"])
def test_matches_transformers(hf, case):
    _, _, _, _, module, _, ours, refs = hf
    assert isinstance(module, Longformer) and module.windows == (4, 6) and module.head is None
    real = MASK.astype(bool)
    ref_hidden, ref_pooled = refs[case]
    assert np.abs(np.asarray(ours[case]["last_hidden_state"]) - ref_hidden)[real].max() < 1e-4
    np.testing.assert_allclose(ours[case]["pooler_output"], ref_pooled, atol=1e-4)
    if case == "global":  # the global tokens matter (both their rows and their columns)
        assert np.abs(ref_hidden - refs["local"][0])[real].max() > 1e-2


def test_pallas_equals_xla_and_export_loads_in_transformers(hf, tmp_path):
    transformers, _, model, run, module, variables, ours, _ = hf
    pallas, xla = (np.asarray(ours[k]["last_hidden_state"]) for k in ("pallas", "global"))
    assert np.abs(pallas - xla)[MASK.astype(bool)].max() < 1e-5
    out = jf.save_pretrained(module, variables, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["attention_window"] == [4, 6]
    again = transformers.LongformerModel.from_pretrained(out).eval()
    np.testing.assert_array_equal(run(again, GLOBAL)[0], run(model, GLOBAL)[0])


def test_task_heads_load_from_transformers_classes(hf, tmp_path):
    """QA's default global attention (the question, before the first </s>) and the MLM head, live."""
    transformers, path = hf[:2]
    torch = pytest.importorskip("torch")
    from tests.helpers import perturbed_torch_model

    config = transformers.LongformerConfig.from_pretrained(path)
    ids = IDS.copy()
    ids[:, 4] = 2  # the question is tokens 0..3
    ids[:, 10] = 2
    ids[:, 20] = 2
    for cls, head in (("LongformerForQuestionAnswering", "qa"), ("LongformerForMaskedLM", "mlm")):
        ref_model = perturbed_torch_model(lambda: getattr(transformers, cls)(config))
        ref_model.save_pretrained(tmp_path / cls)
        module, variables = jf.from_pretrained(tmp_path / cls)
        assert module.head == head
        module = module.clone(max_global_tokens=4)  # QA's default global mask is traced under jit
        with torch.no_grad():
            ref = ref_model(input_ids=torch.tensor(ids))
        out = fast_jit(module.apply)(variables, ids)
        if head == "qa":
            assert int(question_global_mask(jnp.asarray(ids), 2).sum()) == 3 * 4
            np.testing.assert_allclose(out["start_logits"], ref.start_logits.numpy(), atol=1e-4)
            np.testing.assert_allclose(out["end_logits"], ref.end_logits.numpy(), atol=1e-4)
        else:
            np.testing.assert_allclose(out, ref.logits.numpy(), atol=1e-4)


PARAMS = {"longformer_base_4096": 148_659_456, "longformer_large_4096": 434_600_960}


def test_param_counts_equal_transformers():
    for name, expected in PARAMS.items():
        assert jf.count_params(name) == expected
    torch = pytest.importorskip("torch")
    t = pytest.importorskip("transformers")
    common = dict(attention_window=512, max_position_embeddings=4098, vocab_size=50265, type_vocab_size=1,
                  pad_token_id=1, layer_norm_eps=1e-5)
    with torch.device("meta"):
        base = t.LongformerModel(t.LongformerConfig(**common))
        large = t.LongformerModel(t.LongformerConfig(**common, hidden_size=1024, num_hidden_layers=24,
                                                     num_attention_heads=16, intermediate_size=4096))
    assert sum(p.numel() for p in base.parameters()) == PARAMS["longformer_base_4096"]
    assert sum(p.numel() for p in large.parameters()) == PARAMS["longformer_large_4096"]


def _temp_bytes(length: int, window: int) -> int:
    """Compiled temporary memory of a forward + backward (1 layer, width 32, 2 heads, <s> global)."""
    module = Longformer(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=length + 2, attention_window=window,
                        max_global_tokens=1)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))

    def loss(v, ids):
        global_mask = (jnp.arange(length) == 0)[None].astype(jnp.int32)
        return module.apply(v, ids, None, global_mask)["last_hidden_state"].sum()

    compiled = jax.jit(jax.grad(loss)).lower(variables, ids).compile(FAST_COMPILE)
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_is_linear_in_length_and_window():
    short, long, wide = _temp_bytes(2048, 64), _temp_bytes(4096, 64), _temp_bytes(4096, 128)
    assert 1.8 < long / short < 2.3  # linear in length (quadratic would be 4x)
    assert 1.0 < wide / long < 2.0  # grows with the window, at most linearly
    assert long < 4096 * 4096 * 2 * 4 / 2  # below half of one dense (heads, L, L) float32 score matrix


def test_jit_grad_with_traced_global_mask(hf):
    """Under jit the global mask is traced: max_global_tokens sizes the global slots (rows hold 1-3)."""
    module, variables, ours = hf[4].clone(max_global_tokens=4), hf[5], hf[6]

    def loss(v, ids, mask, global_mask):
        hidden = module.apply(v, ids, mask, global_mask)["last_hidden_state"]
        return jnp.sum(hidden ** 2 * mask[..., None]), hidden

    (_, hidden), grads = fast_jit(jax.value_and_grad(loss, has_aux=True))(variables, IDS, MASK, GLOBAL)
    assert np.abs(np.asarray(hidden) - np.asarray(ours["global"]["last_hidden_state"]))[MASK.astype(bool)].max() < 1e-5
    g = grads["params"]["layer_0"]["attn"]
    assert all(np.isfinite(x).all() and np.abs(x).max() > 0 for x in jax.tree.leaves(g))  # global projections too


def test_sharded_equals_single_device():
    from jaxformers.sharding import activate, make_mesh, shard_batch
    from tests.helpers import shard_like_init

    module = Longformer(**TINY, max_global_tokens=3)
    ids = np.tile(IDS, (3, 1))[:8]
    mask, global_mask = np.tile(MASK, (3, 1))[:8], np.tile(GLOBAL, (3, 1))[:8]
    variables = numpy_variables(module, jnp.asarray(ids))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = shard_like_init(module, variables, jnp.asarray(ids), mesh)
    fn = jax.jit(lambda v, i, m, g: module.apply(v, i, m, g)["last_hidden_state"])
    ref = fn(variables, ids, mask, global_mask)
    with activate(mesh):
        out = fn(sharded, *shard_batch((jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(global_mask)), mesh))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_bad_input_is_a_clear_error(tmp_path):
    ids = jnp.asarray(IDS)
    with pytest.raises(ValueError, match="attention_window of layer 1 must be a positive even number"):
        Longformer(**{**TINY, "attention_window": (4, 5)}).init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="attention_window of layer 0 is 80, longer than the 68 positions"):
        Longformer(**{**TINY, "attention_window": 80}).init(jax.random.key(0), ids)
    module = Longformer(**TINY)
    variables = jax.eval_shape(module.init, jax.random.key(0), ids)
    with pytest.raises(ValueError, match=r"global_attention_mask must have the shape of input_ids \(3, 21\); got \(3, 20\)"):
        module.apply(variables, ids, None, jnp.zeros((3, 20), jnp.int32))
    with pytest.raises(ValueError, match="set Longformer\\(max_global_tokens=...\\)"):
        jax.jit(lambda g: module.apply(variables, ids, None, g))(jnp.asarray(GLOBAL))
    with pytest.raises(ValueError, match="a row has 3 global tokens, more than max_global_tokens=2"):
        module.clone(max_global_tokens=2).apply(variables, ids, None, GLOBAL)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    from jaxformers.models.longformer import from_pretrained

    with pytest.raises(ConfigError, match="model_type='bert'; the Longformer loader reads model_type='longformer'"):
        from_pretrained(tmp_path)
