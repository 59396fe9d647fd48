"""PVTv2 (timm names, counts, live timm parity) and EcoFormer on it (KSH hashing + linear attention,
official-code parity, the linear form against the explicit kernel form, hash learning)."""
from __future__ import annotations

import os
import sys
import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.compress import ecoformer as eco
from jaxformers.models.pvt_v2 import TIMM_PARAMS
from jaxformers.sharding import activate, make_mesh, shard_batch
from tests.helpers import (OFFICIAL_CODE, digits, fast_jit, image, model_and_features, numpy_variables,
                           perturbed_torch_model, shard_like_init, torch_logits)

TINY = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2),
            num_classes=10)
ECO = {**TINY, "attn_type": "ecoformer", "ecoformer_anchors": 6, "ecoformer_topk": 3}
ECOFORMER_PVT = str(OFFICIAL_CODE / "ziplab+EcoFormer" / "pvt")


@pytest.fixture(scope="module")
def tiny():
    return model_and_features("pvt_v2_b0", image(4, 32), **TINY)  # 4 images: one per (data, fsdp) shard


def test_param_counts_equal_timm():
    counts = {name: jf.count_params(name, img_size=32) for name in TIMM_PARAMS}
    assert counts == TIMM_PARAMS
    assert sorted(TIMM_PARAMS) == jf.list_models("pvt_v2_*")
    # EcoFormer keeps the host's parameter count minus SRA's reduction convs and norms (A is a buffer).
    assert jf.count_params("pvt_v2_b0", img_size=32, attn_type="ecoformer") == 3_136_328


def test_features_by_stride_and_logits(tiny):
    model, variables, out = tiny
    assert {k: v.shape for k, v in out.features.items()} == {4: (4, 8, 8, 16), 8: (4, 4, 4, 32),
                                                             16: (4, 2, 2, 48), 32: (4, 1, 1, 64)}
    assert out.logits.shape == (4, 10) and out.pre_logits.shape == (4, 64)
    np.testing.assert_allclose(out.pre_logits, out.features[32].mean(axis=(1, 2)), atol=1e-5)
    assert float(jnp.std(out.logits[0] - out.logits[1])) > 1e-4  # the images are told apart
    assert jax.eval_shape(model.apply, variables, image(1, 96)).shape == (1, 10)  # any size runs


@pytest.mark.parametrize("linear", [False, True], ids=["sra", "linear"])
def test_timm_parity(tmp_path, linear):
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    tm = perturbed_torch_model(lambda: timm.models.pvt_v2.PyramidVisionTransformerV2(**TINY, linear=linear))
    torch.save(tm.state_dict(), tmp_path / "pvt.pth")
    variables = jf.load_pretrained("pvt_v2_b0", tmp_path / "pvt.pth", **TINY, linear=linear)
    model = jf.create_model("pvt_v2_b0", **TINY, linear=linear)
    x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
    ref = torch_logits(tm, x)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(fast_jit(model.apply)(variables, x), ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# EcoFormer


def _official_modules():
    if not os.path.isdir(ECOFORMER_PVT):
        pytest.skip("the official EcoFormer code is not fetched (ziplab/EcoFormer in /work/ext)")
    pytest.importorskip("timm")
    pytest.importorskip("einops")
    sys.path.insert(0, ECOFORMER_PVT)
    logger = sys.modules.setdefault("logger", types.ModuleType("logger"))
    logger.logger = types.SimpleNamespace(info=lambda *a, **k: None)
    # One ``params.args`` object for the whole run: the official attention binds it at its first import
    # (the Twins test may have been first), so it is updated in place, never replaced.
    params = sys.modules.setdefault("params", types.ModuleType("params"))
    params.args = getattr(params, "args", None) or types.SimpleNamespace()
    params.args.__dict__.update(nbits=16, m=6, topk=3, attn_type="ecoformer")
    import pvt_v2 as official  # noqa: PLC0415
    from hashing.ksh import KernelSH  # noqa: PLC0415
    return official, KernelSH


def test_official_ecoformer_parity(tmp_path):
    """The official PVTv2-EcoFormer learns its hash on a batch; the same state dict through our
    converter gives the same logits (hash buffers included)."""
    torch = pytest.importorskip("torch")
    official, _ = _official_modules()
    cfg = dict(embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 1, 1],
               sr_ratios=[8, 4, 2, 1], qkv_bias=True, num_classes=10,
               norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    tm = perturbed_torch_model(lambda: official.PyramidVisionTransformerV2(**cfg))
    for module in tm.modules():
        if hasattr(module, "iteration_n"):
            module.iteration_n = 3  # a short KSH learning (the hash state is compared, not re-learned)
    x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
    tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))  # first forward: learns the KSH (needs autograd)
    ref = torch_logits(tm, x)
    torch.save(tm.state_dict(), tmp_path / "eco.pth")
    variables = jf.load_pretrained("pvt_v2_b0", tmp_path / "eco.pth", **ECO)
    model = jf.create_model("pvt_v2_b0", **ECO)
    np.testing.assert_allclose(fast_jit(model.apply)(variables, x), ref, atol=1e-4, rtol=0)


