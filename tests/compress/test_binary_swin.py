"""BiViT on Swin (``SwinTransformer(binary=BIVIT)``, ``jaxformers.compress.binary``): the parameter count
is float Swin's plus BiViT's learnable row scales, and the bit-packed model equals the simulation bit
for bit on a tiny Swin with shifted windows (relative position bias + shift mask in the attention)."""
import jax
import numpy as np

import jaxformers as jf
from jaxformers.compress import binary as B
from jaxformers.models.swin import SwinTransformer
from tests.helpers import fast_jit, numpy_variables


def test_bivit_swin_parameter_count_is_float_plus_row_scales():
    float_count = jf.count_params("swin_tiny_patch4_window7_224")
    dims, depths = (96, 192, 384, 768), (2, 2, 6, 2)
    # s per output row of q, k, v (3·C) and of the output projection (C), per block; MLPs: rowmean|W|, no parameter
    extras = sum(d * 4 * c for d, c in zip(depths, dims))
    assert jf.count_params("swin_tiny_patch4_window7_224", binary=B.BIVIT) == float_count + extras == 28_288_354 + 17_664


def test_packed_bivit_swin_equals_simulation_bit_for_bit():
    swin = SwinTransformer(img_size=32, patch_size=8, embed_dim=16, depths=(2,), num_heads=(2,), window_size=2,
                           num_classes=5, drop_path_rate=0.0)  # 4x4 map, 2x2 windows, the second block shifted
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    model = B.binarize(swin, B.BIVIT)
    assert model.binary is B.BIVIT and swin.binary is None
    variables = numpy_variables(model, x)
    layers = B.binary_layers(model, variables, x)
    # per block: qkv, proj, fc1, fc2 binarized; patch embedding and head float
    assert len(layers) == 4 * 2 and not any("patch_embed" in p or "head" in p for p in map("/".join, layers))
    packed, packed_vars = B.pack(model, variables, x)
    qkv = packed_vars["params"]["layers_0"]["blocks_1"]["attn"]["mha"]["qkv"]
    assert set(qkv) == {"kernel_bits", "kernel_scale", "bias"}
    sim = fast_jit(model.apply)(variables, x)
    np.testing.assert_array_equal(np.asarray(fast_jit(packed.apply)(packed_vars, x)), np.asarray(sim))
    assert np.abs(np.asarray(sim)).max() > 1e-3
