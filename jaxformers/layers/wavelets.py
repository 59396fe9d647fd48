"""The 2-D dual-tree complex wavelet transform (DTCWT), forward and inverse, in JAX.

Kingsbury's DTCWT ("Complex wavelets for shift invariant analysis and filtering of signals",
Applied and Computational Harmonic Analysis 10(3), 2001; Selesnick, Baraniuk, Kingsbury, "The
dual-tree complex wavelet transform", IEEE Signal Processing Magazine 22(6), 2005), computed exactly
as ``pytorch_wavelets`` 1.3.0 (fbcotter/pytorch_wavelets, ``dtcwt/transform2d.py``,
``dtcwt/lowlevel.py``) computes it with its default ``mode="symmetric"``: level 1 with a
biorthogonal filter pair (``near_sym_a`` 5/7 taps, ``near_sym_b`` 13/19 taps), levels 2..J with
quarter-shift filters (``qshift_a`` 10 taps, ``qshift_b`` 14 taps), half-sample symmetric extension
at the borders, the same quad-to-complex pairing of the six orientations (15, 45, 75, 105, 135, 165
degrees) and the same padding of odd sizes. The Scattering Vision Transformer (SVT, Patro et al.,
arXiv 2311.01310, ``jaxformers/models/svt.py``) mixes tokens through its level-1 transform.

Layout (NHWC, channels last):

- ``dtcwt_forward(x, levels)``, x (B, H, W, C) real -> ``(lowpass, highpasses)``: lowpass
  (B, H_J, W_J, C) (level 1 is **not** decimated: H_1 = H rounded up to even), ``highpasses[j]``
  (B, H / 2^(j+1), W / 2^(j+1), 6, C, 2): six orientations, (real, imaginary) last.
  pytorch_wavelets' (B, C, 6, h, w, 2) is ``highpass.transpose(0, 4, 3, 1, 2, 5)``.
- ``dtcwt_inverse(lowpass, highpasses)`` -> (B, H, W, C); the transforms are perfect-reconstruction
  pairs (round trip to float32 rounding).

Every 1-D filtering step (filter, filter-and-decimate, interpolate) is a linear map along one axis
with border handling; it is built once per length as a small dense matrix in NumPy and applied with
an ``einsum`` along the height or width axis (float32 at ``Precision.HIGHEST``): the same numbers as
the polyphase convolutions of pytorch_wavelets, any dtype, differentiable, and a matmul on
accelerators. The filter taps are the published ones that pytorch_wavelets ships (``.npz`` files
from Kingsbury's DTCWT toolbox); the derived filters follow their symmetries.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BIORTHOGONAL", "QSHIFT", "dtcwt_forward", "dtcwt_inverse", "biort_filters", "qshift_filters"]

# Level-1 analysis lowpass h0o and synthesis lowpass g0o (Kingsbury's near-symmetric filters).
BIORTHOGONAL = {
    "near_sym_a": ([-0.05, 0.25, 0.6, 0.25, -0.05],
                   [-0.010714285714285713, -0.05357142857142857, 0.26071428571428573, 0.6071428571428571,
                    0.26071428571428573, -0.05357142857142857, -0.010714285714285713]),
    "near_sym_b": ([-0.0017578125, 0.0, 0.022265625, -0.046875, -0.0482421875, 0.296875, 0.55546875, 0.296875,
                    -0.0482421875, -0.046875, 0.022265625, 0.0, -0.0017578125],
                   [7.062639508928571e-05, 0.0, -0.0013419015066964285, -0.0018833705357142855,
                    0.007156808035714285, 0.023856026785714284, -0.05564313616071428, -0.05168805803571428,
                    0.29975760323660716, 0.5594308035714286, 0.29975760323660716, -0.05168805803571428,
                    -0.05564313616071428, 0.023856026785714284, 0.007156808035714285, -0.0018833705357142855,
                    -0.0013419015066964285, 0.0, 7.062639508928571e-05]),
}
# Quarter-shift tree-a analysis lowpass h0a (levels >= 2).
QSHIFT = {
    "qshift_a": [0.051130405283831656, -0.013975370246888838, -0.10983605166597087, 0.26383956105893763,
                 0.7666284677930372, 0.5636557101270515, 0.0008736226952170968, -0.1002312195074762,
                 -0.0016896812725281543, -0.006181881892116438],
    "qshift_b": [0.003253142763653182, -0.00388321199915849, 0.03466034684485349, -0.03887280126882779,
                 -0.11720388769911527, 0.27529538466888204, 0.7561456438925225, 0.5688104207121227,
                 0.011866092033797, -0.1067118046866654, 0.023825384794920298, 0.01702522388155399,
                 -0.005439475937274115, -0.004556895628475491],
}


def _alternate(h: np.ndarray, first: int) -> np.ndarray:
    return h * (first * (-1.0) ** np.arange(len(h)))


def biort_filters(name: str) -> dict[str, np.ndarray]:
    """``h0o, g0o, h1o, g1o`` of a level-1 biorthogonal pair: h1o = g0o modulated (-1)^(n+1),
    g1o = h0o modulated (-1)^n (the relations of the published taps)."""
    if name not in BIORTHOGONAL:
        raise ValueError(f"unknown level-1 filters {name!r}; choose one of {sorted(BIORTHOGONAL)}")
    h0o, g0o = (np.asarray(h, np.float64) for h in BIORTHOGONAL[name])
    return {"h0o": h0o, "g0o": g0o, "h1o": _alternate(g0o, -1), "g1o": _alternate(h0o, 1)}


def qshift_filters(name: str) -> dict[str, np.ndarray]:
    """The eight quarter-shift filters from h0a: h0b = g0a = reversed h0a, g0b = h0a, h1a = g1b =
    h0b modulated (-1)^n, h1b = g1a = reversed h1a."""
    if name not in QSHIFT:
        raise ValueError(f"unknown quarter-shift filters {name!r}; choose one of {sorted(QSHIFT)}")
    h0a = np.asarray(QSHIFT[name], np.float64)
    h0b = h0a[::-1]
    h1a = _alternate(h0b, 1)
    h1b = h1a[::-1]
    return {"h0a": h0a, "h0b": h0b, "g0a": h0b, "g0b": h0a, "h1a": h1a, "h1b": h1b, "g1a": h1b, "g1b": h1a}


def _symmetric_indices(length: int, pad: int) -> np.ndarray:
    """Indices of ``arange(-pad, length + pad)`` reflected half-sample symmetrically into [0, length)."""
    r = np.mod(np.arange(-pad, length + pad), 2 * length)
    return np.where(r >= length, 2 * length - 1 - r, r)


def _from_taps(length_out: int, length_in: int, rows) -> np.ndarray:
    """A (length_out, length_in) matrix from (output index, input indices, weights) triples."""
    m = np.zeros((length_out, length_in))
    for i, idx, w in rows:
        np.add.at(m[i], idx, w)
    return m


@functools.lru_cache(maxsize=None)
def _filter_matrix(length: int, taps: tuple[float, ...]) -> np.ndarray:
    """Same-size convolution with the odd-length filter ``taps``, symmetric borders (``colfilter``)."""
    h = np.asarray(taps)[::-1]  # pytorch_wavelets reverses the taps and cross-correlates
    xe = _symmetric_indices(length, len(h) // 2)
    return _from_taps(length, length, ((i, xe[i:i + len(h)], h) for i in range(length)))


@functools.lru_cache(maxsize=None)
def _decimate_matrix(length: int, ha: tuple[float, ...], hb: tuple[float, ...], highpass: bool) -> np.ndarray:
    """Two-tree filtering and decimation by 2 (``coldfilt``): outputs alternate between the trees."""
    ha, hb = np.asarray(ha)[::-1], np.asarray(hb)[::-1]
    m = len(ha)
    xe = _symmetric_indices(length, m)
    rows = []
    for j in range(length // 4):
        a = (j * 2, xe[2 + 4 * j + 2 * np.arange(m)], ha)
        b = (j * 2, xe[3 + 4 * j + 2 * np.arange(m)], hb)
        if highpass:
            a, b = b, a
        rows += [a, (b[0] + 1, b[1], b[2])]
    return _from_taps(length // 2, length, rows)


@functools.lru_cache(maxsize=None)
def _interpolate_matrix(length: int, ha: tuple[float, ...], hb: tuple[float, ...], highpass: bool) -> np.ndarray:
    """Two-tree interpolation by 2 (``colifilt``): four polyphase outputs per input pair."""
    ha, hb = np.asarray(ha)[::-1], np.asarray(hb)[::-1]
    m2 = len(ha) // 2
    xe = _symmetric_indices(length, m2)
    if m2 % 2 == 0:
        filters = (ha[::2], hb[::2], ha[1::2], hb[1::2])
        sources = ((xe[1:-2:2], xe[:-2:2], xe[3::2], xe[2::2]) if highpass else
                   (xe[:-2:2], xe[1:-2:2], xe[2::2], xe[3::2]))
    else:
        filters = (ha[1::2], hb[1::2], ha[::2], hb[::2])
        sources = ((xe[2:-1:2], xe[1:-1:2], xe[2:-1:2], xe[1:-1:2]) if highpass else
                   (xe[1:-1:2], xe[2:-1:2], xe[1:-1:2], xe[2:-1:2]))
    rows = [(4 * i + t, src[i:i + m2], f) for t, (f, src) in enumerate(zip(filters, sources))
            for i in range(length // 2)]
    return _from_taps(2 * length, length, rows)


def _along(x: jax.Array, matrix: np.ndarray, axis: int) -> jax.Array:
    """``matrix`` applied along the height (``axis=1``) or width (``axis=2``) of an NHWC array."""
    m = jnp.asarray(matrix, x.dtype)
    spec = "ij,bjwc->biwc" if axis == 1 else "ij,bhjc->bhic"
    return jnp.einsum(spec, m, x, precision=jax.lax.Precision.HIGHEST)


def _t(h: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in h)


def _quads_to_complex(y: jax.Array) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """Corners (a b / c d) of each 2x2 quad -> two complex subbands (a - d, b + c) and (a + d, b - c)."""
    y = y / np.sqrt(2.0)
    a, b = y[:, 0::2, 0::2], y[:, 0::2, 1::2]
    c, d = y[:, 1::2, 0::2], y[:, 1::2, 1::2]
    return (a - d, b + c), (a + d, b - c)


def _complex_to_quads(w1: tuple[jax.Array, jax.Array], w2: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Inverse of :func:`_quads_to_complex`."""
    (w1r, w1i), (w2r, w2i) = w1, w2
    top = jnp.stack([w1r + w2r, w1i + w2i], axis=3)  # (B, h, w, 2, C): columns 0, 1 of even rows
    bottom = jnp.stack([w1i - w2i, w2r - w1r], axis=3)
    b, h, w, _, c = top.shape
    y = jnp.stack([top, bottom], axis=2).reshape(b, 2 * h, 2 * w, c)
    return y / np.sqrt(2.0)


