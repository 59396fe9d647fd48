"""SAM-UNet: official parameter counts (total and trainable), the official state dict converted key for
key, live parity with Hhankyangg/sam-unet and SAM's image encoder with the segment_anything package
(random weights, skipped where absent), box-prompted outputs, the frozen encoder in training (no
gradient, no optimizer state, bit-identical), loss falling on the generated scenes, sharding, bad input."""
from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

import jaxformers as jf
from jaxformers.convert.common import StateDict
from jaxformers.models.sam import SamImageEncoder, convert_sam_image_encoder
from jaxformers.models.sam_unet import (OFFICIAL_PARAMS, convert_official_sam_unet, frozen_train_step,
                                        split_frozen)
from jaxformers.segmentation import sam_unet_loss
from jaxformers.sharding import make_mesh
from tests.helpers import (fast_jit, load_official, numpy_variables, prompted_shapes, shard_like_init,
                           single_and_sharded)

# Tiny config with the real wiring: windowed blocks (window 3 on an 8x8 grid: padded) and 4 global
# blocks, every Reshaper kind (16 -> 8 down, 8 same, 4 -> 8 up, 2 -> 8 up twice), 3 bridges.
TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=6, num_heads=2, window_size=3,
            global_attn_indexes=(1, 2, 4, 5), prompt_dim=32, mask_in_chans=8, decoder_heads=2, decoder_mlp_dim=64,
            resnet_depth=(1, 1, 1, 1), resnet_channels=(8, 16, 16, 32))
# The official tiny build whose state-dict keys sam_unet_official_keys.json lists (ResNet-50 branch) and
# the live parity config (ResNet-34): SAM-UNet's forward hard-codes two windowed blocks before each global one.
OFFICIAL_TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=12, num_heads=2, window_size=3,
                     global_attn_indexes=(2, 5, 8, 11), prompt_dim=256, mask_in_chans=16, decoder_heads=2,
                     decoder_mlp_dim=64)
MEAN, STD = np.array([123.675, 116.28, 103.53], np.float32), np.array([58.395, 57.12, 57.375], np.float32)


def _abstract(model, *inputs):
    return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs)))


def _size(tree) -> int:
    return sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree))


def test_param_counts_total_and_trainable_equal_official():
    for name, (total, trainable) in OFFICIAL_PARAMS.items():
        params = jf.registry.init_abstract(jf.create_model(name))["params"]
        train, frozen = split_frozen(nn.unbox(params))
        assert (_size(params), _size(train)) == (total, trainable), name
        assert _size(frozen) == 86_672_640  # SAM ViT-B at 256 px


def _flat(variables):
    return {"/".join(k): v for k, v in flatten_dict(variables).items()}


def test_official_state_dict_converts_key_for_key():
    keys = json.loads((pathlib.Path(__file__).parent / "sam_unet_official_keys.json").read_text())
    rng = np.random.default_rng(0)
    sd = StateDict({k: rng.standard_normal(shape, np.float32) for k, shape in keys.items()})
    model = jf.create_model("sam_unet_res50", **OFFICIAL_TINY)
    expected = {k: v.shape for k, v in _flat(_abstract(model, *model.example_inputs())).items()}
    out = convert_official_sam_unet(sd, model, expected)
    assert sd.unused() == []
    assert sorted(out) == sorted(expected)
    for k, v in out.items():
        assert tuple(np.shape(v)) == tuple(expected[k]), k
    w = sd["adapters_in.3.reshaper.0.weight"]  # ConvTranspose2d (in, out, 2, 2) -> ours (in, 2, 2, out)
    np.testing.assert_array_equal(out["params/adapters_in_3/layers_0/kernel"][:, 1, 0], w[:, :, 1, 0])


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model("sam_unet_res34", **TINY)
    x, masks, boxes = prompted_shapes(4, 64)
    return model, numpy_variables(model, x[:1], boxes[:1]), x, masks, boxes


