import importlib

import jax
import pytest


@pytest.fixture
def lower_as_h100(monkeypatch):
    """Lets Pallas' Triton lowering run on this CPU host: newer jax asks the device for its GPU info,
    so map the CPU's device kind to an H100's (older jax needs nothing)."""
    try:
        gpu_info = importlib.import_module("jax._src.pallas.triton.gpu_info")
    except ImportError:
        return
    monkeypatch.setitem(gpu_info.registry, jax.devices()[0].device_kind,
                        lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100))
