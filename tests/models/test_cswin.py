"""CSWin Transformer: parameter counts, the stripe-attention op, block math, converter, sharding, training."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.convert import load_pretrained
from jaxformers.convert.pretrained import CheckpointMismatchError
from jaxformers.models.cswin import CSWinBlock, stripe_attention
from jaxformers.registry import count_params
from jaxformers.sharding import make_mesh, unsharded_params
from tests.helpers import (assert_every_param_has_gradient, assert_sharded_grads_match, digits, fast_jit, image,
                           model_and_features, numpy_variables, random_params, shard_like_init,
                           single_and_sharded)

# Exact counts of the official implementation (microsoft/CSWin-Transformer models/cswin.py, 1000
# classes): sum of numel over the parameters of its modules, derived from its structure (stem conv
# 7x7 + LN; per block LN, qkv Linear(C, 3C) with bias, proj Linear(C, C), one 3x3 depthwise get_v
# conv (with bias) per branch of C/branches channels, LN, MLP 4C; merge conv 3x3 + LN; LN; head).
# The README rounds them to 23M / 35M / 78M / 78M / 173M / 173M.
OFFICIAL_COUNTS = {
    "cswin_tiny_224": 22_320_552,
    "cswin_small_224": 34_643_304,
    "cswin_base_224": 77_382_184,
    "cswin_base_384": 77_382_184,
    "cswin_large_224": 173_262_664,
    "cswin_large_384": 173_262_664,
}
PAPER_PARAMS_M = {"cswin_tiny_224": 23, "cswin_small_224": 35, "cswin_base_224": 78, "cswin_base_384": 78,
                  "cswin_large_224": 173, "cswin_large_384": 173}

# Tiny config: stage resolutions 16, 8, 4, 2 at 64x64; stripes in stages 1-3, full attention in stage 4.
TINY = dict(img_size=64, embed_dim=16, depth=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), split_size=(1, 2, 2, 2),
            num_classes=10)
# Same, but stage 3 resolution (4) equals its stripe width: the official last-stage rule makes it full.
TINY_FULL3 = {**TINY, "split_size": (1, 2, 4, 4)}


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, NumPy-drawn variables and its features for ``image(2, 64)``."""
    return model_and_features("cswin_tiny_224", image(2, 64), **TINY)


def test_param_counts_equal_official_implementation():
    counts = {name: count_params(name) for name in OFFICIAL_COUNTS}
    assert counts == OFFICIAL_COUNTS
    for name, count in counts.items():
        assert abs(count / 1e6 - PAPER_PARAMS_M[name]) < 1.0, name  # the README's rounding (T: 22.3 vs "23")
        assert jf.model_info(name).params_m == round(count / 1e6, 2)


def test_registered_variants_and_layout():
    assert jf.list_models("cswin_*") == sorted(OFFICIAL_COUNTS)
    assert jf.create_model("cswin_large_224").num_heads == (6, 12, 24, 24)
    assert jf.create_model("cswin_tiny_224").stage_layout() == [False, False, False, True]
    assert jf.create_model("cswin_base_384").stage_layout() == [False, False, False, True]
    assert jf.create_model("cswin_tiny_224", **TINY_FULL3).stage_layout() == [False, False, True, True]
    assert jf.create_model("cswin_small_224", num_classes=5, drop_path_rate=0.3).drop_path_rate == 0.3


def test_forward_shapes_and_features(tiny):
    model, variables, out = tiny
    assert {k: v.shape for k, v in out.features.items()} == {
        4: (2, 16, 16, 16), 8: (2, 8, 8, 32), 16: (2, 4, 4, 64), 32: (2, 2, 2, 128)}
    assert out.pre_logits.shape == (2, 128) and out.logits.shape == (2, 10)
    head = variables["params"]["head"]
    np.testing.assert_allclose(out.pre_logits @ head["kernel"] + head["bias"], out.logits, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(out.logits)))
    assert float(jnp.std(out.logits[0] - out.logits[1])) > 1e-4  # the images are told apart
    assert jax.eval_shape(model.apply, variables, image(2, 64)).shape == (2, 10)
    # Other sizes run with the same layout (stripes over the actual resolution).
    assert jax.eval_shape(model.apply, variables, image(1, 128)).shape == (1, 10)


