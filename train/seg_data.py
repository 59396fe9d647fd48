"""Offline segmentation data: a generated panoptic data set and scikit-image's photographs.

``panoptic_shapes`` (registered as an embedded data set, ``input.dataset="panoptic_shapes"``):
procedurally drawn scenes, each a pure function of (seed, split, index), so any example can be
read at random and every run sees the same data without storing it. 4,000 train / 500 val images
(any size, 64 px by default), 6 classes:

- stuff (one segment per class present): ``sky`` (a smooth vertical colour gradient above a wavy
  horizon), ``ground`` (speckled texture below it), ``wall`` (a brick-patterned building on the
  horizon, half of the scenes);
- things (1-6 instances per image, drawn one over the other so that later ones occlude earlier
  ones): ``disc`` (ellipses), ``box`` (rotated rectangles), ``triangle`` (rotated triangles), each
  with a random colour and one of five textures (flat, stripes, checks, dots, gradient), so the
  class is in the shape, not in the colour;
- crowd: 15% of the scenes hold a cluster of small discs annotated as one crowd segment
  (``segment_crowd`` = 1, COCO's ``iscrowd``);
- void: instances occluded down to fewer than ``MIN_AREA`` visible pixels (scaled with the image
  area) are left unlabelled (panoptic 0, semantic 255), as annotators leave slivers.

Each example: ``image`` uint8 (H, W, 3), ``semantic`` int32 (H, W) (255 = void), ``panoptic`` int32
(H, W) (segment 1..16, 0 = void), ``segment_classes`` int32 (16,) (-1 = unused) and ``segment_crowd``
int32 (16,) (see ``jaxformers.segmentation.targets``).

``photo(name, size)``: a scikit-image sample photograph (``astronaut``, ``coffee``, ``chelsea``,
``rocket``...) centre-cropped and resized, for qualitative checks of a trained model on real images.
"""
from __future__ import annotations

import functools

import numpy as np

from train import input_pipeline

THING_CLASSES = ("disc", "box", "triangle")
STUFF_CLASSES = ("sky", "ground", "wall")
CLASS_NAMES = THING_CLASSES + STUFF_CLASSES
THING_IDS = tuple(range(len(THING_CLASSES)))
NUM_CLASSES = len(CLASS_NAMES)
MAX_SEGMENTS = 16
MIN_AREA = 10  # at 64 x 64; scaled with the image area
SPLITS = {"train": (0, 4000), "val": (1, 500)}
VOID = 255

_SKY, _GROUND, _WALL = (CLASS_NAMES.index(c) for c in STUFF_CLASSES)
_DISC, _BOX, _TRIANGLE = (CLASS_NAMES.index(c) for c in THING_CLASSES)


def _hsv(h, s, v) -> np.ndarray:
    """An RGB colour in [0, 255] from hue in [0, 1), saturation and value in [0, 1]."""
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.asarray(rgb, np.float32) * 255.0


def _texture(rng, yy, xx, size) -> np.ndarray:
    """(H, W, 3) float texture of one random kind and colour for a thing."""
    base = _hsv(rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.5, 1.0))
    other = _hsv(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0))
    kind = rng.integers(0, 5)
    period = rng.uniform(3.0, 8.0) * size / 64
    if kind == 0:  # flat
        t = np.zeros_like(yy)
    elif kind == 1:  # stripes
        a = rng.uniform(0, np.pi)
        t = (np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == 2:  # checks
        t = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    elif kind == 3:  # dots
        t = ((np.mod(xx, period) - period / 2) ** 2 + (np.mod(yy, period) - period / 2) ** 2 < (period / 4) ** 2)
        t = t.astype(np.float32)
    else:  # gradient
        a = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(a) + yy * np.sin(a)) / size * 0.5 + 0.5
    return base * (1 - t[..., None]) + other * t[..., None]


def _shape_mask(rng, cls, yy, xx, size) -> np.ndarray:
    cy, cx = rng.uniform(0.1, 0.9, 2) * size
    r = rng.uniform(0.08, 0.22) * size
    a = rng.uniform(0, 2 * np.pi)
    dy, dx = yy - cy, xx - cx
    u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
    if cls == _DISC:
        e = rng.uniform(0.7, 1.3)
        return (u / r) ** 2 + (v / (r * e)) ** 2 <= 1.0
    if cls == _BOX:
        e = rng.uniform(0.6, 1.4)
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85 * e)
    angles = a + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])  # triangle: inside three half-planes
    inside = np.ones_like(yy, bool)
    for k in range(3):
        nx, ny = np.cos(angles[k] + np.pi / 3), np.sin(angles[k] + np.pi / 3)
        inside &= dx * nx + dy * ny <= r * 0.6
    return inside


