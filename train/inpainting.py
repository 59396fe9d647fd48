"""Image inpainting with PUT (``jaxformers.models.put``) on offline photographs with generated free-form masks.

The data: random crops of scikit-image's photographs (:func:`photo_crops`, through ``train/seg_data.py``
``photo``) or its LFW faces (:func:`faces`), in [-1, 1], and free-form stroke masks drawn like the
official PUT data pipeline (liuqk3/PUT ``image_synthesis/data/utils/util.py`` ``generate_stroke_mask``:
random walks of 5-10 vertices with strokes of random length and brush width until the hole reaches a
random fraction up to 0.5), scaled to the image size (the official parameters are for 256 px:
``maxLength`` 100, brushes 10-30 px). The official pipeline also draws 70% of its masks from a
downloaded irregular-mask data set; offline we draw strokes only. ``mask`` is 1 on visible pixels, 0 in
the holes.

The two stages, as PUT trains them: :func:`train_pvqvae` (reconstruction + commitment, EMA codebook; as
the official data pipeline, with probability 0.2 an image is erased by a second mask, its touched tokens
drawing from the masked half of the dual codebook, and with probability 0.3 the decoder's guiding mask is
empty, so it must render from the codes alone) and :func:`train_transformer` (the frozen P-VQVAE's
features, random quantization of visible tokens, cross-entropy on masked tokens).
:func:`evaluate_inpainting` scores completions on the holes (PSNR on the hole pixels) against the
baseline that fills holes with the mean visible colour. ``python -m train.inpainting`` runs both stages
at a small scale (:func:`run`).

This module is self-contained (functions over arrays and jitted steps) rather than a ``train.tasks`` task:
the second stage needs a frozen first-stage model inside the loss, which the single-model trainer does
not express.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.models.put import (PVQVAE, UQTransformer, inpaint, pvqvae_loss, transformer_inputs,
                                   transformer_loss)
from train.seg_data import photo

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def photo_crops(n: int, size: int, *, names: tuple[str, ...] = PHOTOS, photo_size: int = 128,
                seed: int = 0) -> np.ndarray:
    """``n`` random ``size`` x ``size`` crops, in [-1, 1] float32 (n, size, size, 3), of scikit-image's
    photographs ``names`` (each centre-cropped and resized to ``photo_size``), cycling over them, with random
    horizontal flips."""
    if size > photo_size:
        raise ValueError(f"crop size {size} is larger than the photographs ({photo_size} px)")
    rng = np.random.default_rng(seed)
    photos = [photo(name, photo_size).astype(np.float32) / 127.5 - 1.0 for name in names]
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        y, x = rng.integers(0, photo_size - size + 1, 2)
        crop = photos[i % len(photos)][y:y + size, x:x + size]
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def faces(n: int = 200, size: int = 32) -> np.ndarray:
    """The first ``n`` of scikit-image's 200 LFW faces (25 x 25 grey), resized to ``size``, as RGB in [-1, 1]."""
    import skimage.data
    from skimage.transform import resize

    lfw = np.asarray(skimage.data.lfw_subset(), np.float32)[:n]
    out = np.stack([resize(f, (size, size), anti_aliasing=True) for f in lfw]).astype(np.float32)
    return np.repeat(np.clip(out, 0, 1)[..., None], 3, axis=-1) * 2 - 1


