"""The survey's pipeline: quantise -> prune (hook) -> distil -> deploy int8, measured per stage."""
import jax
import jax.numpy as jnp
import pytest

from jaxformers import compress
from jaxformers.models.gpt import CausalLM
from tests.helpers import numpy_variables, zen_of_python_chars


def _magnitude_prune(module, variables, fraction=0.5):
    """A stand-in for the pruning papers' hooks: the smallest |w| of every kernel set to 0."""
    def prune(path, w):
        if path[-1].key != "kernel" or w.ndim < 2:
            return w
        cut = jnp.quantile(jnp.abs(w), fraction)
        return jnp.where(jnp.abs(w) < cut, 0.0, w)

    return {**variables, "params": jax.tree_util.tree_map_with_path(prune, variables["params"])}


def test_quantize_prune_distill_deploy():
    pytest.importorskip("qwix")
    ids, _ = zen_of_python_chars(8, 16)
    batches = [jnp.asarray(ids[:4]), jnp.asarray(ids[4:])]
    module = CausalLM(model_type="opt", vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      ffn_dim=48, max_position_embeddings=16, hidden_act="relu")
    variables = numpy_variables(module, batches[0])
    deployed, qv, report = compress.compress(module, variables, batches, prune=_magnitude_prune, distill_steps=24,
                                             learning_rate=3e-3)
    stages = {row["stage"].split(" ")[0]: row for row in report}
    assert list(stages) == ["float", "quantize", "prune", "distill", "deploy"]
    assert stages["prune"]["sparsity"] > 0.25 and stages["prune"]["disagreement"] > stages["quantize"]["disagreement"]
    assert stages["distill"]["disagreement"] < 0.7 * stages["prune"]["disagreement"], report
    assert stages["deploy"]["sparsity"] == stages["prune"]["sparsity"]  # pruned weights stayed 0
    assert stages["deploy"]["bytes"] < 0.6 * stages["float"]["bytes"]
    assert jax.jit(deployed.apply)(qv, batches[0]).shape == (4, 16, 100)
    with pytest.raises(ValueError, match="unknown pruner 'movement'; registered: none yet"):
        compress.compress(module, variables, batches, prune="movement")
    with pytest.raises(ValueError, match="one of \\['int8-w8a8', 'int8-weight-only'\\]; got 'bct'"):
        compress.compress(module, variables, batches, scheme="bct")
