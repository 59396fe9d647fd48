"""MP3: permutation equivariance, the key/value restriction, the exact transfer to a ViT for fine-tuning,
pretraining on digits (loss falls), sharding, the task and config."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.models.mp3 import position_loss, random_keep_mask, to_vit
from jaxformers.sharding import make_mesh
from tests.helpers import digits, fast_jit, numpy_variables, shard_like_init, single_and_sharded

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, masking_ratio=0.5)


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model("mp3_vit_small_patch16_224", **TINY)
    x = digits(4, size=16)[0]
    return model, numpy_variables(model, x), x


def _patches(x, p=4):
    b, h, w, c = x.shape
    return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p, p, c)


def _image(patches, h=16, p=4):
    b, n, _, _, c = patches.shape
    g = h // p
    return patches.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, h, c)


def test_permutation_equivariance_and_the_key_value_restriction(tiny):
    model, variables, x = tiny
    keep = random_keep_mask(jax.random.key(0), 4, 16, 0.5)
    assert np.all(np.asarray(keep.sum(-1)) == 8)
    perm = np.random.default_rng(0).permutation(16)
    shuffled = _image(_patches(x)[:, perm])
    run = fast_jit(lambda v, x, k: model.apply(v, x, keep=k))
    out, out_perm = run(variables, x, keep), run(variables, shuffled, keep[:, perm])
    assert out.shape == (4, 16, 16)
    np.testing.assert_allclose(out_perm, out[:, perm], atol=1e-5)  # no positions: rows follow their patches
    # a hidden patch is never a key or value: changing it changes only its own prediction
    hidden = int(np.flatnonzero(~np.asarray(keep[0]))[0])
    changed = _patches(x).at[0, hidden].add(1.0)
    out2 = run(variables, _image(changed), keep)
    others = np.arange(16) != hidden
    np.testing.assert_allclose(out2[0, others], out[0, others], atol=1e-5)
    assert np.abs(out2[0, hidden] - out[0, hidden]).max() > 1e-3


def test_to_vit_transfers_the_encoder_exactly(tiny):
    model, variables, x = tiny
    vit, vit_vars = to_vit(model, variables, num_classes=10)
    feats = vit.apply(vit_vars, x, method="forward_features")
    patches = feats["feature_map"].reshape(4, 16, -1) if isinstance(feats, dict) and "feature_map" in feats else \
        next(iter(feats.values())).reshape(4, 16, -1)
    # the ViT's final patch features through MP3's position head give MP3's logits (no patch hidden)
    head = variables["params"]["position_head"]
    norm = variables["params"]["position_norm"]
    mu, var = patches.mean(-1, keepdims=True), patches.var(-1, keepdims=True)
    ours = ((patches - mu) / jnp.sqrt(var + 1e-6) * norm["scale"] + norm["bias"]) @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(ours, model.apply(variables, x), atol=1e-4)
    assert vit.apply(vit_vars, x).shape == (4, 10)


def test_pretraining_on_digits_reduces_the_position_loss():
    model = jf.create_model("mp3_vit_small_patch16_224", **{**TINY, "depth": 1})
    x = digits(32, size=16)[0]
    params = numpy_variables(model, x[:1])["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @fast_jit
    def step(params, opt, rng):
        def loss_fn(p):
            return position_loss(model.apply({"params": p}, x, train=True, rngs={"dropout": rng}))[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for i in range(15):
        params, opt, loss = step(params, opt, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5, losses  # starts near log(16) = 2.77


def test_sharded_task_and_config(tiny, tmp_path):
    model, variables, x = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single, sharded = single_and_sharded(fast_jit(model.apply), variables, shard_like_init(model, variables, x, mesh),
                                         x, mesh)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)
    pytest.importorskip("grain")
    from train import config_lib, tasks_positions

    task = tasks_positions.PositionPredictionTask()
    logits = jnp.where(jnp.eye(4, dtype=bool)[None].repeat(2, 0).at[1, 0].set(False).at[1, 0, 1].set(True), 9.0, 0.0)
    sums = task.eval_sums(logits, {"mask": jnp.asarray([1, 1])})
    assert float(sums["position_accuracy"]) == pytest.approx(1.75) and float(sums["count"]) == 2
    root = config_lib.pathlib.Path(__file__).resolve().parents[2]
    config = config_lib.resolve_config(str(root / "train" / "configs" / "mp3_digits.py"), ["smoke=True"])
    assert config.task == "position_prediction" and config.model.overrides.masking_ratio == 0.75
    assert config.model.overrides.num_classes == 0  # the trainer would otherwise add a 10-class head
