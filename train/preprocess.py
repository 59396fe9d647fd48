"""Per-example preprocessing, written as a small pipeline string (big_vision's ``pp`` idea).

``"resize(32)|to_rgb|random_crop(32, pad=4)|flip|value_range(-1, 1)"`` is parsed once, when the
input pipeline is built (an unknown op or bad argument fails there, before anything compiles), into
a ``grain.transforms.RandomMap`` that runs each op on one example: a dict of named arrays (the
source's record). Image ops read and write ``ex["image"]`` (uint8 HWC until ``value_range`` /
``normalize`` make it float32); other ops (``rename``, ``train/tasks_text.py``'s ``mlm_mask``) work on
the fields they name. Random ops draw from the per-example ``numpy.random.Generator`` grain passes
in, which is derived from the pipeline seed and the example's position, so augmentation is
deterministic and identical however many hosts or threads read the data. The result is then
conformed to the task's declared fields (``train.input_pipeline.conform``): the pp must produce
them with their dtypes; nothing is cast behind its back.

Ops: ``decode`` (implicit first step when the example has an ``image``), ``resize(size)``,
``resize_small(size)``, ``center_crop(size)``, ``random_crop(size, pad=0)``,
``random_resized_crop(size, scale=(0.08, 1.0), ratio=(0.75, 1.333))``, ``flip``, ``to_rgb``,
``value_range(lo=-1, hi=1)``, ``normalize(mean=IMAGENET, std=IMAGENET)``, ``rename(new="old", ...)``,
``scale_jitter(min_scale, max_scale)``, ``crop_or_pad(size)``.

Geometric ops move the per-pixel label maps of segmentation examples with the image (``MASK_FIELDS``:
``semantic`` and ``panoptic``): the same crop, flip and resize, with nearest-neighbour resampling for
labels, and padding filled with the void label (255 for ``semantic``, 0 for ``panoptic``). Large-scale
jitter (Mask2Former / kMaX-DeepLab) is ``scale_jitter(0.1, 2.0)|crop_or_pad(size)``.
"""
from __future__ import annotations

import ast
import difflib
import io
import math
from typing import Any, Callable

import numpy as np

