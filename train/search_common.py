"""What the architecture-search runners share (``train/ofb_search.py``, ``train/vit_resnas_search.py``):
the command line (``--config``, ``--workdir``, ``--config.<field>=<value>`` overrides), the embedded
digits as RGB images of a given size, endless shuffled batches, a few AdamW steps of
cross-entropy, accuracy in fixed-size chunks (also the hyperspectral task's), and the two files a searched subnet is saved in
(``subnet.json``: the registered model name and its ``create_model`` overrides; ``subnet.npz``: its
variables) with the loader that gives it back."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

import jaxformers as jf
from train import config_lib
from train.input_pipeline import load_digits_split


def digit_images(size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The embedded digits' ``split`` as (N, size, size, 3) float32 in [-1, 1] (each 8x8 pixel repeated
    ``size // 8`` times per side) and their labels."""
    if size % 8:
        raise ValueError(f"digit images are 8x8 pixels scaled by an integer: size must be a multiple of 8, got {size}")
    images, labels = load_digits_split(split)
    x = images[..., 0].astype(np.float32) / 255.0
    x = np.kron(x, np.ones((size // 8, size // 8), np.float32))
    return np.repeat(x[..., None], 3, axis=-1) * 2.0 - 1.0, labels


def batches(x: np.ndarray, y: np.ndarray, batch: int, seed: int) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Endless ``(images, labels)`` batches, a new permutation every pass (the remainder dropped)."""
    if batch > len(y):
        raise ValueError(f"batch {batch} is larger than the {len(y)} examples")
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.permutation(len(y))
        for i in range(0, len(y) - batch + 1, batch):
            yield jnp.asarray(x[idx[i:i + batch]]), jnp.asarray(y[idx[i:i + batch]])


def fit(model: nn.Module, variables: dict, data: Iterator, steps: int, lr: float, *, train: bool = False,
        seed: int = 0) -> dict:
    """``steps`` AdamW steps (weight decay 0.05, warm-up over a tenth then cosine decay from ``lr``) of the
    softmax cross-entropy of ``model``'s logits on ``data``; one compiled step. ``train=True`` applies the
    model in training mode (dropout / drop path / sampled subnets drawn from the ``dropout`` key of each
    step, BatchNorm statistics updated); otherwise deterministically. Returns the new variables."""
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), max(steps, 2)), weight_decay=0.05)
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    mutable = [k for k in rest if k == "batch_stats"] if train else False
    opt = tx.init(params)

    @jax.jit
    def step(params, rest, opt, x, y, key):
        def loss_fn(p):
            out = model.apply({"params": p, **rest}, x, train=train, rngs={"dropout": key}, mutable=mutable)
            logits, updates = out if mutable else (out, {})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        (_, updates), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), {**rest, **updates}, opt

    for i in range(steps):
        params, rest, opt = step(params, rest, opt, *next(data), jax.random.key(seed + i))
    return {"params": params, **rest}


def accuracy(apply: Callable[[jax.Array], jax.Array], x: np.ndarray, y: np.ndarray, chunk: int = 256) -> float:
    """Top-1 accuracy of ``apply(images) -> logits`` (a jitted function, called as is) over ``(x, y)``, in
    chunks of ``chunk`` examples (the last one padded: one compiled shape)."""
    predictions = []
    for i in range(0, len(y), chunk):
        part = x[i:i + chunk]
        padded = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), part.dtype)])
        predictions.append(np.argmax(np.asarray(apply(jnp.asarray(padded))), -1)[:len(part)])
    return float(np.mean(np.concatenate(predictions) == y))


def save_subnet(workdir: str | pathlib.Path, model_name: str, overrides: dict[str, Any], variables: dict) -> None:
    """``subnet.json`` ({"model": model_name, "overrides": overrides}, JSON-able values) and ``subnet.npz``
    (``variables`` flattened with ``/``) in ``workdir``."""
    out = pathlib.Path(workdir)
    (out / "subnet.json").write_text(json.dumps({"model": model_name, "overrides": overrides}, indent=1))
    np.savez(out / "subnet.npz", **{"/".join(k): np.asarray(v) for k, v in flatten_dict(variables).items()})


def load_subnet(workdir: str | pathlib.Path) -> tuple[nn.Module, dict]:
    """The model and variables :func:`save_subnet` wrote to ``workdir`` (list-valued overrides back as tuples)."""
    out = pathlib.Path(workdir)
    spec = json.loads((out / "subnet.json").read_text())
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["overrides"].items()}
    model = jf.create_model(spec["model"], **overrides)
    with np.load(out / "subnet.npz") as f:
        flat = {tuple(k.split("/")): jnp.asarray(f[k]) for k in f.files}
    return model, unflatten_dict(flat)


def main(run: Callable[[Any, str], dict], module: str, doc: str, argv: Sequence[str] | None = None) -> int:
    """``python -m <module> --config FILE[:ARG] --workdir DIR [--config.<field>=<value> ...]``: resolves the
    config and calls ``run(config, workdir)``."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True)
    args, overrides = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = config_lib.resolve_config(args.config, [o[2:] for o in overrides if o.startswith("--config.")])
    run(config, args.workdir)
    return 0