def free_form_mask(rng: np.random.Generator, h: int, w: int, *, max_vertex: int = 10, min_vertex: int = 5,
                   max_length: float | None = None, brush: tuple[float, float] | None = None,
                   hole_ratio: tuple[float, float] | None = (0.0, 0.5), max_parts: int = 3) -> np.ndarray:
    """(h, w) float32 visible-pixel mask (1 visible, 0 hole) of random stroke walks (official
    ``generate_stroke_mask`` / ``np_free_form_mask`` with the PUT training parameters): per walk 5-10
    vertices, each a random angle (mirrored on even steps), a length up to ``max_length`` (default 100 px at
    256, scaled to the image) and a brush width in ``brush`` (default 10-30 px at 256, scaled), drawn as a
    thick segment. Walks are added until the hole covers a fraction drawn uniformly from ``hole_ratio``
    (official ``keep_ratio`` [0, 0.5]; None: 1 to ``max_parts`` walks)."""
    scale = min(h, w) / 256.0
    max_length = 100 * scale if max_length is None else max_length
    lo, hi = (10 * scale, 30 * scale) if brush is None else brush
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    hole = np.zeros((h, w), bool)

    def walk():
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        for i in range(rng.integers(min_vertex, max_vertex + 1)):
            angle = rng.uniform(0, 2 * np.pi)
            angle = 2 * np.pi - angle if i % 2 == 0 else angle
            length = rng.uniform(0, max_length)
            radius = max(rng.uniform(lo, hi) / 2, 0.5)
            ny = float(np.clip(y + length * np.cos(angle), 0, h - 1))
            nx = float(np.clip(x + length * np.sin(angle), 0, w - 1))
            dy, dx = ny - y, nx - x
            t = np.clip(((yy - y) * dy + (xx - x) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
            hole[...] |= (yy - (y + t * dy)) ** 2 + (xx - (x + t * dx)) ** 2 <= radius ** 2
            y, x = ny, nx

    if hole_ratio is None:
        for _ in range(rng.integers(1, max_parts + 1)):
            walk()
    else:
        target = rng.uniform(*hole_ratio)
        for _ in range(1000):  # (a bound: a walk always adds pixels unless the image is all hole)
            if hole.mean() >= target:
                break
            walk()
    return (~hole).astype(np.float32)


def masks(n: int, size: int, seed: int = 0, **kw: Any) -> np.ndarray:
    """``n`` free-form masks (n, size, size) (see :func:`free_form_mask`; ``kw`` its options)."""
    rng = np.random.default_rng(seed)
    return np.stack([free_form_mask(rng, size, size, **kw) for _ in range(n)])


class Trained(NamedTuple):
    variables: Any
    losses: list[float]


def codebook_from_data(model: PVQVAE, variables: Any, images: np.ndarray, seed: int = 0) -> Any:
    """``variables`` with the dual codebook set to encoder features of ``images`` (visible half: features of
    the whole images; masked half: of the images under free-form masks), one prior count per code.

    Not in the official code, which starts from N(0, 1) codes with zero counts: its EMA update then divides
    each code's running sum by its (near-zero) count, so every code unused in the first step is blown far
    away and never chosen again. At the small scale of :func:`run` that collapses the codebook to a few
    codes; starting from data keeps it alive."""
    n_e, e_dim, start = model.n_e, model.e_dim, model.masked_embed_start
    rng = np.random.default_rng(seed)
    encode = jax.jit(lambda v, x, m: model.apply(v, x, m, method="encode"))
    full = np.asarray(encode(variables, images, np.ones(images.shape[:3], np.float32))).reshape(-1, e_dim)
    holes = masks(len(images), images.shape[1], seed=seed + 1)
    masked = np.asarray(encode(variables, images, holes)).reshape(-1, e_dim)
    visible = full[rng.choice(len(full), start, replace=len(full) < start)]
    rest = n_e - start
    codes = np.concatenate([visible, masked[rng.choice(len(masked), rest, replace=len(masked) < rest)]])
    codes = codes + 1e-3 * rng.standard_normal(codes.shape)  # (distinct even where features repeat)
    stats = {**variables["batch_stats"], "quantize": {"embedding": jnp.asarray(codes, jnp.float32),
                                                      "embedding_avg": jnp.asarray(codes, jnp.float32),
                                                      "cluster_size": jnp.ones((n_e,), jnp.float32)}}
    return {**variables, "batch_stats": stats}


def train_pvqvae(model: PVQVAE, variables: Any, images: np.ndarray, *, steps: int, batch: int = 8, lr: float = 2e-4,
                 erase_prob: float = 0.2, zero_mask_prob: float = 0.3, data_init: bool = False,
                 seed: int = 0) -> Trained:
    """Adam (beta1 0, beta2 0.9, as the official P-VQVAE) on L1 + commitment; ``images`` in [-1, 1]. Per example:
    a free-form guiding mask (empty with ``zero_mask_prob``) and, with ``erase_prob``, an erase mask.
    ``data_init``: start the codebook from encoder features (:func:`codebook_from_data`)."""
    if data_init:
        variables = codebook_from_data(model, variables, images[:64], seed=seed)
    tx = optax.adam(lr, b1=0.0, b2=0.9)
    params, stats = variables["params"], variables["batch_stats"]
    opt = tx.init(params)
    size = images.shape[1]

    @jax.jit
    def step(params, stats, opt, x, m, erase):
        def loss_fn(p):
            out, new = model.apply({"params": p, "batch_stats": stats}, x, m, erase, train=True,
                                   mutable=["batch_stats"])
            return pvqvae_loss(out, x, erase), new["batch_stats"]
        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), stats, opt, loss

    rng = np.random.default_rng(seed)
    losses = []
    for i in range(steps):
        idx = rng.integers(0, len(images), batch)
        m = masks(batch, size, seed=seed * 100003 + i) * (rng.random(batch) >= zero_mask_prob)[:, None, None]
        erase = np.where(rng.random(batch)[:, None, None] < erase_prob, masks(batch, size, seed=seed + 7919 * i + 1),
                         1.0).astype(np.float32)
        params, stats, opt, loss = step(params, stats, opt, images[idx], m.astype(np.float32), erase)
        losses.append(float(loss))
    return Trained({"params": params, "batch_stats": stats}, losses)


def train_transformer(pvqvae: PVQVAE, pvqvae_variables: Any, model: UQTransformer, variables: Any,
                      images: np.ndarray, *, steps: int, batch: int = 8, lr: float = 3e-4, seed: int = 0) -> Trained:
    """AdamW (beta 0.9 / 0.95, weight decay 0.01, as the official UQ-Transformer) on masked-token cross-entropy."""
    tx = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.01)
    params = variables["params"]
    opt = tx.init(params)
    size = images.shape[1]

    @jax.jit
    def step(params, opt, x, m, key):
        inputs = transformer_inputs(pvqvae, pvqvae_variables, x, m, key, model.random_quantize)

        def loss_fn(p):
            return transformer_loss(model.apply({"params": p}, inputs.features), inputs)
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    rng = np.random.default_rng(seed)
    losses = []
    for i in range(steps):
        idx = rng.integers(0, len(images), batch)
        params, opt, loss = step(params, opt, images[idx], masks(batch, size, seed=seed * 7 + i + 11),
                                 jax.random.key(i))
        losses.append(float(loss))
    return Trained({"params": params}, losses)


