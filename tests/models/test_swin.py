"""Swin Transformer: timm counts, live timm parity (logits and the stride-keyed feature maps, the
official checkpoint layout too), the window mask, sharding, training, bad input."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.layers.window import shifted_window_mask, window_partition
from jaxformers.models.swin import TIMM_PARAMS
from tests.helpers import assert_sharded_forward_matches, assert_timm_backbone_parity, image, numpy_variables

NAME = "swin_tiny_patch4_window7_224"
TINY = dict(img_size=64, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=4, num_classes=10)


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model(NAME, **TINY, drop_path_rate=0.0)
    return model, numpy_variables(model, image(1, 64))


def test_param_counts_equal_timm():
    for name, expected in TIMM_PARAMS.items():
        assert jf.count_params(name) == expected, name


def _official_layout(sd):
    """timm keys -> the official checkpoint layout (patch merging at the end of the previous stage,
    ``head`` instead of ``head.fc``)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    return out


def test_timm_parity_logits_and_feature_maps(tmp_path):
    """Window 3 on a 64 px image: stage maps 16, 8, 4 are padded to multiples of 3 and shifted, the
    2x2 map of stage 4 shrinks the window; the official checkpoint layout loads to the same variables."""
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    assert_timm_backbone_parity(NAME, {**TINY, "window_size": 3}, _official_layout, tmp_path)


def test_shift_mask_separates_wrapped_regions():
    mask = shifted_window_mask(8, 8, (4, 4), (2, 2))
    assert mask.shape == (4, 16, 16)
    assert not mask[0].any()  # the top-left window holds one region
    # Bottom-right window: rows/cols 4-5 and 6-7 came from opposite sides of the map (4 regions).
    labels = np.asarray(window_partition(np.arange(64.0).reshape(1, 8, 8, 1), (4, 4)))[3].reshape(-1)
    rows, cols = labels // 8, labels % 8
    region = (rows >= 6) * 2 + (cols >= 6)
    np.testing.assert_array_equal(mask[3] == 0, region[:, None] == region[None, :])


def test_dense_contract_out_norms_and_always_partition(tiny):
    model, variables = tiny
    x = image(2, 64)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="forward_features"), variables, x)
    assert {k: v.shape for k, v in feats.items()} == {4: (2, 16, 16, 16), 8: (2, 8, 8, 32), 16: (2, 4, 4, 64),
                                                     32: (2, 2, 2, 128)}
    dense = jf.create_model(NAME, **{**TINY, "num_classes": 0}, always_partition=True, out_norms=True)
    shapes = jax.tree_util.tree_map(lambda a: a.shape, nn.unbox(jax.eval_shape(dense.init, jax.random.key(0), x))["params"])
    assert "norm" not in shapes and shapes["out_norm3"]["scale"] == (128,)
    # Windows never shrink: stage 4 (2x2 map) keeps the 4x4 window's 7x7 relative-position table.
    assert shapes["layers_3"]["blocks_0"]["attn"]["relative_position_bias_table"] == (49, 4)


def test_sharded_equals_single_device(tiny):
    model, variables = tiny
    assert_sharded_forward_matches(model, variables, image(4, 64), tol=1e-5)


def test_bad_inputs_raise_clear_errors(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match="72x72, but Swin needs height and width divisible by 32"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 72, 72, 3)))
    with pytest.raises(ValueError, match="in_chans=3"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 64, 64, 1)))
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        jax.eval_shape(jf.create_model(NAME, **{**TINY, "num_heads": (3, 2, 2, 4)}).init, jax.random.key(0),
                       jnp.zeros((1, 64, 64, 3)))
