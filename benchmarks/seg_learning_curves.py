"""Mask transformers on the generated panoptic scenes (CPU, small): learning curves and train-step speed.

    python benchmarks/seg_learning_curves.py curves [--seconds 90] [--train-images 128] [--val-images 48]
    python benchmarks/seg_learning_curves.py throughput [--size 128] [--batch 2] [--steps 5]

``curves``: a tiny Mask2Former (Swin layout) and a tiny kMaX-DeepLab (ConvNeXt layout) each train on
``panoptic_shapes`` (``train/seg_data.py``, 64 px) through the panoptic task of ``train/tasks_seg.py``
(their own criteria) for a fixed wall-clock budget each; PQ / mIoU on held-out scenes (the ``val``
split) untrained and after 1/4, 1/2 and all of the budget (summed per-class counts, the trainer's
eval step).

``throughput``: the train step (forward, loss, backward, AdamW) of a small Mask2Former with a
Swin-T-shaped backbone (depths 2-2-6-2, window 7, narrower widths) in jaxformers against
transformers' PyTorch ``Mask2FormerForUniversalSegmentation`` of the same config and weights (a
``save_pretrained`` directory read by ``jaxformers.from_pretrained``) on the same batch, in the same
run; each with its own criterion at the same number of sampled points.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# The repository root instead of benchmarks/ (whose kernels.py would shadow the ``kernels`` package that
# transformers imports).
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [q for q in sys.path if os.path.abspath(q or ".") != _here]


def _batch(split, n, size=64, start=0):
    import numpy as np

    from train.seg_data import PanopticShapes

    d = PanopticShapes(split, size=size).arrays(n)
    return {"image": (d["image"] / 127.5 - 1.0).astype(np.float32),
            **{k: d[k] for k in ("semantic", "panoptic", "segment_classes", "segment_crowd")}}


def curves(a):
    import jax
    import numpy as np
    import optax

    import jaxformers as jf
    from tests.helpers import numpy_variables
    from train import steps
    from train.seg_data import NUM_CLASSES, THING_IDS
    from train.tasks_seg import PanopticSegmentationTask

    m2f = jf.create_model(
        "mask2former_swin_tiny_coco_panoptic", num_classes=NUM_CLASSES, img_size=64, feature_size=32,
        mask_feature_size=32, hidden_dim=32, encoder_layers=1, encoder_ffn_dim=64, decoder_layers=3, num_heads=2,
        dim_feedforward=64, num_queries=8,
        backbone_overrides=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2,
                                drop_path_rate=0.0))
    kmax = jf.create_model(
        "kmax_deeplab_convnext_tiny_coco", num_classes=NUM_CLASSES, img_size=64, dec_layers=(1, 1, 1, 1),
        dec_channels=(32, 16, 16, 8), trans_dec_layers=(0, 0, 1), num_queries=8, trans_drop_path=0.0,
        query_dim=32, base_filters=16, ffn_dim=64, num_heads=2, bn_momentum=0.9,
        backbone_overrides=dict(depths=(1, 1, 1, 1), dims=(16, 32, 32, 64), drop_path_rate=0.0))
    runs = [("Mask2Former", m2f, PanopticSegmentationTask(NUM_CLASSES, THING_IDS, criterion_args=dict(num_points=256)),
             optax.adamw(2e-3, weight_decay=0.0)),
            ("kMaX-DeepLab", kmax, PanopticSegmentationTask(
                NUM_CLASSES, THING_IDS, criterion="kmax", object_threshold=0.5,
                criterion_args=dict(pixel_insdis_sample_k=256, aux_semantic_sample_k=256)), optax.adam(5e-3))]
    train, val = _batch("train", a.train_images), _batch("val", a.val_images)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; {a.train_images} train / {a.val_images} val "
          f"scenes, 64 px, batch {a.batch}, {a.seconds:.0f} s of training per model", flush=True)
    for name, model, task, tx in runs:
        variables = numpy_variables(model, train["image"][:1])
        params, stats = variables["params"], variables.get("batch_stats")
        mutable = ["batch_stats"] if stats is not None else False

        @jax.jit
        def step(params, stats, opt, batch, rng):
            def loss_fn(p):
                v = {"params": p, **({"batch_stats": stats} if stats is not None else {})}
                out = model.apply(v, batch["image"], train=True, rngs={"dropout": rng}, mutable=mutable)
                out, upd = out if mutable else (out, {})
                return task.loss(out, batch, rng)[0], upd.get("batch_stats")

            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), stats, opt, loss

        eval_step = jax.jit(steps.make_eval_step(model, task))

        def evaluate(params, stats):
            sums = None
            for i in range(0, a.val_images, a.batch):
                b = {k: v[i:i + a.batch] for k, v in val.items()}
                s = jax.device_get(eval_step(params, stats, {**b, "mask": np.ones(len(b["image"]), np.float32)}))
                sums = s if sums is None else {k: sums[k] + s[k] for k in s}
            count = sums.pop("count")
            r = task.finish_eval({k: float(v) / count for k, v in sums.items()})
            return r["PQ"], r["mIoU"]

        opt = tx.init(params)
        pq, miou = evaluate(params, stats)
        print(f"{name}: step 0 (untrained): PQ {pq:.1f} mIoU {miou:.1f}", flush=True)
        rng = np.random.default_rng(0)
        marks = [a.seconds / 4, a.seconds / 2, a.seconds]
        t0, i, losses = None, 0, []
        while marks:
            idx = rng.choice(a.train_images, a.batch, replace=False)
            params, stats, opt, loss = step(params, stats, opt, {k: v[idx] for k, v in train.items()},
                                            jax.random.key(i))
            losses.append(float(loss))
            i += 1
            if t0 is None:  # the first step compiles: the budget starts after it
                t0 = time.perf_counter()
                continue
            if time.perf_counter() - t0 >= marks[0]:
                elapsed = time.perf_counter() - t0
                pq, miou = evaluate(params, stats)
                print(f"{name}: step {i} ({elapsed:.0f} s, {i / max(elapsed, 1e-9):.1f} steps/s): loss "
                      f"{np.mean(losses[-10:]):.2f} (first 10: {np.mean(losses[:10]):.2f}), PQ {pq:.1f} "
                      f"mIoU {miou:.1f}", flush=True)
                marks.pop(0)
                t0 += time.perf_counter() - t0 - elapsed  # evaluation time is not training time


def throughput(a):
    import jax
    import numpy as np
    import optax
    import torch
    import transformers

    import jaxformers as jf
    from train.seg_data import NUM_CLASSES, THING_IDS
    from train.tasks_seg import PanopticSegmentationTask

    torch.manual_seed(0)
    swin = transformers.SwinConfig(image_size=a.size, embed_dim=48, depths=[2, 2, 6, 2], num_heads=[2, 4, 8, 16],
                                   window_size=7, drop_path_rate=0.0,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, feature_size=128, mask_feature_size=128, hidden_dim=128, encoder_feedforward_dim=512,
        dim_feedforward=512, encoder_layers=6, decoder_layers=10, num_attention_heads=8, num_queries=50,
        num_labels=NUM_CLASSES, train_num_points=a.points)
    ref = transformers.Mask2FormerForUniversalSegmentation(config).train()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        module, variables = jf.from_pretrained(tmp)
    params = variables["params"]
    batch = _batch("train", a.batch, size=a.size)
    task = PanopticSegmentationTask(NUM_CLASSES, THING_IDS, criterion_args=dict(num_points=a.points))
    tx = optax.adamw(1e-4, weight_decay=0.05)

    @jax.jit
    def step(params, opt, rng):
        def loss_fn(p):
            return task.loss(module.apply({"params": p}, batch["image"], train=True), batch, rng)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    opt = tx.init(params)
    t = time.perf_counter()
    params, opt, loss = jax.block_until_ready(step(params, opt, jax.random.key(0)))
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(a.steps):
        params, opt, loss = step(params, opt, jax.random.key(i + 1))
    jax.block_until_ready(loss)
    jax_s = (time.perf_counter() - t) / a.steps

    pixel_values = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    mask_labels, class_labels = [], []
    for b in range(a.batch):
        ids = [s for s in range(batch["segment_classes"].shape[1])
               if batch["segment_classes"][b, s] >= 0 and (batch["panoptic"][b] == s + 1).any()]
        mask_labels.append(torch.from_numpy(np.stack([batch["panoptic"][b] == s + 1 for s in ids]).astype(np.float32)))
        class_labels.append(torch.tensor([int(batch["segment_classes"][b, s]) for s in ids]))
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.05)

    def torch_step():
        topt.zero_grad()
        out = ref(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
        out.loss.backward()
        topt.step()
        return float(out.loss)

    torch_step()
    t = time.perf_counter()
    for _ in range(a.steps):
        torch_step()
    torch_s = (time.perf_counter() - t) / a.steps
    n = sum(p.numel() for p in ref.parameters())
    print(f"jax {jax.__version__} / torch {torch.__version__} (threads {torch.get_num_threads()}) / transformers "
          f"{transformers.__version__}; Mask2Former, Swin depths 2-2-6-2 embed 48 window 7, 6 encoder + 10 decoder "
          f"layers, width 128, 50 queries, {n / 1e6:.2f}M parameters; batch {a.batch} x {a.size} px, "
          f"{a.points} points, AdamW", flush=True)
    print(f"jaxformers: {jax_s:.3f} s/step ({a.batch / jax_s:.2f} img/s; first step with compile {compile_s:.1f} s); "
          f"transformers PyTorch: {torch_s:.3f} s/step ({a.batch / torch_s:.2f} img/s); ratio torch/jax "
          f"{torch_s / jax_s:.2f}x", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("part", choices=["curves", "throughput"])
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--train-images", type=int, default=128)
    p.add_argument("--val-images", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--points", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    curves(a) if a.part == "curves" else throughput(a)


if __name__ == "__main__":
    main()
