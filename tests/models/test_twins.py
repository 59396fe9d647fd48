"""Twins-SVT / Twins-PCPVT (timm names, counts, live timm parity, the dense-feature contract, sharding,
training) and EcoFormer on Twins (the official ziplab/EcoFormer ``twins/gvt.py`` layout key for key,
live parity with the official code when fetched, the linear form against the explicit kernel form)."""
from __future__ import annotations

import json
import os
import pathlib
import sys
import types
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import jaxformers as jf
from jaxformers.compress import ecoformer as eco
from jaxformers.convert.common import StateDict
from jaxformers.models.twins import TIMM_PARAMS, block_kind, convert_twins
from jaxformers.sharding import activate, make_mesh, shard_batch
from tests.helpers import (digits, fast_jit, image, load_official, model_and_features, numpy_variables,
                           perturbed_torch_model, shard_like_init, torch_logits, train_classifier)

# Two blocks in stage 1 (LSA, then GSA with sr 8), windows of 3 (padded maps).
TINY = dict(depths=(2, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2),
            num_classes=10, wss=(3, 3, 3, 3))
ECO = {**TINY, "attn_type": "ecoformer", "ecoformer_anchors": 3, "ecoformer_topk": 1}  # 32x32 inputs: stage 3 is 2x2
ECO_KEYS = pathlib.Path(__file__).parent / "twins_ecoformer_official_keys.json"  # official ALTGVT + EcoBlock at ECO


@pytest.fixture(scope="module")
def tiny():
    return model_and_features("twins_svt_small", image(4, 64), **TINY)  # 4 images: one per (data, fsdp) shard


def test_param_counts_equal_timm_and_block_layout():
    # One variant per family traced here (all six were checked against timm when registered).
    assert {name: jf.count_params(name) for name in ("twins_svt_small", "twins_pcpvt_small")} == {
        name: TIMM_PARAMS[name] for name in ("twins_svt_small", "twins_pcpvt_small")}
    assert sorted(TIMM_PARAMS) == jf.list_models("twins_*")
    # EcoFormer-Twins-S: the official alt_gvt_small_ecoformer's count (A, anchors, mu are buffers).
    assert jf.count_params("twins_svt_small", attn_type="ecoformer") == 21_522_088
    kinds = lambda attn, wss: [[block_kind(attn, wss, (8, 4, 2, 1), s, j) for j in range(2)] for s in range(4)]  # noqa: E731
    assert kinds("default", (7,) * 4) == [["local", "global"]] * 4
    assert kinds("default", None) == [["global", "global"]] * 4
    assert kinds("msa", (7,) * 4) == [["local", "full"]] * 4
    assert kinds("ecoformer", (7,) * 4) == [["ecoformer", "ecoformer"]] * 3 + [["full", "full"]]


def test_features_by_stride_and_logits(tiny):
    model, variables, out = tiny
    assert {k: v.shape for k, v in out.features.items()} == {4: (4, 16, 16, 16), 8: (4, 8, 8, 32),
                                                             16: (4, 4, 4, 48), 32: (4, 2, 2, 64)}
    assert out.logits.shape == (4, 10) and out.pre_logits.shape == (4, 64)
    assert float(jnp.std(out.logits[0] - out.logits[1])) > 1e-4  # the images are told apart
    assert jax.eval_shape(model.apply, variables, image(1, 96)).shape == (1, 10)  # any size runs
    with pytest.raises(ValueError, match="at least 32x32"):
        jax.eval_shape(model.apply, variables, image(1, 16))
    with pytest.raises(ValueError, match="attn_type must be one of"):
        jax.eval_shape(jf.create_model("twins_svt_small", **{**TINY, "attn_type": "hash"}).apply, variables, image(1, 64))


@pytest.mark.parametrize("wss", [(3, 3, 3, 3), None], ids=["svt", "pcpvt"])
def test_timm_parity(tmp_path, wss):
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    cfg = {**TINY, "wss": wss}
    tm = perturbed_torch_model(lambda: timm.models.twins.Twins(**cfg))
    torch.save(tm.state_dict(), tmp_path / "twins.pth")
    name = "twins_svt_small" if wss else "twins_pcpvt_small"
    variables = jf.load_pretrained(name, tmp_path / "twins.pth", **cfg)
    x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
    ref = torch_logits(tm, x)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(fast_jit(jf.create_model(name, **cfg).apply)(variables, x), ref, atol=1e-4, rtol=0)


def test_official_ecoformer_state_dict_converts_key_for_key():
    """Every key of the official EcoFormer-Twins layout (ALTGVT with EcoBlock, hash buffers included)
    is consumed and every variable of ours (params and hashing) filled, with its shape."""
    keys = json.loads(ECO_KEYS.read_text())
    rng = np.random.default_rng(0)
    sd = StateDict({k: rng.standard_normal(shape).astype(np.float32) for k, shape in keys.items()})
    model = jf.create_model("twins_svt_small", **ECO)
    abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))))
    expected = {"/".join(k): v.shape for k, v in flatten_dict(abstract).items()}
    out = convert_twins(sd, model, expected)
    assert sd.unused() == []
    assert sorted(out) == sorted(expected)
    for k, v in out.items():
        assert tuple(np.shape(v)) == tuple(expected[k]), k
    np.testing.assert_array_equal(out["hashing/blocks_0_1/attn/anchor"], sd["blocks.0.1.attn.fast_attention.ksh.anchor"][0])


