r"""DRCT super-resolution on scikit-image photographs for a fixed training budget, against bicubic.

    python benchmarks/drct_sr.py                         # x4, 300 s of training, CPU
    python benchmarks/drct_sr.py --scale 2 --seconds 600 --embed 48 --rdgs 2

A small DRCT ("DRCT: Saving Image Super-resolution away from Information Bottleneck", arXiv
2404.00722; ``jaxformers/models/drct.py``: ``drct_x{scale}`` with ``--embed`` channels, growth
``--gc``, ``--rdgs`` residual dense groups of five Swin blocks, window 8) is trained with the official
recipe's loss and optimiser (L1, Adam, betas (0.9, 0.99); ``--lr``) on random ``--hr-size`` crops
(default 16 x scale: 16x16 LR inputs, two windows, so nothing is reflect-padded; 12x12 LR inputs would be
padded by a third in each direction, spending compute on reflected copies) of
four scikit-image photographs, randomly flipped / transposed as the official configs do (``use_hflip``,
``use_rot``; ``--no-augment`` turns it off), and their bicubic downsamplings
(``train/super_resolution.py``: a fresh batch every step), for ``--seconds`` of wall-clock training
(compilation excluded). The learning rate follows ``--schedule``: ``official`` is the official
MultiStepLR (halved at 250k, 400k, 450k and 475k of 500k iterations) with the milestones at the same
fractions (50/80/90/95 %) of the time budget; ``constant`` keeps ``--lr``. Then, in the same run, the
trained model and bicubic upsampling of the same LR inputs are scored on ``--eval`` held-out crops of
two other photographs and on those two photographs whole (mod-cropped to ``scale``, reflect-padded to
the window by the model, as SR test sets are scored): PSNR and SSIM on Y with a ``scale``-pixel border
crop, outputs quantised to uint8 (BasicSR's protocol, float64 NumPy), and the mean signed Y error
(``bias``, in [0, 255] units; PSNR penalises it, SSIM's structure term does not). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=int, default=4, choices=[2, 3, 4])
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--embed", type=int, default=48)
    p.add_argument("--gc", type=int, default=16)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rdgs", type=int, default=1)
    p.add_argument("--hr-size", type=int, default=None, help="default 16 x scale: 16x16 LR inputs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="official", choices=["official", "constant"])
    p.add_argument("--no-augment", dest="augment", action="store_false")
    args = p.parse_args()

    import optax

    import jaxformers as jf
    from train.super_resolution import (
        TEST_PHOTOS,
        TRAIN_PHOTOS,
        bicubic_upsample,
        l1_loss,
        mean_error_y,
        official_learning_rate,
        photo_pair,
        psnr_y,
        quantize,
        sr_pairs,
        ssim_y,
    )

    args.hr_size = args.hr_size or 16 * args.scale
    lr_size = args.hr_size // args.scale
    model = jf.create_model(f"drct_x{args.scale}", embed_dim=args.embed, gc=args.gc, depths=(1,) * args.rdgs,
                            num_heads=(args.heads,) * args.rdgs, window_size=8, img_size=lr_size,
                            drop_path_rate=0.0)
    variables = jax.jit(model.init)(jax.random.key(args.seed), np.zeros((1, lr_size, lr_size, 3), np.float32))
    params = variables["params"]
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=args.lr, b1=0.9, b2=0.99)
    opt_state = tx.init(params)

    def rate(fraction: float) -> float:
        """The learning rate after ``fraction`` of the time budget."""
        if args.schedule == "constant":
            return args.lr
        return official_learning_rate(args.lr, fraction)

    @jax.jit
    def step(params, opt_state, lr, hr, learning_rate):
        loss, grads = jax.value_and_grad(lambda p: l1_loss(model.apply({"params": p}, lr), hr))(params)
        opt_state.hyperparams["learning_rate"] = learning_rate
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, lr: model.apply({"params": p}, lr))
    batch = lambda i: sr_pairs(TRAIN_PHOTOS, n=args.batch, hr_size=args.hr_size, scale=args.scale,
                               seed=args.seed * 1_000_003 + i, augment_patches=args.augment)
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, *batch(0), rate(0.0))
    compile_s = time.perf_counter() - t0
    losses, steps, start = [float(loss)], 1, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < args.seconds:
        params, opt_state, loss = step(params, opt_state, *batch(steps), rate(elapsed / args.seconds))
        steps += 1
        if steps % 25 == 0:
            losses.append(float(loss))
    train_s = time.perf_counter() - start

    lr, hr = sr_pairs(TEST_PHOTOS, n=args.eval, hr_size=args.hr_size, scale=args.scale, seed=10_000 + args.seed)
    out = np.concatenate([np.asarray(predict(params, lr[i:i + 16])) for i in range(0, len(lr), 16)])

    def score(est: np.ndarray, hr: np.ndarray) -> dict[str, float]:
        est, ref = quantize(est), quantize(hr)
        bias = mean_error_y(est, ref, args.scale)
        return {"psnr": round(float(np.mean(psnr_y(est, ref, args.scale))), 3),
                "ssim": round(float(np.mean(ssim_y(est, ref, args.scale))), 4),
                "bias": round(float(np.mean(bias)), 3), "abs_bias": round(float(np.mean(np.abs(bias))), 3)}

    scores = {"drct": score(out, hr), "bicubic": score(np.asarray(bicubic_upsample(lr, args.scale)), hr)}
    whole = {}
    for name in TEST_PHOTOS:
        lr, hr = photo_pair(name, args.scale)
        whole[name] = {"drct": score(np.asarray(predict(params, lr)), hr),
                       "bicubic": score(np.asarray(bicubic_upsample(lr, args.scale)), hr)}
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "jax": jax.__version__, **vars(args),
        "params": jf.count_params(model), "compile_s": round(compile_s, 1), "train_s": round(train_s, 1),
        "steps": steps, "l1_first": round(losses[0], 4), "l1_last": round(float(np.mean(losses[-4:])), 4),
        "drct": scores["drct"], "bicubic": scores["bicubic"],
        "psnr_gain_db": round(scores["drct"]["psnr"] - scores["bicubic"]["psnr"], 3), "whole_photos": whole,
        "whole_psnr_gain_db": round(float(np.mean([w["drct"]["psnr"] - w["bicubic"]["psnr"]
                                                    for w in whole.values()])), 3),
    }))


if __name__ == "__main__":
    main()
