"""PVTv2: Pyramid Vision Transformer v2 (and its EcoFormer variant).

Paper: "PVT v2: Improved Baselines with Pyramid Vision Transformer", Wang et al., Computational
Visual Media 2022, arXiv 2106.13797. Official code: whai362/PVT (Apache-2.0); parameter names and
structure follow timm's ``pvt_v2.py`` (the remap of the official checkpoints), so timm's and the
official state dicts convert one to one (``convert_pvt_v2``; the official ``patch_embed{i}`` /
``block{i}`` / ``norm{i}`` names are remapped first, as timm's ``checkpoint_filter_fn`` does).

Architecture (timm / official):
- Overlapping patch embeddings: conv 7x7 stride 4 (padding 3), then conv 3x3 stride 2 (padding 1)
  before stages 2-4, each followed by LayerNorm (eps 1e-5).
- Block: x + Attn(LN(x)), x + MLP(LN(x)) (LN eps 1e-6). Attention: ``q`` from every token, ``kv``
  from a spatially reduced map: conv sr x sr stride sr + LN (eps 1e-5) when sr > 1 (SRA), or for the
  ``linear`` variant (b2_li) adaptive average pooling to 7x7, conv 1x1, LN, GELU. MLP: fc1 ->
  (ReLU for linear) -> depthwise 3x3 conv -> GELU -> fc2.
- Each stage ends with a LayerNorm; head: mean over the last map, Linear.

EcoFormer (``attn_type="ecoformer"``, arXiv 2209.09004, ziplab/EcoFormer ``pvt/pvt_v2.py``): stages 1-3
use :class:`jaxformers.compress.ecoformer.EcoFormerAttention` instead of SRA (no spatial reduction:
``to_qk``, ``to_v``, ``proj``), stage 4 always full attention (the official ``last_stage`` rule).
``attn_type="msa"`` is the official first fine-tuning step's full attention in stages 1-3 (no
reduction). The hash state is the ``hashing`` collection; learn it with
``jaxformers.compress.ecoformer.learn_hashing``.

Dense-feature contract (``jaxformers.layers.features``): ``forward_features`` returns
``{4: map, 8: map, 16: map, 32: map}`` (NHWC, after each stage's norm); ``pre_logits`` the pooled
last map.

Deviations: none in the math. The official EcoFormer stage 4 uses one fused ``qkv`` projection
where timm's full attention has ``q`` and ``kv``: the same function; the converter splits ``qkv``.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.compress.ecoformer import EcoFormerAttention
from jaxformers.convert.common import StateDict, conv2d, heads_in, heads_out, linear, qkv_fused
from jaxformers.layers import (Conv, Dense, DropPath, LayerNorm, MultiHeadAttention, check_image, gelu,
                               maybe_remat)
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

MAP_AXES = ("act_batch", None, None, "act_embed")
ATTN_TYPES = ("sra", "msa", "ecoformer")


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torch ``AdaptiveAvgPool2d(size)`` on NHWC maps: bin i averages rows floor(i H / s) .. ceil((i+1) H / s)."""

    def matrix(n):
        m = np.zeros((size, n), np.float32)
        for i in range(size):
            lo, hi = (i * n) // size, -((-(i + 1) * n) // size)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return jnp.asarray(m)

    return jnp.einsum("ih,bhwc,jw->bijc", matrix(x.shape[1]), x, matrix(x.shape[2]).astype(x.dtype))


class OverlapPatchEmbed(nn.Module):
    """Conv (kernel k, stride s, padding k // 2) -> LayerNorm (eps 1e-5), NHWC in and out."""

    features: int
    kernel: int
    stride: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding=self.kernel // 2,
                 name="proj", **kw)(x)
        return constrain(LayerNorm(1e-5, name="norm", **kw)(x), MAP_AXES)


class SpatialReductionAttention(nn.Module):
    """PVTv2 attention on an NHWC map: queries from every token, keys/values from the reduced map
    (``sr_ratio`` conv, or ``linear`` pooling to 7x7); through the shared ``MultiHeadAttention``
    (cross-attention names ``q`` / ``kv``)."""

    num_heads: int
    sr_ratio: int = 1
    linear: bool = False
    qkv_bias: bool = True
    attention_dropout: float = 0.0
    proj_dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, dim = x.shape
        kv = x
        if self.linear:
            kv = adaptive_avg_pool(kv, 7)
            kv = Conv(dim, (1, 1), padding="VALID", name="sr", **kw)(kv)
            kv = gelu(LayerNorm(1e-5, name="norm", **kw)(kv))
        elif self.sr_ratio > 1:
            kv = Conv(dim, (self.sr_ratio, self.sr_ratio), strides=self.sr_ratio, padding="VALID", name="sr", **kw)(kv)
            kv = LayerNorm(1e-5, name="norm", **kw)(kv)
        out = MultiHeadAttention(self.num_heads, qkv_bias=self.qkv_bias, attention_dropout=self.attention_dropout,
                                 proj_dropout=self.proj_dropout, attention_impl=self.attention_impl, name="attn",
                                 **kw)(x.reshape(b, height * width, dim), kv.reshape(b, -1, dim), train=train)
        return out.reshape(b, height, width, dim)