def _official_gvt():
    pytest.importorskip("timm")
    pytest.importorskip("einops")
    logger = types.ModuleType("logger")
    logger.logger = types.SimpleNamespace(info=lambda *a, **k: None)
    params = types.ModuleType("params")
    params.args = types.SimpleNamespace()
    gvt = load_official("ziplab+EcoFormer", "twins/gvt.py", "ecoformer_twins_gvt", path_entry="twins",
                        stubs={"logger": logger, "params": params})
    args = sys.modules["performer"].args  # the object the official attention reads (maybe the PVTv2 test's)
    args.nbits, args.m, args.topk = 16, ECO["ecoformer_anchors"], ECO["ecoformer_topk"]
    return gvt


def test_official_ecoformer_twins_parity(tmp_path):
    """The official EcoFormer-Twins learns its hash on a batch; its state dict through our converter
    gives the same logits."""
    torch = pytest.importorskip("torch")
    gvt = _official_gvt()
    cfg = dict(patch_size=4, embed_dims=list(TINY["embed_dims"]), num_heads=list(TINY["num_heads"]),
               mlp_ratios=list(TINY["mlp_ratios"]), depths=list(TINY["depths"]), wss=list(TINY["wss"]),
               sr_ratios=[8, 4, 2, 1], qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
               block_cls=gvt.EcoBlock, num_classes=10, img_size=32)
    tm = perturbed_torch_model(lambda: gvt.ALTGVT(**cfg))
    for module in tm.modules():
        if hasattr(module, "iteration_n"):
            module.iteration_n = 3  # a short KSH learning (the hash state is compared, not re-learned)
    x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    if os.environ.get("JAXFORMERS_WRITE_KEYS"):  # regenerate the CI test's key list
        ECO_KEYS.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(list(v.shape))}"
                                                for k, v in tm.state_dict().items()) + "\n}\n")
    tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))  # first forward: learns the KSH (needs autograd)
    ref = torch_logits(tm, x)
    assert sorted(tm.state_dict()) == sorted(json.loads(ECO_KEYS.read_text()))  # the CI test's layout
    torch.save(tm.state_dict(), tmp_path / "eco.pth")
    variables = jf.load_pretrained("twins_svt_small", tmp_path / "eco.pth", **ECO)
    np.testing.assert_allclose(fast_jit(jf.create_model("twins_svt_small", **ECO).apply)(variables, x), ref,
                               atol=1e-4, rtol=0)


def test_ecoformer_twins_linear_equals_kernel_form(monkeypatch):
    """On Twins with EcoFormer in stages 1-3: the hash is learned on a batch, and the model's logits
    through the linear form equal those through the explicit N x N kernel form. (EcoFormer training
    and its straight-through gradient are tested on PVTv2 in test_pvt_v2.py.)"""
    model = jf.create_model("twins_svt_small", **ECO)
    x, _ = digits(4, 32)
    variables = numpy_variables(model, x[:1])
    assert set(variables) == {"params", "hashing"}
    assert sorted(variables["hashing"]) == ["blocks_0_0", "blocks_0_1", "blocks_1_0", "blocks_2_0"]  # stage 4: full
    learned = fast_jit(lambda v, x: eco.learn_hashing(model, v, x, rng=jax.random.key(0)))(variables, x)
    assert not np.allclose(variables["hashing"]["blocks_0_0"]["attn"]["A"], learned["hashing"]["blocks_0_0"]["attn"]["A"])
    linear = fast_jit(model.apply)(learned, x)
    monkeypatch.setattr(eco, "linear_attention_bias", eco.explicit_attention_bias)
    explicit = fast_jit(model.apply)(learned, x)
    monkeypatch.undo()
    assert float(jnp.std(linear)) > 1e-3
    np.testing.assert_allclose(explicit, linear, rtol=1e-4, atol=1e-5)


def test_trains(tiny):
    model, variables, _ = tiny
    x, y = digits(16, 64)  # (at 32x32 stage 1's GSA would see one reduced token: no gradient to q)
    losses, _ = train_classifier(model, variables, x, y, steps=6)  # every parameter gets a gradient
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses


def test_sharded_equals_single_device(tiny):
    """The fixture's single-device logits against the same forward on a (data, fsdp, tensor) mesh."""
    model, variables, out = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = image(4, 64)
    sharded_vars = shard_like_init(model, variables, x, mesh)
    with activate(mesh):
        sharded = fast_jit(model.apply)(sharded_vars, shard_batch(x, mesh))
    assert float(jnp.std(out.logits)) > 1e-3
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(out.logits), rtol=1e-5, atol=1e-5)
