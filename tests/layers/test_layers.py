import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers import layers as L
from tests.helpers import fast_jit


def test_mlp_shapes_and_axes():
    x = jnp.ones((2, 5, 8))
    m = L.Mlp(hidden_features=32, out_features=4)
    v = m.init(jax.random.key(0), x)
    assert m.apply(v, x).shape == (2, 5, 4)
    assert v["params"]["fc1"]["kernel"].names == ("embed", "mlp")
    assert v["params"]["fc2"]["kernel"].names == ("mlp", "embed")


def test_gelu_is_exact_erf():
    x = jnp.linspace(-3, 3, 11)
    from scipy.special import erf  # noqa: PLC0415 (scipy ships with jax)

    np.testing.assert_allclose(L.gelu(x), 0.5 * x * (1 + erf(np.asarray(x) / np.sqrt(2))), rtol=1e-6, atol=1e-7)


def test_drop_path_drops_whole_examples_and_rescales():
    x = jnp.ones((1000, 3, 4))
    y = L.DropPath(0.25).apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    per_example = np.asarray(y).reshape(1000, -1)
    assert set(np.unique(per_example).tolist()) <= {0.0, float(np.float32(1 / 0.75))}
    assert np.all(per_example.min(1) == per_example.max(1))  # all-or-nothing per example
    assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.05
    np.testing.assert_array_equal(L.DropPath(0.25).apply({}, x, train=False), x)


def test_layer_scale():
    x = jnp.ones((2, 3, 4))
    v = L.LayerScale(0.1).init(jax.random.key(0), x)
    np.testing.assert_allclose(L.LayerScale(0.1).apply(v, x), 0.1 * x, rtol=1e-6)


def test_patch_embed_equals_linear_projection_of_patches():
    x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
    pe = L.PatchEmbed(embed_dim=5, patch_size=4, in_chans=3)
    v = pe.init(jax.random.key(1), x)
    out = pe.apply(v, x)
    assert out.shape == (2, 6, 5)
    w = v["params"]["proj"]["kernel"].value.reshape(48, 5)
    patches = x.reshape(2, 2, 4, 3, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 6, 48)
    np.testing.assert_allclose(out, patches @ w + v["params"]["proj"]["bias"].value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x,kw,err,match", [
    (jnp.ones((8, 8, 3)), {}, ValueError, "rank 4"),
    (jnp.ones((1, 8, 8, 1)), {}, ValueError, "1 channels .* in_chans=3"),
    (jnp.ones((1, 10, 8, 3)), {}, ValueError, "divisible by 4x4"),
    (jnp.ones((1, 8, 8, 3), jnp.int32), {}, TypeError, "floating-point"),
    (jnp.ones((1, 8, 8, 3)), dict(img_size=16), ValueError, "built for img_size=16x16"),
])
def test_patch_embed_bad_input(x, kw, err, match):
    with pytest.raises(err, match=match):
        L.PatchEmbed(embed_dim=5, patch_size=4, **kw).init(jax.random.key(0), x)


def test_conv_stem():
    stem = L.ConvStem(channels=(4, 8), kernel_sizes=(3, 3), strides=(2, 2), paddings=(1, 1), batch_norm=True)
    x = jnp.ones((2, 16, 16, 3))
    v = stem.init(jax.random.key(0), x)
    y, upd = stem.apply(v, x, train=True, mutable=["batch_stats"])
    assert y.shape == (2, 4, 4, 8) and "bn0" in upd["batch_stats"]


