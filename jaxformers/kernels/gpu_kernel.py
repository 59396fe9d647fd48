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
The same holds on a GPU that XLA's Triton does not compile for (compute capability below 8.0: a
T4 or V100), so ``"auto"`` runs there, e.g. on a free Colab GPU.

The Triton kernels size their tiles to the GPU's shared memory per block
(:func:`gpu_shared_memory_bytes`): an A100 has 163 KiB, a Hopper or Blackwell data-centre GPU 227 KiB,
an A10, L4, RTX 3090/4090/5090 only 99 KiB.

float32 dots in the Triton kernels follow jax's default matmul precision, as XLA's own dots do: TF32
tensor cores unless ``jax.default_matmul_precision`` (or the ``jax_default_matmul_precision`` flag)
asks for exact float32 (:func:`exact_float32_dots`), which Triton multiplies on CUDA cores, several
times slower; the local/global kernels then take smaller tiles (their operands sit in registers).
"""
from __future__ import annotations

import importlib
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp

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


def jax_gpu_info_module():
    """jax's GPU-information module, wherever this jax keeps it (``jax._src.gpu_info`` from 0.12.1,
    ``jax._src.pallas.triton.gpu_info`` before), or None. Its ``registry`` maps a device kind to a
    ``GpuInfo``: deviceless lowering for a GPU (``benchmarks/compile_check.py``, the kernel tests)
    registers the CPU host's kind as the target GPU there, since the Triton lowering asks for it."""
    for name in ("jax._src.gpu_info", "jax._src.pallas.triton.gpu_info"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "registry"):
            return module
    return None


# jax_default_matmul_precision values whose float32 dots Triton multiplies exactly (IEEE FMA products).
EXACT_FLOAT32_PRECISIONS = ("float32", "highest", "f32_f32_f32")


def exact_float32_dots(dtype) -> bool:
    """Whether float32 dots traced now are exact: ``dtype`` is float32 and jax's default matmul
    precision (the ``jax.default_matmul_precision`` context's, else the global flag's) is "float32",
    "highest" or the F32_F32_F32 algorithm. Pallas Triton then multiplies with IEEE FMA products on
    CUDA cores, not TF32 tensor cores."""
    precision = jax.config.jax_default_matmul_precision
    return jnp.dtype(dtype) == jnp.float32 and str(precision).lower() in EXACT_FLOAT32_PRECISIONS


TRITON_MIN_CAPABILITY = (8, 0)  # XLA compiles Triton kernels for Ampere and newer only

# Opt-in shared memory per CUDA block by compute capability (CUDA C++ Programming Guide's technical
# specifications); any other NVIDIA GPU (8.6, 8.9, 12.x) has 99 KiB.
_SHARED_MEMORY_PER_BLOCK = {(8, 0): 163 << 10, (8, 7): 163 << 10, (9, 0): 227 << 10, (10, 0): 227 << 10,
                            (10, 3): 227 << 10}


def gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of JAX's default GPU; None off a GPU backend or where the device does not say
    (a ROCm GPU)."""
    if jax.default_backend() != "gpu":
        return None
    match = re.fullmatch(r"(\d+)\.(\d+)", str(getattr(jax.devices("gpu")[0], "compute_capability", "")))
    return (int(match[1]), int(match[2])) if match else None


def gpu_shared_memory_bytes() -> int:
    """Shared memory one CUDA block of JAX's default GPU may opt in to: 163 KiB on an A100, 227 KiB on
    Hopper and Blackwell data-centre GPUs, 99 KiB on other NVIDIA GPUs, 64 KiB on a GPU that does not
    give its compute capability (a ROCm GPU's LDS). Off a GPU (lowering for CUDA from a CPU host) an
    A100's."""
    if jax.default_backend() != "gpu":
        return _SHARED_MEMORY_PER_BLOCK[(8, 0)]
    capability = gpu_compute_capability()
    return 64 << 10 if capability is None else _SHARED_MEMORY_PER_BLOCK.get(capability, 99 << 10)


def triton_shared_memory_budget(request_ratio: dict[int, float] | None = None) -> int:
    """Bytes that one of our Triton kernels' shared memory estimates may reach on JAX's default GPU:
    its per-block opt-in (:func:`gpu_shared_memory_bytes`) less 5% for other Triton versions, divided
    by ``request_ratio[major compute capability]`` (default 1): each op's estimate is fitted to what an
    A100's Triton requests, and its table gives how much more the Triton of a newer architecture asked
    for the same tiles (measured per op; e.g. local/global's up to 1.62x on an H100, 1.71x on a B200)."""
    capability = gpu_compute_capability()
    ratio = (request_ratio or {}).get(capability[0], 1.0) if capability is not None else 1.0
    return int(0.95 * gpu_shared_memory_bytes() / ratio)


def triton_unsupported() -> str | None:
    """Why the Pallas Triton kernels cannot run here, or None when they can: this jax has no Pallas
    Triton backend, or JAX's default GPU is older than XLA's Triton supports."""
    if not triton_available():
        return f"jax {jax.__version__} no longer has the Pallas Triton backend (deprecated in jax 0.12)"
    capability = gpu_compute_capability()
    if capability is not None and capability < TRITON_MIN_CAPABILITY:
        return (f"XLA compiles Triton kernels for GPUs of compute capability 8.0 (Ampere) or newer only; "
                f"this {jax.devices('gpu')[0].device_kind} is {capability[0]}.{capability[1]}")
    return None


def triton_compiler_params(**kwargs):
    """``jax.experimental.pallas.triton.CompilerParams(**kwargs)`` for a compiled Triton kernel, or a
    ValueError that says what to use instead where the Triton kernels cannot run
    (:func:`triton_unsupported`)."""
    reason = triton_unsupported()
    if reason is not None:
        hint = (", or on a Hopper GPU bfloat16/float16 inputs that the Mosaic GPU kernels take (gpu_kernel="
                "'mosaic' names what they need)") if not triton_available() else ""
        raise ValueError(f"these inputs need the Pallas Triton kernels on this GPU, and {reason}; use "
                         f"implementation='xla', or implementation='auto' (which then falls back to it){hint}")
    return importlib.import_module("jax.experimental.pallas.triton").CompilerParams(**kwargs)


def on_hopper_gpu() -> bool:
    """True when JAX's default backend is a Hopper (sm90) GPU, where the Mosaic kernels are the default."""
    capability = gpu_compute_capability()
    return capability is not None and capability[0] == 9


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