def render_scene(rng: np.random.Generator, size: int = 64) -> dict[str, np.ndarray]:
    """One generated panoptic example (see the module docstring)."""
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    image = np.zeros((size, size, 3), np.float32)
    seg = np.zeros((size, size), np.int32)
    classes, crowd = [], []

    def add(mask, cls, pixels, is_crowd=False):
        image[mask] = pixels[mask]
        classes.append(cls)
        crowd.append(int(is_crowd))
        seg[mask] = len(classes)

    # Stuff: sky above a wavy horizon, ground below, sometimes a brick wall standing on the horizon.
    h0 = rng.uniform(0.3, 0.65) * size
    horizon = h0 + rng.uniform(0.02, 0.08) * size * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * xx / size
                                                             + rng.uniform(0, 2 * np.pi))
    sky_top, sky_bottom = _hsv(rng.uniform(0.5, 0.7), rng.uniform(0.3, 0.8), rng.uniform(0.7, 1.0)), \
        _hsv(rng.uniform(0.5, 0.7), rng.uniform(0.0, 0.4), rng.uniform(0.8, 1.0))
    g = (yy / size)[..., None]
    add(yy < horizon, _SKY, sky_top * (1 - g) + sky_bottom * g)
    ground = _hsv(rng.uniform(0.05, 0.4), rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.7))
    speckle = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    speckle = (speckle + np.roll(speckle, 1, 0) + np.roll(speckle, 1, 1)) / 3
    add(yy >= horizon, _GROUND, ground[None, None] * (1 + 0.25 * speckle[..., None]))
    if rng.random() < 0.5:
        x0 = rng.uniform(0.0, 0.6) * size
        x1 = x0 + rng.uniform(0.2, 0.4) * size
        top = horizon - rng.uniform(0.15, 0.35) * size
        brick = _hsv(rng.uniform(0.0, 0.1), rng.uniform(0.3, 0.8), rng.uniform(0.4, 0.8))
        bh = max(2.0, size / 16)
        row = np.floor(yy / bh)
        mortar = (np.mod(yy, bh) < 1) | (np.mod(xx + (row % 2) * bh, 2 * bh) < 1)
        wall = np.where(mortar[..., None], brick * 0.45 + 110, brick[None, None] * np.ones_like(image))
        add((xx >= x0) & (xx < x1) & (yy >= top) & (yy < horizon), _WALL, wall)
    # A crowd of small discs, annotated as one segment.
    if rng.random() < 0.15:
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        cluster = np.zeros((size, size), bool)
        for _ in range(rng.integers(4, 9)):
            oy, ox = rng.normal(0, 0.08 * size, 2)
            cluster |= (yy - cy - oy) ** 2 + (xx - cx - ox) ** 2 <= (rng.uniform(0.02, 0.045) * size) ** 2
        add(cluster, _DISC, _texture(rng, yy, xx, size), is_crowd=True)
    # Things, later ones occluding earlier ones.
    for _ in range(rng.integers(1, 7)):
        cls = int(rng.integers(0, len(THING_CLASSES)))
        mask = _shape_mask(rng, cls, yy, xx, size)
        if mask.any():
            add(mask, cls, _texture(rng, yy, xx, size))
    image = np.clip(image + rng.normal(0.0, 4.0, image.shape), 0, 255).astype(np.uint8)
    return _tables(image, seg, classes, crowd, size)


def _tables(image, seg, classes, crowd, size) -> dict[str, np.ndarray]:
    """Renumbers the visible segments 1..n (slivers of things below the minimum area become void)."""
    min_area = max(1, round(MIN_AREA * (size / 64) ** 2))
    panoptic = np.zeros_like(seg)
    seg_classes = np.full(MAX_SEGMENTS, -1, np.int32)
    seg_crowd = np.zeros(MAX_SEGMENTS, np.int32)
    n = 0
    for k, (cls, is_crowd) in enumerate(zip(classes, crowd), start=1):
        mask = seg == k
        area = int(mask.sum())
        if area == 0 or (cls in THING_IDS and area < min_area) or n == MAX_SEGMENTS:
            continue
        n += 1
        panoptic[mask] = n
        seg_classes[n - 1], seg_crowd[n - 1] = cls, is_crowd
    semantic = np.where(panoptic > 0, seg_classes[np.maximum(panoptic - 1, 0)], VOID).astype(np.int32)
    return {"image": image, "semantic": semantic, "panoptic": panoptic, "segment_classes": seg_classes,
            "segment_crowd": seg_crowd}


class PanopticShapes:
    """Random-access source of ``render_scene`` examples: example ``i`` of ``split`` is drawn from
    ``numpy.random.default_rng((seed, split_id, i))``."""

    def __init__(self, split: str = "train", size: int = 64, seed: int = 0, num_examples: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"panoptic_shapes has splits {sorted(SPLITS)}, got {split!r}")
        if size % 32:
            raise ValueError(f"panoptic_shapes size must be a multiple of 32 (the backbones' stride), got {size}")
        self.split, self.size, self.seed = split, size, seed
        self.split_id, default = SPLITS[split]
        self.num_examples = default if num_examples is None else int(num_examples)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"panoptic_shapes[{self.split!r}] has {self.num_examples} examples, asked for {index}")
        return render_scene(np.random.default_rng((self.seed, self.split_id, int(index))), self.size)

    def arrays(self, count: int | None = None) -> dict[str, np.ndarray]:
        """The first ``count`` examples stacked (for tests, notebooks and benchmarks)."""
        items = [self[i] for i in range(count or len(self))]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}

    def __repr__(self) -> str:
        return f"PanopticShapes({self.split!r}, {self.num_examples} examples of {self.size}x{self.size})"


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph at full resolution as uint8 (H, W, 3) (grey ones repeated), decoded
    once per process and read-only (the cached array is shared by every caller)."""
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("the photographs come from scikit-image: pip install scikit-image") from e
    if not hasattr(skimage.data, name):
        raise ValueError(f"skimage.data has no image {name!r} (try astronaut, coffee, chelsea, rocket)")
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    image = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    image.flags.writeable = False
    return image


def photo(name: str = "astronaut", size: int = 64) -> np.ndarray:
    """A scikit-image sample photograph as uint8 (size, size, 3): centre square crop, resized."""
    image = load_photo(name)
    h, w = image.shape[:2]
    s = min(h, w)
    image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


input_pipeline.EMBEDDED.setdefault("panoptic_shapes", (lambda split: PanopticShapes(split), NUM_CLASSES))