def _to_orientations(lh, hl, hh) -> jax.Array:
    (d15, d165), (d45, d135), (d75, d105) = _quads_to_complex(lh), _quads_to_complex(hh), _quads_to_complex(hl)
    bands = (d15, d45, d75, d105, d135, d165)
    return jnp.stack([jnp.stack(z, axis=-1) for z in bands], axis=3)  # (B, h, w, 6, C, 2)


def _from_orientations(high: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    band = [(high[:, :, :, o, :, 0], high[:, :, :, o, :, 1]) for o in range(6)]
    lh = _complex_to_quads(band[0], band[5])
    hl = _complex_to_quads(band[2], band[3])
    hh = _complex_to_quads(band[1], band[4])
    return lh, hl, hh


def _check_levels(levels: int) -> None:
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an int >= 1; got {levels!r}")


def dtcwt_forward(x: jax.Array, levels: int = 1, biort: str = "near_sym_a",
                  qshift: str = "qshift_a") -> tuple[jax.Array, list[jax.Array]]:
    """DTCWT of the NHWC batch ``x`` (B, H, W, C): ``(lowpass (B, H_J, W_J, C), [highpass_j (B, h_j, w_j, 6,
    C, 2) for j in 1..levels])`` as pytorch_wavelets' ``DTCWTForward(biort, qshift, J=levels)`` (module
    docstring for the layout). Odd sizes are extended by repeating the last row / column."""
    _check_levels(levels)
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"dtcwt_forward needs an NHWC batch (batch, height, width, channels); got shape "
                         f"{getattr(x, 'shape', None)}")
    f = biort_filters(biort)
    q = qshift_filters(qshift) if levels > 1 else None
    if x.shape[1] % 2:
        x = jnp.concatenate([x, x[:, -1:]], axis=1)
    if x.shape[2] % 2:
        x = jnp.concatenate([x, x[:, :, -1:]], axis=2)
    h, w = x.shape[1:3]
    lo = _along(x, _filter_matrix(w, _t(f["h0o"])), 2)
    hi = _along(x, _filter_matrix(w, _t(f["h1o"])), 2)
    ll = _along(lo, _filter_matrix(h, _t(f["h0o"])), 1)
    lh = _along(lo, _filter_matrix(h, _t(f["h1o"])), 1)
    hl = _along(hi, _filter_matrix(h, _t(f["h0o"])), 1)
    hh = _along(hi, _filter_matrix(h, _t(f["h1o"])), 1)
    highs = [_to_orientations(lh, hl, hh)]
    for _ in range(1, levels):
        if ll.shape[1] % 4:
            ll = jnp.concatenate([ll[:, :1], ll, ll[:, -1:]], axis=1)
        if ll.shape[2] % 4:
            ll = jnp.concatenate([ll[:, :, :1], ll, ll[:, :, -1:]], axis=2)
        h, w = ll.shape[1:3]
        lo = _along(ll, _decimate_matrix(w, _t(q["h0b"]), _t(q["h0a"]), False), 2)
        hi = _along(ll, _decimate_matrix(w, _t(q["h1b"]), _t(q["h1a"]), True), 2)
        ll = _along(lo, _decimate_matrix(h, _t(q["h0b"]), _t(q["h0a"]), False), 1)
        lh = _along(lo, _decimate_matrix(h, _t(q["h1b"]), _t(q["h1a"]), True), 1)
        hl = _along(hi, _decimate_matrix(h, _t(q["h0b"]), _t(q["h0a"]), False), 1)
        hh = _along(hi, _decimate_matrix(h, _t(q["h1b"]), _t(q["h1a"]), True), 1)
        highs.append(_to_orientations(lh, hl, hh))
    return ll, highs


