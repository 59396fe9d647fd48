"""Official PyTorch checkpoints -> jaxformers variables.

``read_checkpoint`` loads tensors without unpickling code (``torch.load(weights_only=True)``,
safetensors, npz). A converter is ``fn(sd: StateDict, model, expected) -> {"params/a/b": array}``
(registered as ``ModelInfo.converter``); ``load_pretrained`` checks every key and shape.
"""
from jaxformers.convert.common import (MissingKeyError, StateDict, conv2d, dense_params, fit_pos_embed, heads_in,
                                       heads_out, linear, norm_params, qkv_fused, read_checkpoint, timm_block)
from jaxformers.convert.pretrained import CheckpointMismatchError, load_pretrained

__all__ = ["CheckpointMismatchError", "MissingKeyError", "StateDict", "conv2d", "fit_pos_embed", "heads_in", "heads_out", "linear", "qkv_fused", "read_checkpoint", "dense_params", "norm_params", "timm_block",
           "load_pretrained"]
