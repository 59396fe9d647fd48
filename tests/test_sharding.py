import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers
from jaxformers import sharding as S
from tests.helpers import fast_jit, perturb, shard_map_specs


def test_mesh_config_resolves_minus_one():
    assert S.MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == (2, 2, 2)
    assert S.MeshConfig().resolve(8) == (8, 1, 1)
    mesh = S.make_mesh({"fsdp": 4, "data": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="3 does not divide"):
        S.MeshConfig(fsdp=3).resolve(8)
    with pytest.raises(ValueError, match="needs 4 devices, but 8"):
        S.MeshConfig(data=2, fsdp=2).resolve(8)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        S.MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        S.make_mesh({"model": 2})


def test_rules_skip_axes_that_do_not_divide():
    mesh = S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 3, 4), jnp.float32), ("embed", "heads", "kv"))
    assert S.logical_shardings(box, mesh).spec == jax.sharding.PartitionSpec("fsdp", None, None)
    box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 4), jnp.float32), ("embed", "mlp"))
    assert S.logical_shardings(box, mesh).spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    plain = S.logical_shardings(jax.ShapeDtypeStruct((8,), jnp.float32), mesh)
    assert plain.is_fully_replicated


def _tiny_vit(**kw):
    return jaxformers.create_model("vit_tiny_patch16_224", depth=2, embed_dim=64, num_heads=4, img_size=32,
                                   patch_size=8, num_classes=10, **kw)