def hole_psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PSNR (dB; images in [-1, 1], i.e. a peak-to-peak range of 2) over the hole pixels (``mask`` 0) of each
    example (B,)."""
    hole = (1.0 - np.asarray(mask, np.float64))[..., None]
    err = np.square((np.asarray(pred, np.float64) - np.asarray(target, np.float64)) / 2.0) * hole
    mse = err.sum(axis=(1, 2, 3)) / (3 * hole.sum(axis=(1, 2, 3)) + 1e-12)
    return -10.0 * np.log10(np.maximum(mse, 1e-10))


def mean_fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The baseline: holes filled with the mean visible colour of each image."""
    m = np.asarray(mask, np.float64)[..., None]
    mean = (image * m).sum(axis=(1, 2), keepdims=True) / (m.sum(axis=(1, 2), keepdims=True) + 1e-12)
    return image * m + mean * (1 - m)


def evaluate_inpainting(pvqvae: PVQVAE, pvqvae_variables: Any, model: UQTransformer, variables: Any,
                        images: np.ndarray, mask: np.ndarray, *, num_samples: int = 2, seed: int = 0,
                        **sampling: Any) -> dict[str, float]:
    """Hole PSNR of PUT's completions (mean over samples) and of the mean-fill baseline, and the spread
    between the first and last completion (mean absolute difference on the holes: pluralism). ``sampling``:
    ``inpaint``'s options (``top_k``, ``temperature``, ``tokens_per_step``)."""
    out = np.asarray(inpaint(pvqvae, pvqvae_variables, model, variables, jnp.asarray(images), jnp.asarray(mask),
                             jax.random.key(seed), num_samples=num_samples, **sampling))
    hole = (1.0 - np.asarray(mask))[..., None]
    return {"psnr_holes": float(np.mean([hole_psnr(o, images, mask) for o in out])),
            "psnr_holes_mean_fill": float(np.mean(hole_psnr(mean_fill(images, mask), images, mask))),
            "completion_spread": float(np.sum(np.abs(out[0] - out[-1]) * hole) / (3 * np.sum(hole)))}



