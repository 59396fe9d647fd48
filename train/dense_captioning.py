"""3-D dense captioning with BiCA on the generated rooms (``train/scenes3d.py``).

``make_train_step`` is one jitted step of the whole objective of ``jaxformers.models.bica``: the forward
pass (BatchNorm in training mode), the detection losses (``set_criterion``: the set loss of every instance-
decoder layer, each layer matched on its own by the Hungarian algorithm on the host, plus 10 x the vote loss)
and the teacher-forced caption cross-entropy of the queries the last layer matched (weight 5, as
Vote2Cap-DETR's captioner), AdamW with global-norm clipping (Vote2Cap-DETR: lr 5e-4 cosine, weight decay
0.1, clip 0.1 on its 1080-epoch schedule; the defaults here suit a few hundred steps on a CPU).

``evaluate`` decodes captions (greedy, or beam search with ``num_beams``) for the queries with objectness
> 0.5 and scores them with the m@kIoU protocol (``jaxformers.metrics.captioning.dense_caption_scores``), plus
the mean best IoU of the annotated objects.

Run: ``PYTHONPATH=. python -m train.dense_captioning --steps 300`` (prints the losses and the metrics of
the untrained and trained model on the same held-out rooms; ``--no-context``: the "V_o only" ablation
without context queries, context decoder and BiCA module; ``--beams 5``: captions by beam search, as
Vote2Cap-DETR evaluates).
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.metrics.captioning import box_iou_3d, dense_caption_scores
from jaxformers.models.bica import LOSS_WEIGHTS, caption_loss, matched_prefix, set_criterion
from train.scenes3d import VOCAB, Rooms, decode

# A small BiCA for the generated rooms (1024 points of xyz + rgb, 3 classes, the rooms' vocabulary).
SMALL = dict(in_features=3, num_classes=3, dim=64, preenc_npoints=256, preenc_radius=0.3, preenc_nsample=16,
             preenc_mlp=(32, 64), enc_heads=4, enc_ffn=128, enc_radii=(0.8, 1.6, 3.2), interim_radius=0.5,
             interim_nsample=16, num_queries=32, vote_radius=0.4, vote_nsample=16, num_context=16, context_radius=1.5,
             context_nsample=16, dec_layers=2, dec_heads=4, dec_ffn=128, vocab_size=len(VOCAB), caption_dim=64,
             caption_layers=2, caption_heads=4, max_caption_len=12, caption_positions=16)


def loss_fn(model, params, extra, batch, rng, train: bool = True):
    """(total loss, (terms, new batch_stats))."""
    variables = {"params": params, **extra}
    if train:
        out, updates = model.apply(variables, batch["points"], train=True, rngs={"dropout": rng},
                                   mutable=["batch_stats"])
    else:
        out, updates = model.apply(variables, batch["points"]), {}
    det, terms, assign = set_criterion(out, batch["gt_center"], batch["gt_size"], batch["gt_class"], batch["gt_valid"])
    logits = model.apply(variables, matched_prefix(out["prefix"], assign), batch["gt_tokens"], method="caption_logits")
    cap = caption_loss(logits, batch["gt_tokens"], batch["gt_valid"] & (assign >= 0))
    terms = {**terms, "caption": cap}
    return det + LOSS_WEIGHTS["caption"] * cap, (terms, updates.get("batch_stats", extra.get("batch_stats")))


def make_train_step(model, tx, jit=jax.jit):
    """``step(params, extra, opt_state, batch, rng) -> (params, extra, opt_state, loss, terms)``, compiled by
    ``jit``."""

    @jit
    def step(params, extra, opt_state, batch, rng):
        (loss, (terms, stats)), grads = jax.value_and_grad(
            lambda p: loss_fn(model, p, extra, batch, rng), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        extra = {**extra, "batch_stats": stats} if stats is not None else extra
        return optax.apply_updates(params, updates), extra, opt_state, loss, terms

    return step


def _arrays(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "captions"}


def evaluate(model, variables, data: dict, threshold: float = 0.5, num_beams: int = 1) -> dict[str, float]:
    """m@kIoU (CIDEr-D, BLEU-4, METEOR (exact), ROUGE-L at IoU 0.25 / 0.5) and the mean best IoU of the
    annotated objects over the scenes of ``data`` (a ``Rooms.batch``); captions greedy, or by beam search with
    ``num_beams`` (Vote2Cap-DETR's evaluation: 5)."""
    out = jax.jit(model.apply)(variables, jnp.asarray(data["points"]))
    tokens = np.asarray(jax.jit(lambda v, p: model.apply(v, p, num_beams=num_beams, method="generate"))(
        variables, out["prefix"]))
    scenes, best = [], []
    for b in range(len(data["points"])):
        keep = np.asarray(out["objectness"][b]) > threshold
        valid = data["gt_valid"][b]
        sc = dict(pred_centers=np.asarray(out["center"][b])[keep], pred_sizes=np.asarray(out["size"][b])[keep],
                  pred_captions=[decode(t) for t in tokens[b][keep]], gt_centers=data["gt_center"][b][valid],
                  gt_sizes=data["gt_size"][b][valid], gt_captions=[c for c in data["captions"][b]])
        scenes.append(sc)
        if keep.any():
            best += list(box_iou_3d(sc["pred_centers"], sc["pred_sizes"], sc["gt_centers"], sc["gt_sizes"]).max(0))
        else:
            best += [0.0] * int(valid.sum())
    return {**dense_caption_scores(scenes), "mean_best_iou": float(np.mean(best)),
            "kept_per_scene": float(np.mean([len(s["pred_captions"]) for s in scenes]))}


def fit(model, variables, rooms: Rooms, *, steps: int, batch: int = 8, lr: float = 1e-3, seed: int = 0,
        log_every: int = 0, tx: optax.GradientTransformation | None = None, jit=jax.jit) -> tuple[dict, list[dict]]:
    """Train on fresh rooms every step (seeded); returns (variables, per-step loss terms). ``tx`` defaults to
    AdamW (weight decay 0.1, cosine decay from ``lr``) after global-norm clipping at 1."""
    if tx is None:
        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.1))
    params = variables["params"]
    extra = {k: v for k, v in variables.items() if k != "params"}
    opt_state = tx.init(params)
    step = make_train_step(model, tx, jit)
    history = []
    rng = jax.random.key(seed)
    for i in range(steps):
        data = _arrays(rooms.batch(batch, seed=10_000 + seed * 100_000 + i))
        rng, sub = jax.random.split(rng)
        params, extra, opt_state, loss, terms = step(params, extra, opt_state, data, sub)
        history.append({"loss": float(loss), **{k: float(v) for k, v in terms.items()}})
        if log_every and (i % log_every == 0 or i == steps - 1):
            print(i, {k: round(v, 4) for k, v in history[-1].items()}, flush=True)
    return {"params": params, **extra}, history


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-scenes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beams", type=int, default=1, help="beam search width of the evaluation (1: greedy)")
    parser.add_argument("--no-context", action="store_true",
                        help='the "V_o only" ablation (no context queries, context decoder or BiCA module)')
    args = parser.parse_args(argv)
    import jaxformers as jf

    rooms = Rooms()
    model = jf.create_model("bica_scanrefer", **SMALL, use_context=not args.no_context)
    sample = jnp.asarray(rooms.batch(2, seed=1)["points"])
    variables = jax.jit(model.init)({"params": jax.random.key(args.seed), "dropout": jax.random.key(1)}, sample)
    print("parameters:", jf.count_params(model), flush=True)
    held_out = rooms.batch(args.eval_scenes, seed=999_999)
    before = evaluate(model, variables, held_out, num_beams=args.beams)
    print("untrained:", {k: round(v, 4) for k, v in before.items()})
    t = time.time()
    variables, history = fit(model, variables, rooms, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                             log_every=max(1, args.steps // 10))
    print(f"trained {args.steps} steps in {time.time() - t:.1f} s")
    after = evaluate(model, variables, held_out, num_beams=args.beams)
    print("trained:", {k: round(v, 4) for k, v in after.items()})
    first = {k: np.mean([h[k] for h in history[:10]]) for k in history[0]}
    last = {k: np.mean([h[k] for h in history[-10:]]) for k in history[0]}
    print("loss terms, mean of the first / last 10 steps:",
          {k: (round(first[k], 4), round(last[k], 4)) for k in first})


if __name__ == "__main__":
    main()
