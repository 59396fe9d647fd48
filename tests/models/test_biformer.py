"""BiFormer: parameter counts, block math against a dense masked reference, converter, BN, sharding, training."""
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
from jaxformers.models.biformer import BiFormerBlock, BiLevelRoutingAttentionLayer, stage_resolutions
from jaxformers.registry import count_params
from jaxformers.sharding import make_mesh, unsharded_params
from tests.helpers import (assert_sharded_grads_match, digits, fast_jit, image, train_classifier,
                           model_and_features, needs_mosaic_gpu_interpreter, numpy_variables, random_params,
                           shard_like_init, single_and_sharded)

# Exact counts of the official implementation (rayleizhu/BiFormer models/biformer.py, 1000 classes,
# BN running statistics excluded), derived from its structure: stem conv3x3 (C/2) + BN + conv3x3 (C)
# + BN; per stage a conv3x3 + BN downsample; per block a 3x3 depthwise pos_embed conv, LN, attention
# (BRA: qkv Linear(C, 3C) with bias, wo Linear(C, C), 5x5 depthwise lepe; last stage AttentionLePE:
# qkv Linear(C, 3C) without bias, proj Linear(C, C), 5x5 depthwise lepe), LN, MLP 3C; BN norm; head.
# The README rounds them to 13.1M / 25.5M / 56.8M.
OFFICIAL_COUNTS = {"biformer_tiny": 13_142_760, "biformer_small": 25_536_232, "biformer_base": 56_804_968}
PAPER_PARAMS_M = {"biformer_tiny": 13.1, "biformer_small": 25.5, "biformer_base": 56.8}