def test_sincos_tables():
    t = L.sincos_1d(10, 8)
    assert t.shape == (10, 8)
    np.testing.assert_allclose(t[:, 0], np.sin(np.arange(10)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t[:, 4], np.cos(np.arange(10)), rtol=1e-6, atol=1e-6)
    t2 = L.sincos_2d(3, 4, 16)
    assert t2.shape == (12, 16)
    np.testing.assert_allclose(t2[5, :8], L.sincos_1d(3, 8)[1], rtol=1e-6)  # row 1
    np.testing.assert_allclose(t2[5, 8:], L.sincos_1d(4, 8)[1], rtol=1e-6)  # col 1
    with pytest.raises(ValueError, match="divisible by 4"):
        L.sincos_2d(2, 2, 6)


def test_resample_pos_embed_keeps_prefix_and_identity():
    pe = jax.random.normal(jax.random.key(0), (1, 1 + 16, 6))
    same = L.resample_abs_pos_embed(pe, (4, 4))
    np.testing.assert_array_equal(same, pe)
    big = L.resample_abs_pos_embed(pe, (8, 6))
    assert big.shape == (1, 1 + 48, 6)
    np.testing.assert_array_equal(big[:, 0], pe[:, 0])
    const = jnp.ones((1, 17, 6))
    np.testing.assert_allclose(L.resample_abs_pos_embed(const, (5, 5)), jnp.ones((1, 26, 6)), rtol=1e-5)
    with pytest.raises(ValueError, match="cannot infer the grid"):
        L.resample_abs_pos_embed(jnp.ones((1, 1 + 15, 6)), (4, 4))


def test_rope_is_relative():
    x = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
    y = jax.random.normal(jax.random.key(1), (1, 6, 2, 8))
    rx, ry = L.apply_rope(x), L.apply_rope(y)
    # <R_m x_i, R_n y_j> depends on n - m only: shifting both positions leaves scores unchanged
    sx = L.apply_rope(x, positions=jnp.arange(6) + 3)
    sy = L.apply_rope(y, positions=jnp.arange(6) + 3)
    np.testing.assert_allclose(jnp.einsum("blhd,bmhd->bhlm", rx, ry), jnp.einsum("blhd,bmhd->bhlm", sx, sy),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jnp.linalg.norm(rx, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_lepe_is_depthwise():
    v = jax.random.normal(jax.random.key(0), (1, 5, 5, 4))
    lepe = L.LePE(kernel_size=3)
    params = lepe.init(jax.random.key(1), v)
    assert params["params"]["conv"]["kernel"].value.shape == (3, 3, 1, 4)
    out = lepe.apply(params, v)
    # channel 0 of the output depends only on channel 0 of the input
    v2 = v.at[..., 1:].set(0.0)
    np.testing.assert_allclose(lepe.apply(params, v2)[..., 0], out[..., 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_axes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "tensor": 4}])
def test_grouped_conv_gradients_under_a_mesh_equal_one_device(mesh_axes):
    """XLA's partitioner sums a grouped convolution's kernel gradient over the mesh axes its input is
    replicated on (2x / 4x here without the shard_map in ``grouped_conv_general_dilated``)."""
    from jaxformers import sharding

    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 8))
    target = jax.random.normal(jax.random.key(1), (8, 6, 6, 16))
    for groups, features in [(8, 8), (4, 16)]:  # depthwise, grouped
        conv = L.Conv(features, (3, 3), padding=1, feature_group_count=groups, axes=(None, "embed"))
        variables = conv.init(jax.random.key(2), x)
        loss = lambda v, x: jnp.sum(conv.apply(v, x) * target[..., :features])  # noqa: E731
        want = jax.grad(loss, argnums=(0, 1))(variables, x)
        mesh = sharding.make_mesh(mesh_axes)
        with sharding.activate(mesh):
            got = fast_jit(jax.grad(loss, argnums=(0, 1)))(variables, sharding.shard_batch(x, mesh))
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_norms_have_axis_names():
    x = jnp.ones((2, 4))
    assert L.LayerNorm().init(jax.random.key(0), x)["params"]["scale"].names == ("embed",)
    assert L.RMSNorm().init(jax.random.key(0), x)["params"]["scale"].names == ("embed",)
    bn = L.BatchNorm(train=True)
    v = bn.init(jax.random.key(0), jnp.ones((2, 3, 3, 4)))
    assert set(v) == {"params", "batch_stats"}


def test_transformer_block_remat_matches_plain():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    plain = L.TransformerBlock(num_heads=2)
    remat = L.maybe_remat(L.TransformerBlock, True)(num_heads=2)
    v = plain.init(jax.random.key(1), x)
    f = lambda m: jax.grad(lambda p: m.apply(p, x, False).sum())(v)  # noqa: E731
    np.testing.assert_allclose(plain.apply(v, x), remat.apply(v, x, False), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(nn.unbox(f(plain))), jax.tree_util.tree_leaves(nn.unbox(f(remat)))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_check_token_ids():
    L.check_token_ids(jnp.array([[1, 2]]), vocab_size=3, max_len=4)
    with pytest.raises(ValueError, match=r"ids in \[1, 5\] but the vocabulary has 3"):
        L.check_token_ids(jnp.array([[1, 5]]), vocab_size=3)
    with pytest.raises(ValueError, match="length 5 but the position table holds 4"):
        L.check_token_ids(jnp.zeros((1, 5), jnp.int32), max_len=4)
    with pytest.raises(TypeError, match="integer"):
        L.check_token_ids(jnp.zeros((1, 5)))
