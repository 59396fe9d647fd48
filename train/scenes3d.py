"""Generated 3-D rooms with captioned objects, for 3-D dense captioning (BiCA, ``jaxformers.models.bica``).

No package ships ScanNet / ScanRefer, so ``Rooms`` draws seeded scenes in their spirit:

- a square room (``room`` metres, default 4) whose floor is sampled as background points (grey);
- 2 to ``max_objects`` objects, each a **box**, **sphere** or **cylinder** (the 3 classes) of one of 4
  colours (red, green, blue, yellow), 0.4-0.9 m across, standing on the floor, placed without overlap;
- ``num_points`` points: a ``floor_fraction`` on the floor, the rest split evenly over the objects and
  sampled uniformly on their surfaces (area-weighted faces / caps); every point carries its RGB colour
  plus N(0, 0.03) noise, and the xyz N(0, 0.005) noise;
- axis-aligned boxes: centre and size of each object (a sphere's cube, a cylinder's 2r x 2r x h);
- captions from templates with a spatial relation to the nearest other object, along the dominant axis
  of their displacement: "left of" / "right of" (x), "in front of" / "behind" (y). Two references per
  object: "the red box is left of the blue sphere" and "there is a red box left of the blue sphere".

Tokens follow Vote2Cap-DETR's ScanRefer tokenizer conventions (pad 0, unk 1, sos 2, eos 3; a caption is
its words then eos, no sos, padded with 0).
"""
from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("box", "sphere", "cylinder")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.85, 0.1)}
RELATIONS = ("left of", "right of", "in front of", "behind")
VOCAB = ("pad_", "unk", "sos", "eos", "the", "is", "there", "a", "left", "right", "of", "in", "front", "behind",
         *COLOURS, *SHAPES)
WORD2ID = {w: i for i, w in enumerate(VOCAB)}


def encode(caption: str, max_len: int) -> np.ndarray:
    """Words then eos, padded with 0 to ``max_len`` (a ValueError if it does not fit)."""
    ids = [WORD2ID.get(w, WORD2ID["unk"]) for w in caption.split()] + [WORD2ID["eos"]]
    if len(ids) > max_len:
        raise ValueError(f"caption {caption!r} needs {len(ids)} tokens with eos; max_len is {max_len}")
    return np.asarray(ids + [0] * (max_len - len(ids)), np.int32)


def decode(ids) -> str:
    """Token ids -> words, stopping at eos / pad."""
    words = []
    for i in np.asarray(ids).tolist():
        if i in (WORD2ID["eos"], WORD2ID["pad_"]):
            break
        words.append(VOCAB[i] if 0 <= i < len(VOCAB) else "unk")
    return " ".join(words)


def _surface(shape: str, center, size, n: int, rng: np.random.Generator) -> np.ndarray:
    half = np.asarray(size) / 2
    if shape == "sphere":
        v = rng.standard_normal((n, 3))
        return center + half * v / np.linalg.norm(v, axis=1, keepdims=True)
    if shape == "cylinder":
        r, h = half[0], size[2]
        side, cap = 2 * np.pi * r * h, np.pi * r * r
        on_side = rng.uniform(0, side + 2 * cap, n) < side
        theta = rng.uniform(0, 2 * np.pi, n)
        rad = np.where(on_side, r, r * np.sqrt(rng.uniform(0, 1, n)))
        z = np.where(on_side, rng.uniform(-h / 2, h / 2, n), np.where(rng.uniform(0, 1, n) < 0.5, -h / 2, h / 2))
        return center + np.stack([rad * np.cos(theta), rad * np.sin(theta), z], 1)
    areas = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]])  # faces normal to x, y, z
    axis = rng.choice(3, n, p=areas / areas.sum())
    pts = rng.uniform(-half, half, (n, 3))
    sign = np.where(rng.uniform(0, 1, n) < 0.5, -1.0, 1.0)
    pts[np.arange(n), axis] = sign * half[axis]
    return center + pts


