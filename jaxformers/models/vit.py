"""Vision Transformer (ViT) and its DeiT-sized variants.

Papers: "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
Dosovitskiy et al., ICLR 2021, arXiv 2010.11929; "Training data-efficient image transformers &
distillation through attention" (DeiT), Touvron et al., ICML 2021, arXiv 2012.12877 (the Tiny and
Small sizes). Official code: google-research/vision_transformer (JAX), facebookresearch/deit.
Parameter names follow timm's ``vision_transformer.py`` so its checkpoints convert one to one.

Deviations: none. Position tables are resampled for other image sizes exactly as timm does
(antialiased bicubic).
"""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, conv2d, fit_pos_embed, linear, timm_block
from jaxformers.layers import Dense, LayerNorm, PatchEmbed, TransformerBlock, logical, maybe_remat, to_2tuple
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
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
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
        return int(self.class_token)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        """Logits (B, num_classes); ``output`` selects the dense-feature contract's other outputs
        (``jaxformers.layers.features``): ``forward_features`` gives ``{patch_size: (B, h, w, D)}``,
        the patch tokens after the final norm (no class token), ``pre_logits`` the pooled (B, D)."""
        check_output(output, "VisionTransformer")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(self.embed_dim, self.patch_size, self.in_chans, img_size=self.img_size, name="patch_embed",
                       **kw)(x)
        b = x.shape[0]
        if self.class_token:
            cls = self.param("cls_token", logical(nn.initializers.normal(1e-6), (None, None, "embed")),
                             (1, 1, self.embed_dim), self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.embed_dim)), x], axis=1)
        qk_fns = None
        if self.position_encoder is None:
            pos = self.param("pos_embed", logical(nn.initializers.normal(0.02), (None, None, "embed")),
                             (1, x.shape[1], self.embed_dim), self.param_dtype)
            x = x + pos.astype(x.dtype)
        else:
            x, qk_fns = self._encoded_positions(x, train)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        block = maybe_remat(TransformerBlock, self.remat)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            x = block(self.num_heads, self.mlp_ratio, self.qkv_bias, float(rates[i]), self.attn_drop_rate,
                      self.drop_rate, self.layer_scale_init, attention_impl=self.attention_impl,
                      binary=self.binary, name=f"blocks_{i}", **kw)(
                x, train, **({} if qk_fns is None else {"qk_fn": qk_fns[i]}))
        use_fc_norm = self.global_pool == "avg" if self.fc_norm is None else self.fc_norm
        if not use_fc_norm:
            x = LayerNorm(1e-6, name="norm", **kw)(x)
        patches = x[:, self.num_prefix_tokens:]
        gh, gw = self.grid_size
        features = {int(self.patch_size): patches.reshape(b, gh, gw, -1)}
        if output == "features":
            return features
        pooled = x[:, 0] if self.global_pool == "token" else patches.mean(axis=1)
        if use_fc_norm:
            pooled = LayerNorm(1e-6, name="fc_norm", **kw)(pooled)
        logits = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if self.num_classes:
            logits = Dense(self.num_classes, axes=("embed", "classes"), kernel_init=nn.initializers.zeros_init(),
                           name="head", **kw)(logits)
        return select_output(output, features, pooled, logits)

    def _encoded_positions(self, x: jax.Array, train: bool):
        """The position encoder's terms for the patch grid: x with the input term added to the patch tokens,
        and the per-layer (q, k) transforms (or None)."""
        if self.remat:
            raise ValueError("a position_encoder with remat=True is not supported (its (q, k) transforms are "
                             "closures); use remat=False")
        gh, gw = self.grid_size
        grid = jnp.asarray(np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij"), -1).reshape(-1, 2))
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
    if model.num_classes and "head.weight" in sd:
        out["params/head/kernel"] = linear(sd["head.weight"])
        out["params/head/bias"] = sd["head.bias"]
    sd.skip("head.weight", "head.bias")
    for i in range(model.depth):
        out.update(timm_block(sd, f"blocks.{i}.", f"params/blocks_{i}/", model.num_heads))
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
