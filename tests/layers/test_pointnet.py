"""PointNet++ set abstraction: farthest point sampling and ball query on a hand-made cloud, the layer's
grouping, clear errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.layers.pointnet import SetAbstraction, ball_query, farthest_point_sample
from tests.helpers import fast_jit, numpy_variables

# p0 at the origin, p1 1 m along x, p2 2 m along y, p3 far away, p4 next to p0.
CLOUD = jnp.array([[[0, 0, 0], [1, 0, 0], [0, 2, 0], [5, 5, 0], [0.1, 0, 0]]], jnp.float32)


def test_fps_and_ball_query_worked_example():
    """FPS starts at 0, then the farthest (p3: 50), then p2 (min distance 4 beats p1's 1 and p4's 0.01),
    then p1. Ball query (radius 1.05, 4 slots) around p0: p0, p1, p4 in index order, padded with the first
    found; around p3: only p3; around an empty region: index 0 (the CUDA kernel's default)."""
    np.testing.assert_array_equal(farthest_point_sample(CLOUD, 4), [[0, 3, 2, 1]])
    centers = jnp.array([[[0, 0, 0], [5, 5, 0], [10, 10, 10]]], jnp.float32)
    np.testing.assert_array_equal(ball_query(CLOUD, centers, 1.05, 4), [[[0, 1, 4, 0], [3, 3, 3, 3], [0, 0, 0, 0]]])
    np.testing.assert_array_equal(fast_jit(lambda x: farthest_point_sample(x, 4))(CLOUD), [[0, 3, 2, 1]])


def test_set_abstraction_groups_and_pools():
    """2 centres (p0, p3) with 4 neighbours each: the output at p3 only sees p3 (a copy of its relative
    xyz 0 and its feature), so it equals the layer applied to a cloud holding p3 alone; the given indices
    replace the sampling; too small a cloud and mismatched features are clear errors."""
    layer = SetAbstraction(npoint=2, radius=1.05, nsample=4, mlp=(8, 16))
    feats = jnp.arange(10, dtype=jnp.float32).reshape(1, 5, 2)
    variables = numpy_variables(layer, CLOUD, feats)
    new_xyz, out, inds = layer.apply(variables, CLOUD, feats)
    assert new_xyz.shape == (1, 2, 3) and out.shape == (1, 2, 16)
    np.testing.assert_array_equal(inds, [[0, 3]])
    lone = SetAbstraction(npoint=1, radius=1.05, nsample=1, mlp=(8, 16))
    _, alone, _ = lone.apply(variables, CLOUD[:, 3:4], feats[:, 3:4])
    np.testing.assert_allclose(out[0, 1], alone[0, 0], rtol=1e-6, atol=1e-6)
    _, _, given = layer.apply(variables, CLOUD, feats, jnp.array([[4, 2]]))
    np.testing.assert_array_equal(given, [[4, 2]])
    with pytest.raises(ValueError, match="at least 4 points; got 3"):
        layer.apply(variables, CLOUD[:, :3], feats[:, :3])
    with pytest.raises(ValueError, match="do not match xyz"):
        layer.apply(variables, CLOUD, feats[:, :4])
    with pytest.raises(ValueError, match=r"\(batch, points, 3\)"):
        farthest_point_sample(CLOUD[..., :2], 2)
    assert jax.eval_shape(lambda: farthest_point_sample(jnp.zeros((2, 64, 3)), 16)).shape == (2, 16)
