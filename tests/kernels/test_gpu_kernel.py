"""jaxformers.kernels.gpu_kernel: the Triton / Mosaic GPU choice shared by the kernel ops."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.kernels import bi_level_routing_attention, gpu_kernel, local_global_attention
from jaxformers.kernels.bi_level_routing import api as bra_api
from jaxformers.kernels.gpu_kernel import (ENV_VAR, GPU_KERNELS, gpu_kernel_choice, on_hopper_gpu, resolve_gpu_kernel,
                                           triton_available, triton_compiler_params)
from jaxformers.kernels.local_global import api as local_global_api


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


def _remove_triton(monkeypatch):
    """This process's jax as one without the Pallas Triton backend (deprecated in jax 0.12)."""
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # import -> ImportError


def test_triton_available(monkeypatch):
    """Every jax we test still has the Triton backend; removed, or its deprecation made an error
    (``jax._src.deprecations.accelerate``), it is gone, and a Triton launch says what to use instead."""
    assert triton_available()
    assert triton_compiler_params(num_warps=4, num_stages=2).num_warps == 4
    from jax._src import deprecations

    monkeypatch.setattr(deprecations, "is_accelerated", lambda name: name == "jax-pallas-triton")
    assert not triton_available()
    monkeypatch.undo()
    _remove_triton(monkeypatch)
    assert not triton_available()
    with pytest.raises(ValueError, match=r"no longer has the Pallas Triton backend .* use implementation='xla'"):
        triton_compiler_params(num_warps=4)


@pytest.mark.parametrize("hopper", [False, True])
def test_auto_on_a_gpu_without_triton(monkeypatch, hopper):
    """On a GPU whose jax has lost the Triton backend, ``implementation="auto"`` takes the Mosaic GPU
    kernels where they take the call (a Hopper GPU, bf16) and the XLA reference elsewhere, and
    ``"pallas"`` that needs Triton raises the clear error, not a lowering trace."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(gpu_kernel, "on_hopper_gpu", lambda: hopper)
    maps = jnp.asarray(np.random.default_rng(0).normal(size=(3, 1, 16, 16, 64)), jnp.bfloat16)
    seq = jnp.asarray(np.random.default_rng(1).normal(size=(3, 1, 64, 2, 32)), jnp.bfloat16)
    auto = {
        "bra": lambda x: bra_api._auto_implementation(*x, 2, 2, 2, "auto"),
        "local_global": lambda x: local_global_api._auto_implementation(*x, "auto"),
    }
    for name, x in (("bra", maps), ("local_global", seq)):
        assert auto[name](x) == "pallas"  # this jax has Triton
        assert auto[name](x.astype(jnp.float32)) == "pallas"
    _remove_triton(monkeypatch)
    for name, x in (("bra", maps), ("local_global", seq)):
        assert auto[name](x) == ("pallas" if hopper else "xla"), name
        assert auto[name](x.astype(jnp.float32)) == "xla", name  # the Mosaic GPU kernels are bf16/f16
    q, k, v = maps.astype(jnp.float32)
    out = bi_level_routing_attention(q, k, v, num_heads=2, regions_per_side=2, topk=2)
    ref = bi_level_routing_attention(q, k, v, num_heads=2, regions_per_side=2, topk=2, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    q, k, v = seq.astype(jnp.float32)
    out = local_global_attention(q, k, v, window=(8, 8))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(local_global_attention(q, k, v, window=(8, 8),
                                                                                     implementation="xla")))
    bra_api._pallas.clear_cache()
    local_global_api._pallas.clear_cache()
    with pytest.raises(ValueError, match="no longer has the Pallas Triton backend"):
        bi_level_routing_attention(*maps.astype(jnp.float32), num_heads=2, regions_per_side=2, topk=2,
                                   implementation="pallas")
    with pytest.raises(ValueError, match="no longer has the Pallas Triton backend"):
        local_global_attention(q, k, v, window=(8, 8), implementation="pallas")
