"""Model files, one per paper. Importing this package registers every model in it.

A model file that fails to import is reported with a warning (its models are then missing from
the registry) rather than breaking every other model; the test suite imports each file strictly.
"""
import importlib
import pkgutil
import warnings

MODEL_MODULES = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))

for _name in MODEL_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except Exception as _e:  # noqa: BLE001
        warnings.warn(f"jaxformers.models.{_name} failed to import ({type(_e).__name__}: {_e}); "
                      f"its models are not registered", RuntimeWarning, stacklevel=1)
