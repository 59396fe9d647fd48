"""GPT-2 / OPT: parameter counts, live transformers parity both ways, generation (cached ==
uncached, sampling, tensor-parallel == single device), packed documents, training, bad input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.models.gpt import CausalLM, causal_lm_loss, generate, init_cache
from jaxformers.text.hf_config import ConfigError
from tests.helpers import assert_every_param_has_gradient, fast_jit, numpy_variables, zen_of_python_chars

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
            max_position_embeddings=40)
# GPT2LMHeadModel / OPTForCausalLM parameter counts for the checkpoints' configs (tied head counted
# once); verified live on torch's meta device below when transformers is installed.
PUBLISHED = {"gpt2": 124_439_808, "gpt2_medium": 354_823_168, "gpt2_large": 774_030_080, "gpt2_xl": 1_557_611_200,
             "opt_125m": 125_239_296, "opt_350m": 331_196_416, "opt_1_3b": 1_315_758_080}


def _prompts():
    """Left-padded prompts (B=4, L=7) and their mask: rows of 7, 4, 5 and 1 tokens."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, TINY["vocab_size"], (4, 7)).astype(np.int32)
    mask = (np.arange(7)[None] >= np.array([0, 3, 2, 6])[:, None]).astype(np.int32)
    return np.where(mask > 0, ids, 1), mask


@pytest.fixture(scope="module")
def tiny_gpt2():
    module = CausalLM(**TINY, model_type="gpt2")
    return module, numpy_variables(module, jnp.zeros((1, 8), jnp.int32))


def test_param_counts_equal_published():
    for name, expected in PUBLISHED.items():
        assert jf.count_params(name) == expected, name
        assert round(jf.model_info(name).params_m * 1e6) == expected


def test_param_counts_equal_transformers_classes():
    torch = pytest.importorskip("torch")
    t = pytest.importorskip("transformers")
    configs = {"gpt2": t.GPT2Config(), "gpt2_medium": t.GPT2Config(n_embd=1024, n_layer=24, n_head=16),
               "gpt2_large": t.GPT2Config(n_embd=1280, n_layer=36, n_head=20),
               "gpt2_xl": t.GPT2Config(n_embd=1600, n_layer=48, n_head=25),
               "opt_125m": t.OPTConfig(), "opt_350m": t.OPTConfig(hidden_size=1024, num_hidden_layers=24,
                                                                  num_attention_heads=16, ffn_dim=4096,
                                                                  word_embed_proj_dim=512, do_layer_norm_before=False),
               "opt_1_3b": t.OPTConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                                       word_embed_proj_dim=2048)}
    with torch.device("meta"):
        for name, config in configs.items():
            cls = t.GPT2LMHeadModel if name.startswith("gpt2") else t.OPTForCausalLM
            assert sum(p.numel() for p in cls(config).parameters()) == PUBLISHED[name], name


@pytest.mark.parametrize("kind", ["gpt2", "opt", "opt_post_ln"])
def test_transformers_parity_both_ways(kind, tmp_path):
    """A random transformers model -> its directory -> jaxformers.from_pretrained: the same logits
    (right padding) and the same greedy generation; our export loads back in transformers."""
    torch = pytest.importorskip("torch")
    t = pytest.importorskip("transformers")
    if kind == "gpt2":
        config = t.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=0,
                              eos_token_id=0)
        cls = t.GPT2LMHeadModel
    else:
        extra = dict(word_embed_proj_dim=16, do_layer_norm_before=False) if kind == "opt_post_ln" else {}
        config = t.OPTConfig(**{k: v for k, v in TINY.items() if k != "vocab_size"}, vocab_size=100, **extra)
        cls = t.OPTForCausalLM
    torch.manual_seed(0)
    hf = cls(config).eval()
    with torch.no_grad():  # HF inits biases to 0 and LayerNorms to 1, which would hide mix-ups
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    module, variables = jf.from_pretrained(tmp_path / "hf")
    assert isinstance(module, CausalLM) and module.model_type == kind[:4].rstrip("_")
    rng = np.random.RandomState(1)
    ids = rng.randint(3, 100, (3, 13))
    mask = (np.arange(13)[None] < np.array([13, 9, 5])[:, None]).astype(np.int64)
    ids = np.where(mask > 0, ids, 1)

    def torch_logits(model):
        with torch.no_grad():
            return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()

    ref = torch_logits(hf)
    out = np.asarray(fast_jit(module.apply)(variables, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)

    # our export loads in transformers and gives the same logits; and comes back unchanged
    jf.save_pretrained(module, variables, tmp_path / "ours")
    back = t.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is cls
    np.testing.assert_allclose(torch_logits(back)[real], ref[real], atol=1e-5, rtol=0)
    again, reloaded = jf.from_pretrained(tmp_path / "ours")
    assert again == module
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), variables, reloaded)))

    # greedy generation from left-padded prompts equals transformers' generate
    prompts, pmask = _prompts()
    with torch.no_grad():
        hf_tokens = hf.generate(input_ids=torch.tensor(prompts), attention_mask=torch.tensor(pmask), max_new_tokens=5,
                                do_sample=False, eos_token_id=None, pad_token_id=1).numpy()
    np.testing.assert_array_equal(generate(module, variables, prompts, pmask, max_new_tokens=5), hf_tokens)


