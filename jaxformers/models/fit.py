"""FIT: Far-reaching Interleaved Transformers, as an image encoder (classification).

Paper: "FIT: Far-reaching Interleaved Transformers", Ting Chen and Lala Li, arXiv 2305.12689 (2023).
Official code (TF2, Apache-2.0): google-research/pix2seq, ``architectures/transformers.py``
(classes ``FIT``, ``FITDenoiser``, ``FITAR``). This is our own Flax Linen implementation that
follows that code; no official code is copied.

The data tokens are split into T groups of N tokens; M learned latents per group (a table of
T*M latents, tiled over the batch). The ``layers`` string drives the stack (``"(2)4(2)"``:
2 local layers, 4 global, 2 local; see ``parse_layer_spec``). Per block: local layers on each
group (block-diagonal attention through ``jaxformers.kernels.local_global_attention``), then, when
the block has global layers, the latents read their own group (``l2x`` cross-attention), the global
layers run over all T*M latents (shared attention seam), and, except after the last block, each
group reads its own latents back (``x2l``). LayerNorms close both streams. Attention cost: N² per
group locally, (T*M)² globally; with N ~ L^(1/3) this is the paper's O(L^(4/3)).

The three uses of the paper live in three files: this encoder (``FITEncoder``, registered
``fit_s`` / ``fit_b`` / ``fit_l``), the autoregressive decoder with a cached decoding loop
(``fit_ar.py``: ``FITAR``, ``generate``) and the diffusion denoiser with a DDPM objective
(``fit_diffusion.py``: ``FITDenoiser``, ``ddpm_loss``, ``ddpm_sample_step``). The shared stack is
``FITCore`` below; the blocks are in ``fit_layers.py``.

Sharding: data tokens are kept as (B*T, N, C) and constrained with ``act_batch`` on the merged
batch x group axis, so the groups of one huge image spread over the data/fsdp mesh axes (local
layers need no communication); global layers see only the (B, T*M, D) latents. ``remat=True``
rematerialises every local/global layer and cross-attention in the backward pass.

Local attention: every local layer calls ``local_global_attention(group_size=N)`` on the flattened
(B, T*N) rows; ``local_attention_impl='pallas'`` (or ``'auto'`` on GPU/TPU) runs the block-sparse
kernel, ``'xla'`` its reference, which computes such group-only masks group by group (N² per
group, no O((T*N)²) dense mask).

Sizes: the paper's configuration tables were not available to us and the
repo ships no FIT configs, so S/B/L are *our* definitions, at ViT-S/B/L widths (384/768/1024, heads
6/12/16, MLP ratio 4) with equal data and latent widths; S and B use ``"(2)4(2)4(2)"`` (6 local +
8 global layers), L uses ``"(4)6(4)6(4)"`` (12 local + 12 global). At 224² with 16-px patches the
14×14 patch grid is cut into 2×2 groups of 7×7 patches with 16 latents each; for high resolution
override ``img_size`` (the group size stays 7×7 patches, the number of groups grows). No parameter
counts are given by the paper (``params_m=None``).

Deliberate deviations from the official code:
- The encoder's stem is the official ``Dense(x_dim)`` + LayerNorm on flattened patches (grouped
  as sub-image windows, as in ``images2subimages2tokens``); the classification head (mean pool of
  the final latents when the spec ends with global layers, else of the data tokens, then a zero-
  initialised linear layer) is ours: the official FIT has no classifier.
- The optional ``y`` prefix input of the official ``FIT.call`` is not implemented.
- Drop-path rates are constant over layers (as official); LayerNorm eps 1e-6 everywhere.
- Local attention has no attention dropout (the kernel has none; the official default is 0).
- ``forward_features`` (the project's dense-feature contract) gives one map, ``{patch_size: the
  normed data tokens on the patch grid}``; the latents are not spatial and are not returned.
"""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers import Dense, LayerNorm, check_image, logical, maybe_remat, sincos_2d, to_2tuple, trunc_normal
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.models.fit_layers import (GROUP_ACT, LATENT_ACT, FITCrossAttention, FITLayer, group_grid,
                                          groups_to_image, image_to_groups, parse_layer_spec)
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain


