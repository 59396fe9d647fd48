"""jaxformers.kernels.gpu_kernel: the Triton / Mosaic GPU choice shared by the kernel ops."""
import functools
import math
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
from jaxformers.kernels.local_global.mask import MaskSpec
from tests.helpers import on_fake_gpu


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
    on_fake_gpu(monkeypatch, "9.0" if hopper else "8.0")
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


def test_shared_memory_of_the_gpu(monkeypatch):
    """Compute capability and opt-in shared memory per block of the default GPU (CUDA's tables)."""
    assert gpu_kernel.gpu_compute_capability() is None  # CPU
    assert gpu_kernel.gpu_shared_memory_bytes() == 163 << 10  # lowering for CUDA from a CPU host: an A100's
    ratios = {9: 1.5, 10: 2.0}  # an op's measured requests over its A100-fitted estimate, by major version
    for capability, kib, ratio in (("8.0", 163, 1), ("8.9", 99, 1), ("8.6", 99, 1), ("9.0", 227, 1.5),
                                   ("10.0", 227, 2.0), ("12.0", 99, 1), (None, 64, 1)):
        on_fake_gpu(monkeypatch, capability)
        assert gpu_kernel.gpu_shared_memory_bytes() == kib << 10, capability
        assert gpu_kernel.triton_shared_memory_budget() == int(0.95 * kib * 1024), capability
        assert gpu_kernel.triton_shared_memory_budget(ratios) == int(0.95 * kib * 1024 / ratio), capability
        assert gpu_kernel.on_hopper_gpu() == (capability == "9.0")
    on_fake_gpu(monkeypatch, "8.9")
    assert gpu_kernel.gpu_compute_capability() == (8, 9)


