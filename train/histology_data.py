"""Labelled tiles of a real immunohistochemistry photograph, offline (scikit-image ships it).

``skimage.data.immunohistochemistry()`` is a 512 x 512 RGB micrograph of colonic glands, the FHL2
protein revealed with DAB (brown), counterstained with hematoxylin (blue) (its docstring: acquired at
the Center for Microscopy And Molecular Imaging, no known copyright restrictions). There are no expert
labels for it, so the labels here are derived from the image itself and say so: each 64 x 64 tile (stride 16) gets the tertile of its mean DAB
optical density after colour deconvolution (``skimage.color.rgb2hed``, Ruifrok & Johnston's stain
vectors): 0 = weak, 1 = moderate, 2 = strong DAB staining, a staining-intensity score of the kind
pathologists read off IHC slides (0 / 1+ / 2+). Thresholds are the tertiles over the training tiles.

Split by position, no overlap: ``train`` = the 609 tiles inside the top 384 rows, ``test`` = the 145
tiles inside the bottom 128 rows. ``ihc_tiles(split)`` gives ``{"image": uint8 (N, 64, 64, 3), "label":
int32 (N,)}``; importing this module registers it as the embedded data set ``"ihc_tiles"`` (3 classes)
of the training CLI (``train/configs/duoformer_histology.py``).
"""
from __future__ import annotations

import functools

import numpy as np

from train import input_pipeline

TILE, STRIDE, SPLIT_ROW = 64, 16, 384
SPLITS = ("train", "test")
CLASSES = ("weak DAB", "moderate DAB", "strong DAB")


@functools.lru_cache(maxsize=1)
def _tiles() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        import skimage.color
        import skimage.data
    except ImportError as e:
        raise ImportError("the 'ihc_tiles' data set needs scikit-image: pip install scikit-image") from e
    image = np.asarray(skimage.data.immunohistochemistry())[..., :3]
    dab = skimage.color.rgb2hed(image)[..., 2]
    size = image.shape[0]
    found = {"train": ([], []), "test": ([], [])}
    for top, bottom in (("train", (0, SPLIT_ROW)), ("test", (SPLIT_ROW, size))):
        for r in range(bottom[0], bottom[1] - TILE + 1, STRIDE):
            for c in range(0, size - TILE + 1, STRIDE):
                found[top][0].append(image[r:r + TILE, c:c + TILE])
                found[top][1].append(float(dab[r:r + TILE, c:c + TILE].mean()))
    cuts = np.quantile(found["train"][1], [1 / 3, 2 / 3])
    return {k: (np.stack(tiles).astype(np.uint8), np.searchsorted(cuts, np.asarray(scores)).astype(np.int32))
            for k, (tiles, scores) in found.items()}


def ihc_tiles(split: str = "train") -> dict[str, np.ndarray]:
    """The ``split`` tiles (module docstring): ``{"image": uint8 (N, 64, 64, 3), "label": int32 (N,)}``."""
    if split not in SPLITS:
        raise ValueError(f"ihc_tiles has splits {SPLITS}, got {split!r}")
    images, labels = _tiles()[split]
    return {"image": images, "label": labels}


input_pipeline.EMBEDDED.setdefault("ihc_tiles", (ihc_tiles, len(CLASSES)))
