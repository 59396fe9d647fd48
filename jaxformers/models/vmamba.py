"""VMamba: a hierarchical vision backbone of 2-D selective scans (SS2D), the original "vanilla" design.

Paper: "VMamba: Visual State Space Model", Liu et al., NeurIPS 2024, arXiv 2401.10166. Official code:
MzeroMiko/VMamba (``classification/models/vmamba.py``: ``SS2D`` with ``forward_type="v0"``, ``VSSBlock``,
``VSSM``); the variant built here is the paper's first version, "Vanilla-VMamba-T" in the repository's
tables (22.9M parameters with the 1000-class head).

SS2D ("2-D selective scan"): x -> in_proj (D -> 2E) -> (x, z); x -> depthwise 3x3 conv -> SiLU; the
feature map is read along four paths (**cross-scan**: rows left-to-right, columns top-to-bottom, and
both reversed), each by its own selective scan (per-direction ``x_proj_weight`` (4, E, R + 2N),
``dt_projs_weight`` (4, R, E), ``dt_projs_bias``, ``A_logs`` (4, E, N), ``Ds``); the four outputs are
mapped back to their pixels and summed (**cross-merge**), LayerNorm-ed, gated by SiLU(z) and projected
back to D. The scans are ``jaxformers.layers.ssm.selective_scan`` (vmapped over the directions).

Backbone: 4x4 patch embedding + LayerNorm, four stages of ``VSSBlock`` x + DropPath(SS2D(LN(x)))
(no MLP in the vanilla design) with Swin-style patch merging (2x2 concat -> LN -> Linear 4C -> 2C)
between stages, then LayerNorm, global average pooling and a linear head. ``forward_features``
returns ``{4, 8, 16, 32}`` -> NHWC stage outputs (before merging) for dense heads.

Initialisation as the official code: Linear layers truncated normal (0.02) with zero bias, LayerNorms
1/0, convolutions PyTorch's default, the stacked SSM parameters as Mamba (x projections PyTorch's
Linear default, Δ projections uniform ±R^-½ with the inverse-softplus bias, A = -(1..N), D = 1).
Deviations: the later VMamba versions (v2/v3: no z branch, MLPs, d_state 1, ``Linear2d`` layouts) are
not built. Odd feature maps are zero-padded before patch merging as the official code does.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, conv2d, linear
from jaxformers.layers import Conv, Dense, DropPath, LayerNorm, logical
from jaxformers.layers.checks import check_image
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.layers.ssm import ScanMethod, a_log_init, dt_bias_init, selective_scan, torch_linear_init
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

DIRECTIONS = 4


def cross_scan(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 4, H·W, C): row-major, column-major, and both reversed."""
    b, h, w, c = x.shape
    rows = x.reshape(b, h * w, c)
    cols = x.transpose(0, 2, 1, 3).reshape(b, h * w, c)
    return jnp.stack([rows, cols, rows[:, ::-1], cols[:, ::-1]], axis=1)


def cross_merge(ys: jax.Array, h: int, w: int) -> jax.Array:
    """(B, 4, H·W, C) -> (B, H, W, C): each path's outputs back on their pixels, summed (the adjoint of
    ``cross_scan``)."""
    b, _, _, c = ys.shape
    rows = ys[:, 0] + ys[:, 2, ::-1]
    cols = ys[:, 1] + ys[:, 3, ::-1]
    return rows.reshape(b, h, w, c) + cols.reshape(b, w, h, c).transpose(0, 2, 1, 3)


def _uniform(scale: float):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -scale, scale)


