"""U-Mamba_Enc (2-D) on the segmentation platform: the official block / Mamba-stage / channel-token rules,
shapes and the stride-keyed features, sharded == single device, errors, training on the generated scenes with
deep supervision (loss falls, every parameter gets a gradient), the converter key for key; where the official
code is fetched (bowang-lab/U-Mamba ``UMambaEnc_2d.py``, mamba_ssm's CUDA ``Mamba`` replaced by the pure-PyTorch
``mambapy`` block: same parameters, same computation): the parameter count of the registered config and the
outputs of every decoder level through the converter."""
import sys
import types

import jax
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.convert.pretrained import flat_variables
from jaxformers.models.mamba_convert import to_hf
from jaxformers.models.umamba import (UMambaEnc, channel_token_stages, convert_umamba, decoder_blocks_per_stage,
                                      encoder_blocks, key_table, mamba_stages)
from jaxformers.segmentation import semantic_cross_entropy
from jaxformers.sharding import make_mesh
from tests.helpers import (fast_jit, load_official, numpy_variables, segmentation_shapes, shard_like_init,
                           single_and_sharded, train_classifier)

def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def _official(monkeypatch, request):
    """The official UMambaEnc_2d module with stand-ins for its imports (removed again after the test)."""
    pytest.importorskip("dynamic_network_architectures")
    mambapy = pytest.importorskip("mambapy.mamba")

    def mamba(d_model, d_state=16, d_conv=4, expand=2):  # mamba_ssm.Mamba's defaults
        return mambapy.MambaBlock(mambapy.MambaConfig(d_model=int(d_model), n_layers=1, d_state=d_state,
                                                      d_conv=d_conv, expand_factor=expand, pscan=False))

    util = "nnunetv2.utilities"
    stubs = {"mamba_ssm": _module("mamba_ssm", Mamba=mamba), "nnunetv2": _module("nnunetv2"), util: _module(util),
             f"{util}.plans_handling": _module(f"{util}.plans_handling"),
             f"{util}.plans_handling.plans_handler": _module(f"{util}.plans_handling.plans_handler",
                                                             ConfigurationManager=object, PlansManager=object),
             f"{util}.network_initialization": _module(f"{util}.network_initialization", InitWeights_He=object)}
    for name, stub in stubs.items():
        monkeypatch.setitem(sys.modules, name, stub)
    request.addfinalizer(lambda: sys.modules.pop("umamba_official_enc_2d", None))
    return load_official("U-Mamba", "umamba/nnunetv2/nets/UMambaEnc_2d.py", "umamba_official_enc_2d")


@pytest.fixture(scope="module")
def tiny():
    # 3 stages at 16 px: Mamba on stages 0 (16x16 pixels as tokens, d_model 16) and 2 (4x4 = 16 <= 64 channels:
    # channels as tokens, d_model 16)
    model = UMambaEnc(num_classes=6, in_chans=3, img_size=16, features=(16, 32, 64), strides=(1, 2, 2),
                      scan="sequential")
    x, y = segmentation_shapes(4, 32)
    x, y = x[:, ::2, ::2], y[:, ::2, ::2]  # the generated scenes at 16 px (nearest)
    return model, numpy_variables(model, x), x, y, fast_jit(lambda v, a: model.apply(v, a, output="deep_supervision"))


def test_official_rules_shapes_sharding_and_errors(tiny):
    assert encoder_blocks(2, 7) == [2, 2, 2, 2, 1, 1, 1] and decoder_blocks_per_stage(2, 7) == [2, 2, 2, 2, 1, 1]
    assert encoder_blocks(2, 4) == [2, 2, 1, 1] and decoder_blocks_per_stage(2, 4) == [2, 2, 1]
    assert mamba_stages(4) == [False, True, False, True] and mamba_stages(7) == [True, False] * 3 + [True]
    assert channel_token_stages((256, 256), (32, 64, 128, 256, 512, 512, 512), (1, 2, 2, 2, 2, 2, 2)) == \
        [False] * 4 + [True] * 3
    model, variables, x, _, forward = tiny
    params = variables["params"]
    assert params["mamba_layers_0"]["mamba"]["in_proj"]["kernel"].shape == (16, 2, 32)  # pixels as tokens: d = C
    assert params["mamba_layers_2"]["mamba"]["x_proj"]["kernel"].shape == (32, 1 + 32)  # channels: d = H·W = 16
    assert params["mamba_layers_2"]["norm"]["scale"].shape == (16,)
    assert encoder_blocks(2, 3) == [2, 2, 1] and decoder_blocks_per_stage(2, 3) == [2, 2]
    assert "mamba_layers_1" not in params and "stages_2_1" not in params
    assert "stages_1_1" in params and "decoder_stages_1_1" in params and "decoder_seg_0" in params
    shapes = jax.eval_shape(lambda v, a: (model.apply(v, a), model.apply(v, a, output="features")), variables, x)
    assert shapes[0].shape == (4, 16, 16, 6)
    assert {k: v.shape for k, v in shapes[1].items()} == {1: (4, 16, 16, 16), 2: (4, 8, 8, 32), 4: (4, 4, 4, 64)}
    # every decoder level's logits, full resolution first; sharded (data x fsdp x tensor) == single device
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single, sharded = single_and_sharded(forward, variables, shard_like_init(model, variables, x, mesh), x, mesh)
    assert [o.shape for o in single] == [(4, 16, 16, 6), (4, 8, 8, 6)]
    for a, b in zip(single, sharded):
        assert float(np.std(a)) > 1e-3
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)
    with pytest.raises(ValueError, match="NHWC images with 3 channels"):
        model.apply(variables, x[..., :1])
    with pytest.raises(ValueError, match="not divisible by the total stride 4"):
        model.apply(variables, x[:, :14, :14])
    with pytest.raises(ValueError, match=r"d_model = H·W = 16 \(fixed by img_size=16\); this input gives 64"):
        model.apply(variables, np.zeros((1, 32, 32, 3), np.float32))