def test_box_prompted_outputs(tiny):
    model, variables, x, _, boxes = tiny
    two = jnp.stack([boxes, boxes[::-1]], axis=1)  # (B, 2 prompts, 4)
    out = fast_jit(lambda v, x, b: model.apply(v, x, b))(variables, x, two)
    assert {k: v.shape for k, v in out.items()} == {"masks": (4, 2, 64, 64), "low_res_logits": (4, 2, 32, 32)}
    assert float(jnp.std(out["masks"])) > 1e-3
    # Each prompt is decoded on its own: the first prompt's masks equal a one-prompt call's.
    one = fast_jit(lambda v, x, b: model.apply(v, x, b))(variables, x, boxes)
    np.testing.assert_allclose(one["masks"][:, 0], out["masks"][:, 0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(out["masks"][:, 0], out["masks"][:, 1], atol=1e-3)  # the box matters


def test_trains_with_frozen_encoder(tiny):
    """Box-prompted binary masks of the generated scenes: the loss falls; the SAM encoder gets no gradient,
    no optimizer state, and stays bit-identical while the ResNet branch, adapters and decoder move."""
    model, variables, x, masks, boxes = tiny
    model = model.clone(iou_head=True)
    variables = numpy_variables(model, x[:1], boxes[:1])
    trainable, frozen = split_frozen(variables["params"])
    rest = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.adam(3e-3)
    opt_state = tx.init(trainable)
    assert _size(opt_state) == 2 * _size(trainable) + 1  # mu, nu over the trainable leaves (+ the step count)
    loss_fn = lambda out, y: sam_unet_loss(out["masks"], y, out["iou"])
    step = fast_jit(frozen_train_step(model, tx, loss_fn))
    target = masks[:, None]
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    losses, params = [], trainable
    for _ in range(12):
        params, rest, opt_state, loss = step(params, frozen, rest, opt_state, x, boxes[:, None], target)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    for name in ("resnet", "adapters_in_0", "adapters_bridge_2", "mask_decoder", "prompt_encoder"):
        moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params[name]),
                                                            jax.tree_util.tree_leaves(trainable[name])))
        assert moved, name
    # adapters_in_0 feeds the frozen blocks 1..5 before any output: its update proves the gradient crosses them.


def test_sharded_equals_single_device(tiny):
    model, variables, x, _, boxes = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded_vars = shard_like_init(model, variables, x[:1], mesh)
    fn = fast_jit(lambda v, x: model.apply(v, x, boxes)["masks"])
    single, sharded = single_and_sharded(fn, variables, sharded_vars, x, mesh)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_clear_errors(tiny):
    model, variables, x, _, boxes = tiny
    with pytest.raises(ValueError, match="box prompts must lie inside the 64x64 input"):
        model.apply(variables, x[:1], jnp.asarray([[10.0, 5.0, 70.0, 30.0]]))
    with pytest.raises(ValueError, match="box prompts must lie inside"):
        model.apply(variables, x[:1], jnp.asarray([[30.0, 5.0, 10.0, 30.0]]))  # x0 > x1
    with pytest.raises(ValueError, match=r"boxes must be \(batch, 4\)"):
        model.apply(variables, x[:1], jnp.zeros((1, 3)))
    real = jf.create_model("sam_unet_res34")
    with pytest.raises(ValueError, match="takes 256x256 images .* 16x16 grid .* got 224x224"):
        jax.eval_shape(lambda: real.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 4))))


def test_loss_worked_example():
    logits = jnp.asarray([[[[2.0, -1.0], [0.5, -3.0]]]])
    y = jnp.asarray([[[[1.0, 0.0], [1.0, 0.0]]]])
    p = 1 / (1 + np.exp(-np.asarray(logits)))
    yn = np.asarray(y)
    focal = np.mean(-0.25 * yn * (1 - p) ** 2 * np.log(p) - 0.75 * (1 - yn) * p ** 2 * np.log(1 - p))
    inter, total = (p * yn).sum(), p.sum() + yn.sum()
    dice = 1 - (2 * inter + 1) / (total + 1)
    iou = inter / (total - inter)
    np.testing.assert_allclose(sam_unet_loss(logits, y), 20 * focal + dice, rtol=1e-5)
    np.testing.assert_allclose(sam_unet_loss(logits, y, jnp.asarray([[0.3]])), 20 * focal + dice + (iou - 0.3) ** 2,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        sam_unet_loss(logits, y[..., :1])


# ---------------------------------------------------------------------------------------------
# Live parity with the official code (fetched to /work/ext; skipped where absent)


def _official_tiny(resnet: int):
    smod = load_official("sam-unet", "sam_unet/models/sam_unet_model.py")
    import torch
    from sam_unet.config import config_dict
    from sam_unet.models.segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                                           TwoWayTransformer)

    torch.manual_seed(0)
    config_dict["img_size"] = 64  # read by SAM_UNET.__init__
    sam = Sam(image_encoder=ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=12, num_heads=2, mlp_ratio=4,
                                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True,
                                            use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11], window_size=3,
                                            out_chans=256),
              prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(8, 8), input_image_size=(64, 64),
                                           mask_in_chans=16),
              mask_decoder=MaskDecoder(transformer_dim=256,
                                       transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=64,
                                                                     num_heads=2)))
    try:
        model = smod.SAM_UNET(resnet_type=resnet, ori_sam=sam, is_resnet_pretrained_or_not=False)
    finally:
        config_dict["img_size"] = 256
    with torch.no_grad():  # random weights everywhere (SAM zero-initialises its relative position tables)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return smod, model.eval()


