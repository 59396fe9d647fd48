"""Cross-domain hyperspectral classification on generated scenes, and the BiDA training loop.

No package ships a hyperspectral data set, so ``CrossDomainScenes`` generates a source / target pair
in the spirit of the Houston 2013 -> 2018 task of BiDA ("Bi-directional Domain Adaptation for
Cross-Domain Hyperspectral Image Classification", arXiv 2507.02268; official code
YuxiangZhang-BIT/IEEE_TCSVT_BiDA): the same land-cover classes seen by another sensor / season.

- Class spectra: each class is a smooth curve over the bands (a baseline slope plus three Gaussian
  absorption / reflection features at random wavelengths), values in about [0.1, 1].
- Class maps: spatially coherent regions, the argmax over classes of smooth random fields (white noise
  at 1/8 resolution, bilinearly upsampled), drawn independently for each domain.
- Pixels: the class spectrum times a per-pixel brightness (1 + 0.1 N(0, 1)) plus N(0, ``noise``) noise.
- Domain shift: the target's class spectra are the source's times a smooth random gain over the bands
  (1 + ``gain`` x a curve in [-1, 1]) plus a smooth random shift (``shift`` x a curve in [-1, 1]); the
  target has its own class map, brightness and noise.
- Both cubes are normalised as the official ``load_mat_hsi(norm='normband')``: divided by their maximum,
  then every pixel's spectrum to unit L2 norm.
- Samples are ``patch`` x ``patch`` (13) patches centred on each labelled pixel of the cube, reflect-padded
  at the borders (the official ``main.py``); the source patches are labelled, the target ones are
  used unlabelled for adaptation and labelled for evaluation only.

Training (:func:`make_train_step`, :func:`fit`) is the official ``train_pipeline.train``: each step a
labelled source batch and an unlabelled target batch of the same size, the student in training mode,
an EMA teacher (its own random initialisation, training mode, updated after every step), the loss
``jaxformers.models.bida.bida_loss`` with the MMD alignment from step ``align_after`` on. The official
optimizer is ``optax.sgd(1e-2)``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.models.bida import BiDAOutput, bida_loss, ema_update
from train.search_common import accuracy as chunked_accuracy


# ---------------------------------------------------------------------------------------------
# Data


def smooth_curve(num_bands: int, rng: np.random.Generator, knots: int = 5) -> np.ndarray:
    """A smooth random curve over the bands with values in [-1, 1]: ``knots`` random values joined by
    cosine interpolation."""
    values = rng.uniform(-1, 1, knots)
    pos = np.linspace(0, knots - 1, num_bands)
    i = np.minimum(pos.astype(int), knots - 2)
    t = (1 - np.cos(np.pi * (pos - i))) / 2
    return values[i] * (1 - t) + values[i + 1] * t


def class_spectra(num_classes: int, num_bands: int, rng: np.random.Generator) -> np.ndarray:
    """(num_classes, num_bands) smooth class spectra in about [0.1, 1]."""
    wl = np.linspace(0, 1, num_bands)
    out = np.empty((num_classes, num_bands))
    for c in range(num_classes):
        curve = rng.uniform(0.2, 0.5) + rng.uniform(-0.2, 0.2) * wl
        for _ in range(3):
            curve += rng.uniform(-0.25, 0.35) * np.exp(-0.5 * ((wl - rng.uniform(0, 1)) / rng.uniform(0.04, 0.15)) ** 2)
        out[c] = curve
    return np.clip(out, 0.05, None)


def class_map(size: int, num_classes: int, rng: np.random.Generator, cell: int = 8) -> np.ndarray:
    """(size, size) int32 map of spatially coherent class regions: the argmax of smooth random fields."""
    coarse = rng.standard_normal((num_classes, size // cell + 2, size // cell + 2))
    fine = jax.image.resize(jnp.asarray(coarse), (num_classes, size + 2 * cell, size + 2 * cell), "bilinear")
    return np.asarray(jnp.argmax(fine[:, cell:cell + size, cell:cell + size], axis=0), np.int32)


def normband(cube: np.ndarray) -> np.ndarray:
    """The official ``norm='normband'``: divide by the cube's maximum, then each pixel's spectrum to unit L2 norm."""
    cube = cube / cube.max()
    norm = np.sqrt(np.sum(cube ** 2, axis=-1, keepdims=True))
    return cube / np.where(norm == 0, 1, norm)


@dataclasses.dataclass(frozen=True)
class CrossDomainScenes:
    """A generated source / target pair of hyperspectral scenes (see the module docstring)."""

    num_classes: int = 7
    num_bands: int = 48
    size: int = 64
    patch: int = 13
    gain: float = 0.3
    shift: float = 0.05
    noise: float = 0.02
    seed: int = 0

    @functools.cached_property
    def scenes(self) -> dict[str, np.ndarray]:
        """``source`` / ``target`` float32 cubes (size, size, bands) and ``source_labels`` / ``target_labels``
        (size, size) int32 maps, plus the class spectra of both domains."""
        rng = np.random.default_rng(self.seed)
        spectra = class_spectra(self.num_classes, self.num_bands, rng)
        target_spectra = (spectra * (1 + self.gain * smooth_curve(self.num_bands, rng))
                          + self.shift * smooth_curve(self.num_bands, rng))
        out = {"source_spectra": spectra, "target_spectra": target_spectra}
        for domain, s in (("source", spectra), ("target", target_spectra)):
            labels = class_map(self.size, self.num_classes, rng)
            brightness = 1 + 0.1 * rng.standard_normal((self.size, self.size, 1))
            cube = s[labels] * brightness + self.noise * rng.standard_normal((self.size, self.size, self.num_bands))
            out[domain] = normband(np.clip(cube, 0, None)).astype(np.float32)
            out[domain + "_labels"] = labels
        return out

    def patches(self, domain: str, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``n`` random (default: all) ``patch`` x ``patch`` patches of ``domain`` ("source" / "target"),
        (n, patch, patch, bands) float32, and the labels (n,) of their centre pixels."""
        if domain not in ("source", "target"):
            raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
        cube, labels = self.scenes[domain], self.scenes[domain + "_labels"]
        r = self.patch // 2
        padded = np.pad(cube, ((r, r), (r, r), (0, 0)), mode="reflect")
        rows, cols = np.divmod(np.arange(self.size * self.size), self.size)
        if n is not None:
            pick = np.random.default_rng(seed).choice(rows.size, n, replace=n > rows.size)
            rows, cols = rows[pick], cols[pick]
        windows = np.lib.stride_tricks.sliding_window_view(padded, (self.patch, self.patch), axis=(0, 1))
        x = np.ascontiguousarray(windows[rows, cols].transpose(0, 2, 3, 1))
        return x, labels[rows, cols].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Training (official train_pipeline.train)


