"""jaxformers: transformer architectures from recent papers as pure-function Flax Linen modules."""
from jaxformers.convert import load_pretrained
from jaxformers.hf import from_pretrained, save_pretrained
from jaxformers.registry import ModelInfo, count_params, create_model, list_models, model_info, register_model

__version__ = "0.1.0"

__all__ = ["ModelInfo", "count_params", "create_model", "from_pretrained", "list_models", "load_pretrained",
           "model_info", "register_model", "save_pretrained", "__version__"]
