"""Legendre Memory Units (Voelker et al., NeurIPS 2019) in their parallel (FFT) and recurrent forms,
and the leaky integrate-and-fire neuron of spiking networks.

An LMU keeps a memory m_t ∈ R^d that holds the last θ steps of a scalar input u projected on the
first d shifted Legendre polynomials. Its continuous dynamics θ ṁ = A m + B u have (q = 0..d-1,
R_q = (2q+1)/θ) A_ij = R_i · (-1 if i < j else (-1)^(i-j+1)), B_i = R_i (-1)^i; discretised with a
zero-order hold at dt = 1 (``scipy.signal.cont2discrete(..., method="zoh")`` in the official code,
here the equivalent matrix exponential of [[A, B], [0, 0]]): m_t = Ā m_{t-1} + B̄ u_t. With m_0 = 0 the
memory is a causal convolution of u with the impulse response H[t] = Āᵗ B̄, computed for a whole
sequence at once with real FFTs of length 2L (``lmu_memory_fft``), or step by step
(``lmu_memory_recurrent``); both give the same memory.

``lif`` is spikingjelly's multi-step LIF node (decay_input, hard reset to 0, ``detach_reset``):
H_t = V_{t-1} + (X_t - V_{t-1}) / τ, S_t = Θ(H_t - V_th), V_t = H_t (1 - S_t); the Heaviside step has
the derivative of sigmoid(α x) (α = 4, spikingjelly's default surrogate) in the backward pass.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers.linear import logical
from jaxformers.layers.norm import BatchNorm

__all__ = ["LMUCell", "lif", "lmu_state_space", "lmu_discretize", "lmu_impulse", "lmu_memory_fft",
           "lmu_memory_recurrent", "spike"]


def lmu_state_space(memory_size: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """The continuous-time (A (d, d), B (d, 1)) of a Legendre memory of window ``theta`` (float64)."""
    q = np.arange(memory_size, dtype=np.float64)
    r = ((2 * q + 1) / theta)[:, None]
    i, j = np.meshgrid(q, q, indexing="ij")
    a = r * np.where(i < j, -1.0, (-1.0) ** (i - j + 1))
    b = r * ((-1.0) ** q)[:, None]
    return a, b


def lmu_discretize(a: np.ndarray, b: np.ndarray, dt: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Zero-order-hold discretisation: expm([[A, B], [0, 0]] dt) = [[Ā, B̄], [0, I]] (float64)."""
    from scipy.linalg import expm

    d, k = b.shape
    block = np.zeros((d + k, d + k))
    block[:d, :d], block[:d, d:] = a, b
    e = expm(block * dt)
    return e[:d, :d], e[:d, d:]


@functools.lru_cache(maxsize=32)
def _lmu_tables(memory_size: int, theta: float, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ad, bd = lmu_discretize(*lmu_state_space(memory_size, theta))
    return ad, bd, lmu_impulse(ad, bd, seq_len)


def lmu_impulse(ad: np.ndarray, bd: np.ndarray, seq_len: int) -> np.ndarray:
    """H (seq_len, d): H[t] = Āᵗ B̄, the memory's response to a unit input at step 0 (float64)."""
    out, x = np.empty((seq_len, ad.shape[0])), bd[:, 0].copy()
    for t in range(seq_len):
        out[t] = x
        x = ad @ x
    return out


def lmu_memory_fft(u: jax.Array, impulse: jax.Array) -> jax.Array:
    """m (B, L, d) for inputs u (B, L) from the impulse response (≥ L, d): causal convolution by rfft
    of length 2L (no wrap-around), as the official ``LMUFFTCell``."""
    length = u.shape[1]
    n = 2 * length
    fu = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)  # (B, L+1)
    fh = jnp.fft.rfft(impulse[:length].astype(jnp.float32), n=n, axis=0)  # (L+1, d)
    return jnp.fft.irfft(fu[:, :, None] * fh[None], n=n, axis=1)[:, :length]