class BiDAState(NamedTuple):
    params: Any
    batch_stats: Any
    teacher: Any  # the EMA teacher's parameters
    opt_state: Any
    step: jax.Array


def init_state(variables: dict, teacher_params: Any, tx: optax.GradientTransformation) -> BiDAState:
    """The student's variables, the teacher's own (independently initialised, as the official
    ``get_model(..., ema=True)``) parameters and the optimizer state."""
    return BiDAState(variables["params"], variables.get("batch_stats", {}), teacher_params,
                     tx.init(variables["params"]), jnp.zeros((), jnp.int32))


def make_train_step(model: Any, tx: optax.GradientTransformation, *, lambda1: float = 0.1, lambda2: float = 1.0,
                    ema_decay: float = 0.999, lambda_align: float | None = None) -> Callable:
    """``step(state, source, labels, target, rng, align) -> (state, loss, terms, grads)`` (not jitted):
    student and EMA teacher forward in training mode, ``bida_loss``, one optimizer step, the EMA update.
    ``lambda_align``: the alignment's weight in ``bida_loss`` (default ``lambda1``, the official objective)."""

    def step(state: BiDAState, source, labels, target, rng, align):
        student_rng, teacher_rng = jax.random.split(rng)
        teacher, _ = model.apply({"params": state.teacher, "batch_stats": state.batch_stats}, source, target,
                                 train=True, rngs={"dropout": teacher_rng}, mutable=["batch_stats"])

        def loss_fn(params):
            out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, source, target,
                                       train=True, rngs={"dropout": student_rng}, mutable=["batch_stats"])
            loss, terms = bida_loss(BiDAOutput(*out), BiDAOutput(*teacher), labels, lambda1=lambda1,
                                    lambda2=lambda2, align=align, lambda_align=lambda_align)
            return loss, (terms, updates["batch_stats"])

        (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        teacher_params = ema_update(state.teacher, params, state.step + 1, ema_decay)
        return BiDAState(params, batch_stats, teacher_params, opt_state, state.step + 1), loss, terms, grads

    return step


def accuracy(model: Any, variables: dict, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Overall accuracy (OA) of the target-branch inference path on (x, y), in chunks of ``batch``."""
    return chunked_accuracy(functools.partial(jax.jit(model.apply), variables), x, y, chunk=batch)


def fit(model: Any, variables: dict, teacher_params: Any, data: CrossDomainScenes, *, steps: int, batch: int = 128,
        tx: optax.GradientTransformation | None = None, align_after: int | None = None, seed: int = 0,
        lambda1: float = 0.1, lambda2: float = 1.0, lambda_align: float | None = None,
        jit: Callable = jax.jit) -> tuple[dict, list[dict[str, float]]]:
    """``steps`` BiDA steps on random source / target patch batches of ``data`` (official defaults: SGD
    lr 1e-2, batch 128, alignment after half of training, lambda1 0.1, lambda2 1; lambda1 = lambda2 = 0
    and no alignment is the source-only baseline; ``lambda_align``: see :func:`make_train_step`). Returns the trained variables and the per-step loss terms."""
    tx = optax.sgd(1e-2) if tx is None else tx
    align_after = steps // 2 if align_after is None else align_after
    step = jit(make_train_step(model, tx, lambda1=lambda1, lambda2=lambda2, lambda_align=lambda_align))
    state, history = init_state(variables, teacher_params, tx), []
    for i in range(steps):
        xs, ys = data.patches("source", batch, seed=2 * (seed * steps + i))
        xt, _ = data.patches("target", batch, seed=2 * (seed * steps + i) + 1)
        state, loss, terms, _ = step(state, xs, ys, xt, jax.random.key(seed * steps + i), i >= align_after)
        history.append({"loss": float(loss), **{k: float(v) for k, v in terms.items()}})
    return {"params": state.params, "batch_stats": state.batch_stats}, history
