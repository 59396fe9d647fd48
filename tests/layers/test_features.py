"""The dense-feature contract (jaxformers.layers.features): every registered image backbone's
forward_features / pre_logits / logits through jax.eval_shape, and the checks dense heads call."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxformers as jf
from jaxformers.layers import BackboneOutput, FeatureBackbone, check_image_strides, check_pyramid, pyramid_shapes


def _image_models() -> list[str]:
    return [n for n in jf.list_models()
            if len(jf.model_info(n).input_size) == 3 and jf.model_info(n).task == "classification"]


def _shallow(model):
    """The model with one block per stage (tracing cost; the strides and widths do not depend on depth)."""
    depth = getattr(model, "depth", None)
    if isinstance(depth, int):
        return model.clone(depth=1)
    if depth and isinstance(depth[0], (tuple, list)):  # CrossViT: (blocks per branch..., fusion depth) per encoder
        return model.clone(depth=tuple((1,) * (len(d) - 1) + (min(d[-1], 1),) for d in depth[:1]))
    if depth is not None:
        return model.clone(depth=(1,) * len(depth))
    if hasattr(model, "layers"):  # FIT's layer spec
        return model.clone(layers="(1)1(1)")
    return model


@pytest.mark.parametrize("name", _image_models())
def test_every_image_backbone_follows_the_contract(name):
    """{int stride: (B, H // stride, W // stride, C)} at the model's own input size, pre-logits (B, D) and
    logits (B, num_classes), all from one abstract pass (nothing is computed)."""
    model = _shallow(jf.create_model(name, num_classes=7))
    assert isinstance(model, FeatureBackbone), f"{name} is an image model but not a FeatureBackbone"
    h, w, c = jf.model_info(name).input_size
    x = jax.ShapeDtypeStruct((2, h, w, c), jnp.float32)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, output="all")[0], x)
    assert isinstance(out, BackboneOutput)
    assert out.features and all(type(s) is int for s in out.features), list(out.features)
    for s, m in out.features.items():
        assert m.ndim == 4 and m.shape[:3] == (2, h // s, w // s), (s, m.shape)
    check_pyramid(out.features, None, who=name, image_hw=(h, w))
    assert out.pre_logits.ndim == 2 and out.pre_logits.shape[0] == 2
    assert out.logits.shape == (2, 7)
    assert jax.tree_util.tree_structure(out.features).num_leaves == len(out.features)  # a plain pytree
    if name.startswith(("biformer_", "cswin_", "resnet")):  # hierarchical: the four dense-head strides
        assert sorted(out.features) == [4, 8, 16, 32]


def test_methods_and_pyramid_shapes():
    model = jf.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2)
    x = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="forward_features"), variables, x)
    assert {s: m.shape for s, m in feats.items()} == {8: (3, 4, 4, 16)}
    assert jax.eval_shape(lambda v, x: model.apply(v, x, method="pre_logits"), variables, x).shape == (3, 16)
    assert pyramid_shapes(model) == {8: (1, 4, 4, 16)}
    with pytest.raises(ValueError, match="output must be one of"):
        jax.eval_shape(lambda v, x: model.apply(v, x, output="stages"), variables, x)


def _maps(strides, size=64, batch=2, c=8):
    return {s: jnp.zeros((batch, size // s, size // s, c)) for s in strides}


def test_check_pyramid_accepts_and_selects():
    feats = _maps((4, 8, 16, 32))
    assert list(check_pyramid(feats, (8, 32), who="Head", image_hw=(64, 64))) == [8, 32]
    assert list(check_pyramid(feats, None, who="Head")) == [4, 8, 16, 32]


@pytest.mark.parametrize("features,match", [
    ({"stage1": jnp.zeros((2, 16, 16, 8)), "pre_logits": jnp.zeros((2, 8))},
     r"Mask2Former: backbone feature keys must be positive int strides.*'stage1'"),
    (_maps((16,)), r"Mask2Former needs backbone feature maps at strides \(4, 8, 16, 32\); the backbone gives "
                   r"strides \(16,\), missing \(4, 8, 32\)"),
    ({**_maps((4, 8, 16)), 32: jnp.zeros((2, 4, 8))}, r"stride-32 feature map must be NHWC.*\(2, 4, 8\)"),
    ({**_maps((4, 8, 16)), 32: jnp.zeros((3, 2, 2, 8))}, "disagree on the batch size: stride 32 has 3"),
    ({**_maps((4, 8, 16)), 32: jnp.zeros((2, 8, 2, 2))}, r"stride-32 feature map is 8x2 but a 64x64 input gives 2x2"),
    ([jnp.zeros((2, 16, 16, 8))], "a dict {stride: NHWC map}; got list"),
])
def test_check_pyramid_errors(features, match):
    with pytest.raises(ValueError, match=match):
        check_pyramid(features, who="Mask2Former", image_hw=(64, 64))


def test_check_image_strides():
    assert check_image_strides(jnp.zeros((1, 64, 96, 3)), (4, 8, 16, 32), who="Mask2Former") == (64, 96)
    with pytest.raises(ValueError, match=r"Mask2Former: the image is 100x64.*divisible by 32.*96x64 or 128x96"):
        check_image_strides((100, 64), (4, 8, 16, 32), who="Mask2Former")
    with pytest.raises(ValueError, match="divisible by 24"):  # lcm of the strides
        check_image_strides((36, 48), (8, 12), who="Head")
