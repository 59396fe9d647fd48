"""ECO-M2F (Mask2Former ``num_gates`` + ``jaxformers.compress.eco_m2f``): the gate's parameter count,
exit selection on given logits, targets on a toy PQ table, per-image early exit equal to the model
truncated at each image's exit (the pixel decoder, jitted and eager), the model's extra outputs, jit +
grad of the gate loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.compress.eco_m2f import exit_targets, gate_loss, per_image_pq
from jaxformers.models.mask2former import GatingFunction, MSDeformAttnPixelDecoder, select_exits
from tests.helpers import fast_jit, image, numpy_variables
from train.seg_data import NUM_CLASSES

NAME = "mask2former_swin_tiny_coco_panoptic"
# feature_size 64: GroupNorm(32) with one channel per group would make every token average the same.
TINY = dict(num_classes=NUM_CLASSES, img_size=64, feature_size=64, mask_feature_size=32, hidden_dim=32,
            encoder_layers=3, encoder_ffn_dim=64, decoder_layers=2, num_heads=2, dim_feedforward=64, num_queries=4,
            num_gates=2, backbone_overrides=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                                 window_size=2, drop_path_rate=0.0))


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model(NAME, **TINY)
    return model, jax.eval_shape(model.init, jax.random.key(0), image(2, 64))


def test_gate_parameter_count():
    # official GatingFunction(d_model=256, num_gates_cls=5): Linear(256 -> 5) = 1,285
    shapes = jax.eval_shape(GatingFunction(5).init, jax.random.key(0), jnp.zeros((1, 12, 256)))
    assert sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == 1285
    assert jf.count_params(NAME, num_gates=5) == 47_435_264 + 1285  # test_mask2former.py's count + the gate
    bias = GatingFunction(5).init(jax.random.key(0), jnp.ones((1, 3, 8)))["params"]["head"]["bias"]
    np.testing.assert_array_equal(nn_unbox(bias), 0.0)


def nn_unbox(x):
    import flax.linen as nn

    return np.asarray(nn.unbox(x))


def test_exit_selection_per_image():
    logits = jnp.array([[0.1, 0.9, 0.0, 0.0, 0.2], [3.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
    np.testing.assert_array_equal(select_exits(logits, 6), [3, 2, 6])  # official 6 layers, 5 gates: 2..6
    np.testing.assert_array_equal(select_exits(logits[:, :2], 3), [3, 2, 2])
    with pytest.raises(ValueError, match="5 gates need 1..encoder_layers=4"):
        select_exits(logits, 4)


def test_targets_on_a_toy_pq_table():
    pq = np.array([[0.50, 0.60, 0.62], [0.30, 0.30, 0.90]])
    beta = 0.1
    u = pq - beta * np.array([1, 2, 3])  # [[.4, .4, .32], [.2, .1, .6]]
    by_batch = np.exp(u) / np.exp(u).sum(0, keepdims=True)  # the official softmax over dim 0
    np.testing.assert_allclose(exit_targets(pq, beta), by_batch, rtol=1e-6)
    np.testing.assert_allclose(by_batch[:, 0], [1 / (1 + np.exp(-0.2)), 1 / (1 + np.exp(0.2))], rtol=1e-6)
    by_exit = np.exp(u) / np.exp(u).sum(1, keepdims=True)
    np.testing.assert_allclose(exit_targets(pq, beta, axis=-1), by_exit, rtol=1e-6)
    assert list(np.argmax(by_exit, 1)) == [0, 2]  # the beta trade-off: 0.62 at 3 layers is not worth it
    np.testing.assert_allclose(exit_targets(pq, 0.0, axis=-1)[0].argmax(), 2)
    # per-image PQ from per-class counts: class 0 PQ 0.8/(1 + 0.5), class 2 absent, class 1 0.9
    stats = {"tp": [[1, 1, 0]], "fp": [[1, 0, 0]], "fn": [[0, 0, 0]], "iou": [[0.8, 0.9, 0.0]]}
    np.testing.assert_allclose(per_image_pq(stats), [(0.8 / 1.5 + 0.9) / 2])
    with pytest.raises(ValueError, match="differ in shape"):
        gate_loss(jnp.zeros((2, 3)), jnp.zeros((2, 2)))


def _mixed_exit_params(params, apply, x):
    """Gate weights under which the two images of ``x`` take different exits."""
    params = jax.tree_util.tree_map(np.array, params)
    head = params["gate"]["head"] if "gate" in params else params["pixel_decoder"]["gate"]["head"]
    head["kernel"] = np.random.RandomState(0).randn(*np.shape(head["kernel"])).astype(np.float32)
    logits = np.asarray(apply(params, x))
    d = logits[:, 0] - logits[:, 1]
    assert abs(d[0] - d[1]) > 1e-3
    head["bias"] = np.array([-(d[0] + d[1]) / 2, 0.0], np.float32)
    return params


@pytest.fixture(scope="module")
def decoder():
    """The gated pixel decoder alone on random stride 4..32 maps of a 64 px image (cheap to compile)."""
    module = MSDeformAttnPixelDecoder(feature_size=64, mask_feature_size=32, encoder_layers=3, encoder_ffn_dim=64,
                                      num_heads=2, num_gates=2)
    rs = np.random.RandomState(1)
    feats = {s: rs.randn(2, 64 // s, 64 // s, 16).astype(np.float32) for s in (4, 8, 16, 32)}
    params = numpy_variables(module, feats)["params"]
    params = _mixed_exit_params(params, lambda p, f: module.apply({"params": p}, f)[3], feats)
    return module, params, feats


@pytest.mark.parametrize("jit", [True, False])
def test_early_exit_equals_the_decoder_truncated_at_each_images_exit(decoder, jit):
    """Jitted, all layers run and each image keeps its exit's output; eagerly only the layers up to
    the batch's deepest exit run."""
    module, params, feats = decoder
    mask, outs, _, logits = (fast_jit(module.apply) if jit else module.apply)({"params": params}, feats)
    exits = np.asarray(select_exits(logits, 3))
    assert sorted(exits.tolist()) == [2, 3]
    for i, k in enumerate(exits):
        one = {s: f[i:i + 1] for s, f in feats.items()}
        ref_mask, ref_outs, _, _ = module.apply({"params": params}, one, num_layers=int(k))
        np.testing.assert_allclose(mask[i], ref_mask[0], atol=2e-5, rtol=0)
        np.testing.assert_allclose(outs[0][i], ref_outs[0][0], atol=2e-5, rtol=0)
        other, _, _, _ = module.apply({"params": params}, one, num_layers=5 - int(k))
        assert np.abs(np.asarray(other[0]) - np.asarray(mask[i])).max() > 1e-4


