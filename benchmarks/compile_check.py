"""Compile every kernel, and BiFormer-T's train step, for a GPU or a TPU on a host that has neither.

    make compile-h100      # a venv with jax[cuda13] at the GPU machines' jax (~5 GB), then --target h100
    make compile-tpu       # a venv with jax[tpu] (libtpu, ~1.5 GB), then --target v5e
    python benchmarks/compile_check.py --target v4 --only bra,train         # in such a venv
    python benchmarks/compile_check.py --target a100                        # or b200, l4, rtx_pro_6000: Triton
    python benchmarks/compile_check.py --target t4          # pre-Ampere: every row refused (no Triton there)
    python benchmarks/compile_check.py --target v5e --only train --train-mesh data=2,tensor=2  # 4 chips

Deviceless ahead-of-time compilation: the CUDA plugin describes a GPU from a target config, and
libtpu a TPU slice by name (no accelerator, no driver needed); ``jit(...).lower(...).compile()``
then runs XLA's whole pipeline for it: on a GPU Triton kernels to cubin and (Hopper) Mosaic GPU
kernels through their MLIR passes, PTX and ptxas; on a TPU the Pallas Mosaic kernels through Mosaic's
compiler, with the chip's SMEM and VMEM limits. What a first device session would otherwise learn
at compile time (a kernel over a memory budget, an op a lowering rejects, a ptxas error, register
spills, a train step too big for the device) costs no device time here. Nothing runs: no numerics
and no timings (``benchmarks/kernels.py`` has those).

Rows: the shapes of ``benchmarks/kernels.py`` (``benchmarks/ANCHORS.md``), forward + backward, in bf16
(``--dtype float32``: the models' default dtype, which only the Triton kernels take); on the H100
once per GPU kernel set (``gpu_kernel="mosaic"`` and ``"triton"``). Each row prints the
kernels in the compiled program and, for each of our GPU kernels, ptxas' registers per thread and
spill bytes (Mosaic GPU's compiler dumps, and for the Pallas Triton kernels the ``ptxas -v`` output
XLA logs when asked), for Mosaic kernels also the shared memory each reserves. The train step
(BiFormer-T on our kernels by default) prints XLA's memory analysis against the device's memory;
``--train-mesh`` compiles it over several chips of the TPU slice (v5e/v6e 2x2, v4/v5p 2x2x1: up
to 4), e.g. data and tensor parallel, where our kernels must run inside ``shard_map``.
Exit status 1 if anything failed to compile.

Our ops choose kernels by ``jax.default_backend()`` and the device's generation; this script makes
those answer for the compile-only device (it runs nothing else, so nothing else sees it).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DUMP = {"dir": "", "log": "", "log_offset": 0}  # Mosaic GPU's dumps and the compiler log (set by main)

class GpuSpec(NamedTuple):
    """What XLA's GpuTargetConfig says of a GPU (what the compiler would otherwise ask the device)."""

    sms: int
    smem_per_sm: int  # bytes
    smem_per_block_optin: int  # bytes
    bandwidth: int  # HBM bytes/s
    l2: int  # bytes
    clock_ghz: float
    memory: int  # HBM bytes
    capability: tuple[int, int]
    fp32_units_per_sm: int
    name: str


# An A100 (sm80), a B200 (sm100), an L4 (sm89) and an RTX PRO 6000 (sm120; the L4 and it have 99 KiB
# of shared memory per block, like an A10 or an RTX 3090/4090/5090) take our Triton kernels (the
# Mosaic GPU ones are Hopper's); a T4 (sm75, Colab's free GPU) none: XLA compiles Triton for Ampere
# and newer only, so the ops refuse "pallas" there.
GPU_SPECS = {
    "h100": GpuSpec(132, 233472, 232448, 3352320000000, 52428800, 1.98, 84929347584, (9, 0), 128,
                    "NVIDIA H100 80GB HBM3"),
    "a100": GpuSpec(108, 167936, 166912, 2039040000000, 41943040, 1.41, 85100068864, (8, 0), 64,
                    "NVIDIA A100-SXM4-80GB"),
    "b200": GpuSpec(148, 233472, 232448, 7672320000000, 132644864, 1.965, 191514411008, (10, 0), 128, "NVIDIA B200"),
    "t4": GpuSpec(40, 65536, 65536, 320064000000, 4194304, 1.59, 16106127360, (7, 5), 64, "Tesla T4"),
    "l4": GpuSpec(58, 102400, 101376, 300000000000, 50331648, 2.04, 24152899584, (8, 9), 128, "NVIDIA L4"),
    "rtx_pro_6000": GpuSpec(188, 102400, 101376, 1792000000000, 134217728, 2.6, 102005473280, (12, 0), 128,
                            "NVIDIA RTX PRO 6000 Blackwell Server Edition"),
}


