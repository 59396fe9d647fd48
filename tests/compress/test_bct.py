"""BCT (blockwise compression without retraining): the blockwise codes, their packing, and the whole
BERT compressed (embedding, matmuls, Softmax, GELU, LayerNorm, intermediate results)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers import compress
from jaxformers.compress.bct import blockwise_fake_quant, dequantize_blockwise, quantize_blockwise
from jaxformers.models.bert import Bert
from tests.helpers import fast_jit, numpy_variables


@pytest.mark.parametrize("bits", [8, 4])
def test_blockwise_codes_round_trip_and_pack(bits):
    rng = np.random.RandomState(0)
    m = rng.randn(70, 3).astype(np.float32)
    m[5, 1] = 40.0  # an outlier: only its own block gets a coarse grid
    codes, scale = quantize_blockwise(m, bits, 16)
    assert scale.shape == (5, 3) and scale.dtype == np.float16  # 70 -> 80 rows: 5 blocks of 16
    assert codes.dtype == (np.int8 if bits == 8 else np.uint8) and codes.shape == ((80, 3) if bits == 8 else (40, 3))
    back = np.asarray(dequantize_blockwise(jnp.asarray(codes), jnp.asarray(scale), 70, bits, 16))
    levels = 2 ** (bits - 1) - 1
    blocks = np.pad(m, [(0, 10), (0, 0)]).reshape(5, 16, 3)
    step = (np.abs(blocks).max(1) / levels).astype(np.float16).astype(np.float32)
    expected = (np.clip(np.round(blocks / step[:, None]), -levels, levels) * step[:, None]).reshape(80, 3)[:70]
    np.testing.assert_allclose(back, expected, rtol=1e-6)
    # blockwise beats one grid for the whole tensor on everything outside the outlier's block
    per_tensor = np.round(m / (40.0 / levels)) * (40.0 / levels)
    outside = np.ones_like(m, bool)
    outside[:16, 1] = False
    assert np.abs(back - m)[outside].mean() < 0.5 * np.abs(per_tensor - m)[outside].mean()
    # activations: the same grid per block of the last axis; probabilities on an unsigned grid
    x = jnp.asarray(m.T)
    np.testing.assert_allclose(blockwise_fake_quant(x, bits, 16), expected.T, rtol=1e-2, atol=1e-3 * levels ** -1)
    p = jax.nn.softmax(x, axis=-1)
    q = blockwise_fake_quant(p, 8, 16, unsigned=True)
    assert float(q.min()) >= 0 and float(jnp.abs(q - p).max()) <= float(p.max()) / 255 / 2 + 1e-7


def test_bct_compresses_every_part_of_bert():
    module = Bert(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=16, head="mlm")
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 60, (2, 9)))
    variables = numpy_variables(module, ids)
    ref = fast_jit(module.apply)(variables, ids)
    errors = {}
    for bits in (8, 4):
        qm, qv = compress.quantize(module, variables, "bct", weight_bits=bits, block_size=16)
        out = jax.jit(qm.apply)(qv, ids)
        errors[bits] = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
        layer = qv["params"]["layer_0"]
        for leaf in (layer["attn"]["qkv"]["kernel"], layer["attn"]["proj"]["kernel"], layer["mlp"]["fc1"]["kernel"],
                     layer["mlp_norm"]["scale"], qv["params"]["embeddings"]["word_embeddings"]["embedding"]):
            assert leaf.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
        assert qv["params"]["mlm"]["dense"]["kernel"].dtype == jnp.float32  # the head
        kernel = layer["mlp"]["fc1"]["kernel"]
        scale = qv["bct_scale"]["layer_0/mlp/fc1/kernel"]
        ratio = 4 * 32 * 64 / (kernel.size + 2 * scale.size)
        assert abs(ratio - 32 / (bits + 16 / 16)) < 0.05, ratio
    assert 0 < errors[8] < 0.05 < errors[4] < 0.5, errors
