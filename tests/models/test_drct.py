"""DRCT: parameter counts of the official code, its state dict converted key for key, live parity with
the official ``DRCT_arch.py`` (when fetched), output shapes and reflect padding, sharding, training on
scikit-image photographs (L1 falls), bad input."""
from __future__ import annotations

import json
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.convert.common import StateDict
from jaxformers.convert.pretrained import flat_variables
from jaxformers.models.drct import convert_official_drct
from jaxformers.registry import init_abstract
from tests.helpers import (
    assert_sharded_forward_matches,
    fast_jit,
    load_official,
    numpy_variables,
    train_classifier,
)

# Counts run from the official DRCT_arch.py with the configs of options/train/*.yml.
OFFICIAL_PARAMS = {"drct_x2": 13_991_867, "drct_x3": 14_176_507, "drct_x4": 14_139_579, "drct_l_x4": 27_580_719}
# drct_official_keys.json: keys and shapes of the official DRCT x4 state dict (buffers included).
KEYS = pathlib.Path(__file__).parent / "drct_official_keys.json"
# Widths 24/32/40/48/56 with 3/1/2/3/1 heads (num_heads - width mod num_heads, as the official code).
TINY = dict(embed_dim=24, gc=8, depths=(1,), num_heads=(3,), window_size=8, img_size=32, drop_path_rate=0.0)


def _official_module():
    torch = pytest.importorskip("torch")
    pytest.importorskip("einops")

    class _Registry:
        def register(self, *args):
            return args[0] if args else (lambda obj: obj)

    registry = types.ModuleType("basicsr.utils.registry")
    registry.ARCH_REGISTRY = _Registry()
    arch_util = types.ModuleType("basicsr.archs.arch_util")
    arch_util.to_2tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    arch_util.trunc_normal_ = torch.nn.init.trunc_normal_
    stubs = {name: types.ModuleType(name) for name in ("basicsr", "basicsr.utils", "basicsr.archs")}
    stubs.update({"basicsr.utils.registry": registry, "basicsr.archs.arch_util": arch_util})
    if "basicsr" in sys.modules and not hasattr(sys.modules.get("basicsr.utils.registry"), "ARCH_REGISTRY"):
        pytest.skip("a basicsr without utils.registry is imported")
    return torch, load_official("DRCT", "drct/archs/DRCT_arch.py", name="drct_official_arch", stubs=stubs)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_counts_equal_official(name):
    assert jf.count_params(name) == OFFICIAL_PARAMS[name]


