"""Twins: Twins-SVT (locally-grouped + global sub-sampled attention) and Twins-PCPVT, and EcoFormer on them.

Paper: "Twins: Revisiting the Design of Spatial Attention in Vision Transformers", Chu, Tian, Wang,
Zhang, Ren, Wei, Xia, Shen, NeurIPS 2021, arXiv 2104.13840. Official code: Meituan-AutoML/Twins
(``gvt.py``, Apache-2.0). Parameter names and structure follow timm's ``twins.py`` (which loads the
official checkpoints unchanged), so timm's and the official state dicts convert one to one
(``convert_twins``). Written from the official code's and timm's math; nothing copied.

Architecture (timm / official):
- Four stages. Each starts with a non-overlapping patch embedding: conv ``patch_size`` x
  ``patch_size`` stride ``patch_size`` (4, then 2), LayerNorm (eps 1e-5).
- Block: x + Attn(LN(x)), x + MLP(LN(x)) (LN eps 1e-6, MLP fc1 -> GELU -> fc2). Twins-SVT alternates
  two attentions (``wss`` given): even blocks **LSA**, locally-grouped self-attention inside
  non-overlapping ``ws`` x ``ws`` windows (fused ``qkv``; a map that ``ws`` does not divide is
  zero-padded at the bottom/right, the padded tokens take part as keys as in timm, and the output
  is cropped), odd blocks **GSA**, global sub-sampled attention: queries from every token, keys and
  values from the map reduced by a ``sr`` x ``sr`` stride-``sr`` conv + LayerNorm (eps 1e-5) when
  ``sr > 1`` (PVT's spatial-reduction attention: the same module as ``pvt_v2``'s
  :class:`~jaxformers.models.pvt_v2.SpatialReductionAttention`). Twins-PCPVT (``wss=None``) uses
  GSA in every block.
- **PEG** (the conditional position encoding generator of CPVT, arXiv 2102.10882): after the first
  block of every stage, x + depthwise 3x3 conv(x) on the map (timm ``PosConv``, ``pos_block``).
- Head: LayerNorm (eps 1e-6) on the last stage, mean over tokens, Linear.
- All attention goes through the shared :class:`jaxformers.layers.MultiHeadAttention` (LSA on the
  windows as a batch of sequences, GSA as its cross-attention form ``q`` / ``kv``).

Dense-feature contract (``jaxformers.layers.features``): ``forward_features`` returns
``{4: map, 8: map, 16: map, 32: map}`` (NHWC, the raw output of each stage, as timm's
``features_only``); ``pre_logits`` the final norm of the last map, pooled.

EcoFormer on Twins (``attn_type="ecoformer"``; "EcoFormer: Energy-Saving Attention with Linear
Complexity", arXiv 2209.09004, official code ziplab/EcoFormer ``twins/gvt.py``: ``EcoBlock``,
``alt_gvt_small_ecoformer``): every block of a stage whose ``sr_ratio`` is > 1 (stages 1-3) uses
:class:`jaxformers.compress.ecoformer.EcoFormerAttention` (``to_qk``, ``to_v``, KSH codes, linear
attention with the bias term, ``proj``) and every block of the stage with ``sr_ratio == 1`` (stage 4)
full softmax attention with a fused ``qkv``. Exactly as the official ``EcoBlock``, the choice ignores
the window size: in stages 1-3 the LSA positions become EcoFormer as well as the GSA ones (so the
EcoFormer model has no window attention and no spatial-reduction conv). ``attn_type="msa"`` is the
official first fine-tuning step (``alt_gvt_small_sra_to_msa``, ``GroupBlockv2``): LSA kept, every
GSA replaced by full attention with a fused ``qkv``. The hash state is the ``hashing`` collection;
learn it with :func:`jaxformers.compress.ecoformer.learn_hashing` on a first batch.

Deviations: none in the math. timm's LSA pads with zeros and lets the padded tokens be attended to
(no mask); kept for parity (the official Twins code requires maps the window divides).
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.compress.ecoformer import EcoFormerAttention
from jaxformers.convert.common import StateDict, conv2d, heads_in, heads_out, linear, qkv_fused
from jaxformers.layers import Conv, Dense, DropPath, LayerNorm, MultiHeadAttention, check_image, maybe_remat
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.layers.mlp import Mlp
from jaxformers.models.pvt_v2 import SpatialReductionAttention
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

MAP_AXES = ("act_batch", None, None, "act_embed")
ATTN_TYPES = ("default", "msa", "ecoformer")
BlockKind = Literal["local", "global", "full", "ecoformer"]


def block_kind(attn_type: str, wss: Sequence[int] | None, sr_ratios: Sequence[int], stage: int, index: int) -> BlockKind:
    """The attention of block ``index`` of ``stage``: ``local`` (LSA), ``global`` (GSA), ``full``
    (softmax attention over every token, fused qkv) or ``ecoformer`` (see the module docstring)."""
    windowed = wss is not None and index % 2 == 0
    if attn_type == "ecoformer":  # official EcoBlock: sr_ratio == 1 -> full attention, else EcoFormer
        return "full" if sr_ratios[stage] == 1 else "ecoformer"
    if windowed:
        return "local"
    return "full" if attn_type == "msa" else "global"


class LocallyGroupedAttention(nn.Module):
    """LSA: self-attention inside non-overlapping ``window`` x ``window`` groups of an NHWC map
    (zero padding at the bottom/right where the window does not divide the map, as timm)."""

    num_heads: int
    window: int
    attention_dropout: float = 0.0
    proj_dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        b, h, w, c = x.shape
        ws = self.window
        ph, pw = (-h) % ws, (-w) % ws
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        gh, gw = (h + ph) // ws, (w + pw) // ws
        groups = x.reshape(b, gh, ws, gw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * gh * gw, ws * ws, c)
        out = MultiHeadAttention(self.num_heads, attention_dropout=self.attention_dropout,
                                 proj_dropout=self.proj_dropout, attention_impl=self.attention_impl, name="attn",
                                 dtype=self.dtype, param_dtype=self.param_dtype)(groups, train=train)
        out = out.reshape(b, gh, gw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * ws, gw * ws, c)
        return out[:, :h, :w]


class PosConv(nn.Module):
    """PEG: x + depthwise 3x3 conv(x) on an NHWC map (timm ``PosConv`` with stride 1)."""

    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        return x + Conv(c, (3, 3), padding=1, feature_group_count=c, axes=(None, "conv_out"), name="proj",
                        dtype=self.dtype, param_dtype=self.param_dtype)(x)


class TwinsBlock(nn.Module):
    """x + Attn(LN(x)), x + MLP(LN(x)) on an NHWC map; ``kind`` from :func:`block_kind`."""

    num_heads: int
    mlp_ratio: float
    kind: str
    sr_ratio: int = 1
    window: int = 7
    drop_path: float = 0.0
    attention_dropout: float = 0.0
    dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    ecoformer: tuple = (16, 25, 10)  # (nbits, num_anchors, topk)
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, dim = x.shape
        y = LayerNorm(1e-6, name="norm1", **kw)(x)
        if self.kind == "local":
            y = LocallyGroupedAttention(self.num_heads, self.window, self.attention_dropout, self.dropout,
                                        self.attention_impl, name="attn", **kw)(y, train=train)
        elif self.kind == "global":
            y = SpatialReductionAttention(self.num_heads, self.sr_ratio, attention_dropout=self.attention_dropout,
                                          proj_dropout=self.dropout, attention_impl=self.attention_impl, name="attn",
                                          **kw)(y, train=train)
        elif self.kind == "full":
            y = MultiHeadAttention(self.num_heads, attention_dropout=self.attention_dropout, proj_dropout=self.dropout,
                                   attention_impl=self.attention_impl, name="attn",
                                   **kw)(y.reshape(b, height * width, dim), train=train).reshape(x.shape)
        else:
            nbits, anchors, topk = self.ecoformer
            y = EcoFormerAttention(self.num_heads, nbits=nbits, num_anchors=anchors, topk=topk,
                                   proj_dropout=self.dropout, name="attn",
                                   **kw)(y.reshape(b, height * width, dim), train=train).reshape(x.shape)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = LayerNorm(1e-6, name="norm2", **kw)(x)
        y = Mlp(int(dim * self.mlp_ratio), dropout=self.dropout, name="mlp", **kw)(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        return constrain(x, MAP_AXES)


class Twins(FeatureBackbone):
    """Twins-SVT (``wss`` given) / Twins-PCPVT (``wss=None``) classifier and backbone (timm ``Twins``)."""

    img_size: int | tuple[int, int] = 224  # the default input (any size of at least 32x32 runs)
    in_chans: int = 3
    num_classes: int = 1000
    patch_size: int = 4
    embed_dims: Sequence[int] = (64, 128, 256, 512)
    num_heads: Sequence[int] = (2, 4, 8, 16)
    mlp_ratios: Sequence[float] = (4.0, 4.0, 4.0, 4.0)
    depths: Sequence[int] = (2, 2, 10, 4)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    wss: Sequence[int] | None = (7, 7, 7, 7)
    attn_type: Literal["default", "msa", "ecoformer"] = "default"
    ecoformer_nbits: int = 16
    ecoformer_anchors: int = 25
    ecoformer_topk: int = 10
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: AttentionImpl = "xla"
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _check(self, x):
        n = len(self.depths)
        lists = (self.embed_dims, self.num_heads, self.sr_ratios, self.mlp_ratios) + ((self.wss,) if self.wss else ())
        if any(len(v) != n for v in lists):
            raise ValueError(f"depths, embed_dims, num_heads, sr_ratios, mlp_ratios (and wss) need one entry per stage; "
                             f"got {self.depths}, {self.embed_dims}, {self.num_heads}, {self.sr_ratios}, "
                             f"{self.mlp_ratios}, {self.wss}")
        if self.attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {self.attn_type!r}")
        for d, h in zip(self.embed_dims, self.num_heads):
            if d % h:
                raise ValueError(f"embed_dims {self.embed_dims} must be divisible by num_heads {self.num_heads}")
        h, w = check_image(x, in_chans=self.in_chans)
        stride = self.patch_size * 2 ** (n - 1)
        if h < stride or w < stride:
            raise ValueError(f"x is {h}x{w}; Twins needs at least {stride}x{stride} pixels (stride {stride} in {n} stages)")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes); ``output`` picks the dense-feature contract's other outputs
        (``jaxformers.layers.features``): ``{4, 8, 16, 32: NHWC map}`` (raw stage outputs), or the
        pooled, normed last map (``pre_logits``)."""
        check_output(output, "Twins")
        self._check(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        block_cls = maybe_remat(TwinsBlock, self.remat)
        eco = (self.ecoformer_nbits, self.ecoformer_anchors, self.ecoformer_topk)
        features, n, stride = {}, 0, 1
        for s, depth in enumerate(self.depths):
            p = self.patch_size if s == 0 else 2
            stride *= p
            x = Conv(self.embed_dims[s], (p, p), strides=p, padding="VALID", name=f"patch_embeds_{s}_proj", **kw)(x)
            x = constrain(LayerNorm(1e-5, name=f"patch_embeds_{s}_norm", **kw)(x), MAP_AXES)
            x = nn.Dropout(self.pos_drop_rate)(x, deterministic=not train)
            for j in range(depth):
                kind = block_kind(self.attn_type, self.wss, self.sr_ratios, s, j)
                x = block_cls(self.num_heads[s], self.mlp_ratios[s], kind, self.sr_ratios[s],
                              self.wss[s] if self.wss else 1, float(rates[n]), self.attn_drop_rate,
                              self.proj_drop_rate, self.attention_impl, eco, name=f"blocks_{s}_{j}", **kw)(x, train)
                if j == 0:
                    x = PosConv(name=f"pos_block_{s}", **kw)(x)  # PEG after the first block
                n += 1
            features[stride] = x
        if output == "features":
            return features
        pooled = LayerNorm(1e-6, name="norm", **kw)(x).mean(axis=(1, 2))
        logits = pooled
        if self.num_classes:
            logits = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
            logits = Dense(self.num_classes, axes=("embed", "classes"), name="head", **kw)(logits)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# Converter: timm / official Twins, official EcoFormer-Twins (and its MSA step) state dicts


def convert_twins(sd: StateDict, model: Twins, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """timm / official Twins (or official EcoFormer ``alt_gvt_*`` / ``pcpvt_*_v0``) state dict -> our
    flat variables; ``model``'s ``attn_type`` says which attention each block holds."""
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

    def fused(t, o, h):
        out[o + "qkv/kernel"] = qkv_fused(sd[t + "qkv.weight"], h)
        out[o + "qkv/bias"] = qkv_fused(sd[t + "qkv.bias"], h)
        out[o + "proj/kernel"] = heads_out(sd[t + "proj.weight"], h)
        out[o + "proj/bias"] = sd[t + "proj.bias"]

    for s, depth in enumerate(model.depths):
        h = model.num_heads[s]
        conv(f"patch_embeds.{s}.proj", f"params/patch_embeds_{s}_proj")
        norm(f"patch_embeds.{s}.norm", f"params/patch_embeds_{s}_norm")
        conv(f"pos_block.{s}.proj.0", f"params/pos_block_{s}/proj")
        for j in range(depth):
            t, o = f"blocks.{s}.{j}.", f"params/blocks_{s}_{j}/"
            norm(t + "norm1", o + "norm1")
            norm(t + "norm2", o + "norm2")
            dense(t + "mlp.fc1", o + "mlp/fc1")
            dense(t + "mlp.fc2", o + "mlp/fc2")
            kind = block_kind(model.attn_type, model.wss, model.sr_ratios, s, j)
            a = t + "attn."
            if kind == "local":
                fused(a, o + "attn/attn/", h)
            elif kind == "full":
                fused(a, o + "attn/", h)
            elif kind == "global":
                out[o + "attn/attn/q/kernel"] = heads_in(sd[a + "q.weight"], h)
                out[o + "attn/attn/q/bias"] = heads_in(sd[a + "q.bias"], h)
                out[o + "attn/attn/kv/kernel"] = qkv_fused(sd[a + "kv.weight"], h, parts=2)
                out[o + "attn/attn/kv/bias"] = qkv_fused(sd[a + "kv.bias"], h, parts=2)
                out[o + "attn/attn/proj/kernel"] = heads_out(sd[a + "proj.weight"], h)
                out[o + "attn/attn/proj/bias"] = sd[a + "proj.bias"]
                if model.sr_ratios[s] > 1:
                    conv(a + "sr", o + "attn/sr")
                    norm(a + "norm", o + "attn/norm")
            else:
                for name in ("to_qk", "to_v"):
                    out[o + f"attn/{name}/kernel"] = heads_in(sd[a + f"{name}.weight"], h)
                    out[o + f"attn/{name}/bias"] = heads_in(sd[a + f"{name}.bias"], h)
                out[o + "attn/proj/kernel"] = heads_out(sd[a + "proj.weight"], h)
                out[o + "attn/proj/bias"] = sd[a + "proj.bias"]
                ksh, hs = a + "fast_attention.ksh.", f"hashing/blocks_{s}_{j}/attn/"
                out[hs + "A"] = sd[ksh + "A"]
                out[hs + "anchor"] = sd[ksh + "anchor"][0]
                out[hs + "mvec"] = sd[ksh + "mvec"][0, :, 0]
                sd.skip(a + "fast_attention.projection_matrix")
    norm("norm", "params/norm")
    if model.num_classes and "head.weight" in sd:
        dense("head", "params/head")
    sd.skip("head.weight", "head.bias")
    return out


# ---------------------------------------------------------------------------------------------
# Variants (timm names). Params: timm's count (equal to the official code's); FLOPs (G) and top-1:
# the Twins paper's Tables 1 and 3 (ImageNet-1K, 224x224).

VARIANTS = {
    "twins_pcpvt_small": dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                              depths=(3, 4, 6, 3), wss=None),
    "twins_pcpvt_base": dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                             depths=(3, 4, 18, 3), wss=None),
    "twins_pcpvt_large": dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                              depths=(3, 8, 27, 3), wss=None),
    "twins_svt_small": dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 2, 10, 4)),
    "twins_svt_base": dict(embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 18, 2)),
    "twins_svt_large": dict(embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 2, 18, 2)),
}
TIMM_PARAMS = {"twins_pcpvt_small": 24_106_216, "twins_pcpvt_base": 43_828_456, "twins_pcpvt_large": 60_989_672,
               "twins_svt_small": 24_060_776, "twins_svt_base": 56_070_952, "twins_svt_large": 99_271_400}