def test_auto_on_a_gpu_older_than_ampere(monkeypatch):
    """XLA compiles Triton kernels for Ampere and newer only: on a T4 (a free Colab GPU) "auto" takes
    the reference for both ops, and "pallas" raises a clear error instead of XLA's."""
    on_fake_gpu(monkeypatch, "7.5", "Tesla T4")
    reason = gpu_kernel.triton_unsupported()
    assert "compute capability 8.0" in reason and "Tesla T4 is 7.5" in reason
    maps = jnp.asarray(np.random.default_rng(0).normal(size=(3, 1, 16, 16, 64)), jnp.float32)
    seq = jnp.asarray(np.random.default_rng(1).normal(size=(3, 1, 64, 2, 32)), jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        assert bra_api._auto_implementation(*maps.astype(dtype), 2, 2, 2, "auto") == "xla"
        assert local_global_api._auto_implementation(*seq.astype(dtype), "auto") == "xla"
    out = bi_level_routing_attention(*maps, num_heads=2, regions_per_side=2, topk=2)
    ref = bi_level_routing_attention(*maps, num_heads=2, regions_per_side=2, topk=2, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    out = local_global_attention(*seq, window=(8, 8))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(local_global_attention(*seq, window=(8, 8),
                                                                                     implementation="xla")))
    bra_api._pallas.clear_cache()
    local_global_api._pallas.clear_cache()
    with pytest.raises(ValueError, match=r"compute capability 8.0 \(Ampere\) or newer only.*implementation='xla'"):
        bi_level_routing_attention(*maps, num_heads=2, regions_per_side=2, topk=2, implementation="pallas")
    with pytest.raises(ValueError, match=r"compute capability 8.0 \(Ampere\) or newer only"):
        local_global_attention(*seq, window=(8, 8), implementation="pallas")


# Shared memory that jax 0.11.2's Triton requested for an A100 (compiled for a GPU with too little,
# whose error names the request): local/global (kernel, block_q, block_k, head dim, itemsize) and
# BRA (tokens per region, regions per step, head dim, itemsize).
LOCAL_GLOBAL_REQUESTS = {("fwd", 128, 64, 128, 2): 65792, ("dq", 64, 64, 128, 2): 73984,
                         ("dkv", 64, 64, 128, 2): 107008, ("dkv", 64, 64, 256, 2): 205312,
                         ("fwd", 64, 64, 128, 4): 114944, ("dkv", 32, 32, 128, 4): 65924,
                         ("dq", 32, 32, 256, 4): 131200, ("fwd", 16, 32, 64, 2): 11264}
BRA_REQUESTS = {(64, 1, 128, 4): 147968, (64, 1, 128, 2): 74240, (256, 1, 32, 4): 133120, (16, 4, 32, 2): 12800,
                (64, 2, 64, 2): 50688}


# The largest requests over the estimates measured on newer GPUs (same method), by major compute capability.
LOCAL_GLOBAL_NEWER = {9: {("fwd", 64, 64, 256, 2): 164096, ("dkv", 128, 64, 256, 4): 689664},
                      10: {("dkv", 128, 64, 256, 2): 477248, ("dkv", 128, 64, 256, 4): 690208}}
BRA_NEWER = {9: {(256, 1, 256, 2): 657408, (256, 1, 256, 4): 1312768},
             10: {(256, 1, 256, 2): 919600, (64, 1, 128, 2): 115248, (256, 1, 256, 4): 1312816}}


def test_triton_shared_memory_estimates_bound_the_requests():
    """Each op's estimate bounds what an A100's Triton asked (by at most 35% over); times the op's
    ``TRITON_REQUEST_RATIO`` it bounds what an H100's and a B200's asked for the same kernels."""
    from jaxformers.kernels.bi_level_routing import pallas_kernel as bra
    from jaxformers.kernels.local_global import blocks

    for args, request in LOCAL_GLOBAL_REQUESTS.items():
        assert request <= blocks.triton_shared_memory(*args) <= 1.35 * request, args
    for args, request in BRA_REQUESTS.items():
        assert request <= bra.triton_shared_memory(*args) <= 1.35 * request, args
    for estimate, ratios, newer in ((blocks.triton_shared_memory, blocks.TRITON_REQUEST_RATIO, LOCAL_GLOBAL_NEWER),
                                    (bra.triton_shared_memory, bra.TRITON_REQUEST_RATIO, BRA_NEWER)):
        for major, requests in newer.items():
            for args, request in requests.items():
                assert estimate(*args) < request <= ratios[major] * estimate(*args), (major, args)


def test_exact_float32_dots_follow_the_default_matmul_precision():
    """float32 dots are exact under "float32"/"highest" (the context's or the flag's) and the F32_F32_F32
    algorithm; TF32 by default and under the other values; other dtypes never."""
    for precision, exact in ((None, False), ("default", False), ("tensorfloat32", False), ("bfloat16", False),
                             ("TF32_TF32_F32_X3", False), ("float32", True), ("highest", True), ("F32_F32_F32", True)):
        with jax.default_matmul_precision(precision):
            assert gpu_kernel.exact_float32_dots(jnp.float32) == exact, precision
            assert not gpu_kernel.exact_float32_dots(jnp.bfloat16)
    previous = jax.config.jax_default_matmul_precision  # the tests' conftest sets "highest" globally
    try:
        jax.config.update("jax_default_matmul_precision", "highest")
        assert gpu_kernel.exact_float32_dots(jnp.float32)
        jax.config.update("jax_default_matmul_precision", None)
        assert not gpu_kernel.exact_float32_dots(jnp.float32)
    finally:
        jax.config.update("jax_default_matmul_precision", previous)


def test_local_global_triton_tiles_follow_the_gpu(monkeypatch):
    """Tiles shrink where the defaults exceed the GPU's shared memory (head dim 128 on an L4's 99 KiB)
    or the register bound (head dim 256); unchanged for head dims up to 128 on A100/H100/B200."""
    from jaxformers.kernels.local_global.blocks import (EXACT_FLOAT32_GPU_BLOCKS, FLOAT32_GPU_BLOCKS,
                                                        TRITON_REQUEST_RATIO, BlockSizes, triton_blocks,
                                                        triton_shared_memory)

    ratio = TRITON_REQUEST_RATIO
    a100, h100, b200, l4 = (int(0.95 * (kib << 10) / f) for kib, f in ((163, 1), (227, ratio[9]), (227, ratio[10]),
                                                                       (99, 1)))
    for budget in (a100, h100, b200):
        for dim in (32, 64, 128):
            assert triton_blocks(2, dim, budget) == BlockSizes() and triton_blocks(4, dim, budget) == FLOAT32_GPU_BLOCKS
    for budget in (a100, h100, b200, l4):  # exact float32 dots: the small tiles everywhere; bf16 ignores the flag
        for dim in (32, 64, 128):
            assert triton_blocks(4, dim, budget, exact_float32=True) == EXACT_FLOAT32_GPU_BLOCKS
            assert triton_blocks(2, dim, budget, exact_float32=True) == triton_blocks(2, dim, budget)
    assert triton_blocks(2, 128, l4) == BlockSizes(128, 64, 64, 32)
    assert triton_blocks(4, 128, l4) == BlockSizes(64, 32, 32, 32)
    assert triton_blocks(2, 256, a100) == BlockSizes(64, 64, 32, 32)
    assert triton_blocks(4, 256, a100) == BlockSizes(32, 32, 16, 16)
    assert triton_blocks(4, 512, l4) is None
    for budget in (a100, h100, b200, l4):
        for itemsize, dim in ((2, 32), (2, 128), (2, 256), (4, 64), (4, 256)):
            blocks = triton_blocks(itemsize, dim, budget)
            assert triton_shared_memory("fwd", blocks.block_q, blocks.block_k, dim, itemsize) <= budget
            for kernel in ("dq", "dkv"):
                assert triton_shared_memory(kernel, blocks.block_q_bwd, blocks.block_k_bwd, dim, itemsize) <= budget

    from jaxformers.kernels.local_global.pallas_kernel import local_global_attention_pallas

    def grids(dim, dtype=jnp.bfloat16):  # programs of the forward, dQ and dK/dV kernels
        x = jnp.zeros((1, 256, 2, dim), dtype)
        fn = functools.partial(local_global_attention_pallas, spec=MaskSpec(window=(32, 32)), scale=0.125,
                               interpret=False, gpu_kernel="triton")
        jaxpr = jax.make_jaxpr(lambda x: jax.vjp(lambda *a: fn(*a), x, x, x)[1](x))(x)
        return [math.prod(e.params["grid_mapping"].grid) for e in jaxpr.eqns if e.primitive.name == "pallas_call"]

    on_fake_gpu(monkeypatch, "8.0", "NVIDIA A100-SXM4-80GB")
    on_a100 = grids(128)
    on_fake_gpu(monkeypatch, "8.9", "NVIDIA L4")
    assert grids(128) == on_a100[:2] + [2 * on_a100[2]]  # dK/dV: 32- instead of 64-key tiles
    x = jnp.zeros((1, 64, 2, 512), jnp.float32)
    assert local_global_api._auto_implementation(x, x, x, "auto") == "xla"
    with pytest.raises(ValueError, match=r"head dims 512/512 in float32 take too much shared memory \(this GPU has 99"):
        grids(512, jnp.float32)


def test_bra_triton_kernels_refuse_regions_too_large_for_the_gpu(monkeypatch):
    """A region is one query tile: 8x8-token regions at head dim 128 in float32 need ~150 KiB, which an
    A100 and an H100 hold and an L4 does not, nor a B200 by our bound (its Triton asks up to 1.6x an
    A100's); "auto" then takes the reference. BiFormer's shapes fit all four."""
    from jaxformers.kernels.bi_level_routing.pallas_kernel import triton_fits

    big = jnp.zeros((1, 16, 16, 256), jnp.float32)  # 2x2 regions of 8x8 tokens, 2 heads of 128
    biformer = jnp.zeros((1, 56, 56, 64), jnp.bfloat16)  # stage 1: 7x7 regions of 8x8 tokens, head dim 32
    for capability, fits in (("8.0", True), ("9.0", True), ("8.9", False), ("10.0", False)):
        on_fake_gpu(monkeypatch, capability)
        assert triton_fits(big, big, big, num_heads=2, regions_per_side=2, topk=2) == fits
        assert bra_api._auto_implementation(big, big, big, 2, 2, 2, "auto") == ("pallas" if fits else "xla")
        assert triton_fits(biformer, biformer, biformer, num_heads=2, regions_per_side=7, topk=1)
    with pytest.raises(ValueError, match=r"regions of 8x8 tokens at head dim 128 in float32 need ~\d+ KiB of shared"):
        bi_level_routing_attention(big, big, big, num_heads=2, regions_per_side=2, topk=2, implementation="pallas")
