"""Selective state spaces (Mamba's S6 layer): the scan, its one-step update, and the mixer branch.

For one channel e of the inner width and one state index n, with input-dependent step Δ and
projections B, C (Gu & Dao 2023, arXiv 2312.00752, Algorithm 2)::

    Ā_t = exp(Δ_t A),  h_t = Ā_t h_{t-1} + Δ_t B_t x_t,  y_t = <h_t, C_t> + D x_t

``selective_scan`` runs the recurrence over a whole sequence in one of three ways that give the same
numbers: ``"associative"`` (``jax.lax.associative_scan`` with the combine
(a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2): O(log L) depth, for training), ``"chunked"`` (a
``lax.scan`` over chunks of ``chunk_size`` steps, associative inside each chunk: the (B, L, E, N)
state tensor only ever exists one chunk at a time, for long sequences) and ``"sequential"`` (a
``lax.scan`` over time steps, the reference). ``selective_state_update`` is one step of it, for
decoding with a cache. The depthwise causal convolution that precedes the scan
(``CausalConv1d``) also carries its last K-1 inputs as a state, so a model can be run as a whole
sequence, as a prompt followed by single steps, or as any split in between, with equal outputs.

``ssm_branch`` is the part of a Mamba mixer after the input projection: causal conv -> SiLU ->
x_proj (Δ, B, C) -> dt_proj -> scan -> y * SiLU(z). Mamba uses one; Vision Mamba's bidirectional
mixer uses two (the second on the reversed sequence). Parameters keep the official layout and
initialisation (state-spaces/mamba ``mamba_simple.py``).
"""
from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers.linear import logical

ScanMethod = Literal["associative", "chunked", "sequential"]
SCAN_METHODS = ("associative", "chunked", "sequential")

__all__ = ["SSMState", "CausalConv1d", "DtProj", "init_ssm_state", "selective_scan", "selective_state_update",
           "ssm_branch", "torch_linear_init", "dt_bias_init", "a_log_init", "SCAN_METHODS"]


class SSMState(NamedTuple):
    """What one selective-SSM branch remembers between decoding steps: the last K-1 inputs of its
    causal convolution ``conv`` (B, K-1, E) and the scan state ``ssm`` (B, E, N). A pytree."""

    conv: jax.Array
    ssm: jax.Array


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _discretize(x, dt, A, B):
    """Ā = exp(Δ A) and B̄x = Δ B x, both (batch, L, E, N) in float32."""
    d_a = jnp.exp(dt[..., None] * A)
    d_bx = (dt * x)[..., None] * B[:, :, None, :]
    return d_a, d_bx


def _associative(d_a, d_bx, h0):
    d_bx = d_bx.at[:, 0].add(d_a[:, 0] * h0)
    return jax.lax.associative_scan(_combine, (d_a, d_bx), axis=1)[1]


def _states_sequential(d_a, d_bx, h0):
    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    _, hs = jax.lax.scan(step, h0, (jnp.moveaxis(d_a, 1, 0), jnp.moveaxis(d_bx, 1, 0)))
    return jnp.moveaxis(hs, 0, 1)


def _check_scan(method: str, x, dt, A, B, C, D, z) -> None:
    if method not in SCAN_METHODS:
        raise ValueError(f"scan method must be one of {SCAN_METHODS}; got {method!r}")
    if x.ndim != 3:
        raise ValueError(f"x must be (batch, length, inner); got shape {x.shape}")
    b, length, e = x.shape
    if dt.shape != x.shape or (z is not None and z.shape != x.shape):
        raise ValueError(f"dt and z must have x's shape {x.shape}; got {dt.shape} and {None if z is None else z.shape}")
    if A.ndim != 2 or A.shape[0] != e:
        raise ValueError(f"A must be (inner={e}, state); got {A.shape}")
    n = A.shape[1]
    if B.shape != (b, length, n) or C.shape != (b, length, n):
        raise ValueError(f"B and C must be (batch, length, state) = {(b, length, n)}; got {B.shape}, {C.shape}")
    if D is not None and D.shape != (e,):
        raise ValueError(f"D must be (inner,) = ({e},); got {D.shape}")


