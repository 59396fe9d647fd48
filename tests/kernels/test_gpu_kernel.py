"""jaxformers.kernels.gpu_kernel: the Triton / Mosaic GPU choice shared by the kernel ops."""
import pytest

from jaxformers.kernels.gpu_kernel import GPU_KERNELS, on_hopper_gpu, resolve_gpu_kernel


def _never():
    raise AssertionError("fits() must not be asked when Mosaic is impossible")


def test_resolve_gpu_kernel():
    assert GPU_KERNELS == ("auto", "triton", "mosaic")
    assert not on_hopper_gpu()  # the tests run on CPU
    assert resolve_gpu_kernel("triton", backend="gpu", fits=_never, requirement="") == "triton"
    assert resolve_gpu_kernel("auto", backend="cpu", fits=_never, requirement="") == "triton"
    assert resolve_gpu_kernel("auto", backend="tpu", fits=_never, requirement="") == "triton"
    assert resolve_gpu_kernel("mosaic", backend="cpu", fits=lambda: True, requirement="") == "mosaic"
    # "auto" on a GPU that is not a Hopper (here: no GPU at all) keeps Triton even for fitting inputs
    assert resolve_gpu_kernel("auto", backend="gpu", fits=lambda: True, requirement="") == "triton"
    assert resolve_gpu_kernel("auto", backend="gpu", fits=lambda: False, requirement="") == "triton"
    with pytest.raises(ValueError, match="gpu_kernel='mosaic' needs bf16 inputs; got float32"):
        resolve_gpu_kernel("mosaic", backend="gpu", fits=lambda: False, requirement="bf16 inputs; got float32")
    with pytest.raises(ValueError, match=r"gpu_kernel must be one of \('auto', 'triton', 'mosaic'\); got 'cuda'"):
        resolve_gpu_kernel("cuda", backend="gpu", fits=_never, requirement="")