class FITCore(nn.Module):
    """The interleaved local/global stack on embedded groups x (B*T, N, C).

    ``autoregressive``: causal local layers, chunk-causal global layers and x2l reading the
    *previous* group's latents (zeros for group 0), as the official ``FITAR``. ``cond_cross_attention``:
    before the global layers the latents read a conditioning sequence (``l2c``, the official
    ``FITDenoiser``). ``__call__`` returns (x, latents) before the output norms; ``decode_token``
    and ``decode_latents`` are the cached autoregressive steps used by ``fit_ar.generate``.
    """

    layers: str
    num_groups: int
    latents_per_group: int
    x_dim: int
    latent_dim: int
    x_num_heads: int
    latent_num_heads: int
    mlp_ratio: float = 4.0
    autoregressive: bool = False
    cond_cross_attention: bool = False
    xattn_mlp: bool = False
    xattn_context_norm: bool = True
    drop_path: float = 0.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    remat: bool = False
    attention_impl: AttentionImpl = "xla"
    local_attention_impl: str = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        self.spec = parse_layer_spec(self.layers)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t, m = self.num_groups, self.latents_per_group
        layer = maybe_remat(FITLayer, self.remat)
        cross = nn.remat(FITCrossAttention, static_argnums=(3,)) if self.remat else FITCrossAttention
        common = dict(mlp_ratio=self.mlp_ratio, drop_path=self.drop_path, dropout=self.dropout,
                      attention_impl=self.attention_impl, local_attention_impl=self.local_attention_impl, **kw)
        x_heads = min(self.x_num_heads, self.latent_num_heads)
        x_att = min(self.x_dim, self.latent_dim)
        x_net, l_net, l2x, x2l, l2c = [], [], {}, {}, {}
        for i, (n_local, n_global) in enumerate(self.spec):
            x_net.append([layer(self.x_num_heads, kind="local", num_groups=t, causal=self.autoregressive, **common)
                          for _ in range(n_local)])
            l_net.append([layer(self.latent_num_heads, kind="global", attention_dropout=self.attention_dropout,
                                chunk_size=m if self.autoregressive else None, **common) for _ in range(n_global)])
            if n_global:
                l2x[str(i)] = cross(x_heads, x_att, use_mlp=self.xattn_mlp, mlp_ratio=self.mlp_ratio,
                                    context_norm=self.xattn_context_norm, attention_impl=self.attention_impl, **kw)
                if self.cond_cross_attention:
                    l2c[str(i)] = cross(self.latent_num_heads, self.latent_dim, context_norm=self.xattn_context_norm,
                                        attention_impl=self.attention_impl, **kw)
                if i < len(self.spec) - 1:
                    x2l[str(i)] = cross(x_heads, x_att, use_mlp=self.xattn_mlp, mlp_ratio=self.mlp_ratio,
                                        context_norm=self.xattn_context_norm, attention_impl=self.attention_impl, **kw)
        self.x_network, self.l_network = x_net, l_net
        self.l2x_cross_attn, self.x2l_cross_attn, self.l2c_cross_attn = l2x, x2l, l2c
        self.latent_pos_emb = self.param("latent_pos_emb", logical(trunc_normal(0.02), (None, "embed")),
                                         (t * m, self.latent_dim), self.param_dtype)

    def initial_latents(self, batch: int) -> jax.Array:
        """The learned latent table tiled over the batch: (B*T, M, D)."""
        lat = jnp.asarray(self.latent_pos_emb, self.dtype or jnp.float32)
        lat = lat.reshape(1, self.num_groups, self.latents_per_group, self.latent_dim)
        lat = jnp.broadcast_to(lat, (batch,) + lat.shape[1:])
        return lat.reshape(batch * self.num_groups, self.latents_per_group, self.latent_dim)

    def _shift_latents(self, latents: jax.Array) -> jax.Array:
        """(B*T, M, D): group t gets group t-1's latents, group 0 zeros (no look-ahead in AR)."""
        t = self.num_groups
        lat = latents.reshape((-1, t) + latents.shape[1:])
        lat = jnp.concatenate([jnp.zeros_like(lat[:, :1]), lat[:, :-1]], axis=1)
        return lat.reshape(latents.shape)

    def __call__(self, x: jax.Array, cond: jax.Array | None = None, *, train: bool = False,
                 latents: jax.Array | None = None):
        """x (B*T, N, C) -> (x (B*T, N, C), latents (B*T, M, D)); ``cond`` (B, S, D) for l2c."""
        t, m = self.num_groups, self.latents_per_group
        if x.shape[0] % t:
            raise ValueError(f"the leading axis of x ({x.shape[0]}) must be batch*num_groups (num_groups={t})")
        b = x.shape[0] // t
        if latents is None:
            latents = self.initial_latents(b)
        if self.cond_cross_attention and cond is None:
            raise ValueError("cond_cross_attention=True needs a conditioning sequence cond of shape (B, S, latent_dim)")
        x = constrain(x, GROUP_ACT)
        for i, (_, n_global) in enumerate(self.spec):
            for layer in self.x_network[i]:
                x = layer(x, train)
            if not n_global:
                continue
            latents = self.l2x_cross_attn[str(i)](latents, x, train)
            lat = constrain(latents.reshape(b, t * m, -1), LATENT_ACT)
            if self.cond_cross_attention:
                lat = self.l2c_cross_attn[str(i)](lat, cond, train)
            for layer in self.l_network[i]:
                lat = layer(lat, train)
            latents = lat.reshape(b * t, m, -1)
            if str(i) in self.x2l_cross_attn:
                context = self._shift_latents(latents) if self.autoregressive else latents
                x = constrain(self.x2l_cross_attn[str(i)](x, context, train), GROUP_ACT)
        return x, latents

    # ---- cached autoregressive decoding (used by fit_ar.generate) ------------------------------

    def decode_token(self, x: jax.Array, position: jax.Array, cache: dict, context: dict):
        """One token of the current group: x (B, 1, C) at within-group ``position``.

        ``cache[f"{i}_{j}"]`` is local layer j of block i's ``KVCache`` of this group (B, N, H, D);
        the token is written at ``position`` (whatever the cache's index: a new group overwrites the
        last one from position 0, and later positions are never visible). ``context[str(i)]`` is the
        previous group's latents after block i (B, M, D). Returns the final x (before the output
        norm), the updated cache and ``taps[str(i)]``: x after block i's local layers (what the
        latents of this group will read once the group is complete)."""
        cache, taps = dict(cache), {}
        for i, (_, n_global) in enumerate(self.spec):
            for j, layer in enumerate(self.x_network[i]):
                key = f"{i}_{j}"
                x, cache[key] = layer(x, False, cache[key]._replace(index=jnp.asarray(position, jnp.int32)))
            taps[str(i)] = x
            if str(i) in self.x2l_cross_attn:
                x = self.x2l_cross_attn[str(i)](x, context[str(i)], False)
        return x, cache, taps

    def decode_latents(self, group: jax.Array, taps: dict, cache: dict):
        """Latents of a completed group ``group``: read its taps (B, N, C) per block, run the global
        layers against the ``KVCache`` of earlier groups' keys/values (B, T*M, H, D; this group's are
        written at ``group * M``). Returns the latents after each block that feeds an x2l
        (``str(i)`` -> (B, M, D)) and the updated cache."""
        m = self.latents_per_group
        b = next(iter(taps.values())).shape[0]
        table = jnp.asarray(self.latent_pos_emb, self.dtype or jnp.float32).reshape(self.num_groups, m, -1)
        lat = jnp.broadcast_to(jax.lax.dynamic_index_in_dim(table, group, keepdims=False)[None], (b, m, table.shape[-1]))
        cache, out = dict(cache), {}
        for i in range(len(self.spec)):
            if str(i) not in self.x2l_cross_attn:  # the last block's latents never reach the tokens
                continue
            lat = self.l2x_cross_attn[str(i)](lat, taps[str(i)], False)
            for j, layer in enumerate(self.l_network[i]):
                key = f"{i}_{j}"
                lat, cache[key] = layer(lat, False, cache[key]._replace(index=jnp.asarray(group * m, jnp.int32)))
            out[str(i)] = lat
        return out, cache