def test_live_parity_with_official_sam_unet(monkeypatch, tmp_path):
    """Boxes, points and mask prompts together (two prompts per image) through the official tiny build,
    loaded with ``jaxformers.load_pretrained`` from a checkpoint in the official layout."""
    torch = pytest.importorskip("torch")
    smod, ref = _official_tiny(34)
    def normalise(x, pixel_mean, pixel_std):  # the official preprocess also pads to its import-time img_size
        return (x - torch.tensor(pixel_mean).view(-1, 1, 1)) / torch.tensor(pixel_std).view(-1, 1, 1)

    monkeypatch.setattr(smod, "preprocess", normalise)
    rng = np.random.default_rng(1)
    raw = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    boxes = np.array([[[4, 6, 40, 30], [20, 8, 62, 50]], [[0, 0, 64, 64], [10, 30, 33, 60]]], np.float32)
    coords = rng.uniform(0, 64, (2, 2, 3, 2)).astype(np.float32)  # 3 points per prompt, with the box
    labels = np.array([[[1, 0, -1], [1, 1, 0]], [[0, 1, 1], [-1, 1, 0]]], np.int64)
    mask_in = rng.standard_normal((2, 2, 32, 32)).astype(np.float32)
    t = torch.from_numpy
    with torch.no_grad():
        ref_out = ref.train_forward([{"image": t(raw[i].transpose(2, 0, 1)), "boxes": t(boxes[i]),
                                      "point_coords": t(coords[i]), "point_labels": t(labels[i]),
                                      "mask_inputs": t(mask_in[i][:, None])} for i in range(2)])
    model = jf.create_model("sam_unet_res34", **OFFICIAL_TINY)
    path = tmp_path / "sam_unet.pth"  # the official training script's checkpoint layout: {"model": state_dict}
    torch.save({"model": ref.state_dict()}, path)
    variables = jf.load_pretrained("sam_unet_res34", path, **OFFICIAL_TINY)
    out = fast_jit(lambda v, x, b, p, m: model.apply(v, x, b, points=p, mask_inputs=m))(
        variables, jnp.asarray((raw - MEAN) / STD), jnp.asarray(boxes), (jnp.asarray(coords), jnp.asarray(labels)),
        jnp.asarray(mask_in))
    for i in range(2):
        want = ref_out[i]["low_res_logits"][:, 0].numpy()
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(out["low_res_logits"][i]) / scale, want / scale, atol=2e-4)
        np.testing.assert_allclose(np.asarray(out["masks"][i]) / scale, ref_out[i]["masks"][:, 0].numpy() / scale,
                                   atol=2e-4)


def test_image_encoder_matches_segment_anything():
    """``SamImageEncoder`` against the ``segment_anything`` package's ``ImageEncoderViT`` (random weights,
    windowed + global blocks, padded windows), through the SAM-UNet converter's encoder mapping."""
    torch = pytest.importorskip("torch")
    sa = pytest.importorskip("segment_anything.modeling.image_encoder")
    torch.manual_seed(0)
    ref = sa.ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, out_chans=16,
                             norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                             window_size=3, global_attn_indexes=(1,)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc = SamImageEncoder(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, out_chans=16, window_size=3,
                          global_attn_indexes=(1,))
    sd = StateDict({k: v.numpy() for k, v in ref.state_dict().items()})
    variables = unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                for k, v in convert_sam_image_encoder(sd, "", "params/", 3, 2).items()})
    assert sd.unused() == []
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    got = fast_jit(enc.apply)(variables, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)

