"""ConvNeXt: timm counts, live timm parity (logits and the stride-keyed feature maps; timm and official
checkpoint layouts), sharding, training, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxformers as jf
from jaxformers.models.convnext import TIMM_PARAMS
from tests.helpers import assert_sharded_forward_matches, assert_timm_backbone_parity, image, numpy_variables

NAME = "convnext_tiny"
TINY = dict(depths=(1, 2, 1, 1), dims=(16, 32, 32, 64), num_classes=10)


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model(NAME, **TINY)
    return model, numpy_variables(model, image(1, 64))


def test_param_counts_equal_timm():
    for name, expected in TIMM_PARAMS.items():
        assert jf.count_params(name) == expected, name


def _official_layout(sd):
    """timm keys -> the official facebookresearch/ConvNeXt names (downsample_layers, dwconv, pwconv)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("stem.", "downsample_layers.0.").replace("head.fc.", "head.").replace("head.norm.", "norm.")
        k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        k = k.replace(".blocks.", ".")
        for i in range(1, 4):
            k = k.replace(f"stages.{i}.downsample.", f"downsample_layers.{i}.")
        out[k] = v
    return out


def test_timm_parity_logits_and_feature_maps(tmp_path):
    """timm parity; the official checkpoint layout loads to the same variables."""
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    assert_timm_backbone_parity(NAME, TINY, _official_layout, tmp_path)


def test_sharded_equals_single_device(tiny):
    model, variables = tiny
    assert_sharded_forward_matches(model, variables, image(4, 64), tol=1e-5)


def test_dense_contract_and_bad_inputs(tiny):
    model, variables = tiny
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="forward_features"), variables, image(2, 64))
    assert {k: v.shape for k, v in feats.items()} == {4: (2, 16, 16, 16), 8: (2, 8, 8, 32), 16: (2, 4, 4, 32),
                                                     32: (2, 2, 2, 64)}
    with pytest.raises(ValueError, match="48x48, but ConvNeXt needs height and width divisible by 32"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 48, 48, 3)))
    with pytest.raises(ValueError, match="in_chans=3"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 64, 64, 4)))
