"""Which GPU kernel set a Pallas call takes: ``gpu_kernel="auto" | "triton" | "mosaic"``.

Shared by the ops that have both Triton kernels and Hopper (Mosaic GPU) ones. Nothing here imports
the Mosaic GPU modules, so resolving ``"auto"`` off a GPU costs no import.
"""
from __future__ import annotations

from typing import Callable

import jax

GPU_KERNELS = ("auto", "triton", "mosaic")


def on_hopper_gpu() -> bool:
    """True when JAX's default backend is a Hopper (sm90) GPU, where the Mosaic kernels are the default."""
    if jax.default_backend() != "gpu":
        return False
    return str(getattr(jax.devices("gpu")[0], "compute_capability", "")).startswith("9.")


def resolve_gpu_kernel(choice: str, *, backend: str, fits: Callable[[], bool], requirement: str) -> str:
    """``"triton"`` or ``"mosaic"`` for ``gpu_kernel=choice`` on ``backend``.

    ``fits()`` says whether the Mosaic kernels take these inputs; it is asked only when Mosaic is
    possible. ``"mosaic"`` on inputs that do not fit raises a ValueError
    ``"gpu_kernel='mosaic' needs {requirement}"``; ``"auto"`` picks Mosaic on a Hopper GPU when the
    inputs fit, else Triton.
    """
    if choice not in GPU_KERNELS:
        raise ValueError(f"gpu_kernel must be one of {GPU_KERNELS}; got {choice!r}")
    if choice == "triton" or (choice == "auto" and backend != "gpu"):
        return "triton"
    if not fits():
        if choice == "mosaic":
            raise ValueError(f"gpu_kernel='mosaic' needs {requirement}")
        return "triton"
    return "mosaic" if choice == "mosaic" or on_hopper_gpu() else "triton"
