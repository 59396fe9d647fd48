"""Vision Mamba: parity with the pure-PyTorch mambapy reference through the official-key converter,
features, training on digits, sharding, parameter counts, errors."""
import jax
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.sharding import make_mesh
from tests.helpers import (digits, fast_jit, numpy_variables, shard_like_init, single_and_sharded,
                           train_classifier)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, state_size=8, num_classes=10, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model("vim_tiny_patch16_224", **TINY)
    x, y = digits(8)
    return model, numpy_variables(model, x), x, y


def test_matches_mambapy_through_the_official_converter(tmp_path):
    torch = pytest.importorskip("torch")
    vim = pytest.importorskip("mambapy.vim")
    d, depth, m = 32, 2, 16
    torch.manual_seed(0)
    blocks = vim.VMamba(vim.MambaConfig(d_model=d, n_layers=depth, d_state=8, bidirectional=True))
    patch = torch.nn.Conv2d(3, d, 8, stride=8)
    cls, pos = torch.randn(1, 1, d) * 0.1, torch.randn(1, m + 1, d) * 0.1
    norm_f, head = vim.RMSNorm(d), torch.nn.Linear(d, 10)
    with torch.no_grad():
        for p in [*blocks.parameters(), *norm_f.parameters(), *head.parameters()]:
            p.add_(0.05 * torch.randn_like(p))  # unit norms, zero biases and equal A's would hide mix-ups
    # the official hustvl/Vim key names (mambapy calls the backward A "A_log_b")
    sd = {f"layers.{k.split('.', 2)[1]}.{k.split('.', 2)[2].replace('A_log_b', 'A_b_log')}": v
          for k, v in blocks.state_dict().items()}
    sd.update({"patch_embed.proj.weight": patch.weight, "patch_embed.proj.bias": patch.bias, "cls_token": cls,
               "pos_embed": pos, "norm_f.weight": norm_f.weight, "head.weight": head.weight, "head.bias": head.bias})
    torch.save({"model": {k: v.detach().clone() for k, v in sd.items()}}, tmp_path / "vim.pth")

    x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        t = patch(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).flatten(2).transpose(1, 2)
        t = torch.cat([t[:, :m // 2], cls.expand(2, -1, -1), t[:, m // 2:]], 1) + pos
        expected = head(norm_f(blocks(t))[:, m // 2]).numpy()
    model = jf.create_model("vim_tiny_patch16_224", **TINY)
    variables = jf.load_pretrained("vim_tiny_patch16_224", tmp_path / "vim.pth", **TINY)
    out = fast_jit(model.apply)(variables, x)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_features_and_bad_input(tiny):
    model, variables, x, _ = tiny
    feats = fast_jit(lambda v, x: model.apply(v, x, method="forward_features"))(variables, x)
    assert list(feats) == [8] and feats[8].shape == (8, 4, 4, 32)
    with pytest.raises(ValueError, match="img_size 30x30 is not divisible by patch_size=8"):
        jax.eval_shape(jf.create_model("vim_tiny_patch16_224", **{**TINY, "img_size": 30}).init, jax.random.key(0),
                       x[:, :30, :30])
    with pytest.raises(ValueError, match="built for img_size=32x32"):
        model.apply(variables, x[:, :24, :24])


def test_trains_on_digits_and_every_parameter_learns(tiny):
    model = jf.create_model("vim_tiny_patch16_224", **{**TINY, "depth": 1, "drop_path_rate": 0.1}, remat=True)
    x, y = digits(32)
    losses, variables = train_classifier(model, numpy_variables(model, x[:1]), x, y, steps=10,
                                         tx=optax.adam(3e-3))
    assert losses[-1] < 0.7 * losses[0], losses


def test_sharded_equals_single_device(tiny):
    """The forward pass (the mixer's sharded gradients are checked in test_mamba.py)."""
    model = jf.create_model("vim_tiny_patch16_224", **{**TINY, "depth": 1}, scan="sequential")
    x = tiny[2][:4]
    variables = numpy_variables(model, x)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded_vars = shard_like_init(model, variables, x, mesh)
    single, sharded = single_and_sharded(fast_jit(model.apply), variables, sharded_vars, x, mesh)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "vim_small_patch16_224"])
def test_param_counts_equal_the_official_model(name):
    """The official VisionMamba's count (patch conv, class token, 197 positions, 24 v2 mixers, RMSNorms, head)."""
    expected = {"vim_tiny_patch16_224": 7_148_008, "vim_small_patch16_224": 25_796_584}[name]
    assert jf.count_params(name, scan="sequential") == expected
    assert jf.model_info(name).params_m == pytest.approx(expected / 1e6)