class MlpWithDepthwiseConv(nn.Module):
    """fc1 -> (ReLU when ``extra_relu``) -> depthwise 3x3 conv -> GELU -> fc2 on an NHWC map."""

    hidden_features: int
    extra_relu: bool = False
    dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        x = Dense(self.hidden_features, axes=("embed", "mlp"), name="fc1", **kw)(x)
        if self.extra_relu:
            x = nn.relu(x)
        x = Conv(self.hidden_features, (3, 3), padding=1, feature_group_count=self.hidden_features,
                 axes=(None, "mlp"), name="dwconv", **kw)(x)
        x = nn.Dropout(self.dropout)(gelu(x), deterministic=not train)
        x = Dense(dim, axes=("mlp", "embed"), name="fc2", **kw)(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class PVTv2Block(nn.Module):
    """x + Attn(LN(x)), x + MLP(LN(x)) on an NHWC map; ``attn_type`` picks SRA / full / EcoFormer."""

    num_heads: int
    mlp_ratio: float
    sr_ratio: int
    linear: bool = False
    attn_type: str = "sra"
    qkv_bias: bool = True
    drop_path: float = 0.0
    attention_dropout: float = 0.0
    dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    ecoformer: tuple = ()  # (nbits, num_anchors, topk)
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, dim = x.shape
        y = LayerNorm(1e-6, name="norm1", **kw)(x)
        if self.attn_type == "ecoformer":
            nbits, anchors, topk = self.ecoformer
            y = EcoFormerAttention(self.num_heads, nbits=nbits, num_anchors=anchors, topk=topk, qkv_bias=self.qkv_bias,
                                   proj_dropout=self.dropout, name="attn",
                                   **kw)(y.reshape(b, height * width, dim), train=train).reshape(x.shape)
        else:
            sr = self.sr_ratio if self.attn_type == "sra" else 1
            y = SpatialReductionAttention(self.num_heads, sr, self.linear and self.attn_type == "sra", self.qkv_bias,
                                          self.attention_dropout, self.dropout, self.attention_impl, name="attn",
                                          **kw)(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = LayerNorm(1e-6, name="norm2", **kw)(x)
        y = MlpWithDepthwiseConv(int(dim * self.mlp_ratio), self.linear, self.dropout, name="mlp", **kw)(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        return constrain(x, MAP_AXES)


class PyramidVisionTransformerV2(FeatureBackbone):
    """PVTv2 classifier / backbone (timm ``PyramidVisionTransformerV2``)."""

    img_size: int | tuple[int, int] = 224  # the default input (any size runs)
    in_chans: int = 3
    num_classes: int = 1000
    depths: Sequence[int] = (3, 4, 6, 3)
    embed_dims: Sequence[int] = (64, 128, 320, 512)
    num_heads: Sequence[int] = (1, 2, 5, 8)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    mlp_ratios: Sequence[float] = (8.0, 8.0, 4.0, 4.0)
    qkv_bias: bool = True
    linear: bool = False
    attn_type: Literal["sra", "msa", "ecoformer"] = "sra"
    ecoformer_nbits: int = 16
    ecoformer_anchors: int = 25
    ecoformer_topk: int = 10
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _check(self, x):
        n = len(self.depths)
        if not (len(self.embed_dims) == len(self.num_heads) == len(self.sr_ratios) == len(self.mlp_ratios) == n):
            raise ValueError(f"depths, embed_dims, num_heads, sr_ratios and mlp_ratios need one entry per stage; got "
                             f"{self.depths}, {self.embed_dims}, {self.num_heads}, {self.sr_ratios}, {self.mlp_ratios}")
        if self.attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {self.attn_type!r}")
        h, w = check_image(x, in_chans=self.in_chans)
        if h < 32 or w < 32:
            raise ValueError(f"x is {h}x{w}; PVTv2 needs at least 32x32 pixels (stride 32 in four stages)")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes); ``output`` picks the dense-feature contract's other outputs
        (``jaxformers.layers.features``): ``{4, 8, 16, 32: NHWC map}`` after each stage's norm, or
        the pooled last map (``pre_logits``)."""
        check_output(output, "PyramidVisionTransformerV2")
        self._check(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        block_cls = maybe_remat(PVTv2Block, self.remat)
        eco = (self.ecoformer_nbits, self.ecoformer_anchors, self.ecoformer_topk)
        features, n = {}, 0
        last = len(self.depths) - 1
        for s, depth in enumerate(self.depths):
            if s == 0:
                x = OverlapPatchEmbed(self.embed_dims[0], 7, 4, name="patch_embed", **kw)(x)
            else:
                x = OverlapPatchEmbed(self.embed_dims[s], 3, 2, name=f"stages_{s}_downsample", **kw)(x)
            # EcoFormer's last_stage rule: full attention in the last stage.
            attn_type = "msa" if s == last and self.attn_type != "sra" else self.attn_type
            for j in range(depth):
                x = block_cls(self.num_heads[s], self.mlp_ratios[s], self.sr_ratios[s], self.linear, attn_type,
                              self.qkv_bias, float(rates[n]), self.attn_drop_rate, self.proj_drop_rate,
                              self.attention_impl, eco, name=f"stages_{s}_blocks_{j}", **kw)(x, train)
                n += 1
            x = LayerNorm(1e-6, name=f"stages_{s}_norm", **kw)(x)
            features[4 * 2 ** s] = x
        if output == "features":
            return features
        pooled = x.mean(axis=(1, 2))
        logits = pooled
        if self.num_classes:
            logits = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
            logits = Dense(self.num_classes, axes=("embed", "classes"), name="head", dtype=self.dtype,
                           param_dtype=self.param_dtype)(logits)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# Converter: timm / official PVTv2 and official EcoFormer state dicts


def _official_to_timm(key: str) -> str:
    """The official PVT(v2) / EcoFormer names -> timm's (timm ``checkpoint_filter_fn``)."""
    key = key.replace("patch_embed1", "patch_embed")
    for i in (2, 3, 4):
        key = key.replace(f"patch_embed{i}", f"stages.{i - 1}.downsample")
    key = key.replace("dwconv.dwconv", "dwconv")
    key = re.sub(r"^block(\d+)\.(\d+)", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}", key)
    return re.sub(r"^norm(\d+)", lambda m: f"stages.{int(m.group(1)) - 1}.norm", key)


def convert_pvt_v2(sd: StateDict, model: PyramidVisionTransformerV2, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """timm / official PVTv2 (or official EcoFormer PVTv2) state dict -> our flat variables."""
    if "patch_embed1.proj.weight" in sd:  # official names
        sd = StateDict({_official_to_timm(k): sd[k] for k in list(sd.keys())})
    out: dict[str, np.ndarray] = {}

    def conv(t, o):
        out[o + "/kernel"] = conv2d(sd[t + ".weight"])
        out[o + "/bias"] = sd[t + ".bias"]

    def norm(t, o):
        out[o + "/scale"] = sd[t + ".weight"]
        out[o + "/bias"] = sd[t + ".bias"]

    def dense(t, o):
        out[o + "/kernel"] = linear(sd[t + ".weight"])
        out[o + "/bias"] = sd[t + ".bias"]

    conv("patch_embed.proj", "params/patch_embed/proj")
    norm("patch_embed.norm", "params/patch_embed/norm")
    last = len(model.depths) - 1
    for s, depth in enumerate(model.depths):
        h = model.num_heads[s]
        if s > 0:
            conv(f"stages.{s}.downsample.proj", f"params/stages_{s}_downsample/proj")
            norm(f"stages.{s}.downsample.norm", f"params/stages_{s}_downsample/norm")
        norm(f"stages.{s}.norm", f"params/stages_{s}_norm")
        for j in range(depth):
            t, o = f"stages.{s}.blocks.{j}.", f"params/stages_{s}_blocks_{j}/"
            norm(t + "norm1", o + "norm1")
            norm(t + "norm2", o + "norm2")
            dense(t + "mlp.fc1", o + "mlp/fc1")
            dense(t + "mlp.fc2", o + "mlp/fc2")
            conv(t + "mlp.dwconv", o + "mlp/dwconv")
            if model.attn_type == "ecoformer" and s != last:
                for name in ("to_qk", "to_v"):
                    out[o + f"attn/{name}/kernel"] = heads_in(sd[t + f"attn.{name}.weight"], h)
                    if model.qkv_bias:
                        out[o + f"attn/{name}/bias"] = heads_in(sd[t + f"attn.{name}.bias"], h)
                out[o + "attn/proj/kernel"] = heads_out(sd[t + "attn.proj.weight"], h)
                out[o + "attn/proj/bias"] = sd[t + "attn.proj.bias"]
                ksh = t + "attn.fast_attention.ksh."
                out[o.replace("params/", "hashing/") + "attn/A"] = sd[ksh + "A"]
                out[o.replace("params/", "hashing/") + "attn/anchor"] = sd[ksh + "anchor"][0]
                out[o.replace("params/", "hashing/") + "attn/mvec"] = sd[ksh + "mvec"][0, :, 0]
                sd.skip(t + "attn.fast_attention.projection_matrix")
                continue
            a = o + "attn/attn/"
            if t + "attn.qkv.weight" in sd:  # the official EcoFormer / MSA fused projection
                w, bias = qkv_fused(sd[t + "attn.qkv.weight"], h), sd[t + "attn.qkv.bias"] if model.qkv_bias else None
                out[a + "q/kernel"], out[a + "kv/kernel"] = w[:, 0], w[:, 1:]
                if bias is not None:
                    bias = qkv_fused(bias, h)
                    out[a + "q/bias"], out[a + "kv/bias"] = bias[0], bias[1:]
            else:
                out[a + "q/kernel"] = heads_in(sd[t + "attn.q.weight"], h)
                out[a + "kv/kernel"] = qkv_fused(sd[t + "attn.kv.weight"], h, parts=2)
                if model.qkv_bias:
                    out[a + "q/bias"] = heads_in(sd[t + "attn.q.bias"], h)
                    out[a + "kv/bias"] = qkv_fused(sd[t + "attn.kv.bias"], h, parts=2)
            out[a + "proj/kernel"] = heads_out(sd[t + "attn.proj.weight"], h)
            out[a + "proj/bias"] = sd[t + "attn.proj.bias"]
            if t + "attn.sr.weight" in sd:
                conv(t + "attn.sr", o + "attn/sr")
                norm(t + "attn.norm", o + "attn/norm")
    if model.num_classes and "head.weight" in sd:
        dense("head", "params/head")
    sd.skip("head.weight", "head.bias")
    return out


# ---------------------------------------------------------------------------------------------
# Variants (timm names). Params: timm's count (equal to the official code's); FLOPs and top-1:
# the PVTv2 paper's Table 1/2 (ImageNet-1K, 224x224).

VARIANTS = {
    "pvt_v2_b0": dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256)),
    "pvt_v2_b1": dict(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512)),
    "pvt_v2_b2": dict(depths=(3, 4, 6, 3)),
    "pvt_v2_b3": dict(depths=(3, 4, 18, 3)),
    "pvt_v2_b4": dict(depths=(3, 8, 27, 3)),
    "pvt_v2_b5": dict(depths=(3, 6, 40, 3), mlp_ratios=(4.0, 4.0, 4.0, 4.0)),
    "pvt_v2_b2_li": dict(depths=(3, 4, 6, 3), linear=True),
}
TIMM_PARAMS = {"pvt_v2_b0": 3_666_760, "pvt_v2_b1": 14_009_000, "pvt_v2_b2": 25_362_856, "pvt_v2_b3": 45_238_696,
               "pvt_v2_b4": 62_556_072, "pvt_v2_b5": 81_956_008, "pvt_v2_b2_li": 22_553_512}


