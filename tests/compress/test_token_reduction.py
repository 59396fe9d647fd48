"""Token reduction as X' = T X: pruning (one-hot T) and ToMe (many-to-one T) as exact special cases,
Token Transforming (many-to-many), live parity with the official ToMe patch of a timm ViT, and the
reduced ViT under jit, grad and a device mesh."""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.compress.token_reduction import apply_transform, parse_schedule, token_reduction
from jaxformers.sharding import make_mesh
from tests.helpers import (OFFICIAL_CODE, fast_jit, image, numpy_variables, perturbed_torch_model, shard_like_init,
                           single_and_sharded, torch_logits)

TOME_REPO = str(OFFICIAL_CODE / "facebookresearch+ToMe")
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def _tokens(seed=0, b=2, n=17, h=2, d=8, c=16):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (b, n, c))
    q, k = jax.random.normal(keys[1], (b, n, h, d)), jax.random.normal(keys[2], (b, n, h, d))
    size = jax.random.uniform(keys[3], (b, n), minval=1.0, maxval=3.0)
    return x, size, q, k


def _tome_reference(x, size, metric, r, distill):
    """ToMe's merge written directly (numpy): bipartite sets, best edges, weighted average into B."""
    x, size, metric = (np.asarray(t, np.float64) for t in (x, size, metric))
    out_x, out_s = [], []
    for xb, sb, mb in zip(x, size, metric):
        m = mb / np.linalg.norm(mb, axis=-1, keepdims=True)
        a, bb = m[::2], m[1::2]
        scores = a @ bb.T
        scores[0, :] = -np.inf
        if distill:
            scores[:, 0] = -np.inf
        best, partner = scores.max(-1), scores.argmax(-1)
        order = np.argsort(-best, kind="stable")
        src, unm = order[:r], np.sort(order[r:])
        xa, xb_, sa, sb_ = xb[::2] * sb[::2, None], xb[1::2] * sb[1::2, None], sb[::2], sb[1::2]
        dst_x, dst_s = xb_.copy(), sb_.copy()
        for i in src:
            dst_x[partner[i]] += xa[i]
            dst_s[partner[i]] += sa[i]
        ux, us = xa[unm], sa[unm]
        if distill:
            xs = np.concatenate([ux[:1], dst_x[:1], ux[1:], dst_x[1:]])
            ss = np.concatenate([us[:1], dst_s[:1], us[1:], dst_s[1:]])
        else:
            xs, ss = np.concatenate([ux, dst_x]), np.concatenate([us, dst_s])
        out_x.append(xs / ss[:, None])
        out_s.append(ss)
    return np.stack(out_x), np.stack(out_s)


@pytest.mark.parametrize("distill", [False, True], ids=["cls", "cls+dist"])
def test_special_cases_of_the_token_matrix(distill):
    x, size, q, k = _tokens()
    prefix, r = 1 + distill, 5

    @fast_jit
    def run(x, size, q, k):
        out = {}
        for method in ("prune", "tome", "transform"):
            tr = token_reduction(method, r, distill_token=distill)
            out[method] = (tr.transform_matrix(x, size, q, k, r, prefix), tr.reduce(x, size, q, k, r, prefix))
        return out

    out = run(x, size, q, k)
    # Pruning: T has one-hot rows (the prefix and the kept tokens); T X is exactly the kept tokens.
    T, (xp, sp) = out["prune"]
    assert np.array_equal(np.sort(np.asarray(T), -1)[..., :-1], np.zeros(T.shape[:-1] + (T.shape[-1] - 1,)))
    assert np.all(np.asarray(T).sum(-1) == 1)
    np.testing.assert_allclose(jnp.einsum("bkn,bnc->bkc", T, x), xp, atol=1e-6)
    np.testing.assert_allclose(apply_transform(x, size, T)[0], xp, atol=1e-5)
    # ToMe: every source token enters exactly one row (many-to-one); T X equals ToMe's merge.
    T, (xt, st) = out["tome"]
    np.testing.assert_array_equal(np.asarray(T).sum(1), 1.0)
    ref_x, ref_s = _tome_reference(x, size, k.mean(2), r, distill)
    np.testing.assert_allclose(xt, ref_x, atol=1e-5)
    np.testing.assert_allclose(st, ref_s, atol=1e-5)
    np.testing.assert_allclose(apply_transform(x, size, T)[0], ref_x, atol=1e-5)
    # Token Transforming: dropped tokens spread over several kept tokens (many-to-many), mass conserved.
    T, (xm, sm) = out["transform"]
    np.testing.assert_allclose(np.asarray(T).sum(1), 1.0, atol=1e-5)
    assert (np.asarray(T) > 1e-3).sum(1).max() > 1
    np.testing.assert_allclose(sm.sum(-1), size.sum(-1), rtol=1e-5)
    np.testing.assert_allclose(apply_transform(x, size, T)[0], xm, atol=1e-5)