@pytest.mark.parametrize("rules", [S.DEFAULT_RULES, S.FSDP_RULES], ids=["default", "fsdp_only"])
def test_sharded_forward_and_grad_equal_single_device(rules):
    model = _tiny_vit()
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10
    mesh = S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = S.init_sharded(model, jax.random.key(1), x, mesh=mesh, rules=rules)
    single = nn.unbox(model.init({"params": jax.random.key(1), "dropout": jax.random.fold_in(jax.random.key(1), 1)}, x))
    for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)  # same init, born sharded
    assert S.unsharded_params(sharded, mesh, min_size=4096) == []
    params = perturb(single["params"], seed=2)  # the head starts at zero: make logits informative
    sparams = jax.device_put(params, jax.tree_util.tree_map(lambda a: a.sharding, sharded["params"]))

    def loss(p, x):
        logits = model.apply({"params": p}, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), logits

    (l1, y1), g1 = fast_jit(jax.value_and_grad(loss, has_aux=True))(params, x)
    with S.activate(mesh, rules):
        (l2, y2), g2 = fast_jit(jax.value_and_grad(loss, has_aux=True))(sparams, S.shard_batch(x, mesh))
    assert y2.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_check_sharded_flags_replicated_large_params():
    mesh = S.make_mesh({"fsdp": 8})
    model = _tiny_vit()
    x = jnp.zeros((8, 32, 32, 3))
    good = S.init_sharded(model, jax.random.key(0), x, mesh=mesh)
    S.check_sharded(good, mesh, min_size=4096)
    replicated = jax.device_put(good, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with pytest.raises(ValueError, match="replicated on an fsdp mesh"):
        S.check_sharded(replicated, mesh, min_size=4096)
    assert S.unsharded_params(good, S.make_mesh({"data": 8})) == []


def test_shard_batch_checks_divisibility():
    mesh = S.make_mesh({"data": 4, "fsdp": 2})
    out = S.shard_batch({"x": np.zeros((16, 3)), "y": np.zeros((16,))}, mesh)
    assert out["x"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="not divisible by data\\*fsdp = 8"):
        S.shard_batch(np.zeros((12, 3)), mesh)


def test_constrain_is_noop_outside_activate_and_checks_rank():
    x = jnp.ones((4, 3))
    assert S.constrain(x, ("act_batch", None)) is x
    mesh = S.make_mesh({"data": 8})
    with S.activate(mesh), pytest.raises(ValueError, match="2 axis names"):
        jax.jit(lambda x: S.constrain(x, ("act_batch", None)))(jnp.ones((8, 3, 2)))



def _shard_map_specs(fn, *args):
    """(in_specs, out_spec) of the one shard_map in ``fn``'s jaxpr, or None without one."""
    specs = shard_map_specs(fn, *args)
    assert len(specs) <= 1
    return specs[0] if specs else None


def test_shard_kernel_splits_named_axes_that_divide_and_keeps_the_rest_whole():
    P = jax.sharding.PartitionSpec
    seen = []

    def kernel(q, kv, seg):  # stands in for a Pallas call: records the per-device shapes it runs on
        seen.append((q.shape, kv.shape, seg.shape))
        return q * 2 + kv.repeat(q.shape[2] // kv.shape[2], axis=2) + seg[:, :, None, None]

    seq = ("batch", None, "heads", None)
    fn = S.shard_kernel(kernel, (seq, seq, ("batch", None)), seq)
    q, kv, seg = jnp.ones((8, 3, 4, 2)), jnp.arange(32.0).reshape(8, 1, 2, 2), jnp.ones((8, 3))
    want = kernel(q, kv, seg)
    assert _shard_map_specs(fn, q, kv, seg) is None  # no mesh: runs as is
    with S.activate(S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        seen.clear()
        specs = _shard_map_specs(fn, q, kv, seg)
        assert specs == ((P(("data", "fsdp"), None, "tensor", None),) * 2 + (P(("data", "fsdp"), None),),
                         P(("data", "fsdp"), None, "tensor", None))
        assert seen == [((2, 3, 2, 2), (2, 1, 1, 2), (2, 3))]
        np.testing.assert_array_equal(jax.jit(fn)(q, kv, seg), want)
        # One kv head cannot split over tensor=2: neither can the query heads grouped on it (the
        # same name splits the same way everywhere); a batch of 2 takes data, not data x fsdp.
        q2, kv2, seg2 = q[:2], kv[:2, :, :1], seg[:2]
        assert _shard_map_specs(fn, q2, kv2, seg2)[0] == (P("data", None, None, None),) * 2 + (P("data", None),)
        np.testing.assert_array_equal(jax.jit(fn)(q2, kv2, seg2), kernel(q2, kv2, seg2))
        # Heads folded into channels: 6 channels of 3 heads split by 2 would cut a head in half.
        folded = S.shard_kernel(lambda x: x * 2, (("batch", "heads"),), ("batch", "heads"), units={"heads": 3})
        assert _shard_map_specs(folded, jnp.ones((8, 6)))[1] == P(("data", "fsdp"), None)
    explicit = jax.sharding.AxisType.Explicit
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "model"), axis_types=(explicit,) * 2)):
        assert _shard_map_specs(fn, q, kv, seg)[1] == P("data", None, None, None)  # our axes by name only
        np.testing.assert_array_equal(jax.jit(fn)(q, kv, seg), want)  # explicit sharding: args resharded
    with S.activate(S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):  # inside a shard_map over data only
        outer = jax.shard_map(fn, in_specs=(P("data"),) * 3, out_specs=P("data"), axis_names={"data"})
        np.testing.assert_array_equal(jax.jit(outer)(q, kv, seg), want)
    with S.activate(S.make_mesh({"data": 1}, devices=jax.devices()[:1])):
        assert _shard_map_specs(fn, q, kv, seg) is None  # one device: nothing to map
    with S.activate(S.make_mesh({"data": 8})):  # inside a shard_map over every axis: runs as is, per device
        inner = jax.shard_map(fn, in_specs=(P("data"),) * 3, out_specs=P("data"))
        eqns = jax.make_jaxpr(inner)(q, kv, seg).jaxpr.eqns
        assert [e.primitive.name for e in eqns] == ["shard_map"]
        assert "shard_map" not in str(eqns[0].params["jaxpr"])
        np.testing.assert_array_equal(jax.jit(inner)(q, kv, seg), want)