def _dense_stripe_reference(q, k, v, window, scale):
    """Dense attention over all H*W tokens, masked so tokens see only their own window."""
    b, height, width, h, d = q.shape
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    wid = (rows // window[0]) * (width // window[1]) + cols // window[1]
    mask = wid.reshape(-1)[:, None] == wid.reshape(-1)[None, :]
    qf, kf, vf = (t.reshape(b, height * width, h, -1) for t in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), vf)
    return out.reshape(b, height, width, h, -1)


@pytest.mark.parametrize("shape,window", [((8, 8), (8, 2)), ((4, 6), (4, 3)), ((6, 4), (2, 4))])
def test_stripe_attention_matches_dense_masked_reference(shape, window):
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(kk, (2,) + shape + (3, 4)) for kk in keys)
    both = fast_jit(lambda q, k, v: (stripe_attention(q, k, v, window=window, scale=0.5),
                                    _dense_stripe_reference(q, k, v, window, 0.5)))
    out, ref = both(q, k, v)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _layer_norm(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _windowed_depthwise_conv(x, kernel, bias, window):
    """3x3 depthwise conv where a neighbour counts only if it lies in the same window (zero padding
    at every window border), written as a sum of masked shifts."""
    _, height, width, _ = x.shape
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    out = jnp.zeros_like(x) + bias
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            r, c = rows + dy, cols + dx
            ok = ((r >= 0) & (r < height) & (c >= 0) & (c < width)
                  & (r // window[0] == rows // window[0]) & (c // window[1] == cols // window[1]))
            shifted = padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
            out = out + jnp.where(ok[None, :, :, None], shifted, 0.0) * kernel[dy + 1, dx + 1, 0]
    return out


def _reference_block(p, x, num_heads, split, full):
    b, height, width, dim = x.shape
    d = dim // num_heads
    y = _layer_norm(x, p["norm1"])
    qkv = jnp.einsum("byxc,ctnd->byxtnd", y, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    h2 = num_heads // 2
    branches = [(0, num_heads, (height, width))] if full else [(0, h2, (height, split)), (h2, num_heads, (split, width))]
    outs = []
    for i, (lo, hi, window) in enumerate(branches):
        att = _dense_stripe_reference(q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :], window, d ** -0.5)
        vb = v[..., lo:hi, :].reshape(b, height, width, -1)
        lp = p[f"lepe_{i}"]["conv"]
        outs.append(att + _windowed_depthwise_conv(vb, lp["kernel"], lp["bias"], window).reshape(att.shape))
    out = jnp.einsum("byxnd,nde->byxe", jnp.concatenate(outs, axis=-2), p["proj"]["kernel"]) + p["proj"]["bias"]
    x = x + out
    y = _layer_norm(x, p["norm2"])
    y = jax.nn.gelu(y @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"], approximate=False)
    return x + y @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


@pytest.mark.parametrize("shape,split,full", [((8, 8), 2, False), ((6, 9), 3, False), ((4, 4), 4, True)])
def test_block_matches_masked_reference(shape, split, full):
    block = CSWinBlock(num_heads=4, split_size=split, full_attention=full)
    x = jax.random.normal(jax.random.key(2), (2,) + shape + (16,))
    params = random_params(block, x)
    out, ref = fast_jit(lambda p, x: (block.apply({"params": p}, x), _reference_block(p, x, 4, split, full)))(params, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Converter: an official-style state dict (key names and shapes of the official CSWinTransformer)


def official_cswin_state_dict(cfg, seed=0):
    """Every key of the official ``CSWinTransformer(**cfg).state_dict()`` with its shape, random values
    (torch tensors). Mirrors the official module tree: ``stage1_conv_embed`` (Conv2d, Rearrange,
    LayerNorm), ``stage{s}.{j}`` CSWinBlocks, ``merge{s}`` Merge_Blocks, ``norm``, ``head``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}

    def put(name, *shape):
        sd[name] = torch.randn(*shape, generator=g) * 0.1

    c, dim = cfg["embed_dim"], cfg["embed_dim"]
    put("stage1_conv_embed.0.weight", c, 3, 7, 7)
    put("stage1_conv_embed.0.bias", c)
    put("stage1_conv_embed.2.weight", c)
    put("stage1_conv_embed.2.bias", c)
    size = cfg["img_size"] // 4
    for s in range(4):
        if s > 0:
            put(f"merge{s}.conv.weight", dim * 2, dim, 3, 3)
            put(f"merge{s}.conv.bias", dim * 2)
            dim, size = dim * 2, size // 2
            put(f"merge{s}.norm.weight", dim)
            put(f"merge{s}.norm.bias", dim)
        branches = 1 if (s == 3 or size == cfg["split_size"][s]) else 2
        for j in range(cfg["depth"][s]):
            t = f"stage{s + 1}.{j}."
            put(t + "qkv.weight", 3 * dim, dim)
            put(t + "qkv.bias", 3 * dim)
            put(t + "norm1.weight", dim)
            put(t + "norm1.bias", dim)
            put(t + "proj.weight", dim, dim)
            put(t + "proj.bias", dim)
            for b in range(branches):
                put(t + f"attns.{b}.get_v.weight", dim // branches, 1, 3, 3)
                put(t + f"attns.{b}.get_v.bias", dim // branches)
            put(t + "mlp.fc1.weight", 4 * dim, dim)
            put(t + "mlp.fc1.bias", 4 * dim)
            put(t + "mlp.fc2.weight", dim, 4 * dim)
            put(t + "mlp.fc2.bias", dim)
            put(t + "norm2.weight", dim)
            put(t + "norm2.bias", dim)
    put("norm.weight", dim)
    put("norm.bias", dim)
    put("head.weight", cfg["num_classes"], dim)
    put("head.bias", cfg["num_classes"])
    return sd


@pytest.mark.parametrize("cfg", [TINY, TINY_FULL3], ids=["stripes", "full-attention-rule"])
def test_converter_maps_every_official_key(cfg, tmp_path):
    torch = pytest.importorskip("torch")
    sd = official_cswin_state_dict(cfg)
    path = tmp_path / "cswin.pth"
    torch.save({"state_dict_ema": {}, "state_dict": sd, "epoch": 300}, path)
    variables = load_pretrained("cswin_tiny_224", path, **cfg)  # strict: every key used, every shape right
    model = jf.create_model("cswin_tiny_224", **cfg)
    expected = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), image(1, 64), train=False)))
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected)
    p = variables["params"]
    dim = cfg["embed_dim"]
    w = sd["stage1.0.qkv.weight"].numpy()  # rows: [q | k | v], each heads x head_dim
    np.testing.assert_array_equal(p["stage1_0"]["qkv"]["kernel"][:, 1, 1, :], w[dim + dim // 2:2 * dim].T)
    np.testing.assert_array_equal(p["stage1_0"]["lepe_1"]["conv"]["kernel"][:, :, 0, 3],
                                  sd["stage1.0.attns.1.get_v.weight"].numpy()[3, 0])
    np.testing.assert_array_equal(p["stem"]["conv"]["kernel"][2, 5, 1], sd["stage1_conv_embed.0.weight"].numpy()[:, 1, 2, 5])


def test_converter_reports_missing_extra_and_misshaped_keys(tmp_path):
    torch = pytest.importorskip("torch")
    sd = official_cswin_state_dict(TINY)
    missing = dict(sd)
    del missing["stage3.0.attns.1.get_v.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match=r"stage3\.0\.attns\.1\.get_v\.bias"):
        load_pretrained("cswin_tiny_224", tmp_path / "missing.pth", **TINY)
    extra = {**sd, "stage2.0.attns.2.get_v.weight": torch.zeros(16, 1, 3, 3)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected checkpoint keys.*stage2\.0\.attns\.2\.get_v\.weight"):
        load_pretrained("cswin_tiny_224", tmp_path / "extra.pth", **TINY)
    # A checkpoint for another number of classes: the head is reported by name and shape.
    torch.save(sd, tmp_path / "ok.pth")
    with pytest.raises(CheckpointMismatchError, match=r"params/head/kernel \(128, 10\) vs expected \(128, 3\)"):
        load_pretrained("cswin_tiny_224", tmp_path / "ok.pth", **{**TINY, "num_classes": 3})


# ---------------------------------------------------------------------------------------------
# Sharding, training, errors


def test_sharded_equals_single_device(tiny):
    model, variables, _ = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = image(4, 64)
    sharded_vars = shard_like_init(model, variables, x, mesh)
    assert unsharded_params(sharded_vars, mesh, min_size=4096) == []  # fsdp really splits the large params
    fwd = fast_jit(model.apply)
    single, sharded = single_and_sharded(fwd, variables, sharded_vars, x, mesh)
    assert float(jnp.std(single)) > 1e-3  # the logits differ between images (no degenerate head)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)
    # Depthwise (LePE) kernel gradients: XLA's partitioner alone gets them wrong on this mesh.
    assert_sharded_grads_match(model, variables, sharded_vars, x, mesh)


@pytest.mark.slow
def test_train_steps_reduce_the_loss_and_grad_reaches_every_parameter():
    model = jf.create_model("cswin_tiny_224", img_size=32, embed_dim=16, depth=(1, 1, 1, 1), num_heads=(2, 2, 2, 2),
                            split_size=(1, 2, 2, 1), num_classes=10, drop_path_rate=0.1, remat=True)
    x, y = digits()
    params = numpy_variables(model, x[:1])["params"]
    tx = optax.adamw(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss, g

    losses = []
    for i in range(12):
        params, opt, loss, grads = step(params, opt, jax.random.key(i))
        losses.append(float(loss))
        if i == 0:
            assert_every_param_has_gradient(grads)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_drop_path_is_random_in_training_only(tiny):
    variables = tiny[1]
    x = image(2, 64)
    drop = jf.create_model("cswin_tiny_224", **TINY, drop_path_rate=0.5)
    run = fast_jit(lambda v, x, r, train: drop.apply(v, x, train=train, rngs={"dropout": r}), static_argnums=3)
    a, b = run(variables, x, jax.random.key(0), True), run(variables, x, jax.random.key(1), True)
    assert not np.allclose(a, b)


def test_bad_inputs_raise_clear_errors(tiny):
    model, variables, _ = tiny
    init = lambda m, x: jax.eval_shape(lambda: m.init(jax.random.key(0), x))  # noqa: E731
    real = jf.create_model("cswin_tiny_224")
    with pytest.raises(ValueError, match="225x225.*divisible by 32"):
        init(real, jnp.zeros((1, 225, 225, 3)))
    with pytest.raises(ValueError, match="stage resolution 20x20 is not divisible by its stripe width split_size=7"):
        init(real, jnp.zeros((1, 320, 320, 3)))
    with pytest.raises(ValueError, match="in_chans=3"):
        model.apply(variables, jnp.zeros((1, 64, 64, 1)))
    with pytest.raises(ValueError, match="rank 4"):
        model.apply(variables, jnp.zeros((64, 64, 3)))
    with pytest.raises(ValueError, match="num_heads=3 is odd"):
        init(jf.create_model("cswin_tiny_224", **{**TINY, "num_heads": (3, 2, 4, 4), "embed_dim": 12}),
             jnp.zeros((1, 64, 64, 3)))


def test_pallas_attention_matches_xla():
    """``attention_impl="pallas"`` sends the stripe attention to the Pallas kernel (interpret mode on CPU)."""
    x = jax.random.normal(jax.random.key(7), (1, 8, 8, 16))
    params = {"params": random_params(CSWinBlock(num_heads=4, split_size=2), x)}
    xla = fast_jit(CSWinBlock(num_heads=4, split_size=2).apply)(params, x)
    pallas = fast_jit(CSWinBlock(num_heads=4, split_size=2, attention_impl="pallas").apply)(params, x)
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5)