def selective_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    *,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = True,
    initial_state: jax.Array | None = None,
    method: ScanMethod = "associative",
    chunk_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """The selective scan over a sequence; returns ``(y, last_state)``.

    x, dt, z: (batch, L, E); A: (E, N) (negative: Mamba's ``-exp(A_log)``); B, C: (batch, L, N);
    D, dt_bias: (E,). Δ = softplus(dt + dt_bias) when ``dt_softplus``. ``initial_state`` (batch, E, N)
    continues a scan (zeros if None). y = (<h_t, C_t> + D x_t) * SiLU(z_t) (no gate if ``z`` is None)
    in x's dtype; the recurrence runs in float32. ``last_state``: (batch, E, N) float32.
    """
    _check_scan(method, x, dt, A, B, C, D, z)
    dtype = x.dtype
    f32 = lambda t: None if t is None else t.astype(jnp.float32)  # noqa: E731
    xf, dt, A, B, C = f32(x), f32(dt), f32(A), f32(B), f32(C)
    if dt_bias is not None:
        dt = dt + f32(dt_bias)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    b, length, e = x.shape
    h0 = jnp.zeros((b, e, A.shape[1]), jnp.float32) if initial_state is None else f32(initial_state)

    if method == "chunked" and length > chunk_size:
        pad = -length % chunk_size
        padded = [jnp.pad(t, ((0, 0), (0, pad), (0, 0))) for t in (xf, dt, B, C)]
        n_chunks = (length + pad) // chunk_size
        # (chunks, batch, chunk, ...): padded steps have Δ = 0, so Ā = 1 and B̄x = 0 leave h unchanged.
        chunks = [jnp.moveaxis(t.reshape(b, n_chunks, chunk_size, -1), 1, 0) for t in padded]

        def body(h, chunk):
            xc, dtc, bc, cc = chunk
            d_a, d_bx = _discretize(xc, dtc, A, bc)
            hs = _associative(d_a, d_bx, h)
            return hs[:, -1], jnp.einsum("blen,bln->ble", hs, cc)

        last, ys = jax.lax.scan(body, h0, chunks)
        y = jnp.moveaxis(ys, 0, 1).reshape(b, length + pad, e)[:, :length]
    else:
        d_a, d_bx = _discretize(xf, dt, A, B)
        hs = _states_sequential(d_a, d_bx, h0) if method == "sequential" else _associative(d_a, d_bx, h0)
        last = hs[:, -1]
        y = jnp.einsum("blen,bln->ble", hs, C)
    if D is not None:
        y = y + xf * f32(D)
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    return y.astype(dtype), last


