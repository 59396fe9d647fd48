"""ResNet: timm parameter counts, live timm parity (logits and the four feature maps), BatchNorm,
the convolution seam for binarized variants, sharding, training, and input errors."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.layers import logical
from jaxformers.models.resnet import TIMM_PARAMS, ResidualBlock
from jaxformers.registry import count_params
from jaxformers.sharding import make_mesh, unsharded_params
from tests.helpers import (assert_sharded_grads_match, digits, fast_jit, image, train_classifier,
                           model_and_features, numpy_variables, shard_like_init, single_and_sharded)

# One block per stage, narrow: BasicBlock (resnet18) and Bottleneck (resnet50, 4x expansion) variants.
TINY = {"resnet18": dict(depth=(1, 1, 1, 1), channels=(8, 16, 16, 16), stem_channels=8, num_classes=10),
        "resnet50": dict(depth=(1, 1, 1, 1), channels=(4, 8, 8, 8), stem_channels=8, num_classes=10)}


@pytest.fixture(scope="module")
def tiny():
    """Tiny resnet18, NumPy-drawn variables (non-trivial BN statistics) and its outputs on ``image(2, 32)``."""
    return model_and_features("resnet18", image(2, 32), **TINY["resnet18"])


def test_param_counts_equal_timm():
    # timm.create_model(name, pretrained=False), counted with timm 1.0.31 (BN statistics excluded)
    counts = {name: count_params(name) for name in TIMM_PARAMS}
    assert counts == TIMM_PARAMS == {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                                     "resnet101": 44_549_160, "resnet152": 60_192_808}
    assert jf.list_models("resnet*") == sorted(TIMM_PARAMS)
    info = jf.model_info("resnet50")
    assert (info.arxiv, info.repo, info.params_m) == ("1512.03385", "huggingface/pytorch-image-models", 25.56)


def test_contract_batch_stats_and_zero_init(tiny):
    model, variables, out = tiny
    assert {s: m.shape for s, m in out.features.items()} == {
        4: (2, 8, 8, 8), 8: (2, 4, 4, 16), 16: (2, 2, 2, 16), 32: (2, 1, 1, 16)}
    fc = variables["params"]["fc"]
    np.testing.assert_allclose(out.pre_logits @ fc["kernel"] + fc["bias"], out.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.pre_logits, out.features[32].mean(axis=(1, 2)), rtol=1e-6)
    assert float(jnp.std(out.logits[0] - out.logits[1])) > 1e-3
    assert set(variables["batch_stats"]) == {"bn1", "layer1_0", "layer2_0", "layer3_0", "layer4_0"}
    assert set(variables["batch_stats"]["layer2_0"]) == {"bn1", "bn2", "downsample"}
    assert "downsample" not in variables["params"]["layer1_0"]  # 8 -> 8 channels, stride 1: identity shortcut
    _, updated = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables,
                                image(2, 32))
    assert jax.tree_util.tree_structure(updated) == jax.tree_util.tree_structure({"batch_stats": variables["batch_stats"]})
    # timm's zero_init_last: each block's last BN starts at gamma 0 (the block starts as its shortcut)
    for kind, last in (("basic", "bn2"), ("bottleneck", "bn3")):
        params = ResidualBlock(4, kind).init(jax.random.key(0), jnp.ones((1, 4, 4, 16)))["params"]
        assert not np.any(nn.unbox(params)[last]["scale"]) and np.all(nn.unbox(params)["bn1"]["scale"] == 1)


def _timm_model(name: str, torch, timm):
    """timm's ``name`` at the tiny config, with random weights and non-trivial BN statistics."""
    cfg = TINY[name]
    torch.manual_seed(0)  # timm's 7x7 stem is always 64 wide
    model = timm.create_model(name, pretrained=False, layers=cfg["depth"], channels=cfg["channels"],
                              num_classes=cfg["num_classes"]).eval()
    with torch.no_grad():  # timm's He-normal convolutions; BN (gamma 0 in zero_init_last) and fc made non-trivial
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
                m.running_mean.copy_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.copy_(1.0 + 0.5 * torch.rand_like(m.running_var))
        model.fc.weight.copy_(0.3 * torch.randn_like(model.fc.weight))
        model.fc.bias.copy_(0.1 * torch.randn_like(model.fc.bias))
    return model


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_logits_and_feature_maps_match_timm(name, tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    ref = _timm_model(name, torch, timm)
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    cfg = {**TINY[name], "stem_channels": 64}
    variables = jf.load_pretrained(name, path, **cfg)  # strict: every timm key used, every shape checked
    model = jf.create_model(name, **cfg)
    x = np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32)
    with torch.no_grad():
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        ref_logits = ref(xt).numpy()
        ref_maps = ref.forward_intermediates(xt, indices=(1, 2, 3, 4), intermediates_only=True)
    out = fast_jit(lambda v, x: model.apply(v, x, output="all"))(variables, x)
    assert np.abs(ref_logits).max() > 0.1
    np.testing.assert_allclose(out.logits, ref_logits, atol=1e-4, rtol=0)
    assert sorted(out.features) == [4, 8, 16, 32]
    for s, m in zip((4, 8, 16, 32), ref_maps):
        m = m.numpy().transpose(0, 2, 3, 1)
        assert np.abs(m).max() > 0.1
        np.testing.assert_allclose(out.features[s], m, atol=1e-4, rtol=0, err_msg=f"stride {s}")