# Tiny config: stage resolutions 16, 8, 4, 2 at 64x64 with 2x2 regions; the last stage is full attention.
TINY = dict(img_size=64, embed_dim=(16, 32, 64, 64), depth=(1, 1, 1, 1), head_dim=8, n_win=2, topks=(1, 2, 3, -2),
            num_classes=10)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, NumPy-drawn variables (non-trivial BN statistics) and its eval features for
    ``image(2, 64)``."""
    return model_and_features("biformer_tiny", image(2, 64), **TINY)


def test_param_counts_equal_official_implementation():
    counts = {name: count_params(name) for name in OFFICIAL_COUNTS}
    assert counts == OFFICIAL_COUNTS
    for name, count in counts.items():
        assert abs(count / 1e6 - PAPER_PARAMS_M[name]) <= 0.05, name
    assert jf.list_models("biformer_*") == sorted(OFFICIAL_COUNTS)


def test_forward_shapes_features_and_batch_stats(tiny):
    model, variables, out = tiny
    assert {k: v.shape for k, v in out.features.items()} == {
        4: (2, 16, 16, 16), 8: (2, 8, 8, 32), 16: (2, 4, 4, 64), 32: (2, 2, 2, 64)}
    assert out.pre_logits.shape == (2, 64) and out.logits.shape == (2, 10)
    head = variables["params"]["head"]
    np.testing.assert_allclose(out.pre_logits @ head["kernel"] + head["bias"], out.logits, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(out.logits)))
    assert float(jnp.std(out.logits[0] - out.logits[1])) > 1e-4
    assert set(variables["batch_stats"]) == {"stem", "downsample1", "downsample2", "downsample3", "norm"}
    assert jax.eval_shape(model.apply, variables, image(2, 64)).shape == (2, 10)
    # Training mode normalises with batch statistics and returns updated running ones.
    _, updated = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables,
                                image(2, 64))
    assert jax.tree_util.tree_structure(updated["batch_stats"]) == jax.tree_util.tree_structure(variables["batch_stats"])


# ---------------------------------------------------------------------------------------------
# The block against an independent float64 NumPy reference: dense attention with a routing mask


def _np_layer_norm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _np_depthwise(x, kernel, bias):
    """Zero-padded 'same' depthwise cross-correlation; kernel (k, k, 1, C)."""
    k = kernel.shape[0]
    r = k // 2
    _, height, width, _ = x.shape
    xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    out = np.zeros_like(x) + bias
    for i in range(k):
        for j in range(k):
            out += xp[:, i:i + height, j:j + width] * kernel[i, j, 0]
    return out


def _np_attention(q, k, v, scale, mask=None):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        logits = np.where(mask[:, None], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


def _np_block(p, x, num_heads, n_win, topk):
    b, height, width, dim = x.shape
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    x = x + _np_depthwise(x, p["pos_embed"]["kernel"], p["pos_embed"]["bias"])
    y = _np_layer_norm(x, p["norm1"])
    a = p["attn"]
    qkv = np.einsum("byxc,ctnd->byxtnd", y, a["qkv"]["kernel"]) + a["qkv"].get("bias", 0.0)
    q, k, v = (qkv[..., i, :, :].reshape(b, height * width, num_heads, -1) for i in range(3))
    if topk == -2:  # full attention, head_dim scale, LePE of the normed input
        out = _np_attention(q, k, v, (dim // num_heads) ** -0.5).reshape(b, height, width, dim)
        out = out + _np_depthwise(y, a["lepe"]["conv"]["kernel"], a["lepe"]["conv"]["bias"])
    else:  # route: region means, top-k regions per query region, mask; scale qk_dim**-0.5
        rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        region = ((rows // (height // n_win)) * n_win + cols // (width // n_win)).reshape(-1)
        one_hot = np.eye(n_win * n_win)[region]  # (L, R)
        q_mean = np.einsum("blc,lr->brc", q.reshape(b, -1, dim), one_hot) / one_hot.sum(0)[:, None]
        k_mean = np.einsum("blc,lr->brc", k.reshape(b, -1, dim), one_hot) / one_hot.sum(0)[:, None]
        top = np.argsort(-np.einsum("brc,bsc->brs", q_mean, k_mean), axis=-1)[..., :topk]  # (B, R, topk)
        allowed = np.zeros((b, n_win * n_win, n_win * n_win), bool)
        np.put_along_axis(allowed, top, True, axis=-1)
        mask = allowed[:, region][:, :, region]  # (B, L, L)
        out = _np_attention(q, k, v, dim ** -0.5, mask).reshape(b, height, width, dim)
        out = out + _np_depthwise(v.reshape(b, height, width, dim), a["lepe"]["conv"]["kernel"], a["lepe"]["conv"]["bias"])
    out = np.einsum("byxnd,nde->byxe", out.reshape(b, height, width, num_heads, -1), a["proj"]["kernel"])
    x = x + out + a["proj"]["bias"]
    y = _np_layer_norm(x, p["norm2"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    y = np.asarray(jax.nn.gelu(jnp.asarray(y, jnp.float32), approximate=False), np.float64)
    return x + y @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


@pytest.mark.parametrize("shape,heads,n_win,topk", [((8, 8), 2, 4, 3), ((6, 9), 4, 3, 2), ((6, 6), 4, 2, -2)])
def test_block_matches_dense_masked_reference(shape, heads, n_win, topk):
    block = BiFormerBlock(num_heads=heads, n_win=n_win, topk=topk)
    x = jax.random.normal(jax.random.key(2), (2,) + shape + (16,))
    params = random_params(block, x)
    out = np.asarray(fast_jit(block.apply)({"params": params}, x))
    ref = _np_block(params, np.asarray(x, np.float64), heads, n_win, topk)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    if topk != -2:  # the routing matters: full attention would give another answer
        assert not np.allclose(ref, _np_block(params, np.asarray(x, np.float64), heads, n_win, n_win * n_win), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Converter: an official-style checkpoint (key names and shapes of the official BiFormer)


def official_biformer_state_dict(cfg, seed=0):
    """Every key of the official ``BiFormer(...).state_dict()`` with its shape (torch tensors, random
    values, positive running variances). Mirrors the official module tree: ``downsample_layers`` (stem
    Sequential conv/BN/GELU/conv/BN, then conv/BN), ``stages.{s}.{j}`` Blocks (``pos_embed``, ``norm1``,
    ``attn``, ``norm2``, ``mlp`` Sequential Linear/Identity/GELU/Linear), ``norm`` (BN), ``head``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}

    def put(name, *shape):
        sd[name] = torch.randn(*shape, generator=g) * 0.1

    def conv(name, cout, cin, k):
        put(name + ".weight", cout, cin, k, k)
        put(name + ".bias", cout)

    def bn(name, c):
        put(name + ".weight", c)
        put(name + ".bias", c)
        put(name + ".running_mean", c)
        sd[name + ".running_var"] = torch.rand(c, generator=g) + 0.5
        sd[name + ".num_batches_tracked"] = torch.tensor(1000, dtype=torch.long)

    e = cfg["embed_dim"]
    conv("downsample_layers.0.0", e[0] // 2, 3, 3)
    bn("downsample_layers.0.1", e[0] // 2)
    conv("downsample_layers.0.3", e[0], e[0] // 2, 3)
    bn("downsample_layers.0.4", e[0])
    for s in range(1, 4):
        conv(f"downsample_layers.{s}.0", e[s], e[s - 1], 3)
        bn(f"downsample_layers.{s}.1", e[s])
    for s in range(4):
        c = e[s]
        for j in range(cfg["depth"][s]):
            t = f"stages.{s}.{j}."
            conv(t + "pos_embed", c, 1, 3)
            put(t + "norm1.weight", c)
            put(t + "norm1.bias", c)
            conv(t + "attn.lepe", c, 1, 5)
            if cfg["topks"][s] == -2:  # AttentionLePE
                put(t + "attn.qkv.weight", 3 * c, c)
                put(t + "attn.proj.weight", c, c)
                put(t + "attn.proj.bias", c)
            else:  # BiLevelRoutingAttention (QKVLinear inside ``qkv``, output ``wo``)
                put(t + "attn.qkv.qkv.weight", 3 * c, c)
                put(t + "attn.qkv.qkv.bias", 3 * c)
                put(t + "attn.wo.weight", c, c)
                put(t + "attn.wo.bias", c)
            put(t + "norm2.weight", c)
            put(t + "norm2.bias", c)
            put(t + "mlp.0.weight", 3 * c, c)
            put(t + "mlp.0.bias", 3 * c)
            put(t + "mlp.3.weight", c, 3 * c)
            put(t + "mlp.3.bias", c)
    bn("norm", e[3])
    put("head.weight", cfg["num_classes"], e[3])
    put("head.bias", cfg["num_classes"])
    return sd


def test_converter_maps_every_official_key(tmp_path):
    torch = pytest.importorskip("torch")
    sd = official_biformer_state_dict(TINY)
    path = tmp_path / "biformer_tiny.pth"
    torch.save({"model": sd}, path)  # the released files hold the state dict under "model"
    variables = load_pretrained("biformer_tiny", path, **TINY)  # strict: every key used, every shape right
    model = jf.create_model("biformer_tiny", **TINY)
    expected = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), image(1, 64))))
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected)
    p, st = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(st["stem"]["bn1"]["var"], sd["downsample_layers.0.4.running_var"].numpy())
    np.testing.assert_array_equal(st["norm"]["mean"], sd["norm.running_mean"].numpy())
    np.testing.assert_array_equal(p["downsample2"]["bn0"]["scale"], sd["downsample_layers.2.1.weight"].numpy())
    w = sd["stages.1.0.attn.qkv.qkv.weight"].numpy()  # rows [q | k | v]; 4 heads of 8 in stage 2
    np.testing.assert_array_equal(p["stage2_0"]["attn"]["qkv"]["kernel"][:, 2, 3, :], w[2 * 32 + 24:2 * 32 + 32].T)
    np.testing.assert_array_equal(p["stage4_0"]["attn"]["proj"]["kernel"].reshape(64, 64),
                                  sd["stages.3.0.attn.proj.weight"].numpy().T)
    np.testing.assert_array_equal(p["stage3_0"]["mlp"]["fc2"]["kernel"], sd["stages.2.0.mlp.3.weight"].numpy().T)


