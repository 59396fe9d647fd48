"""MPNet: relative-position buckets and live parity with transformers, HF directories both ways,
parameter counts, packed == padded, errors."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.models.mpnet import MPNet, relative_position_bucket
from jaxformers.text import pack_sequences
from jaxformers.text.hf_config import ConfigError
from tests.helpers import fast_jit

TINY = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=60)
LENGTHS = np.array([40, 23, 9])  # distances up to 39: exact buckets (< 8) and logarithmic ones
IDS = np.random.RandomState(0).randint(3, 101, (3, 40))
MASK = (np.arange(40)[None] < LENGTHS[:, None]).astype(np.int64)
IDS[MASK == 0] = 1


def test_buckets_equal_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    rel = np.arange(-600, 601)
    np.testing.assert_array_equal(relative_position_bucket(rel),
                                  MPNetEncoder.relative_position_bucket(torch.tensor(rel)).numpy())
    assert relative_position_bucket(np.array([0, 1, -1, 7, -8, 8, 128, -1000])).tolist() == [0, 17, 1, 23, 8, 24, 31, 15]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.helpers import perturbed_torch_model

    model = perturbed_torch_model(lambda: transformers.MPNetModel(transformers.MPNetConfig(**TINY, layer_norm_eps=1e-5)))
    path = tmp_path_factory.mktemp("mpnet")
    model.save_pretrained(path)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
    module, variables = jf.from_pretrained(path)
    ours = fast_jit(lambda v, i, m: module.apply(v, i, m))(variables, IDS, MASK)
    return transformers, model, module, variables, ours, ref


def test_matches_transformers_and_export_loads_back(hf, tmp_path):
    transformers, model, module, variables, ours, ref = hf
    assert isinstance(module, MPNet) and module.head is None
    real = MASK.astype(bool)
    assert np.abs(np.asarray(ours["last_hidden_state"]) - ref.last_hidden_state.numpy())[real].max() < 1e-4
    np.testing.assert_allclose(ours["pooler_output"], ref.pooler_output.numpy(), atol=1e-4)
    out = jf.save_pretrained(module, variables, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mpnet"
    again = transformers.MPNetModel.from_pretrained(out).eval()
    import torch

    with torch.no_grad():
        np.testing.assert_array_equal(again(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
                                      .last_hidden_state.numpy(), ref.last_hidden_state.numpy())


def test_sentence_transformers_directory_and_packing(hf, tmp_path):
    """A sentence-transformers layout (modules.json + mean Pooling + Normalize) loads as the embedding
    head; packed rows give each sequence its padded embedding."""
    _, model, module, variables, ours, _ = hf
    model.save_pretrained(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    embedder, loaded = jf.from_pretrained(tmp_path)
    assert embedder.head == "embedding" and embedder.pooling == "mean" and embedder.normalize_embeddings
    hidden, m = np.asarray(ours["last_hidden_state"]), MASK[..., None]
    want = (hidden * m).sum(1) / m.sum(1)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    packed = pack_sequences([IDS[i, :n] for i, n in enumerate(LENGTHS)], 50)
    fn = fast_jit(lambda v, ids, seg: embedder.apply(v, ids, segment_ids=seg, num_segments=2))
    got = np.asarray(fn(loaded, packed.input_ids, packed.segment_ids))
    from jaxformers.text import segment_index

    for i, (row, slot) in enumerate(segment_index(packed.placements)):
        np.testing.assert_allclose(got[row, slot], want[i], atol=1e-4)


def test_param_count_equals_transformers():
    assert jf.count_params("mpnet_base") == 109_486_464
    torch = pytest.importorskip("torch")
    t = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = t.MPNetModel(t.MPNetConfig(max_position_embeddings=514, layer_norm_eps=1e-5))
    assert sum(p.numel() for p in model.parameters()) == 109_486_464


def test_bad_input_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "longformer"}))
    from jaxformers.models.mpnet import from_pretrained

    with pytest.raises(ConfigError, match="model_type='longformer'; the MPNet loader reads model_type='mpnet'"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Pallas kernels do not take"):
        MPNet(**TINY, attention_impl="pallas").init({}, jnp.zeros((1, 4), jnp.int32))