class SignConv(nn.Module):
    """A stand-in binary convolution built through the ``conv`` seam: sign(x) (*) sign(kernel), same param name."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: int = 0
    use_bias: bool = False
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", logical(self.kernel_init, (None, None, "conv_in", "conv_out")),
                            (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
        p = [(self.padding, self.padding)] * 2
        return jax.lax.conv_general_dilated(jnp.sign(x), jnp.sign(kernel), (self.strides,) * 2, p,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_conv_and_act_seam_for_binarized_variants(tiny):
    model, variables, out = tiny
    names = []

    def recording_sign_conv(*args, name=None, **kw):
        names.append(name)
        return SignConv(*args, name=name, **kw)

    binary = model.clone(conv=recording_sign_conv, act=lambda x: jnp.clip(x, -1.0, 1.0))  # BiPer: hardtanh
    x = image(2, 32)

    def shapes(m):
        return jax.tree_util.tree_map(jnp.shape, nn.unbox(jax.eval_shape(m.init, jax.random.key(0), x)))

    assert shapes(binary) == shapes(model)  # same names and shapes: float checkpoints load unchanged
    assert names == ["conv1", "conv2"] * 4  # only the residual branches: stem, shortcuts and fc stay float
    logits = jax.jit(binary.apply)(variables, x)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert not np.allclose(logits, out.logits, atol=1e-3)


def test_sharded_equals_single_device(tiny):
    model, variables, _ = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = image(4, 32)
    sharded_vars = shard_like_init(model, variables, x, mesh)
    assert unsharded_params(sharded_vars, mesh, min_size=1024) == []  # conv_out / embed split over fsdp
    # Training mode: BatchNorm statistics are global over the sharded batch.
    fwd = fast_jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    (single, single_stats), (sharded, sharded_stats) = single_and_sharded(fwd, variables, sharded_vars, x, mesh)
    assert float(jnp.std(single)) > 1e-3
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                           sharded_stats, single_stats)
    assert_sharded_grads_match(model, variables, sharded_vars, x, mesh)


def test_trains_on_digits():
    model = jf.create_model("resnet18", **TINY["resnet18"], drop_path_rate=0.1)
    x, y = digits(64, 32)
    variables = numpy_variables(model, x[:2])
    losses, trained = train_classifier(model, variables, x, y, steps=15)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    assert not np.allclose(trained["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])


def test_bad_inputs_raise_clear_errors(tiny):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match="in_chans=3"):
        model.apply(variables, jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="output must be one of"):
        model.apply(variables, image(1, 32), output="stage4")
    with pytest.raises(ValueError, match="block must be 'basic' or 'bottleneck'"):
        jax.eval_shape(jf.create_model("resnet18", block="wide").init, jax.random.key(0), image(1, 32))
    with pytest.raises(ValueError, match="depth and channels need 4 entries"):
        jax.eval_shape(jf.create_model("resnet18", depth=(2, 2, 2)).init, jax.random.key(0), image(1, 32))
