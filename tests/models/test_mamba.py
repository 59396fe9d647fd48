"""Mamba: the three scans and the cached steps agree, generation, training, sharding, checkpoint
directories (without torch; live transformers parity is in test_mamba_parity.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.convert.pretrained import CheckpointMismatchError
from jaxformers.layers.ssm import selective_scan, selective_state_update
from jaxformers.models.mamba import Mamba, generate
from jaxformers.sharding import make_mesh
from tests.helpers import (assert_sharded_grads_match, digit_sequences, fast_jit, numpy_variables, shard_like_init,
                           single_and_sharded)

TINY = dict(vocab_size=17, hidden_size=32, num_hidden_layers=2, state_size=8)


@pytest.fixture(scope="module")
def tiny():
    model = Mamba(**TINY)
    ids, _ = digit_sequences(4)
    ids = ids[:, :24]
    variables = numpy_variables(model, ids)
    return model, variables, ids


def test_scan_methods_and_steps_agree():
    rng = np.random.default_rng(0)
    b, length, e, n = 2, 13, 6, 4
    x, dt, z = (jnp.asarray(rng.normal(size=(b, length, e)), jnp.float32) for _ in range(3))
    B, C = (jnp.asarray(rng.normal(size=(b, length, n)), jnp.float32) for _ in range(2))
    A = -jnp.asarray(rng.uniform(0.5, 2.0, (e, n)), jnp.float32)
    D, bias = jnp.asarray(rng.normal(size=e), jnp.float32), jnp.asarray(rng.normal(size=e), jnp.float32)

    @fast_jit
    def everything(x, dt, B, C):
        run = lambda m, **kw: selective_scan(x, dt, A, B, C, D, z, dt_bias=bias, method=m, **kw)  # noqa: E731
        outs = {m: run(m) for m in ("sequential", "associative")}
        outs["chunked"] = run("chunked", chunk_size=5)

        def step(h, t):
            y, h = selective_state_update(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, z[:, t], dt_bias=bias)
            return h, y

        last, ys = jax.lax.scan(step, jnp.zeros((b, e, n)), jnp.arange(length))
        outs["steps"] = (jnp.moveaxis(ys, 0, 1), last)
        # a scan continued from the state of a first part equals the scan of the whole
        first, state = selective_scan(x[:, :7], dt[:, :7], A, B[:, :7], C[:, :7], D, z[:, :7], dt_bias=bias)
        second, last = selective_scan(x[:, 7:], dt[:, 7:], A, B[:, 7:], C[:, 7:], D, z[:, 7:], dt_bias=bias,
                                      initial_state=state)
        outs["continued"] = (jnp.concatenate([first, second], 1), last)
        grads = [jax.grad(lambda x, m=m: jnp.sum(selective_scan(x, dt, A, B, C, D, z, dt_bias=bias, method=m)[0] ** 2))(
            x) for m in ("associative", "sequential")]
        return outs, grads

    outs, grads = everything(x, dt, B, C)
    ref, ref_last = outs.pop("sequential")
    for name, (y, last) in outs.items():
        np.testing.assert_allclose(y, ref, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(last, ref_last, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-4)  # the parallel scan's gradients
    with pytest.raises(ValueError, match="scan method must be one of"):
        selective_scan(x, dt, A, B, C, method="cuda")
    with pytest.raises(ValueError, match=r"B and C must be \(batch, length, state\)"):
        selective_scan(x, dt, A, B[:, :3], C, D)


def test_full_sequence_equals_cached_steps_and_generate(tiny):
    model, variables, ids = tiny
    others = [Mamba(**TINY, scan="sequential"), Mamba(**TINY, scan="chunked", chunk_size=7)]
    every_scan = fast_jit(lambda v, x: [m.apply(v, x) for m in (model, *others)])
    full, *rest = every_scan(variables, ids)
    assert full.shape == (4, 24, 17) and full.dtype == jnp.float32
    for other in rest:
        np.testing.assert_allclose(other, full, atol=1e-4)
    # a prompt read by the scan, then one recurrent step per token, from the model's cache
    step = fast_jit(lambda v, x, c: model.apply(v, x, cache=c))
    logits, cache = step(variables, ids[:, :10], model.init_cache(4))
    pieces = [logits]
    for t in range(10, 24):
        logits, cache = step(variables, ids[:, t:t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-4)
    assert int(cache.index) == 24
    # greedy generation: every new token is the argmax of the full forward pass over the result
    out = generate(model, variables, ids[:, :6], max_new_tokens=8)
    assert out.shape == (4, 14) and np.array_equal(out[:, :6], ids[:, :6])
    again = every_scan(variables, jnp.pad(out, ((0, 0), (0, 10))))[0]  # causal: the padding changes nothing before it
    np.testing.assert_array_equal(np.argmax(again[:, 5:13], -1), out[:, 6:])
    sampled = generate(model, variables, ids[:, :6], max_new_tokens=8, do_sample=True, top_k=4, top_p=0.9,
                       rng=jax.random.key(1), eos_token_id=3)
    assert sampled.shape == (4, 14) and int(sampled.max()) < 17
    after = np.cumsum(np.asarray(sampled[:, 6:]) == 3, axis=1) > 0  # after an EOS a row holds padding (0)
    assert np.all(np.asarray(sampled[:, 7:])[after[:, :-1]] == 0)


def test_left_padding_gives_the_unpadded_outputs(tiny):
    model, variables, ids = tiny
    padded = jnp.concatenate([jnp.zeros((4, 5), ids.dtype), ids[:, :12]], axis=1)
    mask = jnp.concatenate([jnp.zeros((4, 5), jnp.int32), jnp.ones((4, 12), jnp.int32)], axis=1)
    out = fast_jit(lambda v, x, m: model.apply(v, x, attention_mask=m))(variables, padded, mask)
    np.testing.assert_allclose(out[:, 5:], fast_jit(model.apply)(variables, ids[:, :12]), atol=1e-4)


def test_trains_on_digit_sequences_and_every_parameter_learns():
    """Next-pixel prediction on real handwritten digits read row by row: the loss falls."""
    model = Mamba(**{**TINY, "num_hidden_layers": 1}, remat=True)
    ids, _ = digit_sequences(32)
    params = numpy_variables(model, ids[:1])["params"]
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    def loss_fn(p):
        logits = model.apply({"params": p}, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @fast_jit
    def step(params, opt):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, grads

    losses = []
    for i in range(12):
        params, opt, loss, grads = step(params, opt)
        losses.append(float(loss))
        if i == 0:
            dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]
                    if not np.any(np.asarray(g))]
            assert not dead, dead
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses


def test_sharded_equals_single_device(tiny):
    """One layer, the sequential scan (the scans agree above): what sharding changes is the batch and
    the width, not the scan."""
    model = Mamba(**{**TINY, "num_hidden_layers": 1}, scan="sequential")
    ids = tiny[2][:, :16]
    variables = numpy_variables(model, ids)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded_vars = shard_like_init(model, variables, ids, mesh)
    single, sharded = single_and_sharded(fast_jit(model.apply), variables, sharded_vars, ids, mesh)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)
    assert_sharded_grads_match(model, variables, sharded_vars, ids, mesh)


def test_param_counts_of_the_released_models():
    """transformers' MambaForCausalLM (tied head) for each released config, counted with torch on the
    meta device: the official MambaLMHeadModel has the same parameters."""
    expected = {"mamba_130m": 129_135_360, "mamba_370m": 371_516_416, "mamba_790m": 793_204_224,
                "mamba_1_4b": 1_372_178_432, "mamba_2_8b": 2_768_345_600}
    for name, n in expected.items():
        assert jf.count_params(name, scan="sequential") == n, name  # the same parameters; traces faster
        assert jf.model_info(name).params_m == pytest.approx(n / 1e6, abs=1e-6)


def test_directories_round_trip_and_read_official_layout(tiny, tmp_path):
    model, variables, ids = tiny
    path = jf.save_pretrained(model, variables, tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mamba" and config["architectures"] == ["MambaForCausalLM"]
    again, loaded = jf.from_pretrained(path)
    assert isinstance(again, Mamba) and again.hidden_size == 32
    ref = fast_jit(model.apply)(variables, ids)
    np.testing.assert_allclose(fast_jit(again.apply)(loaded, ids), ref, atol=1e-6)
    # the official state-spaces layout: d_model/n_layer config, `embedding` key, stored tied head
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    tensors["lm_head.weight"] = tensors["backbone.embedding.weight"]
    official = tmp_path / "official"
    official.mkdir()
    save_file(tensors, str(official / "model.safetensors"))
    (official / "config.json").write_text(json.dumps(dict(d_model=32, n_layer=2, vocab_size=15, pad_vocab_size_multiple=
                                                          17, ssm_cfg={"d_state": 8}, rms_norm=True)))
    from jaxformers.models.mamba import from_pretrained

    module, loaded = from_pretrained(official)
    np.testing.assert_allclose(fast_jit(module.apply)(loaded, ids), ref, atol=1e-6)
    del tensors["backbone.layers.1.mixer.D"]
    save_file(tensors, str(official / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"layers_1/mixer/D"):
        from_pretrained(official)


def test_bad_input_is_named(tiny):
    model, variables, ids = tiny
    with pytest.raises(ValueError, match="vocabulary has 17 entries"):
        model.apply(variables, ids + 10)
    with pytest.raises(ValueError, match="cache must be a MambaCache with 2 layers"):
        model.apply(variables, ids, cache=Mamba(**{**TINY, "num_hidden_layers": 1}).init_cache(4))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate(model, variables, ids[:, :3], max_new_tokens=0)
