"""``quantize(module, variables, scheme, calibration=batches)``: the one entry to every quantiser.

Each scheme is a function registered under a name (``register_scheme``; the binarisation and
other compression papers add theirs) that returns ``(module, variables)``: a module that applies
like the original (``module.apply(variables, *inputs, **kwargs)``, jit-able, the same outputs up to
quantisation error) and variables whose integer tensors are really stored as integers, so
``variable_bytes`` counts what a deployment keeps in memory.

``calibration`` is an iterable of batches, each what ``module.apply`` takes after the variables: an
array (one positional input), a tuple (positional inputs) or a dict (keyword inputs), e.g.
``[{"input_ids": ids, "attention_mask": mask}, ...]``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import numpy as np

# Parts of a model kept in floating point by default (the papers quantise the backbone and keep the
# task head in float: BERT's MLM/NSP heads, classifiers, the LM head): module paths matching this.
DEFAULT_KEEP_FLOAT = r"(head|lm_head|classifier|mlm|nsp|qa_outputs)(/.*)?"


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    fn: Callable[..., tuple[Any, Any]]
    needs_calibration: bool
    description: str


_SCHEMES: dict[str, Scheme] = {}


def register_scheme(name: str, fn: Callable[..., tuple[Any, Any]], *, needs_calibration: bool,
                    description: str) -> None:
    """Adds a scheme: ``fn(module, variables, calibration=[batches...], **options) -> (module, variables)``."""
    if name in _SCHEMES:
        raise ValueError(f"quantization scheme {name!r} is registered twice")
    _SCHEMES[name] = Scheme(name, fn, needs_calibration, description)


def schemes() -> dict[str, str]:
    """Every scheme ``quantize`` knows, with a one-line description."""
    return {name: s.description for name, s in sorted(_SCHEMES.items())}


def as_call(batch: Any) -> tuple[tuple, dict]:
    """A calibration batch as (args, kwargs) for ``module.apply(variables, *args, **kwargs)``."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def quantize(module: nn.Module, variables: Any, scheme: str, *, calibration: Iterable[Any] | None = None,
             **options: Any) -> tuple[Any, Any]:
    """Quantises ``module`` with ``variables`` by ``scheme`` (see ``schemes()``); returns
    ``(module, variables)`` that apply like the originals. ``calibration``: batches of inputs for
    schemes that estimate activation ranges; ``options`` go to the scheme (e.g. ``keep_float``, a
    regex of module paths left in float)."""
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; valid schemes: {', '.join(sorted(_SCHEMES))}")
    spec = _SCHEMES[scheme]
    batches = None if calibration is None else list(calibration)
    if spec.needs_calibration and not batches:
        raise ValueError(f"scheme {scheme!r} estimates static activation ranges: calibration must hold at least one "
                         f"batch of inputs (an array, a tuple of positional inputs or a dict of keyword inputs)"
                         + ("; got an empty iterable" if batches is not None else "; got calibration=None"))
    if not isinstance(module, nn.Module):
        raise TypeError(f"quantize takes a Flax Linen module; got {type(module).__name__}")
    return spec.fn(module, variables, calibration=batches or [], **options)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
    """A quantised model: ``apply(variables, *inputs, **kwargs)`` runs ``module`` (the original, or
    the one the backend wrapped) through ``run`` (the scheme's forward). Attributes of the original
    module (``vocab_size``, ``num_classes``...) read through. Hashable by identity (a static
    argument of ``jax.jit``)."""

    module: nn.Module
    scheme: str
    run: Callable[..., Any]
    original: nn.Module | None = None

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        return self.run(variables, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("module", "scheme", "run", "original"):
            raise AttributeError(name)
        return getattr(self.original if self.original is not None else self.module, name)

    def __repr__(self) -> str:
        return f"QuantizedModel({type(self.original or self.module).__name__}, scheme={self.scheme!r})"


def variable_bytes(variables: Any) -> int:
    """Bytes the arrays of ``variables`` occupy (int8 tensors 1 byte per entry, scales included)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables)
                   if hasattr(x, "dtype") and hasattr(x, "shape")))


def float32_bytes(variables: Any) -> int:
    """Bytes of ``variables`` with every array in float32 (the baseline of a compression ratio)."""
    return int(sum(4 * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables) if hasattr(x, "shape")))