def test_generation_cached_equals_uncached(tiny_gpt2):
    module, variables = tiny_gpt2
    prompts, mask = _prompts()
    runs = {}
    for name, kw in (("greedy", dict()), ("sample", dict(do_sample=True, temperature=0.7, top_k=30, top_p=0.9))):
        key = dict(rng=jax.random.key(5)) if kw else {}
        cached, scores = generate(module, variables, prompts, mask, max_new_tokens=6, return_scores=True, **kw, **key)
        plain, plain_scores = generate(module, variables, prompts, mask, max_new_tokens=6, use_cache=False,
                                       return_scores=True, **kw, **key)
        np.testing.assert_array_equal(cached, plain)
        np.testing.assert_allclose(scores, plain_scores, atol=1e-5)
        np.testing.assert_array_equal(cached[:, :7], prompts)
        runs[name] = cached, scores
    greedy, scores = runs["greedy"]
    np.testing.assert_array_equal(greedy[:, 7:], np.argmax(scores, -1))
    # sampling differs from greedy and between keys, and never draws outside the top-k
    other = generate(module, variables, prompts, mask, max_new_tokens=6, return_scores=True, do_sample=True,
                     temperature=0.7, top_k=30, top_p=0.9, rng=jax.random.key(6))[0]
    assert not np.array_equal(runs["sample"][0], other) and not np.array_equal(runs["sample"][0], greedy)
    sampled, sample_scores = runs["sample"]
    rank = (sample_scores > np.take_along_axis(sample_scores, sampled[:, 7:, None], -1)).sum(-1)
    assert rank.max() < 30
    # an EOS ends a row: padding after it
    eos = int(greedy[0, 8])
    stopped = generate(module, variables, prompts, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(stopped[0, :9], greedy[0, :9])
    assert (stopped[0, 9:] == 0).all()


def test_prefill_and_steps_equal_one_causal_pass(tiny_gpt2):
    """A cache filled by a 5-token prefill and two 1-token steps gives the full pass's logits."""
    module, variables = tiny_gpt2
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 100, (2, 7)))
    full = fast_jit(module.apply)(variables, ids)
    cache = init_cache(module, 2, 10)
    step = fast_jit(lambda v, x, c: module.apply(v, x, cache=c))
    out, cache = step(variables, ids[:, :5], cache)
    outs = [out]
    for i in (5, 6):
        out, cache = step(variables, ids[:, i:i + 1], cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
    assert int(cache[0].index) == 7


def test_packed_documents_equal_separate_documents(tiny_gpt2):
    """Four documents packed into two rows (segment_ids) give each document's own logits, and the
    packed loss is the token-weighted loss of the documents (no prediction across a boundary)."""
    module, variables = tiny_gpt2
    rng = np.random.RandomState(3)
    lengths, rows = (6, 4, 9, 3), [(0, 1), (2, 3)]
    docs = [rng.randint(3, 100, n) for n in lengths]
    ids, seg, where = np.zeros((2, 14), np.int32), np.zeros((2, 14), np.int32), {}
    for r, members in enumerate(rows):
        at = 0
        for s, d in enumerate(members):
            ids[r, at:at + lengths[d]], seg[r, at:at + lengths[d]], where[d] = docs[d], s + 1, (r, at)
            at += lengths[d]
    padded = np.stack([np.pad(d, (0, 9 - len(d))) for d in docs]).astype(np.int32)
    pmask = (np.arange(9)[None] < np.array(lengths)[:, None]).astype(np.int32)

    @fast_jit
    def run(v, ids, seg, padded, pmask):
        packed, alone = module.apply(v, ids, segment_ids=seg), module.apply(v, padded, pmask)
        return (packed, alone, causal_lm_loss(packed, ids, segment_ids=seg),
                causal_lm_loss(alone, padded, attention_mask=pmask))

    packed, alone, loss, reference = run(variables, ids, seg, padded, pmask)
    for d, n in enumerate(lengths):
        r, at = where[d]
        np.testing.assert_allclose(packed[r, at:at + n], alone[d, :n], atol=1e-5)
    np.testing.assert_allclose(float(loss), float(reference), rtol=1e-6)
    assert abs(float(loss) - float(causal_lm_loss(packed, jnp.asarray(ids)))) > 1e-3  # boundaries matter


def test_tensor_parallel_generation_equals_single_device(tiny_gpt2):
    from jaxformers.sharding import activate, make_mesh
    from tests.helpers import shard_like_init

    module, variables = tiny_gpt2
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = shard_like_init(module, variables, jnp.zeros((1, 8), jnp.int32), mesh)
    qkv = sharded["params"]["layer_0"]["attn"]["qkv"]["kernel"]
    assert not qkv.sharding.is_fully_replicated  # heads split over tensor
    prompts, mask = _prompts()
    single, single_scores = generate(module, variables, prompts, mask, max_new_tokens=4, return_scores=True)
    with activate(mesh):
        tokens, scores = generate(module, sharded, prompts, mask, max_new_tokens=4, return_scores=True)
    np.testing.assert_array_equal(tokens, single)
    np.testing.assert_allclose(scores, single_scores, atol=2e-5)


def test_trains_on_real_text_with_dropout():
    """Character-level language modelling of the Zen of Python: an OPT-style and a post-LN model
    (with project_in/out) learn; every parameter gets a gradient."""
    ids, distinct = zen_of_python_chars(8, 24)
    x = jnp.asarray(ids)
    module = CausalLM(**TINY, model_type="opt", word_embed_proj_dim=16, do_layer_norm_before=False, hidden_act="relu",
                      dropout=0.1, attention_dropout=0.1, embed_dropout=0.0, tie_word_embeddings=False)
    params = numpy_variables(module, x)["params"]
    tx = optax.adamw(3e-3)
    state = tx.init(params)

    @fast_jit
    def step(params, state, rng):
        def loss_fn(p):
            return causal_lm_loss(module.apply({"params": p}, x, train=True, rngs={"dropout": rng}), x)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, grads

    losses = []
    for i in range(30):
        params, state, loss, grads = step(params, state, jax.random.key(i))
        if i == 0:
            assert_every_param_has_gradient(grads)
        losses.append(float(loss))
    assert losses[0] > np.log(distinct) - 1.0
    assert np.mean(losses[-3:]) < losses[0] - 1.0, losses


def test_bad_input(tiny_gpt2, tmp_path):
    module, variables = tiny_gpt2
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' has no jaxformers loader; supported model_types: .*gpt2, .*opt"):
        jf.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"architectures \['GPT2ForSequenceClassification'\] are not supported"):
        from jaxformers.models.gpt_convert import fields_from_config

        fields_from_config({"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"]})
    prompts, mask = _prompts()
    with pytest.raises(ValueError, match="left-padded prompts"):
        generate(module, variables, prompts, mask[:, ::-1], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the position table's max_position_embeddings=40"):
        generate(module, variables, prompts, mask, max_new_tokens=34)
    with pytest.raises(ValueError, match="do_sample=True needs rng"):
        generate(module, variables, prompts, mask, max_new_tokens=2, do_sample=True)
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="either segment_ids .* or attention_mask"):
        module.apply(variables, ids, jnp.ones((2, 5)), segment_ids=jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="a tuple of 2 KVCache"):
        module.apply(variables, ids, cache=init_cache(module, 2, 8)[:1])
    with pytest.raises(ValueError, match=r"ids in \[0, 100\] but the vocabulary has 100"):
        module.apply(variables, ids.at[0, 0].set(100))