PAPER = {"twins_pcpvt_small": (3.8, 81.2), "twins_pcpvt_base": (6.7, 82.7), "twins_pcpvt_large": (9.8, 83.1),
         "twins_svt_small": (2.9, 81.7), "twins_svt_base": (8.6, 83.2), "twins_svt_large": (15.1, 83.7)}


def _info(name: str) -> ModelInfo:
    flops, top1 = PAPER[name]
    return ModelInfo(paper="Twins: Revisiting the Design of Spatial Attention in Vision Transformers",
                     arxiv="2104.13840", repo="Meituan-AutoML/Twins", input_size=(224, 224, 3),
                     params_m=round(TIMM_PARAMS[name] / 1e6, 2), flops_g=flops, top1=top1, converter=convert_twins)


def _build(name: str, overrides: dict[str, Any]) -> Twins:
    return Twins(**{**VARIANTS[name], **overrides})


@register_model(_info("twins_pcpvt_small"))
def twins_pcpvt_small(**overrides: Any) -> Twins:
    return _build("twins_pcpvt_small", overrides)


@register_model(_info("twins_pcpvt_base"))
def twins_pcpvt_base(**overrides: Any) -> Twins:
    return _build("twins_pcpvt_base", overrides)


@register_model(_info("twins_pcpvt_large"))
def twins_pcpvt_large(**overrides: Any) -> Twins:
    return _build("twins_pcpvt_large", overrides)


@register_model(_info("twins_svt_small"))
def twins_svt_small(**overrides: Any) -> Twins:
    return _build("twins_svt_small", overrides)


@register_model(_info("twins_svt_base"))
def twins_svt_base(**overrides: Any) -> Twins:
    return _build("twins_svt_base", overrides)


@register_model(_info("twins_svt_large"))
def twins_svt_large(**overrides: Any) -> Twins:
    return _build("twins_svt_large", overrides)
