"""The dense-feature contract of jaxformers' image backbones, and the checks dense heads call.

Every image backbone subclasses :class:`FeatureBackbone` and answers three calls, each with the
usual ``train=`` (dropout, drop-path; BatchNorm models normalise with batch statistics and need
``mutable=["batch_stats"]`` when ``train=True``):

``model.apply(variables, x)``
    logits, (B, num_classes) (``__call__``; with ``num_classes=0`` the pooled features).
``model.apply(variables, x, method="pre_logits")``
    the pooled features the classifier reads, (B, D): after the final norm and pooling, before the
    dropout and the head (timm's ``forward_head(..., pre_logits=True)``).
``model.apply(variables, x, method="forward_features")``
    ``dict[int, jax.Array]``: ``{stride: (B, H // stride, W // stride, C_stride)}``, one NHWC map
    per stride the backbone has, for an NHWC input of (B, H, W, C_in). Keys are Python ``int``
    strides and nothing else (a dict that mixes int and str keys cannot be flattened as a pytree, so
    ``jax.jit`` / ``jax.tree_util`` would fail on it). When the strides divide H and W the maps
    are exactly H / stride x W / stride. The maps are the stage outputs (hierarchical backbones, as
    timm's ``features_only=True``) or the patch-token grid (plain ones), never class/distillation
    tokens, and ``__call__`` does not compute the classifier head for them.

Strides per family:

- Hierarchical (ResNet, BiFormer, CSWin; Swin and ConvNeXt): 4, 8, 16, 32, the raw output of each stage.
- ViT: ``{patch_size: patch tokens after the final norm}`` (16 for the registered variants).
- FIT: ``{patch_size: data tokens after their output norm, put back on the patch grid}``.
- TNT: ``{first_stride: the last block's pixel "words" laid out as a map (4: each word covers 4x4
  pixels), patch_size: patch tokens after the final norm}`` ({4, 16} for TNT-S/B).
- CrossViT: one map per branch (normed patch tokens), keyed by the branch's effective stride on the
  input image, ``round(patch_size / img_scale)``: 12 (small patches) and 17 (16-px patches on
  the image resized by 224/240, i.e. 16 x 240/224 = 17.1; the map is 14x14 = 240 // 17 at 240 px).

One pass for all three outputs (deep supervision, tests): ``model.apply(variables, x,
output="all")`` returns a :class:`BackboneOutput` ``(features, pre_logits, logits)``.

Dense heads (Mask2Former, kMaX-DeepLab, ...) check what they get with :func:`check_pyramid` and the
input with :func:`check_image_strides`, and size their layers with :func:`pyramid_shapes`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["BackboneOutput", "FeatureBackbone", "OUTPUTS", "check_output", "select_output", "check_pyramid",
           "check_image_strides", "pyramid_shapes"]

Output = Literal["logits", "pre_logits", "features", "all"]
OUTPUTS = ("logits", "pre_logits", "features", "all")


class BackboneOutput(NamedTuple):
    """Everything one forward pass gives (``output="all"``): the stride-keyed maps, the pooled
    features and the logits."""

    features: dict[int, jax.Array]
    pre_logits: jax.Array
    logits: jax.Array


class FeatureBackbone(nn.Module):
    """Base of every image backbone: ``forward_features`` and ``pre_logits`` as ``apply`` methods.

    A subclass implements ``__call__(self, x, *, train=False, output="logits")`` (one
    ``nn.compact`` forward) that returns ``select_output(output, features, pooled, logits)``, or
    the features dict early when ``output == "features"`` (see the module docstring)."""

    def forward_features(self, x: jax.Array, *, train: bool = False) -> dict[int, jax.Array]:
        """``{stride: (B, H // stride, W // stride, C)}`` NHWC maps, int keys (module docstring)."""
        return self(x, train=train, output="features")

    def pre_logits(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """The pooled features the classifier reads, (B, D)."""
        return self(x, train=train, output="pre_logits")


def check_output(output: str, who: str = "model") -> None:
    """A clear error for an ``output=`` other than ``OUTPUTS``."""
    if output not in OUTPUTS:
        raise ValueError(f"{who}: output must be one of {OUTPUTS}; got {output!r} (forward_features and "
                         f"pre_logits are also apply methods: model.apply(v, x, method='forward_features'))")


def select_output(output: str, features: dict[int, jax.Array], pre_logits: jax.Array, logits: jax.Array) -> Any:
    """What ``__call__`` returns for ``output`` (already checked by :func:`check_output`)."""
    if output == "logits":
        return logits
    if output == "pre_logits":
        return pre_logits
    if output == "features":
        return features
    return BackboneOutput(features, pre_logits, logits)


def _is_stride(k: Any) -> bool:
    return isinstance(k, int) and not isinstance(k, bool) and k > 0


def check_pyramid(features: Any, strides: Sequence[int] | None = (4, 8, 16, 32), *, who: str,
                  image_hw: tuple[int, int] | None = None) -> dict[int, jax.Array]:
    """Checks a backbone's ``forward_features`` output for a dense head named ``who``; returns
    ``{stride: map}`` for ``strides`` (all of them when ``strides`` is None), in stride order.

    Raises a ValueError naming non-int keys, the missing strides (and the ones present), maps that
    are not rank-4 NHWC with one batch size, and, with ``image_hw`` = the input's (H, W), maps whose
    spatial size is not (H // stride, W // stride)."""
    if not isinstance(features, Mapping):
        raise ValueError(f"{who} needs a backbone's forward_features output, a dict {{stride: NHWC map}}; "
                         f"got {type(features).__name__}")
    bad = [k for k in features if not _is_stride(k)]
    if bad:
        raise ValueError(f"{who}: backbone feature keys must be positive int strides ({{4: ..., 8: ...}}); got "
                         f"{bad!r} among {list(features)!r}. Call the backbone with "
                         f"method='forward_features' (maps keyed by stride)")
    have = tuple(sorted(features))
    want = have if strides is None else tuple(strides)
    missing = [s for s in want if s not in features]
    if missing:
        raise ValueError(f"{who} needs backbone feature maps at strides {want}; the backbone gives strides {have}, "
                         f"missing {tuple(missing)}. Use a hierarchical backbone (ResNet, Swin, ConvNeXt, "
                         f"BiFormer, CSWin give 4, 8, 16, 32)")
    out, batch = {}, None
    for s in sorted(want):
        m = features[s]
        shape = tuple(getattr(m, "shape", ()))
        if len(shape) != 4:
            raise ValueError(f"{who}: the backbone's stride-{s} feature map must be NHWC (batch, height, width, "
                             f"channels); got shape {shape}")
        if batch is not None and shape[0] != batch:
            raise ValueError(f"{who}: backbone feature maps disagree on the batch size: stride {s} has {shape[0]}, "
                             f"the others {batch}")
        batch = shape[0]
        if image_hw is not None:
            h, w = image_hw
            if shape[1:3] != (h // s, w // s):
                raise ValueError(f"{who}: the stride-{s} feature map is {shape[1]}x{shape[2]} but a {h}x{w} input "
                                 f"gives {h // s}x{w // s} at stride {s} (is the map NHWC, and the stride right?)")
        out[s] = m
    return out


def check_image_strides(x: Any, strides: Sequence[int], *, who: str) -> tuple[int, int]:
    """Height and width of the NHWC image (or an (H, W) pair) ``x`` must be multiples of every stride
    (their lcm); returns (H, W), or raises a ValueError naming the size, the stride and sizes that work."""
    hw = tuple(x) if isinstance(x, (tuple, list)) else tuple(getattr(x, "shape", ())[1:3])
    if len(hw) != 2:
        raise ValueError(f"{who} needs an NHWC image batch or an (H, W) size; got shape {getattr(x, 'shape', x)}")
    h, w = (int(v) for v in hw)
    m = math.lcm(*(int(s) for s in strides))
    if h % m or w % m:
        lo_h, lo_w = max(m, h // m * m), max(m, w // m * m)
        raise ValueError(f"{who}: the image is {h}x{w}, but its backbone's feature strides {tuple(strides)} need "
                         f"height and width divisible by {m}; resize or pad to e.g. {lo_h}x{lo_w} or "
                         f"{lo_h + m}x{lo_w + m}")
    return h, w


def pyramid_shapes(model: nn.Module, image_hw: tuple[int, int] | None = None, *, batch: int = 1,
                   in_chans: int | None = None) -> dict[int, tuple[int, ...]]:
    """``{stride: (B, h, w, C)}`` of ``model``'s ``forward_features`` on a (batch, H, W, in_chans) image
    (default: the model's ``img_size`` / ``in_chans``), through ``jax.eval_shape``: nothing is computed
    or allocated. What a dense head needs to size its input projections."""
    if image_hw is None:
        size = getattr(model, "img_size", 224)
        image_hw = (size, size) if isinstance(size, int) else tuple(size)
    c = in_chans if in_chans is not None else getattr(model, "in_chans", 3)
    x = jax.ShapeDtypeStruct((batch, *image_hw, c), jnp.float32)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, method="forward_features")[0], x)
    return {s: tuple(m.shape) for s, m in sorted(out.items())}
