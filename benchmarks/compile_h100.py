"""Compile every GPU kernel, and BiFormer-T's train step, for an H100 on a host that has none.

    make compile-h100        # a venv with jax[cuda13] at the GPU machines' jax (~5 GB), then this script
    python benchmarks/compile_h100.py --only bra,train      # in such a venv

Deviceless ahead-of-time compilation: the CUDA plugin describes an H100 from a target config (no
GPU, no driver needed) and ``jit(...).lower(...).compile()`` runs XLA's whole GPU pipeline for it:
Triton kernels to cubin, Mosaic GPU kernels through their MLIR passes, PTX and ptxas. What a first
device session would otherwise learn at compile time (a kernel over the shared-memory budget, an
op a lowering rejects, a ptxas error, register spills, a train step too big for 80 GB) costs no
device time here. Nothing runs: no numerics and no timings (``benchmarks/kernels.py`` has those).

Rows: the shapes of ``benchmarks/kernels.py`` (``shared/anchors.md``), forward + backward, once per
GPU kernel set (``gpu_kernel="mosaic"`` and ``"triton"``). Each row prints the kernels in the
compiled program and, for Mosaic GPU kernels, ptxas' registers per thread, spill bytes and the
shared memory each reserves (Mosaic GPU's compiler dumps). The train step (BiFormer-T on our kernels by
default) prints XLA's memory analysis against the H100's memory. Exit status 1 if anything failed to compile.

Our ops choose kernels by ``jax.default_backend()`` and the GPU's compute capability; this script
makes those answer "gpu" and the compile-only H100 (it runs nothing else, so nothing else sees it).
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DUMP = {"dir": ""}  # Mosaic GPU's compiler dumps land here (set by main)

# XLA's GpuTargetConfig of an H100 SXM (132 SMs, 227 KiB opt-in shared memory per block, 50 MiB L2,
# 3.35 TB/s, 80 GB): what the compiler would otherwise ask the device.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
H100_MEMORY = int(re.search(r"device_memory_size: (\d+)", H100_TARGET_CONFIG).group(1))


def compile_only_h100():
    """The compile-only H100 device, with our kernel dispatch and Pallas' Triton lowering pointed at it."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG, topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - no CUDA plugin, or one without deviceless topologies
        raise SystemExit(f"cannot describe an H100 without one ({type(e).__name__}: {e}); install "
                         "jax[cuda13] at the GPU machines' jax version (make compile-h100)") from e
    device = topology.devices[0]
    host_devices = jax.devices
    jax.default_backend = lambda: "gpu"
    jax.devices = lambda backend=None: [device] if backend in ("gpu", "cuda") else host_devices(backend)
    try:  # newer Pallas reads the GPU generation for its Triton lowering from the default (host) device
        from jax._src.pallas.triton import gpu_info
    except ImportError:
        return device
    gpu_info.registry[host_devices()[0].device_kind] = lambda: gpu_info.get_gpu_info_from_version(
        gpu_info.GpuVersion.H100)
    return device


