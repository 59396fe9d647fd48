"""``python -m train.vit_resnas_search --config train/configs/vit_resnas_search.py --workdir DIR``: the
ViT-ResNAS pipeline (arXiv 2109.00642, yilunliao/vit-search) on the embedded digits.

1. **Supernet training** (official ``main_supernet.py``): the supernet of ``search.space`` (a
   ``jaxformers.models.vit_resnas.SEARCH_SPACES`` entry) trains with every sub-batch of
   ``search.example_per_arch`` examples under its own sampled architecture (``sample_subnets``); the first
   ``search.warmup_steps`` draw only the widest ``search.warmup_choices`` choices of each layer (the
   official warm-up).
2. **Evolutionary search** (official ``evo_search.py``): ``evolutionary_search`` within a MAC budget of
   ``search.macs_fraction`` of the supernet's MACs, each candidate scored by the top-1 accuracy of the
   supernet under that architecture (inherited weights, one compiled masked pass for every candidate) on
   ``search.val_examples`` images held out of the training split, as the official search scores on a
   held-out part of ImageNet's training set.
3. **The searched network** as a standalone model (``subnet_network_def``) with the inherited weights
   (``subnet_params``), fine-tuned for ``search.finetune_steps`` on the training split (the official code
   retrains the searched network from scratch for 300 epochs; ``finetune_steps=0`` skips it) and measured
   on the test split.

Writes to the workdir ``subnet.json`` (``vit_resnas_tiny`` with the searched ``network_def``),
``subnet.npz`` (its variables) and ``metrics.jsonl`` (the ten best candidates, then the summary);
``load_subnet(workdir)`` gives the model and its variables back. Deviation: plain cross-entropy on the
class token (no patch-token mixup or distillation at digit scale).
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
import numpy as np

import jaxformers as jf
from jaxformers.models.vit_resnas import (SEARCH_SPACES, Subnet, count_macs, evolutionary_search, parse_network_def,
                                          subnet_network_def, subnet_params)
from train import search_common
from train.search_common import accuracy, batches, digit_images, fit, load_subnet, save_subnet

__all__ = ["run", "load_subnet", "main"]


def _fixed_subnet(arch: dict, batch: int) -> Subnet:
    """One architecture for every example of a batch."""
    return Subnet(*(jnp.asarray(np.tile(np.asarray(arch[k])[:, None], (1, batch)), dtype)
                    for k, dtype in (("embed", jnp.int32), ("heads", jnp.int32), ("mlp", jnp.int32), ("layer", bool))))


def run(config, workdir: str) -> dict:
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    c = config.search
    if c.space not in SEARCH_SPACES:
        raise ValueError(f"search.space {c.space!r} is not one of {sorted(SEARCH_SPACES)}")
    space = SEARCH_SPACES[c.space]
    net = parse_network_def(space.supernet)
    size, classes = config.img_size, net[-1][2]
    supernet = jf.create_model("vit_resnas_tiny", network_def=net, img_size=size, num_classes=classes,
                               patch_output=False, search_space=c.space, example_per_arch=c.example_per_arch)
    x_all, y_all = digit_images(size, "train")
    x_val, y_val = x_all[:c.val_examples], y_all[:c.val_examples]
    x_tr, y_tr = x_all[c.val_examples:], y_all[c.val_examples:]
    x_te, y_te = digit_images(size, "test")
    data = batches(x_tr, y_tr, config.batch_size, config.seed)
    log = lambda s: print(s, flush=True)  # noqa: E731

    variables = nn.unbox(jax.jit(supernet.init)(jax.random.key(config.seed), jnp.asarray(x_val[:1])))
    if c.warmup_steps:  # the widest choices only
        variables = fit(supernet.clone(sample_choices=c.warmup_choices), variables, data, c.warmup_steps, c.lr,
                        train=True, seed=config.seed)
    variables = fit(supernet, variables, data, c.supernet_steps, c.lr, train=True, seed=config.seed + 1)
    full = accuracy(functools.partial(jax.jit(supernet.apply), variables), x_te, y_te)
    log(f"supernet trained: full-width test accuracy {full:.4f}")

    masked = jax.jit(lambda x, s: supernet.apply(variables, x, subnet=s))  # one program for every candidate
    chunk = min(c.val_examples, 256)

    def score(arch):
        return accuracy(functools.partial(masked, s=_fixed_subnet(arch, chunk)), x_val, y_val, chunk=chunk)

    supernet_macs = count_macs(net, size)
    budget = c.macs_fraction * supernet_macs
    history = evolutionary_search(space, score, macs_budget=budget, img_size=size, iterations=c.iterations,
                                  population=c.population, parents=c.parents, mutations=c.mutations,
                                  crossovers=c.crossovers, mutate_prob=c.mutate_prob, seed=config.seed)
    best_score, best = history[0]
    searched = subnet_network_def(space, best)
    model = jf.create_model("vit_resnas_tiny", network_def=searched, img_size=size, num_classes=classes,
                            patch_output=False)
    inherited = {"params": subnet_params(variables["params"], space, best), "batch_stats": variables["batch_stats"]}
    predict = jax.jit(model.apply)
    inherited_acc = accuracy(functools.partial(predict, inherited), x_te, y_te)
    tuned = fit(model, inherited, data, c.finetune_steps, c.lr / 2, train=True, seed=config.seed + 2)
    summary = {"supernet_macs": supernet_macs, "macs_budget": budget, "searched_macs": count_macs(searched, size),
               "candidates": len(history), "best_val_accuracy": best_score,
               "supernet_params": jf.count_params(supernet), "searched_params": jf.count_params(model),
               "supernet_full_width_accuracy": full, "inherited_accuracy": inherited_acc,
               "finetuned_accuracy": accuracy(functools.partial(predict, tuned), x_te, y_te),
               "network_def": repr(searched)}
    with open(out / "metrics.jsonl", "w") as f:
        for s, arch in history[:10]:
            f.write(json.dumps({"val_accuracy": s, "macs": count_macs(subnet_network_def(space, arch), size),
                                "arch": arch}) + "\n")
        f.write(json.dumps({"summary": summary}) + "\n")
    save_subnet(out, "vit_resnas_tiny", {"network_def": repr(searched), "img_size": size, "num_classes": classes,
                                         "patch_output": False}, tuned)
    log(json.dumps(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return search_common.main(run, "train.vit_resnas_search", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
