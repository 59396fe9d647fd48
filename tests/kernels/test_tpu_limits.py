"""jaxformers.kernels.tpu_limits: the TPU kernels plan VMEM from the chip that runs them."""
import types

import jax.numpy as jnp

from jaxformers.kernels import tpu_limits
from jaxformers.kernels.bi_level_routing import pallas_kernel as bra
from jaxformers.kernels.local_global import tpu_kernel


def _on_tpu_with(monkeypatch, vmem_bytes):
    monkeypatch.setattr(tpu_limits.jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(tpu_limits, "_tpu_info", lambda: types.SimpleNamespace(vmem_capacity_bytes=vmem_bytes))


def test_off_tpu_defaults():
    assert tpu_limits.vmem_capacity_bytes() == tpu_limits.DEFAULT_VMEM_BYTES == 64 << 20
    assert tpu_limits.vmem_budget_bytes() == 48 << 20
    assert tpu_limits.vmem_limit_bytes(1 << 20) == 32 << 20  # the default scoped limit at least
    assert tpu_limits.vmem_limit_bytes(40 << 20) == 54 << 20  # planned * 5/4 + 4 MiB
    assert tpu_limits.vmem_limit_bytes(100 << 20) == 64 << 20  # never above the chip


def test_small_vmem_chip_sends_large_rows_elsewhere(monkeypatch):
    """A (B=1, L=16384, D=128) packed row fits a 128 MiB v5e core but not a 16 MiB v4 core; a BRA
    256² map with S = 16 (~81 MiB resident, 41 MiB single-buffered) likewise, while the 128² map
    (~20 MiB, 10 MiB single-buffered) fits both."""
    args = (1, 16384, 16384, 128, 128, 2)
    bra_kw = dict(num_heads=2, regions_per_side=16, topk=4)
    big, small = ((shape, shape, jnp.bfloat16) for shape in ((16, 256, 256, 64), (16, 128, 128, 64)))
    _on_tpu_with(monkeypatch, 128 << 20)
    assert tpu_kernel.fits(*args) and bra.tpu_fits(*big, **bra_kw) and bra.tpu_fits(*small, **bra_kw)
    assert tpu_limits.vmem_limit_bytes(100 << 20) == 128 << 20
    _on_tpu_with(monkeypatch, 16 << 20)
    assert not tpu_kernel.fits(*args) and not bra.tpu_fits(*big, **bra_kw) and bra.tpu_fits(*small, **bra_kw)
    assert tpu_limits.vmem_limit_bytes(1 << 20) == 16 << 20  # the chip's whole VMEM, not 32 MiB
