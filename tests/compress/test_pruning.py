"""DSFormer (dense x N:M sparse factorization, STF), AxFormer (accuracy-driven pruning, top-k hard
attention), IA-RED^2 (interpreter policy, REINFORCE) and wide-attention configs, on tiny ViTs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.compress import axformer, dsformer, ia_red, wide
from jaxformers.sharding import make_mesh
from tests.helpers import digits, fast_jit, numpy_variables, single_and_sharded

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)


@pytest.fixture(scope="module")
def vit():
    model = jf.create_model("deit_tiny_patch16_224", **TINY)
    x, y = digits(64, 32)
    return model, numpy_variables(model, x[:1]), x, y


# ---------------------------------------------------------------------------------------------
# DSFormer


def test_stf_pattern_and_gradients():
    s = jax.random.normal(jax.random.key(0), (8, 6))
    d = jax.random.normal(jax.random.key(1), (5, 8))
    mask = np.asarray(dsformer.nm_mask(s, 2, 4))
    assert (mask.reshape(2, 4, 6).sum(1) == 2).all()  # exactly 2 of every 4 along the inner axis, per column
    kept = np.abs(np.asarray(s)).reshape(2, 4, 6)
    assert (np.sort(kept, 1)[:, 2:] == np.sort(np.where(mask.reshape(2, 4, 6), kept, -1), 1)[:, 2:]).all()
    w = dsformer.effective_kernel(d, s, 2, 4)
    np.testing.assert_allclose(w, d @ np.where(mask, s, 0.0), atol=1e-6)
    g = jax.random.normal(jax.random.key(2), w.shape)
    gd, gs = jax.grad(lambda d, s: jnp.sum(dsformer.effective_kernel(d, s, 2, 4) * g), argnums=(0, 1))(d, s)
    np.testing.assert_allclose(gd, g @ np.where(mask, s, 0.0).T, atol=1e-5)  # D: the masked product's gradient
    np.testing.assert_allclose(gs, d.T @ g, atol=1e-5)  # S: straight through (kept entries included)
    assert np.abs(np.asarray(gs)[mask]).min() > 0
    with pytest.raises(ValueError, match="M=4 needs a width divisible by 4"):
        dsformer.nm_mask(jnp.ones((6, 3)), 2, 4)
    with pytest.raises(ValueError, match="1 <= N <= M"):
        dsformer.nm_mask(jnp.ones((8, 3)), 3, 2)


def test_dsformer_transform_of_a_vit(vit):
    model, variables, x, y = vit
    plan = dsformer.discover(model, x[:1])
    assert "blocks_0/attn/qkv" in plan and plan["blocks_0/attn/proj"] == (2, (4, 8, 32)) and "head" in plan
    v = dsformer.factorize(variables, plan, ratio=0.5, n=2, m=4)
    assert "kernel" not in v["params"]["blocks_0"]["mlp"]["fc1"] and "kernel" in v["params"]["head"]
    D, S = v["dsformer"]["blocks_0"]["mlp"]["fc1"]["D"], v["dsformer"]["blocks_0"]["mlp"]["fc1"]["S"]
    k = dsformer.inner_width(32, 128, 0.5, 2, 4)
    assert D.shape == (32, k) and S.shape == (k, 128) and k % 4 == 0
    assert dsformer.count_params(32, 128, k, 2, 4) <= 0.5 * 32 * 128
    # n == m: the dense low-rank baseline; its SVD initialization is the best rank-k approximation.
    lowrank = dsformer.factorize(variables, plan, ratio=0.5, n=1, m=1)["dsformer"]["blocks_0"]["mlp"]["fc1"]
    w = np.asarray(variables["params"]["blocks_0"]["mlp"]["fc1"]["kernel"])
    sv = np.linalg.svd(w, compute_uv=False)
    rank = lowrank["D"].shape[1]
    assert rank == dsformer.inner_width(32, 128, 0.5, 1, 1) < k  # sparsity buys a wider inner dimension
    np.testing.assert_allclose(np.sum((w - lowrank["D"] @ lowrank["S"]) ** 2), np.sum(sv[rank:] ** 2), rtol=1e-4)

    def loss(fac, x, y):
        logits = dsformer.apply(model, {**v, "dsformer": fac}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.adam(3e-3)
    fac, opt = v["dsformer"], tx.init(v["dsformer"])

    @fast_jit
    def step(fac, opt):
        l, g = jax.value_and_grad(loss)(fac, x, y)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(fac, u), opt, l, g

    losses = []
    for i in range(6):
        fac, opt, l_, g = step(fac, opt)
        losses.append(float(l_))
    assert float(jnp.abs(g["blocks_1"]["attn"]["qkv"]["D"]).sum()) > 0
    assert losses[-1] < losses[0]
    exported = dsformer.export_sparse({**v, "dsformer": fac})
    s = np.asarray(exported["dsformer"]["blocks_1"]["mlp"]["fc2"]["S"])
    assert ((s.reshape(-1, 4, s.shape[-1]) != 0).sum(1) <= 2).all()
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single, sharded = single_and_sharded(fast_jit(lambda v, x: dsformer.apply(model, v, x)), exported, exported,
                                         x[:8], mesh)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# AxFormer


def test_axformer_zeroed_search_equals_physical_pruning(vit):
    model, variables, x, y = vit
    removed = axformer.search(model, variables, x, y, tolerance=0.05, max_removed=4)
    acc0, _ = axformer.evaluate(model, variables, x, y)
    elems = removed + [axformer.Element(1, "mlp")] if not any(e.kind == "mlp" for e in removed) else removed
    elems = [e for e in elems if not (e.kind == "head" and any(r.kind == "attn" and r.block == e.block
                                                                for r in elems))]
    zeroed = fast_jit(model.apply)({"params": axformer.zero_elements(model, variables["params"], elems)}, x[:8])
    small, params = axformer.prune(model, variables["params"], elems)
    pruned = fast_jit(small.apply)({"params": params}, x[:8])
    np.testing.assert_allclose(pruned, zeroed, atol=1e-5)
    assert jf.count_params(small) < jf.count_params(model)
    acc, _ = axformer.evaluate(model, {"params": axformer.zero_elements(model, variables["params"], removed)}, x, y)
    assert acc >= acc0 - 0.05
    sparse, layers = axformer.selective_topk(model, variables, x, y, topk=4, tolerance=1.0)
    assert layers == [1, 0]
    out = fast_jit(sparse.apply)(variables, x[:8])
    assert out.shape == (8, 10) and not np.allclose(out, fast_jit(model.apply)(variables, x[:8]))
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 6, 2, 4)) for i in range(3))
    top1 = axformer.topk_attention(q, k, v, topk=1)
    best = jnp.argmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1)  # hard attention: the single best key's value
    np.testing.assert_allclose(top1, jnp.take_along_axis(v.transpose(0, 2, 1, 3), best[..., None], 2)
                               .transpose(0, 2, 1, 3), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# IA-RED^2


def test_ia_red_policy_budget_determinism_and_reinforce(vit):
    base, _, x, y = vit
    model = base.clone(token_reduction=ia_red.IARed2(group_starts=(0, 1), budgets=(12, 6), heads=2))
    variables = numpy_variables(model, x[:1])
    assert {"interpreter_0", "interpreter_1"} <= set(variables["params"])
    run = fast_jit(lambda v, x, r, train: model.apply(v, x, train=train, mutable=["ia_red", "intermediates"],
                                                      rngs={"policy": r}), static_argnums=3)
    (l1, s1), (l2, _) = run(variables, x[:8], jax.random.key(0), False), run(variables, x[:8], jax.random.key(1), False)
    np.testing.assert_array_equal(l1, l2)  # deterministic thresholds at evaluation
    assert s1["intermediates"]["tokens"][0].shape == (8, 1 + 6, 32)  # the last group's budget (static shapes)
    (t1, st), (t2, _) = run(variables, x[:8], jax.random.key(0), True), run(variables, x[:8], jax.random.key(1), True)
    assert not np.allclose(t1, t2)  # Bernoulli actions while training
    assert len(st["ia_red"]["log_prob"]) == 2 and st["ia_red"]["log_prob"][0].shape == (8,)
    # A token the policy dropped inside the budget has size 0: invisible to attention and pooling.
    sizes = np.asarray(s1["intermediates"]["token_sizes"][0][:, 1:])
    assert sizes.min() >= 0.0 and set(np.unique(sizes)) <= {0.0, 1.0}

    labels = ia_red.interpreter_labels(variables["params"])
    tx = optax.multi_transform({"policy": optax.adam(1e-2), "backbone": optax.set_to_zero()}, labels)
    opt = tx.init(variables["params"])

    @fast_jit
    def step(params, opt, rng):
        (loss, metrics), g = jax.value_and_grad(ia_red.reinforce_loss, argnums=1, has_aux=True)(model, params, x, y,
                                                                                                rng)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, metrics, g

    params, opt, metrics, g = step(variables["params"], opt, jax.random.key(3))
    assert float(jnp.abs(g["interpreter_0"]["key"]["kernel"]).sum()) > 0
    assert float(jnp.abs(g["blocks_0"]["mlp"]["fc1"]["kernel"]).sum()) == 0  # the policy loss trains the policy
    np.testing.assert_array_equal(params["blocks_0"]["mlp"]["fc1"]["kernel"],
                                  variables["params"]["blocks_0"]["mlp"]["fc1"]["kernel"])  # backbone frozen
    assert 0.0 <= float(metrics["kept_fraction"]) <= 1.0
    np.testing.assert_allclose(ia_red.reward(jnp.eye(3), jnp.array([0, 1, 0]), jnp.array([0.5, 1.0, 0.2]), 0.5),
                               [0.75, 0.0, -0.5])
    with pytest.raises(ValueError, match="one budget per group"):
        jax.eval_shape(base.clone(token_reduction=ia_red.IARed2(group_starts=(0, 1), budgets=(8,))).init,
                       jax.random.key(0), x[:1])
    with pytest.raises(ValueError, match="keeps 80 patch tokens but only 16 reach it"):
        jax.eval_shape(base.clone(token_reduction=ia_red.IARed2(group_starts=(0,), budgets=(80,))).init,
                       jax.random.key(0), x[:1])


# ---------------------------------------------------------------------------------------------
# Wide attention


def test_wide_attention_configs_hold_the_heads_and_shrink_the_model():
    assert wide.aspect_ratio_configs(16) == [(16, 1), (8, 2), (4, 4), (2, 8), (1, 16)]
    deep = jf.create_model("wide_attention_lra_text_deep", max_len=64)
    counts = []
    for depth, heads in wide.aspect_ratio_configs(16)[2:]:
        m = wide.widen(deep, depth)
        assert (m.depth, m.num_heads, m.head_dim) == (depth, heads, 64)
        counts.append(jf.count_params(m))
    assert counts == sorted(counts, reverse=True)  # FFN and norms count once per layer
    assert jf.count_params("wide_attention_lra_text_wide") < jf.count_params("wide_attention_lra_text_deep")
    for name in ("wide_attention_lra_text_deep", "wide_attention_lra_text_wide"):
        assert abs(jf.count_params(name) / 1e6 - jf.model_info(name).params_m) < 0.005
    with pytest.raises(ValueError, match="depth=3 does not divide the total of 16 heads"):
        wide.widen(deep, 3)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 257, (2, 64)), jnp.int32).at[1, 40:].set(0)
    small = jf.create_model("wide_attention_lra_text_wide", max_len=64, embed_dim=32, head_dim=8, mlp_dim=64)
    v = numpy_variables(small, ids)
    out = small.apply(v, jnp.concatenate([ids, ids.at[1, 40:].set(0)[1:]]))
    assert out.shape == (3, 2) and np.isfinite(out).all()
    np.testing.assert_allclose(out[1], out[2], atol=1e-6)
