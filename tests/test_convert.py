import numpy as np
import pytest

from jaxformers.convert import StateDict, conv2d, heads_in, heads_out, linear, qkv_fused, read_checkpoint


def test_layout_helpers():
    w = np.arange(6 * 4).reshape(6, 4).astype(np.float32)  # torch (out=6, in=4)
    np.testing.assert_array_equal(linear(w), w.T)
    x = np.random.default_rng(0).normal(size=4)
    # fused qkv: (3*H*D, E) -> (E, 3, H, D); q of head 1 = rows [2:4] for H=3, D=... here H=1, D=2
    k = qkv_fused(w, num_heads=1)
    assert k.shape == (4, 3, 1, 2)
    np.testing.assert_allclose(np.einsum("e,ethd->thd", x, k).reshape(-1), w @ x, rtol=1e-6)
    assert qkv_fused(np.arange(6.0), num_heads=1).shape == (3, 1, 2)
    hi = heads_in(w, num_heads=3)
    np.testing.assert_allclose(np.einsum("e,ehd->hd", x, hi).reshape(-1), w @ x, rtol=1e-6)
    wo = np.random.default_rng(1).normal(size=(5, 6))  # (E=5, H*D=6)
    y = np.random.default_rng(2).normal(size=(3, 2))
    np.testing.assert_allclose(np.einsum("hd,hde->e", y, heads_out(wo, 3)), wo @ y.reshape(-1), rtol=1e-6)
    c = np.zeros((8, 3, 5, 7))
    assert conv2d(c).shape == (5, 7, 3, 8)


def test_state_dict_tracks_usage():
    sd = StateDict({"a.weight": np.ones(2), "a.bias": np.zeros(2), "b": np.ones(1)})
    _ = sd["a.weight"]
    sd.skip("b", "not_there")
    assert sd.unused() == ["a.bias"]
    with pytest.raises(KeyError, match="close: \\['a.weight'"):
        sd["a.weigh"]


def test_read_checkpoint_formats(tmp_path):
    tensors = {"x.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    np.savez(tmp_path / "c.npz", **tensors)
    np.testing.assert_array_equal(read_checkpoint(tmp_path / "c.npz")["x.weight"], tensors["x.weight"])
    safetensors = pytest.importorskip("safetensors.numpy")
    safetensors.save_file(tensors, str(tmp_path / "c.safetensors"))
    np.testing.assert_array_equal(read_checkpoint(tmp_path / "c.safetensors")["x.weight"], tensors["x.weight"])
    torch = pytest.importorskip("torch")
    torch.save({"model": {"module.x.weight": torch.arange(6.0).reshape(2, 3).bfloat16()}, "epoch": 3},
               tmp_path / "c.pth")
    np.testing.assert_array_equal(read_checkpoint(tmp_path / "c.pth")["x.weight"], tensors["x.weight"])
    torch.save({"state_dict": {"w": torch.zeros(1)}, "state_dict_ema": {"w": torch.ones(1)}}, tmp_path / "ema.pth")
    assert read_checkpoint(tmp_path / "ema.pth")["w"] == 0
    assert read_checkpoint(tmp_path / "ema.pth", key="state_dict_ema")["w"] == 1
    with pytest.raises(KeyError, match="no state dict under 'ema'.*'state_dict', 'state_dict_ema'"):
        read_checkpoint(tmp_path / "ema.pth", key="ema")
    with pytest.raises(ValueError, match="unsupported checkpoint type '.h5'"):
        (tmp_path / "c.h5").write_bytes(b"")
        read_checkpoint(tmp_path / "c.h5")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pth")


def test_read_checkpoint_refuses_pickled_code(tmp_path):
    torch = pytest.importorskip("torch")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.ones(1), "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        read_checkpoint(tmp_path / "evil.pth")