def test_official_ksh_learning_and_hash_parity():
    torch = pytest.importorskip("torch")
    _, KernelSH = _official_modules()
    torch.manual_seed(0)
    b, h, n, d, m = 2, 2, 24, 8, 6
    x = torch.randn(b, h, n, d)
    x = x / x.norm(dim=-1, keepdim=True)
    ksh = KernelSH(h, d, 16, m, learning_rate=0.05, iteration_n=10)
    a0 = ksh.A.clone()
    s0 = eco.similarity_targets(jnp.asarray(x.numpy()), 3)
    ksh.train_hashing_weight_woeig(x, x[:1, :, :m], torch.from_numpy(np.asarray(s0)))
    A, mvec = eco.learn_ksh(jnp.asarray(x.numpy()), jnp.asarray(x[0, :, :m].numpy()), jnp.asarray(a0.numpy()), s0,
                            iterations=10, learning_rate=0.05)
    assert (np.abs(ksh.A.numpy() - a0.numpy()).sum(-1) > 0).sum() >= 2  # some bits were re-learned
    np.testing.assert_allclose(A, ksh.A.numpy(), atol=1e-5)
    np.testing.assert_allclose(mvec, ksh.mvec[0, :, 0].numpy(), atol=1e-6)
    xt = torch.randn(b, h, n, d)
    xt = xt / xt.norm(dim=-1, keepdim=True)
    codes = eco.ksh_hash(jnp.asarray(xt.numpy()), A, jnp.asarray(x[0, :, :m].numpy()), mvec)
    np.testing.assert_array_equal(codes, ksh(xt).numpy())


def _codes(seed, shape=(2, 3, 12, 16)):
    return jnp.sign(jax.random.normal(jax.random.key(seed), shape))


def test_linear_form_equals_explicit_kernel_form():
    h, v = _codes(0), jax.random.normal(jax.random.key(1), (2, 3, 12, 5))

    def explicit(h, v, bias):  # the N x N kernel h_n . h_j written out
        kernel = jnp.einsum("bhnk,bhmk->bhnm", h, h)
        n = h.shape[2]
        return (jnp.einsum("bhnm,bhme->bhne", kernel, v) + bias * v) / (kernel.sum(-1) + n * bias)[..., None]

    both = fast_jit(lambda h, v: (eco.linear_attention_bias(h, h, v, 17.0), explicit(h, v, 17.0)))
    np.testing.assert_allclose(*both(h, v), rtol=1e-5, atol=1e-6)


def test_ksh_learning_lowers_the_code_loss_and_ste_rule():
    x = jax.random.normal(jax.random.key(3), (2, 2, 48, 8))
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    anchors, s0 = x[0][:, :6], eco.similarity_targets(x, 4)
    a0 = jax.random.normal(jax.random.key(4), (2, 8, 6))

    def residual(A, mvec):  # what the greedy bit-by-bit learning reduces: ||nbits S0 - Y Y^T||^2
        y = jnp.where(jnp.einsum("bhnm,hkm->bhnk", eco.kernel_features(x, anchors) - mvec[None, :, None], A) > 0, 1., -1.)
        return float(jnp.mean((8 * s0 - jnp.einsum("bhnk,bhmk->bhnm", y, y)) ** 2))

    A, mvec = fast_jit(partial(eco.learn_ksh, iterations=30, learning_rate=0.5))(x, anchors, a0, s0)
    assert residual(A, mvec) < 0.9 * residual(a0, mvec)
    y = jnp.array([-1.5, -0.5, 0.0, 0.5, 1.0, 2.0])
    np.testing.assert_array_equal(jax.grad(lambda y: eco.binary_quantizer(y).sum())(y), [0, 1, 1, 1, 0, 0])


