"""LMUFormer: LMU matrices against scipy, FFT memory == recurrent memory, the LIF neuron, both model
variants (FFT == recurrent, streaming head), the psMNIST-style config training through train/,
sharding, parameter counts, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.layers.lmu import (lif, lmu_discretize, lmu_impulse, lmu_memory_fft, lmu_memory_recurrent,
                                   lmu_state_space, spike)
from jaxformers.sharding import make_mesh
from tests.helpers import digits, fast_jit, numpy_variables, shard_like_init, single_and_sharded

TINY = dict(num_classes=5, in_chans=3, embed_dim=16, mlp_ratio=2.0, theta=24.0, seq_len=24)


@pytest.mark.parametrize("d, theta", [(6, 10.0), (32, 128.0)])
def test_lmu_matrices_equal_scipy_cont2discrete(d, theta):
    from scipy.signal import cont2discrete

    a, b = lmu_state_space(d, theta)
    # the Legendre recurrence written out for the first rows: A_ij = R_i (-1 if i < j else (-1)^(i-j+1))
    assert a[0, 0] == -1 / theta and a[0, 1] == -1 / theta and a[1, 0] == 3 / theta and a[1, 1] == -3 / theta
    np.testing.assert_array_equal(b[:3, 0], [1 / theta, -3 / theta, 5 / theta])
    ad, bd = lmu_discretize(a, b)
    ref_a, ref_b, *_ = cont2discrete((a, b, np.ones((1, d)), np.zeros((1,))), dt=1.0, method="zoh")
    np.testing.assert_allclose(ad, ref_a, atol=1e-12)
    np.testing.assert_allclose(bd, ref_b, atol=1e-12)


def test_fft_memory_equals_recurrent_memory():
    ad, bd = lmu_discretize(*lmu_state_space(64, 128.0))
    u = jax.random.normal(jax.random.key(0), (3, 128))
    fft = lmu_memory_fft(u, jnp.asarray(lmu_impulse(ad, bd, 128), jnp.float32))
    rec, last = lmu_memory_recurrent(u, ad, bd)
    assert np.abs(rec).max() > 0.1
    np.testing.assert_allclose(fft, rec, atol=1e-4)
    np.testing.assert_allclose(last, rec[:, -1])


def test_lif_neuron_and_its_surrogate_gradient():
    # constant input 1.5, τ = 2, threshold 1: H = 0.75 (silent), then 0.75 + 0.375 = 1.125 (spike, reset)...
    spikes = lif(jnp.full((1, 6, 1), 1.5))
    np.testing.assert_array_equal(spikes[0, :, 0], [0, 1, 0, 1, 0, 1])
    x = jnp.asarray([-0.5, 0.0, 0.3])
    s = jax.nn.sigmoid(4 * x)
    np.testing.assert_allclose(jax.grad(lambda x: spike(x, 4.0).sum())(x), 4 * s * (1 - s), rtol=1e-6)
    g = jax.grad(lambda x: lif(x).sum())(jnp.full((1, 6, 1), 1.5))
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


@pytest.mark.parametrize("spiking", [False, True])
def test_fft_equals_recurrent_and_streaming_head(spiking):
    model = jf.create_model("lmuformer_gsc", **TINY, spiking=spiking)
    x = jax.random.normal(jax.random.key(1), (2, 24, 3))
    variables = numpy_variables(model, x)
    logits, recurrent, steps = fast_jit(lambda v, x: (
        model.apply(v, x), model.apply(v, x, memory="recurrent"), model.apply(v, x, output="all_seq")))(variables, x)
    assert logits.shape == (2, 5) and steps.shape == (2, 24, 5)
    assert float(jnp.std(logits)) > 1e-3
    np.testing.assert_allclose(recurrent, logits, atol=1e-4)
    np.testing.assert_allclose(steps[:, -1], logits, atol=1e-4)  # the streaming head at the last step


def test_psdigits_config_model_learns_permuted_digits():
    """The model of train/configs/lmuformer_psdigits.py (smoke size) on real digits read pixel by pixel in
    a fixed random order: the loss falls (the config's full run is measured in its docstring)."""
    from train import config_lib

    config = config_lib.resolve_config(str(config_lib.pathlib.Path(__file__).resolve().parents[2] / "train" /
                                           "configs" / "lmuformer_psdigits.py"), ["smoke=True"])
    overrides = config.model.overrides.to_dict()
    assert overrides["pixel_permutation_seed"] == 0 and overrides["seq_len"] == 64
    model = jf.create_model(config.model.name, **overrides)
    x, y = digits(64, size=8)
    x = x[..., :1] + 0.5  # (64, 8, 8, 1) in [0, 1], as the config's value_range(0, 1)
    variables = numpy_variables(model, x[:2])
    tx = optax.adam(1e-2)
    opt = tx.init(variables["params"])

    @fast_jit
    def step(params, stats, opt):
        def loss_fn(p):
            logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, loss

    params, stats, losses = variables["params"], variables["batch_stats"], []
    for _ in range(12):
        params, stats, opt, loss = step(params, stats, opt)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses


def test_sharded_equals_single_device():
    model = jf.create_model("lmuformer_gsc", **TINY)
    x = jax.random.normal(jax.random.key(2), (4, 24, 3))
    variables = numpy_variables(model, x)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single, sharded = single_and_sharded(fast_jit(model.apply), variables, shard_like_init(model, variables, x, mesh),
                                         x, mesh)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


def test_param_counts_and_bad_input():
    """The official lmu_rnn_conv1d / slmu_rnn_ms_conv1d at the Speech Commands config (sums of their
    module shapes: 1,621,796 and 1,689,894)."""
    assert jf.count_params("lmuformer_gsc") == 1_621_796
    assert jf.count_params("spiking_lmuformer_gsc") == 1_689_894
    model = jf.create_model("lmuformer_gsc", **TINY)
    x = jnp.zeros((1, 24, 3))
    variables = numpy_variables(model, x)
    with pytest.raises(ValueError, match="30 steps but this LMU's FFT memory covers seq_len=24"):
        model.apply(variables, jnp.zeros((1, 30, 3)))
    assert model.apply(variables, jnp.zeros((1, 30, 3)), memory="recurrent").shape == (1, 5)
    with pytest.raises(ValueError, match=r"takes \(batch, length, 3\) sequences"):
        model.apply(variables, jnp.zeros((1, 24, 4)))