def run(*, size: int = 32, train_images: int = 256, test_images: int = 16, pvqvae_steps: int = 200,
        transformer_steps: int = 200, batch: int = 16, width: int = 64, codes: int = 128, layers: int = 2,
        seed: int = 0, log=print) -> dict[str, float]:
    """Both stages at a small scale (a P-VQVAE of ``width`` channels with a dual codebook of ``codes``, a
    ``layers``-deep UQ-Transformer) on ``size``-px photograph crops; completions of held-out crops (another
    seed) under fixed masks scored against the mean-fill baseline. Returns the final losses and scores."""
    import jaxformers as jf

    images = photo_crops(train_images + test_images, size, seed=seed)
    train, test = images[:train_images], images[train_images:]
    pvqvae = jf.create_model("put_pvqvae", img_size=size, res_ch=width, e_dim=width, n_e=codes,
                             masked_embed_start=codes // 2, num_res_block=2, decoder_base_ch=max(width // 4, 8))
    x0, m0 = jnp.zeros((1, size, size, 3)), jnp.ones((1, size, size))
    pv = nn.unbox(jax.jit(pvqvae.init)(jax.random.key(seed), x0, m0))
    stage1 = train_pvqvae(pvqvae, pv, train, steps=pvqvae_steps, batch=batch, lr=1e-3, data_init=True, seed=seed)
    used = np.unique(np.asarray(jax.jit(lambda v, x: pvqvae.apply(v, x, method="tokens"))(stage1.variables, test)))
    log(f"P-VQVAE: loss {np.mean(stage1.losses[:10]):.4f} (first 10 steps) -> {np.mean(stage1.losses[-10:]):.4f} "
        f"(last 10); {len(used)} of {codes // 2} visible codes used by the test crops")
    tokens = (size // pvqvae.patch) ** 2
    transformer = jf.create_model("put_transformer_ffhq", num_layers=layers, embed_dim=2 * width, num_heads=4,
                                  seq_len=tokens, e_dim=width, num_token=codes // 2)
    tv = nn.unbox(jax.jit(transformer.init)(jax.random.key(seed + 1), jnp.zeros((1, tokens, width))))
    stage2 = train_transformer(pvqvae, stage1.variables, transformer, tv, train, steps=transformer_steps,
                               batch=batch, lr=1e-3, seed=seed)
    log(f"UQ-Transformer: masked-token cross-entropy {np.mean(stage2.losses[:10]):.4f} -> "
        f"{np.mean(stage2.losses[-10:]):.4f} (uniform over the codes: {np.log(codes // 2):.4f})")
    mask = masks(len(test), size, seed=seed + 12345, hole_ratio=(0.1, 0.5))
    scores = evaluate_inpainting(pvqvae, stage1.variables, transformer, stage2.variables, test, mask,
                                 num_samples=4, seed=seed, top_k=8, tokens_per_step=1)
    log(", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return {"pvqvae_loss": float(np.mean(stage1.losses[-10:])),
            "transformer_loss": float(np.mean(stage2.losses[-10:])), **scores}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m train.inpainting", description=__doc__.split("\n\n")[0])
    for name, default in (("size", 32), ("train-images", 256), ("pvqvae-steps", 200), ("transformer-steps", 200),
                          ("batch", 16), ("width", 64), ("codes", 128), ("layers", 2), ("seed", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    run(size=a.size, train_images=a.train_images, pvqvae_steps=a.pvqvae_steps, transformer_steps=a.transformer_steps,
        batch=a.batch, width=a.width, codes=a.codes, layers=a.layers, seed=a.seed)
