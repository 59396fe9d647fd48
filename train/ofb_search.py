"""``python -m train.ofb_search --config train/configs/ofb_search.py --workdir DIR``: the OFB search.

Trains (or loads) the host, runs ``jaxformers.compress.ofb.search`` on the embedded digits toward
the configured FLOPs target, settles any module still undecided when the epochs run out on its
best candidate, exports the subnet as a plain ViT, fine-tunes it, and writes to the workdir:
``subnet.json`` (the host's model name and the ``create_model`` overrides of the exported ViT),
``subnet.npz`` (its fine-tuned parameters) and ``metrics.jsonl`` (one line per search step, then
the summary). ``load_subnet(workdir)`` gives the exported model and its variables back.
"""
from __future__ import annotations

import functools
import json
import pathlib
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxformers as jf
from jaxformers.compress import ofb
from train import search_common
from train.search_common import accuracy, batches, digit_images, fit, load_subnet, save_subnet

__all__ = ["run", "load_subnet", "main"]


def run(config, workdir: str) -> dict:
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    c = config.ofb
    host = jf.create_model(config.model.name, **config.model.overrides)
    size = host.img_size
    x_tr, y_tr = digit_images(size, "train")
    x_te, y_te = digit_images(size, "test")
    data = batches(x_tr, y_tr, config.batch_size, config.seed)
    if c.host_checkpoint:
        variables = jf.load_pretrained(config.model.name, c.host_checkpoint, **config.model.overrides)
    else:
        params = nn.unbox(jax.jit(lambda r: host.init({"params": r}, jnp.asarray(x_te[:1])))(
            jax.random.key(config.seed)))["params"]
        variables = fit(host, {"params": params}, data, c.host_steps, 2e-3)
    host_acc = accuracy(functools.partial(jax.jit(host.apply), variables), x_te, y_te)
    model, sv = ofb.init_search(host, variables, jax.random.key(config.seed + 1))
    total = float(ofb.flops(model)[0])
    per_epoch = max(len(y_tr) // config.batch_size, 1)
    log = lambda s: print(s, flush=True)  # noqa: E731
    steps = c.max_search_steps or c.epochs * per_epoch
    model, sv, hist = ofb.search(model, sv, data, target_gflops=c.target_fraction * total, steps=steps,
                                 steps_per_epoch=per_epoch, warmup_epochs=c.warmup_epochs, lr=c.lr, lr_arch=c.lr_arch,
                                 thresh=c.thresh, w_head=c.w_head, w_mlp=c.w_mlp, w_embed=c.w_embed,
                                 w_flops=c.w_flops, label_smoothing=c.label_smoothing, log=log)
    settled = not ofb.finished(model)
    while not ofb.finished(model):
        peaked = {k: (jnp.where(jnp.arange(a.size).reshape(a.shape) == jnp.argmax(a), 30.0, -30.0)
                      if k.endswith("alpha") else a) for k, a in sv["ofb"].items()}
        model, sv, _ = ofb.compress(model, {**sv, "ofb": peaked}, w_p=hist[-1]["w_p"] if hist else 0.1)
    searched = float(ofb.flops(model)[1])
    dense, dv = ofb.export(model, sv)
    tuned = fit(dense, {"params": dv["params"]}, data, c.finetune_steps, c.lr)
    summary = {"host_accuracy": host_acc, "host_gflops": total, "target_gflops": c.target_fraction * total,
               "searched_gflops": searched, "target_error": searched / (c.target_fraction * total) - 1,
               "settled_after_search": settled, "subnet_params": jf.count_params(dense),
               "host_params": jf.count_params(host),
               "subnet_accuracy": accuracy(functools.partial(jax.jit(dense.apply), tuned), x_te, y_te)}
    with open(out / "metrics.jsonl", "w") as f:
        for h in hist:
            f.write(json.dumps(h) + "\n")
        f.write(json.dumps({"summary": summary}) + "\n")
    overrides = {k: getattr(dense, k) for k in ("img_size", "patch_size", "num_classes", "embed_dim", "depth",
                                                 "num_heads")}
    overrides["block_overrides"] = [dict(b) for b in dense.block_overrides]
    save_subnet(out, config.model.name, overrides, tuned)
    log(json.dumps(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return search_common.main(run, "train.ofb_search", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