class FITEncoder(FeatureBackbone):
    """FIT image encoder with a classification head: NHWC image -> groups of patches -> FITCore."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    layers: str = "(2)4(2)4(2)"
    group_size: int | tuple[int, int] = 7
    latents_per_group: int = 16
    x_dim: int = 384
    latent_dim: int = 384
    x_num_heads: int = 6
    latent_num_heads: int = 6
    mlp_ratio: float = 4.0
    x_pos_encoding: Literal["learned", "sincos"] = "learned"
    pool: Literal["auto", "latents", "tokens"] = "auto"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: bool = False
    attention_impl: AttentionImpl = "xla"
    local_attention_impl: str = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def group_grid(self) -> tuple[int, int]:
        return group_grid(to_2tuple(self.img_size), self.patch_size, to_2tuple(self.group_size))

    @property
    def num_groups(self) -> int:
        gh, gw = self.group_grid
        return gh * gw

    @property
    def tokens_per_group(self) -> int:
        gh, gw = to_2tuple(self.group_size)
        return gh * gw

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes); ``output`` selects the dense-feature contract's other outputs
        (``jaxformers.layers.features``): ``forward_features`` gives ``{patch_size: (B, H/p, W/p, C)}``,
        the data tokens after their output norm put back on the patch grid (the latents are not
        spatial and are not returned), ``pre_logits`` the pooled (B, D)."""
        check_output(output, "FITEncoder")
        if self.pool not in ("auto", "latents", "tokens"):
            raise ValueError(f"pool must be 'auto', 'latents' or 'tokens'; got {self.pool!r}")
        spec = parse_layer_spec(self.layers)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        group = to_2tuple(self.group_size)
        h, w = check_image(x, in_chans=self.in_chans, img_size=self.img_size, divisible_by=self.patch_size)
        t, n = self.num_groups, self.tokens_per_group
        b = x.shape[0]
        x = image_to_groups(x, self.patch_size, group).reshape(b * t, n, -1)
        x = Dense(self.x_dim, axes=(None, "embed"), name="stem", **kw)(x.astype(self.dtype or x.dtype))
        x = LayerNorm(1e-6, name="stem_ln", **kw)(x)
        if self.x_pos_encoding == "sincos":
            pos = jnp.asarray(sincos_2d(group[0], group[1], self.x_dim))
        else:
            pos = self.param("x_pos_emb", logical(trunc_normal(0.02), (None, "embed")), (n, self.x_dim), self.param_dtype)
        x = x + pos.astype(x.dtype)[None]
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        x, latents = FITCore(self.layers, t, self.latents_per_group, self.x_dim, self.latent_dim, self.x_num_heads,
                             self.latent_num_heads, self.mlp_ratio, drop_path=self.drop_path_rate,
                             dropout=self.drop_rate, attention_dropout=self.attn_drop_rate, remat=self.remat,
                             attention_impl=self.attention_impl, local_attention_impl=self.local_attention_impl,
                             name="core", **kw)(x, train=train)
        x = LayerNorm(1e-6, name="x_output_ln", **kw)(x).reshape(b, t, n, -1)
        latents = LayerNorm(1e-6, name="l_output_ln", **kw)(latents).reshape(b, t, self.latents_per_group, -1)
        grid = (h // self.patch_size, w // self.patch_size)
        features = {int(self.patch_size): groups_to_image(x, grid, 1, group)}
        if output == "features":
            return features
        pool = self.pool if self.pool != "auto" else ("latents" if spec[-1][1] > 0 else "tokens")
        pooled = latents.mean(axis=(1, 2)) if pool == "latents" else x.mean(axis=(1, 2))
        logits = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if self.num_classes:
            logits = Dense(self.num_classes, axes=("embed", "classes"), kernel_init=nn.initializers.zeros_init(),
                           name="head", **kw)(logits)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# Variants: our S/B/L (the paper gives no size table we could retrieve; see the module docstring).

VARIANTS = {
    "fit_s": dict(layers="(2)4(2)4(2)", x_dim=384, latent_dim=384, x_num_heads=6, latent_num_heads=6),
    "fit_b": dict(layers="(2)4(2)4(2)", x_dim=768, latent_dim=768, x_num_heads=12, latent_num_heads=12),
    "fit_l": dict(layers="(4)6(4)6(4)", x_dim=1024, latent_dim=1024, x_num_heads=16, latent_num_heads=16),
}

_INFO = ModelInfo(paper="FIT: Far-reaching Interleaved Transformers", arxiv="2305.12689", repo="google-research/pix2seq",
                  input_size=(224, 224, 3), params_m=None, flops_g=None, top1=None)


@register_model(_INFO)
def fit_s(**overrides: Any) -> FITEncoder:
    return FITEncoder(**{**VARIANTS["fit_s"], **overrides})


@register_model(_INFO)
def fit_b(**overrides: Any) -> FITEncoder:
    return FITEncoder(**{**VARIANTS["fit_b"], **overrides})


@register_model(_INFO)
def fit_l(**overrides: Any) -> FITEncoder:
    return FITEncoder(**{**VARIANTS["fit_l"], **overrides})
