"""P2AT: parameter counts of the official PyTorch model, its state-dict layout converted key for key,
live parity with the official code (when fetched), the OHEM loss against a NumPy reference, output
layout, the pyramid flag, sharding, training on the generated scenes, bad input."""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.traverse_util import flatten_dict

import jaxformers as jf
from jaxformers.convert.common import StateDict
from jaxformers.models.p2at import p2at_loss
from jaxformers.models.p2at_convert import convert_official_p2at
from jaxformers.segmentation import miou, ohem_cross_entropy, semantic_prediction, semantic_stats
from tests.helpers import (assert_sharded_forward_matches, fast_jit, image, load_official, numpy_variables,
                           segmentation_shapes, train_classifier)

# Parameter counts of the official models/P2AT.py (torchvision ResNets, 19 classes): inference build
# (is_train=False) and training build (is_train=True, with the two auxiliary heads).
OFFICIAL_PARAMS = {"p2at_s": (12_736_019, 12_812_729), "p2at_m": (22_844_179, 22_920_889),
                   "p2at_l": (25_276_435, 25_353_145)}
# p2at_official_keys.json: the official state dict's keys and shapes for P2AT("resnet18", is_train=True).
KEYS = pathlib.Path(__file__).parent / "p2at_official_keys.json"
TINY = dict(num_classes=6, dim=16, key_dim=4, num_heads=2, ssa_layers=1, aux_heads=True,
            backbone_overrides=dict(depth=(1, 1, 1, 1), channels=(16, 16, 32, 32)))


def _expected(model, size: int = 64) -> dict[str, tuple]:
    abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))))
    return {"/".join(k): v.shape for k, v in flatten_dict(abstract).items()}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_counts_equal_official(name):
    assert (jf.count_params(name), jf.count_params(name, aux_heads=True)) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("aux_heads", [True, False])
def test_official_state_dict_converts_key_for_key(aux_heads):
    """Every official key is consumed (a training-build checkpoint also loads into the inference build)
    and every variable of ours filled, with its shape."""
    keys = json.loads(KEYS.read_text())
    rng = np.random.default_rng(0)
    sd = StateDict({k: rng.standard_normal(s).astype(np.float32) for k, s in keys.items()})
    model = jf.create_model("p2at_s", aux_heads=aux_heads)
    expected = _expected(model)
    out = convert_official_p2at(sd, model, expected)
    assert sd.unused() == []
    assert sorted(out) == sorted(expected)
    for k, v in out.items():
        assert tuple(np.shape(v)) == tuple(expected[k]), k
    name = "deep_feature_processor.transformer_layers.1.attn.pool_feats_processor.conv2.conv.weight"
    kernel = out["params/deep_feature_processor/transformer_layers_1/attn/pool_feats_processor/conv2/conv/kernel"]
    np.testing.assert_array_equal(kernel, sd[name].transpose(2, 3, 1, 0))  # grouped: (3, 3, 192 / 64, 64)
    np.testing.assert_array_equal(out["params/P1_decoder/pwconv1_0/kernel"], sd["P1_decoder.pwconv1.0.weight"].T)
    np.testing.assert_array_equal(out["batch_stats/backbone/layer2_0/downsample/bn/var"],
                                  sd["layer2.0.downsample.1.running_var"])


