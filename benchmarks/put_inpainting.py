r"""PUT inpainting on held-out scikit-image photographs against simple fills, in one run.

    python benchmarks/put_inpainting.py                  # 32 px, 200 + 200 steps (a few minutes of CPU)
    python benchmarks/put_inpainting.py --smoke          # tiny, seconds
    python benchmarks/put_inpainting.py --pvqvae-steps 600 --transformer-steps 600

PUT ("Reduce Information Loss in Transformers for Pluralistic Image Inpainting", arXiv 2205.05076;
``jaxformers/models/put.py``) is trained in its two stages by ``train.inpainting.run`` (P-VQVAE with the
dual codebook, then the un-quantized transformer) on random crops of six scikit-image photographs, and
completes further random crops of the same photographs (not trained on) under generated free-form stroke masks (hole fraction 0.1-0.5;
``train.inpainting.masks``), 4 samples each (top-k 8, one token per step). On the same images and masks,
in the same run, three fills without learning: the mean visible colour (``train.inpainting.mean_fill``),
the nearest visible pixel (Euclidean distance transform), and a harmonic (diffusion) fill (Jacobi
iterations of the Laplace equation with the visible pixels fixed). Scores: PSNR over the hole pixels
(``train.inpainting.hole_psnr``, images in [-1, 1]), mean over images (and over PUT's samples), and
PUT's completion spread. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def nearest_fill(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each hole pixel takes the colour of its nearest visible pixel (``mask`` 1 = visible)."""
    from scipy import ndimage

    out = images.copy()
    for i in range(len(images)):
        _, (r, c) = ndimage.distance_transform_edt(mask[i] == 0, return_indices=True)
        out[i] = images[i][r, c]
    return out


def harmonic_fill(images: np.ndarray, mask: np.ndarray, iterations: int = 2000) -> np.ndarray:
    """Diffusion fill: the holes solve Laplace's equation (Jacobi iterations, edge-replicated borders),
    started from the mean visible colour, with the visible pixels held fixed."""
    from train.inpainting import mean_fill

    m = mask[..., None].astype(np.float64)
    x = mean_fill(images.astype(np.float64), mask)
    for _ in range(iterations):
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        avg = (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]) / 4
        x = images * m + avg * (1 - m)
    return x.astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("size", 32), ("train-images", 256), ("test-images", 16), ("pvqvae-steps", 200),
                          ("transformer-steps", 200), ("batch", 16), ("width", 64), ("codes", 128), ("layers", 2),
                          ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    a = p.parse_args()
    if a.smoke:
        a.train_images, a.test_images, a.pvqvae_steps, a.transformer_steps, a.batch, a.width, a.codes, a.layers = (
            16, 4, 3, 3, 4, 16, 32, 1)
    import jax

    from train.inpainting import hole_psnr, masks, mean_fill, photo_crops, run

    t0 = time.perf_counter()
    put = run(size=a.size, train_images=a.train_images, test_images=a.test_images, pvqvae_steps=a.pvqvae_steps,
              transformer_steps=a.transformer_steps, batch=a.batch, width=a.width, codes=a.codes, layers=a.layers,
              seed=a.seed, log=lambda s: print(s, file=sys.stderr))
    seconds = time.perf_counter() - t0
    # the held-out crops and masks run() scored (the same seeds)
    test = photo_crops(a.train_images + a.test_images, a.size, seed=a.seed)[a.train_images:]
    mask = masks(len(test), a.size, seed=a.seed + 12345, hole_ratio=(0.1, 0.5))
    fills = {"mean": mean_fill(test, mask), "nearest": nearest_fill(test, mask), "harmonic": harmonic_fill(test, mask)}
    scores = {f"psnr_holes_{k}_fill": float(np.mean(hole_psnr(v, test, mask))) for k, v in fills.items()}
    assert abs(scores["psnr_holes_mean_fill"] - put["psnr_holes_mean_fill"]) < 1e-6, "not the images run() scored"
    print(json.dumps({"settings": {k: v for k, v in vars(a).items() if k != "smoke"}, "jax": jax.__version__,
                      "device": jax.devices()[0].device_kind, "hole_fraction": float(1 - mask.mean()),
                      "psnr_holes_put": put["psnr_holes"], **scores,
                      "completion_spread": put["completion_spread"], "pvqvae_loss": put["pvqvae_loss"],
                      "transformer_loss": put["transformer_loss"], "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