def test_official_state_dict_converts_key_for_key():
    """Every official key of DRCT x4 is consumed (buffers skipped), every variable of ours filled with its
    shape; spot checks of the layouts (conv kernels HWIO, fused qkv, the upsampler's Sequential indices)."""
    keys = json.loads(KEYS.read_text())
    rng = np.random.default_rng(0)
    spot = {"layers.5.swin4.attn.qkv.weight", "upsample.2.weight", "layers.2.adjust5.weight", "conv_first.weight"}
    sd = StateDict({k: rng.standard_normal(s).astype(np.float32) if k in spot else np.zeros(s, np.float32)
                    for k, s in keys.items()})
    model = jf.create_model("drct_x4")
    expected = {k: v.shape for k, v in flat_variables(init_abstract(model)).items()}
    out = convert_official_drct(sd, model, expected)
    assert sd.unused() == []
    assert sorted(out) == sorted(expected)
    for k, v in out.items():
        assert tuple(np.shape(v)) == tuple(expected[k]), k
    np.testing.assert_array_equal(out["params/upsample_1/kernel"], sd["upsample.2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(out["params/layers_2/adjust5/kernel"][0, 0], sd["layers.2.adjust5.weight"][:, :, 0, 0].T)
    qkv = out["params/layers_5/swin4/attn/mha/qkv/kernel"]  # (276, 3, 6 heads, 46)
    assert qkv.shape == (276, 3, 6, 46)
    np.testing.assert_array_equal(qkv.reshape(276, -1), sd["layers.5.swin4.attn.qkv.weight"].T)


def test_matches_official_pytorch(tmp_path, upscale=4):
    """A tiny official DRCT (one RDG; heads 3/1/2/3/1) on random weights, converted through
    ``load_pretrained``; the input (20x36) is not a multiple of the window, so the official network
    runs on the reflect-padded image (as ``DRCTModel.test``) and is cropped back."""
    torch, official = _official_module()
    torch.manual_seed(0)
    ref = official.DRCT(upscale=upscale, in_chans=3, img_size=32, window_size=8, compress_ratio=3, squeeze_factor=30,
                        conv_scale=0.01, overlap_ratio=0.5, img_range=1.0, depths=[1], embed_dim=24,
                        num_heads=[3], mlp_ratio=2, upsampler="pixelshuffle", resi_connection="1conv", gc=8).eval()
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.dtype.is_floating_point:
                t.add_(0.05 * torch.randn_like(t))
    torch.save(ref.state_dict(), tmp_path / "drct.pth")
    overrides = dict(TINY, upscale=upscale)
    variables = jf.load_pretrained("drct_x4", tmp_path / "drct.pth", **overrides)
    model = jf.create_model("drct_x4", **overrides)
    x = np.random.default_rng(1).uniform(0, 1, (2, 20, 36, 3)).astype(np.float32)
    with torch.no_grad():
        padded = torch.nn.functional.pad(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), (0, 4, 0, 4), "reflect")
        expected = ref(padded).numpy().transpose(0, 2, 3, 1)[:, :20 * upscale, :36 * upscale]
    got = np.asarray(fast_jit(model.apply)(variables, x))
    assert got.shape == expected.shape == (2, 20 * upscale, 36 * upscale, 3)
    np.testing.assert_allclose(got, expected, atol=5e-5)


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model("drct_x2", **TINY)
    return model, numpy_variables(model, jnp.zeros((1, 16, 16, 3)))


def test_output_shapes(tiny):
    """x2 of 16x16 is 32x32; inputs that are not a multiple of the window come back at exactly 2x (the
    reflect padding is cropped away; its values are checked against the official code in the parity test)."""
    model, variables = tiny
    for (h, w) in ((16, 16), (12, 20), (7, 9)):
        assert jax.eval_shape(model.apply, variables, jnp.zeros((2, h, w, 3))).shape == (2, 2 * h, 2 * w, 3)


def test_sharded_equals_single_device(tiny):
    """On a 12x12 input (reflect-padded to 16x16 and cropped back)."""
    model, variables = tiny
    x = jax.random.uniform(jax.random.key(1), (4, 12, 12, 3))
    assert_sharded_forward_matches(model, variables, x, tol=1e-4)


def test_trains_on_photographs(tiny):
    """jit + grad: every parameter gets a gradient; the L1 loss on bicubic-downsampled crops of
    scikit-image photographs falls (x2, 16x16 -> 32x32)."""
    from train.super_resolution import l1_loss, sr_pairs

    model, variables = tiny
    lr, hr = sr_pairs(("astronaut", "coffee"), n=4, hr_size=32, scale=2, seed=0)
    losses, _ = train_classifier(model, variables, lr, hr, steps=15, loss=l1_loss)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("shape,model_kw,match", [
    ((16, 16, 3), {}, "NHWC low-resolution image batch of rank 4"),
    ((1, 16, 16, 1), {}, "1 channels in its last axis but the model expects in_chans=3"),
    ((1, 12, 16, 3), {"pad_to_window": False}, "12x16, but with pad_to_window=False DRCT needs height and width"),
    ((1, 16, 16, 3), {"num_heads": (5,)}, "block swin1: width 24 .* is not divisible by its 5 heads"),
    ((1, 16, 16, 3), {"upscale": 5}, "upscale 5 is not supported"),
])
def test_bad_inputs_raise_clear_errors(tiny, shape, model_kw, match):
    model, variables = tiny
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.clone(**model_kw).apply, variables, jnp.zeros(shape))