def test_matches_official_pytorch(tmp_path):
    """p2at_s (training build, eval mode) on the official code's random weights, BN statistics perturbed."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    pytest.importorskip("torchsummary")
    official = load_official("P2AT", "models/P2AT.py")
    torch.manual_seed(0)
    ref = official.P2AT("resnet18", pretrained=False, num_classes=5, is_train=True).eval()
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if t.dtype.is_floating_point:
                t.add_(0.05 * torch.randn_like(t)) if not name.endswith("running_var") else t.uniform_(0.5, 1.5)
    torch.save(ref.state_dict(), tmp_path / "p2at_s.pth")
    variables = jf.load_pretrained("p2at_s", tmp_path / "p2at_s.pth", num_classes=5, aux_heads=True)
    model = jf.create_model("p2at_s", num_classes=5, aux_heads=True)
    x = np.random.default_rng(1).standard_normal((2, 64, 96, 3)).astype(np.float32)
    with torch.no_grad():
        expected = [o.numpy().transpose(0, 2, 3, 1) for o in ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))]
    got = fast_jit(lambda v, x: model.apply(v, x, aux=True))(variables, x)
    for e, g in zip(expected, got, strict=True):
        scale = np.abs(e).max()
        assert scale > 0.1
        np.testing.assert_allclose(np.asarray(g) / scale, e / scale, atol=2e-5)


def _ohem_numpy(logits, labels, threshold, min_kept, ignore=255):
    """The official OHEMCrossEntropyLoss._ohem_loss, in NumPy (NCHW logits as the official code)."""
    logits = logits.transpose(0, 3, 1, 2).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    valid = labels.reshape(-1) != ignore
    tgt = np.where(labels == ignore, 0, labels)
    prob = np.take_along_axis(p, tgt[:, None], 1).reshape(-1)
    losses = -np.log(prob)
    prob, losses = prob[valid], losses[valid]
    order = np.argsort(prob, kind="stable")
    prob, losses = prob[order], losses[order]
    thresh = max(prob[min(min_kept, prob.size - 1)], threshold)
    return losses[prob < thresh].mean()


@pytest.mark.parametrize("threshold,min_kept", [(0.9, 100), (0.7, 5), (0.3, 300)])
def test_ohem_matches_official_formula(threshold, min_kept):
    rng = np.random.default_rng(0)
    logits = (2.0 * rng.standard_normal((2, 8, 10, 4))).astype(np.float32)
    labels = rng.integers(0, 4, (2, 8, 10)).astype(np.int32)
    labels[0, :2] = 255  # void rows
    got = float(ohem_cross_entropy(logits, labels, threshold=threshold, min_kept=min_kept))
    np.testing.assert_allclose(got, _ohem_numpy(logits, labels, threshold, min_kept), rtol=1e-5)
    assert float(ohem_cross_entropy(logits, np.full_like(labels, 255))) == 0.0  # nothing labelled
    assert float(p2at_loss(logits, labels, threshold=threshold, min_kept=min_kept)) == pytest.approx(got, rel=1e-6)


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model("p2at_s", **TINY)
    return model, numpy_variables(model, image(1, 64))


def test_output_layout_and_pyramid_flag(tiny):
    model, variables = tiny
    x = image(2, 64)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 64, 64, 6)
    outs, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
    assert [o.shape for o in outs] == [(2, 64, 64, 6)] * 3
    # The intended pyramid ([pool1, pool2, pool3]) has the same parameters but computes something else.
    intended = model.clone(pyramid="intended")
    a, b = fast_jit(lambda v, x: (model.apply(v, x), intended.apply(v, x)))(variables, x)
    assert float(jnp.abs(a - b).max()) > 1e-3 * float(jnp.abs(a).max())


def test_sharded_equals_single_device(tiny):
    model, variables = tiny
    assert_sharded_forward_matches(model, variables, image(4, 64), tol=1e-4)


def test_trains_on_generated_scenes(tiny):
    """jit + grad: every parameter gets a gradient (auxiliary heads included); the loss falls and the
    training scenes' mIoU rises."""
    model, variables = tiny
    x, y = segmentation_shapes(8, 64)
    predict = fast_jit(lambda v: semantic_prediction(model.apply(v, x), (64, 64)))
    before = miou(semantic_stats(predict(variables), y, 6))
    losses, trained = train_classifier(model, variables, x, y, steps=20, loss=p2at_loss)
    after = miou(semantic_stats(predict(trained), y, 6))
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    assert after > before + 10, (before, after)


@pytest.mark.parametrize("shape,kwargs,match", [
    ((1, 48, 64, 3), {}, "48x64, but height and width must be divisible by 32"),
    ((1, 64, 64, 4), {}, "4 channels in its last axis but the model expects in_chans=3"),
    ((1, 64, 64, 3), {"aux": True, "model": {"aux_heads": False}}, "create the model with aux_heads=True"),
    ((1, 64, 64, 3), {"model": {"pyramid": "full"}}, "pyramid must be one of"),
])
def test_bad_inputs_raise_clear_errors(tiny, shape, kwargs, match):
    model, variables = tiny
    kwargs = dict(kwargs)
    model = model.clone(**kwargs.pop("model", {}))
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda v, x: model.apply(v, x, **kwargs), variables, jnp.zeros(shape))