def gpu_target_config(target: str) -> str:
    g = GPU_SPECS[target]
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {g.smem_per_sm} threads_per_core_limit: 2048 core_count: {g.sms}
  fpus_per_core: {g.fp32_units_per_sm}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {g.bandwidth} l2_cache_size: {g.l2} clock_rate_ghz: {g.clock_ghz}
  device_memory_size: {g.memory} shared_memory_per_block_optin: {g.smem_per_block_optin}
  cuda_compute_capability {{ major: {g.capability[0]} minor: {g.capability[1]} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{g.name}"
"""


# target: (libtpu topology, jax's ChipVersion, HBM bytes per chip)
TPU_TOPOLOGIES = {"v4": ("v4:2x2x1", "TPU_V4", 32 << 30), "v5e": ("v5e:2x2", "TPU_V5E", 16 << 30),
                  "v5p": ("v5p:2x2x1", "TPU_V5P", 95 << 30), "v6e": ("v6e:2x2", "TPU_V6E", 32 << 30)}
TARGETS = tuple(GPU_SPECS) + tuple(TPU_TOPOLOGIES)


def _pretend_backend(platform: str, device) -> None:
    """Makes our kernel dispatch (``jax.default_backend()``, ``jax.devices(platform)``) see ``device``."""
    host_devices = jax.devices
    names = ("gpu", "cuda") if platform == "gpu" else (platform,)
    jax.default_backend = lambda: platform
    jax.devices = lambda backend=None: [device] if backend in names else host_devices(backend)


def compile_only_devices(target: str) -> list:
    """The compile-only devices of ``target`` (one GPU; a TPU slice's chips), with our kernel dispatch and
    Pallas' lowerings pointed at the first."""
    from jax.experimental import topologies

    host_kind = jax.devices()[0].device_kind
    try:
        if target in GPU_SPECS:
            topology = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target),
                                                    topology="1x1x1")
        else:
            topology = topologies.get_topology_desc(TPU_TOPOLOGIES[target][0], platform="tpu")
    except Exception as e:  # noqa: BLE001 - no plugin, or one without deviceless topologies
        install = ("jax[cuda13] at the GPU machines' jax version (make compile-h100)" if target in GPU_SPECS
                   else "jax[tpu] (libtpu; make compile-tpu)")
        raise SystemExit(f"cannot describe a {target} without one ({type(e).__name__}: {e}); install {install}") from e
    device = topology.devices[0]
    _pretend_backend("gpu" if target in GPU_SPECS else "tpu", device)
    # Newer Pallas reads the generation for its lowering from the default (host) device's kind.
    try:
        if target in GPU_SPECS:
            from jaxformers.kernels.gpu_kernel import jax_gpu_info_module

            gpu_info = jax_gpu_info_module()
            if gpu_info is None:
                raise ImportError("this jax has no GPU-info registry")
            version = gpu_info.GpuVersion[target.upper()]
            gpu_info.registry[host_kind] = lambda: gpu_info.get_gpu_info_from_version(version)
        else:
            from jax._src import tpu_info

            chip = tpu_info.ChipVersion[TPU_TOPOLOGIES[target][1]]
            tpu_info.registry[host_kind] = lambda: tpu_info.get_tpu_info_for_chip(chip, 1)
    except (ImportError, KeyError):  # an older jax: the lowering asks the compile-only device itself
        pass
    return list(topology.devices)


def ptxas_entries(text: str) -> list[tuple[str, str, str]]:
    """(kernel, registers per thread, "spill stores/loads" bytes) of each entry function in ``ptxas -v``
    output; "?" where a figure is missing."""
    entries = []
    for block in re.split(r"Compiling entry function '", text)[1:]:
        regs = re.search(r"Used (\d+) registers", block)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        entries.append((block.split("'", 1)[0], regs.group(1) if regs else "?",
                        f"{spills.group(1)}/{spills.group(2)}" if spills else "?"))
    return entries


def performance_losses(text: str) -> str:
    """ptxas' "Potential Performance Loss" notes in ``text``, shortened and joined (empty when none):
    e.g. "'setmaxnreg' ignored (C7504)" when the warpgroups' register reallocation is dropped, or
    "wgmma.mma_async instructions are serialized (C7512)"."""
    notes = re.findall(r"\((C\d+)\) Potential Performance Loss: (.+?)(?: to | due to |;|\.?$)", text, re.M)
    return ", ".join(dict.fromkeys(f"{what} ({code})" for code, what in notes))


def _report_lines(seen: Counter) -> list[str]:
    return [f"    {name:<26} x{n:<3} {regs:>4} registers  spills {spill:>7} B (st/ld)  shared memory {smem:>4} KiB"
            + (f"  ptxas: {losses}" if losses else "")
            for (name, regs, spill, smem, losses), n in sorted(seen.items())]


def ptxas_report() -> list[str]:
    """One line per Mosaic GPU kernel compiled since the last call, identical ones counted once (then
    the dumps are removed): ptxas' registers per thread and spill bytes, the shared memory, and
    ptxas' performance-loss notes (with jax 0.12's separable compilation ptxas drops the kernels'
    ``setmaxnreg`` register reallocation, C7504)."""
    if not DUMP["dir"]:  # main() has not made the dump directory: nothing was dumped
        return []
    seen = Counter()
    for path in sorted(Path(DUMP["dir"]).glob("*.ptxas")):
        resources = path.with_suffix(".resources.txt")
        smem = re.search(r"smem_scratch_bytes=(\d+)", resources.read_text()) if resources.exists() else None
        text = path.read_text(errors="replace")
        ((_, regs, spill),) = ptxas_entries(text)[:1] or [("", "?", "?")]  # one kernel per dump
        seen[(path.stem.rsplit("_", 1)[0], regs, spill, str(int(smem.group(1)) // 1024) if smem else "?",
              performance_losses(text))] += 1
    for path in Path(DUMP["dir"]).iterdir():
        path.unlink()
    return _report_lines(seen)


def triton_report(compiled) -> list[str]:
    """One line per Pallas Triton kernel of ``compiled`` (named by its ``pallas_call``), from the
    ``ptxas -v`` output XLA wrote to the compiler log since the last call (main() asks for it):
    registers per thread and spill bytes. Triton's shared memory is dynamic, which ptxas does not see."""
    if not DUMP["log"]:
        return []
    with open(DUMP["log"], errors="replace") as f:
        f.seek(DUMP["log_offset"])
        text = f.read()
        DUMP["log_offset"] = f.tell()
    ours = set(re.findall(r'xla\.gpu\.triton".*?name = "([^"]+)"', compiled.as_text()))
    seen = Counter((name, regs, spill, "?", "") for name, regs, spill in ptxas_entries(text)
                   if re.sub(r"__\d+$", "", name) in ours)  # XLA names a call's other variants name__1, ...
    return _report_lines(seen)


def kernels_in(compiled) -> str:
    counts = Counter(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))
    names = {"__gpu$xla.gpu.triton": "triton", "mosaic_gpu_v2": "mosaic", "mosaic_gpu": "mosaic",
             "tpu_custom_call": "pallas tpu"}
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


def _raised_by_jaxformers(error: BaseException) -> bool:
    import jaxformers

    frames = traceback.extract_tb(error.__traceback__)
    package = os.path.dirname(os.path.abspath(jaxformers.__file__)) + os.sep
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(package)


def compile_row(label: str, lower: Callable[[], Any]):
    """Compiles ``lower()``'s program and prints what it holds; the compiled program, or None.

    A ValueError raised by our own code while tracing is our ops refusing the inputs on this device
    by design (e.g. a BRA map whose resident blocks exceed a TPU v4's VMEM; ``implementation="auto"``
    then takes the XLA path): reported as "refused", not as a failure. Anything else is a failure
    (Mosaic's own "exceeds available shared memory" ValueError included)."""
    start = time.perf_counter()
    try:
        try:
            lowered = lower()
        except ValueError as e:
            if not _raised_by_jaxformers(e):
                raise
            print(f"refused {label}: {str(e).splitlines()[0][:300]}", flush=True)
            return None
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - a failure is the finding; report it and go on
        FAILED.append(label)
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        ptxas_report()
        return None
    print(f"ok   {label:<58} {time.perf_counter() - start:5.1f}s  {kernels_in(compiled)}", flush=True)
    for line in ptxas_report() + triton_report(compiled):
        print(line, flush=True)
    return compiled


def kernel_rows(device, groups: set[str], gpu_kernels: tuple[str, ...], dtype=jnp.bfloat16) -> None:
    from jaxformers.kernels import bi_level_routing_attention, local_global_attention
    from jaxformers.kernels.bi_level_routing.api import BIFORMER_STAGE_SHAPES

    sharding = jax.sharding.SingleDeviceSharding(device)

    def tag(kernel):
        return f" [{kernel}]" if len(gpu_kernels) > 1 else ""

    def arrays(*shapes, dtype=dtype):
        return [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]

    for kernel in gpu_kernels:
        if "bra" in groups:
            for batch, height, width, channels, heads, regions, topk in BIFORMER_STAGE_SHAPES:
                fn = functools.partial(bi_level_routing_attention, num_heads=heads, regions_per_side=regions,
                                       topk=topk, implementation="pallas", gpu_kernel=kernel)
                args = arrays(*[(batch, height, width, channels)] * 3)
                compile_row(f"bra {batch}x{height}x{width}x{channels} S{regions} k{topk}{tag(kernel)}",
                            lambda: jax.jit(fwd_bwd(fn)).lower(*args))
        attention = []
        if "dense" in groups:
            attention += [("dense", s, {}) for s in [(256, 197, 6, 64), (8, 4096, 16, 64), (8, 4096, 16, 128)]]
        if "window" in groups:
            attention += [("window ±256", s, {"window": (256, 256)}) for s in [(8, 4096, 16, 64), (2, 16384, 16, 64)]]
            attention += [("window ±256 + 16 global", (2, 16384, 16, 64), {"window": (256, 256), "global_tokens": 16})]
        for name, shape, kw in attention:
            fn = functools.partial(local_global_attention, **kw, implementation="pallas", gpu_kernel=kernel)
            compile_row(f"{name} {'x'.join(map(str, shape))}{tag(kernel)}",
                        lambda: jax.jit(fwd_bwd(fn)).lower(*arrays(*[shape] * 3)))
        if "packed" in groups:  # BERT rows packed with segment ids (their values are runtime data)
            shape = (40, 512, 12, 64)
            (segments,) = arrays(shape[:2], dtype=jnp.int32)

            def packed(q, k, v, segment_ids, kernel=kernel):
                return fwd_bwd(functools.partial(local_global_attention, segment_ids=segment_ids,
                                                 implementation="pallas", gpu_kernel=kernel))(q, k, v)

            compile_row(f"packed {'x'.join(map(str, shape))}{tag(kernel)}",
                        lambda: jax.jit(packed).lower(*arrays(*[shape] * 3), segments))


def train_row(devices, model: str, batch: int, overrides: list[str], memory: int, dtype: str = "bfloat16",
              mesh_axes: dict[str, int] | None = None) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_throughput import _parse_overrides, abstract_batch, build_step

    from jaxformers.sharding import DEFAULT_RULES, activate, make_mesh

    overrides = _parse_overrides(overrides)
    mesh_axes = mesh_axes or {"data": 1}
    n = math.prod(mesh_axes.values())  # main checks that the target describes that many devices
    step, spec, host_batch, mesh = build_step(model, overrides, batch, dtype, make_mesh(mesh_axes, devices[:n]))
    label = f"train step {model} {' '.join(f'{k}={v}' for k, v in overrides.items())} batch {batch} {dtype}"
    if n > 1:
        label += " mesh " + ",".join(f"{k}={v}" for k, v in mesh_axes.items())
    with activate(mesh, DEFAULT_RULES):
        compiled = compile_row(label, lambda: step.lower(spec.abstract, abstract_batch(host_batch, mesh)))
    if compiled is not None:
        m = compiled.memory_analysis()
        gib = 1 << 30
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        print(f"    memory: arguments {m.argument_size_in_bytes / gib:.2f} GiB, outputs "
              f"{m.output_size_in_bytes / gib:.2f} GiB (aliased {m.alias_size_in_bytes / gib:.2f}), temporaries "
              f"{m.temp_size_in_bytes / gib:.2f} GiB: {total / gib:.1f} of the device's {memory / gib:.0f} GiB")


def stderr_to(path: str) -> None:
    """Send this process' C++ logs (Mosaic GPU's dumps try nvdisasm, XLA's slow-op alarms) to a file."""
    sys.stderr.flush()
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=TARGETS, default="h100", help="the device to compile for")
    parser.add_argument("--only", default="bra,window,dense,packed,train", help="comma-separated row groups")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the kernel rows' and the train step's compute dtype")
    parser.add_argument("--train-model", default="biformer_tiny")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--train-override", action="append", default=None,
                        help="model override KEY=VALUE (repeatable; default attention_impl=pallas)")
    parser.add_argument("--train-mesh", default=None,
                        help="the train step's mesh over the target's chips, e.g. data=2,tensor=2 (default: one chip)")
    args = parser.parse_args(argv)
    groups = set(args.only.split(","))
    os.environ.update(CUDA_VISIBLE_DEVICES="-1", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1")  # before any backend starts
    # XLA runs ptxas with -v and logs what it says (the Pallas Triton kernels' registers and spills)
    os.environ.update(XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_gpu_ptx_compiler_extra_flags=-v").strip(),
                      TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="subprocess_compilation=2")
    mesh_axes = None
    if args.train_mesh is not None:
        try:
            mesh_axes = {name: int(size) for name, size in (part.split("=") for part in args.train_mesh.split(","))}
        except ValueError:
            parser.error(f"--train-mesh takes AXIS=SIZE,... (e.g. data=2,tensor=2); got {args.train_mesh!r}")
    devices = compile_only_devices(args.target)
    device = devices[0]
    if mesh_axes and math.prod(mesh_axes.values()) > len(devices):  # before stderr goes to the log
        raise SystemExit(f"--train-mesh {args.train_mesh} needs {math.prod(mesh_axes.values())} devices; "
                         f"a {args.target} here describes {len(devices)}")
    DUMP["dir"] = tempfile.mkdtemp(prefix="compile-check-")  # Mosaic GPU reads these as it compiles each kernel
    os.environ.update(MOSAIC_GPU_DUMP_TO=DUMP["dir"], MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_RESOURCES="1")
    DUMP["log"] = log = DUMP["dir"] + ".log"
    print(f"compiler logs: {log}")
    stderr_to(log)
    print(f"jax {jax.__version__}: compiling for {device.device_kind} ({args.target}, compile-only) on a host "
          "without one")
    gpu = args.target in GPU_SPECS
    # On Hopper both GPU kernel sets; the Mosaic ones take bf16/f16 only ("auto" is Triton's for float32)
    both = args.target == "h100" and args.dtype == "bfloat16"
    kernel_rows(device, groups, ("mosaic", "triton") if both else ("auto",), jnp.dtype(args.dtype))
    if "train" in groups:
        memory = GPU_SPECS[args.target].memory if gpu else TPU_TOPOLOGIES[args.target][2]
        train_row(devices, args.train_model, args.train_batch, args.train_override or ["attention_impl=pallas"],
                  memory, args.dtype, mesh_axes)
    shutil.rmtree(DUMP["dir"], ignore_errors=True)
    print(f"{len(FAILED)} failed" + (": " + "; ".join(FAILED) if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