def ptxas_report() -> list[str]:
    """One line per Mosaic GPU kernel compiled since the last call, identical ones counted once (then
    the dumps are removed): ptxas' registers per thread and spill bytes, and the shared memory."""
    seen = Counter()
    for path in sorted(Path(DUMP["dir"]).glob("*.ptxas")):
        text = path.read_text()
        regs = re.search(r"Used (\d+) registers", text)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        resources = path.with_suffix(".resources.txt")
        smem = re.search(r"smem_scratch_bytes=(\d+)", resources.read_text()) if resources.exists() else None
        seen[(path.stem.rsplit("_", 1)[0], regs.group(1) if regs else "?",
              f"{spills.group(1)}/{spills.group(2)}" if spills else "?",
              str(int(smem.group(1)) // 1024) if smem else "?")] += 1
    for path in Path(DUMP["dir"]).iterdir():
        path.unlink()
    return [f"    {name:<26} x{n:<3} {regs:>4} registers  spills {spill:>7} B (st/ld)  shared memory {smem:>4} KiB"
            for (name, regs, spill, smem), n in sorted(seen.items())]


def kernels_in(compiled) -> str:
    counts = Counter(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))
    names = {"__gpu$xla.gpu.triton": "triton", "mosaic_gpu_v2": "mosaic", "mosaic_gpu": "mosaic"}
    found = Counter()
    for target, n in counts.items():
        found[names.get(target, "cudnn" if "cudnn" in target else None)] += n
    found.pop(None, None)
    return ", ".join(f"{n} {kind}" for kind, n in sorted(found.items())) or "no custom kernels"


def fwd_bwd(fn):
    """q, k, v -> (out, grads of sum(out)): the forward and every backward kernel in one program."""
    def both(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(jnp.ones_like(out))
    return both


FAILED: list[str] = []


def compile_row(label: str, lower: Callable[[], Any]):
    """Compiles ``lower()``'s program and prints what it holds; the compiled program, or None on failure."""
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except Exception as e:  # noqa: BLE001 - a failure is the finding; report it and go on
        FAILED.append(label)
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        ptxas_report()
        return None
    print(f"ok   {label:<58} {time.perf_counter() - start:5.1f}s  {kernels_in(compiled)}", flush=True)
    for line in ptxas_report():
        print(line, flush=True)
    return compiled


def kernel_rows(device, groups: set[str]) -> None:
    from jaxformers.kernels import bi_level_routing_attention, local_global_attention
    from jaxformers.kernels.bi_level_routing.api import BIFORMER_STAGE_SHAPES

    sharding = jax.sharding.SingleDeviceSharding(device)

    def arrays(*shapes, dtype=jnp.bfloat16):
        return [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]

    for kernel in ("mosaic", "triton"):
        if "bra" in groups:
            for batch, height, width, channels, heads, regions, topk in BIFORMER_STAGE_SHAPES:
                fn = functools.partial(bi_level_routing_attention, num_heads=heads, regions_per_side=regions,
                                       topk=topk, implementation="pallas", gpu_kernel=kernel)
                args = arrays(*[(batch, height, width, channels)] * 3)
                compile_row(f"bra {batch}x{height}x{width}x{channels} S{regions} k{topk} [{kernel}]",
                            lambda: jax.jit(fwd_bwd(fn)).lower(*args))
        attention = []
        if "dense" in groups:
            attention += [("dense", s, {}) for s in [(256, 197, 6, 64), (8, 4096, 16, 64), (8, 4096, 16, 128)]]
        if "window" in groups:
            attention += [("window ±256", s, {"window": (256, 256)}) for s in [(8, 4096, 16, 64), (2, 16384, 16, 64)]]
            attention += [("window ±256 + 16 global", (2, 16384, 16, 64), {"window": (256, 256), "global_tokens": 16})]
        for name, shape, kw in attention:
            fn = functools.partial(local_global_attention, **kw, implementation="pallas", gpu_kernel=kernel)
            compile_row(f"{name} {'x'.join(map(str, shape))} [{kernel}]",
                        lambda: jax.jit(fwd_bwd(fn)).lower(*arrays(*[shape] * 3)))
        if "packed" in groups:  # BERT rows packed with segment ids (their values are runtime data)
            shape = (40, 512, 12, 64)
            (segments,) = arrays(shape[:2], dtype=jnp.int32)

            def packed(q, k, v, segment_ids, kernel=kernel):
                return fwd_bwd(functools.partial(local_global_attention, segment_ids=segment_ids,
                                                 implementation="pallas", gpu_kernel=kernel))(q, k, v)

            compile_row(f"packed {'x'.join(map(str, shape))} [{kernel}]",
                        lambda: jax.jit(packed).lower(*arrays(*[shape] * 3), segments))


def train_row(device, model: str, batch: int, overrides: list[str]) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_throughput import _parse_overrides, build_step

    from jaxformers.sharding import DEFAULT_RULES, activate, make_mesh
    from train import steps as train_steps

    overrides = _parse_overrides(overrides)
    step, spec, host_batch, mesh = build_step(model, overrides, batch, "bfloat16", make_mesh(devices=[device]))

    shardings = train_steps.batch_shardings(host_batch, mesh)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in host_batch.items()}
    label = f"train step {model} {' '.join(f'{k}={v}' for k, v in overrides.items())} batch {batch} bf16"
    with activate(mesh, DEFAULT_RULES):
        compiled = compile_row(label, lambda: step.lower(spec.abstract, abstract_batch))
    if compiled is not None:
        m = compiled.memory_analysis()
        gib = 1 << 30
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        print(f"    memory: arguments {m.argument_size_in_bytes / gib:.2f} GiB, outputs "
              f"{m.output_size_in_bytes / gib:.2f} GiB (aliased {m.alias_size_in_bytes / gib:.2f}), temporaries "
              f"{m.temp_size_in_bytes / gib:.2f} GiB: {total / gib:.1f} of the H100's {H100_MEMORY / gib:.0f} GiB")


def stderr_to(path: str) -> None:
    """Send this process' C++ logs (Mosaic GPU's dumps try nvdisasm, XLA's slow-op alarms) to a file."""
    sys.stderr.flush()
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="bra,window,dense,packed,train", help="comma-separated row groups")
    parser.add_argument("--train-model", default="biformer_tiny")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--train-override", action="append", default=None,
                        help="model override KEY=VALUE (repeatable; default attention_impl=pallas)")
    args = parser.parse_args(argv)
    groups = set(args.only.split(","))
    os.environ.update(CUDA_VISIBLE_DEVICES="-1", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1")  # before the CUDA backend starts
    device = compile_only_h100()
    DUMP["dir"] = tempfile.mkdtemp(prefix="mosaic-gpu-dump-")  # Mosaic GPU reads these as it compiles each kernel
    os.environ.update(MOSAIC_GPU_DUMP_TO=DUMP["dir"], MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_RESOURCES="1")
    log = DUMP["dir"] + ".log"
    print(f"compiler logs: {log}")
    stderr_to(log)
    print(f"jax {jax.__version__}: compiling for {device.device_kind} (compile-only, sm_90a) on a host without one")
    kernel_rows(device, groups)
    if "train" in groups:
        train_row(device, args.train_model, args.train_batch, args.train_override or ["attention_impl=pallas"])
    shutil.rmtree(DUMP["dir"], ignore_errors=True)
    print(f"{len(FAILED)} failed" + (": " + "; ".join(FAILED) if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
