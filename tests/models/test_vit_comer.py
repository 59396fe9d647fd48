"""ViT-CoMer + UperNet: parameter counts (the official README's 38.7M / 61.4M / 144.7M), the
feature pyramid by stride, key-for-key conversion of the official state dict, live parity with the
official PyTorch backbone (Traffic-X/ViT-CoMer fetched to /work/ext; skipped where absent), jit +
grad, sharded == single device, training on the generated segmentation scenes (loss falls, mIoU
rises), UperNet over another backbone, and clear errors for bad input."""
from __future__ import annotations

import json
import math
import pathlib
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

import jaxformers as jf
from jaxformers.convert.common import StateDict
from jaxformers.models.upernet import UperNet, UperNetOutput, adaptive_avg_pool, upernet_loss
from jaxformers.models.vit_comer_convert import convert_vit_comer
from jaxformers.registry import init_abstract
from jaxformers.segmentation import miou, semantic_stats
from jaxformers.segmentation.semantic import semantic_prediction
from jaxformers.sharding import make_mesh
from tests.helpers import (OFFICIAL_CODE, fast_jit, image, load_official, numpy_variables, segmentation_shapes,
                           shard_like_init, single_and_sharded, train_classifier)

# A tiny ViT-CoMer: 4 ViT blocks, one per interaction (the last with the 4 extra CTI steps), value
# channels halved (deform_ratio 0.5), a 2x2 position table resized to the 4x4 patch grid of 64 px images.
TINY = dict(embed_dim=32, depth=4, num_heads=2, deform_num_heads=4, deform_ratio=0.5, dim_ratio=2.0, conv_inplane=8,
            interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)), pretrain_size=32, drop_path_rate=0.1, img_size=64)
# The compiled tests (sharding, training) run it without the extra CTI steps and drop path (random bits
# in ~20 places: compile time); the parity test and the key-for-key test cover the extra steps.
FAST = dict(TINY, use_extra_cti=False, drop_path_rate=0.0)
HEAD = dict(num_classes=6, channels=16, aux_channels=8)
STEPS = 8
KEYS = pathlib.Path(__file__).parent / "vit_comer_official_keys.json"


def test_param_counts_match_the_paper_and_the_official_backbone():
    # The official README's UperNet counts (ADE20K, 150 classes, auxiliary FCN head included) and the
    # official ViTCoMer backbones' counts (run with the stubs of _official_vit_comer and recorded). The
    # count does not depend on the image size, so the models are traced at 64 px.
    for v, paper, official in (("tiny", 38.7e6, 10_619_360), ("small", 61.4e6, 31_280_480),
                               ("base", 144.7e6, 110_603_648)):
        model = jf.create_model(f"upernet_vit_comer_{v}", backbone_overrides=dict(img_size=64))
        params = nn.unbox(init_abstract(model)["params"])
        n = sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
        assert abs(n - paper) / paper < 0.002, (v, n)
        assert sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params["backbone"])) == official, v


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model("upernet_vit_comer_tiny", backbone_overrides=FAST, **HEAD)
    variables = numpy_variables(model, image(1, 64))
    return model, variables, fast_jit(model.apply)


def test_feature_pyramid_and_logits_by_stride(tiny):
    model, variables, _ = tiny
    backbone = model.backbone
    bvars = {k: v["backbone"] for k, v in variables.items()}
    x = jnp.zeros((2, 64, 96, 3))
    feats = jax.eval_shape(lambda v, x: backbone.apply(v, x, method="forward_features"), bvars, x)
    assert {s: f.shape for s, f in feats.items()} == {s: (2, 64 // s, 96 // s, 32) for s in (4, 8, 16, 32)}
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                  rngs={"dropout": jax.random.key(0)})[0], variables, x)
    assert isinstance(out, UperNetOutput)
    assert out.logits.shape == (2, 16, 24, 6) and out.aux_logits.shape == (2, 4, 6, 6)


