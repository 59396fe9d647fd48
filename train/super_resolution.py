"""Single-image super-resolution for ``train/``: bicubic-downsampled pairs of real photographs, the L1
loss, and PSNR / SSIM as the SR literature reports them, with bicubic upsampling as the baseline.

Data (``sr_pairs``, the embedded data set ``sr_photos``): random ``hr_size`` crops of the colour
photographs scikit-image ships (no download; ``TRAIN_PHOTOS`` for training, the disjoint
``TEST_PHOTOS`` held out), each paired with its bicubic downsampling by ``scale`` (PIL's antialiased
bicubic, Keys a = -0.5: the kernel of MATLAB's ``imresize`` that the SR benchmarks' LR images come
from; PIL and MATLAB may differ slightly at the borders), stored as uint8 like the benchmark PNGs and
served as float32 in [0, 1]; ``augment_patches=True`` flips / transposes each training crop at random
(``augment``: the official configs' ``use_hflip`` / ``use_rot``). ``photo_pair`` gives a whole held-out
photograph as one pair (mod-cropped to ``scale``), the way SR test sets are scored.

Metrics (``psnr_y`` / ``ssim_y``): BasicSR's ``calculate_psnr`` / ``calculate_ssim`` with
``test_y_channel=True`` and ``crop_border=scale`` (``basicsr/metrics/psnr_ssim.py``; the official DRCT
test configs ``options/test/DRCT_SRx{2,3,4}.yml``), the protocol of DRCT ("DRCT: Saving Image Super-resolution away from Information Bottleneck", arXiv 2404.00722),
SwinIR, HAT and most SR papers: images in [0, 255] (outputs quantised to uint8 as BasicSR's
``tensor2img`` does, ``quantize``), ``crop_border`` pixels cut from every side, the ITU-R BT.601 luma
Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, PSNR = 10 log10(255^2 / MSE) per image, and SSIM
with an 11x11 Gaussian window (sigma 1.5), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, averaged over the
valid (unpadded) window positions. On NumPy inputs they compute in float64 NumPy as BasicSR does;
on JAX arrays (inside the jitted evaluation) in ``jax.numpy`` float32, with the SSIM variances
computed on values centred at 128, which agrees with the float64 numbers to about 1e-4 (dB or SSIM).

Baseline: ``bicubic_upsample`` (``jax.image.resize``'s cubic, Keys a = -0.5) of the same LR input,
evaluated in the same run (``eval_sums`` reports ``psnr`` / ``ssim`` and ``bicubic_psnr`` /
``bicubic_ssim``).
``mean_error_y`` is the per-image mean signed error on Y (bicubic is unbiased to ~0.1 grey levels;
a network trained at a constant rate is not, see ``official_learning_rate``).

Importing this module registers the task ``super_resolution`` and the embedded data set
``sr_photos`` (see ``train/configs/drct_photos.py``).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from train import input_pipeline
from train.input_pipeline import Field
from train.seg_data import load_photo
from train.tasks import Batch, Task, register_task

TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")
TEST_PHOTOS = ("chelsea", "coffee")
Y_WEIGHTS = (65.481, 128.553, 24.966)  # R, G, B (BasicSR's bgr2ycbcr reversed to RGB order)


# ---------------------------------------------------------------------------------------------
# Data


def bicubic_downsample(hr: np.ndarray, scale: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H / scale, W / scale, 3) by antialiased bicubic (PIL, as MATLAB's imresize)."""
    from PIL import Image

    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"the HR image is {h}x{w}; crop it to a multiple of scale={scale} first")
    return np.asarray(Image.fromarray(np.asarray(hr, np.uint8)).resize((w // scale, h // scale), Image.BICUBIC))


def augment(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """BasicSR's ``augment(..., hflip=True, rotation=True)`` (``basicsr/data/transforms.py``, used by the
    official DRCT training configs ``use_hflip: true, use_rot: true``): horizontal flip, vertical flip and
    transpose (H <-> W), each with probability 1/2, i.e. one of the 8 dihedral transforms of the patch."""
    hflip, vflip, rot = rng.random(3) < 0.5
    if hflip:
        hr = hr[:, ::-1]
    if vflip:
        hr = hr[::-1]
    if rot:
        hr = hr.transpose(1, 0, 2)
    return np.ascontiguousarray(hr)


def sr_pairs(photos: Sequence[str] = TRAIN_PHOTOS, *, n: int, hr_size: int, scale: int, seed: int = 0,
             augment_patches: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (LR, HR) pairs: uniformly random ``hr_size`` crops of random ``photos`` (a fixed NumPy
    PCG64 stream per ``seed``), with ``augment_patches`` each flipped / transposed at random
    (``augment``, the official training augmentation; off for evaluation), and their bicubic
    downsamplings, as float32 in [0, 1]: LR (n, hr_size / scale, hr_size / scale, 3), HR (n, hr_size,
    hr_size, 3)."""
    if hr_size % scale:
        raise ValueError(f"hr_size={hr_size} must be a multiple of scale={scale}")
    rng = np.random.default_rng(seed)
    lrs, hrs = [], []
    for _ in range(n):
        photo = load_photo(photos[rng.integers(len(photos))])
        h, w = photo.shape[:2]
        if min(h, w) < hr_size:
            raise ValueError(f"hr_size={hr_size} is larger than the photograph ({h}x{w})")
        top, left = rng.integers(h - hr_size + 1), rng.integers(w - hr_size + 1)
        hr = photo[top:top + hr_size, left:left + hr_size]
        if augment_patches:
            hr = augment(hr, rng)
        lrs.append(bicubic_downsample(hr, scale))
        hrs.append(hr)
    return np.stack(lrs).astype(np.float32) / 255.0, np.stack(hrs).astype(np.float32) / 255.0


def photo_pair(name: str, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """A whole photograph as one (LR, HR) pair, the way SR test sets are scored: the HR image cut at the
    bottom/right to a multiple of ``scale`` (BasicSR's ``mod_crop``) and its bicubic downsampling;
    float32 in [0, 1], LR (1, H / scale, W / scale, 3), HR (1, H, W, 3)."""
    image = load_photo(name)
    h, w = image.shape[0] - image.shape[0] % scale, image.shape[1] - image.shape[1] % scale
    hr = image[:h, :w]
    return (bicubic_downsample(hr, scale)[None].astype(np.float32) / 255.0, hr[None].astype(np.float32) / 255.0)


def mean_error_y(img: Any, ref: Any, crop_border: int) -> Any:
    """The mean signed error (bias) of ``img`` against ``ref`` on Y after the border crop, per image
    (images RGB in [0, 255], (..., H, W, 3)); PSNR penalises it, SSIM's structure term does not."""
    xp, dtype = _xp(img, ref)
    return xp.mean(_prepare(img, crop_border, xp, dtype) - _prepare(ref, crop_border, xp, dtype), axis=(-2, -1))


def _photo_fields(split: str, *, count: dict[str, int], hr_size: int, scale: int) -> dict[str, np.ndarray]:
    if split not in count:
        raise ValueError(f"sr_photos has the splits {sorted(count)}, not {split!r}")
    photos = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
    lr, hr = sr_pairs(photos, n=count[split], hr_size=hr_size, scale=scale, seed=0 if split == "train" else 1)
    return {"lr": lr, "hr": hr}


# The embedded set: 2,000 train / 100 test x4 pairs of 64x64 HR crops (16x16 LR).
input_pipeline.EMBEDDED.setdefault(
    "sr_photos", (functools.partial(_photo_fields, count={"train": 2000, "test": 100}, hr_size=64, scale=4), 0))


# ---------------------------------------------------------------------------------------------
# Loss, baseline, metrics


def l1_loss(sr: jax.Array, hr: jax.Array) -> jax.Array:
    """Mean absolute error (BasicSR's ``L1Loss``, reduction mean), computed in float32."""
    return jnp.mean(jnp.abs(sr.astype(jnp.float32) - hr.astype(jnp.float32)))


# The official DRCT schedule (``options/train/train_DRCT_SRx4_from_scratch.yml``): MultiStepLR halving
# the rate at 250k, 400k, 450k and 475k of 500k iterations.
OFFICIAL_MILESTONES = (0.5, 0.8, 0.9, 0.95)


def official_learning_rate(base: float, fraction: float) -> float:
    """The official MultiStepLR (gamma 0.5) after ``fraction`` (0..1) of a run of any length: ``base``
    halved at each of ``OFFICIAL_MILESTONES`` passed, ``base / 16`` for the last 5 %. A constant rate
    leaves Adam's step noise in the output's mean level (a per-image bias PSNR penalises)."""
    return base * 0.5 ** sum(fraction >= m for m in OFFICIAL_MILESTONES)


def bicubic_upsample(lr: jax.Array, scale: int) -> jax.Array:
    """(B, h, w, C) -> (B, scale h, scale w, C) bicubic (Keys a = -0.5), the SR baseline."""
    b, h, w, c = lr.shape
    return jax.image.resize(lr.astype(jnp.float32), (b, h * scale, w * scale, c), "cubic")


def quantize(x: Any) -> Any:
    """An image in [0, 1] -> float32 values in {0, ..., 255}, as BasicSR's ``tensor2img`` (clip, x255,
    round); NumPy in, NumPy out."""
    xp, _ = _xp(x)
    return xp.round(xp.clip(xp.asarray(x, xp.float32), 0.0, 1.0) * 255.0)


def _xp(*arrays: Any) -> tuple[Any, Any]:
    """(array module, dtype): NumPy float64 (BasicSR's own arithmetic) when every input is a NumPy array
    or list, else ``jax.numpy`` float32 (jit-able, e.g. inside the evaluation step)."""
    if any(isinstance(a, jax.Array) for a in arrays):
        return jnp, jnp.float32
    return np, np.float64


def _prepare(img: Any, crop_border: int, xp: Any, dtype: Any) -> Any:
    """[0, 255] RGB (..., H, W, 3) -> the border-cropped luma Y in [16, 235] (..., H', W')."""
    img = xp.asarray(img, dtype)
    if img.ndim < 3 or img.shape[-1] != 3:
        raise ValueError(f"expected RGB images (..., H, W, 3) in [0, 255], got shape {img.shape}")
    if crop_border:
        img = img[..., crop_border:-crop_border, crop_border:-crop_border, :]
    return img @ xp.asarray(Y_WEIGHTS, dtype) / 255.0 + 16.0


def psnr_y(img: Any, ref: Any, crop_border: int) -> Any:
    """PSNR (dB) on the Y channel after cutting ``crop_border`` pixels from each side, per image
    (BasicSR ``calculate_psnr(..., test_y_channel=True)``); images RGB in [0, 255], (..., H, W, 3)
    (NumPy in: float64 NumPy out; JAX arrays: float32). Identical images give inf."""
    xp, dtype = _xp(img, ref)
    y1, y2 = _prepare(img, crop_border, xp, dtype), _prepare(ref, crop_border, xp, dtype)
    mse = xp.mean((y1 - y2) ** 2, axis=(-2, -1))
    with np.errstate(divide="ignore"):
        return xp.where(mse == 0, xp.inf, 10.0 * xp.log10(255.0 ** 2 / xp.maximum(mse, 1e-30)))


@functools.cache
def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """cv2.getGaussianKernel(size, sigma): a normalised 1-D Gaussian (float64)."""
    t = np.arange(size) - (size - 1) / 2
    k = np.exp(-t ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _filter_valid(x: Any) -> Any:
    """Separable 11x11 Gaussian on the last two axes, valid positions only (cv2.filter2D then [5:-5, 5:-5])."""
    k = [float(v) for v in _gaussian()]
    n = len(k)
    h, w = x.shape[-2:]
    x = sum(k[t] * x[..., t:t + h - n + 1, :] for t in range(n))
    return sum(k[t] * x[..., :, t:t + w - n + 1] for t in range(n))


def ssim_y(img: Any, ref: Any, crop_border: int) -> Any:
    """SSIM on the Y channel after cutting ``crop_border`` pixels from each side, per image (BasicSR
    ``calculate_ssim(..., test_y_channel=True)``: 11x11 Gaussian window, sigma 1.5, valid positions);
    images RGB in [0, 255], (..., H, W, 3), at least 11x11 after the crop (NumPy in: float64 NumPy out;
    JAX arrays: float32)."""
    xp, dtype = _xp(img, ref)
    y1, y2 = _prepare(img, crop_border, xp, dtype), _prepare(ref, crop_border, xp, dtype)
    if min(y1.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after the border crop, got {tuple(y1.shape[-2:])}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = _filter_valid(y1), _filter_valid(y2)
    a, b = y1 - 128.0, y2 - 128.0  # centred: the variances lose less to float32 cancellation
    ma, mb = mu1 - 128.0, mu2 - 128.0
    s11 = _filter_valid(a * a) - ma * ma
    s22 = _filter_valid(b * b) - mb * mb
    s12 = _filter_valid(a * b) - ma * mb
    ssim_map = (2 * mu1 * mu2 + c1) * (2 * s12 + c2) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2))
    return ssim_map.mean(axis=(-2, -1))


# ---------------------------------------------------------------------------------------------
# The training-CLI task


@register_task("super_resolution")
class SuperResolutionTask(Task):
    """Super-resolution: ``batch["lr"]`` (float32 (h, w, 3) in [0, 1]) -> the model's (scale h, scale w, 3)
    estimate of ``batch["hr"]``; L1 loss; evaluation: PSNR and SSIM on Y with a ``crop_border``
    (default ``scale``) border cut, of the model and of bicubic upsampling on the same batches."""

    def __init__(self, scale: int, crop_border: int | None = None):
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        self.scale = int(scale)
        self.crop_border = self.scale if crop_border is None else int(crop_border)
        self.fields = {"lr": Field("float32", (None, None, 3)), "hr": Field("float32", (None, None, 3))}

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return (batch["lr"],)

    def _check(self, sr: jax.Array, batch: Batch) -> None:
        lr, hr = batch["lr"], batch["hr"]
        if hr.shape[1:3] != (lr.shape[1] * self.scale, lr.shape[2] * self.scale) or sr.shape != hr.shape:
            raise ValueError(f"super_resolution (scale {self.scale}): LR {lr.shape}, HR {hr.shape} and the model's "
                             f"output {sr.shape} do not fit (HR and output must be scale x LR)")

    def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        self._check(outputs, batch)
        return l1_loss(outputs, batch["hr"]), {}

    def predict(self, outputs: jax.Array) -> jax.Array:
        return quantize(outputs).astype(jnp.uint8)

    def eval_sums(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        self._check(outputs, batch)
        mask = batch["mask"].astype(jnp.float32)
        hr = quantize(batch["hr"])
        sums = {"count": jnp.sum(mask),
                "loss": jnp.sum(mask * jnp.mean(jnp.abs(outputs - batch["hr"]), axis=(1, 2, 3)))}
        for prefix, est in (("", outputs), ("bicubic_", bicubic_upsample(batch["lr"], self.scale))):
            est = quantize(est)
            sums[prefix + "psnr"] = jnp.sum(mask * psnr_y(est, hr, self.crop_border))
            sums[prefix + "ssim"] = jnp.sum(mask * ssim_y(est, hr, self.crop_border))
        return sums