__all__ = ["parse_pp", "PP_OPS", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Example = dict[str, Any]

# Per-pixel label maps that geometric ops move with the image, and the value padding gives them.
MASK_FIELDS = {"semantic": 255, "panoptic": 0}


def _label_maps(ex: Example) -> list[str]:
    image = ex.get("image")
    names = [k for k in MASK_FIELDS if k in ex]
    for k in names:
        if image is not None and np.shape(ex[k])[:2] != np.shape(image)[:2]:
            raise ValueError(f"label map {k!r} is {np.shape(ex[k])[:2]} but the image is {np.shape(image)[:2]}: "
                             f"per-pixel labels must have the image's size")
    return names


def _resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (the source pixel under each output pixel's centre)."""
    h, w = labels.shape[:2]
    if (h, w) == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def _with_image(ex: Example, image: np.ndarray, labels: Callable[[np.ndarray, Any], np.ndarray]) -> Example:
    """``ex`` with ``image`` and every label map passed through ``labels(map, fill)``."""
    out = {**ex, "image": image}
    for k in _label_maps(ex):
        out[k] = labels(np.asarray(ex[k]), MASK_FIELDS[k])
    return out


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of a uint8 HWC image with PIL."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return out[..., None] if channels == 1 else out


def decode(ex: Example, rng) -> Example:
    """Encoded image bytes (PNG/JPEG) -> uint8 HWC; already-decoded arrays pass through."""
    image = ex["image"]
    if isinstance(image, (bytes, np.bytes_)):
        from PIL import Image

        image = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    return {**ex, "image": image}


def resize(size: int | tuple[int, int]) -> Callable:
    h, w = (size, size) if isinstance(size, int) else size
    return lambda ex, rng: _with_image(ex, _resize(ex["image"], h, w), lambda m, fill: _resize_labels(m, h, w))


def resize_small(size: int) -> Callable:
    """Shorter side to ``size``, keeping the aspect ratio."""

    def op(ex, rng):
        h, w = ex["image"].shape[:2]
        scale = size / min(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        return _with_image(ex, _resize(ex["image"], nh, nw), lambda m, fill: _resize_labels(m, nh, nw))

    return op


def center_crop(size: int) -> Callable:
    def op(ex, rng):
        image = ex["image"]
        h, w = image.shape[:2]
        if h < size or w < size:
            raise ValueError(f"center_crop({size}): image is only {h}x{w}; resize first")
        top, left = (h - size) // 2, (w - size) // 2
        return _with_image(ex, image[top:top + size, left:left + size],
                           lambda m, fill: m[top:top + size, left:left + size])

    return op


def random_crop(size: int, pad: int = 0) -> Callable:
    """A random ``size`` x ``size`` window of the image zero-padded by ``pad`` on each side
    (CIFAR-style random shifts); the padding is never materialised."""

    def op(ex, rng):
        image = ex["image"]
        h, w = image.shape[:2]
        if h + 2 * pad < size or w + 2 * pad < size:
            raise ValueError(f"random_crop({size}): image is only {h}x{w} after padding by {pad}")
        top = int(rng.integers(0, h + 2 * pad - size + 1)) - pad
        left = int(rng.integers(0, w + 2 * pad - size + 1)) - pad
        if pad == 0:
            return _with_image(ex, image[top:top + size, left:left + size],
                               lambda m, fill: m[top:top + size, left:left + size])
        return _with_image(ex, _window(image, top, left, size, size, 0),
                           lambda m, fill: _window(m, top, left, size, size, fill))

    return op


def _window(array: np.ndarray, top: int, left: int, height: int, width: int, fill) -> np.ndarray:
    """``array[top:top+height, left:left+width]`` where it overlaps the array, ``fill`` elsewhere."""
    h, w = array.shape[:2]
    out = np.full((height, width) + array.shape[2:], fill, array.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, h), min(left + width, w)
    if y1 > y0 and x1 > x0:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = array[y0:y1, x0:x1]
    return out


def scale_jitter(min_scale: float = 0.1, max_scale: float = 2.0) -> Callable:
    """Resize the whole example by a random factor in [``min_scale``, ``max_scale``] (large-scale
    jitter; labels nearest-neighbour). Follow with ``crop_or_pad(size)``."""
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"scale_jitter needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")

    def op(ex, rng):
        h, w = ex["image"].shape[:2]
        scale = rng.uniform(min_scale, max_scale)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        return _with_image(ex, _resize(ex["image"], nh, nw), lambda m, fill: _resize_labels(m, nh, nw))

    return op


def crop_or_pad(size: int | tuple[int, int]) -> Callable:
    """A random ``size`` window where the image is larger, padding at the bottom / right where it is
    smaller (image 0, labels void): detectron2's ``FixedSizeCrop(pad=True)``."""
    ch, cw = (size, size) if isinstance(size, int) else size

    def op(ex, rng):
        h, w = ex["image"].shape[:2]
        top = int(rng.integers(0, h - ch + 1)) if h > ch else 0
        left = int(rng.integers(0, w - cw + 1)) if w > cw else 0
        return _with_image(ex, _window(ex["image"], top, left, ch, cw, 0),
                           lambda m, fill: _window(m, top, left, ch, cw, fill))

    return op


def random_resized_crop(size: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Callable:
    """Inception-style crop: random area fraction in ``scale`` and aspect ratio in ``ratio``
    (10 tries, then the central crop), resized to ``size`` x ``size``."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def op(ex, rng):
        image = ex["image"]
        h, w = image.shape[:2]
        for _ in range(10):
            area = h * w * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                break
        else:
            ch = cw = min(h, w)
            top, left = (h - ch) // 2, (w - cw) // 2
        return _with_image(ex, _resize(image[top:top + ch, left:left + cw], size, size),
                           lambda m, fill: _resize_labels(m[top:top + ch, left:left + cw], size, size))

    return op


def flip(ex: Example, rng) -> Example:
    """Random horizontal flip with probability 1/2 (label maps flip with the image)."""
    _label_maps(ex)
    if rng.random() >= 0.5:
        return ex
    return _with_image(ex, ex["image"][:, ::-1], lambda m, fill: m[:, ::-1])


def to_rgb(ex: Example, rng) -> Example:
    image = ex["image"]
    return {**ex, "image": np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image}


def value_range(lo: float = -1.0, hi: float = 1.0) -> Callable:
    """uint8 [0, 255] -> float32 [lo, hi]."""
    return lambda ex, rng: {**ex, "image": (ex["image"].astype(np.float32) * ((hi - lo) / 255.0) + lo)}


def normalize(mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Callable:
    """uint8 -> float32 ``(x / 255 - mean) / std`` per channel."""
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return lambda ex, rng: {**ex, "image": (ex["image"].astype(np.float32) / 255.0 - m) / s}


def rename(**new_to_old: str) -> Callable:
    """Renames fields, e.g. ``rename(label="coarse_label")`` (a source's names -> the task's)."""

    def op(ex, rng):
        missing = [old for old in new_to_old.values() if old not in ex]
        if missing:
            raise ValueError(f"rename: the example has no field(s) {missing} (its fields: {sorted(ex)})")
        kept = {k: v for k, v in ex.items() if k not in new_to_old.values()}
        return {**kept, **{new: ex[old] for new, old in new_to_old.items()}}

    return op


# Ops without arguments are functions of (example, rng); ops with arguments are factories.
PP_OPS: dict[str, Callable] = {
    "decode": decode, "resize": resize, "resize_small": resize_small, "center_crop": center_crop,
    "random_crop": random_crop, "random_resized_crop": random_resized_crop, "flip": flip, "to_rgb": to_rgb,
    "value_range": value_range, "normalize": normalize, "rename": rename, "scale_jitter": scale_jitter,
    "crop_or_pad": crop_or_pad,
}
_NO_ARGS = {"decode", "flip", "to_rgb"}


def _parse_call(text: str) -> tuple[str, list, dict]:
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"cannot parse preprocessing op {text!r}") from None
    if isinstance(node, ast.Name):
        return node.id, [], {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            raise ValueError(f"preprocessing op {text!r}: arguments must be literals") from None
        return node.func.id, args, kwargs
    raise ValueError(f"cannot parse preprocessing op {text!r}; expected name or name(args)")


def parse_pp(spec: str):
    """``"op|op(args)|..."`` -> a ``grain.transforms.RandomMap`` from one example (dict of named
    arrays) to the preprocessed example. Raises ValueError for an unknown op (nearest named) or bad
    arguments."""
    import grain

    ops = []
    for part in [p for p in spec.split("|") if p.strip()]:
        name, args, kwargs = _parse_call(part)
        if name not in PP_OPS:
            close = difflib.get_close_matches(name, list(PP_OPS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown preprocessing op {name!r} in {spec!r}{hint} (known: {sorted(PP_OPS)})")
        if name in _NO_ARGS:
            if args or kwargs:
                raise ValueError(f"preprocessing op {name!r} takes no arguments, got {part!r}")
            ops.append(PP_OPS[name])
        else:
            try:
                ops.append(PP_OPS[name](*args, **kwargs))
            except TypeError as e:
                raise ValueError(f"preprocessing op {part!r}: {e}") from None

    class Preprocess(grain.transforms.RandomMap):
        """The parsed ``pp`` string as one grain transform."""

        def random_map(self, element: Example, rng: np.random.Generator) -> Example:
            ex = dict(element)
            if "image" in ex:
                ex = decode(ex, rng)
            for op in ops:
                ex = op(ex, rng)
            return ex

        def __repr__(self) -> str:
            return f"Preprocess({spec!r})"

    return Preprocess()
