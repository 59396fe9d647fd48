"""BiFormer: vision transformer with bi-level routing attention (BRA).

Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention", Zhu et al., CVPR 2023,
arXiv 2303.08810. Official code: rayleizhu/BiFormer (``models/biformer.py``, ``models/_common.py``
and ``ops/bra_legacy.py``, the BRA its classification model imports; MIT license). Parameter names
and layouts are chosen so the released ``.pth`` checkpoints convert one to one (see
``convert_official_biformer``). Parameter counts equal the official code's exactly: 13,142,760 (T),
25,536,232 (S), 56,804,968 (B); the paper rounds them to 13.1M / 25.5M / 56.8M.

Architecture (as in the official code):
- Stem: conv 3x3 s2 (C/2) -> BN -> GELU -> conv 3x3 s2 (C) -> BN. Between stages: conv 3x3 s2 -> BN.
- Block (NHWC): x += DWConv3x3(x) (conv position embedding), then pre-norm x += Attn(LN(x)),
  x += MLP(LN(x)) with MLP ratio 3 (Linear -> GELU -> Linear), LayerNorm eps 1e-6, no layer scale.
- Attention in stages with ``topk > 0``: bi-level routing attention over ``n_win`` x ``n_win``
  regions (``jaxformers.kernels.bi_level_routing_attention``): one ``qkv`` projection with bias,
  region-mean routing (no gradient) to the ``topk`` regions, token attention inside them, plus LePE
  (5x5 depthwise conv on V over the whole map), then the ``wo`` projection. Heads = dim / 32.
- Stages with ``topk == -2`` (the last stage): the official ``AttentionLePE``, full attention.
- Head: BatchNorm -> global average pool -> Linear.

Checkpoints: ``jaxformers.load_pretrained("biformer_tiny", "biformer_tiny_in1k.pth")`` (the released
files hold the state dict under ``"model"``); BN running statistics go to ``batch_stats``.

Official quirks kept for checkpoint parity:
- BRA scales logits by ``qk_dim ** -0.5`` (the full width, not the head dim): ``upstream_compatible``.
- ``AttentionLePE`` (last stage) is built with its defaults: 8 heads whatever the width
  (``full_attention_heads``), no qkv bias, scale head_dim**-0.5, and its LePE conv runs on the
  attention's *input* (the normed x), not on V.

Deviations (deliberate):
- q/k width equals the block width (``qk_dim == dim``, true for every released variant), so q, k
  and v come from one ``qkv`` projection of shape (dim, 3, heads, head_dim).
- Routing ties are broken towards the lower region index (``jax.lax.top_k``); ``torch.topk`` leaves
  ties unspecified (they do not occur with real-valued features).
- ``drop_rate`` is a dropout before the classifier (the official argument exists but is unused; default 0).
- ``topk`` values other than positive counts and -2 (the official -1 plain-attention and 0 conv
  ablations) are not implemented; they raise a ValueError.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, conv2d, heads_out, linear, qkv_fused
from jaxformers.kernels import bi_level_routing_attention
from jaxformers.layers import (BatchNorm, Conv, ConvStem, Dense, DropPath, LayerNorm, LePE, Mlp, check_image,
                               dot_product_attention, gelu, logical, maybe_remat, trunc_normal)
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

MAP_AXES = ("act_batch", None, None, "act_embed")
FULL_ATTENTION = -2  # the official topk value that selects AttentionLePE


def _kernel_impl(attention_impl: str) -> str:
    """The bi-level routing kernel knows 'xla' | 'pallas' | 'auto'; 'cudnn' means the XLA path there."""
    return attention_impl if attention_impl in ("pallas", "auto") else "xla"


class BiLevelRoutingAttentionLayer(nn.Module):
    """qkv projection -> BRA (or full attention when ``topk == -2``) + LePE -> output projection.

    Params ``qkv`` (dim, 3, heads, head_dim), ``lepe`` (5x5 depthwise) and ``proj`` (heads, head_dim, dim).
    """

    num_heads: int
    n_win: int = 7
    topk: int = 4
    lepe_kernel: int = 5
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, dim = x.shape
        h = self.num_heads
        if dim % h:
            raise ValueError(f"BiFormer attention width {dim} is not divisible by num_heads={h}")
        full = self.topk == FULL_ATTENTION
        qkv = nn.DenseGeneral((3, h, dim // h), use_bias=not full, name="qkv",
                              kernel_init=logical(trunc_normal(0.02), ("embed", None, "heads", "kv")),
                              bias_init=logical(nn.initializers.zeros_init(), (None, "heads", "kv")), **kw)(x)
        qkv = constrain(qkv, ("act_batch", None, None, None, "act_heads", None))
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        lepe = LePE(self.lepe_kernel, name="lepe", **kw)
        if full:
            tokens = lambda t: t.reshape(b, height * width, h, -1)  # noqa: E731
            out = dot_product_attention(tokens(q), tokens(k), tokens(v), implementation=self.attention_impl)
            out = out.reshape(b, height, width, dim) + lepe(x)  # official AttentionLePE: LePE of the input
        else:
            maps = lambda t: t.reshape(b, height, width, dim)  # noqa: E731
            out = bi_level_routing_attention(maps(q), maps(k), maps(v), num_heads=h, regions_per_side=self.n_win,
                                             topk=self.topk, upstream_compatible=True,
                                             implementation=_kernel_impl(self.attention_impl))
            out = out + lepe(maps(v))
        out = out.reshape(b, height, width, h, dim // h)
        return nn.DenseGeneral(dim, axis=(-2, -1), name="proj",
                               kernel_init=logical(trunc_normal(0.02), ("heads", "kv", "embed")),
                               bias_init=logical(nn.initializers.zeros_init(), ("embed",)), **kw)(out)


class BiFormerBlock(nn.Module):
    """x += DWConv3x3(x); x += DropPath(Attn(LN(x))); x += DropPath(MLP(LN(x))) on NHWC maps."""

    num_heads: int
    n_win: int = 7
    topk: int = 4
    mlp_ratio: float = 3.0
    drop_path: float = 0.0
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        x = x + Conv(dim, (3, 3), padding=1, feature_group_count=dim, axes=(None, "embed"), name="pos_embed", **kw)(x)
        y = LayerNorm(1e-6, name="norm1", **kw)(x)
        y = BiLevelRoutingAttentionLayer(self.num_heads, self.n_win, self.topk, attention_impl=self.attention_impl,
                                         name="attn", **kw)(y)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = LayerNorm(1e-6, name="norm2", **kw)(x)
        y = Mlp(int(dim * self.mlp_ratio), name="mlp", **kw)(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        return constrain(x, MAP_AXES)


def stage_resolutions(height: int, width: int) -> list[tuple[int, int]]:
    """Resolutions of the four stages: each 3x3 stride-2 padding-1 conv maps n to ceil(n / 2)."""
    out = []
    for i in range(4):
        for _ in range(2 if i == 0 else 1):
            height, width = -(-height // 2), -(-width // 2)
        out.append((height, width))
    return out


class BiFormer(FeatureBackbone):
    """BiFormer: conv stem, four stages of BRA blocks with conv+BN downsampling, BN-pool-linear head.

    BatchNorm statistics live in ``batch_stats``: train with ``mutable=["batch_stats"]``.
    """

    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: Sequence[int] = (64, 128, 256, 512)
    depth: Sequence[int] = (2, 2, 8, 2)
    head_dim: int = 32
    n_win: int = 7
    topks: Sequence[int] = (1, 4, 16, FULL_ATTENTION)
    full_attention_heads: int = 8
    mlp_ratio: float = 3.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _check(self, x: jax.Array) -> None:
        if not (len(self.embed_dim) == len(self.depth) == len(self.topks) == 4):
            raise ValueError(f"embed_dim, depth and topks need 4 entries (one per stage); got {self.embed_dim}, "
                             f"{self.depth}, {self.topks}")
        for t in self.topks:
            if t != FULL_ATTENTION and t < 1:
                raise ValueError(f"topks entries must be positive region counts or {FULL_ATTENTION} (full "
                                 f"attention with LePE); got {tuple(self.topks)}")
        h, w = check_image(x, in_chans=self.in_chans)
        for s, ((rh, rw), t) in enumerate(zip(stage_resolutions(h, w), self.topks)):
            if t != FULL_ATTENTION and (rh % self.n_win or rw % self.n_win):
                raise ValueError(
                    f"x is {h}x{w}, which makes stage {s + 1} {rh}x{rw}; bi-level routing attention needs the "
                    f"stage resolution divisible by n_win={self.n_win} regions per side (the official code "
                    f"asserts this too). Use an image side that is a multiple of {4 * 2 ** s * self.n_win} "
                    f"for this stage (e.g. {32 * self.n_win} for every stage), or pad the image")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes); ``output`` selects the dense-feature contract's other outputs
        (``jaxformers.layers.features``): ``forward_features`` gives the four stage outputs
        ``{4: ..., 8: ..., 16: ..., 32: ...}`` (NHWC), ``pre_logits`` the pooled (B, D) after the BN norm."""
        check_output(output, "BiFormer")
        self._check(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        e = tuple(self.embed_dim)
        x = ConvStem((e[0] // 2, e[0]), (3, 3), (2, 2), (1, 1), activation=gelu, batch_norm=True, name="stem",
                     **kw)(x, train=train)
        block_cls = maybe_remat(BiFormerBlock, self.remat)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depth))
        features, n = {}, 0
        for s in range(4):
            if s > 0:
                x = ConvStem((e[s],), (3,), (2,), (1,), batch_norm=True, name=f"downsample{s}", **kw)(x, train=train)
            x = constrain(x, MAP_AXES)
            full = self.topks[s] == FULL_ATTENTION
            heads = self.full_attention_heads if full else e[s] // self.head_dim
            for j in range(self.depth[s]):
                x = block_cls(heads, self.n_win, self.topks[s], self.mlp_ratio, float(rates[n]), self.attention_impl,
                              name=f"stage{s + 1}_{j}", **kw)(x, train)
                n += 1
            features[4 * 2 ** s] = x
        if output == "features":
            return features
        x = BatchNorm(train=train, axis_name="embed", name="norm", **kw)(x)
        pooled = x.mean(axis=(1, 2))
        logits = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if self.num_classes:
            logits = Dense(self.num_classes, axes=("embed", "classes"), name="head", **kw)(logits)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# Official checkpoint converter (rayleizhu/BiFormer ``BiFormer`` state dict, ``checkpoint["model"]``)


