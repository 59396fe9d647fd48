"""FIT vs ViT: compiled FLOPs and memory of one forward + backward as the token count grows.

For each resolution the train-step function (loss, gradients) is lowered and compiled with abstract
inputs only (``jax.jit(...).lower(...).compile()``; nothing is allocated or run, so 160K tokens
compile on a laptop CPU). XLA's ``cost_analysis()`` gives the FLOPs and ``memory_analysis()`` the
buffers (arguments + outputs + temporaries ≈ peak). A least-squares fit of log FLOPs on log tokens
gives the scaling exponent: FIT with a fixed group size should be close to 1 (local attention is
N² per group, global attention (T*M)² over latents only), a plain ViT of the same width and depth
close to 2 at high resolution.

    python benchmarks/fit_scaling.py                      # 4K, 16K, 64K, 160K tokens (CPU ok)
    python benchmarks/fit_scaling.py --max-tokens 16384   # quicker
    python benchmarks/fit_scaling.py --json out.json

Numbers are XLA's static estimates for the backend in use (CPU unless a GPU is present); they are
not measured times. Caveat for memory on CPU: XLA's CPU pipeline does not keep rematerialisation
(a plain ``jax.checkpoint`` MLP chain reports the same temp bytes with and without it), so CPU
memory figures are those of a non-remat step; the FLOPs do include the recomputation. The paper's
16 GB claim (6400×6400, 160K tokens) needs a GPU run and is not made here.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.models.fit import FITEncoder
from jaxformers.models.fit_layers import parse_layer_spec
from jaxformers.models.vit import VisionTransformer

SIDES = (64, 128, 256, 400)  # patches per side: 4096, 16384, 65536, 160000 tokens


def build(kind: str, side: int, args) -> FITEncoder | VisionTransformer:
    common = dict(img_size=side * args.patch, patch_size=args.patch, in_chans=3, num_classes=1000,
                  remat=not args.no_remat, dtype=jnp.bfloat16 if args.bf16 else None)
    if kind == "fit":
        return FITEncoder(layers=args.layers, group_size=args.group, latents_per_group=args.latents_per_group,
                          x_dim=args.width, latent_dim=args.width, x_num_heads=args.heads, latent_num_heads=args.heads,
                          **common)
    depth = sum(a + b for a, b in parse_layer_spec(args.layers))
    return VisionTransformer(embed_dim=args.width, depth=depth, num_heads=args.heads, class_token=False,
                             global_pool="avg", **common)


def analyse(model, batch: int) -> dict:
    """FLOPs and memory of jit(value_and_grad(cross-entropy)) for ``model`` on abstract inputs."""
    h = w = model.img_size
    x = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, 3)))["params"])

    def loss(p, x, y):
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)})
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, x, y).compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    total = None
    if mem is not None:
        total = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                    - getattr(mem, "alias_size_in_bytes", 0))
    return {"flops": float(cost.get("flops", float("nan"))), "bytes": total,
            "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None, "compile_s": seconds}


def fit_exponent(tokens, values) -> float:
    """Slope of log(values) against log(tokens) (least squares)."""
    return float(np.polyfit(np.log(np.asarray(tokens, float)), np.log(np.asarray(values, float)), 1)[0])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-tokens", type=int, default=160_000, help="largest token count to compile (default 160000)")
    p.add_argument("--models", default="fit,vit", help="comma list of fit,vit")
    p.add_argument("--vit-max-tokens", type=int, default=None, help="cap for ViT only (its compile gets slow)")
    p.add_argument("--layers", default="(2)4(2)4(2)", help="FIT layer spec; ViT depth = total layers")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--group", type=int, default=16, help="group side in patches (group size = group²)")
    p.add_argument("--latents-per-group", type=int, default=4)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (float32 params)")
    p.add_argument("--no-remat", action="store_true")
    p.add_argument("--json", default=None, help="write the rows and exponents here")
    args = p.parse_args(argv)

    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} width={args.width} "
          f"layers={args.layers} group={args.group}x{args.group} latents/group={args.latents_per_group} "
          f"remat={not args.no_remat} dtype={'bf16' if args.bf16 else 'f32'}")
    print(f"{'model':5} {'tokens':>7} {'image':>11} {'GFLOPs':>12} {'memory GB':>10} {'compile s':>9}")
    rows = []
    for kind in args.models.split(","):
        cap = args.max_tokens if kind == "fit" or args.vit_max_tokens is None else min(args.max_tokens, args.vit_max_tokens)
        for side in SIDES:
            tokens = side * side
            if tokens > cap:
                continue
            if kind == "fit" and side % args.group:
                print(f"skip {tokens}: {side} patches per side do not split into groups of {args.group}")
                continue
            r = {"model": kind, "tokens": tokens, "image": side * args.patch, **analyse(build(kind, side, args), args.batch)}
            rows.append(r)
            gb = f"{r['bytes'] / 2**30:10.2f}" if r["bytes"] is not None else f"{'n/a':>10}"
            print(f"{kind:5} {tokens:7d} {r['image']:>5}x{r['image']:<5} {r['flops'] / 1e9:12.1f} {gb} "
                  f"{r['compile_s']:9.1f}", flush=True)
    exponents = {}
    for kind in sorted({r["model"] for r in rows}):
        sel = [r for r in rows if r["model"] == kind]
        if len(sel) >= 2:
            exponents[kind] = {"flops": fit_exponent([r["tokens"] for r in sel], [r["flops"] for r in sel])}
            if all(r["bytes"] for r in sel):
                exponents[kind]["memory"] = fit_exponent([r["tokens"] for r in sel], [r["bytes"] for r in sel])
            print(f"{kind}: FLOPs ~ tokens^{exponents[kind]['flops']:.3f}"
                  + (f", memory ~ tokens^{exponents[kind]['memory']:.3f}" if "memory" in exponents[kind] else ""))
    fits = {r["tokens"]: r for r in rows if r["model"] == "fit"}
    for r in rows:
        if r["model"] == "vit" and r["tokens"] in fits and fits[r["tokens"]]["flops"] > 0:
            print(f"ViT / FIT FLOPs at {r['tokens']} tokens: {r['flops'] / fits[r['tokens']]['flops']:.2f}x")
    result = {"args": vars(args), "backend": jax.default_backend(), "rows": rows, "exponents": exponents}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
