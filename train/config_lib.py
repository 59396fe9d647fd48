"""Training configs: loading ``get_config(arg)`` files, command-line overrides, the smoke switch.

A config file is a Python file with ``get_config(arg: str | None) -> ml_collections.ConfigDict``.
On the command line it is named ``path.py`` or ``path.py:arg``; ``arg`` is the config's own
``key=value,key=value`` string (see ``parse_arg``), and ``--config.a.b=value`` overrides any key.

Every config starts from ``base_config()``, so every key the trainer reads exists, and an override
of a key that does not exist is an error that names the nearest valid key (typos never silently
train the default). ``smoke=True`` shrinks any config to a few seconds: a handful of steps, tiny
batches, and the config's own ``smoke_overrides`` (e.g. a one-block model).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import pathlib
from typing import Any, Iterable

import ml_collections

__all__ = ["base_config", "resolve_config", "load_config", "apply_overrides", "parse_arg", "apply_smoke", "flatten", "to_json",
           "ConfigError"]

# Overrides may add new keys only below these (free-form) sections; everything else must exist.
FREE_FORM_SECTIONS = ("model.overrides", "task_args", "smoke_overrides")


class ConfigError(ValueError):
    """A config, config file or override that cannot be used; the message says how to fix it."""


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults. Configs start here and change what they need."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification"
    c.task_args = ml_collections.ConfigDict({"label_smoothing": 0.0})
    c.model = ml_collections.ConfigDict({"name": "vit_tiny_patch16_224", "overrides": ml_collections.ConfigDict()})

    c.input = ml_collections.ConfigDict()
    c.input.source = "embedded"          # "embedded" (ships with a package, offline) or "tfds"
    c.input.dataset = "digits"           # embedded: "digits"; tfds: any prepared tfds name
    c.input.data_dir = ""                # tfds data_dir ("" = tfds default)
    c.input.train_split = "train"
    c.input.eval_split = "test"
    c.input.train_pp = "resize(32)|to_rgb|normalize"
    c.input.eval_pp = "resize(32)|to_rgb|normalize"
    c.input.shuffle_seed = 0
    c.input.num_threads = 2              # grain read threads per host
    c.input.prefetch = 4                 # batches prepared ahead

    c.batch_size = 128                   # global, over all hosts and devices
    c.eval_batch_size = 256
    c.num_train_steps = -1               # -1: derive from num_epochs
    c.num_epochs = 1.0
    c.accumulation_steps = 1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"           # adamw | lamb | sgd
    c.optimizer.learning_rate = 1e-3
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.9           # sgd
    c.optimizer.nesterov = False         # sgd
    c.optimizer.weight_decay = 0.05
    c.optimizer.no_decay_names = ("pos_embed", "cls_token", "dist_token", "relative_position_bias_table",
                                  "rel_pos", "absolute_pos_embed")
    c.optimizer.grad_clip_norm = 1.0     # 0 or negative: no clipping

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"           # cosine | linear | constant | multistep
    c.schedule.warmup_steps = 0
    c.schedule.warmup_fraction = 0.0    # used when warmup_steps == 0
    c.schedule.end_factor = 0.0          # final lr = learning_rate * end_factor
    c.schedule.milestones = ()           # multistep: fractions of the run where the rate is multiplied by gamma
    c.schedule.gamma = 0.1               # multistep (MultiStepLR's default)

    c.ema_decay = 0.0                    # 0: no EMA of weights
    c.compute_dtype = "float32"          # float32 | bfloat16 (parameters stay float32)
    c.remat = False

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = "default"         # default | fsdp

    c.log_every_steps = 50
    c.eval_every_steps = 500             # also evaluates after the last step
    c.checkpoint_every_steps = 500       # also saves after the last step
    c.keep_checkpoints = 3
    c.keep_best_checkpoints = 1
    c.best_metric = "eval/accuracy"
    c.best_mode = "max"
    c.async_checkpointing = True
    c.max_nonfinite_steps = 10           # stop after this many non-finite steps in a row
    c.progress_bar = True

    c.smoke = False
    c.smoke_overrides = ml_collections.ConfigDict()

    c.debug = ml_collections.ConfigDict()
    c.debug.nan_grad_step = -1           # fault injection: NaN gradient in update N (1-based) ...
    c.debug.nan_grad_count = 1           # ... and the following count-1 steps
    c.debug.nan_grad_param = ""          # ... in parameters whose path contains this ("" = all)
    c.debug.kill_at_step = -1            # fault injection: SIGKILL ourselves after this step
    return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a config file's ``:arg`` string ``"a=1,b=x,flag"`` against typed ``defaults``.

    A bare name means ``name=True``. Unknown names are an error listing the valid ones."""
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r} in {arg!r}{_suggest(key, defaults)}; "
                              f"valid: {sorted(defaults)}")
        out[key] = _parse_value(raw.strip(), defaults[key], key) if eq else True
    return out


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path.py`` or ``path.py:arg`` -> the file's ``get_config(arg)``."""
    if ".py:" in spec:
        path, arg = spec.split(".py:", 1)
        path += ".py"
    else:
        path, arg = spec, ""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: no config file {str(file)!r}")
    mod_spec = importlib.util.spec_from_file_location(f"_train_config_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {file} defines no get_config(arg)")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config: {file}'s get_config returned {type(config).__name__}, not a ConfigDict")
    return config


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """``{"optimizer.learning_rate": 1e-3, ...}`` for every leaf key."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if not close:  # a typo in the last component of a dotted key
        tail = key.rsplit(".", 1)[-1]
        close = [v for v in valid if v.rsplit(".", 1)[-1] in difflib.get_close_matches(
            tail, [x.rsplit(".", 1)[-1] for x in valid], n=1, cutoff=0.6)][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def _parse_value(raw: str, current: Any, key: str) -> Any:
    """``raw`` as the type of the key's current value (bool/int/float/str/tuple), else a literal."""
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key {key!r} is a bool; got {raw!r}")
    if isinstance(current, str):
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        return ast.literal_eval(raw) if quoted else raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if current is None or isinstance(current, str):
            return raw
        raise ConfigError(f"config key {key!r} expects a {type(current).__name__}; got {raw!r}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        value = type(current)(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"config key {key!r} expects a {type(current).__name__}; got {raw!r}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies ``["a.b=value", ...]`` in order. A key that does not exist raises ``ConfigError``
    naming the nearest valid key, except under the free-form sections (model overrides, ...)."""
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    for item in overrides:
        key, eq, raw = item.partition("=")
        key = key.strip().removeprefix("config.")
        if not eq:
            raise ConfigError(f"override {item!r} must look like --config.{key}=VALUE")
        flat = flatten(config)
        free = any(key.startswith(s + ".") for s in FREE_FORM_SECTIONS)
        if key not in flat and not free:
            parents = {k.rsplit(".", 1)[0] for k in flat if "." in k}
            if key in parents:
                raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. "
                                  f"{sorted(k for k in flat if k.startswith(key + '.'))[:5]}")
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, flat)}")
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in parent.split(".") if parent else []:
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        node[leaf] = _parse_value(raw.strip(), flat.get(key), key) if key in flat else _literal(raw.strip())
    return config


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config with ``smoke=True`` to seconds: few steps, tiny batches, plus the config's
    ``smoke_overrides`` (nested like the config, e.g. ``{"model": {"overrides": {"depth": 1}}}``). No-op otherwise."""
    if not config.get("smoke"):
        return config
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    config.num_train_steps = min(config.num_train_steps, 6) if config.num_train_steps > 0 else 6
    config.batch_size = 16
    config.eval_batch_size = 16
    config.accumulation_steps = 1
    config.log_every_steps = 2
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    config.schedule.warmup_steps = 1
    config.input.num_threads = 1
    config.input.prefetch = 1
    smoke = flatten(config.smoke_overrides) if len(config.smoke_overrides) else {}
    return apply_overrides(config, [f"{k}={v!r}" for k, v in smoke.items()])


def resolve_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """``--config spec`` + ``--config.*`` overrides -> the final config.

    Order: the file's ``get_config(arg)``; the ``smoke`` override if given; the smoke shrinking;
    then every other override, so an explicit override always wins over what smoke sets."""
    overrides = list(overrides)
    is_smoke = lambda o: o.partition("=")[0].strip().removeprefix("config.") == "smoke"  # noqa: E731
    config = load_config(spec)
    config = apply_overrides(config, [o for o in overrides if is_smoke(o)])
    config = apply_smoke(config)
    return apply_overrides(config, [o for o in overrides if not is_smoke(o)])


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (tuples as lists)."""
    return json.dumps(_plain(config.to_dict()), indent=2, sort_keys=True, default=repr)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if dataclasses.is_dataclass(x):
        return repr(x)
    return x