def _batch_norm(sd: StateDict, t: str, o: str) -> dict[str, np.ndarray]:
    sd.skip(t + "num_batches_tracked")
    return {f"params/{o}/scale": sd[t + "weight"], f"params/{o}/bias": sd[t + "bias"],
            f"batch_stats/{o}/mean": sd[t + "running_mean"], f"batch_stats/{o}/var": sd[t + "running_var"]}


def _conv(sd: StateDict, t: str, o: str) -> dict[str, np.ndarray]:
    return {f"params/{o}/kernel": conv2d(sd[t + "weight"]), f"params/{o}/bias": sd[t + "bias"]}


def convert_official_biformer(sd: StateDict, model: BiFormer, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Official BiFormer state dict (``downsample_layers.*``, ``stages.{s}.{j}.*``, ``norm``, ``head``)
    -> our flat ``params/...`` and ``batch_stats/...`` variables."""
    out = {}
    out.update(_conv(sd, "downsample_layers.0.0.", "stem/conv0"))
    out.update(_batch_norm(sd, "downsample_layers.0.1.", "stem/bn0"))
    out.update(_conv(sd, "downsample_layers.0.3.", "stem/conv1"))
    out.update(_batch_norm(sd, "downsample_layers.0.4.", "stem/bn1"))
    for s in range(1, 4):
        out.update(_conv(sd, f"downsample_layers.{s}.0.", f"downsample{s}/conv0"))
        out.update(_batch_norm(sd, f"downsample_layers.{s}.1.", f"downsample{s}/bn0"))
    out.update(_batch_norm(sd, "norm.", "norm"))
    if model.num_classes and "head.weight" in sd:
        out["params/head/kernel"] = linear(sd["head.weight"])
        out["params/head/bias"] = sd["head.bias"]
    sd.skip("head.weight", "head.bias")
    for s in range(4):
        full = model.topks[s] == FULL_ATTENTION
        h = model.full_attention_heads if full else model.embed_dim[s] // model.head_dim
        for j in range(model.depth[s]):
            t, o = f"stages.{s}.{j}.", f"stage{s + 1}_{j}/"
            out.update(_conv(sd, t + "pos_embed.", o + "pos_embed"))
            out.update(_conv(sd, t + "attn.lepe.", o + "attn/lepe/conv"))
            p = "params/" + o
            out.update({
                p + "norm1/scale": sd[t + "norm1.weight"], p + "norm1/bias": sd[t + "norm1.bias"],
                p + "norm2/scale": sd[t + "norm2.weight"], p + "norm2/bias": sd[t + "norm2.bias"],
                p + "mlp/fc1/kernel": linear(sd[t + "mlp.0.weight"]), p + "mlp/fc1/bias": sd[t + "mlp.0.bias"],
                p + "mlp/fc2/kernel": linear(sd[t + "mlp.3.weight"]), p + "mlp/fc2/bias": sd[t + "mlp.3.bias"],
            })
            if full:  # AttentionLePE: qkv (no bias), proj
                out[p + "attn/qkv/kernel"] = qkv_fused(sd[t + "attn.qkv.weight"], h)
                out[p + "attn/proj/kernel"] = heads_out(sd[t + "attn.proj.weight"], h)
                out[p + "attn/proj/bias"] = sd[t + "attn.proj.bias"]
            else:  # BiLevelRoutingAttention: qkv.qkv = [q | k | v] rows, wo
                out[p + "attn/qkv/kernel"] = qkv_fused(sd[t + "attn.qkv.qkv.weight"], h)
                out[p + "attn/qkv/bias"] = qkv_fused(sd[t + "attn.qkv.qkv.bias"], h)
                out[p + "attn/proj/kernel"] = heads_out(sd[t + "attn.wo.weight"], h)
                out[p + "attn/proj/bias"] = sd[t + "attn.wo.bias"]
    return out


# ---------------------------------------------------------------------------------------------
# Variants (official names). Params: exact count of the official code.

VARIANTS = {
    "biformer_tiny": dict(embed_dim=(64, 128, 256, 512), depth=(2, 2, 8, 2)),
    "biformer_small": dict(embed_dim=(64, 128, 256, 512), depth=(4, 4, 18, 4)),
    "biformer_base": dict(embed_dim=(96, 192, 384, 768), depth=(4, 4, 18, 4)),
}

# Exact parameter counts of the official implementation (1000 classes; BN statistics excluded).
OFFICIAL_PARAMS = {"biformer_tiny": 13_142_760, "biformer_small": 25_536_232, "biformer_base": 56_804_968}


def _info(params_m: float, flops_g: float, top1: float) -> ModelInfo:
    return ModelInfo(paper="BiFormer: Vision Transformer with Bi-Level Routing Attention", arxiv="2303.08810",
                     repo="rayleizhu/BiFormer", input_size=(224, 224, 3), params_m=params_m, flops_g=flops_g,
                     top1=top1, converter=convert_official_biformer)


@register_model(_info(13.1, 2.2, 81.4))
def biformer_tiny(**overrides: Any) -> BiFormer:
    """BiFormer-T: depths (2, 2, 8, 2), widths (64, 128, 256, 512)."""
    return BiFormer(**{**VARIANTS["biformer_tiny"], **overrides})


@register_model(_info(25.5, 4.5, 83.8))
def biformer_small(**overrides: Any) -> BiFormer:
    """BiFormer-S: depths (4, 4, 18, 4), widths (64, 128, 256, 512)."""
    return BiFormer(**{**VARIANTS["biformer_small"], **overrides})


@register_model(_info(56.8, 9.8, 84.3))
def biformer_base(**overrides: Any) -> BiFormer:
    """BiFormer-B: depths (4, 4, 18, 4), widths (96, 192, 384, 768)."""
    return BiFormer(**{**VARIANTS["biformer_base"], **overrides})