def test_official_state_dict_converts_key_for_key():
    """The official backbone's state-dict keys and shapes (vit_comer_official_keys.json, written from
    Traffic-X/ViT-CoMer's ViTCoMer with TINY's config) plus mmsegmentation's UPerHead / FCNHead keys:
    every key consumed, every variable of ours filled with its shape."""
    keys = json.loads(KEYS.read_text())
    model = jf.create_model("upernet_vit_comer_tiny", backbone_overrides=TINY, **HEAD)
    abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))))
    expected = {"/".join(k): v.shape for k, v in flatten_dict(abstract).items()}
    head = {}
    for prefix, shapes in (("decode_head", {"psp_modules.{i}.1": (16, 32, 1, 1), "lateral_convs.{i}": (16, 32, 1, 1),
                                            "fpn_convs.{i}": (16, 16, 3, 3)}),):
        for name, shape in shapes.items():
            for i in range(4 if name.startswith("psp") else 3):
                head.update(_conv_module(f"{prefix}.{name.format(i=i)}", shape))
    head.update(_conv_module("decode_head.bottleneck", (16, 32 + 4 * 16, 3, 3)))
    head.update(_conv_module("decode_head.fpn_bottleneck", (16, 64, 3, 3)))
    head.update(_conv_module("auxiliary_head.convs.0", (8, 32, 3, 3)))
    for prefix, c in (("decode_head", 16), ("auxiliary_head", 8)):
        head.update({f"{prefix}.conv_seg.weight": (6, c, 1, 1), f"{prefix}.conv_seg.bias": (6,)})
    rng = np.random.default_rng(0)
    all_keys = {**{"backbone." + k: v for k, v in keys.items()}, **head}
    sd = StateDict({k: rng.standard_normal(s).astype(np.float32) for k, s in all_keys.items()})
    out = convert_vit_comer(sd, model, expected)
    assert sd.unused() == []
    assert sorted(out) == sorted(expected)
    for k, v in out.items():
        assert tuple(np.shape(v)) == tuple(expected[k]), k
    np.testing.assert_array_equal(out["params/backbone/interactions_3/extra_ctis_2/cfinter/attn/value_proj/kernel"],
                                  sd["backbone.interactions.3.extra_CTIs.2.cfinter.attn.value_proj.weight"].T)
    np.testing.assert_array_equal(out["batch_stats/decode_head/psp_modules_1/bn/var"],
                                  sd["decode_head.psp_modules.1.1.bn.running_var"])
    # a backbone-only checkpoint (no "backbone." prefix) converts into the backbone on its own
    bare = StateDict({k: rng.standard_normal(s).astype(np.float32) for k, s in keys.items()})
    bexp = {k.replace("/backbone/", "/", 1): s for k, s in expected.items() if "/backbone/" in k}
    assert sorted(convert_vit_comer(bare, model.backbone, bexp)) == sorted(bexp) and bare.unused() == []


def _conv_module(prefix, shape):
    c = shape[0]
    return {f"{prefix}.conv.weight": shape, f"{prefix}.bn.weight": (c,), f"{prefix}.bn.bias": (c,),
            f"{prefix}.bn.running_mean": (c,), f"{prefix}.bn.running_var": (c,), f"{prefix}.bn.num_batches_tracked": ()}


