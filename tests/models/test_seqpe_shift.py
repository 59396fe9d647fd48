"""SeqPE's training positions as the official code builds them: blocks of positions (1-D ranges, 2-D row by
row with the row's then the column's digits), the main task's random start shift (rate, fixed downsampled
shift list, the pointer) on worked examples and against the official sampler's shift set (where fetched),
2-D sin-cos, and the shifted positions reaching a ViT through ``positions=``."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.models.seqpe import (
    MainTaskPositions,
    SeqPE,
    SinCosPositions,
    block_positions,
    max_digits_for,
    positions_to_digits,
)
from tests.helpers import digits, fast_jit, load_official, numpy_variables


def test_block_positions_and_random_shift_on_worked_examples():
    np.testing.assert_array_equal(block_positions(3, 4), [[3], [4], [5], [6]])
    block = block_positions((1, 8), (2, 3))  # row by row, as the official create_2d_pos_list
    np.testing.assert_array_equal(block, [[1, 8], [1, 9], [1, 10], [2, 8], [2, 9], [2, 10]])
    d, real = map(np.asarray, positions_to_digits(block, 2))  # each (row, column): the row's digits, then the column's
    np.testing.assert_array_equal(d[[0, 2, 5]], [[0, 1, 0, 8], [0, 1, 1, 0], [0, 2, 1, 0]])
    np.testing.assert_array_equal(real[[0, 2]], [[0, 1, 0, 1], [0, 1, 1, 1]])
    rng = np.random.default_rng(0)
    one = MainTaskPositions(4, 10, rng, rate=1.0)  # every step shifted: starts 0..6 (the block stays < 10)
    assert sorted(one.starts) == list(range(7))
    one.pointer = 2  # the official pointer starts at a random 0..31 and walks the shuffled starts in order
    draws = [one.next(rng) for _ in range(5)]
    assert [int(p[0, 0]) for p, _ in draws] == one.starts[2:]
    assert all(shifted for _, shifted in draws)
    for pos, _ in draws:
        np.testing.assert_array_equal(pos[:, 0], pos[0, 0] + np.arange(4))
        assert 0 <= pos.min() and pos.max() < 10
    two = MainTaskPositions((2, 3), 5, rng, rate=1.0, downsample=5)
    assert len(two.starts) == 5 and len(set(two.starts)) == 5
    assert all(0 <= i <= 3 and 0 <= j <= 2 for i, j in two.starts)
    pos, shifted = two.next(rng)
    assert shifted and tuple(map(int, pos[0])) in two.starts
    np.testing.assert_array_equal(pos, block_positions(tuple(map(int, pos[0])), (2, 3)))
    never = MainTaskPositions((2, 3), 5, rng, rate=0.0)
    pos, shifted = never.next(rng)
    assert not shifted and np.array_equal(pos, block_positions((0, 0), (2, 3)))
    rate = np.mean([MainTaskPositions(4, 10, np.random.default_rng(i), rate=0.1).next(rng)[1] for i in range(400)])
    assert 0.05 < rate < 0.15
    with pytest.raises(ValueError, match="does not fit max_position=5"):
        MainTaskPositions((6, 2), 5, rng)
    sincos = SinCosPositions().apply({}, block, block, num_layers=1, num_heads=1, head_dim=8, width=8).inputs
    np.testing.assert_allclose(sincos[:, [0, 1, 4, 5]], np.sin(block[:, [0, 0, 1, 1]] * [1.0, 0.01, 1.0, 0.01]),
                               rtol=1e-5, atol=1e-6)


def test_main_task_shifts_match_the_official_sampler(monkeypatch, request):
    import sys
    import types
    pytest.importorskip("torch")
    for name in ("ray", "models"):  # stand-ins for the official imports, removed again after the test
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    request.addfinalizer(lambda: [sys.modules.pop(n, None) for n in ("models.pe_utils", "seqpe_official_pe_sampler")])
    utils = load_official("SeqPE", "image_seqpe/models/pe_utils.py", "models.pe_utils")
    official = load_official("SeqPE", "image_seqpe/pe_sampler.py", "seqpe_official_pe_sampler")
    for shape, max_position, side in ((4, 10, 10), ((2, 2), 25, 5)):  # official 2-D max: side² (per side 5)
        ref = official.SeqPeMainTaskPosSampler(shape, max_position, max_digits_for(side), data_dim=1 + (side != 10),
                                               use_random_shift=True, random_shift_rate=1.0)
        ours = MainTaskPositions(shape, side, np.random.default_rng(0))
        blocks = {tuple(map(tuple, block_positions(s, shape).tolist())) for s in ours.starts}
        ref_blocks = {tuple((p,) if isinstance(p, int) else tuple(p) for p in b) for b in ref.pos_list}
        assert blocks == ref_blocks
        d, real = positions_to_digits(block_positions(ours.starts[0], shape), max_digits_for(side))
        seq, pad = utils.PeUtils.prepare_seqpe_data([tuple(p) if len(p) > 1 else p[0] for p in
                                                     block_positions(ours.starts[0], shape).tolist()],
                                                    max_digits_for(side))
        np.testing.assert_array_equal(d, seq.numpy())
        np.testing.assert_array_equal(real, pad.numpy().astype(bool))


def test_vit_takes_shifted_training_positions():
    pe = SeqPE(mode="attn_mul", max_position=100, data_dim=2, d_pe=16, num_layers=1, num_heads=2, pe_qk="multi")
    model = jf.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                            num_classes=5, position_encoder=pe)
    x = digits(2, size=16)[0]
    variables = numpy_variables(model, x)
    shifted = jnp.asarray(block_positions((5, 7), (2, 2)))
    out = fast_jit(lambda v, a: (model.apply(v, a), model.apply(v, a, positions=shifted)))(variables, x)
    assert np.abs(np.asarray(out[1] - out[0])).max() > 1e-4  # the shifted positions reach the attention
    with pytest.raises(ValueError, match=r"positions must be \(h·w, 2\) = \(4, 2\)"):
        model.apply(variables, x, positions=shifted[:3])
    with pytest.raises(ValueError, match="positions= is for a position_encoder"):
        model.clone(position_encoder=None).apply(variables, x, positions=shifted)
