import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers
from jaxformers.convert.pretrained import CheckpointMismatchError
from tests.helpers import numpy_variables, perturbed_torch_model, torch_logits

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def test_shapes_and_features():
    model = jaxformers.create_model("vit_tiny_patch16_224", **TINY)
    x = jnp.ones((2, 32, 32, 3))
    v = numpy_variables(model, x)
    assert model.apply(v, x).shape == (2, 10)
    f = model.apply(v, x, method="forward_features")
    assert list(f) == [8] and f[8].shape == (2, 4, 4, 64)  # patch tokens on their grid, no class token
    assert model.apply(v, x, method="pre_logits").shape == (2, 64)
    avg = jaxformers.create_model("vit_tiny_patch16_224", **{**TINY, "num_classes": 0}, global_pool="avg", class_token=False)
    assert avg.apply(numpy_variables(avg, x), x).shape == (2, 64)
    with pytest.raises(ValueError, match="needs class_token"):
        numpy_variables(jaxformers.create_model("vit_tiny_patch16_224", **TINY, class_token=False), x)


def test_jit_grad_dropout_and_remat():
    model = jaxformers.create_model("vit_tiny_patch16_224", **TINY, drop_rate=0.1, drop_path_rate=0.2, remat=True)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    v = numpy_variables(model, x)
    v["params"]["head"]["kernel"] = jax.random.normal(jax.random.key(5), (64, 10))  # zero-init head: no grads

    @jax.jit
    def loss(p, rng):
        return model.apply({"params": p}, x, train=True, rngs={"dropout": rng}).sum() ** 2

    g = jax.grad(loss)(v["params"], jax.random.key(2))
    assert all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(g))
    assert np.abs(g["blocks_0"]["attn"]["qkv"]["kernel"]).sum() > 0
    a, b = loss(v["params"], jax.random.key(3)), loss(v["params"], jax.random.key(4))
    assert a != b  # dropout active in training