def selective_state_update(
    state: jax.Array,
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    *,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One step of the scan: ``state`` (batch, E, N), x, dt, z (batch, E), B, C (batch, N).
    Returns ``(y (batch, E), new_state)``, the same numbers as ``selective_scan`` on a length-1 slice."""
    dtype = x.dtype
    xf, dt = x.astype(jnp.float32), dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    A, B, C = A.astype(jnp.float32), B.astype(jnp.float32), C.astype(jnp.float32)
    state = state.astype(jnp.float32) * jnp.exp(dt[..., None] * A) + (dt * xf)[..., None] * B[:, None, :]
    y = jnp.einsum("ben,bn->be", state, C)
    if D is not None:
        y = y + xf * D.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(dtype), state


# ---------------------------------------------------------------------------------------------
# Initialisers with PyTorch's and the official Mamba code's distributions


def torch_linear_init(in_axis: int | tuple[int, ...] = -2, out_axis: int | tuple[int, ...] = -1):
    """PyTorch's default ``nn.Linear`` / ``nn.Conv`` weight init, U(±1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=in_axis, out_axis=out_axis)


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
    """Mamba's Δ bias: softplus⁻¹(Δ) with Δ log-uniform in [dt_min, dt_max], floored at ``dt_floor``."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), dt_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def a_log_init(key, shape, dtype=jnp.float32):
    """S4D-real: A_log[e, n] = log(n + 1) (A = -exp(A_log) = -(1..N) for every channel)."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32)), shape).astype(dtype)


def _uniform(scale: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


# ---------------------------------------------------------------------------------------------
# Modules


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over the length axis, with its own decoding state.

    ``kernel`` (K, E) and ``bias`` (E,) (PyTorch ``Conv1d(E, E, K, groups=E, padding=K-1)`` keeping
    the first L outputs). ``state`` (batch, K-1, E) holds the K-1 inputs before ``x`` (zeros = the
    sequence start); returns ``(y, new_state)``. A sum of K shifted products (K is 3-4): exact, and
    elementwise, so any sharding of batch and channels is kept."""

    kernel_size: int = 4
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        b, length, e = x.shape
        k = self.kernel_size
        bound = 1.0 / math.sqrt(k)  # torch default: fan_in = K (one input channel per group)
        kernel = self.param("kernel", logical(_uniform(bound), (None, "mlp")), (k, e), self.param_dtype)
        dtype = self.dtype or x.dtype
        if state is None:
            state = jnp.zeros((b, k - 1, e), dtype)
        elif state.shape != (b, k - 1, e):
            raise ValueError(f"conv state must be (batch, kernel_size - 1, channels) = {(b, k - 1, e)}; "
                             f"got {state.shape}")
        full = jnp.concatenate([state.astype(dtype), x.astype(dtype)], axis=1)  # (b, K-1+L, e)
        kernel = kernel.astype(dtype)
        y = sum(full[:, i:i + length] * kernel[i] for i in range(k))
        if self.use_bias:
            bias = self.param("bias", logical(_uniform(bound), ("mlp",)), (e,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y, full[:, full.shape[1] - (k - 1):]


class DtProj(nn.Module):
    """Mamba's ``dt_proj`` (dt_rank -> E): returns the projection *without* its bias, and the bias,
    which the scan adds in float32 inside the softplus (as the official kernels do)."""

    features: int
    std: float
    init: str = "random"
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_floor: float = 1e-4
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.init not in ("random", "constant"):
            raise ValueError(f"dt init must be 'random' or 'constant'; got {self.init!r}")
        kernel_init = _uniform(self.std) if self.init == "random" else nn.initializers.constant(self.std)
        kernel = self.param("kernel", logical(kernel_init, (None, "mlp")), (x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", logical(dt_bias_init(self.dt_min, self.dt_max, self.dt_floor), ("mlp",)),
                          (self.features,), self.param_dtype)
        dtype = self.dtype or x.dtype
        return x.astype(dtype) @ kernel.astype(dtype), bias


def ssm_branch(module: nn.Module, x: jax.Array, z: jax.Array | None, *, state: SSMState | None, suffix: str = "",
               a_log_name: str | None = None, state_size: int, dt_rank: int, conv_kernel: int,
               use_conv_bias: bool, dt_min: float, dt_max: float, dt_floor: float, dt_scale: float,
               dt_init: str, scan: ScanMethod, chunk_size: int, mask: jax.Array | None = None
               ) -> tuple[jax.Array, SSMState]:
    """One selective-SSM branch: y = Scan(SiLU(conv(x))) * SiLU(z) for x, z (batch, L, E), with its
    parameters created in ``module``'s scope (call it from ``module``'s compact ``__call__``):
    ``conv1d{s}``, ``x_proj{s}`` (E -> dt_rank + 2N, no bias), ``dt_proj{s}`` (dt_rank -> E),
    ``A_log{s}`` (E, N; or ``a_log_name``), ``D{s}`` (E,), s = ``suffix``. ``state`` continues from a previous call: a
    length-1 input then takes the one-step update, a longer one the scan from that state. ``mask``
    (batch, L) zeros padding positions after the convolution, as transformers does."""
    e = x.shape[-1]
    dtype, pdt = module.dtype, module.param_dtype
    conv = CausalConv1d(conv_kernel, use_conv_bias, dtype=dtype, param_dtype=pdt, name=f"conv1d{suffix}")
    x, conv_state = conv(x, None if state is None else state.conv)
    x = jax.nn.silu(x)
    if mask is not None:
        x = x * mask[..., None].astype(x.dtype)
    x_dbl = nn.Dense(dt_rank + 2 * state_size, use_bias=False, dtype=dtype, param_dtype=pdt,
                     kernel_init=logical(torch_linear_init(), ("mlp", None)), name=f"x_proj{suffix}")(x)
    dt, B, C = jnp.split(x_dbl, [dt_rank, dt_rank + state_size], axis=-1)
    dt, dt_bias = DtProj(e, dt_rank ** -0.5 * dt_scale, dt_init, dt_min, dt_max, dt_floor, dtype=dtype,
                         param_dtype=pdt, name=f"dt_proj{suffix}")(dt)
    a_log = module.param(a_log_name or f"A_log{suffix}", logical(a_log_init, ("mlp", None)), (e, state_size), pdt)
    d = module.param(f"D{suffix}", logical(nn.initializers.ones_init(), ("mlp",)), (e,), pdt)
    A = -jnp.exp(a_log.astype(jnp.float32))
    if state is not None and x.shape[1] == 1:
        y, h = selective_state_update(state.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], d,
                                      None if z is None else z[:, 0], dt_bias=dt_bias)
        y = y[:, None]
    else:
        y, h = selective_scan(x, dt, A, B, C, d, z, dt_bias=dt_bias, method=scan, chunk_size=chunk_size,
                              initial_state=None if state is None else state.ssm)
    return y, SSMState(conv_state, h)


def init_ssm_state(batch: int, inner: int, state_size: int, conv_kernel: int, dtype: Any = jnp.float32) -> SSMState:
    """Zeros: the state of a branch before its first token (the conv state in ``dtype``, the scan
    state float32)."""
    return SSMState(jnp.zeros((batch, conv_kernel - 1, inner), dtype), jnp.zeros((batch, inner, state_size),
                                                                                 jnp.float32))

