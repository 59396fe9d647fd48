"""EcoFormer: kernelized supervised hashing (KSH) + linear attention on binary codes.

Paper: "EcoFormer: Energy-Saving Attention with Linear Complexity", Liu, Xu, Zhuang, Cai, Zhuang,
NeurIPS 2022, arXiv 2209.09004. Official code: ziplab/EcoFormer (``pvt/hashing/ksh.py``,
``pvt/hashing/utils.py``, ``pvt/performer.py``, ``pvt/pvt_v2.py``; Apache-2.0). Written from the
official code's math; nothing copied.

What the official code computes (and this module does the same):

- One shared projection ``to_qk`` (queries = keys) and ``to_v``; per token, per head
  ``qk <- qk / ||qk||_2``.
- KSH hash of every token: ``h(x) = sign(A^T (kappa(x) - mu))`` with the Gaussian kernel
  ``kappa_j(x) = exp(-||x - a_j||^2 / (2 sigma))`` against ``m`` anchors ``a_j``, where ``sigma`` is
  the mean squared distance over the tokens and anchors *of the batch at hand* (per image and
  head), ``mu`` the kernel mean stored when A was learned, and ``A`` (heads, nbits, m) a buffer. The
  sign's backward is the official ``BinaryQuantizer``: the gradient passes where ``-1 < y < 1`` and
  is zero elsewhere; ``A`` is detached, so the gradient reaches only ``qk``.
- Linear attention with the official bias term (``linear_attention_bias``), ``b = nbits + 1``:
  ``out_n = (sum_j (h_n . h_j) v_j + b v_n) / (sum_j h_n . h_j + N b)`` computed as
  ``(h_n^T (H^T V) + b v_n) / (h_n^T sum_j h_j + N b)`` in float32: O(N) in the number of tokens.
  The bias adds the token's *own* value (not ``b sum_j v_j``), exactly as the official code, so the
  implied weights ``(h_n . h_j + b [j = n]) / (sum_j h_n . h_j + N b)`` neither sum to one nor are all
  non-negative: kept as the official code computes them.
- Learning A (``train_hashing_weight_woeig``), without gradients to the network, on the first batch
  it sees: anchors are ``m`` random tokens of the batch's first image (one permutation for all
  heads); the similarity target ``S0`` marks each token's ``topk`` most similar tokens (cosine, the
  token itself included) +1 and its ``topk`` least similar -1 (the -1 written second); ``mu`` is
  the kernel mean over tokens and batch; then bit by bit (greedy, ``S <- nbits S0`` and
  ``S <- S - y y^T`` after each bit) the row ``a_r`` is optimised for ``iterations`` steps of SGD
  (lr 5e-4, momentum 0.9, Nesterov) on ``-y^T S y / (N nbits)`` (mean over batch and heads) with the
  relaxation ``y = 2 sigmoid(K a) - 1``; the new row is kept only if its *sign* codes have a lower
  loss than the previous row's (one decision for all heads, as the official scalar loss).

Use: ``attn_type="ecoformer"`` on ``pvt_v2_*`` (stages 1-3; stage 4 keeps full attention, the
official ``last_stage`` rule, ``pvt/pvt_v2.py``) and on ``twins_svt_*`` / ``twins_pcpvt_*`` (the
official ``EcoBlock`` of ``twins/gvt.py``: every block of a stage with ``sr_ratio > 1``, i.e. stages
1-3, LSA and GSA positions alike; full attention where ``sr_ratio == 1``). The hash state lives in the ``hashing`` collection (A, anchors, mu;
buffers, not parameters). Learn it on a first batch with :func:`learn_hashing` (the official code
does this at the first forward of a run, and again every ``k=300`` epochs, i.e. once in its 30-epoch
fine-tuning); afterwards apply the model as usual (the hash state is read-only).

Deviations: the hash state is learned by an explicit call rather than as a side effect of the
first forward pass (JAX functions have no hidden state). The learning holds the (B, H, N, N)
similarity matrix, as the official code does: call it on a batch that fits.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers.linear import logical, trunc_normal
from jaxformers.sharding import constrain

__all__ = ["EcoFormerAttention", "binary_quantizer", "explicit_attention_bias", "kernel_features", "ksh_hash", "ksh_loss",
           "learn_ksh", "learn_hashing", "linear_attention_bias", "similarity_targets", "square_dist"]


@jax.custom_vjp
def binary_quantizer(y: jax.Array) -> jax.Array:
    """sign(y) forward; backward passes the gradient where -1 < y < 1 (official ``BinaryQuantizer``)."""
    return jnp.sign(y)


def _bq_fwd(y):
    return jnp.sign(y), y


def _bq_bwd(y, g):
    return (jnp.where((y < 1.0) & (y > -1.0), g, jnp.zeros_like(g)),)


binary_quantizer.defvjp(_bq_fwd, _bq_bwd)


def square_dist(x: jax.Array, y: jax.Array) -> jax.Array:
    """(..., N, d) x (..., m, d) -> (..., N, m) squared Euclidean distances (difference form)."""
    return jnp.sum((x[..., :, None, :] - y[..., None, :, :]) ** 2, axis=-1)


def kernel_features(x: jax.Array, anchor: jax.Array) -> jax.Array:
    """Gaussian kernel of tokens x (B, H, N, d) to anchors (H, m, d): (B, H, N, m), with sigma the
    mean squared distance of this batch per image and head."""
    k = square_dist(x, anchor[None])
    sigma = k.mean(axis=(-1, -2))[..., None, None]
    return jnp.exp(-k / (2.0 * sigma))


def ksh_hash(x: jax.Array, A: jax.Array, anchor: jax.Array, mvec: jax.Array) -> jax.Array:
    """Binary codes (B, H, N, nbits) in {-1, 0, +1} (0 only where the projection is exactly 0)."""
    k = kernel_features(x, anchor) - mvec[None, :, None, :]
    y = jnp.einsum("bhnm,hkm->bhnk", k, jax.lax.stop_gradient(A))
    return binary_quantizer(y)


def linear_attention_bias(q: jax.Array, k: jax.Array, v: jax.Array, bias: float) -> jax.Array:
    """The official ``linear_attention_bias`` on (B, H, N, D) codes and (B, H, N, E) values, float32:
    ``(q (k^T v) + bias v) / (q . sum_j k_j + N bias)``."""
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    n = q.shape[-2]
    denom = jnp.einsum("bhnd,bhd->bhn", q, k.sum(axis=-2)) + n * bias
    context = jnp.einsum("bhnd,bhne->bhde", k, v)
    return (jnp.einsum("bhde,bhnd->bhne", context, q) + v * bias) / denom[..., None]


def explicit_attention_bias(q: jax.Array, k: jax.Array, v: jax.Array, bias: float) -> jax.Array:
    """The same attention written with the explicit (B, H, N, N) kernel ``q_n . k_j`` (O(N^2); the
    reference that :func:`linear_attention_bias` reorders): ``(sum_j (q_n . k_j) v_j + bias v_n) /
    (sum_j q_n . k_j + N bias)``, float32."""
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    kernel = jnp.einsum("bhnd,bhmd->bhnm", q, k)
    n = q.shape[-2]
    return (jnp.einsum("bhnm,bhme->bhne", kernel, v) + bias * v) / (kernel.sum(-1) + n * bias)[..., None]


def similarity_targets(x: jax.Array, topk: int) -> jax.Array:
    """S0 (B, H, N, N): +1 at each row's ``topk`` largest x x^T entries, -1 at its ``topk`` smallest
    (written second, so they win where the two sets meet), 0 elsewhere."""
    sim = jnp.einsum("bhnd,bhmd->bhnm", x, x)
    n = sim.shape[-1]
    large = jax.nn.one_hot(jax.lax.top_k(sim, topk)[1], n).sum(-2) > 0
    small = jax.nn.one_hot(jax.lax.top_k(-sim, topk)[1], n).sum(-2) > 0
    return jnp.where(small, -1.0, jnp.where(large, 1.0, 0.0))


def ksh_loss(y: jax.Array, S: jax.Array, nbits: int) -> jax.Array:
    """Official ``compute_loss``: mean over (batch, heads) of ``-y^T S y / (N nbits)``; y (B, H, N)."""
    n = y.shape[-1]
    ys = -jnp.einsum("bhn,bhnl->bhl", y, S) / (n * nbits)
    return jnp.einsum("bhl,bhl->bh", ys, y).mean()


def learn_ksh(x: jax.Array, anchor: jax.Array, A: jax.Array, S0: jax.Array, *, iterations: int = 100,
              learning_rate: float = 5e-4, momentum: float = 0.9) -> tuple[jax.Array, jax.Array]:
    """Official ``train_hashing_weight_woeig`` on tokens x (B, H, N, d) with anchors (H, m, d), the
    current projection A (H, nbits, m) and targets S0 (B, H, N, N). Returns (A, mu (H, m))."""
    nbits = A.shape[1]
    x, anchor, S0 = (jax.lax.stop_gradient(t.astype(jnp.float32)) for t in (x, anchor, S0))
    k = kernel_features(x, anchor)
    mvec = k.mean(axis=-2).mean(axis=0)  # (H, m)
    K = k - mvec[None, :, None, :]

    def relaxed_loss(a, S):
        y = jnp.einsum("bhnm,hm->bhn", K, a)
        return ksh_loss(2.0 / (1.0 + jnp.exp(-y)) - 1.0, S, nbits)

    grad = jax.grad(relaxed_loss)

    def sgd(a, S):
        def step(_, carry):
            a, buf = carry
            g = grad(a, S)
            buf = momentum * buf + g
            return a - learning_rate * (g + momentum * buf), buf

        return jax.lax.fori_loop(0, iterations, step, (a, jnp.zeros_like(a)))[0]

    def sign_codes(a):
        return jnp.where(jnp.einsum("bhnm,hm->bhn", K, a) > 0.0, 1.0, -1.0)

    def bit(r, carry):
        A, S = carry
        a = A[:, r]
        a_new = sgd(a, S)
        y_old, y_new = sign_codes(a), sign_codes(a_new)
        better = ksh_loss(y_new, S, nbits) < ksh_loss(y_old, S, nbits)
        A = A.at[:, r].set(jnp.where(better, a_new, a))
        y = jnp.where(better, y_new, y_old)
        return A, S - y[..., :, None] * y[..., None, :]

    A, _ = jax.lax.fori_loop(0, nbits, bit, (A.astype(jnp.float32), S0 * nbits))
    return A, mvec


class EcoFormerAttention(nn.Module):
    """EcoFormer self-attention on (B, N, C) tokens: ``to_qk``, ``to_v``, KSH codes, linear attention
    with the bias term, ``proj``. Hash state in the ``hashing`` collection (see the module docstring)."""

    num_heads: int
    nbits: int = 16
    num_anchors: int = 25
    topk: int = 10
    iterations: int = 100
    learning_rate: float = 5e-4
    momentum: float = 0.9
    qkv_bias: bool = True
    proj_dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _dense(self, features, axes, name):
        return nn.DenseGeneral(features, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=logical(trunc_normal(0.02), axes),
                               bias_init=logical(nn.initializers.zeros_init(), axes[1:]), name=name)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        b, n, c = x.shape
        h, m = self.num_heads, self.num_anchors
        if c % h:
            raise ValueError(f"EcoFormer attention width {c} is not divisible by num_heads={h}")
        d = c // h
        qk = self._dense((h, d), ("embed", "heads", "kv"), "to_qk")(x)
        v = self._dense((h, d), ("embed", "heads", "kv"), "to_v")(x)
        qk = constrain(qk, ("act_batch", "act_len", "act_heads", None)).transpose(0, 2, 1, 3)
        v = constrain(v, ("act_batch", "act_len", "act_heads", None)).transpose(0, 2, 1, 3)
        qk = qk.astype(jnp.float32)
        qk = qk / jnp.linalg.norm(qk, axis=-1, keepdims=True)
        A = self.variable("hashing", "A", lambda: jax.random.normal(self.make_rng("params"), (h, self.nbits, m)))
        anchor = self.variable("hashing", "anchor", lambda: jnp.zeros((h, m, d), jnp.float32))
        mvec = self.variable("hashing", "mvec", lambda: jnp.zeros((h, m), jnp.float32))
        if not self.is_initializing() and self.is_mutable_collection("hashing"):
            if n < m or n < self.topk:
                raise ValueError(f"EcoFormer hashing needs at least num_anchors={m} and topk={self.topk} tokens per "
                                 f"image; this attention sees {n} (use a larger image or fewer anchors)")
            if not self.has_rng("hashing"):
                raise ValueError("learning the EcoFormer hash needs a 'hashing' RNG: "
                                 "apply(..., mutable=['hashing'], rngs={'hashing': key}) or learn_hashing()")
            fixed = jax.lax.stop_gradient(qk)
            perm = jax.random.permutation(self.make_rng("hashing"), n)[:m]
            anchors = fixed[0][:, perm]  # (H, m, d): tokens of the batch's first image
            S0 = similarity_targets(fixed, self.topk)
            A.value, mvec.value = learn_ksh(fixed, anchors, A.value, S0, iterations=self.iterations,
                                            learning_rate=self.learning_rate, momentum=self.momentum)
            anchor.value = anchors
        codes = ksh_hash(qk, A.value, anchor.value, mvec.value)
        out = linear_attention_bias(codes, codes, v, float(self.nbits + 1))
        out = out.transpose(0, 2, 1, 3).astype(x.dtype if self.dtype is None else self.dtype)
        out = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=logical(trunc_normal(0.02), ("heads", "kv", "embed")),
                              bias_init=logical(nn.initializers.zeros_init(), ("embed",)), name="proj")(out)
        return nn.Dropout(self.proj_dropout)(out, deterministic=not train)


def learn_hashing(model: nn.Module, variables: dict, *inputs: Any, rng: jax.Array, **kwargs: Any) -> dict:
    """``variables`` with the ``hashing`` collection of every EcoFormer attention learned on ``inputs``
    (the official first-batch KSH learning); ``kwargs`` go to ``model.apply``."""
    if "hashing" not in variables:
        raise ValueError("the model has no 'hashing' collection: build it with attn_type='ecoformer'")
    _, state = model.apply(variables, *inputs, mutable=["hashing"], rngs={"hashing": rng}, **kwargs)
    return {**variables, "hashing": state["hashing"]}
