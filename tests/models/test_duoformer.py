"""DuoFormer: the per-patch index tables against the official loops, parameter counts of the official
MyModel, its state-dict layout converted key for key, live parity with the official PyTorch code on
random weights (where it is fetched), output layout, frozen backbone and the reproduced patch-attention
wiring in the gradients, sharding, training on real histology tiles, bad input."""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

import jaxformers as jf
from jaxformers.convert.common import StateDict
from jaxformers.models.duoformer import convert_official_duoformer, gather_patch_tokens, patch_index_tables
from jaxformers.sharding import make_mesh
from tests.helpers import (fast_jit, image, load_official, numpy_variables,
                           perturbed_torch_model, shard_like_init, single_and_sharded, train_classifier)

# The official MyModel (pretrained=False, depth 12, width 768, 100 classes) counted with torch, less the
# 32x32 patch embedding its timm base class builds and never calls (3*32*32*768 + 768 parameters).
OFFICIAL_PARAMS = {2: 187_788_964, 3: 188_195_236, 4: 188_441_764}
OFFICIAL_TRAINABLE = {2: 164_280_932, 3: 164_687_204, 4: 164_933_732}  # freeze=True: the ResNet-50 trunk frozen
UNUSED_PATCH_EMBED = 2_360_064
# The config whose official state-dict keys and shapes duoformer_official_keys.json lists (MyModel(depth=3,
# num_layers=4, embed_dim=proj_dim=768, num_classes=3)); also the config of the live parity check.
KEYS_CONFIG = dict(depth=3, num_classes=3)
TINY = dict(img_size=64, depth=3, embed_dim=32, num_heads=2, num_classes=3, backbone_depth=(1, 1, 1, 1),
            backbone_channels=(8, 8, 16, 16))


def _official_tables():
    """The official MyModel.__init__ loops (7 x 7 patches), written out."""
    idx = {k: np.zeros((49, 4 ** (3 - int(k))), np.int64) for k in "0123"}
    for r in range(7):
        for c in range(7):
            p = r * 7 + c
            idx["3"][p] = p
            idx["2"][p] = [2 * r * 14 + 2 * c, (2 * r + 1) * 14 + 2 * c, 2 * r * 14 + 2 * c + 1,
                           (2 * r + 1) * 14 + 2 * c + 1]
            idx["1"][p] = [(4 * r + i) * 28 + 4 * c + j for i in range(4) for j in range(4)]
            idx["0"][p] = [(8 * r + i) * 56 + 8 * c + j for i in range(8) for j in range(8)]
    return [idx["3"], idx["2"], idx["1"], idx["0"]]


def test_index_tables_match_official_loops_and_cover_each_patch():
    for ours, theirs in zip(patch_index_tables(7, 7, 4), _official_tables(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # A non-square grid: patch (r, c) holds exactly its (2^k)^2 children, stride-16 column by column.
    maps = {s: jnp.arange(2 * 3 * (32 // s) ** 2, dtype=jnp.float32).reshape(1, 2 * 32 // s, 3 * 32 // s, 1)
            for s in (32, 16, 8, 4)}
    tokens = np.asarray(gather_patch_tokens(maps, 4))[0, :, :, 0]
    assert tokens.shape == (6, 85)
    for p in range(6):
        r, c = divmod(p, 3)
        expect = [maps[32][0, r, c, 0]]
        expect += [maps[16][0, 2 * r + i, 2 * c + j, 0] for j in range(2) for i in range(2)]
        expect += [maps[s][0, f * r + i, f * c + j, 0] for s, f in ((8, 4), (4, 8)) for i in range(f) for j in range(f)]
        np.testing.assert_array_equal(tokens[p], np.asarray(expect))


@pytest.mark.parametrize("scales", [2, 3, 4])
def test_param_counts_equal_official(scales):
    name = f"duoformer_{scales}scale_r50"
    model = jf.create_model(name)
    params = nn.unbox(jf.registry.init_abstract(model)["params"])
    total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    trainable = total - sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params["backbone"]))
    assert total == OFFICIAL_PARAMS[scales] - UNUSED_PATCH_EMBED
    assert trainable == OFFICIAL_TRAINABLE[scales] - UNUSED_PATCH_EMBED


def _expected(model, size=224):
    abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))))
    return {"/".join(k): v.shape for k, v in flatten_dict(abstract).items()}


