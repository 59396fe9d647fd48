"""SeqPE 2-D resolution extrapolation on our ViT: learned vs sin-cos vs SeqPE positions, same run.

"SeqPE: Transformer with Sequential Position Encoding" (Li et al. 2025, arXiv 2506.13277) trains ViT at one
image size and evaluates at larger ones (more patches, same patch size; official ``image_seqpe/runs/ours_vit.sh``:
224 -> 672, positions extended, not interpolated). Here, at CPU scale: scikit-learn's 8x8 digits upsampled
(bilinear) to ``--train-size`` px (patch 4: a 4x4 grid at 16 px), a small ``VisionTransformer`` trained with

* ``learned``: the learned position table (at a larger size: bicubic-resampled, timm's standard way);
* ``sincos``: fixed 2-D sin-cos added to the patch tokens (row half, column half), extended to any grid;
* ``seqpe``: 2-D SeqPE (``attn_mul``, one q/k projection per layer, d_pe = width) with the contrastive and
  transfer regularisers (0.1 each) and the official random start shift of the training positions
  (``MainTaskPositions``: rate 0.1 from 320 shifts; transfer loss on unshifted steps only),

then evaluated on the held-out digits upsampled to each ``--eval-sizes`` (grid (size/4)²: 1x, 2.25x and 4x the
training patches at 16 / 24 / 32 px). ``python benchmarks/seqpe_vit.py`` prints a markdown table.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def load(size_list, seed=0):
    import jax
    import jax.numpy as jnp
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], d.target[order].astype(np.int32)
    up = {s: np.asarray(jax.image.resize(jnp.asarray(x), (len(x), s, s, 1), "bilinear")) for s in size_list}
    return up, y


def run(position, args, images, labels):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    import jaxformers as jf
    from jaxformers.layers.pos_embed import resample_abs_pos_embed
    from jaxformers.models.seqpe import (
        MainTaskPositions,
        SeqPE,
        SinCosPositions,
        contrastive_batch,
        contrastive_loss,
        transfer_batch,
        transfer_loss,
    )

    width, patch, n_train = args.width, 4, args.train_images
    grid = args.train_size // patch
    encoder = {"learned": None, "sincos": SinCosPositions(),
               "seqpe": SeqPE(mode="attn_mul", max_position=args.max_position, data_dim=2, d_pe=width,
                              num_layers=2, num_heads=args.heads, pe_qk="multi")}[position]
    model = jf.create_model("vit_tiny_patch16_224", img_size=args.train_size, patch_size=patch, in_chans=1,
                            embed_dim=width, depth=args.depth, num_heads=args.heads, num_classes=10,
                            position_encoder=encoder)
    rng = np.random.default_rng(args.seed)
    x_train, y_train = images[args.train_size][:n_train], labels[:n_train]
    params = nn.unbox(jax.jit(model.init)(jax.random.key(args.seed), jnp.asarray(x_train[:2])))["params"]
    tx = optax.adamw(args.lr, weight_decay=0.05)
    opt = tx.init(params)
    sampler = MainTaskPositions((grid, grid), args.max_position, rng) if position == "seqpe" else None

    @jax.jit
    def step(p, opt, x, y, positions, use_transfer, pivots, cands, labels_ct, main, shifted):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, positions=positions) if encoder is not None and \
                position == "seqpe" else model.apply({"params": p}, x)
            task = loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            if position == "seqpe":
                enc = lambda q: encoder.encode(p["position_encoder"], q)
                ct = contrastive_loss(enc(pivots), enc(cands.reshape(-1, 2)).reshape(*cands.shape[:2], -1),
                                      labels_ct, num_heads=args.heads)
                tr = transfer_loss(enc(main), enc(shifted), num_heads=args.heads)
                loss = loss + 0.1 * ct + 0.1 * use_transfer * tr
            return loss, task

        (_, task), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, task

    t0, losses, n_shifted = time.perf_counter(), [], 0
    dummy = (np.zeros((1, 2), np.int32), np.zeros((1, 1, 2), np.int32), np.zeros((1,), np.int32),
             np.zeros((1, 2), np.int32), np.zeros((1, 2), np.int32))
    for _ in range(args.steps):
        idx = rng.integers(0, n_train, args.batch)
        positions, shifted = (sampler.next(rng) if sampler is not None
                              else (np.zeros((grid * grid, 2), np.int32), False))
        n_shifted += shifted
        if position == "seqpe":
            pivots, cands, labels_ct = contrastive_batch(rng, 16, 32, args.max_position, data_dim=2,
                                                         local_range=8)
            main, shifted_pos = transfer_batch(rng, 16, grid, args.max_position, data_dim=2)
            extra = (pivots, cands, labels_ct, main, shifted_pos)
        else:
            extra = dummy
        params, opt, loss = step(params, opt, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]),
                                 jnp.asarray(positions), jnp.float32(not shifted), *extra)
        losses.append(float(loss))
    train_s = time.perf_counter() - t0
    acc = {}
    for size in args.eval_sizes:
        big = model.clone(img_size=size)
        p = dict(params)
        if position == "learned":
            p["pos_embed"] = resample_abs_pos_embed(params["pos_embed"], (size // patch,) * 2, (grid, grid))
        logits = jax.jit(lambda p, x, m=big: m.apply({"params": p}, x))(p, jnp.asarray(images[size][n_train:]))
        acc[size] = float(np.mean(np.argmax(np.asarray(logits), -1) == labels[n_train:]))
    return {"position": position, "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-20:])),
            "train_s": train_s, "acc": acc, "shifted_steps": n_shifted}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=16)
    parser.add_argument("--eval-sizes", type=int, nargs="+", default=[16, 24, 32])
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-position", type=int, default=100, help="SeqPE positions per coordinate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--positions", nargs="+", default=["learned", "sincos", "seqpe"])
    args = parser.parse_args()
    import jax

    results = []
    for seed in args.seeds:  # one data split and initialisation per seed, shared by the three encodings
        args.seed = seed
        images, labels = load(sorted({args.train_size, *args.eval_sizes}), seed)
        results += [dict(run(p, args, images, labels), seed=seed) for p in args.positions]
    grid = args.train_size // 4
    ratios = [f"{size} px ({(size // 4) ** 2 / grid ** 2:g}x)" for size in args.eval_sizes]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; {args.steps} steps x batch {args.batch}, "
          f"train {args.train_size} px ({grid}x{grid} patches), {len(labels) - args.train_images} test digits")
    print("| positions | seed | task loss first -> last | train s | " + " | ".join(ratios) + " |")
    print("|---" * (4 + len(ratios)) + "|")
    for r in results:
        accs = " | ".join(f"{100 * r['acc'][s]:.1f}" for s in args.eval_sizes)
        print(f"| {r['position']} | {r['seed']} | {r['first_loss']:.2f} -> {r['last_loss']:.2f} | {r['train_s']:.0f} | "
              f"{accs} |" + (f" ({r['shifted_steps']} shifted steps)" if r["position"] == "seqpe" else ""))
    for p in args.positions:
        rows = [r for r in results if r["position"] == p]
        accs = " | ".join(f"{100 * np.mean([r['acc'][s] for r in rows]):.1f}" for s in args.eval_sizes)
        print(f"| {p} (mean) | {len(rows)} seeds | | | {accs} |")


if __name__ == "__main__":
    main()
