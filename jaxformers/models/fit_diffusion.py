"""FIT as a diffusion denoiser (the official ``FITDenoiser``) and a minimal DDPM objective.

Paper: "FIT: Far-reaching Interleaved Transformers", arXiv 2305.12689; official code (TF2):
google-research/pix2seq ``architectures/transformers.py`` ``FITDenoiser`` / ``ScalarEmbedding``
(used by ``models/image_diffusion_model.py``). Our own implementation following that code.

The noisy image is cut into groups of patches (sub-image windows, as ``images2subimages2tokens``),
embedded by ``Dense`` + LayerNorm. The diffusion time goes through ``ScalarEmbedding`` (sin-cos of
1000·t, standardised, two Dense layers with a SiLU between) and, with ``num_classes > 0``, a class
embedding is projected by ``cond_proj``; before the global layers of every block the latents read
this conditioning sequence by cross-attention (``l2c``). The output is LayerNorm + a linear map of
the data tokens back to pixels, the predicted noise ε.

DDPM (Ho et al. 2020, arXiv 2006.11239): ``ddpm_schedule`` (linear betas), ``ddpm_loss`` (the
ε-prediction MSE of the "simple" objective), ``ddpm_sample_step`` (one ancestral step with the
posterior variance) and ``ddpm_sample`` (the whole chain in one ``lax.scan``). The model sees the
continuous time step/num_steps in [0, 1), as the official continuous-time scheduler does.

Deviations from the official code: latent self-conditioning (``self_cond='latent'``), the
``x_self_attention=False`` switch and the official continuous-time (cosine/sigmoid) schedules and
DDIM sampler are not implemented; the ScalarEmbedding Dense layers use Flax's default init.
The class-conditioning embedding is ours (the official code receives a ready ``cond`` tensor).
"""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers import Dense, LayerNorm, check_image, logical, sincos_2d, to_2tuple, trunc_normal
from jaxformers.layers.attention import AttentionImpl
from jaxformers.models.fit import FITCore
from jaxformers.models.fit_layers import group_grid, groups_to_image, image_to_groups


class ScalarEmbedding(nn.Module):
    """(B,) scalars -> (B, dim*expansion): [sin, cos](scaling·t·ω), standardised, Dense, SiLU, Dense."""

    dim: int
    scaling: float = 1000.0
    expansion: int = 4
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        half = self.dim // 2
        omega = 1.0 / 10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half)
        angles = (t.astype(jnp.float32) * self.scaling)[:, None] * omega[None]
        x = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
        x = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.lecun_normal())
        x = nn.silu(Dense(self.dim * self.expansion, axes=(None, "mlp"), name="dense0", **kw)(x))
        return Dense(self.dim * self.expansion, axes=("mlp", "embed"), name="dense1", **kw)(x)


