"""jaxformers.kernels.gpu_kernel: the Triton / Mosaic GPU choice shared by the kernel ops."""
import pytest

import jax.numpy as jnp

from jaxformers.kernels import bi_level_routing_attention, local_global_attention
from jaxformers.kernels.gpu_kernel import ENV_VAR, GPU_KERNELS, gpu_kernel_choice, on_hopper_gpu, resolve_gpu_kernel


def _never():
    raise AssertionError("fits() must not be asked when Mosaic is impossible")


def test_resolve_gpu_kernel():
    assert GPU_KERNELS == ("auto", "triton", "mosaic")
    assert not on_hopper_gpu()  # the tests run on CPU
    assert resolve_gpu_kernel("triton", backend="gpu", fits=_never, requirement="") == "triton"
    assert resolve_gpu_kernel("auto", backend="cpu", fits=_never, requirement="") == "triton"
    assert resolve_gpu_kernel("auto", backend="tpu", fits=_never, requirement="") == "triton"
    assert resolve_gpu_kernel("mosaic", backend="tpu", fits=_never, requirement="") == "triton"  # GPU-only choice
    assert resolve_gpu_kernel("mosaic", backend="cpu", fits=lambda: True, requirement="") == "mosaic"
    # "auto" on a GPU that is not a Hopper (here: no GPU at all) keeps Triton even for fitting inputs
    assert resolve_gpu_kernel("auto", backend="gpu", fits=lambda: True, requirement="") == "triton"
    assert resolve_gpu_kernel("auto", backend="gpu", fits=lambda: False, requirement="") == "triton"
    with pytest.raises(ValueError, match="gpu_kernel='mosaic' needs bf16 inputs; got float32"):
        resolve_gpu_kernel("mosaic", backend="gpu", fits=lambda: False, requirement="bf16 inputs; got float32")
    with pytest.raises(ValueError, match=r"must be one of \('auto', 'triton', 'mosaic'\) or None; got 'cuda'"):
        resolve_gpu_kernel("cuda", backend="gpu", fits=_never, requirement="")


def test_process_default_from_the_environment(monkeypatch):
    """gpu_kernel=None takes $JAXFORMERS_GPU_KERNEL (else "auto"); an explicit argument wins; a bad
    value names the variable, also through the public ops before anything is traced."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert gpu_kernel_choice() == "auto"
    monkeypatch.setenv(ENV_VAR, " Triton ")
    assert gpu_kernel_choice() == "triton" and gpu_kernel_choice("mosaic") == "mosaic"
    assert resolve_gpu_kernel(None, backend="gpu", fits=_never, requirement="") == "triton"
    monkeypatch.setenv(ENV_VAR, "mosaic")
    assert resolve_gpu_kernel(None, backend="cpu", fits=lambda: True, requirement="") == "mosaic"
    with pytest.raises(ValueError, match="gpu_kernel='mosaic' needs head dim 64"):
        resolve_gpu_kernel(None, backend="gpu", fits=lambda: False, requirement="head dim 64")
    monkeypatch.setenv(ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=f"environment variable {ENV_VAR} must be one of .*; got 'cudnn'"):
        gpu_kernel_choice()
    x = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match=ENV_VAR):
        local_global_attention(x, x, x, implementation="xla")
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(ValueError, match="gpu_kernel must be one of"):
        local_global_attention(x, x, x, implementation="xla", gpu_kernel="cuda")
    m = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match="gpu_kernel must be one of"):
        bi_level_routing_attention(m, m, m, num_heads=2, regions_per_side=2, topk=1, gpu_kernel="Mosaic")


def test_public_ops_pass_gpu_kernel_down():
    """The public ops' gpu_kernel reaches the Pallas kernels: "mosaic" with inputs the Hopper kernels
    refuse (float32) raises their error (on CPU the Pallas path is interpret mode)."""
    x = jnp.zeros((1, 64, 2, 32), jnp.float32)
    with pytest.raises(ValueError, match="gpu_kernel='mosaic' needs bfloat16/float16"):
        local_global_attention(x, x, x, window=(8, 8), implementation="pallas", gpu_kernel="mosaic")
    m = jnp.zeros((1, 16, 16, 64), jnp.float32)
    with pytest.raises(ValueError, match="gpu_kernel='mosaic' needs bfloat16/float16"):
        bi_level_routing_attention(m, m, m, num_heads=2, regions_per_side=2, topk=1, implementation="pallas",
                                   gpu_kernel="mosaic")
