"""SeqPE: the digit mapping and its masks, both regularisers on worked examples, the samplers, SeqPE on
GPT-2 (cached decoding == full pass, training reaches the encoder) and on ViT (any image size), errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.models.gpt import CausalLM, init_cache
from jaxformers.models.seqpe import (SeqPE, SeqPEEncoder, contrastive_batch, contrastive_loss, max_digits_for,
                                     positions_to_digits, transfer_batch, transfer_loss)
from jaxformers.sharding import make_mesh
from tests.helpers import digits, fast_jit, numpy_variables, shard_like_init, single_and_sharded


def test_positions_to_digits_and_masks():
    assert max_digits_for(20000) == 5 and max_digits_for(10) == 1 and max_digits_for(11) == 2
    d, real = positions_to_digits(np.asarray([[123], [0], [7]]), 5)
    np.testing.assert_array_equal(d, [[0, 0, 1, 2, 3], [0, 0, 0, 0, 0], [0, 0, 0, 0, 7]])
    np.testing.assert_array_equal(real, [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]])
    d, real = positions_to_digits(np.asarray([[12, 3]]), 3)  # 2-D: the coordinates' digit strings concatenated
    np.testing.assert_array_equal(d, [[0, 1, 2, 0, 0, 3]])
    np.testing.assert_array_equal(real, [[0, 1, 1, 0, 0, 1]])
    with pytest.raises(ValueError, match="position 1000 needs 4 digits but this SeqPE writes positions with "
                                         "max_digits=3"):
        positions_to_digits(np.asarray([[1000]]), 3)


def test_encoder_ignores_padding_digits():
    enc = SeqPEEncoder(d_pe=16, out_dim=16, max_digits=3, num_heads=2)
    pos = jnp.asarray([[7], [70], [700]])
    params = numpy_variables(enc, pos)["params"]
    apply = fast_jit(enc.apply)
    out = apply({"params": params}, pos)
    # the digit "0" embedding matters only where a real digit is 0: 7 = (pad, pad, 7) does not move (a random
    # change: a constant shift would vanish in the pre-LN blocks' LayerNorms)
    changed = jax.tree_util.tree_map(lambda x: x, params)
    delta = np.random.default_rng(0).normal(size=params["token_embed"]["embedding"].shape[1])
    changed["token_embed"]["embedding"] = params["token_embed"]["embedding"].at[0].add(delta)
    again = apply({"params": changed}, pos)
    np.testing.assert_allclose(again[0], out[0], atol=1e-6)
    assert np.abs(again[1] - out[1]).max() > 1e-3 and np.abs(again[2] - out[2]).max() > 1e-3


def test_contrastive_and_transfer_losses_on_worked_examples():
    pivot = jnp.asarray([[1.0, 0.0, 0.0, 2.0]])
    cands = jnp.asarray([[[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]]])
    labels = jnp.asarray([0])
    # one head: logits = dot products (3, 0, 2), cross-entropy at 0
    expected = -np.log(np.exp(3.0) / (np.exp(3.0) + 1.0 + np.exp(2.0)))
    np.testing.assert_allclose(contrastive_loss(pivot, cands, labels), expected, rtol=1e-6)
    # two heads: (1, 0, 2) and (2, 0, 0): the mean of two cross-entropies at candidate 0
    h1 = -np.log(np.e / (np.e + 1 + np.e ** 2))
    h2 = -np.log(np.e ** 2 / (np.e ** 2 + 2))
    np.testing.assert_allclose(contrastive_loss(pivot, cands, labels, num_heads=2), (h1 + h2) / 2, rtol=1e-6)
    main = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    shifted = jnp.asarray([[1.0, 0.5], [0.2, 1.0], [0.0, 1.0]])
    gm, gs = main @ main.T, shifted @ shifted.T
    lm, ls = jax.nn.log_softmax(gm, -1), jax.nn.log_softmax(gs, -1)
    kl = lambda a, b: np.sum(np.exp(a) * (a - b), -1)  # noqa: E731
    np.testing.assert_allclose(transfer_loss(main, shifted), np.mean(kl(ls, lm) + kl(lm, ls)), rtol=1e-5)
    assert float(transfer_loss(main, main)) == pytest.approx(0.0, abs=1e-7)
    g = jax.grad(lambda m, s: transfer_loss(m, s), argnums=(0, 1))(main, shifted)
    assert np.all(np.asarray(g[0]) == 0) and np.abs(np.asarray(g[1])).max() > 0  # the training range is the target
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    ref = (F.kl_div(torch.tensor(np.asarray(lm)), torch.tensor(np.asarray(ls)), log_target=True, reduction="batchmean")
           + F.kl_div(torch.tensor(np.asarray(ls)), torch.tensor(np.asarray(lm)), log_target=True,
                      reduction="batchmean"))
    np.testing.assert_allclose(transfer_loss(main, shifted), ref.item(), rtol=1e-5)


def test_samplers():
    rng = np.random.default_rng(0)
    pivots, cands, labels = contrastive_batch(rng, 64, 16, 5000, data_dim=2, local_range=50)
    assert pivots.shape == (64, 2) and cands.shape == (64, 16, 2) and cands.max() < 5000 and cands.min() >= 0
    dist = ((cands - pivots[:, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, dist.argmin(1))
    assert (dist == 0).mean() < 0.5  # hard negatives are edits, not copies
    main, shifted = transfer_batch(rng, 32, 64, 1000)
    assert main.max() < 64 and shifted.max() < 1000 and np.all(shifted - main == (shifted - main)[0])


def test_position_terms_of_every_mode():
    pos = jnp.asarray([[0], [3], [12]])
    pe = SeqPE(mode="attn_scalar", max_position=100, d_pe=16, num_layers=1, num_heads=2)
    kw = dict(num_layers=2, num_heads=2, head_dim=4, width=8)
    shapes = nn.unbox(jax.eval_shape(lambda: pe.init(jax.random.key(0), pos, pos, **kw)))["params"]
    assert set(shapes) == {"encoder", "pe_qk"}  # pe_qk="single": one projection shared by the layers
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), jnp.float32), shapes)
    in_params = {"encoder": params["encoder"], "input_proj": {"kernel": jnp.asarray(rng.normal(size=(16, 8))),
                                                              "bias": jnp.zeros(8)}}
    q, k = (jnp.asarray(rng.normal(size=(1, 4, 2, 4)), jnp.float32) for _ in range(2))

    @fast_jit
    def terms(params, in_params, q, k):
        out = {"enc": pe.encode(params, pos), "bias": pe.apply({"params": params}, pos, pos, **kw).biases}
        for mode in ("attn_add", "attn_mul"):  # one class token (num_prefix=1) ahead of the 3 positions
            out[mode] = pe.clone(mode=mode).apply({"params": params}, pos, pos, num_prefix=1, **kw).qk_fns[0](q, k)
        out["inputs"] = pe.clone(mode="input_add").apply({"params": in_params}, pos, pos, **kw).inputs
        return out

    out = terms(params, in_params, q, k)
    assert out["enc"].shape == (3, 16) and out["inputs"].shape == (3, 8) and len(out["bias"]) == 2
    pq, pk = (jnp.einsum("nd,dtf->tnf", out["enc"], params["pe_qk"]["kernel"])
              + params["pe_qk"]["bias"][:, None]).reshape(2, 3, 2, 4)
    np.testing.assert_allclose(out["bias"][1], jnp.einsum("qhd,khd->hqk", pq, pk) / 2.0, rtol=1e-5, atol=1e-6)
    for mode, op in (("attn_add", jnp.add), ("attn_mul", jnp.multiply)):
        q2, k2 = out[mode]
        np.testing.assert_allclose(q2[:, :1], q[:, :1])  # the class token keeps its q and k
        np.testing.assert_allclose(k2[:, :1], k[:, :1])
        np.testing.assert_allclose(q2[:, 1:], op(q[:, 1:], pq[None]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(k2[:, 1:], op(k[:, 1:], pk[None]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mode must be"):
        jax.eval_shape(lambda: pe.clone(mode="rope").init(jax.random.key(0), pos, pos, **kw))


@pytest.fixture(scope="module")
def lm():
    model = CausalLM(vocab_size=17, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=100, dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
                     position_encoder=SeqPE(mode="attn_scalar", max_position=100, d_pe=32, num_heads=2))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 17, (4, 24)), jnp.int32)
    return model, numpy_variables(model, ids), ids


def test_gpt2_with_seqpe_cached_decoding_and_training(lm):
    model, variables, ids = lm
    assert "embed_positions" not in variables["params"] and "position_encoder" in variables["params"]

    def loss_fn(p):
        logits = model.apply({"params": p}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean(), logits

    (_, full), grads = fast_jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    # decoding in chunks of 6 through the cache (the keys' positions come from the cache slots) == one pass
    step = fast_jit(lambda v, x, c: model.apply(v, x, cache=c))
    cache, pieces = init_cache(model, 4, 24), []
    for t in range(0, 24, 6):
        logits, cache = step(variables, ids[:, t:t + 6], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-4)
    # the language-model loss trains the position encoder too
    enc = jax.tree_util.tree_leaves(grads["position_encoder"])
    assert all(np.isfinite(g).all() for g in enc) and min(float(jnp.abs(g).max()) for g in enc) > 0
    with pytest.raises(ValueError, match="position 100 needs 3 digits"):
        model.apply(variables, jnp.zeros((1, 101), jnp.int32))
    with pytest.raises(ValueError, match="packed documents"):
        model.apply(variables, ids, segment_ids=jnp.ones_like(ids))


def test_gpt2_with_seqpe_sharded_equals_single_device(lm):
    model, variables, ids = lm
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single, sharded = single_and_sharded(fast_jit(model.apply), variables, shard_like_init(model, variables, ids, mesh),
                                         ids, mesh)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


def test_vit_with_2d_seqpe_runs_at_any_image_size():
    pe = SeqPE(mode="attn_mul", max_position=100, data_dim=2, d_pe=32, num_layers=1, num_heads=2, pe_qk="multi")
    model = jf.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=5, position_encoder=pe)
    x = digits(2, size=16)[0]
    variables = numpy_variables(model, x)
    params = nn.unbox(variables)["params"]
    assert "pos_embed" not in params and set(params["position_encoder"]) == {"encoder", "pe_qk_0", "pe_qk_1"}
    big = model.clone(img_size=32)
    both = fast_jit(lambda v, a, b: (model.apply(v, a), big.apply(v, b)))(variables, x, digits(2)[0])
    assert both[0].shape == both[1].shape == (2, 5) and np.isfinite(np.asarray(both[1])).all()
    with pytest.raises(ValueError, match="not attention biases"):
        jax.eval_shape(model.clone(position_encoder=pe.clone(mode="attn_scalar")).init, jax.random.key(0), x)
