"""Vision Mamba (Vim): images as patch sequences read by bidirectional selective state spaces.

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
Zhu et al., ICML 2024, arXiv 2401.09417. Official code: hustvl/Vim (``vim/models_mamba.py``, the mixer in
``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py`` with ``bimamba_type="v2"``); a pure-PyTorch port of
the mixer is ``mambapy.vim`` (PyPI ``mambapy``, the parity reference of the tests).

Architecture (the released ``vim_{tiny,small}_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_
midclstok_div2``): 16x16 patch embedding (a strided conv), a class token inserted in the *middle* of the
patch sequence (position M // 2), learned absolute positions, ``depth`` residual blocks
x + DropPath(BiMixer(RMSNorm(x))) with a float32 residual, a final RMSNorm and a linear head on the class
token. The bidirectional mixer (``MambaMixer(bidirectional=True)``, jaxformers/models/mamba.py) shares
the input and output projections; a forward and a backward branch (own conv, x/dt projections,
``A_log`` / ``A_b_log``, ``D`` / ``D_b``) read the sequence and its reverse, and their outputs are averaged
(``if_devide_out=True``). The official code's "Add -> Norm -> Mixer" block order is the same function as
this pre-norm residual block. Initialisation as the official code: patch conv LeCun-normal, class token
and positions truncated normal (0.02), head truncated normal (0.02) with zero bias, mixers as Mamba
(``out_proj`` rescaled by 1/sqrt(depth)).

``forward_features`` returns ``{patch_size: (B, H/p, W/p, D)}``, the patch tokens after the final norm
(class token removed), for dense heads. Deviations: the stride-8 ("stride8") and RoPE / random
class-token-position variants of the official file are not built.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, conv2d, linear
from jaxformers.layers import Dense, PatchEmbed, RMSNorm, logical, to_2tuple
from jaxformers.layers.features import FeatureBackbone, Output, check_output, select_output
from jaxformers.layers.ssm import ScanMethod
from jaxformers.models.mamba import MambaBlock, _MixerConfig
from jaxformers.models.mamba_convert import mixer_rows, to_ours
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain


class VisionMamba(FeatureBackbone):
    """Vim: ``__call__(x (B, H, W, C))`` -> logits; the dense-feature contract's ``forward_features`` ->
    {patch_size: NHWC map}, ``pre_logits`` -> the class token after the final norm (B, D)."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 24
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    scan: ScanMethod = "associative"
    chunk_size: int = 256
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = to_2tuple(self.img_size)
        return h // self.patch_size, w // self.patch_size

    def _check_geometry(self) -> None:
        h, w = to_2tuple(self.img_size)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"img_size {h}x{w} is not divisible by patch_size={self.patch_size}: the patch grid "
                             f"must tile the image (use a multiple of {self.patch_size})")

    def _mixer_config(self) -> _MixerConfig:
        return _MixerConfig(self.state_size, self.expand, self.conv_kernel, -(-self.embed_dim // 16), False, True,
                            1e-3, 0.1, 1e-4, 1.0, "random", 1.0 / np.sqrt(self.depth), self.scan, self.chunk_size)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, output: Output = "logits"):
        check_output(output, "VisionMamba")
        self._check_geometry()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(self.embed_dim, self.patch_size, self.in_chans, img_size=self.img_size, name="patch_embed",
                       **kw)(x)
        b, m, d = x.shape
        middle = m // 2
        cls = self.param("cls_token", logical(nn.initializers.truncated_normal(0.02), (None, None, "embed")),
                         (1, 1, d), self.param_dtype)
        x = jnp.concatenate([x[:, :middle], jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x[:, middle:]], 1)
        pos = self.param("pos_embed", logical(nn.initializers.truncated_normal(0.02), (None, None, "embed")),
                         (1, m + 1, d), self.param_dtype)
        x = nn.Dropout(self.drop_rate)(x + pos.astype(x.dtype), deterministic=not train)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        config = self._mixer_config()
        block = nn.remat(MambaBlock, static_argnums=(4,)) if self.remat else MambaBlock
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            x, _ = block(config, self.norm_epsilon, self.residual_in_fp32, True, float(rates[i]),
                         name=f"layers_{i}", **kw)(x, None, None, train)
        x = RMSNorm(self.norm_epsilon, name="norm_f", **kw)(x)
        gh, gw = self.grid_size
        patches = jnp.concatenate([x[:, :middle], x[:, middle + 1:]], axis=1)
        features = {int(self.patch_size): patches.reshape(b, gh, gw, d)}
        if output == "features":
            return features
        pooled = x[:, middle]
        logits = pooled
        if self.num_classes:
            logits = Dense(self.num_classes, axes=("embed", "classes"), name="head", **kw)(pooled).astype(jnp.float32)
        return select_output(output, features, pooled, logits)


# ---------------------------------------------------------------------------------------------
# Official (hustvl/Vim) checkpoint converter


def convert_vim(sd: StateDict, model: VisionMamba, expected: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """hustvl/Vim ``VisionMamba`` state dict -> our flat ``params/...`` variables."""
    del expected
    out = {"params/patch_embed/proj/kernel": conv2d(sd["patch_embed.proj.weight"]),
           "params/patch_embed/proj/bias": sd["patch_embed.proj.bias"],
           "params/cls_token": sd["cls_token"], "params/pos_embed": sd["pos_embed"],
           "params/norm_f/scale": sd["norm_f.weight"]}
    if model.num_classes:
        out["params/head/kernel"] = linear(sd["head.weight"])
        out["params/head/bias"] = sd["head.bias"]
    for i in range(model.depth):
        out[f"params/layers_{i}/norm/scale"] = sd[f"layers.{i}.norm.weight"]
        for ours, theirs, kind in mixer_rows(f"params/layers_{i}/mixer/", f"layers.{i}.mixer.", bidirectional=True):
            out[ours] = to_ours(sd[theirs], kind)
    return out


# ---------------------------------------------------------------------------------------------
# Variants: the paper's Table 1 (ImageNet-1k, 224x224); parameters counted from the official model.

VARIANTS = {
    "vim_tiny_patch16_224": dict(embed_dim=192, depth=24),
    "vim_small_patch16_224": dict(embed_dim=384, depth=24),
}


def _info(params_m: float, top1: float) -> ModelInfo:
    return ModelInfo(paper="Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space "
                           "Model", arxiv="2401.09417", repo="hustvl/Vim", input_size=(224, 224, 3),
                     params_m=params_m, top1=top1, converter=convert_vim)


@register_model(_info(7.148008, 76.1))
def vim_tiny_patch16_224(**overrides: Any) -> VisionMamba:
    """Vim-Ti: D = 192, 24 bidirectional Mamba blocks, middle class token."""
    return VisionMamba(**{**VARIANTS["vim_tiny_patch16_224"], **overrides})


@register_model(_info(25.796584, 80.5))
def vim_small_patch16_224(**overrides: Any) -> VisionMamba:
    """Vim-S: D = 384, 24 bidirectional Mamba blocks, middle class token."""
    return VisionMamba(**{**VARIANTS["vim_small_patch16_224"], **overrides})