def _info(name: str, flops_g: float, top1: float) -> ModelInfo:
    return ModelInfo(paper="PVT v2: Improved Baselines with Pyramid Vision Transformer", arxiv="2106.13797",
                     repo="whai362/PVT", input_size=(224, 224, 3), params_m=round(TIMM_PARAMS[name] / 1e6, 2),
                     flops_g=flops_g, top1=top1, converter=convert_pvt_v2)


def _build(name: str, overrides: dict[str, Any]) -> PyramidVisionTransformerV2:
    return PyramidVisionTransformerV2(**{**VARIANTS[name], **overrides})


@register_model(_info("pvt_v2_b0", 0.6, 70.5))
def pvt_v2_b0(**overrides: Any) -> PyramidVisionTransformerV2:
    return _build("pvt_v2_b0", overrides)


@register_model(_info("pvt_v2_b1", 2.1, 78.7))
def pvt_v2_b1(**overrides: Any) -> PyramidVisionTransformerV2:
    return _build("pvt_v2_b1", overrides)


@register_model(_info("pvt_v2_b2", 4.0, 82.0))
def pvt_v2_b2(**overrides: Any) -> PyramidVisionTransformerV2:
    return _build("pvt_v2_b2", overrides)


@register_model(_info("pvt_v2_b3", 6.9, 83.2))
def pvt_v2_b3(**overrides: Any) -> PyramidVisionTransformerV2:
    return _build("pvt_v2_b3", overrides)


@register_model(_info("pvt_v2_b4", 10.1, 83.6))
def pvt_v2_b4(**overrides: Any) -> PyramidVisionTransformerV2:
    return _build("pvt_v2_b4", overrides)


@register_model(_info("pvt_v2_b5", 11.8, 83.8))
def pvt_v2_b5(**overrides: Any) -> PyramidVisionTransformerV2:
    return _build("pvt_v2_b5", overrides)


@register_model(_info("pvt_v2_b2_li", 3.9, 82.1))
def pvt_v2_b2_li(**overrides: Any) -> PyramidVisionTransformerV2:
    return _build("pvt_v2_b2_li", overrides)