def test_converter_reports_missing_and_extra_keys(tmp_path):
    torch = pytest.importorskip("torch")
    sd = official_biformer_state_dict(TINY)
    missing = {k: v for k, v in sd.items() if k != "downsample_layers.2.1.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match=r"downsample_layers\.2\.1\.running_var"):
        load_pretrained("biformer_tiny", tmp_path / "missing.pth", **TINY)
    extra = {**sd, "stages.0.0.attn.router.emb.weight": torch.zeros(16, 16)}  # a param_routing checkpoint
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected checkpoint keys.*stages\.0\.0\.attn\.router\.emb"):
        load_pretrained("biformer_tiny", tmp_path / "extra.pth", **TINY)


# ---------------------------------------------------------------------------------------------
# Sharding, training, errors


def test_sharded_equals_single_device(tiny):
    model, variables, _ = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = image(4, 64)
    sharded_vars = shard_like_init(model, variables, x, mesh)
    assert unsharded_params(sharded_vars, mesh, min_size=4096) == []  # fsdp really splits the large params
    # Training mode: the BatchNorm statistics must be global over the sharded batch.
    fwd = fast_jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    (single, single_stats), (sharded, sharded_stats) = single_and_sharded(fwd, variables, sharded_vars, x, mesh)
    assert float(jnp.std(single)) > 1e-3
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                           sharded_stats, single_stats)
    # Depthwise kernel gradients (pos_embed, LePE): XLA's partitioner alone gets them wrong on this mesh.
    assert_sharded_grads_match(model, variables, sharded_vars, x, mesh)


@pytest.mark.slow
def test_train_steps_reduce_the_loss_and_grad_reaches_every_parameter():
    model = jf.create_model("biformer_tiny", img_size=32, embed_dim=(16, 32, 32, 32), depth=(1, 1, 1, 1), head_dim=8,
                            n_win=2, topks=(1, 2, 4, -2), num_classes=10, drop_path_rate=0.1, remat=True)
    x, y = digits()
    variables = numpy_variables(model, x[:2])
    losses, trained = train_classifier(model, variables, x, y, steps=12, tx=optax.adamw(3e-3))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    assert not np.allclose(trained["batch_stats"]["norm"]["mean"], variables["batch_stats"]["norm"]["mean"])


