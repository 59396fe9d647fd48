"""``load_pretrained``: an official checkpoint -> checked jaxformers variables."""
from __future__ import annotations

import os
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxformers.convert.common import MissingKeyError, StateDict, read_checkpoint


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model: missing, unexpected or wrongly shaped keys, by name."""


def _describe(title: str, items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {', '.join(items[:limit])}{more}"


def flat_variables(variables: Any) -> dict[str, Any]:
    """``{"params/a/b": leaf}`` of (possibly logically boxed) variables: arrays, or the
    ``ShapeDtypeStruct`` leaves of an abstract init (what a checkpoint is checked against)."""
    return {"/".join(k): v for k, v in flatten_dict(nn.unbox(dict(variables))).items()}


def checkpoint_problems(expected: dict[str, Any], converted: dict[str, Any],
                        unexpected: list[str]) -> tuple[list[str], list[str]]:
    """The keys of ``converted`` whose shape differs from ``expected``, and one line per kind of
    problem (missing, mis-shaped, unexpected checkpoint keys), each naming the keys."""
    missing = sorted(set(expected) - set(converted))
    wrong = sorted(k for k in set(expected) & set(converted)
                   if tuple(np.shape(converted[k])) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(_describe("missing in the checkpoint", missing))
    if wrong:
        problems.append(_describe("shape mismatch", [f"{k} {np.shape(converted[k])} vs expected "
                                                     f"{expected[k].shape}" for k in wrong]))
    if unexpected:
        problems.append(_describe("unexpected checkpoint keys", unexpected))
    return wrong, problems


def assemble_variables(expected: dict[str, Any], converted: dict[str, Any], wrong: list[str], init_fresh,
                       boxed: Any, mesh: Any = None, rules: Any = None) -> dict[str, Any]:
    """Nested variables: the converted values that fit (cast to the expected dtypes), the rest from
    ``init_fresh()`` (called only when something is missing); placed in their logical shardings on
    ``mesh`` when given."""
    flat = {k: jnp.asarray(converted[k], dtype=expected[k].dtype) for k in expected
            if k in converted and k not in wrong}
    if len(flat) < len(expected):
        fresh = flat_variables(init_fresh())
        flat.update({k: fresh[k] for k in expected if k not in flat})
    variables = unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    if mesh is not None:
        from jaxformers.sharding import DEFAULT_RULES, logical_shardings

        variables = jax.device_put(variables, logical_shardings(boxed, mesh, rules or DEFAULT_RULES))
    return variables


def load_pretrained(
    name: str,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    checkpoint_key: str | None = None,
    mesh: Any = None,
    rules: Any = None,
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Read an official checkpoint for model ``name`` and return its variables.

    The architecture's converter maps the checkpoint's keys to ours; every shape is checked.
    Position tables are resampled when ``img_size`` differs from the checkpoint's. With
    ``strict=True`` any missing, unexpected or mis-shaped key raises ``CheckpointMismatchError``
    naming them. With ``strict=False`` unexpected keys are ignored and missing or mis-shaped ones
    (e.g. a new classifier head for another ``num_classes``) are freshly initialised, with a warning.
    ``checkpoint_key`` picks a nested state dict (e.g. ``"state_dict_ema"``); by default ``model`` or
    ``state_dict``. With ``mesh`` the variables are placed in their logical shardings.
    """
    from jaxformers.registry import create_model, init_abstract, model_info

    info = model_info(name)
    if info.converter is None:
        raise NotImplementedError(f"{name}: no checkpoint converter is registered for this architecture")
    model = create_model(name, **overrides)
    boxed = init_abstract(model)
    expected = flat_variables(boxed)
    sd = StateDict(read_checkpoint(path, checkpoint_key))
    try:
        converted = info.converter(sd, model, {k: v.shape for k, v in expected.items()})
    except MissingKeyError as e:
        raise CheckpointMismatchError(f"{name}: checkpoint {os.fspath(path)} does not fit the model: "
                                      f"{e.args[0]}") from None

    wrong, problems = checkpoint_problems(expected, converted, sd.unused())
    extra_out = sorted(set(converted) - set(expected))
    if extra_out:
        problems.append(_describe("converter produced unknown variables", extra_out))
    if problems and strict:
        raise CheckpointMismatchError(f"{name}: checkpoint {os.fspath(path)} does not fit the model.\n  "
                                      + "\n  ".join(problems))
    if problems:
        warnings.warn(f"{name}: " + "; ".join(problems) + " -- freshly initialised where missing",
                      stacklevel=2)

    def init_fresh():
        from jaxformers.registry import example_inputs

        return model.init({"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)},
                          *example_inputs(model), train=False)

    return assemble_variables(expected, converted, wrong, init_fresh, boxed, mesh, rules)