def _official_vit_comer():
    """The official ViTCoMer class, its compiled deformable-attention op replaced by the repository's own
    ``ms_deform_attn_core_pytorch`` and the mmcv / mmseg registry imports stubbed."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    root = OFFICIAL_CODE / "ViT-CoMer"
    if not (root / "segmentation/mmseg_custom/models/backbones/vit_comer.py").exists():
        pytest.skip(f"the official ViT-CoMer code is not fetched to {OFFICIAL_CODE}")

    def stub(name, **attrs):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        return module

    registry = types.SimpleNamespace(register_module=lambda *a, **k: (lambda cls: cls))
    stubs = {"MultiScaleDeformableAttention": stub("MultiScaleDeformableAttention"),
             "mmcv": stub("mmcv"), "mmcv.runner": stub("mmcv.runner", BaseModule=torch.nn.Module),
             "mmcv_custom": stub("mmcv_custom", my_load_checkpoint=None), "mmseg": stub("mmseg"),
             "mmseg.utils": stub("mmseg.utils", get_root_logger=lambda: None), "mmseg.models": stub("mmseg.models"),
             "mmseg.models.builder": stub("mmseg.models.builder", BACKBONES=registry)}
    func = load_official("ViT-CoMer", "detection/ops/functions/ms_deform_attn_func.py", "ops.functions.ms_deform_attn_func",
                         path_entry="detection", stubs=stubs)

    def core(value, shapes, level_start, locations, weights, im2col_step):
        return func.ms_deform_attn_core_pytorch(value, [tuple(int(v) for v in s) for s in shapes], locations, weights)

    func.MSDeformAttnFunction.apply = staticmethod(core)
    if "comer_backbones" not in sys.modules:
        package = stub("comer_backbones")
        package.__path__ = [str(root / "segmentation/mmseg_custom/models/backbones")]
        sys.modules["comer_backbones"] = package
    import importlib

    return importlib.import_module("comer_backbones.vit_comer").ViTCoMer


def _official_tiny():
    import torch

    cls = _official_vit_comer()
    torch.manual_seed(0)
    ref = cls(pretrain_size=32, img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4,
              drop_path_rate=0.0, conv_inplane=8, n_points=4, deform_num_heads=4, cffn_ratio=0.25, deform_ratio=0.5,
              dim_ratio=2.0, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], window_attn=[False] * 4,
              window_size=[None] * 4).eval()
    with torch.no_grad():  # every weight non-trivial (gamma starts at 0), BN statistics too
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, b in ref.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(1.0 + 0.2 * torch.rand_like(b))
    return ref


def test_backbone_matches_official_pytorch(tmp_path):
    import torch

    ref = _official_tiny()
    path = tmp_path / "vit_comer.pth"
    torch.save(ref.state_dict(), path)
    variables = jf.load_pretrained("vit_comer_tiny", path, **TINY)
    model = jf.create_model("vit_comer_tiny", **TINY)
    x = np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32)
    with torch.no_grad():
        want = [f.numpy().transpose(0, 2, 3, 1) for f in ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))]
    got = fast_jit(lambda v, x: model.apply(v, x, method="forward_features"))(variables, x)
    assert sum(p.numel() for p in ref.parameters()) == sum(np.size(p) for p in jax.tree_util.tree_leaves(
        variables["params"]))
    for s, w in zip((4, 8, 16, 32), want):
        assert np.abs(w).max() > 0.5
        np.testing.assert_allclose(np.asarray(got[s]), w, atol=2e-4 * np.abs(w).max(), rtol=0, err_msg=f"stride {s}")


def test_sharded_equals_single_device(tiny):
    model, variables, apply = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x, _ = segmentation_shapes(4, 64)
    sharded = shard_like_init(model, variables, x, mesh)
    single, multi = single_and_sharded(apply, variables, sharded, x, mesh)
    np.testing.assert_allclose(np.asarray(multi), np.asarray(single), atol=1e-4 * float(np.abs(single).max()))


def test_jit_grad_trains_on_generated_scenes_loss_falls_miou_rises(tiny):
    """Every parameter gets a gradient (train_classifier checks it at the first step), the UperNet loss
    (decode + 0.4 x auxiliary cross-entropy) falls and the mIoU on the scenes rises."""
    model, variables, apply = tiny
    x, y = segmentation_shapes(4, 64)
    before = _miou(apply, variables, x, y)
    losses, trained = train_classifier(model, variables, x, y, steps=STEPS, loss=upernet_loss,
                                       tx=optax.adamw(4e-3, weight_decay=0.01))
    after = _miou(apply, trained, x, y)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
    assert after > before + 5, (before, after)  # percent


def _miou(apply, variables, x, y):
    pred = semantic_prediction(apply(variables, x), y.shape[1:])
    return float(miou(semantic_stats(pred, y, 6)))


def test_upernet_over_another_backbone_and_bad_input(tiny):
    model, variables, _ = tiny
    resnet = UperNet(backbone=jf.create_model("resnet18", num_classes=0), num_classes=5, channels=16, aux_channels=8)
    out = jax.eval_shape(lambda x: resnet.init_with_output(jax.random.key(0), x)[0], image(1, 64))
    assert out.shape == (1, 16, 16, 5)
    vit = UperNet(backbone=jf.create_model("vit_tiny_patch16_224", img_size=64, depth=1), num_classes=5)
    with pytest.raises(ValueError, match=r"needs backbone feature maps at strides \(4, 8, 16, 32\).*missing \(4, 8, 32\)"):
        jax.eval_shape(lambda x: vit.init(jax.random.key(0), x), image(1, 64))
    with pytest.raises(ValueError, match=r"48x48.*divisible by 32"):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, image(1, 48))
    with pytest.raises(ValueError, match="interaction_indexes"):
        jf.count_params("vit_comer_tiny", depth=4)
    with pytest.raises(ValueError, match="4 groups"):
        jf.count_params("vit_comer_tiny", depth=2, interaction_indexes=((0, 0), (1, 1)))
    # adaptive pooling as torch's AdaptiveAvgPool2d: uneven cells overlap
    z = jnp.arange(5.0).reshape(1, 5, 1, 1) * jnp.ones((1, 5, 3, 1))
    np.testing.assert_allclose(adaptive_avg_pool(z, 3)[0, :, 0, 0], [0.5, 2.0, 3.5])
