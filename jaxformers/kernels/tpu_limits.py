"""On-chip memory budgets of the Pallas TPU kernels, from the TPU that runs them.

The scalar-prefetched tables (SMEM) get a fixed budget, :data:`SMEM_TABLE_BUDGET_BYTES`.

VMEM differs a lot between TPU generations (16 MiB per core on v4, 64 MiB on v5p, 128 MiB on
v5e/v6e), so a kernel whose resident blocks fit one chip may not fit another. The kernels ask
:func:`vmem_budget_bytes` (3/4 of the current chip's VMEM, leaving room for Mosaic's own scratch)
before choosing their TPU path; off a TPU (tests, lowering from a CPU host) it is a v5p-sized
default.
"""
from __future__ import annotations

import importlib

import jax

DEFAULT_VMEM_BYTES = 64 << 20  # off a TPU: a v5p core
SMEM_TABLE_BUDGET_BYTES = 256 * 1024  # scalar-prefetched int32 tables per call (SMEM: 1 MiB from v4 on)


def _tpu_info():
    for module in ("jax._src.tpu_info", "jax._src.pallas.mosaic.tpu_info"):  # newer, older jax
        try:
            return importlib.import_module(module).get_tpu_info()
        except (ImportError, AttributeError, ValueError, RuntimeError):
            continue
    return None


def vmem_capacity_bytes() -> int:
    """VMEM per core of the current TPU, or :data:`DEFAULT_VMEM_BYTES` off a TPU (or if unknown)."""
    if jax.default_backend() != "tpu":
        return DEFAULT_VMEM_BYTES
    info = _tpu_info()
    return int(getattr(info, "vmem_capacity_bytes", DEFAULT_VMEM_BYTES))


def vmem_budget_bytes() -> int:
    """Bytes of double-buffered blocks one TPU kernel may plan for: 3/4 of the VMEM."""
    return vmem_capacity_bytes() * 3 // 4


def vmem_limit_bytes(planned: int) -> int:
    """The ``vmem_limit_bytes`` compiler parameter for ``planned`` bytes of blocks: some headroom,
    at least the 32 MiB default scoped limit where the chip has it, never above the chip's VMEM."""
    capacity = vmem_capacity_bytes()
    return int(min(capacity, max(min(32 << 20, capacity), planned * 5 // 4 + (4 << 20))))
