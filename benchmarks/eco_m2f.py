"""ECO-M2F on the generated panoptic scenes (CPU, small): PQ and encoder FLOPs per exit and per beta.

    python benchmarks/eco_m2f.py [--steps 300] [--train-images 256] [--val-images 96]

1. A tiny Mask2Former (Swin layout, widths 32-64, 6 deformable encoder layers, 5 gates: exits after
   2..6 layers) trains on ``panoptic_shapes`` (``train/seg_data.py``) with a random exit per step and
   the loss weighted by the exit depth (k + 2, the official factor, which the panoptic task's loss
   applies to a gated model: ``jaxformers.segmentation.losses.exit_loss_weight``), the
   early-exit-aware first stage of the paper. One compiled step serves every exit: the gate's
   kernel is zero and its bias one-hot, so the gated forward takes the chosen exit.
2. The derived data set: per-image PQ of every exit (``jaxformers.compress.eco_m2f``) on train scenes.
3. For each beta the gate alone trains on the stride-32 encoder tokens against ``exit_targets``
   (softmax over the batch, as the official code) with ``gate_loss``; on the val scenes each image
   exits where its gate says, and PQ (dataset-level, summed counts) and mean encoder FLOPs are
   reported, with the fixed exits for comparison. FLOPs: XLA ``cost_analysis`` (``encoder_flops``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--val-images", type=int, default=96)
    p.add_argument("--betas", default="0,0.005,0.01,0.02,0.05")
    p.add_argument("--gate-steps", type=int, default=300)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxformers as jf
    from jaxformers.compress.eco_m2f import encoder_flops, exit_targets, gate_loss, per_image_pq
    from jaxformers.segmentation import panoptic_quality_stats, pq_summary
    from tests.helpers import numpy_variables
    from train.seg_data import NUM_CLASSES, THING_IDS, PanopticShapes
    from train.tasks_seg import PanopticSegmentationTask

    L, G = 6, 5
    exits = list(range(L - G + 1, L + 1))
    model = jf.create_model(
        "mask2former_swin_tiny_coco_panoptic", num_classes=NUM_CLASSES, img_size=64, feature_size=64,
        mask_feature_size=64, hidden_dim=64, encoder_layers=L, encoder_ffn_dim=128, decoder_layers=4, num_heads=4,
        dim_feedforward=128, num_queries=16, num_gates=G,
        backbone_overrides=dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=2,
                                drop_path_rate=0.0))
    task = PanopticSegmentationTask(NUM_CLASSES, THING_IDS, criterion_args=dict(num_points=256))

    def load(split, n):
        d = PanopticShapes(split).arrays(n)
        return {"image": (d["image"] / 127.5 - 1.0).astype(np.float32),
                **{k: d[k] for k in ("semantic", "panoptic", "segment_classes", "segment_crowd")}}

    train, val = load("train", max(a.train_images, a.batch)), load("val", a.val_images)
    variables = numpy_variables(model, train["image"][:1])
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])

    def force_exit(params, k):
        gate = {"kernel": jnp.zeros_like(params["pixel_decoder"]["gate"]["head"]["kernel"]),
                "bias": 10.0 * jax.nn.one_hot(k - exits[0], G)}
        return {**params, "pixel_decoder": {**params["pixel_decoder"], "gate": {"head": gate}}}

    tx = optax.adamw(optax.cosine_decay_schedule(1e-3, a.steps), weight_decay=0.05)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, k, rng):
        def loss_fn(p):
            out = model.apply({"params": force_exit(p, k)}, batch["image"], train=True)
            return task.loss(out, batch, rng)[0]  # times k + 2 (the gated model's encoder_exit)

        loss, g = jax.value_and_grad(loss_fn)(params)
        g = optax.clip_by_global_norm(1.0).update(g, None)[0]
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(0)
    t0, losses = time.time(), []
    n_train = len(train["image"])
    for i in range(a.steps):
        idx = rng.choice(n_train, a.batch, replace=False)
        batch = {k: v[idx] for k, v in train.items()}
        k = int(rng.integers(exits[0], exits[-1] + 1))
        params, opt, loss = step(params, opt, batch, jnp.int32(k), jax.random.key(i))
        losses.append(float(loss) / (k + 2))
    train_s = time.time() - t0
    print(f"trained {a.steps} steps in {train_s:.0f}s; loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}",
          flush=True)

    @jax.jit
    def stats_at(params, images, panoptic, classes, crowd, k):
        out = model.apply({"params": force_exit(params, k)}, images)
        pred = task.predict(out, images.shape[1:3])
        return panoptic_quality_stats(pred["panoptic"], pred["segment_classes"], panoptic, classes, crowd, NUM_CLASSES,
                                      reduce=False)

    def stats_by_exit(data):
        out = []
        for k in exits:
            parts = [jax.device_get(stats_at(params, data["image"][s:s + 32], data["panoptic"][s:s + 32],
                                             data["segment_classes"][s:s + 32], data["segment_crowd"][s:s + 32],
                                             jnp.int32(k))) for s in range(0, len(data["image"]), 32)]
            out.append({n: np.concatenate([q[n] for q in parts]) for n in parts[0]})
        return out  # [exit] -> {tp, fp, fn, iou: (N, C)}

    def dataset_pq(per_exit, choice):
        rows = np.arange(len(choice))
        summed = {n: per_exit[0][n][rows].copy() * 0 for n in per_exit[0]}
        for j in range(G):
            sel = rows[choice == j]
            for n in summed:
                summed[n][sel] = per_exit[j][n][sel]
        return pq_summary({n: v.sum(0) for n, v in summed.items()}, THING_IDS, NUM_CLASSES)["PQ"]

    train_stats, val_stats = stats_by_exit(train), stats_by_exit(val)
    table = np.stack([per_image_pq(s) for s in train_stats], 1)  # (N, G) the derived data set
    val_table = np.stack([per_image_pq(s) for s in val_stats], 1)
    flops = encoder_flops(model, {"params": force_exit(params, exits[-1])}, val["image"][:1], exits)

    def tokens(images):
        return jax.jit(lambda p, x: model.apply({"params": p}, x, method="encoder_tokens"))(params, images)

    tok_train = np.concatenate([tokens(train["image"][s:s + 64]) for s in range(0, n_train, 64)])
    tok_val = tokens(val["image"])
    from jaxformers.models.mask2former import GatingFunction

    gate_mod = GatingFunction(G)  # the gate alone, over the precomputed tokens
    result = {"steps": a.steps, "train_s": train_s, "loss_first10": float(np.mean(losses[:10])),
              "loss_last10": float(np.mean(losses[-10:])), "exits": exits,
              "encoder_mflops": {k: v / 1e6 for k, v in flops.items()},
              "fixed": {k: dataset_pq(val_stats, np.full(len(val_table), j)) for j, k in enumerate(exits)},
              "oracle_mean_image_pq": float(val_table.max(1).mean()), "betas": {}}
    for beta in [float(b) for b in a.betas.split(",")]:
        gp = gate_mod.init(jax.random.key(1), tok_train[:1])["params"]
        gtx = optax.adam(1e-2)
        gopt = gtx.init(gp)

        @jax.jit
        def gstep(gp, gopt, x, pq):
            loss, g = jax.value_and_grad(lambda q: gate_loss(gate_mod.apply({"params": q}, x),
                                                             exit_targets(pq, beta)))(gp)
            u, gopt = gtx.update(g, gopt, gp)
            return optax.apply_updates(gp, u), gopt, loss

        for i in range(a.gate_steps):
            idx = rng.choice(n_train, a.batch, replace=False)
            gp, gopt, gl = gstep(gp, gopt, tok_train[idx], table[idx])
        choice = np.asarray(jnp.argmax(gate_mod.apply({"params": gp}, tok_val), -1))
        target_choice = np.argmax(val_table - beta * np.arange(1, G + 1), 1)
        result["betas"][beta] = {
            "PQ": dataset_pq(val_stats, choice), "encoder_mflops": float(np.mean([flops[exits[j]] for j in choice]) / 1e6),
            "exit_counts": np.bincount(choice, minlength=G).tolist(),
            "target_argmax_PQ": dataset_pq(val_stats, target_choice),
            "target_argmax_mflops": float(np.mean([flops[exits[j]] for j in target_choice]) / 1e6),
            "gate_loss_last": float(gl)}
        print(beta, result["betas"][beta], flush=True)
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