class SS2D(nn.Module):
    """VMamba's 2-D selective-scan mixer on an NHWC map (v0 / vanilla design)."""

    state_size: int = 16
    ssm_ratio: float = 2.0
    dt_rank: int | None = None  # None: ceil(D / 16)
    conv_kernel: int = 3
    scan: ScanMethod = "associative"
    chunk_size: int = 256
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, d = x.shape
        e, n = int(self.ssm_ratio * d), self.state_size
        r = self.dt_rank or math.ceil(d / 16)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        xz = nn.DenseGeneral((2, e), use_bias=False, kernel_init=logical(nn.initializers.truncated_normal(0.02),
                                                                          ("embed", None, "mlp")),
                             name="in_proj", **kw)(x)
        x, z = xz[..., 0, :], jax.nn.silu(xz[..., 1, :])
        bound = 1.0 / self.conv_kernel  # PyTorch default for a depthwise k x k conv: 1/sqrt(k*k)
        x = nn.Conv(e, (self.conv_kernel,) * 2, padding="SAME", feature_group_count=e,
                    kernel_init=logical(_uniform(bound), (None, None, None, "mlp")),
                    bias_init=logical(_uniform(bound), ("mlp",)), name="conv2d", **kw)(x)
        x = jax.nn.silu(x)
        xs = cross_scan(x)  # (b, 4, L, e)
        pdt = self.param_dtype
        x_proj = self.param("x_proj_weight", logical(torch_linear_init(-2, -1), (None, "mlp", None)),
                            (DIRECTIONS, e, r + 2 * n), pdt)
        dt_w = self.param("dt_projs_weight", logical(_uniform(r ** -0.5), (None, None, "mlp")), (DIRECTIONS, r, e), pdt)
        dt_b = self.param("dt_projs_bias", logical(dt_bias_init(), (None, "mlp")), (DIRECTIONS, e), pdt)
        a_logs = self.param("A_logs", logical(a_log_init, (None, "mlp", None)), (DIRECTIONS, e, n), pdt)
        ds = self.param("Ds", logical(nn.initializers.ones_init(), (None, "mlp")), (DIRECTIONS, e), pdt)
        dtype = self.dtype or x.dtype
        x_dbl = jnp.einsum("bkle,kec->bklc", xs, x_proj.astype(dtype))
        dts, bs, cs = jnp.split(x_dbl, [r, r + n], axis=-1)
        dts = jnp.einsum("bklr,kre->bkle", dts, dt_w.astype(dtype))
        scan = jax.vmap(lambda x, dt, a, bb, cc, dd, bias: selective_scan(
            x, dt, a, bb, cc, dd, dt_bias=bias, method=self.scan, chunk_size=self.chunk_size)[0],
            in_axes=(1, 1, 0, 1, 1, 0, 0), out_axes=1)
        ys = scan(xs, dts, -jnp.exp(a_logs.astype(jnp.float32)), bs, cs, ds, dt_b)
        y = cross_merge(ys, h, w)
        y = LayerNorm(1e-5, axis_name="mlp", name="out_norm", **kw)(y) * z
        return Dense(d, axes=("mlp", "embed"), use_bias=False, name="out_proj", **kw)(y)


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x))) (``VSSBlock`` with ``mlp_ratio=0``)."""

    drop_path: float = 0.0
    state_size: int = 16
    ssm_ratio: float = 2.0
    scan: ScanMethod = "associative"
    chunk_size: int = 256
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(1e-5, name="norm", **kw)(x)
        h = SS2D(self.state_size, self.ssm_ratio, scan=self.scan, chunk_size=self.chunk_size, name="op", **kw)(h)
        x = x + DropPath(self.drop_path)(h, train=train)
        return constrain(x, ("act_batch", None, None, "act_embed"))


class PatchMerging2D(nn.Module):
    """2x2 neighbourhoods concatenated (order (0,0), (1,0), (0,1), (1,1)) -> LN(4C) -> Linear(4C, 2C)."""

    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(1e-5, name="norm", **kw)(x)
        return Dense(2 * c, use_bias=False, axes=("embed", "embed"), name="reduction", **kw)(x)


class VMamba(FeatureBackbone):
    """VSSM backbone + classifier; ``forward_features`` -> {4, 8, 16, 32}: NHWC stage outputs (before
    merging); ``pre_logits`` -> normed, average-pooled (B, C)."""

    num_classes: int = 1000
    in_chans: int = 3
    patch_size: int = 4
    depth: Sequence[int] = (2, 2, 9, 2)  # blocks per stage
    dims: int | Sequence[int] = 96
    state_size: int = 16
    ssm_ratio: float = 2.0
    drop_path_rate: float = 0.2
    scan: ScanMethod = "associative"
    chunk_size: int = 256
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def stage_dims(self) -> tuple[int, ...]:
        if isinstance(self.dims, int):
            return tuple(self.dims * 2 ** i for i in range(len(self.depth)))
        return tuple(self.dims)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        check_output(output, "VMamba")
        check_image(x, in_chans=self.in_chans, divisible_by=self.patch_size)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dims = self.stage_dims
        p = self.patch_size
        bound = 1.0 / math.sqrt(self.in_chans * p * p)
        x = Conv(dims[0], (p, p), strides=p, padding="VALID", axes=(None, "embed"),
                 kernel_init=_uniform(bound), name="patch_embed_proj", **kw)(x)
        x = LayerNorm(1e-5, name="patch_embed_norm", **kw)(x)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depth))
        block = nn.remat(VSSBlock, static_argnums=(2,)) if self.remat else VSSBlock
        features, k = {}, 0
        for i, n_blocks in enumerate(self.depth):
            for j in range(n_blocks):
                x = block(float(rates[k]), self.state_size, self.ssm_ratio, self.scan, self.chunk_size,
                          name=f"layers_{i}_blocks_{j}", **kw)(x, train)
                k += 1
            features[p * 2 ** i] = x
            if i < len(self.depth) - 1:
                x = PatchMerging2D(name=f"layers_{i}_downsample", **kw)(x)
        if output == "features":
            return features
        x = LayerNorm(1e-5, name="norm", **kw)(x)
        pooled = x.mean(axis=(1, 2))
        logits = pooled
        if self.num_classes:
            logits = Dense(self.num_classes, axes=("embed", "classes"), name="head", **kw)(pooled).astype(jnp.float32)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# Official checkpoint converter (MzeroMiko/VMamba ``VSSM``; the pre-release names ``patch_embed.proj``,
# ``ln_1``, ``self_attention``, top-level ``norm`` / ``head`` are read too, as the official loader does).

_OLD_NAMES = ((".norm.", ".ln_1."), (".op.", ".self_attention."))  # (current, pre-release)


def convert_vmamba(sd: StateDict, model: VMamba, expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """hustvl-style ``VSSM`` (v0) state dict -> our flat ``params/...`` variables."""
    del expected

    def get(key: str) -> np.ndarray:
        if key in sd:
            return sd[key]
        old = key.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        old = old.replace("classifier.norm.", "norm.").replace("classifier.head.", "head.")
        for current, before in _OLD_NAMES:
            old = old.replace(current, before)
        return sd[old] if old in sd else sd[key]  # the second raises naming the current key

    out = {"params/patch_embed_proj/kernel": conv2d(get("patch_embed.0.weight")),
           "params/patch_embed_proj/bias": get("patch_embed.0.bias"),
           "params/patch_embed_norm/scale": get("patch_embed.2.weight"),
           "params/patch_embed_norm/bias": get("patch_embed.2.bias"),
           "params/norm/scale": get("classifier.norm.weight"), "params/norm/bias": get("classifier.norm.bias")}
    if model.num_classes:
        out["params/head/kernel"] = linear(get("classifier.head.weight"))
        out["params/head/bias"] = get("classifier.head.bias")
    e_of = [int(model.ssm_ratio * c) for c in model.stage_dims]
    for i, n_blocks in enumerate(model.depth):
        for j in range(n_blocks):
            o, t = f"params/layers_{i}_blocks_{j}/", f"layers.{i}.blocks.{j}."
            e = e_of[i]
            out.update({o + "norm/scale": get(t + "norm.weight"), o + "norm/bias": get(t + "norm.bias")})
            w = get(t + "op.in_proj.weight")  # (2E, D)
            out[o + "op/in_proj/kernel"] = np.ascontiguousarray(w.reshape(2, e, -1).transpose(2, 0, 1))
            cw = get(t + "op.conv2d.weight")  # (E, 1, k, k)
            out[o + "op/conv2d/kernel"] = np.ascontiguousarray(cw.transpose(2, 3, 1, 0))
            out[o + "op/conv2d/bias"] = get(t + "op.conv2d.bias")
            out[o + "op/x_proj_weight"] = np.ascontiguousarray(get(t + "op.x_proj_weight").transpose(0, 2, 1))
            out[o + "op/dt_projs_weight"] = np.ascontiguousarray(get(t + "op.dt_projs_weight").transpose(0, 2, 1))
            out[o + "op/dt_projs_bias"] = get(t + "op.dt_projs_bias")
            out[o + "op/A_logs"] = get(t + "op.A_logs").reshape(DIRECTIONS, e, -1)
            out[o + "op/Ds"] = get(t + "op.Ds").reshape(DIRECTIONS, e)
            out[o + "op/out_norm/scale"] = get(t + "op.out_norm.weight")
            out[o + "op/out_norm/bias"] = get(t + "op.out_norm.bias")
            out[o + "op/out_proj/kernel"] = linear(get(t + "op.out_proj.weight"))
        if i < len(model.depth) - 1:
            o, t = f"params/layers_{i}_downsample/", f"layers.{i}.downsample."
            out.update({o + "norm/scale": get(t + "norm.weight"), o + "norm/bias": get(t + "norm.bias"),
                        o + "reduction/kernel": linear(get(t + "reduction.weight"))})
    return out


# ---------------------------------------------------------------------------------------------
# Variants: the paper's first version ("Vanilla-VMamba" in the repository's tables, ImageNet-1k top-1 at
# 224). Parameters with the 1000-class head; T equals the count of the official code (22,893,448), S and
# B are the same code at the paper's Table 3 sizes (the repository lists 44M and 76M).

VARIANTS = {
    "vmamba_tiny": dict(depth=(2, 2, 9, 2), dims=96, drop_path_rate=0.2),
    "vmamba_small": dict(depth=(2, 2, 27, 2), dims=96, drop_path_rate=0.3),
    "vmamba_base": dict(depth=(2, 2, 27, 2), dims=128, drop_path_rate=0.6),
}


def _info(params_m: float, top1: float) -> ModelInfo:
    return ModelInfo(paper="VMamba: Visual State Space Model (Vanilla-VMamba)", arxiv="2401.10166",
                     repo="MzeroMiko/VMamba", input_size=(224, 224, 3), params_m=params_m, top1=top1,
                     converter=convert_vmamba)


@register_model(_info(22.893448, 82.2))
def vmamba_tiny(**overrides: Any) -> VMamba:
    """Vanilla-VMamba-T: dims 96/192/384/768, depths 2/2/9/2, d_state 16, SSM ratio 2, no MLP."""
    return VMamba(**{**VARIANTS["vmamba_tiny"], **overrides})


@register_model(_info(44.417416, 83.5))
def vmamba_small(**overrides: Any) -> VMamba:
    """Vanilla-VMamba-S: dims 96/192/384/768, depths 2/2/27/2."""
    return VMamba(**{**VARIANTS["vmamba_small"], **overrides})


@register_model(_info(76.254056, 83.7))
def vmamba_base(**overrides: Any) -> VMamba:
    """Vanilla-VMamba-B: dims 128/256/512/1024, depths 2/2/27/2."""
    return VMamba(**{**VARIANTS["vmamba_base"], **overrides})
