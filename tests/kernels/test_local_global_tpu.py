"""The TPU kernels of local_global_attention (``tpu_kernel.py``): in Pallas' TPU interpret mode on
CPU (simulated SMEM/VMEM, scalar prefetch, DMAs; the race detector raises on a race) against the
reference, forward and gradients; block skipping by segments; lowering for TPU; the TPU route."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxformers.kernels.local_global import tpu_kernel
from jaxformers.kernels.local_global.api import tpu_route
from jaxformers.kernels.local_global.blocks import q_major_table
from jaxformers.kernels.local_global.mask import MaskSpec
from jaxformers.kernels.local_global.pallas_kernel import local_global_attention_pallas
from jaxformers.kernels.local_global.reference import local_global_attention_reference
from tests.helpers import packed_segments


CASES = {  # mask options, batch, length, heads, kv heads, head dim, packed, dtype
    "packed-gqa": (dict(), 2, 300, 4, 2, 64, True, jnp.float32),
    "window-global-packed-d32": (dict(window=(40, 70), global_tokens=3), 1, 256, 2, 2, 32, True, jnp.float32),
    "chunk-causal": (dict(causal=True, chunk_size=32), 1, 256, 2, 1, 64, False, jnp.float32),
    "groups-bf16-d128": (dict(group_size=48), 1, 200, 2, 2, 128, True, jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tpu_kernels_match_reference(name):
    case, batch, length, heads, kv_heads, dim, packed, dtype = CASES[name]
    spec = MaskSpec(**case)
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, dim), dtype)
    k, v = (jax.random.normal(key, (batch, length, kv_heads, dim), dtype) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape, dtype)
    seg = packed_segments(batch, length) if packed else None
    ours = functools.partial(local_global_attention_pallas, spec=spec, segment_ids=seg, scale=0.2, backend="tpu",
                             interpret=pltpu.InterpretParams(detect_races=True))
    reference = functools.partial(local_global_attention_reference, spec=spec, segment_ids=seg, scale=0.2)
    out, vjp = jax.vjp(ours, q, k, v)
    want, want_vjp = jax.vjp(reference, *(x.astype(jnp.float32) for x in (q, k, v)))
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    for got, ref in zip((out, *vjp(cotangent)), (want, *want_vjp(cotangent.astype(jnp.float32)))):
        assert got.dtype == dtype and np.isfinite(np.asarray(got, np.float32)).all()  # outputs start as NaN
        peak = float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(np.asarray(got, np.float32) / peak, np.asarray(ref) / peak, atol=tol)
    if seg is not None:  # padding queries return exact zeros
        assert not np.any(np.asarray(out, np.float32)[np.asarray(seg) == 0])


def test_tpu_kernels_skip_blocks_that_share_no_segment():
    """The forward walks exactly the (query block, key block) pairs that share a non-zero segment."""
    length, block = 1024, tpu_kernel.BLOCK
    seg = np.zeros((1, length), np.int32)
    seg[0, :300], seg[0, 300:700], seg[0, 700:900] = 1, 2, 3  # then 124 padding tokens
    table, stride = q_major_table(MaskSpec(), jnp.asarray(seg), jnp.asarray(seg), block, block)
    rows = np.asarray(table)[: (length // block) * stride].reshape(-1, stride)
    blocks = [set(seg[0, i * block:(i + 1) * block]) - {0} for i in range(length // block)]
    want = [[j for j in range(len(blocks)) if blocks[i] & blocks[j]] for i in range(len(blocks))]
    got = [sorted(row[2:2 + row[0] + row[1]].tolist()) for row in rows]
    assert got == want
    assert sum(map(len, want)) == len(blocks) ** 2 // 2  # half of the 64 pairs are skipped


def test_tpu_kernels_lower_for_tpu(lower_as_v5e):
    """Forward, dQ and dK/dV lower through Pallas' Mosaic (TPU) rules from this CPU host."""
    for dim, case, kv_heads in [(64, dict(window=(32, 32), global_tokens=2), 2), (128, dict(causal=True), 4),
                                (32, dict(group_size=16), 1)]:
        spec = MaskSpec(**case)
        q = jax.ShapeDtypeStruct((2, 300, 4, dim), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((2, 300, kv_heads, dim), jnp.bfloat16)
        seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

        def step(q, k, v, seg):
            out, vjp = jax.vjp(lambda *a: local_global_attention_pallas(
                *a, spec, segment_ids=seg, scale=0.125, backend="tpu", interpret=False), q, k, v)
            return out, vjp(out)

        text = jax.jit(step).trace(q, kv, kv, seg).lower(lowering_platforms=("tpu",)).as_text()
        for name in ("local_global_tpu_fwd", "local_global_tpu_dq", "local_global_tpu_dkv"):
            assert name in text


def test_tpu_route():
    x = jnp.zeros((2, 512, 4, 64), jnp.bfloat16)
    seg = jnp.ones((2, 512), jnp.int32)
    assert tpu_route(x, x, x, None) == "splash"  # unpacked: splash
    assert tpu_route(x, x, x, seg) == "tpu_kernel"
    long = jnp.zeros((8, 1 << 16, 4, 64), jnp.bfloat16)  # the block table would overflow SMEM
    assert tpu_route(long, long, long, jnp.ones((8, 1 << 16), jnp.int32)) == "splash"
    assert tpu_kernel.fits(1, 4096, 4096, 64, 64, 2) and not tpu_kernel.fits(1, 1 << 20, 1 << 20, 128, 128, 2)
    # fits() pads a call's shapes as the wrapper does: 260 channels become 512 (a power of two), twice
    # the VMEM of 256, and 10200 rows become 10240 (128-row blocks).
    assert tpu_kernel.fits(1, 10200, 10200, 256, 256, 2) and not tpu_kernel.fits(1, 10200, 10200, 260, 260, 2)
