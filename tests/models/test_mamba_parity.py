"""Live parity with transformers' MambaForCausalLM (PyTorch slow path, random perturbed weights), through
Hugging Face directories in both directions."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import jaxformers as jf  # noqa: E402
from jaxformers.models.mamba import Mamba, generate  # noqa: E402
from tests.helpers import fast_jit  # noqa: E402

TOL = 1e-4


def test_transformers_directory_loads_and_ours_saves(tmp_path):
    config = transformers.MambaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, state_size=8,
                                      time_step_rank=5, use_bias=True, conv_kernel=3)
    torch.manual_seed(0)
    ref = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():  # zero conv/proj biases and unit norms would hide mix-ups
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf")
    ids = np.random.RandomState(0).randint(0, 61, (2, 19))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        expected_greedy = ref.generate(torch.tensor(ids[:1, :7]), max_new_tokens=5, do_sample=False).numpy()

    module, variables = jf.from_pretrained(tmp_path / "hf")
    assert isinstance(module, Mamba) and module.dt_rank == 5 and module.conv_kernel == 3
    out = fast_jit(lambda v, x, m: module.apply(v, x, attention_mask=m))(variables, jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(out[0], expected[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(out[1, 4:], expected[1, 4:], atol=TOL, rtol=0)
    np.testing.assert_array_equal(generate(module, variables, jnp.asarray(ids[:1, :7]), max_new_tokens=5), expected_greedy)

    jf.save_pretrained(module, variables, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        logits = again(torch.tensor(ids[:1])).logits.numpy()
    np.testing.assert_allclose(logits, expected[:1], atol=TOL, rtol=0)