def dtcwt_inverse(lowpass: jax.Array, highpasses: Sequence[jax.Array], biort: str = "near_sym_a",
                  qshift: str = "qshift_a") -> jax.Array:
    """Inverse DTCWT (pytorch_wavelets' ``DTCWTInverse``): ``lowpass`` (B, H_J, W_J, C) and the
    ``highpasses`` of :func:`dtcwt_forward` -> the NHWC image (B, H, W, C) (even H and W)."""
    if not highpasses:
        raise ValueError("dtcwt_inverse needs at least one highpass level")
    for j, high in enumerate(highpasses):
        if high.ndim != 6 or high.shape[3] != 6 or high.shape[5] != 2:
            raise ValueError(f"highpasses[{j}] must be (batch, h, w, 6 orientations, channels, 2 (real, imag)); "
                             f"got shape {high.shape}")
    f = biort_filters(biort)
    q = qshift_filters(qshift) if len(highpasses) > 1 else None
    low = lowpass
    for high in list(highpasses[1:])[::-1]:
        r1, c1 = high.shape[1:3]
        if low.shape[1] != 2 * r1:
            low = low[:, 1:-1]
        if low.shape[2] != 2 * c1:
            low = low[:, :, 1:-1]
        lh, hl, hh = _from_orientations(high)
        h, w = lh.shape[1:3]
        hi = (_along(hh, _interpolate_matrix(h, _t(q["g1b"]), _t(q["g1a"]), True), 1)
              + _along(hl, _interpolate_matrix(h, _t(q["g0b"]), _t(q["g0a"]), False), 1))
        lo = (_along(lh, _interpolate_matrix(h, _t(q["g1b"]), _t(q["g1a"]), True), 1)
              + _along(low, _interpolate_matrix(h, _t(q["g0b"]), _t(q["g0a"]), False), 1))
        low = (_along(hi, _interpolate_matrix(w, _t(q["g1b"]), _t(q["g1a"]), True), 2)
               + _along(lo, _interpolate_matrix(w, _t(q["g0b"]), _t(q["g0a"]), False), 2))
    high = highpasses[0]
    r1, c1 = high.shape[1:3]
    if low.shape[1] != 2 * r1:
        low = low[:, 1:-1]
    if low.shape[2] != 2 * c1:
        low = low[:, :, 1:-1]
    lh, hl, hh = _from_orientations(high)
    h, w = lh.shape[1:3]
    g0, g1 = _t(f["g0o"]), _t(f["g1o"])
    hi = _along(hh, _filter_matrix(h, g1), 1) + _along(hl, _filter_matrix(h, g0), 1)
    lo = _along(lh, _filter_matrix(h, g1), 1) + _along(low, _filter_matrix(h, g0), 1)
    return _along(hi, _filter_matrix(w, g1), 2) + _along(lo, _filter_matrix(w, g0), 2)