def test_official_state_dict_converts_key_for_key():
    """Every key of the official layout is consumed (the unused patch embedding skipped) and every
    variable of ours filled, with its shape."""
    keys = json.loads((pathlib.Path(__file__).parent / "duoformer_official_keys.json").read_text())
    sd = StateDict({k: np.zeros(shape, np.int8) for k, shape in keys.items()})  # shapes are what is checked
    model = jf.create_model("duoformer_4scale_r50", **KEYS_CONFIG)
    expected = _expected(model)
    out = convert_official_duoformer(sd, model, expected)
    assert sd.unused() == []
    assert sorted(out) == sorted(expected)
    for k, v in out.items():
        assert tuple(np.shape(v)) == tuple(expected[k]), k


def _import_official():
    """The official models/model.py with a three-line shim: its attention classes call timm's
    ``Attention.__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)`` positionally (timm 0.9), which
    timm 1.x reads as other arguments; the shim takes the old order and passes keywords."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from timm.layers import Attention

    class PositionalAttention(Attention):
        def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
            super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)

    timm_vit.Attention = PositionalAttention
    try:
        return load_official("duoformer_TCGA", "models/model.py", "duoformer_official_model", path_entry="models")
    finally:
        timm_vit.Attention = Attention


def test_matches_official_pytorch_on_random_weights():
    """4 scales, 3 blocks (so the official patch-attention wiring matters), random weights, 224 px, the
    ResNet-50 cut to the first bottleneck of each stage (same widths; the full trunk is checked key for
    key above). The official forward projects only two stages (its 3- and 4-scale paths fail with a
    KeyError); the check hands its projection all four stages, as the authors' model_wo_extra_params.py does."""
    torch = pytest.importorskip("torch")
    official = _import_official()

    def make():
        m = official.MyModel(depth=3, patch_size=32, embed_dim=768, num_heads=12, num_classes=3, num_layers=4,
                             proj_dim=768, model_ver="scaleformer", pretrained=False, freeze=True)
        for i in range(4, 8):  # layer1..layer4 of the nn.Sequential trunk
            m.resnet_projector[i] = m.resnet_projector[i][:1]
        stages, get_features, project = {}, m.get_features, m.projection.forward
        m.get_features = lambda x: stages.update(get_features(x)) or stages
        m.projection.forward = lambda _: project(dict(stages))
        return m

    ref = perturbed_torch_model(make)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy().reshape(1, -1)  # the official head output is squeezed
    sd = StateDict({k: v.numpy() for k, v in ref.state_dict().items()})
    model = jf.create_model("duoformer_4scale_r50", **KEYS_CONFIG, backbone_depth=(1, 1, 1, 1))
    variables = unflatten_dict(convert_official_duoformer(sd, model, _expected(model)), sep="/")
    got = fast_jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert float(np.std(want)) > 1e-2
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model("duoformer_4scale_r50", **TINY)
    return model, numpy_variables(model, image(1, 64))


