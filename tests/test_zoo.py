"""Every model family builds and traces: the smallest registered variant of each family goes through
``init`` and ``apply`` under ``jax.eval_shape`` (nothing is allocated or compiled). Cheap enough for
every CI leg, so API drift in a newer jax or flax shows up for the whole zoo; each family's own tests
check numbers."""
import jax
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.registry import example_inputs, init_abstract


def _smallest_per_family() -> list[str]:
    best: dict[str, tuple[float, str]] = {}
    for name in jf.list_models():
        info = jf.model_info(name)
        size = info.params_m if info.params_m is not None else float("inf")
        if info.family not in best or (size, name) < best[info.family]:
            best[info.family] = (size, name)
    return sorted(name for _, name in best.values())


@pytest.mark.parametrize("name", _smallest_per_family())
def test_family_builds_and_traces(name):
    model = jf.create_model(name)
    variables = init_abstract(model, batch_size=2)
    inputs = example_inputs(model, batch_size=2)
    out = jax.eval_shape(lambda v, *x: model.apply(v, *x, train=False), variables, *inputs)
    leaves = jax.tree_util.tree_leaves(out)
    assert leaves and all(leaf.shape[0] == 2 and np.issubdtype(leaf.dtype, np.floating) for leaf in leaves), name