def lmu_memory_recurrent(u: jax.Array, ad: jax.Array, bd: jax.Array, m0: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array]:
    """m (B, L, d) and the last memory from m_t = Ā m_{t-1} + B̄ u_t (``lax.scan``; m_0 = ``m0`` or 0)."""
    ad, bd = jnp.asarray(ad, jnp.float32), jnp.asarray(bd, jnp.float32)[:, 0]
    m0 = jnp.zeros((u.shape[0], ad.shape[0]), jnp.float32) if m0 is None else m0.astype(jnp.float32)

    def step(m, u_t):
        m = m @ ad.T + u_t[:, None] * bd
        return m, m

    last, ms = jax.lax.scan(step, m0, jnp.moveaxis(u.astype(jnp.float32), 1, 0))
    return jnp.moveaxis(ms, 0, 1), last


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def spike(x: jax.Array, alpha: float = 4.0) -> jax.Array:
    """Heaviside step Θ(x) (1 where x >= 0) with a sigmoid surrogate gradient α σ(αx)(1 - σ(αx))."""
    return (x >= 0).astype(x.dtype)


@spike.defjvp
def _spike_jvp(alpha, primals, tangents):
    (x,), (dx,) = primals, tangents
    sg = jax.nn.sigmoid(alpha * x)
    return spike(x, alpha), dx * alpha * sg * (1 - sg)


def lif(x: jax.Array, *, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0, detach_reset: bool = True,
        axis: int = 1) -> jax.Array:
    """Spikes of a layer of LIF neurons driven by ``x`` over time (``axis``, default 1 of (B, L, C)),
    starting from V = 0: spikingjelly's ``MultiStepLIFNode(tau, v_threshold, detach_reset)``."""
    xs = jnp.moveaxis(x, axis, 0)

    def step(v, x_t):
        h = v + (x_t - v) / tau
        s = spike(h - v_threshold, alpha)
        reset = jax.lax.stop_gradient(s) if detach_reset else s
        return h * (1 - reset), s

    _, spikes = jax.lax.scan(step, jnp.zeros(xs.shape[1:], xs.dtype), xs)
    return jnp.moveaxis(spikes, 0, axis)


class LMUCell(nn.Module):
    """The LMUFormer memory cell (``LMUFFTCell`` / ``SpikingLMUFFTCell``): u = f_u(W_u x) (one scalar per
    step), m = LMU memory of u, h = f_h(W_h [m; x]). f = ReLU, or BatchNorm + LIF on u, m and h when
    ``spiking``. ``memory="fft"`` (parallel, needs L <= ``seq_len``) or ``"recurrent"`` (any length)."""

    hidden_size: int
    memory_size: int
    theta: float
    seq_len: int
    spiking: bool = False
    tau: float = 2.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Ā, B̄, H) as float64 numpy arrays."""
        return _lmu_tables(self.memory_size, float(self.theta), self.seq_len)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, memory: str = "fft") -> jax.Array:
        if memory not in ("fft", "recurrent"):
            raise ValueError(f"memory must be 'fft' or 'recurrent'; got {memory!r}")
        length = x.shape[1]
        if memory == "fft" and length > self.seq_len:
            raise ValueError(f"the sequence has {length} steps but this LMU's FFT memory covers seq_len={self.seq_len} "
                             f"steps (theta={self.theta}); build the model with seq_len >= {length} or run "
                             f"memory='recurrent'")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = lambda n, name: nn.Dense(n, kernel_init=logical(nn.initializers.truncated_normal(0.02),  # noqa: E731
                                                                ("embed", "mlp")),
                                         bias_init=logical(nn.initializers.zeros_init(), ("mlp",)), name=name, **kw)
        bn = lambda name: BatchNorm(train=train, axis_name=None, name=name, **kw)  # noqa: E731
        u = dense(1, "W_u")(x)
        u = lif(bn("bn_u")(u), tau=self.tau) if self.spiking else jax.nn.relu(u)
        ad, bd, impulse = self.tables()
        if memory == "fft":
            m = lmu_memory_fft(u[..., 0], jnp.asarray(impulse, jnp.float32))
        else:
            m, _ = lmu_memory_recurrent(u[..., 0], ad, bd)
        m = m.astype(x.dtype)
        if self.spiking:
            m = lif(bn("bn_m")(m), tau=self.tau)
        h = dense(self.hidden_size, "W_h")(jnp.concatenate([m, x], axis=-1))
        return lif(bn("bn_h")(h), tau=self.tau) if self.spiking else jax.nn.relu(h)