def test_bad_inputs_raise_clear_errors(tiny):
    model, variables, _ = tiny
    init = lambda m, x: jax.eval_shape(lambda: m.init(jax.random.key(0), x))  # noqa: E731
    real = jf.create_model("biformer_tiny")
    assert stage_resolutions(224, 224) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    with pytest.raises(ValueError, match=r"200x200.*stage 1 50x50.*divisible by n_win=7"):
        init(real, jnp.zeros((1, 200, 200, 3)))
    with pytest.raises(ValueError, match=r"stage 3 3x3.*divisible by n_win=2"):
        model.apply(variables, jnp.zeros((1, 48, 48, 3)))
    with pytest.raises(ValueError, match="in_chans=3"):
        model.apply(variables, jnp.zeros((1, 64, 64, 4)))
    with pytest.raises(TypeError, match="floating-point"):
        model.apply(variables, jnp.zeros((1, 64, 64, 3), jnp.uint8))
    with pytest.raises(ValueError, match="topks entries"):
        init(jf.create_model("biformer_tiny", **{**TINY, "topks": (1, 2, 0, -2)}), image(1, 64))
    with pytest.raises(ValueError, match="topk must be in 1..4"):
        init(jf.create_model("biformer_tiny", **{**TINY, "topks": (1, 2, 5, -2)}), image(1, 64))


@needs_mosaic_gpu_interpreter
def test_hopper_kernels_through_the_layer(monkeypatch):
    """A bf16 BRA layer (4x4-token regions: the routing-bit-mask path) with the Hopper kernels chosen
    for the whole process (``JAXFORMERS_GPU_KERNEL=mosaic``), in Mosaic GPU interpret mode on CPU,
    agrees with the float32 XLA layer to bf16 accuracy, forward and input gradient."""
    from jaxformers.kernels.bi_level_routing import api, mosaic_gpu

    calls, kernel = [], mosaic_gpu.bi_level_routing_attention_mosaic
    monkeypatch.setattr(mosaic_gpu, "bi_level_routing_attention_mosaic",
                        lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    monkeypatch.setenv("JAXFORMERS_GPU_KERNEL", "mosaic")
    x = jax.random.normal(jax.random.key(8), (1, 8, 8, 64)).astype(jnp.bfloat16)
    xla = BiLevelRoutingAttentionLayer(2, n_win=2, topk=2)
    mosaic = BiLevelRoutingAttentionLayer(2, n_win=2, topk=2, dtype=jnp.bfloat16, attention_impl="pallas")
    params = {"params": random_params(xla, x)}
    loss = lambda m: lambda x: jnp.sum(m.apply(params, x).astype(jnp.float32) ** 2)  # noqa: E731
    x32 = x.astype(jnp.float32)

    def fresh(fn, *args):  # traced afresh (not from the op's jit cache), so through the patched kernel
        api._pallas.clear_cache()
        return fn(*args)

    pairs = ((fresh(mosaic.apply, params, x), xla.apply(params, x32)),
             (fresh(jax.grad(loss(mosaic)), x), jax.grad(loss(xla))(x32)))
    for got, want in pairs:
        peak = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32) / peak, np.asarray(want) / peak, atol=2e-2)
    assert len(calls) == 2  # the forward and the gradient both ran the Hopper kernels


def test_pallas_attention_matches_xla():
    """``attention_impl="pallas"`` routes BRA to the fused kernel (interpret mode on CPU) and the last
    stage to the Pallas dense path; forward and gradients agree with the XLA reference."""
    x = jax.random.normal(jax.random.key(7), (1, 8, 8, 16))
    for topk in (2, -2):
        xla = BiLevelRoutingAttentionLayer(2, n_win=2, topk=topk)
        pallas = BiLevelRoutingAttentionLayer(2, n_win=2, topk=topk, attention_impl="pallas")
        params = {"params": random_params(xla, x)}
        np.testing.assert_allclose(fast_jit(pallas.apply)(params, x), fast_jit(xla.apply)(params, x),
                                   rtol=1e-5, atol=1e-5)
        if topk > 0:
            grad = lambda m: fast_jit(jax.grad(lambda p, x: jnp.sum(m.apply(p, x) ** 2), argnums=(0, 1)))  # noqa: E731
            for a, b in zip(jax.tree_util.tree_leaves(grad(pallas)(params, x)), jax.tree_util.tree_leaves(grad(xla)(params, x))):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
