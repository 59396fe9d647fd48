"""jaxformers.compress.binary / distill: binarizer formulas, DMD, Bi-Attention masking, packed ==
simulated bit for bit (odd widths included), parameter counts, training, sharding, bad input.
(The official PyTorch code is compared in test_binary_official.py where it is fetched.)"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.compress import binary as B
from jaxformers.compress import distill as D
from jaxformers.compress.binary_attention import BinaryAttention
from jaxformers.models.bert import Bert
from jaxformers.models.vit import VisionTransformer
from tests.helpers import assert_sharded_grads_match, digits, fast_jit, numpy_variables, shard_like_init

RNG = np.random.default_rng(0)
# odd widths everywhere: hidden 40, head_dim 10, FFN 72 (none a multiple of 32)
TINY_BERT = dict(vocab_size=61, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                 max_position_embeddings=16, head="classification", num_labels=3)


def _tokens(batch=2, length=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, 61, (batch, length)), jnp.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, 8:] = 0
    return ids, jnp.asarray(mask)


def _vjp(f, *args, cot=None):
    out, vjp = jax.vjp(f, *args)
    cot = jnp.asarray(RNG.normal(size=out.shape), out.dtype) if cot is None else cot
    return out, vjp(cot), cot


def test_binarizer_forwards_and_gradients_follow_the_official_formulas():
    x = jnp.asarray(np.concatenate([RNG.normal(0, 1.2, 61), [0.0, 1.0, -1.0, 0.5]]).astype(np.float32))
    xn = np.asarray(x)
    for fn, fwd, grad in ((B.sign_ste, np.sign(xn), np.abs(xn) <= 1), (B.bool_ste, xn > 0, np.abs(xn) < 1),
                          (B.approx_sign, np.sign(xn), np.maximum(0, 2 - np.abs(2 * xn)))):
        out, (g,), cot = _vjp(fn, x)
        np.testing.assert_array_equal(out, fwd.astype(np.float32))
        np.testing.assert_allclose(g, cot * grad, atol=1e-6)
    # BiPer's square wave with the sine's gradient
    out, (g,), cot = _vjp(lambda w: B.sine_sign(w, 20.0), x * 0.1)
    np.testing.assert_array_equal(out, np.where(np.sin(20 * xn * 0.1) >= 0, 1, -1))
    np.testing.assert_allclose(g, cot * 20 * np.cos(20 * xn * 0.1), rtol=1e-4, atol=1e-5)
    # BWN per matrix / per row (whole-matrix mean), identity gradient
    w = RNG.normal(size=(6, 9)).astype(np.float32)
    for axes, scale in ((None, np.abs(w).mean()), ((1,), np.abs(w).mean(1, keepdims=True))):
        out, (g,), cot = _vjp(lambda t: B.bwn(t, axes), jnp.asarray(w))
        np.testing.assert_allclose(out, np.where(w - w.mean() >= 0, 1, -1) * scale, rtol=1e-6)
        np.testing.assert_allclose(g, cot)
    # elastic signed / unsigned: forward, input window and the LSQ step-size gradient
    for signed, data in ((True, xn), (False, np.abs(xn) / 3)):
        alpha = 0.7
        q = data / alpha
        out, (gx, ga), cot = _vjp(lambda t, a: B.elastic_binary(t, a, signed), jnp.asarray(data), jnp.float32(alpha))
        c = np.asarray(cot)
        if signed:
            ref, window, ref_ga = np.sign(data) * alpha, np.abs(q) <= 1, np.sum(np.sign(data) * c)
        else:
            ref, window = np.clip(np.round(q), 0, 1) * alpha, (q >= 0) & (q <= 1)
            ref_ga = np.sum(np.where(q > 1, 1.0, 0.0) * c + np.where(window, np.round(q) - q, 0.0) * c)
        np.testing.assert_allclose(out, ref, rtol=1e-6)
        np.testing.assert_allclose(gx, c * window, atol=1e-6)
        np.testing.assert_allclose(ga, ref_ga / np.sqrt(data.size), rtol=1e-4, atol=1e-6)
        assert float(B.elastic_init(jnp.asarray(data), signed)) == pytest.approx((2 if signed else 4) * np.abs(data).mean(),
                                                                                 rel=1e-6)
    # SAB: 1[p >= rowmax/4] (ties give 1), gradient = the softmax's
    s = jnp.asarray(RNG.normal(size=(3, 7)).astype(np.float32))
    p = np.asarray(jax.nn.softmax(s))
    out, (g,), cot = _vjp(B.sab, s)
    np.testing.assert_array_equal(out, (p >= 0.25 * p.max(-1, keepdims=True)).astype(np.float32))
    np.testing.assert_allclose(g, jax.vjp(lambda t: jax.nn.softmax(t), s)[1](cot)[0], atol=1e-6)
    assert float(B.sab(jnp.log(jnp.asarray([[4.0, 1.0, 0.5]])))[0, 1]) == 1.0  # p = 1/4 of the max: kept


def test_dmd_and_hidden_losses_match_numpy():
    def r2b(a, b):  # BiBERT's att_loss_r2b: norms over the whole batch tensor
        return np.linalg.norm(a / np.linalg.norm(a) - b / np.linalg.norm(b))

    def gram(x):
        g = np.einsum("blhd,bmhd->bhlm", x, x) / np.sqrt(x.shape[-1])
        return np.where(g <= -100, 0, g)

    student = [RNG.normal(size=(2, 5, 3, 2, 4)).astype(np.float32) for _ in range(2)]
    teacher = [RNG.normal(size=(2, 5, 3, 2, 4)).astype(np.float32) * 3 for _ in range(4)]  # depth ratio 2
    ref = sum(r2b(gram(s[:, :, j]), gram(teacher[2 * i + 1][:, :, j])) for i, s in enumerate(student) for j in range(3))
    np.testing.assert_allclose(D.dmd_loss([jnp.asarray(s) for s in student], [jnp.asarray(t) for t in teacher]), ref,
                               rtol=1e-5)
    hs = [RNG.normal(size=(2, 5, 6)).astype(np.float32) for _ in range(3)]
    ht = [RNG.normal(size=(2, 5, 6)).astype(np.float32) for _ in range(5)]
    np.testing.assert_allclose(D.hidden_loss(hs, ht), r2b(hs[0], ht[0]) + r2b(hs[1], ht[2]) + r2b(hs[2], ht[4]), rtol=1e-5)
    np.testing.assert_allclose(D.hidden_loss(hs, ht[:3], "mse"), np.mean([np.mean((a - b) ** 2) for a, b in zip(hs, ht)]),
                               rtol=1e-5)
    s, t = RNG.normal(size=(4, 3)), RNG.normal(size=(4, 3))
    ref = np.mean(-np.exp(t) / np.exp(t).sum(-1, keepdims=True) * (s - np.log(np.exp(s).sum(-1, keepdims=True))))
    np.testing.assert_allclose(D.soft_cross_entropy(jnp.asarray(s), jnp.asarray(t)), ref, rtol=1e-5)


def test_bi_attention_is_zero_on_masked_positions():
    q, k, v = (jnp.asarray(RNG.normal(size=(2, 6, 2, 8)).astype(np.float32)) for _ in range(3))
    mask = np.ones((2, 1, 1, 6), bool)
    mask[1, ..., 3:] = False
    for packed in (False, True):
        att = BinaryAttention(B.BIBERT.replace(packed=packed))
        out = att.apply({}, None, q, k, v, mask=jnp.asarray(mask))
        # P = 1[sign(q)·sign(k)/√d > 0] on visible keys only, then P·sign(v)
        scores = np.einsum("bqhd,bkhd->bhqk", np.sign(q), np.sign(k))
        probs = (scores > 0) & mask
        np.testing.assert_array_equal(out, np.einsum("bhqk,bkhd->bqhd", probs.astype(np.float32), np.sign(v)))
        # the masked keys' values do not matter
        v2 = v.at[1, 3:].set(-v[1, 3:])
        np.testing.assert_array_equal(att.apply({}, None, q, k, v2, mask=jnp.asarray(mask))[1], out[1])


@pytest.fixture(scope="module")
def bert_models():
    ids, mask = _tokens()
    out = {}
    for recipe in (B.BIBERT, B.BIPFT, B.SIGN_STE):
        model = Bert(**TINY_BERT, binary=recipe)
        out[recipe.name] = (model, numpy_variables(model, ids, mask))
    return ids, mask, out


@pytest.mark.parametrize("recipe", ["bibert", "bipft", "sign_ste"])
def test_packed_bert_equals_simulation_bit_for_bit(bert_models, recipe):
    ids, mask, models = bert_models
    model, variables = models[recipe]
    variables = B.calibrate(model, variables, ids, mask)
    packed, packed_vars = B.pack(model, variables, ids, mask)
    layer = packed_vars["params"]["layer_0"]
    assert layer["attn"]["qkv"]["kernel_bits"].dtype == jnp.uint32 and "kernel" not in layer["attn"]["qkv"]
    assert layer["mlp"]["fc2"]["kernel_bits"].shape == (40, 3)  # 72 inputs padded to 3 words
    assert packed_vars["params"]["embeddings"]["word_embeddings"]["embedding_bits"].shape == (61, 2)
    sim = fast_jit(model.apply)(variables, ids, mask)
    out = fast_jit(packed.apply)(packed_vars, ids, mask)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(sim))
    assert np.abs(np.asarray(sim)).max() > 1e-3


def test_packed_vit_and_convolutions_equal_simulation_bit_for_bit():
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=5, binary=B.BIVIT)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    variables = B.calibrate(vit, numpy_variables(vit, x), x)
    packed, packed_vars = B.pack(vit, variables, x)
    assert set(packed_vars["params"]["blocks_0"]["attn"]["qkv"]) == {"kernel_bits", "kernel_scale", "bias"}
    np.testing.assert_array_equal(fast_jit(packed.apply)(packed_vars, x), fast_jit(vit.apply)(variables, x))
    # convolutions: odd channels (19 -> 2 words of which 13 bits pad), stride 2, SAME and explicit padding
    xc = jax.random.normal(jax.random.key(2), (2, 9, 9, 19))
    for recipe, stride, padding in ((B.BIPER, 2, "SAME"), (B.SIGN_STE, 1, 1), (B.BIPER.replace(conv_weight="bibert"), 2, 0)):
        conv = recipe.conv(7, (3, 3), strides=stride, padding=padding)
        cv = numpy_variables(conv, xc)
        pconv = recipe.replace(packed=True).conv(7, (3, 3), strides=stride, padding=padding)
        pv = {"params": conv.packed_params(cv["params"])}
        np.testing.assert_array_equal(fast_jit(pconv.apply)(pv, xc), fast_jit(conv.apply)(cv, xc))


def test_packed_resnet_equals_simulation_and_counts_bytes():
    # BiPer ResNet-18's layout (timm's ResNet through its conv seam), tiny widths
    model = jf.create_model("biper_resnet18", depth=(1, 1, 1, 1), channels=(16, 32, 48, 64), stem_channels=16,
                            num_classes=5)
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    variables = numpy_variables(model, x)
    assert len(B.binary_layers(model, variables, x)) == 8  # conv1, conv2 of each block; stem/shortcuts float
    packed, packed_vars = B.pack(model, variables, x)
    np.testing.assert_array_equal(fast_jit(packed.apply)(packed_vars, x), fast_jit(model.apply)(variables, x))
    conv = variables["params"]["layer2_0"]["conv2"]["kernel"]  # (3, 3, 32, 32) float32 -> 32 rows x 9 taps x 1 word
    assert packed_vars["params"]["layer2_0"]["conv2"]["kernel_bits"].size * 4 * 32 == conv.size * 4
    assert B.packed_nbytes(packed_vars) < B.packed_nbytes(variables) / 2


def test_parameter_counts_are_the_float_host_plus_the_papers_extras():
    base = dict(head=None)
    bert = jf.count_params("bert_base_uncased", **base)
    assert jf.count_params("bert_base_uncased", binary=B.BIBERT, **base) == bert  # no extra parameters
    e, f, h = 768, 3072, 12
    per_layer = (3 * e + 3) + (e + 1) + (e + 1) + (f + 1)  # shift + α of q/k/v, out, fc1, fc2
    per_layer += 4 + 5 * (e + 1)  # clip_query/key/value/attn + the five rank-1 estimators
    pooler = (e + 1) + 2 * e  # shift + α, and the modified pooler's LayerNorm
    assert jf.count_params("bert_base_uncased", binary=B.BIPFT, **base) == bert + h * per_layer + pooler
    vit = jf.count_params("vit_tiny_patch16_224")
    assert jf.count_params("vit_tiny_patch16_224", binary=B.BIVIT) == vit + 12 * (3 * 192 + 192)  # learnable s
    # BiPer's CIFAR nets: float net + α per binarized convolution = the README's 0.27M / 4.66M
    assert jf.count_params("biper_resnet20", binary=None) + 6 * (16 + 32 + 64) == jf.count_params("biper_resnet20") \
        == 270522
    assert jf.count_params("biper_vgg_small") - jf.count_params("biper_vgg_small", binary=None) == 128 + 256 * 2 + 512 * 2
    # ImageNet ResNet-18/34: timm's counts (resnet18, resnet34) + α per binarized output channel
    for name, depth, timm_count in (("18", (2, 2, 2, 2), 11689512), ("34", (3, 4, 6, 3), 21797672)):
        assert jf.count_params(f"resnet{name}") == timm_count
        alphas = sum(2 * d * c for d, c in zip(depth, (64, 128, 256, 512)))
        assert jf.count_params(f"biper_resnet{name}") == timm_count + alphas


def test_biper_resnet_trains_on_digits():
    x, y = digits(64, 16)
    model = jf.create_model("biper_resnet20", blocks=1)
    variables = numpy_variables(model, x)
    paths = [p for p, layer in B.binary_layers(model, variables, x).items()]
    assert len(paths) == 6
    tx = optax.adam(3e-3)
    params, stats = variables["params"], variables["batch_stats"]
    opt = tx.init(params)

    @fast_jit
    def step(params, stats, opt):
        def loss_fn(p):
            logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + B.biper_penalty(p, paths, 20.0, 0.037), (ce, new["batch_stats"])
        (loss, (ce, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, ce, grads

    losses = []
    for _ in range(25):
        params, stats, opt, ce, grads = step(params, stats, opt)
        losses.append(float(ce))
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert all(np.any(np.asarray(g["kernel"])) for p, g in ((p, _get(grads, p)) for p in paths))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_bibert_distillation_from_a_float_teacher_reduces_the_loss(bert_models):
    ids, mask, _ = bert_models
    teacher = Bert(**TINY_BERT)
    t_vars = numpy_variables(teacher, ids, mask)
    student = B.binarize(teacher, B.BIBERT)
    s_vars = B.calibrate(student, t_vars, ids, mask)  # the float checkpoint in the binarized host
    t_feats = D.collect(teacher, t_vars, ids, mask)
    assert len(t_feats["hidden"]) == 3 and t_feats["qkv"][0].shape == (2, 12, 3, 4, 10)
    tx = optax.adam(1e-3)
    params = s_vars["params"]
    opt = tx.init(params)
    labels = jnp.asarray([0, 2])

    @fast_jit
    def step(params, opt):
        def loss_fn(p):
            feats = D.collect(student, {"params": p}, ids, mask)
            return D.distillation_loss(D.BIBERT_DISTILL, feats, t_feats, labels)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, terms

    losses = []
    for _ in range(12):
        params, opt, loss, terms = step(params, opt)
        losses.append(float(loss))
    assert set(terms) == {"prediction", "labels", "hidden", "dmd"}
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0], losses


def test_binarized_bert_sharded_equals_single_device(bert_models):
    # BiBERT: every binary product is an exact integer, so the mesh changes nothing but float rounding.
    # (BiPFT's key-side estimator biases k_p, k_m have an exactly zero gradient, softmax being invariant
    # to a per-query shift: a leaf-relative comparison of pure rounding noise would be meaningless.)
    from jaxformers.sharding import make_mesh

    ids, mask, models = bert_models
    model, variables = models["bibert"]
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ids4 = jnp.concatenate([ids, ids[::-1]])
    sharded = shard_like_init(model, variables, ids4, mesh)
    assert_sharded_grads_match(model, variables, sharded, ids4, mesh)


def test_bad_input_names_the_problem():
    float_bert = Bert(**TINY_BERT)
    ids, mask = _tokens()
    with pytest.raises(ValueError, match="not binarized"):
        B.pack(float_bert, numpy_variables(float_bert, ids))
    with pytest.raises(TypeError, match="CrossViT has no binary form"):
        B.binarize(jf.create_model("crossvit_tiny_240"), B.BIBERT)
    with pytest.raises(ValueError, match="BinaryRecipe.attention must be one of"):
        B.BinaryRecipe(attention="softmax")
    with pytest.raises(ValueError, match="stage-1 weights are real-valued"):
        model = jf.create_model("biper_resnet20", blocks=1, binary=B.BIPER.replace(stage=1))
        x = jnp.zeros((1, 16, 16, 3))
        B.pack(model, numpy_variables(model, x), x)
    with pytest.raises(ValueError, match="takes no attention_window"):
        Bert(**TINY_BERT, binary=B.BIBERT, attention_window=2).init(jax.random.key(0), ids)