def relation(a, b) -> str:
    """Where centre ``a`` is relative to ``b`` along the dominant horizontal axis of a - b."""
    d = np.asarray(a)[:2] - np.asarray(b)[:2]
    if abs(d[0]) >= abs(d[1]):
        return "left of" if d[0] < 0 else "right of"
    return "in front of" if d[1] < 0 else "behind"


@dataclasses.dataclass(frozen=True)
class Rooms:
    num_points: int = 1024
    max_objects: int = 4
    room: float = 4.0
    floor_fraction: float = 0.25
    max_len: int = 12

    def scene(self, rng: np.random.Generator) -> dict:
        k = int(rng.integers(2, self.max_objects + 1))
        objects = []
        while len(objects) < k:
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            width = rng.uniform(0.4, 0.9)
            size = np.array([width, width, width if shape != "cylinder" else rng.uniform(0.5, 1.2)])
            xy = rng.uniform(-self.room / 2 + 0.5, self.room / 2 - 0.5, 2)
            if any(np.linalg.norm(xy - o["center"][:2]) < (width + o["size"][0]) / 2 + 0.2 for o in objects):
                continue
            objects.append(dict(shape=shape, colour=colour, size=size, center=np.array([*xy, size[2] / 2])))
        n_floor = int(self.num_points * self.floor_fraction)
        per = [(self.num_points - n_floor) // k + (i < (self.num_points - n_floor) % k) for i in range(k)]
        floor = np.column_stack([rng.uniform(-self.room / 2, self.room / 2, (n_floor, 2)), np.zeros(n_floor)])
        xyz, rgb = [floor], [np.full((n_floor, 3), 0.5)]
        for o, n in zip(objects, per):
            xyz.append(_surface(o["shape"], o["center"], o["size"], n, rng))
            rgb.append(np.tile(COLOURS[o["colour"]], (n, 1)))
        xyz = np.concatenate(xyz) + rng.normal(0, 0.005, (self.num_points, 3))
        rgb = np.clip(np.concatenate(rgb) + rng.normal(0, 0.03, (self.num_points, 3)), 0, 1)
        order = rng.permutation(self.num_points)
        captions = []
        for i, o in enumerate(objects):
            j = min((j for j in range(k) if j != i), key=lambda j: np.linalg.norm(o["center"] - objects[j]["center"]))
            other, rel = objects[j], relation(o["center"], objects[j]["center"])
            what, ref = f"{o['colour']} {o['shape']}", f"{other['colour']} {other['shape']}"
            captions.append([f"the {what} is {rel} the {ref}", f"there is a {what} {rel} the {ref}"])
        return dict(points=np.concatenate([xyz, rgb], 1)[order].astype(np.float32), objects=objects,
                    captions=captions)

    def batch(self, n: int, seed: int) -> dict:
        """``n`` scenes as arrays: points (n, N, 6), gt_center / gt_size (n, S, 3), gt_class (n, S), gt_valid
        (n, S), gt_tokens (n, S, max_len) (the first reference), and ``captions`` (n lists of S reference
        lists, empty for padding slots)."""
        rng = np.random.default_rng(seed)
        s = self.max_objects
        out = dict(points=np.zeros((n, self.num_points, 6), np.float32), gt_center=np.zeros((n, s, 3), np.float32),
                   gt_size=np.ones((n, s, 3), np.float32), gt_class=np.zeros((n, s), np.int32),
                   gt_valid=np.zeros((n, s), bool), gt_tokens=np.zeros((n, s, self.max_len), np.int32))
        captions = []
        for b in range(n):
            sc = self.scene(rng)
            out["points"][b] = sc["points"]
            for i, o in enumerate(sc["objects"]):
                out["gt_center"][b, i], out["gt_size"][b, i] = o["center"], o["size"]
                out["gt_class"][b, i], out["gt_valid"][b, i] = SHAPES.index(o["shape"]), True
                out["gt_tokens"][b, i] = encode(sc["captions"][i][0], self.max_len)
            captions.append(sc["captions"])
        out["captions"] = captions
        return out
