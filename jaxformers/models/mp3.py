"""MP3: masked patch position prediction, a ViT pretrained without position embeddings.

Paper: "Position Prediction as an Effective Pretraining Strategy", Zhai, Jaitly, Ramapuram, Busbridge,
Likhomanenko, Cheng, Gu, Susskind (Apple), ICML 2022, arXiv 2207.07611. No official code was found;
lucidrains' ``vit_pytorch/mp3.py`` is a port.

Pretraining: patch tokens *without* any position embedding go through a ViT encoder; in every
self-attention layer all tokens are queries but only a random subset (the "context", a fraction
1 - ``masking_ratio`` kept per image) serves as keys and values; a head (LayerNorm -> Linear(D, N)) then
classifies every token's position among the N patch positions, with cross-entropy against 0..N-1.
Without positions the encoder is permutation equivariant: shuffling the patches shuffles the rows of
the predictions (tested), so the model can only solve the task from the image content.

Fine-tuning (``to_vit``): the encoder's weights go into a ``VisionTransformer`` without class token
(mean pooling) to which a learned position table (zeros) and a classification head are added.

Parameter names are ``VisionTransformer``'s (``patch_embed``, ``blocks_{i}``, ``norm``), plus
``position_norm`` / ``position_head``. The key/value restriction is an attention mask over the kept
tokens: the same outputs as gathering them (the representations of context tokens are updated layer by
layer, as the paper describes; lucidrains' port instead keeps the first layer's context fixed), without
the paper's saving in attention FLOPs. The mask is drawn from the ``dropout`` RNG stream when
``train=True`` (what the trainer provides); evaluation uses every patch unless ``keep`` is given.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers import Dense, LayerNorm, PatchEmbed, TransformerBlock, to_2tuple
from jaxformers.layers.features import FeatureBackbone, check_output, select_output
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

__all__ = ["MP3", "random_keep_mask", "position_loss", "to_vit"]


def random_keep_mask(rng: jax.Array, batch: int, num_patches: int, masking_ratio: float) -> jax.Array:
    """(batch, N) bool: exactly N - int(ratio·N) kept patches per image, chosen uniformly (argsort of noise)."""
    if not 0.0 <= masking_ratio < 1.0:
        raise ValueError(f"masking_ratio must be in [0, 1); got {masking_ratio}")
    num_masked = int(masking_ratio * num_patches)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=-1), axis=-1)
    return ranks >= num_masked


def position_loss(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of (B, N, N) position logits against positions 0..N-1, and the accuracy."""
    import optax

    b, n, _ = logits.shape
    labels = jnp.broadcast_to(jnp.arange(n), (b, n))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


class MP3(FeatureBackbone):
    """``__call__(images (B, H, W, C), keep=None)`` -> position logits (B, N, N) (``num_classes=0``, the
    pretraining model). With ``num_classes > 0`` it is a classifier without positions (a head on the
    mean-pooled tokens) and follows the dense-feature contract (``forward_features`` -> {patch_size:
    NHWC map}, ``pre_logits``); ``output="positions"`` always gives the position logits."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    masking_ratio: float = 0.75
    num_classes: int = 0
    drop_path_rate: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def num_patches(self) -> int:
        h, w = to_2tuple(self.img_size)
        return (h // self.patch_size) * (w // self.patch_size)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, keep: jax.Array | None = None,
                 output: str | None = None):
        output = output or ("positions" if self.num_classes == 0 else "logits")
        if output != "positions":
            check_output(output, "MP3")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(self.embed_dim, self.patch_size, self.in_chans, img_size=self.img_size, name="patch_embed",
                       **kw)(x)
        b, n, _ = x.shape
        if keep is None and train and self.masking_ratio > 0:
            keep = random_keep_mask(self.make_rng("dropout"), b, n, self.masking_ratio)
        if keep is not None and keep.shape != (b, n):
            raise ValueError(f"keep must be (batch, num_patches) = {(b, n)}; got {keep.shape}")
        mask = None if keep is None else keep[:, None, None, :]  # every query sees the kept keys only
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            x = TransformerBlock(self.num_heads, self.mlp_ratio, drop_path=float(rates[i]), name=f"blocks_{i}",
                                 **kw)(x, train, mask=mask)
        x = LayerNorm(1e-6, name="norm", **kw)(x)
        if output == "positions":
            x = LayerNorm(1e-6, name="position_norm", **kw)(x)
            return Dense(n, axes=("embed", "classes"), name="position_head", **kw)(x).astype(jnp.float32)
        gh, gw = (s // self.patch_size for s in to_2tuple(self.img_size))
        features = {int(self.patch_size): x.reshape(b, gh, gw, -1)}
        if output == "features":
            return features
        pooled = x.mean(axis=1)
        logits = pooled
        if self.num_classes:
            logits = Dense(self.num_classes, axes=("embed", "classes"), name="head", **kw)(pooled).astype(jnp.float32)
        return select_output(output, features, pooled, logits)


def to_vit(module: MP3, variables: Any, num_classes: int, **vit_overrides: Any):
    """``(VisionTransformer, variables)`` for fine-tuning: MP3's encoder weights, no class token, mean
    pooling after the final norm, a new learned position table (zeros: training starts from the
    pretrained function) and a new zero classification head."""
    from jaxformers.models.vit import VisionTransformer

    vit = VisionTransformer(img_size=module.img_size, patch_size=module.patch_size, in_chans=module.in_chans,
                            num_classes=num_classes, embed_dim=module.embed_dim, depth=module.depth,
                            num_heads=module.num_heads, mlp_ratio=module.mlp_ratio, class_token=False,
                            global_pool="avg", fc_norm=False, **vit_overrides)
    if module.num_classes:
        raise ValueError("to_vit takes the pretraining model (num_classes=0)")
    params = dict(nn.unbox(variables)["params"])
    shapes = nn.unbox(jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, *to_2tuple(module.img_size),
                                                                           module.in_chans))))["params"]
    out = {k: v for k, v in params.items() if k in shapes}
    out["pos_embed"] = jnp.zeros(shapes["pos_embed"].shape, shapes["pos_embed"].dtype)
    out["head"] = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["head"])
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise ValueError(f"MP3 -> ViT: no weights for {missing}")
    return vit, {"params": out}


@register_model(ModelInfo(paper="Position Prediction as an Effective Pretraining Strategy (MP3)", arxiv="2207.07611",
                          repo=None, input_size=(224, 224, 3)))
def mp3_vit_small_patch16_224(**overrides: Any) -> MP3:
    """MP3 pretraining of a ViT-S/16 (the paper's ImageNet backbone size), 75% of the patches masked."""
    return MP3(**overrides)
