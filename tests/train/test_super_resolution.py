"""The super-resolution task: PSNR / SSIM on Y with a border crop (worked examples and scikit-image's
float64 references), the bicubic pairs of scikit-image photographs, the task's loss and evaluation sums
(model and bicubic baseline on the same batch)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.super_resolution import (
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    SuperResolutionTask,
    augment,
    bicubic_downsample,
    bicubic_upsample,
    load_photo,
    mean_error_y,
    official_learning_rate,
    photo_pair,
    psnr_y,
    quantize,
    sr_pairs,
    ssim_y,
)

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def _grey(value: float, size: int = 24) -> np.ndarray:
    return np.full((size, size, 3), value, np.float32)


def _y(v: float) -> float:  # luma of a grey RGB value: 16 + (65.481 + 128.553 + 24.966) v / 255 = 16 + 219 v / 255
    return 16.0 + 219.0 * v / 255.0


@pytest.mark.parametrize("case", ["offset", "identical", "border_only", "batch"])
def test_psnr_worked_examples(case):
    if case == "offset":  # grey 100 vs grey 110: every Y differs by 219 * 10 / 255 (a bias of -8.59)
        got = float(psnr_y(_grey(100), _grey(110), crop_border=4))
        assert got == pytest.approx(20 * math.log10(255 / (2190 / 255)), abs=1e-4)  # 29.4547 dB
        assert float(mean_error_y(_grey(100), _grey(110), crop_border=4)) == pytest.approx(-2190 / 255, abs=1e-9)
    elif case == "identical":
        assert float(psnr_y(_grey(50), _grey(50), crop_border=0)) == math.inf
    elif case == "border_only":  # differences only in the 2-pixel border: cropped away with crop_border=2
        a, b = _grey(80), _grey(80)
        b[:2] = 200
        b[:, -2:] = 0
        assert float(psnr_y(a, b, crop_border=2)) == math.inf
        assert float(psnr_y(a, b, crop_border=1)) < 20
    else:  # per image over a batch; one of four pixels differs by 255 in R only: MSE = 65.481^2 / 4
        a = np.zeros((2, 16, 16, 3), np.float32)
        b = a.copy()
        b[1, ::2, ::2, 0] = 255
        got = np.asarray(psnr_y(a, b, crop_border=0))
        assert got[0] == math.inf
        assert got[1] == pytest.approx(10 * math.log10(255 ** 2 / (65.481 ** 2 / 4)), abs=1e-4)


@pytest.mark.parametrize("case", ["constant", "identical", "too_small"])
def test_ssim_worked_examples(case):
    if case == "constant":  # no variance: SSIM is the luminance term (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1)
        y1, y2 = _y(60), _y(190)
        expected = (2 * y1 * y2 + C1) / (y1 ** 2 + y2 ** 2 + C1)
        assert float(ssim_y(_grey(60), _grey(190), crop_border=3)) == pytest.approx(expected, abs=1e-5)
    elif case == "identical":
        img = np.random.default_rng(0).integers(0, 256, (20, 20, 3)).astype(np.float32)
        assert float(ssim_y(img, img, crop_border=2)) == pytest.approx(1.0, abs=1e-6)
    else:
        with pytest.raises(ValueError, match="at least 11x11 pixels after the border crop"):
            ssim_y(_grey(1, 16), _grey(2, 16), crop_border=4)


def test_metrics_match_scikit_image_float64():
    """Random and photograph pairs: our Y-channel PSNR / SSIM equal scikit-image's float64
    ``peak_signal_noise_ratio`` / ``structural_similarity`` (Gaussian 11x11, sigma 1.5, population
    covariance: BasicSR's SSIM) on the same cropped luma: exactly on NumPy input (float64), to 1e-4 in
    float32 under jit."""
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    hr = load_photo("astronaut")[100:164, 200:264].astype(np.float32)
    pairs = [(hr, np.clip(hr + rng.normal(0, 8, hr.shape), 0, 255).round()),
             (rng.integers(0, 256, (40, 48, 3)).astype(np.float64), rng.integers(0, 256, (40, 48, 3)).astype(np.float64))]
    for a, b in pairs:
        for crop in (0, 4):
            ya, yb = (np.asarray(x, np.float64) / 255 @ np.array([65.481, 128.553, 24.966]) + 16 for x in (a, b))
            if crop:
                ya, yb = ya[crop:-crop, crop:-crop], yb[crop:-crop, crop:-crop]
            want_psnr = metrics.peak_signal_noise_ratio(ya, yb, data_range=255)
            want_ssim = metrics.structural_similarity(ya, yb, data_range=255, gaussian_weights=True, sigma=1.5,
                                                      use_sample_covariance=False)
            assert float(psnr_y(a, b, crop)) == pytest.approx(want_psnr, abs=1e-9)
            assert float(ssim_y(a, b, crop)) == pytest.approx(want_ssim, abs=1e-9)
            if crop:
                got = jax.jit(lambda a, b, c=crop: (psnr_y(a, b, c), ssim_y(a, b, c)))(jnp.asarray(a), jnp.asarray(b))
                assert float(got[0]) == pytest.approx(want_psnr, abs=2e-4)
                assert float(got[1]) == pytest.approx(want_ssim, abs=1e-4)


def test_bicubic_pairs_of_photographs():
    """Exact (bicubic of the uint8 HR crop) pairs, reproducible per seed; the official flip / transpose
    augmentation keeps them exact pairs, draws all 8 dihedral transforms of the crops it would have
    cut without it, and is off by default (evaluation crops); whole photographs are mod-cropped."""
    lr, hr = sr_pairs(TRAIN_PHOTOS, n=3, hr_size=48, scale=3, seed=5)
    assert lr.shape == (3, 16, 16, 3) and hr.shape == (3, 48, 48, 3)
    assert lr.dtype == hr.dtype == np.float32 and 0 <= lr.min() and lr.max() <= 1
    hr8 = np.round(hr * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.round(lr * 255).astype(np.uint8), np.stack([bicubic_downsample(h, 3) for h in hr8]))
    again, _ = sr_pairs(TRAIN_PHOTOS, n=3, hr_size=48, scale=3, seed=5)
    np.testing.assert_array_equal(lr, again)
    assert not set(TRAIN_PHOTOS) & set(TEST_PHOTOS)
    with pytest.raises(ValueError, match="must be a multiple of scale=3"):
        sr_pairs(TRAIN_PHOTOS, n=1, hr_size=50, scale=3)

    rng, seen = np.random.default_rng(0), set()
    patch = hr8[0]
    dihedral = [np.rot90(patch, k) for k in range(4)] + [np.rot90(patch[::-1], k) for k in range(4)]
    for _ in range(64):
        out = augment(patch, rng)
        seen.add(next(i for i, d in enumerate(dihedral) if np.array_equal(out, d)))
    assert seen == set(range(8))
    alr, ahr = sr_pairs(("astronaut",), n=8, hr_size=24, scale=4, seed=3, augment_patches=True)
    ahr8 = np.round(ahr * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.round(alr * 255).astype(np.uint8), np.stack([bicubic_downsample(h, 4) for h in ahr8]))
    _, plain = sr_pairs(("astronaut",), n=8, hr_size=24, scale=4, seed=3)
    assert not np.array_equal(ahr, plain)  # the first crop is cut where it would be, then transformed:
    assert any(np.array_equal(ahr[0], np.rot90(t, k)) for t in (plain[0], plain[0, ::-1]) for k in range(4))
    wlr, whr = photo_pair("chelsea", 4)
    assert whr.shape == (1, 300, 448, 3) and wlr.shape == (1, 75, 112, 3)
    np.testing.assert_array_equal(np.round(whr[0] * 255).astype(np.uint8), load_photo("chelsea")[:300, :448])


def test_task_loss_and_eval_sums_with_the_bicubic_baseline():
    """Outputs equal to the bicubic baseline score exactly the baseline's PSNR / SSIM; the HR image itself
    scores higher (inf PSNR, SSIM 1); the loss is the mean absolute error; shapes are checked."""
    task = SuperResolutionTask(scale=4)
    lr, hr = sr_pairs(TEST_PHOTOS, n=2, hr_size=64, scale=4, seed=1)
    batch = {"lr": lr, "hr": hr, "mask": np.array([1, 1])}
    bicubic = bicubic_upsample(lr, 4)
    sums = {k: float(v) for k, v in task.eval_sums(bicubic, batch).items()}
    assert sums["count"] == 2
    assert sums["psnr"] == pytest.approx(sums["bicubic_psnr"]) and sums["ssim"] == pytest.approx(sums["bicubic_ssim"])
    want = np.mean(psnr_y(quantize(np.asarray(bicubic)), quantize(hr), 4))  # float64 NumPy
    assert sums["bicubic_psnr"] / 2 == pytest.approx(float(want), abs=2e-4)
    assert 18 < sums["bicubic_psnr"] / 2 < 40 and 0.3 < sums["bicubic_ssim"] / 2 < 1
    perfect = task.eval_sums(hr, batch)
    assert float(perfect["psnr"]) == math.inf and float(perfect["ssim"]) == pytest.approx(2.0, abs=1e-5)
    loss, _ = task.loss(bicubic, batch)
    assert float(loss) == pytest.approx(float(np.mean(np.abs(np.asarray(bicubic) - hr))), rel=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        task.loss(hr[:, :32], batch)


def test_official_learning_rate_schedule():
    """MultiStepLR of the official x4 config (halved at 250k/400k/450k/475k of 500k iterations) at those
    fractions of any budget."""
    steps = 500_000
    want = [2e-4 * 0.5 ** sum(i >= m for m in (250_000, 400_000, 450_000, 475_000)) for i in range(0, steps, 1000)]
    got = [official_learning_rate(2e-4, i / steps) for i in range(0, steps, 1000)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert official_learning_rate(2e-4, 0.0) == 2e-4 and official_learning_rate(2e-4, 0.999) == 2e-4 / 16
