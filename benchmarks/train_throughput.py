"""Training throughput of our train step for any registered model, and timm's for the same model.

    python benchmarks/train_throughput.py vit_small_patch16_224 --batch 128
    python benchmarks/train_throughput.py vit_tiny_patch16_224 --batch 8 --steps 5 \
        --override img_size=32 --override patch_size=8 --override depth=2      # CPU, seconds

Ours: ``train.steps.make_train_step`` (forward, backward, AdamW with clipping and the weight-decay
mask, NaN guard) jitted with shardings and donated state over all local devices, on random inputs
(images, or whatever ``model.example_inputs`` gives) with softmax cross-entropy on the last output
axis. Reports examples/s, step time, the step's FLOPs from XLA's cost analysis and, when the
device's bf16 peak is known (``train.trainer.PEAK_FLOPS``), the model-FLOPs utilisation.

timm (when torch and timm are installed and timm knows the name): the same architecture with the
same overrides, AdamW (fused on CUDA), channels-last; bf16 autocast and ``torch.compile`` on GPU
(``--torch-compile on`` forces compilation on CPU too, which is slow to compile). The ratio
ours/timm is printed; the H100 targets are in benchmarks/ANCHORS.md. Compute dtype: bf16 on
accelerators, float32 on CPU, for both.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def build_step(name: str, overrides: dict, batch_size: int, dtype: str, mesh=None):
    """(jitted train step, state spec, host batch of random numpy inputs, mesh) for model ``name`` over
    ``mesh`` (default: all local devices; ``benchmarks/compile_check.py`` passes a compile-only one)."""
    import jaxformers
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxformers.registry import example_inputs
    from jaxformers.sharding import DEFAULT_RULES, make_mesh
    from train import config_lib, optim, steps as train_steps
    from train.tasks import Task

    class LastAxisCrossEntropy(Task):
        """Random inputs -> softmax cross-entropy of the output's last axis against random targets."""

        def model_inputs(self, batch):
            return tuple(batch[f"input_{i}"] for i in range(len(batch) - 1))

        def loss(self, outputs, batch):
            logits = outputs["logits"] if isinstance(outputs, dict) else jax.tree_util.tree_leaves(outputs)[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                   batch["targets"]).mean(), {}

    config = config_lib.base_config()
    config.model.name = name
    config.compute_dtype = dtype
    model_kwargs = dict(overrides)
    model = jaxformers.create_model(name, **model_kwargs)
    if dtype == "bfloat16" and hasattr(model, "dtype"):
        model = model.clone(dtype=jnp.bfloat16)
    mesh = mesh or make_mesh()
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n_batch:
        raise SystemExit(f"--batch {batch_size} must be divisible by the {n_batch} devices")
    rng = np.random.default_rng(0)
    inputs = example_inputs(model, batch_size)
    batch = {}
    for i, x in enumerate(inputs):
        x = np.asarray(x)
        batch[f"input_{i}"] = (rng.standard_normal(x.shape).astype(x.dtype) if np.issubdtype(x.dtype, np.floating)
                               else rng.integers(0, max(int(x.max()), 1) + 1, x.shape).astype(x.dtype))
    out_shape = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, *inputs, train=False))
    logits_shape = jax.eval_shape(lambda v: model.apply(v, *inputs, train=False), out_shape)
    logits_shape = logits_shape["logits"] if isinstance(logits_shape, dict) else jax.tree_util.tree_leaves(logits_shape)[0]
    batch["targets"] = rng.integers(0, logits_shape.shape[-1], logits_shape.shape[:-1]).astype(np.int32)

    schedule = optim.make_schedule(config, 1000)
    tx = optim.make_optimizer(config, schedule)
    spec = train_steps.state_spec(model, tx, mesh=mesh, rules=DEFAULT_RULES, seed=0, ema=False)
    step = jax.jit(train_steps.make_train_step(model, LastAxisCrossEntropy(), tx, schedule, config),
                   in_shardings=(spec.shardings, train_steps.batch_shardings(batch, mesh)),
                   out_shardings=(spec.shardings, NamedSharding(mesh, P())), donate_argnums=0)
    return step, spec, batch, mesh


def abstract_batch(batch: dict, mesh) -> dict:
    """The host batch as sharded ShapeDtypeStructs: lowers the step without data on the device."""
    from train import steps as train_steps

    shardings = train_steps.batch_shardings(batch, mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch.items()}


def _wait_for(path: str | None) -> None:
    """Block until ``path`` exists (None: return at once)."""
    if path:
        print(f"  compiled; waiting for {path} before running", flush=True)
        while not os.path.exists(path):
            time.sleep(0.2)


