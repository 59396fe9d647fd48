"""Both ops' kernels on randomly drawn configurations against the reference, forward and gradients
(a random cotangent): local/global over lengths 1-299, windows (sides None or wider than the
sequence), global tokens (more than the length too), groups, causal and chunk-causal masks, packed
segments with empty ids and padding, grouped-query heads, unequal q/v head dims; BRA over 1-5 regions
per side, regions of 1-6 x 1-6 tokens, 1-3 heads, unequal q/v head dims, any top-k. In interpret
mode on CPU: the Triton kernels, the TPU kernels and (jax >= 0.11) the Mosaic GPU kernels.

CI runs a few fixed seeds per kernel set. A wider campaign after a kernel change (~5-15 s a case):
``JAXFORMERS_RANDOM_CASES=50 JAXFORMERS_RANDOM_SEED=1000 pytest -n 2 tests/kernels/test_random_configs.py``.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxformers.kernels.bi_level_routing.pallas_kernel import bi_level_routing_attention_pallas
from jaxformers.kernels.bi_level_routing.reference import bi_level_routing_attention_reference
from jaxformers.kernels.local_global.mask import MaskSpec
from jaxformers.kernels.local_global.pallas_kernel import local_global_attention_pallas
from jaxformers.kernels.local_global.reference import local_global_attention_reference
from tests.helpers import needs_mosaic_gpu_interpreter

CASES = int(os.environ.get("JAXFORMERS_RANDOM_CASES", "0"))
SEED = int(os.environ.get("JAXFORMERS_RANDOM_SEED", "0"))


def _seeds(ci_seeds: list[int], base: int) -> list[int]:
    """CI's seeds (chosen to cover the options between them), or ``CASES`` consecutive seeds from
    ``base + SEED``."""
    return list(range(base + SEED, base + SEED + CASES)) if CASES else ci_seeds


def _segments(rng, batch: int, length: int) -> jax.Array:
    """Packed rows: runs of random length, some padding (0) runs, skipped ids, sometimes a padded tail."""
    seg = np.zeros((batch, length), np.int32)
    for row in range(batch):
        pos, next_id = 0, 1
        while pos < length:
            run = int(rng.integers(0, max(2, length // 2)))
            next_id += int(rng.random() < 0.15)  # an id no token has: an empty segment
            seg[row, pos:pos + run] = next_id if rng.random() > 0.15 else 0
            pos, next_id = pos + run, next_id + 1
        if rng.random() < 0.5:
            seg[row, int(rng.integers(0, length)):] = 0
    return jnp.asarray(seg)


def _local_global_case(seed: int, mosaic: bool):
    rng = np.random.default_rng(seed)
    length, batch = int(rng.integers(1, 300)), int(rng.integers(1, 3))
    kv_heads, rep = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    if mosaic:  # bf16/f16 and head dims 32, 64, 128 only
        dim = dim_v = int(rng.choice([32, 64, 128]))
    else:
        dim = int(rng.choice([16, 32, 40, 64, 128]))
        dim_v = dim if rng.random() < 0.7 else int(rng.choice([24, 64]))

    def side():
        return None if rng.random() < 0.2 else int(rng.integers(0, length + 20))

    causal = bool(rng.random() < 0.35)
    spec = MaskSpec(window=(side(), side()) if rng.random() < 0.6 else None,
                    global_tokens=int(rng.integers(1, length + 4)) if rng.random() < 0.35 else 0,
                    group_size=int(rng.integers(1, length + 5)) if rng.random() < 0.3 else None,
                    causal=causal, chunk_size=int(rng.integers(1, length + 5)) if causal and rng.random() < 0.4 else None)
    seg = _segments(rng, batch, length) if rng.random() < 0.45 else None
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(batch, length, kv_heads * rep, dim), (batch, length, kv_heads, dim), (batch, length, kv_heads, dim_v),
              (batch, length, kv_heads * rep, dim_v)]
    arrays = [jax.random.normal(key, shape) for key, shape in zip(keys, shapes)]
    return spec, seg, float(rng.uniform(0.05, 0.3)), arrays


def _bra_case(seed: int, mosaic: bool):
    rng = np.random.default_rng(seed)
    heads, batch = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    if mosaic:  # regions of 1..32 tokens dividing 64 or a multiple of 64; head dims 32, 64, 128
        side_count = int(rng.integers(1, 4))
        region = [(1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (2, 16), (1, 8)][int(rng.integers(0, 9))]
        dim = dim_v = int(rng.choice([32, 64, 128]))
    else:
        side_count = int(rng.integers(1, 6))
        region = (int(rng.integers(1, 7)), int(rng.integers(1, 7)))
        dim = int(rng.choice([8, 16, 24, 32, 64]))
        dim_v = dim if rng.random() < 0.6 else int(rng.choice([8, 16, 48]))
    regions = side_count * side_count
    topk = int(rng.integers(1, regions + 1)) if rng.random() < 0.8 else regions
    height, width = side_count * region[0], side_count * region[1]
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(batch, height, width, heads * d) for d in (dim, dim, dim_v, dim_v)]
    arrays = [jax.random.normal(key, shape) for key, shape in zip(keys, shapes)]
    options = dict(num_heads=heads, regions_per_side=side_count, topk=topk, scale=float(rng.uniform(0.05, 0.4)))
    return options, arrays


def _check_against_reference(kernel, reference, arrays, dtype, describe):
    """Output and (q, k, v) gradients for one random cotangent, relative to the reference's largest
    entry (at least 0.05: where every query sees one key, dQ is exactly zero and float32 rounding
    leaves ~1e-5)."""
    q, k, v, cotangent = (a.astype(dtype) for a in arrays)
    out, vjp = jax.vjp(kernel, q, k, v)
    got = (out, *vjp(cotangent))
    f32 = [t.astype(jnp.float32) for t in (q, k, v, cotangent)]
    out, vjp = jax.vjp(reference, *f32[:3])
    want = (out, *vjp(f32[3]))
    tolerance = 3e-2 if dtype == jnp.bfloat16 else 2e-4
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.shape == b.shape and np.all(np.isfinite(a)), (name, describe)
        error = np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 0.05)
        assert error <= tolerance, f"{name}: relative error {error:.3g} for {describe}"


def _run_local_global(seed: int, kernel_set: str, dtype) -> None:
    spec, seg, scale, arrays = _local_global_case(seed, kernel_set == "mosaic")
    options = {"triton": dict(gpu_kernel="triton"), "mosaic": dict(gpu_kernel="mosaic"),
               "tpu": dict(backend="tpu", interpret=True)}[kernel_set]
    _check_against_reference(
        lambda q, k, v: local_global_attention_pallas(q, k, v, spec, segment_ids=seg, scale=scale, **options),
        lambda q, k, v: local_global_attention_reference(q, k, v, spec, segment_ids=seg, scale=scale),
        arrays, dtype, f"seed {seed}: {spec}, shapes {[a.shape for a in arrays[:3]]}, packed {seg is not None}")


def _run_bra(seed: int, kernel_set: str, dtype) -> None:
    options, arrays = _bra_case(seed, kernel_set == "mosaic")
    kernel_options = {"triton": dict(layout="gpu", gpu_kernel="triton", poison=True),
                      "mosaic": dict(gpu_kernel="mosaic"),
                      "tpu": dict(layout="tpu", interpret=pltpu.InterpretParams(), poison=True)}[kernel_set]
    _check_against_reference(
        lambda q, k, v: bi_level_routing_attention_pallas(q, k, v, **options, **kernel_options),
        lambda q, k, v: bi_level_routing_attention_reference(q, k, v, **options),
        arrays, dtype, f"seed {seed}: {options}, shapes {[a.shape for a in arrays[:3]]}")


RUNS = {"local_global": _run_local_global, "bra": _run_bra}
# (op, kernel set, dtype, CI's seeds, the campaign's first seed)
PLAN = [("local_global", "triton", jnp.float32, [1, 3, 5], 0), ("local_global", "triton", jnp.bfloat16, [302], 300),
        ("local_global", "tpu", jnp.float32, [100], 100), ("local_global", "mosaic", jnp.bfloat16, [11], 10),
        ("bra", "triton", jnp.float32, [1000, 1003, 1005], 1000), ("bra", "tpu", jnp.float32, [1101], 1100),
        ("bra", "mosaic", jnp.bfloat16, [1202], 1200)]


def _params(mosaic: bool) -> list:
    return [pytest.param(op, kernel_set, dtype, seed, id=f"{op}-{kernel_set}-{jnp.dtype(dtype).name}-{seed}")
            for op, kernel_set, dtype, ci_seeds, base in PLAN if (kernel_set == "mosaic") == mosaic
            for seed in _seeds(ci_seeds, base)]


@pytest.mark.parametrize("op,kernel_set,dtype,seed", _params(mosaic=False))
def test_triton_and_tpu_kernels_match_the_reference(op, kernel_set, dtype, seed):
    RUNS[op](seed, kernel_set, dtype)


@needs_mosaic_gpu_interpreter
@pytest.mark.parametrize("op,kernel_set,dtype,seed", _params(mosaic=True))
def test_mosaic_gpu_kernels_match_the_reference(op, kernel_set, dtype, seed):
    RUNS[op](seed, kernel_set, dtype)
