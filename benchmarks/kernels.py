"""Kernel benchmarks: our Pallas kernels against baselines measured in the same run.

    python benchmarks/kernels.py            # anchor shapes on GPU/TPU; tiny shapes elsewhere
    python benchmarks/kernels.py --small    # tiny shapes (CPU: Pallas in interpret mode, minutes)
    python benchmarks/kernels.py --only window,packed --repeats 50
    python benchmarks/kernels.py --small --check   # also compare each kernel with its reference

Rows (shapes from benchmarks/ANCHORS.md on an accelerator):

On a GPU, shapes the Hopper kernels support get two more rows: the Mosaic GPU and the Triton
kernels by name (``"pallas"`` is what ``auto`` picks on this device).

- dense: ``local_global_attention`` with no options vs XLA ``jax.nn.dot_product_attention`` and,
  on GPU, cuDNN.
- window: bidirectional ±256 sliding window (and + global tokens) vs XLA with a dense mask and vs
  dense cuDNN over the whole sequence (cuDNN refuses bidirectional windows).
- bra: bi-level routing attention (``jaxformers.kernels.bi_level_routing_attention``) Pallas vs the
  naive gather version (``implementation="xla"``), forward and forward+backward.
- packed: BERT-shaped attention where half the tokens are padding: packed rows with segment ids vs
  the same sequences padded (our kernel with a padding mask, and cuDNN/XLA with a mask). Throughput
  is counted in real tokens.

Each row prints the median time, achieved TFLOP/s (useful FLOPs: allowed query/key pairs only;
forward+backward counted as 3.5x forward) and GB/s (least bytes: inputs read once, outputs written
once), and the speedup over each baseline (baseline time / our time). On CPU the Pallas kernels
run in interpret mode: those timings check that the script works, they say nothing about speed.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.kernels import bi_level_routing_attention, local_global_attention
from jaxformers.kernels.bi_level_routing import mosaic_gpu as bra_mosaic
from jaxformers.kernels.bi_level_routing.api import BIFORMER_STAGE_SHAPES, attention_cost
from jaxformers.kernels.local_global import mosaic_gpu
from jaxformers.kernels.local_global.mask import MaskSpec, allowed, segments_allowed
from jaxformers.kernels.gpu_kernel import on_hopper_gpu


def timeit(fn: Callable, *args, repeats: int, round_seconds: float = 2e-3) -> float:
    """Median seconds per call of a jitted function after one warm-up (compile) call.

    Each of ``repeats`` rounds issues enough back-to-back calls to fill ``round_seconds`` and waits
    once, so that short kernels are timed with the device queue full, not with the host's dispatch
    and synchronisation latency added to every call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(1, min(100, int(round_seconds / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """Device copy bandwidth in bytes/s (bytes read + written) of a 1 GiB elementwise pass."""
    x = jax.random.normal(jax.random.key(0), (1 << 29,), jnp.bfloat16)
    seconds = timeit(jax.jit(lambda x: x + 1), x, repeats=repeats)
    return 2 * x.size * x.dtype.itemsize / seconds


def allowed_pairs(spec: MaskSpec, length: int, segment_ids: np.ndarray | None = None, rows: int = 1024) -> float:
    """Number of allowed (query, key) pairs summed over the batch (rows of the mask in chunks)."""
    total = 0.0
    k_pos = jnp.arange(length)[None, :]
    for start in range(0, length, rows):
        q_pos = jnp.arange(start, min(length, start + rows))[:, None]
        mask = allowed(spec, q_pos, k_pos)[None]
        if segment_ids is not None:
            seg = jnp.asarray(segment_ids)
            mask = mask & segments_allowed(seg[:, start:start + rows, None], seg[:, None, :])
        total += float(jnp.sum(mask, dtype=jnp.float32))
    return total


class Table:
    def __init__(self):
        print(f"{'row':<34} {'shape':<26} {'impl':<22} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8}  speedup")

    def row(self, name, shape, impl, seconds, flops, nbytes, baselines: dict[str, float] | None = None):
        ratios = "  ".join(f"{seconds_b / seconds:5.2f}x vs {b}" for b, seconds_b in (baselines or {}).items())
        print(f"{name:<34} {shape:<26} {impl:<22} {seconds * 1e3:9.3f} {flops / seconds / 1e12:8.2f} "
              f"{nbytes / seconds / 1e9:8.1f}  {ratios}", flush=True)


def _gpu_kernel_sets(mosaic_fits: bool) -> list[tuple[str, str]]:
    """(row label, ``gpu_kernel``) pairs: both kernel sets on a Hopper GPU when the Mosaic kernels
    take these inputs (auto picks Mosaic there), else the one that auto picks."""
    if mosaic_fits and on_hopper_gpu():
        return [("pallas mosaic (auto)", "mosaic"), ("pallas triton", "triton")]
    return [("pallas", "auto")]


def _qkv(shape, dtype, seed=0):
    """Random q, k, v and an output cotangent (the backward rows' incoming gradient)."""
    return tuple(jax.random.normal(key, shape, dtype) for key in jax.random.split(jax.random.key(seed), 4))


def _fwd_bwd(fn):
    """Two jitted functions of (q, k, v, cotangent): fn's output, and the q/k/v gradients (one
    forward and one backward pass, the cotangent pulled back through fn)."""
    fwd = jax.jit(lambda q, k, v, cotangent: fn(q, k, v))
    bwd = jax.jit(lambda q, k, v, cotangent: jax.vjp(fn, q, k, v)[1](cotangent))
    return fwd, bwd


def bench_attention(table, name, shape, spec_kwargs, *, dtype, repeats, on_gpu, backward,
                    dense_cudnn_baseline=True, mask_baseline=True):
    """One local/global attention shape: our kernel vs XLA-with-mask (and cuDNN dense on GPU)."""
    batch, length, heads, dim = shape
    args = _qkv(shape, dtype)
    q = args[0]
    spec = MaskSpec(**spec_kwargs)
    pairs = allowed_pairs(spec, length) * batch * heads
    flops = 4.0 * pairs * dim
    nbytes = 4.0 * q.size * q.dtype.itemsize
    ours = {impl: _fwd_bwd(functools.partial(local_global_attention, **spec_kwargs, implementation="pallas",
                                             gpu_kernel=kernel))
            for impl, kernel in _gpu_kernel_sets(mosaic_gpu.supported(*args[:3]))}
    reference = _fwd_bwd(lambda q, k, v: local_global_attention(q, k, v, **spec_kwargs, implementation="xla"))
    for impl, fns in ours.items():
        check(f"{name} {impl}", fns, reference, *args)
    base = {}
    if mask_baseline:
        mask = None if spec.is_dense else allowed(spec, jnp.arange(length)[:, None], jnp.arange(length)[None, :])
        xla_f, xla_b = _fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla"))
        base["xla" + ("" if mask is None else "+mask")] = (xla_f, xla_b)
    if on_gpu and dense_cudnn_baseline and dtype in (jnp.bfloat16, jnp.float16):
        cu_f, cu_b = _fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
        base["cudnn dense"] = (cu_f, cu_b)
    shape_s = "x".join(map(str, shape))
    for mode, index, mult in (("fwd", 0, 1.0), ("fwd+bwd", 1, 3.5))[: 2 if backward else 1]:
        times = {b: _try_time(fns[index], *args, repeats=repeats) for b, fns in base.items()}
        for impl, fns in ours.items():
            seconds = _try_time(fns[index], *args, repeats=repeats)
            if seconds is not None:
                table.row(f"{name} {mode}", shape_s, impl, seconds, flops * mult, nbytes * (2 if index else 1),
                          {b: t for b, t in times.items() if t is not None})


CHECK = {"on": False}  # --check: compare each of our kernels with its reference before timing


def check(label, ours, reference, *args, max_logits=2**31):
    """Prints the relative error (‖ours - ref‖ / ‖ref‖) of outputs and q/k/v gradients, or why not.

    ``ours``/``reference`` are (forward, gradient) pairs of jitted functions."""
    if not CHECK["on"]:
        return
    q = args[0]
    if q.size // q.shape[-1] * q.shape[1] > max_logits:
        print(f"  check {label}: skipped (the reference's score matrix is too large)")
        return
    try:
        rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) /  # noqa: E731
                                 (jnp.linalg.norm(b.astype(jnp.float32)) + 1e-30))
        errs = [rel(ours[0](*args), reference[0](*args))]
        errs += [rel(a, b) for a, b in zip(ours[1](*args), reference[1](*args))]
        bad = "" if all(e <= 2e-2 for e in errs) else " <-- MISMATCH"  # NaN fails too
        print(f"  check {label} vs reference (relative error): out {errs[0]:.1e}, dq {errs[1]:.1e}, "
              f"dk {errs[2]:.1e}, dv {errs[3]:.1e}{bad}")
    except Exception as e:
        print(f"  check {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")


def _try_time(fn, *args, repeats):
    try:
        return timeit(fn, *args, repeats=repeats)
    except Exception as e:  # a shape one implementation refuses (cuDNN limits) is reported, not fatal
        print(f"  (failed: {type(e).__name__}: {str(e).splitlines()[0][:100]})")
        return None


def bench_bra(table, shapes, *, dtype, repeats, backward, on_gpu=False, bandwidth=2.5e12):
    for batch, height, width, channels, heads, regions, topk in shapes:
        args = _qkv((batch, height, width, channels), dtype, seed=1)
        q, k, v = args[:3]
        cost = attention_cost(batch, height, width, channels, channels, regions, topk, q.dtype.itemsize)
        kw = dict(num_heads=heads, regions_per_side=regions, topk=topk)
        fns = {impl: _fwd_bwd(functools.partial(bi_level_routing_attention, **kw, implementation="pallas",
                                                gpu_kernel=kernel))
               for impl, kernel in _gpu_kernel_sets(
                   bra_mosaic.supported(q, k, v, num_heads=heads, regions_per_side=regions))}
        fns["xla"] = _fwd_bwd(functools.partial(bi_level_routing_attention, **kw, implementation="xla"))
        shape_s = f"{batch}x{height}x{width}x{channels} S{regions} k{topk}"
        ours_impls = [impl for impl in fns if impl != "xla"]
        for impl in ours_impls:
            check(f"bra {shape_s} {impl}", fns[impl], fns["xla"], *args)
        for mode, index, mult in (("fwd", 0, 1.0), ("fwd+bwd", 1, 3.5))[: 2 if backward else 1]:
            naive = _try_time(fns["xla"][index], *args, repeats=repeats)
            floor = cost["bytes"] * (2 if index else 1) / bandwidth
            for impl in ours_impls:
                ours = _try_time(fns[impl][index], *args, repeats=repeats)
                if ours is None:
                    continue
                table.row(f"bra {mode}", shape_s, impl, ours, cost["flops"] * mult, cost["bytes"] * (2 if index else 1),
                          {} if naive is None else {"xla naive gather": naive})
                if on_gpu:
                    print(f"  {ours / floor:.1f}x the memory floor ({floor * 1e3:.3f} ms at the measured "
                          f"{bandwidth / 1e12:.2f} TB/s)")


def validate_local_global(*, dtype, small: bool):
    """Odd shapes and masks the anchor rows miss (asymmetric windows, global tokens, causal, padded
    segments, groups, lengths no block divides): each kernel set's output and q/k/v gradients
    against the reference, untimed. Only with --check."""
    segments = np.zeros((2, 777), np.int32)
    segments[0, :300], segments[0, 300:700], segments[1] = 1, 2, 1  # row 0 ends in 77 padding tokens
    cases = [((2, 1000, 4, 64), dict(window=(100, 37), global_tokens=3)),
             ((2, 777, 2, 128), dict(window=(200, 0), causal=True, segment_ids=jnp.asarray(segments))),
             ((2, 600, 4, 32), dict(group_size=96))]
    if small:
        cases = [((1, 100, 2, 32), dict(window=(10, 3), global_tokens=3))]
    for shape, kwargs in cases:
        args = _qkv(shape, dtype, seed=2)
        reference = _fwd_bwd(functools.partial(local_global_attention, **kwargs, implementation="xla"))
        label = "validate " + "x".join(map(str, shape)) + " " + " ".join(
            f"{key}={'ids' if key == 'segment_ids' else value}" for key, value in kwargs.items())
        for impl, kernel in _gpu_kernel_sets(mosaic_gpu.supported(*args[:3])):
            ours = _fwd_bwd(functools.partial(local_global_attention, **kwargs, implementation="pallas",
                                              gpu_kernel=kernel))
            check(f"{label} {impl}", ours, reference, *args)


def packed_batch(rows: int, length: int, rng: np.random.Generator):
    """Sequences with lengths ~U[length/8, 7·length/8] (half padding when padded to ``length``),
    packed greedily into rows of ``length``. Returns (padded seg ids, packed seg ids, real tokens)."""
    lengths = rng.integers(length // 8, 7 * length // 8 + 1, size=rows)
    padded = np.zeros((rows, length), np.int32)
    for i, n in enumerate(lengths):
        padded[i, :n] = 1
    bins: list[list[int]] = []
    for n in sorted(lengths.tolist(), reverse=True):
        for b in bins:
            if sum(b) + n <= length:
                b.append(n)
                break
        else:
            bins.append([n])
    packed = np.zeros((len(bins), length), np.int32)
    for r, b in enumerate(bins):
        offset = 0
        for s, n in enumerate(b):
            packed[r, offset:offset + n] = s + 1
            offset += n
    return padded, packed, int(lengths.sum())


def bench_packed(table, rows, length, heads, dim, *, dtype, repeats, on_gpu):
    padded, packed, tokens = packed_batch(rows, length, np.random.default_rng(0))
    spec = MaskSpec()
    pairs = allowed_pairs(spec, length, padded) * heads
    flops, nbytes = 4.0 * pairs * dim, 4.0 * tokens * heads * dim * jnp.dtype(dtype).itemsize
    print(f"packed: {rows} sequences, {tokens} real tokens = {tokens / padded.size:.0%} of {rows}x{length}; "
          f"packed into {packed.shape[0]} rows")
    qp, kp, vp, _ = _qkv((rows, length, heads, dim), dtype)
    packed_args = _qkv((packed.shape[0], length, heads, dim), dtype)
    qk, kk, vk = packed_args[:3]
    seg_pad, seg_pack = jnp.asarray(padded), jnp.asarray(packed)
    ours_packed = jax.jit(lambda q, k, v: local_global_attention(q, k, v, segment_ids=seg_pack, implementation="pallas"))
    ours_padded = jax.jit(lambda q, k, v: local_global_attention(q, k, v, segment_ids=seg_pad, implementation="pallas"))
    key_mask = (seg_pad != 0)[:, None, None, :]
    xla_padded = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=key_mask, implementation="xla"))
    base = {"padded pallas": _try_time(ours_padded, qp, kp, vp, repeats=repeats),
            "padded xla": _try_time(xla_padded, qp, kp, vp, repeats=repeats)}
    if on_gpu and dtype in (jnp.bfloat16, jnp.float16):
        lengths = jnp.asarray(padded.sum(1), jnp.int32)  # cuDNN's own variable-length path
        cudnn_padded = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation="cudnn"))
        base["padded cudnn"] = _try_time(cudnn_padded, qp, kp, vp, repeats=repeats)
    if jax.default_backend() == "tpu":  # packed TPU calls ran on splash before: no segment skipping
        from jaxformers.kernels.local_global.splash_tpu import local_global_attention_splash

        splash_packed = jax.jit(lambda q, k, v: local_global_attention_splash(
            q, k, v, spec, segment_ids=seg_pack, scale=dim ** -0.5))
        base["packed splash"] = _try_time(splash_packed, qk, kk, vk, repeats=repeats)
    check("packed", _fwd_bwd(ours_packed), _fwd_bwd(lambda q, k, v: local_global_attention(
        q, k, v, segment_ids=seg_pack, implementation="xla")), *packed_args)
    ours = _try_time(ours_packed, qk, kk, vk, repeats=repeats)
    if ours is None:
        return
    table.row("packed BERT attention fwd", f"{rows}x{length}x{heads}x{dim}", "pallas packed", ours, flops, nbytes,
              {b: t for b, t in base.items() if t is not None})
    print(f"  real tokens/s: packed {tokens / ours:,.0f}" + "".join(
        f", {b} {tokens / t:,.0f}" for b, t in base.items() if t is not None))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    accelerator = jax.default_backend() in ("gpu", "tpu")
    parser.add_argument("--small", action="store_true", default=not accelerator,
                        help="tiny shapes (default off GPU/TPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (median)")
    parser.add_argument("--only", default="dense,window,bra,packed", help="comma-separated row groups")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=accelerator,
                        help="compare each kernel (output and q/k/v gradients) with its reference before "
                             "timing it (default on GPU/TPU; on CPU the tests do this)")
    args = parser.parse_args(argv)
    CHECK["on"] = args.check
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    repeats = args.repeats or (3 if args.small else 20)
    groups = set(args.only.split(","))
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{args.dtype}, {'small' if args.small else 'anchor'} shapes, median of {repeats}")
    if not accelerator:
        print("no accelerator: Pallas runs in interpret mode; these times say nothing about kernel speed")
    bandwidth = 2.5e12  # the H100's measured copy bandwidth (benchmarks/ANCHORS.md) when not measured here
    if accelerator:
        bandwidth = copy_bandwidth(repeats)
        print(f"device copy bandwidth (read + write, 1 GiB bf16): {bandwidth / 1e12:.2f} TB/s")
    table = Table()
    if "dense" in groups:
        shapes = [(2, 100, 2, 32)] if args.small else [
            (256, 197, 6, 64), (8, 4096, 16, 64), (8, 4096, 16, 128), (2, 16384, 16, 64)]
        for shape in shapes:
            bench_attention(table, "dense", shape, {}, dtype=dtype, repeats=repeats, on_gpu=on_gpu,
                            backward=False, dense_cudnn_baseline=True)
    if "window" in groups and CHECK["on"]:
        validate_local_global(dtype=dtype, small=args.small)
    if "window" in groups:
        cases = [((1, 512, 2, 32), 32)] if args.small else [((8, 4096, 16, 64), 256), ((2, 16384, 16, 64), 256)]
        for shape, w in cases:
            bench_attention(table, f"window ±{w}", shape, {"window": (w, w)}, dtype=dtype, repeats=repeats,
                            on_gpu=on_gpu, backward=True, mask_baseline=shape[1] <= 16384)
        shape, w = cases[-1]
        bench_attention(table, f"window ±{w} + 16 global", shape, {"window": (w, w), "global_tokens": 16},
                        dtype=dtype, repeats=repeats, on_gpu=on_gpu, backward=False)
    if "bra" in groups:
        shapes = [(2, 14, 14, 64, 2, 7, 4)] if args.small else [tuple(s) for s in BIFORMER_STAGE_SHAPES]
        bench_bra(table, shapes, dtype=dtype, repeats=repeats, backward=True, on_gpu=on_gpu,
                  bandwidth=bandwidth)
    if "packed" in groups:
        rows, length = (8, 128) if args.small else (64, 512)
        bench_packed(table, rows, length, 4 if args.small else 12, 64, dtype=dtype, repeats=repeats, on_gpu=on_gpu)


if __name__ == "__main__":
    main()