def test_bf16_compute_keeps_f32_params():
    model = jaxformers.create_model("vit_tiny_patch16_224", **TINY, dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    v = numpy_variables(model, x)
    assert v["params"]["blocks_0"]["mlp"]["fc1"]["kernel"].dtype == jnp.float32
    assert model.apply(v, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("name,expected", [("vit_tiny_patch16_224", 5_717_416), ("vit_small_patch16_224", 22_050_664),
                                           ("vit_base_patch16_224", 86_567_656)])
def test_param_counts_equal_timm(name, expected):
    assert jaxformers.count_params(name) == expected
    assert abs(expected / 1e6 - jaxformers.model_info(name).params_m) < 0.005


@pytest.mark.parametrize("x,match", [
    (np.ones((2, 32, 32, 1), np.float32), "in_chans=3"),
    (np.ones((2, 30, 30, 3), np.float32), "built for img_size=32x32"),
    (np.ones((32, 32, 3), np.float32), "rank 4"),
    (np.ones((2, 32, 32, 3), np.uint8), "floating-point"),
])
def test_bad_input(x, match):
    model = jaxformers.create_model("vit_tiny_patch16_224", **TINY)
    with pytest.raises((ValueError, TypeError), match=match):
        model.init(jax.random.key(0), jnp.asarray(x))


def test_patch_not_dividing_image_is_named():
    model = jaxformers.create_model("vit_tiny_patch16_224", **{**TINY, "img_size": 36})
    with pytest.raises(ValueError, match="divisible by 8x8"):
        model.init(jax.random.key(0), jnp.ones((1, 36, 36, 3)))


# ---- live parity with timm through our converter -------------------------------------------------

def _timm_vit(**kw):
    timm = pytest.importorskip("timm")
    pytest.importorskip("torch")
    return perturbed_torch_model(lambda: timm.models.vision_transformer.VisionTransformer(**kw))


@pytest.mark.parametrize("extra", [{}, {"global_pool": "avg", "class_token": False}, {"init_values": 0.1}],
                         ids=["token", "avg", "layerscale"])
def test_timm_parity(tmp_path, extra):
    torch = pytest.importorskip("torch")

    tm = _timm_vit(**TINY, **extra)
    torch.save(tm.state_dict(), tmp_path / "vit.pth")
    ours = {**TINY, **{k: v for k, v in extra.items() if k != "init_values"}}
    if "init_values" in extra:
        ours["layer_scale_init"] = extra["init_values"]
    v = jaxformers.load_pretrained("vit_tiny_patch16_224", tmp_path / "vit.pth", **ours)
    model = jaxformers.create_model("vit_tiny_patch16_224", **ours)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(model.apply(v, x), torch_logits(tm, x), rtol=1e-4, atol=1e-4)


def test_timm_parity_full_size_variant(tmp_path):
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")

    torch.manual_seed(0)
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        tm.head.weight.normal_(0, 0.02)
    torch.save(tm.state_dict(), tmp_path / "vit.pth")
    v = jaxformers.load_pretrained("vit_tiny_patch16_224", tmp_path / "vit.pth")
    x = np.random.default_rng(1).normal(size=(1, 224, 224, 3)).astype(np.float32)
    out = jaxformers.create_model("vit_tiny_patch16_224").apply(v, x)
    np.testing.assert_allclose(out, torch_logits(tm, x), rtol=1e-4, atol=1e-4)


def test_timm_parity_other_image_size(tmp_path):
    torch = pytest.importorskip("torch")
    resample_abs_pos_embed = pytest.importorskip("timm.layers").resample_abs_pos_embed

    tm = _timm_vit(**TINY)
    torch.save(tm.state_dict(), tmp_path / "vit.pth")
    big = _timm_vit(**{**TINY, "img_size": 48})
    sd = tm.state_dict()
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (6, 6), num_prefix_tokens=1)
    big.load_state_dict(sd)
    v = jaxformers.load_pretrained("vit_tiny_patch16_224", tmp_path / "vit.pth", **{**TINY, "img_size": 48})
    x = np.random.default_rng(2).normal(size=(2, 48, 48, 3)).astype(np.float32)
    model = jaxformers.create_model("vit_tiny_patch16_224", **{**TINY, "img_size": 48})
    np.testing.assert_allclose(model.apply(v, x), torch_logits(big, x), rtol=1e-4, atol=1e-4)


def test_load_pretrained_reports_keys_by_name(tmp_path):
    torch = pytest.importorskip("torch")

    sd = _timm_vit(**TINY).state_dict()
    sd["blocks.0.attn.extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected checkpoint keys \(1\): blocks.0.attn.extra"):
        jaxformers.load_pretrained("vit_tiny_patch16_224", tmp_path / "extra.pth", **TINY)
    del sd["blocks.0.attn.extra"], sd["blocks.1.norm2.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match="no key 'blocks.1.norm2.bias'"):
        jaxformers.load_pretrained("vit_tiny_patch16_224", tmp_path / "missing.pth", **TINY)

    torch.save(_timm_vit(**TINY).state_dict(), tmp_path / "ok.pth")
    with pytest.raises(CheckpointMismatchError, match=r"head/kernel \(64, 10\) vs expected \(64, 7\)"):
        jaxformers.load_pretrained("vit_tiny_patch16_224", tmp_path / "ok.pth", **{**TINY, "num_classes": 7})
    with pytest.warns(UserWarning, match="freshly initialised"):
        v = jaxformers.load_pretrained("vit_tiny_patch16_224", tmp_path / "ok.pth", strict=False,
                                       **{**TINY, "num_classes": 7})
    assert v["params"]["head"]["kernel"].shape == (64, 7)
    with pytest.raises(CheckpointMismatchError, match="no key 'blocks.2.norm1.weight'"):
        jaxformers.load_pretrained("vit_tiny_patch16_224", tmp_path / "ok.pth", **{**TINY, "depth": 3})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected checkpoint keys \(12\): blocks.1"):
        jaxformers.load_pretrained("vit_tiny_patch16_224", tmp_path / "ok.pth", **{**TINY, "depth": 1})


def test_load_pretrained_onto_a_mesh(tmp_path):
    torch = pytest.importorskip("torch")

    from jaxformers.sharding import make_mesh

    torch.save(_timm_vit(**TINY).state_dict(), tmp_path / "vit.pth")
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    v = jaxformers.load_pretrained("vit_tiny_patch16_224", tmp_path / "vit.pth", mesh=mesh, **TINY)
    assert v["params"]["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