def test_mask2former_outputs_add_the_gate_logits_and_each_images_exit(tiny):
    model, variables = tiny
    out = jax.eval_shape(model.apply, variables, image(2, 64))
    assert out["gate_logits"].shape == (2, 2) and out["encoder_exit"].shape == (2,)
    assert out["encoder_exit"].dtype == jnp.int32 and out["masks_queries_logits"].shape == (2, 4, 16, 16)


def test_gate_loss_jit_and_grad(decoder):
    module, params, feats = decoder
    targets = exit_targets(np.array([[0.5, 0.7], [0.6, 0.4]]), 0.05)

    @fast_jit
    def grads(p):
        return jax.value_and_grad(lambda q: gate_loss(module.apply({"params": q}, feats)[3], targets))(p)

    loss, g = grads(params)
    gate = g["gate"]["head"]
    assert np.isfinite(loss) and float(loss) > 0
    assert np.abs(np.asarray(nn_unbox(gate["kernel"]))).max() > 1e-6
    assert np.abs(np.asarray(nn_unbox(g["input_proj_0"]["kernel"]))).max() > 0  # reaches the projections
    # the official softmax over the batch ignores a per-exit shift: the bias gets no gradient ...
    assert np.abs(nn_unbox(gate["bias"])).max() < 1e-6  # (float rounding only)
    # ... over the exits it does
    by_exit = jax.grad(lambda b: gate_loss(b + jnp.zeros((1, 2)), exit_targets([[1.0, 0.0]], 0.0, -1), -1))(
        jnp.zeros(2))
    assert np.abs(np.asarray(by_exit)).max() > 1e-3
