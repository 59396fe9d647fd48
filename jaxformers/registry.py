"""Model registry with timm's conventions: ``create_model``, ``list_models``, ``model_info``.

Every model file registers its variants at the bottom::

    @register_model(ModelInfo(paper="...", arxiv="2010.11929", repo="google-research/vision_transformer",
                              input_size=(224, 224, 3), params_m=5.7, flops_g=1.3, top1=72.2))
    def vit_tiny_patch16_224(**overrides) -> nn.Module:
        return VisionTransformer(**{**TINY, **overrides})

The entrypoint's name is the model name. ``count_params`` builds the model's parameters with
``jax.eval_shape`` (no allocation), so it works for the largest variants on a laptop.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "ModelInfo",
    "register_model",
    "create_model",
    "list_models",
    "model_info",
    "count_params",
    "example_inputs",
    "init_abstract",
]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the paper (or official code) says about one variant.

    ``params_m`` / ``flops_g`` / ``top1`` are the paper's numbers for this variant (None where the
    paper gives none). ``input_size`` is the default input: (H, W, C) for images, (L,) for token ids.
    ``converter`` maps an official checkpoint (see ``jaxformers.convert``) to our variables.
    ``task`` is what ``__call__`` computes: ``"classification"`` (logits over classes; image
    classifiers follow the dense-feature contract of ``jaxformers.layers.features``) or another task
    (``"panoptic segmentation"``, ...); ``metric`` names the paper's score held in ``top1`` (top-1
    accuracy unless said otherwise, e.g. ``"PQ"``).
    """

    paper: str
    arxiv: str | None = None
    repo: str | None = None
    input_size: tuple[int, ...] = (224, 224, 3)
    params_m: float | None = None
    flops_g: float | None = None
    top1: float | None = None
    status: str = "ready"
    converter: Callable[..., Any] | None = None
    name: str = ""
    family: str = ""
    task: str = "classification"
    metric: str = "top-1"


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], ModelInfo]] = {}


def register_model(info: ModelInfo):
    """Decorator: register ``fn(**overrides) -> nn.Module`` under ``fn.__name__``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        family = fn.__module__.rsplit(".", 1)[-1]
        _REGISTRY[name] = (fn, dataclasses.replace(info, name=name, family=family))
        return fn

    return wrap


def _ensure_models_imported() -> None:
    import jaxformers.models  # noqa: F401  (registers every model file)


def _lookup(name: str):
    _ensure_models_imported()
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} See jaxformers.list_models().")
    return _REGISTRY[name]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model ``name``; ``overrides`` replace fields of its config.

    An override that is not a field of the model raises a TypeError naming the valid fields.
    """
    fn, _ = _lookup(name)
    try:
        return fn(**overrides)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise
        module_cls = type(fn())
        fields = sorted(f.name for f in dataclasses.fields(module_cls) if f.name not in ("parent", "name"))
        bad = sorted(set(overrides) - set(fields))
        raise TypeError(f"{name}: unknown override(s) {bad}; valid fields are {fields}") from None


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by an fnmatch pattern (``"vit_*"``)."""
    _ensure_models_imported()
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def model_info(name: str) -> ModelInfo:
    """The paper's facts for ``name``: title, arXiv id, official repo, input size, params/FLOPs/top-1."""
    return _lookup(name)[1]


def example_inputs(model: nn.Module, batch_size: int = 1) -> tuple[Any, ...]:
    """Dummy positional inputs for ``model.init``: the model's own ``example_inputs`` if it has one,
    else an NHWC float image of the model's ``img_size`` / ``in_chans``."""
    if hasattr(model, "example_inputs"):
        return tuple(model.example_inputs(batch_size))
    size = getattr(model, "img_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (jnp.zeros((batch_size, h, w, getattr(model, "in_chans", 3)), jnp.float32),)


def init_abstract(model: nn.Module, batch_size: int = 1):
    """``jax.eval_shape`` of ``model.init``: the variables' shapes and logical axes, nothing allocated."""
    inputs = example_inputs(model, batch_size)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda: model.init(rngs, *inputs, train=False))


def count_params(name_or_model: str | nn.Module, **overrides: Any) -> int:
    """Number of trainable parameters (the ``params`` collection; BatchNorm statistics excluded)."""
    model = create_model(name_or_model, **overrides) if isinstance(name_or_model, str) else name_or_model
    params = nn.unbox(init_abstract(model)["params"])
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
