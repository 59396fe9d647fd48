"""BiDA: parameter counts of the official BiDAnet, its state dict converted key for key, live parity with the
official ``models/BiDA.py`` (all four streams) and ``loss/mmd_loss.py`` (when fetched), the losses on worked
examples, the EMA update, shapes, sharding, training on generated cross-domain scenes, bad input."""
from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.convert.common import StateDict
from jaxformers.convert.pretrained import flat_variables
from jaxformers.models.bida import (
    OFFICIAL_PARAMS,
    BiDAOutput,
    bida_loss,
    convert_bida,
    distill_loss,
    ema_update,
    gaussian_mmd,
)
from jaxformers.registry import init_abstract
from tests.helpers import (
    assert_every_param_has_gradient,
    assert_sharded_forward_matches,
    fast_jit,
    load_official,
    numpy_variables,
)

# bida_official_keys.json: keys and shapes of the official BiDAnet(n_bands=48, num_classes=7) state dict.
KEYS = pathlib.Path(__file__).parent / "bida_official_keys.json"
REPO = "IEEE_TCSVT_BiDA"
TINY = dict(num_bands=12, num_classes=5, dim=32, depth=1, num_heads=4)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_counts_equal_official(name):
    assert jf.count_params(name) == OFFICIAL_PARAMS[name]


def test_official_state_dict_converts_key_for_key():
    """Every official key is consumed, every variable of ours filled with its shape; spot checks of the
    Conv3d (DHWIO), Conv2d (HWIO) and fused qkv layouts."""
    keys = json.loads(KEYS.read_text())
    rng = np.random.default_rng(0)
    spot = {"conv3d_features.0.weight", "conv2d_features.0.weight", "blocks.1.attn.qkv.weight"}
    sd = StateDict({k: rng.standard_normal(s).astype(np.float32) if k in spot else np.zeros(s, np.float32)
                    for k, s in keys.items()})
    model = jf.create_model("bida_houston")
    expected = {k: v.shape for k, v in flat_variables(init_abstract(model)).items()}
    out = convert_bida(sd, model, expected)
    assert sd.unused() == []
    assert sorted(out) == sorted(expected)
    for k, v in out.items():
        assert tuple(np.shape(v)) == tuple(expected[k]), k
    w3 = sd["conv3d_features.0.weight"]  # (8, 1, band, row, column)
    np.testing.assert_array_equal(out["params/tokenizer/conv3d/kernel"][2, 0, 1, 0], w3[:, 0, 2, 0, 1])
    np.testing.assert_array_equal(out["params/tokenizer/conv2d/kernel"][1, 2], sd["conv2d_features.0.weight"][:, :, 1, 2].T)
    qkv = out["params/blocks_1/qkv/kernel"]
    assert qkv.shape == (64, 3, 8, 8)
    np.testing.assert_array_equal(qkv.reshape(64, -1), sd["blocks.1.attn.qkv.weight"].T)