def bench_ours(name: str, overrides: dict, batch_size: int, steps: int, warmup: int, dtype: str,
               wait_for: str | None = None) -> dict:
    from jaxformers.sharding import DEFAULT_RULES, activate
    from train import steps as train_steps
    from train.trainer import peak_flops

    step, spec, batch, mesh = build_step(name, overrides, batch_size, dtype)
    with activate(mesh, DEFAULT_RULES):
        t = time.perf_counter()
        compiled = step.lower(spec.abstract, abstract_batch(batch, mesh)).compile()  # nothing runs on the device yet
        compile_s = time.perf_counter() - t
        _wait_for(wait_for)
        state = train_steps.init_state(spec)
        global_batch = train_steps.to_global(batch, mesh, batch_size)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float((cost or {}).get("flops", 0.0))
        for _ in range(warmup):
            state, metrics = compiled(state, global_batch)
        jax.block_until_ready(state)
        t = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, global_batch)
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - t
    step_s = elapsed / steps
    peak = peak_flops(jax.devices()[0])
    return {"examples_per_sec": batch_size / step_s, "step_ms": step_s * 1e3, "compile_s": compile_s,
            "flops_per_step_per_device": flops, "mfu": flops / step_s / peak if peak and flops else None,
            "params": sum(math.prod(s) for s in spec.param_shapes.values()),
            "loss": float(metrics["train/loss"]), "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}"}


def bench_timm(name: str, overrides: dict, batch_size: int, steps: int, warmup: int, compile_mode: str) -> dict | None:
    try:
        import timm
        import torch
    except ImportError:
        return {"skipped": "torch/timm not installed"}
    if name not in timm.list_models():
        return {"skipped": f"timm has no model {name!r}"}
    kwargs = {k: v for k, v in overrides.items() if k not in ("dtype", "param_dtype", "attention_impl", "remat")}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        return {"skipped": f"timm's {name} does not take the overrides {kwargs}: {e}"}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    img = kwargs.get("img_size", tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]))
    h, w = (img, img) if isinstance(img, int) else img
    chans = kwargs.get("in_chans", 3)
    num_classes = getattr(model, "num_classes", None) or kwargs.get("num_classes", 1000)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    use_compile = compile_mode == "on" or (compile_mode == "auto" and cuda)
    if use_compile and hasattr(torch, "compile"):
        model = torch.compile(model)
    x = torch.randn(batch_size, chans, h, w, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, **({"fused": True} if cuda else {}))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    for _ in range(max(warmup, 1)):
        step()
    sync()
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - t) / steps
    return {"examples_per_sec": batch_size / step_s, "step_ms": step_s * 1e3, "warmup_s": warm_s,
            "compiled": bool(use_compile), "autocast_bf16": cuda, "loss": float(loss.detach()),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 128 on accelerators, 8 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--override", action="append", default=[], help="model override KEY=VALUE (repeatable)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--torch-compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--no-timm", action="store_true")
    parser.add_argument("--wait-for", default=None, metavar="PATH",
                        help="compile first, then wait until PATH exists before running anything on the device "
                             "(to compile while another benchmark has the device)")
    args = parser.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    batch = args.batch or (8 if on_cpu else 128)
    n_steps = args.steps or (5 if on_cpu else 20)
    dtype = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    overrides = _parse_overrides(args.override)

    ours = bench_ours(args.model, overrides, batch, n_steps, args.warmup, dtype, args.wait_for)
    print(f"{args.model} {overrides or ''} | batch {batch} | {dtype} | {ours['params']:,} params | {ours['device']}")
    mfu = f"{100 * ours['mfu']:.1f}%" if ours["mfu"] is not None else "n/a (peak FLOP/s of this device unknown)"
    print(f"  jaxformers : {ours['examples_per_sec']:9.1f} ex/s  {ours['step_ms']:8.2f} ms/step  "
          f"{ours['flops_per_step_per_device'] / 1e9:.2f} GFLOP/step/device  MFU {mfu}  (compile {ours['compile_s']:.1f}s)")
    result = {"ours": ours}
    if not args.no_timm:
        theirs = bench_timm(args.model, overrides, batch, n_steps, args.warmup, args.torch_compile)
        result["timm"] = theirs
        if "skipped" in theirs:
            print(f"  timm       : skipped ({theirs['skipped']})")
        else:
            mode = ("torch.compile" if theirs["compiled"] else "eager") + (", bf16 autocast" if theirs["autocast_bf16"] else "")
            print(f"  timm       : {theirs['examples_per_sec']:9.1f} ex/s  {theirs['step_ms']:8.2f} ms/step  ({mode}, {theirs['device']})")
            result["ratio"] = ours["examples_per_sec"] / theirs["examples_per_sec"]
            print(f"  ratio jaxformers / timm: {result['ratio']:.2f}x")
    return result


if __name__ == "__main__":
    main()
