"""One-layer universal approximation: the closed-form pieces (Boltzmann operator, rank-1 attention as a
Boltzmann operator, contextual separation), permutation equivariance, memorisation, sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxformers as jf
from jaxformers.layers import MultiHeadAttention
from jaxformers.models.one_layer_transformer import boltzmann, min_separation, rank_one_attention
from jaxformers.sharding import make_mesh
from tests.helpers import fast_jit, numpy_variables, shard_like_init, single_and_sharded


def test_boltzmann_operator_closed_form():
    a = jnp.asarray([1.0, 2.0, 4.0])
    e = np.exp([1.0, 2.0, 4.0])
    np.testing.assert_allclose(boltzmann(a), np.sum(np.asarray(a) * e) / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(boltzmann(a, 0.0), 7 / 3, rtol=1e-6)  # β = 0: the mean
    np.testing.assert_allclose(boltzmann(a, 50.0), 4.0, rtol=1e-6)  # β → ∞: the max


def test_rank_one_single_head_attention_is_a_boltzmann_operator():
    d, delta = 4, 0.7
    v = jnp.asarray([0.5, -1.0, 0.25, 2.0])
    x = jax.random.normal(jax.random.key(0), (2, 5, d))
    mha = MultiHeadAttention(1, head_dim=1, qkv_bias=False, out_bias=False, scale=1.0)
    qkv = jnp.stack([delta * v, v, v], axis=1)[:, :, None, None]  # (d, 3, heads=1, head_dim=1)
    proj = jnp.zeros((1, 1, d)).at[0, 0, 0].set(1.0)  # write the scalar output to channel 0
    out = mha.apply({"params": {"qkv": {"kernel": qkv}, "proj": {"kernel": proj}}}, x)
    a = x @ v
    np.testing.assert_allclose(out[..., 0], rank_one_attention(a, delta), atol=1e-5)
    np.testing.assert_allclose(out[..., 1:], 0.0)
    i = 2  # token i's output is boltz_{δ a_i}(a)
    np.testing.assert_allclose(out[0, i, 0], boltzmann(a[0], delta * a[0, i]), atol=1e-5)


def test_attention_separates_contexts_that_averaging_confuses():
    values = np.asarray([1.0, 2.0, 3.0])
    assert min_separation(values, 3, delta=0.0) == 0.0  # {2, 1, 3} and {2, 2, 2} have the same mean
    gap = min_separation(values, 3, delta=1.0)
    assert gap > 1e-3, gap
    assert min_separation(values, 4, delta=1.0) > 0.0


def test_permutation_equivariant_and_memorises_random_labels():
    model = jf.create_model("one_layer_transformer", d_model=4, hidden=64, out_features=3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 4, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, (8, 4)))
    params = numpy_variables(model, x)["params"]
    perm = np.asarray([2, 0, 3, 1])
    out = model.apply({"params": params}, x)
    np.testing.assert_allclose(model.apply({"params": params}, x[:, perm]), out[:, perm], atol=1e-5)
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @fast_jit
    def steps(params, opt):
        def one(carry, _):
            params, opt = carry
            loss, grads = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, x), y).mean())(params)
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), loss

        (params, opt), losses = jax.lax.scan(one, (params, opt), None, length=300)
        return params, losses

    params, losses = steps(params, opt)
    accuracy = float(jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y))
    assert accuracy == 1.0 and float(losses[-1]) < 0.1 * float(losses[0]), (accuracy, losses[::50])
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    variables = {"params": params}
    single, sharded = single_and_sharded(fast_jit(model.apply), variables, shard_like_init(model, variables, x, mesh),
                                         x, mesh)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)
    assert nn.unbox(params)["attn"]["qkv"]["kernel"].shape == (4, 3, 1, 1)  # rank-1 query, key and value
