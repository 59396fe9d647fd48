"""Vision Transformer (ViT) and its DeiT-sized variants.

Papers: "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
Dosovitskiy et al., ICLR 2021, arXiv 2010.11929; "Training data-efficient image transformers &
distillation through attention" (DeiT), Touvron et al., ICML 2021, arXiv 2012.12877 (the Tiny and
Small sizes). Official code: google-research/vision_transformer (JAX), facebookresearch/deit.
Parameter names follow timm's ``vision_transformer.py`` so its checkpoints convert one to one.

DeiT names (``deit_{tiny,small,base}_patch16_224``) and the distilled variants
(``deit_*_distilled_patch16_224``, timm's ``VisionTransformerDistilled``): ``distilled=True`` adds
the distillation token after [CLS] and the ``head_dist`` classifier; the logits are the mean of
both heads (timm and DeiT at inference); both heads' logits are sown as ``intermediates``
(``logits_cls``, ``logits_dist``; ``apply(..., mutable=["intermediates"])``) for distillation training.

Efficiency hooks (``jaxformers.compress``): ``token_reduction`` (ToMe, pruning, Token Transforming,
IA-RED^2: tokens are reduced between a block's attention and MLP, or before a block; merged tokens
carry sizes, used for proportional attention and a size-weighted average pool) and
``block_overrides`` (per-block heads, head width, MLP width, attention scale, attention function,
removed sublayers: pruned and searched subnets such as OFB's and AxFormer's). The final tokens and,
after a reduction, their sizes are sown as ``intermediates`` (``tokens``, ``token_sizes``). After a
token reduction the tokens no longer form a grid: ``forward_features`` then raises a ValueError.

Deviations: none. Position tables are resampled for other image sizes exactly as timm does
(antialiased bicubic).
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import (StateDict, conv2d, dense_params, fit_pos_embed, heads_out, linear, norm_params,
                                       qkv_fused, timm_block)
from jaxformers.layers import (Dense, LayerNorm, PatchEmbed, TransformerBlock, logical, maybe_remat, to_2tuple,
                               trunc_normal)
from jaxformers.layers.attention import AttentionImpl
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain


class VisionTransformer(FeatureBackbone):
    """ViT: patch embedding, [CLS] + learned positions, pre-norm blocks, final norm, linear head."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: Literal["token", "avg"] = "token"
    fc_norm: bool | None = None  # norm after pooling instead of before; None = timm's default (avg)
    layer_scale_init: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: AttentionImpl = "xla"
    attn_softmax: str = "softmax"  # outlier-free attention (jaxformers.compress): "clipped(γ:ζ)"
    attn_gate: str | None = None  # gated attention: a MultiHeadAttention gate type
    attn_gate_mlp: bool = False
    attn_gate_init: float | None = None
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    distilled: bool = False  # DeiT's distillation token and second head (logits: mean of both heads)
    # Per-block TransformerBlock fields (one mapping per block, or one for all: num_heads, head_dim,
    # mlp_hidden, scale, attention_fn; num_heads=0 / mlp_hidden=0 drop that sublayer): pruned and
    # searched subnets.
    block_overrides: Sequence[Mapping[str, Any]] | None = None
    # A jaxformers.compress token reduction (ToMe / pruning / Token Transforming / IA-RED^2).
    token_reduction: Any = None
    binary: Any = None  # jaxformers.compress.binary.BinaryRecipe (e.g. BIVIT): binarized blocks
    # A module giving ``jaxformers.layers.PositionTerms`` for the (row, column) of every patch (e.g. 2-D
    # SeqPE): replaces the learned position table (so any img_size works with the same parameters); its
    # input term is added to the patch tokens, its per-layer (q, k) transforms act in every block.
    position_encoder: Any = None

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = to_2tuple(self.img_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distilled)

    def block_fields(self, i: int) -> dict[str, Any]:
        """Block i's ``block_overrides`` entry (one mapping per block, or a single one for every block)."""
        if self.block_overrides is None:
            return {}
        overrides = tuple(self.block_overrides)
        return dict(overrides[0] if len(overrides) == 1 else overrides[i])

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits",
                 positions: jax.Array | None = None):
        """Logits (B, num_classes); ``output`` selects the dense-feature contract's other outputs
        (``jaxformers.layers.features``): ``forward_features`` gives ``{patch_size: (B, h, w, D)}``,
        the patch tokens after the final norm (no class token), ``pre_logits`` the pooled (B, D).
        ``positions`` (h·w, 2) int: the (row, column) given to the ``position_encoder`` for each patch in
        row-major order (default the grid from (0, 0); e.g. SeqPE's shifted training positions)."""
        check_output(output, "VisionTransformer")
        if positions is not None and self.position_encoder is None:
            raise ValueError("positions= is for a position_encoder (e.g. SeqPE); this ViT has a learned table")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.distilled and not self.class_token:
            raise ValueError("distilled=True needs class_token=True (DeiT's [CLS] and distillation tokens)")
        if self.block_overrides is not None and len(self.block_overrides) not in (1, self.depth):
            raise ValueError(f"block_overrides has {len(self.block_overrides)} entries but depth={self.depth}; "
                             f"give one mapping per block (or one for every block)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(self.embed_dim, self.patch_size, self.in_chans, img_size=self.img_size, name="patch_embed",
                       **kw)(x)
        b = x.shape[0]
        if self.class_token:
            cls = self.param("cls_token", logical(nn.initializers.normal(1e-6), (None, None, "embed")),
                             (1, 1, self.embed_dim), self.param_dtype)
            prefix = [jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.embed_dim))]
            if self.distilled:
                dist = self.param("dist_token", logical(trunc_normal(0.02), (None, None, "embed")),
                                  (1, 1, self.embed_dim), self.param_dtype)
                prefix.append(jnp.broadcast_to(dist.astype(x.dtype), (b, 1, self.embed_dim)))
            x = jnp.concatenate([*prefix, x], axis=1)
        qk_fns = None
        if self.position_encoder is None:
            pos = self.param("pos_embed", logical(nn.initializers.normal(0.02), (None, None, "embed")),
                             (1, x.shape[1], self.embed_dim), self.param_dtype)
            x = x + pos.astype(x.dtype)
        else:
            x, qk_fns = self._encoded_positions(x, train, positions)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        block = maybe_remat(TransformerBlock, self.remat)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        tr = self.token_reduction
        size = None if tr is None else jnp.ones(x.shape[:2], jnp.float32)  # tokens each token stands for
        if tr is not None:
            tr.validate(self.depth)
        for i in range(self.depth):
            extra = self.block_fields(i)
            reduce = None
            if tr is not None:
                x, size = tr.before_block(self, i, x, size, train=train)
                reduce = tr.block_reducer(i, self.num_prefix_tokens)
            bias = None if tr is None or not tr.proportional_attention else jnp.log(size)[:, None, None, :]
            out = block(extra.pop("num_heads", self.num_heads), self.mlp_ratio, self.qkv_bias, float(rates[i]),
                        self.attn_drop_rate, self.drop_rate, self.layer_scale_init, attention_impl=self.attention_impl,
                        binary=self.binary, attn_softmax=self.attn_softmax, attn_gate=self.attn_gate,
                        attn_gate_mlp=self.attn_gate_mlp, attn_gate_init=self.attn_gate_init, reduce=reduce,
                        name=f"blocks_{i}", **extra, **kw)(x, train, bias=bias, size=size,
                                                           qk_fn=None if qk_fns is None else qk_fns[i])
            x, size = out if reduce is not None else (out, size)
        use_fc_norm = self.global_pool == "avg" if self.fc_norm is None else self.fc_norm
        if not use_fc_norm:
            x = LayerNorm(1e-6, name="norm", **kw)(x)
        npt = self.num_prefix_tokens
        patches = x[:, npt:]
        gh, gw = self.grid_size
        features = {}
        if patches.shape[1] == gh * gw:
            features = {int(self.patch_size): patches.reshape(b, gh, gw, -1)}
        elif output == "features":
            raise ValueError(f"forward_features: the token reduction left {patches.shape[1]} patch tokens, not the "
                             f"{gh}x{gw} grid; reduced tokens form no feature map (use the logits or pre_logits)")
        if output == "features":
            return features
        if not self.is_initializing():
            self.sow("intermediates", "tokens", x)
            if size is not None:
                self.sow("intermediates", "token_sizes", size)
        if self.global_pool == "token":
            pooled = x[:, 0]
        elif size is None:
            pooled = patches.mean(axis=1)
        else:  # merged tokens count by the number of patches they stand for
            w = size[:, npt:, None].astype(patches.dtype)
            pooled = (patches * w).sum(axis=1) / w.sum(axis=1)
        if use_fc_norm:
            pooled = LayerNorm(1e-6, name="fc_norm", **kw)(pooled)
        logits = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if self.num_classes:
            logits = Dense(self.num_classes, axes=("embed", "classes"), kernel_init=nn.initializers.zeros_init(),
                           name="head", **kw)(logits)
            if self.distilled:
                dist = nn.Dropout(self.drop_rate)(x[:, 1], deterministic=not train)
                dist = Dense(self.num_classes, axes=("embed", "classes"), kernel_init=nn.initializers.zeros_init(),
                             name="head_dist", **kw)(dist)
                if not self.is_initializing():
                    self.sow("intermediates", "logits_cls", logits)
                    self.sow("intermediates", "logits_dist", dist)
                logits = (logits + dist) / 2  # timm / DeiT inference: the mean of both heads
        return select_output(output, features, pooled, logits)

    def _encoded_positions(self, x: jax.Array, train: bool, positions: jax.Array | None = None):
        """The position encoder's terms for the patch grid: x with the input term added to the patch tokens,
        and the per-layer (q, k) transforms (or None)."""
        if self.remat:
            raise ValueError("a position_encoder with remat=True is not supported (its (q, k) transforms are "
                             "closures); use remat=False")
        gh, gw = self.grid_size
        grid = jnp.asarray(np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij"), -1).reshape(-1, 2))
        if positions is not None:
            if tuple(positions.shape) != (gh * gw, 2):
                raise ValueError(f"positions must be (h·w, 2) = ({gh * gw}, 2) (row, column) pairs for the "
                                 f"{gh}x{gw} patch grid; got {tuple(positions.shape)}")
            grid = jnp.asarray(positions, jnp.int32)
        terms = self.position_encoder(grid, grid, num_layers=self.depth, num_heads=self.num_heads,
                                      head_dim=self.embed_dim // self.num_heads, width=self.embed_dim,
                                      num_prefix=self.num_prefix_tokens, train=train)
        if terms.biases is not None:
            raise ValueError("VisionTransformer takes a position encoder's input term and (q, k) transforms, not "
                             "attention biases (use mode 'attn_mul', 'attn_add' or 'input_add')")
        if terms.inputs is not None:
            x = x.at[:, self.num_prefix_tokens:].add(terms.inputs[None].astype(x.dtype))
        return x, terms.qk_fns


# ---------------------------------------------------------------------------------------------
# timm checkpoint converter


def convert_timm_vit(sd: StateDict, model: VisionTransformer, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """timm ``VisionTransformer`` state dict -> our flat ``params/...`` variables."""
    out = {
        "params/patch_embed/proj/kernel": conv2d(sd["patch_embed.proj.weight"]),
        "params/patch_embed/proj/bias": sd["patch_embed.proj.bias"],
        "params/pos_embed": fit_pos_embed(sd["pos_embed"], model.grid_size, model.num_prefix_tokens),
    }
    norm = "fc_norm" if "fc_norm.weight" in sd else "norm"
    out[f"params/{norm}/scale"] = sd[f"{norm}.weight"]
    out[f"params/{norm}/bias"] = sd[f"{norm}.bias"]
    if model.class_token:
        out["params/cls_token"] = sd["cls_token"]
    if model.distilled:
        out["params/dist_token"] = sd["dist_token"]
    for head in ("head", "head_dist"):
        if model.num_classes and f"{head}.weight" in sd:
            out[f"params/{head}/kernel"] = linear(sd[f"{head}.weight"])
            out[f"params/{head}/bias"] = sd[f"{head}.bias"]
        sd.skip(f"{head}.weight", f"{head}.bias")
    for i in range(model.depth):
        extra = model.block_fields(i)
        heads = extra.get("num_heads", model.num_heads)
        if heads and extra.get("mlp_hidden") != 0:
            out.update(timm_block(sd, f"blocks.{i}.", f"params/blocks_{i}/", heads))
            continue
        # A pruned block: only its remaining sublayer's keys.
        t, o = f"blocks.{i}.", f"params/blocks_{i}/"
        if heads:
            out.update({**norm_params(sd, t + "norm1", o + "norm1"), **dense_params(sd, t + "attn.proj", o + "attn/proj"),
                        o + "attn/qkv/kernel": qkv_fused(sd[t + "attn.qkv.weight"], heads),
                        o + "attn/proj/kernel": heads_out(sd[t + "attn.proj.weight"], heads)})
            if t + "attn.qkv.bias" in sd:
                out[o + "attn/qkv/bias"] = qkv_fused(sd[t + "attn.qkv.bias"], heads)
        else:
            out.update({**norm_params(sd, t + "norm2", o + "norm2"), **dense_params(sd, t + "mlp.fc1", o + "mlp/fc1"),
                        **dense_params(sd, t + "mlp.fc2", o + "mlp/fc2")})
        ls = "ls1" if heads else "ls2"
        if f"{t}{ls}.gamma" in sd:
            out[f"{o}{ls}/gamma"] = sd[f"{t}{ls}.gamma"]
    return out


# ---------------------------------------------------------------------------------------------
# Variants (timm names). Params: timm's count; FLOPs and top-1: DeiT paper Table 1 (no distillation).

VARIANTS = {
    "vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
}


def _info(params_m, flops_g, top1):
    return ModelInfo(paper="An Image is Worth 16x16 Words (ViT) / DeiT", arxiv="2010.11929",
                     repo="google-research/vision_transformer", input_size=(224, 224, 3), params_m=params_m,
                     flops_g=flops_g, top1=top1, converter=convert_timm_vit)


@register_model(_info(5.72, 1.3, 72.2))
def vit_tiny_patch16_224(**overrides: Any) -> VisionTransformer:
    return VisionTransformer(**{**VARIANTS["vit_tiny_patch16_224"], **overrides})


@register_model(_info(22.05, 4.6, 79.8))
def vit_small_patch16_224(**overrides: Any) -> VisionTransformer:
    return VisionTransformer(**{**VARIANTS["vit_small_patch16_224"], **overrides})


@register_model(_info(86.57, 17.6, 81.8))
def vit_base_patch16_224(**overrides: Any) -> VisionTransformer:
    return VisionTransformer(**{**VARIANTS["vit_base_patch16_224"], **overrides})


# DeiT (Touvron et al., arXiv 2012.12877, facebookresearch/deit): the same networks under timm's
# ``deit_*`` names, and the distilled variants with a distillation token and second head
# (timm ``VisionTransformerDistilled``; logits = mean of both heads). Params: timm's counts;
# top-1: DeiT paper Tables 1 and 5 (distilled: with the RegNetY-16GF teacher, 300 epochs).


def _deit_info(params_m, flops_g, top1):
    return ModelInfo(paper="Training data-efficient image transformers & distillation through attention (DeiT)",
                     arxiv="2012.12877", repo="facebookresearch/deit", input_size=(224, 224, 3), params_m=params_m,
                     flops_g=flops_g, top1=top1, converter=convert_timm_vit)


@register_model(_deit_info(5.72, 1.3, 72.2))
def deit_tiny_patch16_224(**overrides: Any) -> VisionTransformer:
    return VisionTransformer(**{**VARIANTS["vit_tiny_patch16_224"], **overrides})


@register_model(_deit_info(22.05, 4.6, 79.8))
def deit_small_patch16_224(**overrides: Any) -> VisionTransformer:
    return VisionTransformer(**{**VARIANTS["vit_small_patch16_224"], **overrides})


@register_model(_deit_info(86.57, 17.6, 81.8))
def deit_base_patch16_224(**overrides: Any) -> VisionTransformer:
    return VisionTransformer(**{**VARIANTS["vit_base_patch16_224"], **overrides})


@register_model(_deit_info(5.91, 1.3, 74.5))
def deit_tiny_distilled_patch16_224(**overrides: Any) -> VisionTransformer:
    return VisionTransformer(**{**VARIANTS["vit_tiny_patch16_224"], "distilled": True, **overrides})


@register_model(_deit_info(22.44, 4.6, 81.2))
def deit_small_distilled_patch16_224(**overrides: Any) -> VisionTransformer:
    return VisionTransformer(**{**VARIANTS["vit_small_patch16_224"], "distilled": True, **overrides})


@register_model(_deit_info(87.34, 17.6, 83.4))
def deit_base_distilled_patch16_224(**overrides: Any) -> VisionTransformer:
    return VisionTransformer(**{**VARIANTS["vit_base_patch16_224"], "distilled": True, **overrides})
