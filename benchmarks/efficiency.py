"""Efficient-transformer methods on one trained host, measured against it in the same run.

    python benchmarks/efficiency.py                 # ~20-30 min on a 2-core CPU
    python benchmarks/efficiency.py --smoke         # seconds: tiny sizes, few steps (plumbing only)
    python benchmarks/efficiency.py --only tokens,ofb --out results.json

Data and host: the quick start's (``train/configs/quickstart.py``): scikit-learn's digits (1,797
real 8x8 scans, the fixed 1,438 / 359 split of ``train.input_pipeline``), bilinear resize to 32x32
RGB (64x64 for the PVTv2 host), a random shift of up to 4 pixels per image as augmentation;
``vit_tiny_patch16_224`` shrunk to 8x8 patches -> 16 tokens + [CLS], width 64, 4 blocks of 4 heads,
MLP ratio 2 (148k parameters), trained from scratch inside the script with the quick-start recipe
(AdamW lr 2e-3, weight decay 0.05, clipping 1.0, warmup + cosine, label smoothing 0.1, 800 steps of
128: ~97% test accuracy in about a minute on a 2-core CPU). Every row reports test accuracy, compiled FLOPs per image (XLA
``cost_analysis`` of the jitted forward at batch 256), measured throughput (images/s, median of
repeated calls on this machine) and parameters, with the ratios against the unreduced host measured
in the same process:

- ``tokens``: Token Transforming, ToMe and [CLS]-attention pruning, training-free, at the smallest
  per-layer r that removes >= 30% of the host's FLOPs (the same r for the three);
- ``iared``: IA-RED^2 interpreters (budgets per group) trained by REINFORCE with the backbone
  frozen, then jointly fine-tuned;
- ``axformer``: greedy accuracy-driven removal on a validation split carved from the training set,
  then selective top-k hard attention;
- ``dsformer``: every linear factorized at half its weights (D x 2:4-sparse S) and fine-tuned by the
  STF, against the SVD low-rank factorization at the same budget fine-tuned the same steps (FLOPs
  are those of the dense emulation: XLA CPU has no 2:4 kernels, the saving is in stored weights);
- ``ofb``: OFB search from the host toward half its FLOPs (official formula), export, fine-tune;
- ``ecoformer``: a PVTv2 host (MSA in stages 1-3, official step 1) switched to EcoFormer (hash
  learned on the first batch, official step 2), and the attention cost exponent over 4 token counts;
- ``wide``: deep (4 x 2 heads) against wide (1 x 8 heads) byte-level classifiers trained the same
  steps on generated ListOps-style expressions (the LRA family of the paper's tasks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jaxformers as jf  # noqa: E402
from train.search_common import accuracy  # noqa: E402  (top-1 in fixed-size chunks: one compiled shape)

# The quick-start model (train/configs/quickstart.py): vit_tiny_patch16_224 shrunk to 8x8 patches of
# 32x32 digits -> 16 tokens + [CLS], width 64, 4 blocks of 4 heads, MLP ratio 2 (148k parameters).
HOST_NAME = "vit_tiny_patch16_224"
HOST = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10)


# ---------------------------------------------------------------------------------------------
# Data


def digits(size: int = 32):
    """(x_train, y_train, x_test, y_test): the quick-start data (``train/configs/quickstart.py``): the
    fixed digits split of ``train.input_pipeline`` (1,438 / 359), bilinear resize to size x size
    (``train.preprocess.resize``), RGB, values in [-1, 1]."""
    from train.input_pipeline import load_digits_split
    from train.preprocess import resize, to_rgb, value_range

    def prep(images):
        ops = (resize(size), to_rgb, value_range(-1.0, 1.0))
        out = []
        for image in images:
            ex = {"image": image}
            for op in ops:
                ex = op(ex, None)
            out.append(ex["image"])
        return np.stack(out).astype(np.float32)

    (xi, y), (ti, yt) = load_digits_split("train"), load_digits_split("test")
    return prep(xi), y.astype(np.int32), prep(ti), yt.astype(np.int32)


def batches(x, y, batch: int, seed: int = 0, shift: int = 4):
    """Endless shuffled batches, each image shifted by its own random offset of up to ``shift``
    pixels (the quick-start ``random_crop(size, pad=shift)``: padding is black, -1)."""
    rng = np.random.default_rng(seed)
    n, h, w = x.shape[:3]
    padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), constant_values=-1.0) if shift else x
    rows, cols = np.arange(h), np.arange(w)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            idx = order[i:i + batch]
            if shift:
                dy, dx = rng.integers(0, 2 * shift + 1, (2, batch))
                xb = padded[idx[:, None, None], (dy[:, None] + rows)[:, :, None], (dx[:, None] + cols)[:, None, :]]
            else:
                xb = x[idx]
            yield jnp.asarray(xb), jnp.asarray(y[idx])


# ---------------------------------------------------------------------------------------------
# Training and measuring


def train(apply_fn: Callable, params: Any, data, steps: int, lr: float = 2e-3, tx=None, log=None) -> Any:
    """AdamW (warmup + cosine, clipping) on softmax cross-entropy with label smoothing 0.1."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), max(steps, 2))
    tx = tx or optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.05))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y, rng):
        def loss_fn(p):
            logits = apply_fn(p, x, rng)
            targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), 0.1)
            return optax.softmax_cross_entropy(logits, targets).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    for s in range(steps):
        x, y = next(data)
        params, opt, loss = step(params, opt, x, y, jax.random.key(s))
        if log and (s % max(steps // 5, 1) == 0 or s == steps - 1):
            log(f"  step {s}: loss {float(loss):.3f}")
    return params


def flops_per_image(fn: Callable, x, batch: int = 256) -> float:
    xb = jnp.asarray(np.resize(x, (batch,) + x.shape[1:]))
    cost = jax.jit(fn).lower(xb).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) / batch


def throughput(fn: Callable, x, batch: int = 256, repeats: int = 15) -> float:
    xb = jnp.asarray(np.resize(x, (batch,) + x.shape[1:]))
    f = jax.jit(fn)
    f(xb).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(xb).block_until_ready()
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def init_variables(model, x, seed: int = 0) -> dict:
    """``model.init`` on one example, jitted, with plain (unboxed) arrays."""
    return nn.unbox(jax.jit(lambda r: model.init({"params": r}, jnp.asarray(x[:1])))(jax.random.key(seed)))


def n_params(tree) -> int:
    return int(sum(np.size(a) for a in jax.tree_util.tree_leaves(tree)))


class Table:
    def __init__(self, log):
        self.rows, self.log = [], log

    def add(self, group: str, method: str, fn: Callable, x, y, params: int, base: dict | None = None, **extra):
        row = {"group": group, "method": method, "accuracy": accuracy(jax.jit(fn), x, y), "flops": flops_per_image(fn, x),
               "img_s": throughput(fn, x), "params": params, **extra}
        if base is not None:
            row["flops_ratio"] = row["flops"] / base["flops"]
            row["speedup"] = row["img_s"] / base["img_s"]
            row["acc_delta"] = row["accuracy"] - base["accuracy"]
        self.rows.append(row)
        self.log(f"{group:10s} {method:34s} acc {row['accuracy']:.4f}  MFLOPs/img {row['flops'] / 1e6:8.2f}  "
                 f"img/s {row['img_s']:9.0f}  params {params:,}"
                 + (f"  flops x{row['flops_ratio']:.3f} speed x{row['speedup']:.2f} dAcc {row['acc_delta']:+.4f}"
                    if base else ""))
        return row


# ---------------------------------------------------------------------------------------------
# The methods


def run_tokens(table, host, v, xt, yt, base, smoke):
    from jaxformers.compress.token_reduction import token_reduction

    chosen = None
    for r in range(1, 16):
        m = host.clone(token_reduction=token_reduction("transform", r))
        try:
            f = flops_per_image(lambda x: m.apply(v, x), xt)
        except ValueError:
            break
        if f <= 0.7 * base["flops"]:
            chosen = r
            break
    chosen = chosen or 4
    for method in ("transform", "tome", "prune"):
        m = host.clone(token_reduction=token_reduction(method, chosen))
        table.add("tokens", f"{method} r={chosen}/layer (training-free)", lambda x, m=m: m.apply(v, x), xt, yt,
                  n_params(v), base, r=chosen)
    for temp in (0.03, 0.3, 1.0):
        m = host.clone(token_reduction=token_reduction("transform", chosen, temperature=temp))
        table.add("tokens", f"transform r={chosen} temperature {temp}", lambda x, m=m: m.apply(v, x), xt, yt,
                  n_params(v), base, r=chosen)


def run_iared(table, host, v, data, xt, yt, base, smoke, log):
    from jaxformers.compress import ia_red

    n = (HOST["img_size"] // HOST["patch_size"]) ** 2
    budgets = (int(n * 0.75), int(n * 0.5), int(n * 0.35))
    model = host.clone(token_reduction=ia_red.IARed2(group_starts=(1, 2, 3), budgets=budgets, heads=4))
    fresh = init_variables(model, xt, 7)["params"]
    params = {**v["params"], **{k: fresh[k] for k in fresh if k.startswith("interpreter_")}}
    labels = ia_red.interpreter_labels(params)
    steps = 10 if smoke else 300
    for phase, lr_policy, lr_backbone in (("policy", 3e-3, 0.0), ("joint", 1e-3, 2e-4)):
        tx = optax.multi_transform({"policy": optax.adam(lr_policy),
                                    "backbone": optax.adamw(lr_backbone) if lr_backbone else optax.set_to_zero()},
                                   labels)
        opt = tx.init(params)

        @jax.jit
        def step(params, opt, x, y, rng):
            def loss_fn(p):
                rl, metrics = ia_red.reinforce_loss(model, p, x, y, rng)
                if lr_backbone:  # joint fine-tuning: the task loss on the sampled policy trains the backbone
                    logits = model.apply({"params": p}, x, train=True, rngs={"policy": rng, "dropout": rng})
                    rl = rl + optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                return rl, metrics

            (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            u, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, u), opt, metrics

        for s in range(steps):
            x, y = next(data)
            params, opt, metrics = step(params, opt, x, y, jax.random.key(100 + s))
            if s % max(steps // 4, 1) == 0 or s == steps - 1:
                log(f"  IA-RED2 {phase} step {s}: reward {float(metrics['reward']):.3f} kept "
                    f"{float(metrics['kept_fraction']):.3f} acc {float(metrics['accuracy']):.3f}")
        table.add("iared", f"IA-RED2 budgets {budgets}, after {phase} training",
                  lambda x, p=params: model.apply({"params": p}, x), xt, yt, n_params(params), base)


def run_axformer(table, host, v, x_tr, y_tr, xt, yt, base, smoke, log):
    from jaxformers.compress import axformer

    xv, yv = jnp.asarray(x_tr[-300:]), jnp.asarray(y_tr[-300:])
    removed = axformer.search(host, v, xv, yv, tolerance=0.0, kinds=("head", "attn", "mlp"),
                              max_removed=4 if smoke else None, log=log)
    small, params = axformer.prune(host, v["params"], removed)
    table.add("axformer", f"accuracy-driven pruning ({len(removed)} elements)",
              lambda x: small.apply({"params": params}, x), xt, yt, n_params(params), base,
              removed=[str(e) for e in removed])
    sparse, layers = axformer.selective_topk(small, {"params": params}, xv, yv, topk=8, tolerance=0.0)
    table.add("axformer", f"+ top-8 hard attention in layers {layers}",
              lambda x: sparse.apply({"params": params}, x), xt, yt, n_params(params), base)


def run_dsformer(table, host, v, data, xt, yt, base, smoke, log):
    from jaxformers.compress import dsformer

    plan = dsformer.discover(host, jnp.asarray(xt[:1]))
    steps = 10 if smoke else 300
    for name, n, m in (("DSFormer 2:4 (STF)", 2, 4), ("low-rank SVD", 1, 1)):
        fv = dsformer.factorize(v, plan, ratio=0.5, n=n, m=m)
        stored = n_params(fv["params"]) + sum(
            dsformer.count_params(a["D"].shape[0], a["S"].shape[1], a["D"].shape[1], n, m)
            for a in _leaf_dicts(fv["dsformer"]))
        table.add("dsformer", f"{name}, SVD init, no training",
                  lambda x, fv=fv: dsformer.apply(host, fv, x, n=n, m=m), xt, yt, stored, base)
        trained = train(lambda p, x, rng: dsformer.apply(host, {"params": p["params"], "dsformer": p["dsformer"]}, x,
                                                         n=n, m=m),
                        {"params": fv["params"], "dsformer": fv["dsformer"]}, data, steps, lr=5e-4, log=log)
        table.add("dsformer", f"{name}, {steps} fine-tuning steps",
                  lambda x, p=trained: dsformer.apply(host, p, x, n=n, m=m), xt, yt, stored, base)


def _leaf_dicts(tree):
    if isinstance(tree, dict) and "D" in tree:
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _leaf_dicts(v)


def run_ofb(table, host, v, data, xt, yt, base, smoke, log):
    from jaxformers.compress import ofb

    model, sv = ofb.init_search(host, v, jax.random.key(3))
    total = float(ofb.flops(model)[0])
    target = 0.5 * total
    steps, per_epoch = (20, 5) if smoke else (600, 45)
    model, sv, hist = ofb.search(model, sv, data, target_gflops=target, steps=steps, steps_per_epoch=per_epoch,
                                 warmup_epochs=4, lr=5e-4, lr_arch=2e-2, log=log)
    forced = not ofb.finished(model)
    while not ofb.finished(model):  # the budget ran out: settle every module on its best cell
        peaked = {k: (jnp.where(jnp.arange(a.size).reshape(a.shape) == jnp.argmax(a), 30.0, -30.0)
                      if k.endswith("alpha") else a) for k, a in sv["ofb"].items()}
        model, sv, _ = ofb.compress(model, {**sv, "ofb": peaked}, w_p=hist[-1]["w_p"])
    searched = float(ofb.flops(model)[1])
    dense, dv = ofb.export(model, sv)
    log(f"  OFB: target {target:.4f} GFLOPs (official formula), searched {searched:.4f} "
        f"({100 * (searched / target - 1):+.1f}%), forced settle: {forced}")
    table.add("ofb", f"OFB subnet (target {target / total:.0%} of host FLOPs), no fine-tuning",
              lambda x: dense.apply(dv, x), xt, yt, n_params(dv), base, target_gflops=target, searched_gflops=searched,
              forced=forced)
    tuned = train(lambda p, x, rng: dense.apply({"params": p}, x), dv["params"], data, 10 if smoke else 300, lr=5e-4)
    row = table.add("ofb", "OFB subnet + fine-tuning", lambda x: dense.apply({"params": tuned}, x), xt, yt,
                    n_params(tuned), base, target_gflops=target, searched_gflops=searched)
    row["target_error"] = searched / target - 1


def run_ecoformer(table, smoke, log):
    from jaxformers.compress import ecoformer
    from jaxformers.layers import MultiHeadAttention

    x_tr, y_tr, xt, yt = digits(64)
    data = batches(x_tr, y_tr, 64, shift=8)
    cfg = dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), mlp_ratios=(4, 4, 4, 4),
               num_classes=10, ecoformer_anchors=12, ecoformer_topk=4)
    msa = jf.create_model("pvt_v2_b0", **cfg, attn_type="msa")
    p = init_variables(msa, xt, 0)["params"]
    steps = 10 if smoke else 400
    p = train(lambda p, x, rng: msa.apply({"params": p}, x, train=True, rngs={"dropout": rng}), p, data, steps,
              log=log)
    base = table.add("ecoformer", "PVTv2 host, full attention (MSA) in stages 1-3", lambda x: msa.apply({"params": p}, x),
                     xt, yt, n_params(p))
    eco = jf.create_model("pvt_v2_b0", **cfg, attn_type="ecoformer")
    ev = init_variables(eco, xt, 1)
    ep = dict(ev["params"])
    for name, block in p.items():  # to_qk from q, to_v from kv's values (our choice of initialization)
        if name.startswith("stages_") and "blocks" in name and name in ep and "to_qk" in ep[name]["attn"]:
            blk = {k: val for k, val in block.items() if k != "attn"}
            a = block["attn"]["attn"]
            blk["attn"] = {"to_qk": a["q"], "to_v": {"kernel": a["kv"]["kernel"][:, 1], "bias": a["kv"]["bias"][1]},
                           "proj": a["proj"]}
            ep[name] = blk
        else:
            ep[name] = block
    first = next(data)[0]
    ev = ecoformer.learn_hashing(eco, {"params": ep, "hashing": ev["hashing"]}, first, rng=jax.random.key(2))
    table.add("ecoformer", "EcoFormer stages 1-3, hash learned, no fine-tuning",
              lambda x: eco.apply(ev, x), xt, yt, n_params(ev["params"]), base)
    tuned = train(lambda q, x, rng: eco.apply({"params": q, "hashing": ev["hashing"]}, x, train=True,
                                              rngs={"dropout": rng}), ev["params"], data, 10 if smoke else 200,
                  lr=5e-4, log=log)
    table.add("ecoformer", "EcoFormer stages 1-3 + fine-tuning", lambda x: eco.apply({**ev, "params": tuned}, x),
              xt, yt, n_params(tuned), base)

    def attn_flops(module, n):
        x = jnp.zeros((1, n, 64))
        vv = jax.eval_shape(module.init, jax.random.key(0), x)
        c = jax.jit(module.apply).lower(vv, x).compile().cost_analysis()
        return float((c[0] if isinstance(c, list) else c)["flops"])

    ns = np.array([256, 512, 1024, 2048] if not smoke else [64, 128, 256, 512])
    e = [attn_flops(ecoformer.EcoFormerAttention(2), n) for n in ns]
    s = [attn_flops(MultiHeadAttention(2), n) for n in ns]
    slope_e, slope_s = np.polyfit(np.log(ns), np.log(e), 1)[0], np.polyfit(np.log(ns), np.log(s), 1)[0]
    log(f"  attention FLOPs exponent over N={list(ns)}: EcoFormer {slope_e:.3f}, softmax {slope_s:.3f}")
    table.rows.append({"group": "ecoformer", "method": "attention cost exponent", "tokens": ns.tolist(),
                       "ecoformer_flops": e, "softmax_flops": s, "exponent_ecoformer": slope_e,
                       "exponent_softmax": slope_s})


def listops(n: int, max_len: int, seed: int):
    """Generated ListOps-style expressions (MAX / MIN / MED / SM = sum mod 10 over digits and nested
    lists, depth <= 3) as byte ids, and their values 0-9."""
    from jaxformers.models.wide_attention import encode_bytes

    rng = np.random.default_rng(seed)
    ops = {"MAX": max, "MIN": min, "MED": lambda a: sorted(a)[len(a) // 2], "SM": lambda a: sum(a) % 10}

    def expr(depth):
        op = rng.choice(list(ops))
        args, vals = [], []
        for _ in range(rng.integers(2, 5)):
            if depth < 3 and rng.random() < 0.3:
                s, v = expr(depth + 1)
            else:
                v = int(rng.integers(0, 10))
                s = str(v)
            args.append(s)
            vals.append(v)
        return f"[{op} {' '.join(args)} ]", ops[op](vals)

    texts, labels = zip(*(expr(0) for _ in range(n)))
    return encode_bytes(list(texts), max_len), np.array(labels, np.int32)


def run_wide(table, smoke, log):
    from jaxformers.compress import wide

    L = 128
    x_tr, y_tr = listops(256 if smoke else 6000, L, 0)
    xt, yt = listops(128 if smoke else 1000, L, 1)

    def data():
        rng = np.random.default_rng(0)
        while True:
            idx = rng.integers(0, len(y_tr), 64)
            yield jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx])

    deep = jf.create_model("wide_attention_lra_text_deep", max_len=L, num_classes=10, embed_dim=64, head_dim=16,
                           mlp_dim=128, depth=4, num_heads=2, drop_rate=0.0, attn_drop_rate=0.0)
    base = None
    for depth in (4, 1):
        m = wide.widen(deep, depth)
        p = init_variables(m, xt, 0)["params"]
        p = train(lambda p, x, rng, m=m: m.apply({"params": p}, x), p, data(), 20 if smoke else 1500, lr=1e-3,
                  log=log)
        row = table.add("wide", f"{depth} layer(s) x {m.num_heads} heads (8 heads of width 16 in all)",
                        lambda x, m=m, p=p: m.apply({"params": p}, x), xt, yt, n_params(p), base)
        base = base or row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", default="tokens,iared,axformer,dsformer,ofb,ecoformer,wide")
    ap.add_argument("--steps", type=int, default=800, help="host training steps (the quick-start recipe)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"jax {jax.__version__}, devices {jax.devices()}")
    table = Table(log)
    x_tr, y_tr, xt, yt = digits(32)
    host = jf.create_model(HOST_NAME, **HOST)
    data = batches(x_tr, y_tr, 128)
    if only & {"tokens", "iared", "axformer", "dsformer", "ofb"}:
        p = init_variables(host, xt, 0)["params"]
        t = time.time()
        p = train(lambda p, x, rng: host.apply({"params": p}, x), p, data, 30 if args.smoke else args.steps, log=log)
        log(f"host trained in {time.time() - t:.0f} s")
        v = {"params": p}
        base = table.add("host", "quick-start ViT (unreduced)", lambda x: host.apply(v, x), xt, yt, n_params(p))
        if "tokens" in only:
            run_tokens(table, host, v, xt, yt, base, args.smoke)
        if "iared" in only:
            run_iared(table, host, v, data, xt, yt, base, args.smoke, log)
        if "axformer" in only:
            run_axformer(table, host, v, x_tr, y_tr, xt, yt, base, args.smoke, log)
        if "dsformer" in only:
            run_dsformer(table, host, v, data, xt, yt, base, args.smoke, log)
        if "ofb" in only:
            run_ofb(table, host, v, data, xt, yt, base, args.smoke, log)
    if "ecoformer" in only:
        run_ecoformer(table, args.smoke, log)
    if "wide" in only:
        run_wide(table, args.smoke, log)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table.rows, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
