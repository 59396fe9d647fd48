"""Which GPU kernel set a Pallas call takes: ``gpu_kernel="auto" | "triton" | "mosaic"``.

Shared by the ops that have both Triton kernels and Hopper (Mosaic GPU) ones. ``gpu_kernel=None``
(the default of the public ops) means the process default: the environment variable
``JAXFORMERS_GPU_KERNEL`` if set, else ``"auto"``. It is read when a call is traced, so it picks the
kernels of whole models (``attention_impl="pallas"``) without a model argument; set it before the
first trace (jit caches do not see it). Nothing here imports the Mosaic GPU modules, so resolving
``"auto"`` off a GPU costs no import.

JAX 0.12 deprecated the Pallas Triton backend ("will be removed in a future JAX version"). Where a
jax no longer has it (:func:`triton_available`), the ops' ``implementation="auto"`` runs on a GPU
the Mosaic GPU kernels where they take the inputs and the XLA reference elsewhere, and a call that
needs the Triton kernels raises :func:`triton_compiler_params`' error instead of a lowering trace.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import jax

GPU_KERNELS = ("auto", "triton", "mosaic")
ENV_VAR = "JAXFORMERS_GPU_KERNEL"


def gpu_kernel_choice(choice: str | None = None) -> str:
    """``choice``, or the process default when None (``$JAXFORMERS_GPU_KERNEL``, else "auto"), checked."""
    if choice is None:
        value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if value not in GPU_KERNELS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {GPU_KERNELS}; got {value!r}")
        return value
    if choice not in GPU_KERNELS:
        raise ValueError(f"gpu_kernel must be one of {GPU_KERNELS} or None; got {choice!r}")
    return choice


def triton_available() -> bool:
    """Whether this jax still lowers Pallas calls to Triton on a GPU: ``jax.experimental.pallas.triton``
    imports and its deprecation (``"jax-pallas-triton"``, registered since jax 0.12) is not made an
    error."""
    try:
        importlib.import_module("jax.experimental.pallas.triton")
    except ImportError:
        return False
    try:
        from jax._src import deprecations

        return not deprecations.is_accelerated("jax-pallas-triton")
    except Exception:  # jax < 0.12: not deprecated; or its internals moved (the import above decides)
        return True


def triton_compiler_params(**kwargs):
    """``jax.experimental.pallas.triton.CompilerParams(**kwargs)`` for a compiled Triton kernel, or a
    ValueError that says what to use instead when this jax no longer has the Triton backend."""
    if not triton_available():
        raise ValueError(
            f"these inputs need the Pallas Triton kernels on this GPU, and jax {jax.__version__} no longer "
            "has the Pallas Triton backend (deprecated in jax 0.12); use implementation='xla', or "
            "implementation='auto' (which then falls back to it), or on a Hopper GPU bfloat16/float16 "
            "inputs that the Mosaic GPU kernels take (gpu_kernel='mosaic' names what they need)")
    return importlib.import_module("jax.experimental.pallas.triton").CompilerParams(**kwargs)


def on_hopper_gpu() -> bool:
    """True when JAX's default backend is a Hopper (sm90) GPU, where the Mosaic kernels are the default."""
    if jax.default_backend() != "gpu":
        return False
    return str(getattr(jax.devices("gpu")[0], "compute_capability", "")).startswith("9.")


def resolve_gpu_kernel(choice: str | None, *, backend: str, fits: Callable[[], bool], requirement: str) -> str:
    """``"triton"`` or ``"mosaic"`` for ``gpu_kernel=choice`` (None: :func:`gpu_kernel_choice`) on ``backend``.

    ``fits()`` says whether the Mosaic kernels take these inputs; it is asked only when Mosaic is
    possible. ``"mosaic"`` on inputs that do not fit raises a ValueError
    ``"gpu_kernel='mosaic' needs {requirement}"``; ``"auto"`` picks Mosaic on a Hopper GPU when the
    inputs fit, else Triton. On a TPU backend the choice does not apply: always ``"triton"`` (meaning
    "not the Mosaic GPU kernels"; the caller runs its TPU kernels).
    """
    choice = gpu_kernel_choice(choice)
    if choice == "triton" or backend == "tpu" or (choice == "auto" and backend != "gpu"):
        return "triton"
    if not fits():
        if choice == "mosaic":
            raise ValueError(f"gpu_kernel='mosaic' needs {requirement}")
        return "triton"
    return "mosaic" if choice == "mosaic" or on_hopper_gpu() else "triton"
