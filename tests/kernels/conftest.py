import jax
import pytest

from jaxformers.kernels.gpu_kernel import jax_gpu_info_module


@pytest.fixture
def lower_as_h100(monkeypatch):
    """Lets Pallas' Triton lowering run on this CPU host: newer jax asks the device for its GPU info,
    so map the CPU's device kind to an H100's (older jax needs nothing)."""
    gpu_info = jax_gpu_info_module()
    if gpu_info is None:
        return
    monkeypatch.setitem(gpu_info.registry, jax.devices()[0].device_kind,
                        lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))


@pytest.fixture
def lower_as_v5e(monkeypatch):
    """Lets Pallas' Mosaic TPU lowering run on this CPU host: map the CPU's device kind to a TPU v5e's
    chip info (skips on a jax without that registry)."""
    tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    if not hasattr(tpu_info, "registry") or not hasattr(tpu_info, "get_tpu_info_for_chip"):
        pytest.skip("this jax has no TPU info registry to lower against")
    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