def test_outputs_and_gradients(tiny):
    """Layout of every output; gradients: none into the frozen backbone, none into block 1's patch
    attention (the official loop discards it at depth 3), every other parameter some."""
    model, variables = tiny
    x = image(2, 64)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, output="all"), variables, x)
    assert out.logits.shape == (2, 3) and out.pre_logits.shape == (2, 32)
    assert {s: f.shape for s, f in out.features.items()} == {4: (2, 16, 16, 32), 8: (2, 8, 8, 32),
                                                             16: (2, 4, 4, 64), 32: (2, 2, 2, 64)}

    def loss(params):
        return jnp.sum(model.apply({**variables, "params": params}, x) * jnp.arange(3.0))

    # scale_token="learned" (model_wo_extra_params.py's "random"): one shared (1, 1, 1, D) token, no projectors.
    learned = model.clone(scale_token="learned")
    params = nn.unbox(jax.eval_shape(learned.init, jax.random.key(0), x))["params"]
    assert params["scale_token"].shape == (1, 1, 1, 32) and jax.eval_shape(
        learned.apply, {**variables, "params": params}, x).shape == (2, 3)
    with pytest.raises(ValueError, match="channel scale token"):
        convert_official_duoformer(StateDict({}), learned, {})

    value, grads = fast_jit(jax.value_and_grad(loss))(variables["params"])
    assert np.isfinite(float(value))
    flat = {"/".join(k): np.asarray(g) for k, g in flatten_dict(grads).items()}
    zero = sorted(k for k, g in flat.items() if not np.any(g))
    assert zero == sorted(k for k in flat if k.startswith(("backbone/", "patch_attn_1/")))


def test_sharded_equals_single_device(tiny):
    model, variables = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = image(4, 64)
    single, sharded = single_and_sharded(fast_jit(model.apply), variables, shard_like_init(model, variables, x, mesh),
                                         x, mesh)
    assert float(jnp.std(single)) > 1e-3
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-4, atol=1e-4)


def test_trains_on_histology_tiles():
    """A trainable backbone (one block): every parameter gets a gradient and the loss falls on real IHC
    tiles (``train/histology_data.py``)."""
    from train.histology_data import ihc_tiles

    model = jf.create_model("duoformer_4scale_r50", **{**TINY, "depth": 1}, chain_patch_attention=True,
                            freeze_backbone=False)
    variables = numpy_variables(model, image(1, 64))
    data = ihc_tiles("train")
    assert data["image"].shape == (609, 64, 64, 3) and np.bincount(data["label"]).min() >= 200
    assert ihc_tiles("test")["image"].shape == (145, 64, 64, 3)
    pick = np.random.default_rng(0).choice(609, 12, replace=False)
    x = jnp.asarray(data["image"][pick], jnp.float32) / 127.5 - 1.0
    losses, _ = train_classifier(model, variables, x, jnp.asarray(data["label"][pick]), steps=8)
    assert min(losses[-2:]) < 0.7 * losses[0], losses


def test_bad_inputs_raise_clear_errors(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match="96x96 but the model was built for img_size=64x64"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 96, 96, 3)))
    with pytest.raises(TypeError, match="floating-point"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 64, 64, 3), jnp.uint8))
    with pytest.raises(ValueError, match="img_size must be a multiple of 32"):
        jax.eval_shape(model.clone(img_size=48).init, jax.random.key(0), jnp.zeros((1, 48, 48, 3)))
    with pytest.raises(ValueError, match="scales must be 2, 3 or 4"):
        jax.eval_shape(model.clone(scales=5).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="scale_token must be 'channel' or 'learned'"):
        jax.eval_shape(model.clone(scale_token="mean").init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize("arg, params", [("", 1_600_323), (":baseline=True", 514_691)])
def test_histology_config_builds_its_model(arg, params):
    """``train/configs/duoformer_histology.py`` (its measured run: benchmarks/RESULTS.md) and its trunk-alone
    baseline name models of the sizes its docstring reports, on the embedded IHC tiles."""
    from train import config_lib

    config = config_lib.resolve_config(str(pathlib.Path(__file__).parents[2] / "train" / "configs"
                                           / "duoformer_histology.py") + arg)
    assert config.input.dataset == "ihc_tiles" and config.task == "classification"
    assert jf.count_params(config.model.name, **config.model.overrides) == params