def test_ecoformer_model_learns_hashing_trains_and_checks_inputs():
    cfg = {**ECO, "ecoformer_anchors": 3, "ecoformer_topk": 1}  # stage 3 sees 2x2 tokens at 32x32
    model = jf.create_model("pvt_v2_b0", **cfg)
    x, y = digits(16, 32)
    variables = numpy_variables(model, x[:1])
    assert set(variables) == {"params", "hashing"}
    learned = fast_jit(lambda v, x, r: eco.learn_hashing(model, v, x, rng=r))(variables, x, jax.random.key(0))
    a_old, a_new = (v["hashing"]["stages_0_blocks_0"]["attn"]["A"] for v in (variables, learned))
    assert not np.allclose(a_old, a_new)
    assert "stages_3_blocks_0" not in learned["hashing"]  # stage 4: full attention, no hash state
    tx = optax.adamw(3e-3)
    params, opt = learned["params"], tx.init(learned["params"])

    @fast_jit
    def step(params, opt):
        def loss_fn(p):
            logits = model.apply({"params": p, "hashing": learned["hashing"]}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss, g

    losses = []
    for i in range(5):
        params, opt, loss, g = step(params, opt)
        losses.append(float(loss))
        if i == 0:  # the sign's straight-through gradient reaches the shared q/k projection
            assert float(jnp.abs(g["stages_0_blocks_0"]["attn"]["to_qk"]["kernel"]).sum()) > 0
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    many = jf.create_model("pvt_v2_b0", **{**cfg, "ecoformer_anchors": 25})
    with pytest.raises(ValueError, match="at least num_anchors=25"):
        jax.eval_shape(lambda: eco.learn_hashing(many, many.init(jax.random.key(0), x[:1]), x[:1],
                                                 rng=jax.random.key(0)))
    with pytest.raises(ValueError, match="attn_type must be one of"):
        jax.eval_shape(lambda: jf.create_model("pvt_v2_b0", **{**TINY, "attn_type": "hash"}).init(
            jax.random.key(0), x[:1]))
    with pytest.raises(ValueError, match="at least 32x32"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))


def test_ecoformer_attention_cost_is_linear_in_tokens():
    """FLOPs (XLA cost analysis) of one EcoFormer attention at 4 token counts: a log-log slope ~1 (softmax: ~2)."""
    from jaxformers.layers import MultiHeadAttention

    def flops(module, n):
        x = jnp.zeros((1, n, 32))
        v = jax.eval_shape(module.init, jax.random.key(0), x)
        return jax.jit(module.apply).lower(v, x).cost_analysis()["flops"]  # the lowered program's count

    ns = np.array([256, 512, 1024, 2048])
    eco_f = [flops(eco.EcoFormerAttention(2), n) for n in ns]
    full_f = [flops(MultiHeadAttention(2), n) for n in ns]
    assert 0.9 < np.polyfit(np.log(ns), np.log(eco_f), 1)[0] < 1.1
    assert np.polyfit(np.log(ns), np.log(full_f), 1)[0] > 1.5


def test_sharded_equals_single_device(tiny):
    """The fixture's single-device logits against the same forward on a (data, fsdp, tensor) mesh."""
    model, variables, out = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = image(4, 32)
    sharded_vars = shard_like_init(model, variables, x, mesh)
    with activate(mesh):
        sharded = fast_jit(model.apply)(sharded_vars, shard_batch(x, mesh))
    assert float(jnp.std(out.logits)) > 1e-3
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(out.logits), rtol=1e-5, atol=1e-5)
