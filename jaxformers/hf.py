"""One door for Hugging Face model directories: ``from_pretrained(dir)`` and ``save_pretrained(...)``.

A Hugging Face directory holds ``config.json`` (whose ``model_type`` names the architecture) and
weights (``model.safetensors`` or ``pytorch_model.bin``). Each HF-format family registers its loader
and exporter here once, from its own model file::

    register_hf_family(("bert", "roberta", "camembert", "xlm-roberta"), module_type=Bert,
                       load=load_bert_directory, save=save_bert_directory)

``from_pretrained(dir)`` reads ``config.json``, picks the family by ``model_type`` and returns
``(module, variables)``; ``save_pretrained(module, variables, dir)`` picks it by the module's class and
writes a directory ``transformers`` loads. An unknown ``model_type`` or module is a clear error that
lists what is supported. Keyword arguments go to the family's own loader or exporter (``strict``,
``mesh``, field overrides such as ``head="classification"``...: see each family's docstring).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable

__all__ = ["HFFamily", "from_pretrained", "hf_model_types", "register_hf_family", "save_pretrained"]


@dataclasses.dataclass(frozen=True)
class HFFamily:
    """A family's two directions: ``load(path, config, **kw) -> (module, variables)`` and
    ``save(module, variables, path, **kw) -> path``; ``module_type`` is the Linen class it exports."""

    model_types: tuple[str, ...]
    module_type: type
    load: Callable[..., tuple[Any, Any]]
    save: Callable[..., pathlib.Path]


_BY_MODEL_TYPE: dict[str, HFFamily] = {}
_FAMILIES: list[HFFamily] = []


def register_hf_family(model_types: tuple[str, ...] | str, *, module_type: type,
                       load: Callable[..., tuple[Any, Any]], save: Callable[..., pathlib.Path]) -> HFFamily:
    """Registers a family under each ``config.json`` ``model_type`` it reads (a type registered twice
    is an error: one loader per model_type)."""
    model_types = (model_types,) if isinstance(model_types, str) else tuple(model_types)
    family = HFFamily(model_types, module_type, load, save)
    taken = [t for t in model_types if t in _BY_MODEL_TYPE]
    if taken:
        raise ValueError(f"model_type(s) {taken} already have a Hugging Face loader")
    _BY_MODEL_TYPE.update(dict.fromkeys(model_types, family))
    _FAMILIES.append(family)
    return family


def hf_model_types() -> list[str]:
    """Every ``config.json`` ``model_type`` that ``from_pretrained`` reads."""
    from jaxformers.registry import _ensure_models_imported

    _ensure_models_imported()
    return sorted(_BY_MODEL_TYPE)


def _read_config(path: pathlib.Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}: expected a Hugging Face model directory "
                                f"(config.json + model.safetensors or pytorch_model.bin)")
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> tuple[Any, Any]:
    """``(module, variables)`` from a Hugging Face model directory, by its ``config.json``'s
    ``model_type``. ``module.apply(variables, input_ids, attention_mask=...)`` returns what the HF class
    of ``architectures`` returns first (e.g. logits for ``*ForCausalLM``)."""
    path = pathlib.Path(path)
    config = _read_config(path)
    model_type = config.get("model_type")
    supported = hf_model_types()
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"{os.fspath(path / 'config.json')}: model_type {model_type!r} has no jaxformers loader; "
                         f"supported model_types: {', '.join(supported)}")
    return _BY_MODEL_TYPE[model_type].load(path, **kwargs)


def save_pretrained(module: Any, variables: Any, path: str | os.PathLike, **kwargs: Any) -> pathlib.Path:
    """Writes ``module`` + ``variables`` as a Hugging Face directory (config.json + model.safetensors)
    that ``transformers`` loads; returns the directory."""
    from jaxformers.registry import _ensure_models_imported

    _ensure_models_imported()
    for family in _FAMILIES:
        if isinstance(module, family.module_type):
            return family.save(module, variables, pathlib.Path(path), **kwargs)
    names = sorted({f.module_type.__name__ for f in _FAMILIES})
    raise TypeError(f"save_pretrained: no Hugging Face exporter for {type(module).__name__}; "
                    f"families with one: {', '.join(names)}")