def test_matches_official_pytorch(tmp_path):
    """A small official BiDAnet (8 bands, 9x9 patches, dim 32, 2 blocks, no dropout) with perturbed random
    weights and BN statistics, loaded through ``load_pretrained``: the eval-mode target branch, then the
    four training-mode streams (batch statistics per domain) and the BN running mean they update; the
    official parameter counts of the three variants; the official MMD loss."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("einops")
    official = load_official(REPO, "models/BiDA.py", name="bida_official_model")
    for name, (bands, classes) in {"bida_houston": (48, 7), "bida_hyrank": (176, 12), "bida_mjg": (64, 5)}.items():
        counted = sum(p.numel() for p in official.BiDAnet(n_bands=bands, num_classes=classes, num_tokens=4, dim=64,
                                                          depth=3).parameters())
        assert counted == OFFICIAL_PARAMS[name], name
    torch.manual_seed(0)
    ref = official.BiDAnet(n_bands=8, num_classes=5, num_tokens=4, dim=32, depth=2, heads=4, drop_rate=0.0,
                           attn_drop_rate=0.0)
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.dtype.is_floating_point:
                t.add_(0.05 * torch.randn_like(t))
    torch.save(ref.state_dict(), tmp_path / "bida.pth")
    overrides = dict(num_bands=8, num_classes=5, patch_size=9, dim=32, depth=2, num_heads=4, drop_rate=0.0,
                     attn_drop_rate=0.0)
    variables = jf.load_pretrained("bida_houston", tmp_path / "bida.pth", **overrides)
    model = jf.create_model("bida_houston", **overrides)
    rng = np.random.default_rng(1)
    xs, xt = (rng.uniform(0, 1, (3, 9, 9, 8)).astype(np.float32) for _ in range(2))

    def to_torch(x):
        return torch.from_numpy(x.transpose(0, 3, 1, 2)[:, None].copy())

    with torch.no_grad():
        expected = ref.eval()(to_torch(xt), to_torch(xt))[1].numpy()
    np.testing.assert_allclose(np.asarray(fast_jit(model.apply)(variables, xt)), expected, atol=1e-4)
    with torch.no_grad():
        expected = [o.numpy() for o in ref.train()(to_torch(xs), to_torch(xt))]
    out, updates = fast_jit(lambda v, a, b: model.apply(v, a, b, train=True, mutable=["batch_stats"]))(variables, xs, xt)
    assert isinstance(out, BiDAOutput)
    for got, want, stream in zip(out, expected, BiDAOutput._fields):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, err_msg=stream)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["tokenizer"]["bn2d"]["mean"]),
                               ref.conv2d_features[1].running_mean.numpy(), atol=1e-5)
    mmd = load_official(REPO, "loss/mmd_loss.py", name="bida_official_mmd").MMD_loss()
    a, b = rng.standard_normal((2, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(float(gaussian_mmd(a, b)), float(mmd(torch.from_numpy(a), torch.from_numpy(b))),
                               rtol=1e-5, atol=1e-6)


def _mmd_numpy(a, b, mul=2.0, num=5):
    """The official MMD_loss written out with loops."""
    total = np.concatenate([a, b]).astype(np.float64)
    m, n = len(total), len(a)
    d2 = np.array([[np.sum((x - y) ** 2) for y in total] for x in total])
    bw = d2.sum() / (m * m - m) / mul ** (num // 2)
    k = sum(np.exp(-d2 / (bw * mul ** i)) for i in range(num))
    return np.mean(k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_losses_on_worked_examples():
    """MMD of the points 0 and 1: the bandwidth is 2 / 2 = 1, so the kernels are 0.25, 0.5, 1, 2, 4 and
    MMD = 2 * 5 - 2 * sum_i exp(-1 / bw_i); MMD of a batch with itself is 0; random batches equal the
    official formula in NumPy. Distillation of a uniform teacher against the student logits (log 3, 0):
    (-log 3/4 - log 1/4) / 2. The whole objective against NumPy, with and without the alignment."""
    got = float(gaussian_mmd(jnp.zeros((1, 1)), jnp.ones((1, 1))))
    assert got == pytest.approx(10 - 2 * sum(math.exp(-1 / bw) for bw in (0.25, 0.5, 1, 2, 4)), rel=1e-6)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 6, 5)).astype(np.float32)
    assert float(gaussian_mmd(a, a)) == 0.0
    assert float(gaussian_mmd(a, b)) == pytest.approx(_mmd_numpy(a, b), rel=1e-5)
    got = float(distill_loss(jnp.zeros((1, 2)), jnp.array([[math.log(3.0), 0.0]])))
    assert got == pytest.approx(0.5 * math.log(16 / 3), rel=1e-6)

    out = BiDAOutput(*rng.standard_normal((4, 6, 5)).astype(np.float32))
    teacher = BiDAOutput(*rng.standard_normal((4, 6, 5)).astype(np.float32))
    labels = rng.integers(0, 5, 6)

    def ce(p, logits):
        return np.mean(np.sum(-p * np.log(_softmax(logits)), -1))

    def consistency(s, t):  # the official double softmax, over classes and batch
        return np.sum((_softmax(_softmax(s)) - _softmax(_softmax(t))) ** 2) / 5 / 6

    cls = ce(np.eye(5)[labels], out.source)
    distill = ce(_softmax(out.fusion), out.target) + ce(_softmax(out.fusion_source), out.source)
    con = consistency(out.target, teacher.target) + consistency(out.source, teacher.source)
    for align in (False, True):
        loss, terms = bida_loss(out, teacher, labels, align=align)
        alignment = _mmd_numpy(out.source, out.target) / 2 if align else 0.0
        assert float(terms["distillation"]) == pytest.approx(distill, rel=1e-5)
        assert float(terms["consistency"]) == pytest.approx(con, rel=1e-5)
        assert float(loss) == pytest.approx(cls + 0.1 * (alignment + distill) + 1.0 * con, rel=1e-5)


def test_ema_update():
    """alpha = min(1 - 1 / (step + 1), 0.999): the mean of the two after step 1, 0.999 late in training."""
    t, s = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 6.0])}
    np.testing.assert_allclose(ema_update(t, s, 1)["w"], [2.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(ema_update(t, s, 9)["w"], 0.9 * t["w"] + 0.1 * s["w"], rtol=1e-6)
    np.testing.assert_allclose(ema_update(t, s, 5000)["w"], 0.999 * t["w"] + 0.001 * s["w"], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model("bida_houston", **TINY)
    return model, numpy_variables(model, jnp.zeros((1, 13, 13, 12)))


def test_output_shapes(tiny):
    model, variables = tiny
    x = jnp.zeros((2, 13, 13, 12))
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 5)
    out = jax.eval_shape(lambda v, a, b: model.apply(v, a, b, train=True, rngs={"dropout": jax.random.key(0)},
                                                     mutable=["batch_stats"])[0], variables, x, x)
    assert isinstance(out, BiDAOutput) and all(o.shape == (2, 5) for o in out)


def test_sharded_equals_single_device(tiny):
    model, variables = tiny
    x = jax.random.uniform(jax.random.key(1), (4, 13, 13, 12))
    assert_sharded_forward_matches(model, variables, x, tol=1e-4)


def test_trains_on_generated_cross_domain_scenes(tiny):
    """jit + grad on the generated source / target scenes (5 classes, 12 bands, a smooth spectral gain and
    shift between the domains): every parameter but the official's unused ``token_wA`` / ``token_wV``
    gets a gradient, the BiDA objective (alignment from step 10) falls, and the target-branch accuracy
    on the unlabelled target scene ends above chance."""
    from train.hyperspectral import CrossDomainScenes, accuracy, init_state, make_train_step

    model, variables = tiny
    data = CrossDomainScenes(num_classes=5, num_bands=12, size=32, seed=0)
    tx = optax.adam(3e-3)
    state = init_state(variables, numpy_variables(model, jnp.zeros((1, 13, 13, 12)), seed=1)["params"], tx)
    step = fast_jit(make_train_step(model, tx))
    losses = []
    for i in range(24):
        xs, ys = data.patches("source", 32, seed=2 * i)
        xt, _ = data.patches("target", 32, seed=2 * i + 1)
        state, loss, terms, grads = step(state, xs, ys, xt, jax.random.key(i), i >= 10)
        losses.append(float(loss))
        if i == 0:
            unused = {k: grads.pop(k) for k in ("token_wA", "token_wV")}
            assert not any(np.any(np.asarray(g)) for g in unused.values())
            assert_every_param_has_gradient(grads)
    assert np.all(np.isfinite(losses)) and float(terms["alignment"]) > 0
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    xt, yt = data.patches("target")
    trained = {"params": state.params, "batch_stats": state.batch_stats}
    oa = accuracy(model, trained, xt, yt)
    assert oa > 0.35, oa


@pytest.mark.parametrize("shape,dtype,target,match", [
    ((2, 13, 13, 7), jnp.float32, None, "cube has 7 spectral bands but the tokenizer was built for num_bands=12"),
    ((2, 11, 11, 12), jnp.float32, None, "cube patches are 11x11 pixels but the model was built for patch_size=13"),
    ((13, 13, 12), jnp.float32, None, r"cube must be a hyperspectral patch batch \(batch, height, width, bands\)"),
    ((2, 13, 13, 12), jnp.int32, None, "cube must be floating point"),
    ((2, 13, 13, 12), jnp.float32, (2, 13, 13, 10), "target has 10 spectral bands"),
    ((2, 13, 13, 12), jnp.float32, (3, 13, 13, 12), "source and target batches must have the same size"),
])
def test_bad_inputs_raise_clear_errors(tiny, shape, dtype, target, match):
    model, variables = tiny
    args = (jnp.zeros(shape, dtype),) + (() if target is None else (jnp.zeros(target),))
    with pytest.raises((ValueError, TypeError), match=match):
        jax.eval_shape(lambda v, *a: model.apply(v, *a), variables, *args)
