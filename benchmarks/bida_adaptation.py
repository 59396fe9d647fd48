r"""BiDA against source-only training on the generated cross-domain hyperspectral scenes, in one run.

    python benchmarks/bida_adaptation.py                    # official BiDA vs source-only, 3 seeds (CPU: several minutes per variant and seed)
    python benchmarks/bida_adaptation.py --smoke            # tiny, seconds
    python benchmarks/bida_adaptation.py --variants source_only,distill,consistency,alignment,bida \
        --gain 0.6 --shift 0.1 --steps 600

BiDA ("Bi-directional Domain Adaptation for Cross-Domain Hyperspectral Image Classification", arXiv
2507.02268; ``jaxformers/models/bida.py``, the training loop ``train/hyperspectral.py``, the official
``train_pipeline.train``) is trained on ``CrossDomainScenes`` (labelled source scene, unlabelled target
scene: the same classes under a smooth spectral gain ``--gain`` and shift ``--shift``) next to the
baselines and ablations named in ``--variants``, each from the same initial student (and teacher)
weights, on the same batches, for the same ``--steps``, per seed (``--seeds``: each seed its own scenes
and initialisation). Variants (loss weights; everything else is the official loop: student and EMA
teacher in training mode, SGD lr 1e-2 (official; batch 128 there, ``--batch`` 64 by default here to keep
a CPU run short), alignment from half of training):

- ``source_only``: cross-entropy on the source only (lambda1 = lambda2 = 0, no alignment);
- ``distill``: + bi-directional distillation (lambda1 = 0.1) alone;
- ``consistency``: + the EMA-teacher consistency (lambda2 = 1) alone;
- ``alignment``: + the MMD alignment (weight 0.1) alone;
- ``bida``: the official objective (all three);
- ``bida_teacher_copy``: the official objective with the EMA teacher starting as a copy of the student
  (the official teacher has its own random initialisation; a diagnostic, not the method).

Reported per variant: the overall accuracy (OA) on every target pixel through the official inference
path (target branch, BatchNorm running statistics, which the official forward updates with the source
then the target batch), ``oa_target_bn``: the same with the BatchNorm statistics re-estimated on target
patches alone (a diagnostic of how much the mixed running statistics cost), and the OA on every source
pixel. Prints one JSON line per seed and a summary (mean, std over seeds).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

VARIANTS = {  # (lambda1 = distillation, lambda2 = consistency, alignment weight, teacher init)
    "source_only": (0.0, 0.0, 0.0, "own"),
    "distill": (0.1, 0.0, 0.0, "own"),
    "consistency": (0.0, 1.0, 0.0, "own"),
    "alignment": (0.0, 0.0, 0.1, "own"),
    "bida": (0.1, 1.0, None, "own"),
    "bida_teacher_copy": (0.1, 1.0, None, "copy"),
}


def target_bn_stats(model, variables, x, batch: int = 128, passes: int = 40, seed: int = 0):
    """BatchNorm running statistics re-estimated on ``x`` alone: ``passes`` training-mode forwards of the
    inference path on random batches (momentum 0.9, so the source's share decays to 0.9^passes)."""
    import jax

    @jax.jit
    def update(v, xb, key):
        _, upd = model.apply(v, xb, train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return {**v, "batch_stats": upd["batch_stats"]}

    rng = np.random.default_rng(seed)
    v = dict(variables)
    for i in range(passes):
        v = update(v, x[rng.choice(len(x), batch, replace=False)], jax.random.key(i))
    return v


def run_seed(args, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    import optax

    import jaxformers as jf
    from train.hyperspectral import CrossDomainScenes, accuracy, fit

    data = CrossDomainScenes(num_classes=args.classes, num_bands=args.bands, size=args.size, gain=args.gain,
                             shift=args.shift, noise=args.noise, seed=seed)
    model = jf.create_model("bida_houston", num_bands=args.bands, num_classes=args.classes, dim=args.dim,
                            depth=args.depth)
    x0 = jnp.zeros((1, 13, 13, args.bands))
    init = jax.jit(model.init)
    student = nn.unbox(init(jax.random.key(2 * seed), x0))  # the model's own initialisers, as the official
    teacher = nn.unbox(init(jax.random.key(2 * seed + 1), x0))["params"]
    xt, yt = data.patches("target")
    xs, ys = data.patches("source")
    tx = optax.sgd(args.lr) if args.opt == "sgd" else optax.adam(args.lr)
    out = {"seed": seed}
    for name in args.variants:
        l1, l2, la, init = VARIANTS[name]
        t0 = time.perf_counter()
        trained, hist = fit(model, student, student["params"] if init == "copy" else teacher, data, steps=args.steps,
                            batch=args.batch, tx=tx, seed=seed, lambda1=l1, lambda2=l2, lambda_align=la)
        adapted = target_bn_stats(model, trained, xt, batch=args.batch, seed=seed)
        last = {k: float(np.mean([h[k] for h in hist[-20:]])) for k in hist[0]}
        out[name] = {"oa_target": accuracy(model, trained, xt, yt),
                     "oa_target_bn": accuracy(model, adapted, xt, yt),
                     "oa_source": accuracy(model, trained, xs, ys),
                     "final_terms": {k: round(v, 4) for k, v in last.items()},
                     "seconds": round(time.perf_counter() - t0, 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="source_only,bida")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first_seed .. first_seed + seeds - 1")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--opt", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--gain", type=float, default=0.3)
    p.add_argument("--shift", type=float, default=0.05)
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bands", type=int, default=48)
    p.add_argument("--classes", type=int, default=7)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): 1 seed, 6 steps, 32 px, 12 bands")
    args = p.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.batch, args.size, args.bands, args.dim, args.depth = 1, 6, 16, 32, 12, 32, 1
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    import jax

    settings = {k: v for k, v in vars(args).items() if k != "smoke"}
    print(json.dumps({"settings": settings, "jax": jax.__version__, "device": jax.devices()[0].device_kind}))
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        results.append(run_seed(args, seed))
        print(json.dumps(results[-1]), flush=True)
    summary = {}
    for name in args.variants:
        summary[name] = {k: f"{np.mean([r[name][k] for r in results]):.3f} +- {np.std([r[name][k] for r in results]):.3f}"
                         for k in ("oa_target", "oa_target_bn", "oa_source")}
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