class FITDenoiser(nn.Module):
    """FIT diffusion denoiser: (noisy image (B, H, W, C), time (B,) in [0, 1], labels) -> ε (B, H, W, C)."""

    img_size: int | tuple[int, int] = 64
    patch_size: int = 4
    in_chans: int = 3
    layers: str = "(2)4(2)4(2)"
    group_size: int | tuple[int, int] = 4
    latents_per_group: int = 8
    x_dim: int = 256
    latent_dim: int = 384
    x_num_heads: int = 4
    latent_num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0
    xattn_mlp: bool = False
    x_pos_encoding: Literal["learned", "sincos"] = "learned"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: bool = False
    attention_impl: AttentionImpl = "xla"
    local_attention_impl: str = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def num_groups(self) -> int:
        gh, gw = group_grid(to_2tuple(self.img_size), self.patch_size, to_2tuple(self.group_size))
        return gh * gw

    @nn.nowrap
    def example_inputs(self, batch_size: int = 1):
        h, w = to_2tuple(self.img_size)
        labels = (jnp.zeros((batch_size,), jnp.int32),) if self.num_classes else ()
        return (jnp.zeros((batch_size, h, w, self.in_chans), jnp.float32), jnp.zeros((batch_size,), jnp.float32)) + labels

    @nn.compact
    def __call__(self, x: jax.Array, time: jax.Array, labels: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hw = check_image(x, in_chans=self.in_chans, img_size=self.img_size, divisible_by=self.patch_size, what="noisy image")
        b = x.shape[0]
        time = jnp.asarray(time, jnp.float32)
        if time.ndim == 0:
            time = jnp.broadcast_to(time, (b,))
        if time.shape != (b,):
            raise ValueError(f"time must be a scalar or (batch,) = ({b},) diffusion times in [0, 1]; got shape {time.shape}")
        if self.num_classes and labels is None:
            raise ValueError(f"the model is class-conditional (num_classes={self.num_classes}); pass labels (batch,)")
        group = to_2tuple(self.group_size)
        t, n = self.num_groups, group[0] * group[1]
        x = image_to_groups(x, self.patch_size, group).reshape(b * t, n, -1)
        x = Dense(self.x_dim, axes=(None, "embed"), name="stem", **kw)(x)
        x = LayerNorm(1e-6, name="stem_ln", **kw)(x)
        if self.x_pos_encoding == "sincos":
            pos = jnp.asarray(sincos_2d(group[0], group[1], self.x_dim))
        else:
            pos = self.param("x_pos_emb", logical(trunc_normal(0.02), (None, "embed")), (n, self.x_dim), self.param_dtype)
        x = x + pos.astype(x.dtype)[None]
        cond = ScalarEmbedding(self.latent_dim // 4, name="time_emb", **kw)(time)[:, None]
        if self.num_classes:
            emb = nn.Embed(self.num_classes, self.latent_dim, embedding_init=logical(trunc_normal(0.02), ("classes", "embed")),
                           name="class_emb", **kw)(labels)
            emb = Dense(self.latent_dim, axes=(None, "embed"), name="cond_proj", **kw)(emb)
            cond = jnp.concatenate([cond, emb[:, None].astype(cond.dtype)], axis=1)
        x, _ = FITCore(self.layers, t, self.latents_per_group, self.x_dim, self.latent_dim, self.x_num_heads,
                       self.latent_num_heads, self.mlp_ratio, cond_cross_attention=True, xattn_mlp=self.xattn_mlp,
                       drop_path=self.drop_path_rate, dropout=self.drop_rate, attention_dropout=self.attn_drop_rate,
                       remat=self.remat, attention_impl=self.attention_impl,
                       local_attention_impl=self.local_attention_impl, name="core", **kw)(x, cond, train=train)
        x = LayerNorm(1e-6, name="x_output_ln", **kw)(x)
        x = Dense(self.patch_size ** 2 * self.in_chans, axes=("embed", None), name="x_output_linear", **kw)(x)
        return groups_to_image(x.reshape(b, t, n, -1), hw, self.patch_size, group)


# ---------------------------------------------------------------------------------------------
# DDPM


def ddpm_schedule(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> dict[str, jax.Array]:
    """Linear-beta DDPM schedule: betas, alphas, cumulative alpha_bars and posterior variances."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    betas = jnp.linspace(beta_start, beta_end, num_steps, dtype=jnp.float32)
    alphas = 1.0 - betas
    alpha_bars = jnp.cumprod(alphas)
    prev = jnp.concatenate([jnp.ones((1,), jnp.float32), alpha_bars[:-1]])
    posterior_var = betas * (1.0 - prev) / (1.0 - alpha_bars)
    return {"betas": betas, "alphas": alphas, "alpha_bars": alpha_bars, "posterior_var": posterior_var}


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def ddpm_loss(model: FITDenoiser, variables: Any, x0: jax.Array, rng: jax.Array, *, schedule: dict[str, jax.Array],
              labels: jax.Array | None = None, train: bool = True) -> jax.Array:
    """E_{t, ε} ||ε - ε_θ(sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε, t)||² (DDPM's simple loss), t uniform."""
    num_steps = schedule["betas"].shape[0]
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    steps = jax.random.randint(k_t, (x0.shape[0],), 0, num_steps)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    ab = _bcast(schedule["alpha_bars"][steps], x0)
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
    pred = model.apply(variables, x_t, steps / num_steps, labels, train=train, rngs={"dropout": k_drop})
    return jnp.mean((pred.astype(jnp.float32) - eps) ** 2)


def ddpm_sample_step(model: FITDenoiser, variables: Any, x_t: jax.Array, step: jax.Array, rng: jax.Array, *,
                     schedule: dict[str, jax.Array], labels: jax.Array | None = None) -> jax.Array:
    """x_{t-1} ~ N(1/sqrt(α_t)·(x_t - β_t/sqrt(1-ᾱ_t)·ε_θ), σ_t²) with the posterior σ_t² (none at t=0)."""
    num_steps = schedule["betas"].shape[0]
    step = jnp.asarray(step, jnp.int32)
    t_in = jnp.full((x_t.shape[0],), step / num_steps, jnp.float32)
    eps = model.apply(variables, x_t, t_in, labels, train=False).astype(jnp.float32)
    beta, alpha, ab = schedule["betas"][step], schedule["alphas"][step], schedule["alpha_bars"][step]
    mean = (x_t - beta / jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(alpha)
    noise = jax.random.normal(rng, x_t.shape, x_t.dtype)
    return mean + jnp.where(step > 0, jnp.sqrt(schedule["posterior_var"][step]), 0.0) * noise


def ddpm_sample(model: FITDenoiser, variables: Any, rng: jax.Array, shape: tuple[int, ...], *,
                schedule: dict[str, jax.Array], labels: jax.Array | None = None) -> jax.Array:
    """Ancestral sampling from pure noise through all steps T-1 .. 0 (one ``lax.scan``)."""
    num_steps = schedule["betas"].shape[0]
    k0, rng = jax.random.split(rng)

    def body(x, step):
        return ddpm_sample_step(model, variables, x, step, jax.random.fold_in(rng, step), schedule=schedule,
                                labels=labels), None

    x, _ = jax.lax.scan(body, jax.random.normal(k0, shape, jnp.float32), jnp.arange(num_steps - 1, -1, -1))
    return x
