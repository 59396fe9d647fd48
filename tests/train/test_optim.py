"""Optimizers, schedules, the weight-decay mask, and the model switches (bf16 compute, remat)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from train import config_lib, optim, trainer


def config(**optimizer):
    c = config_lib.base_config()
    c.optimizer.update(optimizer)
    return c


def test_decay_mask_skips_biases_norms_and_position_tables():
    params = {"patch_embed": {"proj": {"kernel": jnp.ones((4, 4, 3, 8)), "bias": jnp.ones(8)}},
              "pos_embed": jnp.ones((1, 5, 8)), "cls_token": jnp.ones((1, 1, 8)),
              "blocks_0": {"norm1": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
                           "attn": {"qkv": {"kernel": jnp.ones((8, 3, 2, 4))}}}}
    mask = optim.decay_mask(params, tuple(config_lib.base_config().optimizer.no_decay_names))
    assert mask["patch_embed"]["proj"] == {"kernel": True, "bias": False}
    assert mask["pos_embed"] is False and mask["cls_token"] is False
    assert mask["blocks_0"]["norm1"] == {"scale": False, "bias": False}
    assert mask["blocks_0"]["attn"]["qkv"]["kernel"] is True


def test_warmup_then_cosine_and_linear():
    c = config_lib.base_config()
    c.optimizer.learning_rate = 1.0
    c.schedule.update(name="cosine", warmup_steps=10, end_factor=0.1)
    s = optim.make_schedule(c, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-6) and float(s(110)) == pytest.approx(0.1)
    c.schedule.update(name="linear", warmup_steps=0, warmup_fraction=0.5)
    s = optim.make_schedule(c, 100)
    assert float(s(50)) == pytest.approx(1.0) and float(s(75)) == pytest.approx(0.55)
    c.schedule.name = "step"
    with pytest.raises(ValueError, match="schedule.name"):
        optim.make_schedule(c, 100)


def test_multistep_counts_milestones_from_the_first_step_warmup_included():
    """PyTorch's MultiStepLR at fractions of the run (DRCT: halved at 50/80/90/95 %), after a warmup."""
    torch = pytest.importorskip("torch")
    c = config_lib.base_config()
    c.optimizer.learning_rate = 2e-4
    c.schedule.update(name="multistep", milestones=(0.5, 0.8, 0.9, 0.95), gamma=0.5, warmup_steps=0)
    s = optim.make_schedule(c, 200)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=2e-4)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[100, 160, 180, 190], gamma=0.5)
    want = []
    for _ in range(200):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    np.testing.assert_allclose([float(s(i)) for i in range(200)], want, rtol=1e-6)
    c.schedule.update(warmup_steps=20, milestones=(0.5, 0.5), gamma=0.1)  # a repeated milestone compounds
    s = optim.make_schedule(c, 200)
    assert float(s(10)) == pytest.approx(1e-4) and float(s(99)) == pytest.approx(2e-4)
    assert float(s(100)) == pytest.approx(2e-6)
    for bad in [(), (0.5, 1.0)]:
        c.schedule.milestones = bad
        with pytest.raises(ValueError, match="schedule.milestones must be fractions"):
            optim.make_schedule(c, 200)


@pytest.mark.parametrize("name, lr", [("adamw", 0.1), ("lamb", 0.05), ("sgd", 0.1)])
def test_each_optimizer_minimises_a_quadratic(name, lr):
    c = config(name=name, learning_rate=lr, weight_decay=1e-4, grad_clip_norm=10.0)
    c.schedule.name = "constant"
    tx = optim.make_optimizer(c, optim.make_schedule(c, 100))
    target = jnp.arange(12.0).reshape(3, 4) / 10
    params = {"w": jnp.zeros((3, 4)), "b": jnp.ones(4)}
    loss = lambda p: jnp.sum((p["w"] - target) ** 2) + jnp.sum(p["b"] ** 2)  # noqa: E731
    state = tx.init(params)
    first = float(loss(params))
    for _ in range(100):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.05 * first


def test_clipping_bounds_the_update():
    c = config(name="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.0, grad_clip_norm=1.0)
    c.schedule.name = "constant"
    tx = optim.make_optimizer(c, optim.make_schedule(c, 10))
    updates, _ = tx.update({"w": jnp.full((4,), 100.0)}, tx.init({"w": jnp.zeros(4)}))
    assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer.name must be"):
        optim.make_optimizer(config(name="adagrad"), optax.constant_schedule(1.0))


def test_model_switches_bf16_remat_and_classes():
    c = config_lib.base_config()
    c.model.overrides = ml_collections.ConfigDict({"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48,
                                                   "num_heads": 4})
    c.compute_dtype, c.remat = "bfloat16", True
    model = trainer.build_model(c, num_classes=7)
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32 and model.remat and model.num_classes == 7
    c.model.overrides.num_classes = 3
    with pytest.raises(ValueError, match="num_classes=3 but the dataset has 7"):
        trainer.build_model(c, num_classes=7)
    c.compute_dtype = "float16"
    with pytest.raises(ValueError, match="compute_dtype"):
        trainer.build_model(c, num_classes=7)
    # bf16 compute, float32 master weights: a forward pass runs in bf16 and returns bf16 logits.
    c.compute_dtype, c.model.overrides.num_classes = "bfloat16", 7
    model = trainer.build_model(c)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    logits = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32))
    assert logits.shape == (2, 7) and logits.dtype == jnp.bfloat16
