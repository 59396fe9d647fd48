"""``python -m train.ofb_search --config train/configs/ofb_search.py --workdir DIR``: the OFB search.

Trains (or loads) the host, runs ``jaxformers.compress.ofb.search`` on the embedded digits toward
the configured FLOPs target, settles any module still undecided when the epochs run out on its
best candidate, exports the subnet as a plain ViT, fine-tunes it, and writes to the workdir:
``subnet.json`` (the host's model name and the ``create_model`` overrides of the exported ViT),
``subnet.npz`` (its fine-tuned parameters) and ``metrics.jsonl`` (one line per search step, then
the summary). ``load_subnet(workdir)`` gives the exported model and its variables back.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

import jaxformers as jf
from jaxformers.compress import ofb
from train import config_lib
from train.input_pipeline import load_digits_split


def _data(size: int, split: str):
    images, labels = load_digits_split(split)
    x = images[..., 0].astype(np.float32) / 255.0
    x = np.kron(x, np.ones((size // 8, size // 8), np.float32))
    return np.repeat(x[..., None], 3, axis=-1) * 2.0 - 1.0, labels


def _batches(x, y, batch, seed):
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.permutation(len(y))
        for i in range(0, len(y) - batch + 1, batch):
            yield jnp.asarray(x[idx[i:i + batch]]), jnp.asarray(y[idx[i:i + batch]])


def _train(apply, params, data, steps, lr):
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), max(steps, 2)), weight_decay=0.05)
    opt = tx.init(params)

    @jax.jit
    def step(p, opt, x, y):
        loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean())(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt

    for _ in range(steps):
        params, opt = step(params, opt, *next(data))
    return params


def _accuracy(apply, x, y):
    fn = jax.jit(apply)
    return float(np.mean(np.concatenate([np.argmax(fn(jnp.asarray(x[i:i + 256])), -1) for i in range(0, len(y), 256)])
                         == y))


def run(config, workdir: str) -> dict:
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    c = config.ofb
    host = jf.create_model(config.model.name, **config.model.overrides)
    size = host.img_size
    x_tr, y_tr = _data(size, "train")
    x_te, y_te = _data(size, "test")
    data = _batches(x_tr, y_tr, config.batch_size, config.seed)
    if c.host_checkpoint:
        variables = jf.load_pretrained(config.model.name, c.host_checkpoint, **config.model.overrides)
    else:
        params = nn.unbox(jax.jit(lambda r: host.init({"params": r}, jnp.asarray(x_te[:1])))(
            jax.random.key(config.seed)))["params"]
        variables = {"params": _train(lambda p, x: host.apply({"params": p}, x), params, data, c.host_steps, 2e-3)}
    host_acc = _accuracy(lambda x: host.apply(variables, x), x_te, y_te)
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
    tuned = _train(lambda p, x: dense.apply({"params": p}, x), dv["params"], data, c.finetune_steps, c.lr)
    summary = {"host_accuracy": host_acc, "host_gflops": total, "target_gflops": c.target_fraction * total,
               "searched_gflops": searched, "target_error": searched / (c.target_fraction * total) - 1,
               "settled_after_search": settled, "subnet_params": jf.count_params(dense),
               "host_params": jf.count_params(host),
               "subnet_accuracy": _accuracy(lambda x: dense.apply({"params": tuned}, x), x_te, y_te)}
    with open(out / "metrics.jsonl", "w") as f:
        for h in hist:
            f.write(json.dumps(h) + "\n")
        f.write(json.dumps({"summary": summary}) + "\n")
    overrides = {k: getattr(dense, k) for k in ("img_size", "patch_size", "num_classes", "embed_dim", "depth",
                                                 "num_heads")}
    overrides["block_overrides"] = [dict(b) for b in dense.block_overrides]
    (out / "subnet.json").write_text(json.dumps({"model": config.model.name, "overrides": overrides}, indent=1))
    np.savez(out / "subnet.npz", **{"/".join(k): np.asarray(v) for k, v in flatten_dict({"params": tuned}).items()})
    log(json.dumps(summary))
    return summary


def load_subnet(workdir: str) -> tuple[nn.Module, dict]:
    """The searched, fine-tuned subnet a ``run`` wrote to ``workdir``: (model, {"params": ...})."""
    out = pathlib.Path(workdir)
    spec = json.loads((out / "subnet.json").read_text())
    overrides = dict(spec["overrides"])
    overrides["block_overrides"] = tuple(overrides["block_overrides"])
    model = jf.create_model(spec["model"], **overrides)
    with np.load(out / "subnet.npz") as f:
        flat = {tuple(k.split("/")): jnp.asarray(f[k]) for k in f.files}
    return model, unflatten_dict(flat)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.ofb_search", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True)
    args, overrides = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = config_lib.resolve_config(args.config, [o[2:] for o in overrides if o.startswith("--config.")])
    run(config, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