@pytest.mark.parametrize("distilled", [False, True], ids=["deit", "deit-distilled"])
def test_tome_equals_the_official_tome_patch(tmp_path, distilled):
    """The official ToMe (facebookresearch/ToMe) patched into a timm ViT and our ``token_reduction("tome")``
    on the same converted weights give the same logits (proportional attention, r=7 per layer)."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    if not os.path.isdir(TOME_REPO):
        pytest.skip("the official ToMe code is not fetched (facebookresearch/ToMe in /work/ext)")
    sys.path.insert(0, TOME_REPO)
    import tome  # noqa: PLC0415

    cls = timm.models.deit.VisionTransformerDistilled if distilled else timm.models.vision_transformer.VisionTransformer
    tm = perturbed_torch_model(lambda: cls(**TINY))
    tome.patch.timm(tm)
    tm.r = 7
    torch.save(tm.state_dict(), tmp_path / "vit.pth")
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    variables = jf.load_pretrained(name, tmp_path / "vit.pth", **TINY)
    model = jf.create_model(name, **TINY, token_reduction=token_reduction("tome", 7, distill_token=distilled))
    x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    logits, state = fast_jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, x)
    assert state["intermediates"]["tokens"][0].shape[1] == 64 + 1 + distilled - 7 * 4
    np.testing.assert_allclose(logits, torch_logits(tm, x), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def reduced():
    model = jf.create_model("deit_tiny_patch16_224", **{**TINY, "depth": 2},
                            token_reduction=token_reduction("transform", 20))
    x = image(4, 32)
    return model, numpy_variables(model, x[:1]), x


def test_reduced_vit_jit_grad_flops_and_sharding(reduced):
    model, variables, x = reduced
    full = model.clone(token_reduction=None)

    def cost(m):
        return fast_jit(m.apply).lower(variables, x).cost_analysis()["flops"]  # lowered: no compile

    assert cost(model) < 0.7 * cost(full)
    grads = fast_jit(jax.grad(lambda p: model.apply({"params": p}, x).sum()))(variables["params"])
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["blocks_1"]["mlp"]["fc1"]["kernel"]).sum()) > 0
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded_vars = shard_like_init(model, variables, x, mesh)
    single, sharded = single_and_sharded(fast_jit(model.apply), variables, sharded_vars, x, mesh)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)


def test_schedules_and_bad_inputs(reduced):
    model, variables, x = reduced
    with pytest.raises(ValueError, match="reduced tokens form no feature map"):
        jax.eval_shape(lambda v, x: model.apply(v, x, method="forward_features"), variables, x)
    assert parse_schedule(4, 3) == [4, 4, 4]
    assert parse_schedule((8, -1.0), 5) == [16, 12, 8, 4, 0]  # ToMe's decreasing schedule (parse_r)
    with pytest.raises(ValueError, match="leaving fewer than one per image"):
        too_many = model.clone(token_reduction=token_reduction("prune", 40))  # 64 patches, 2 layers x 40
        jax.eval_shape(too_many.apply, variables, x)
    with pytest.raises(ValueError, match="unknown token reduction method 'tomee'; did you mean 'tome'"):
        token_reduction("tomee", 4)
    with pytest.raises(ValueError, match="schedule has 3 entries but the model has 2 blocks"):
        jax.eval_shape(model.clone(token_reduction=token_reduction("tome", [2, 2, 2])).apply, variables, x)
    with pytest.raises(ValueError, match="r .* must be >= 0"):
        token_reduction("prune", -1)