def test_trains_on_generated_scenes(tiny):
    model, variables, x, y, _ = tiny
    # deep supervision as nnU-Net weights it (1, 1/2, ...; nnU-Net zeroes the lowest level, kept here so every
    # segmentation head gets a gradient)
    def loss(outputs, labels):
        return sum(0.5 ** i * semantic_cross_entropy(o, labels) for i, o in enumerate(outputs)) / 1.5

    losses, _ = train_classifier(model.clone(deep_supervision=True), variables, x[:2], y[:2], steps=8,
                                 tx=optax.adam(1e-2), loss=loss)
    assert losses[-1] < 0.7 * losses[0], losses


def test_parameter_count_equals_the_official_code(monkeypatch, request):
    torch = pytest.importorskip("torch")
    official = _official(monkeypatch, request)
    ours = jf.create_model("umamba_enc_2d")
    with torch.device("meta"):  # shapes only
        ref = official.UMambaEnc(input_size=(256, 256), input_channels=1, n_stages=7,
                                 features_per_stage=[32, 64, 128, 256, 512, 512, 512], conv_op=torch.nn.Conv2d,
                                 kernel_sizes=[[3, 3]] * 7, strides=[[1, 1]] + [[2, 2]] * 6, n_conv_per_stage=[2] * 7,
                                 num_classes=14, n_conv_per_stage_decoder=[2] * 6, conv_bias=True,
                                 norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                                 nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    assert jf.count_params(ours) == sum(p.numel() for p in ref.parameters())


def _to_official(w, kind):
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1)) if kind == "conv2d" else to_hf(w, kind)


def test_converter_key_for_key(tiny):
    # every parameter has exactly one official key; official layouts -> ours round-trips
    model, variables, *_ = tiny
    flat = {k: np.asarray(v) for k, v in flat_variables(variables).items()}
    rows = key_table(model)
    assert sorted(o for o, _, _ in rows) == sorted(flat) and len({t for _, t, _ in rows}) == len(rows)
    sd = {t: _to_official(flat[o], kind) for o, t, kind in rows}
    assert sd["encoder.stem.1.conv1.conv.weight"].shape == (16, 16, 3, 3)  # nnU-Net's BasicBlockD
    assert sd["encoder.mamba_layers.2.mamba.conv1d.weight"].shape == (32, 1, 4)
    converted = convert_umamba(sd, model)
    assert all(np.array_equal(converted[k], flat[k]) for k in flat)


def test_matches_the_official_code(tiny, monkeypatch, request):
    torch = pytest.importorskip("torch")
    official = _official(monkeypatch, request)
    model, _, x, _, forward = tiny
    torch.manual_seed(0)
    ref = official.UMambaEnc(input_size=(16, 16), input_channels=3, n_stages=3, features_per_stage=[16, 32, 64],
                             conv_op=torch.nn.Conv2d, kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]],
                             n_conv_per_stage=[2] * 3, num_classes=6, n_conv_per_stage_decoder=[2] * 2, conv_bias=True,
                             norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                             nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # non-trivial norms and biases
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        expected = ref(torch.tensor(np.asarray(x)).permute(0, 3, 1, 2))
    # the decoder's reference to the encoder and nnU-Net's all_modules aliases repeat parameters under other keys
    sd = {k: v.numpy() for k, v in ref.state_dict().items()
          if not k.startswith("decoder.encoder.") and ".all_modules." not in k}
    assert sorted(sd) == sorted(t for _, t, _ in key_table(model))  # key for key
    from flax.traverse_util import unflatten_dict
    params = unflatten_dict({tuple(k.split("/")[1:]): v for k, v in convert_umamba(sd, model).items()})
    ours = forward({"params": params}, x)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(np.asarray(a), b.permute(0, 2, 3, 1).numpy(), atol=2e-4, rtol=1e-4)
