"""BCT: blockwise post-training compression of a whole transformer, without retraining (scheme ``"bct"``).

Paper: "Blockwise Compression of Transformer-based Models without Retraining", Gaochen Dong and Wei
Chen, arXiv 2304.01483 (2023; precursor BBCT, arXiv 2303.09184). No official code exists.

What the paper states (abstract, verified): compression is blockwise rather than layerwise, which
limits the distribution shift that quantisation causes so that no retraining is needed; it covers
every part of the model, including the embedding, the matrix multiplications, GELU, Softmax,
LayerNorm and all intermediate results; up to 7.988x compression, < 0.9% accuracy drop on most
GLUE tasks. **The paper's full text (block shapes, bit allocation, its integer approximations of
the nonlinear operations) could not be read from this project's environment**, so every
parameter below is this implementation's choice, not a reproduction of a stated value:

- Block = ``block_size`` (default 64) consecutive entries along the axis a matmul contracts: for a
  kernel, the input features of one output channel (a fused q/k/v kernel and a multi-head output
  projection contract over all their input dims); for an embedding table, the features of one row;
  for activations, the last axis (features, or the keys of an attention score row). Each block has
  its own symmetric absmax scale, so one outlier only coarsens its own block (the "finer than
  layerwise" granularity). A dimension not a multiple of the block is zero-padded.
- Weights (every Dense / DenseGeneral / Conv kernel, every embedding table, LayerNorm scales):
  ``weight_bits`` (default 8; 4 packs two codes per byte) with one float16 scale per block, stored
  so: 8-bit weights give ~3.9x, 4-bit ~7.5x on the kernels (32 / (bits + 16 / block_size)).
  Biases and LayerNorm offsets stay float32 (< 0.1% of a BERT's parameters).
- Activations and intermediate results: ``act_bits`` (8) dynamic blockwise grids computed per
  forward pass (no calibration, "without retraining"), at the places the W8A8 simulation of
  ``jaxformers.compress.w8a8`` quantises (every Dense output, q/k/v, the attention context,
  residual sums, the embedding sum), plus the nonlinearities: Softmax input (the scores) and
  output (probabilities on an unsigned grid, ``softmax_bits``), GELU output (the FFN activation),
  LayerNorm input and output. The nonlinear ops run in float on quantised inputs (the paper's
  integer kernels for them are not reproduced).
- The task head (``keep_float``) stays float, as for the other schemes; pass ``keep_float="$^"``
  to compress it too. A tied embedding is compressed like any table (the head reads it back).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxformers.compress.ops import round_ste
from jaxformers.compress.quantize import DEFAULT_KEEP_FLOAT, QuantizedModel, as_call, register_scheme
from jaxformers.compress.w8a8 import _WEIGHT_LEAF, _Quantizers, _run


@dataclasses.dataclass(frozen=True)
class BCTConfig:
    block_size: int = 64
    weight_bits: int = 8
    act_bits: int = 8
    softmax_bits: int = 8
    keep_float: str = DEFAULT_KEEP_FLOAT


def blockwise_fake_quant(x: jax.Array, bits: int, block: int, *, unsigned: bool = False) -> jax.Array:
    """x on a symmetric (``unsigned``: [0, max]) grid of ``bits`` with one absmax scale per block of
    ``block`` entries along the last axis; straight-through rounding, float32 out."""
    x = x.astype(jnp.float32)
    n = x.shape[-1]
    pad = (-n) % block
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x
    xb = xp.reshape(xp.shape[:-1] + ((n + pad) // block, block))
    levels = 2.0 ** bits - 1 if unsigned else 2.0 ** (bits - 1) - 1
    scale = jnp.max(jnp.abs(xb), axis=-1, keepdims=True) / levels
    scale = jnp.where(scale > 0, scale, 1.0)
    lo = 0.0 if unsigned else -levels
    q = jnp.clip(round_ste(xb / scale), lo, levels) * scale
    return q.reshape(xp.shape)[..., :n]


def _matrix(w: np.ndarray, kind: type, contract: int) -> np.ndarray:
    """The weight as (K, N): blocks run along K, the axis a matmul (or lookup) reduces."""
    if issubclass(kind, nn.Embed):
        return w.T  # (features, rows): blocks along each row's features
    return w.reshape(int(np.prod(w.shape[:contract])), -1)


def quantize_blockwise(m: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) of a (K, N) matrix, blocks of ``block`` along K: codes int8 (K_pad, N), or for
    ``bits`` <= 4 two codes per uint8 (K_pad / 2, N); scales float16 (K_pad / block, N)."""
    k, n = m.shape
    pad = (-k) % block
    mp = np.pad(np.asarray(m, np.float32), [(0, pad), (0, 0)])
    blocks = mp.reshape(-1, block, n)
    levels = 2 ** (bits - 1) - 1
    scale = (np.abs(blocks).max(axis=1) / levels).astype(np.float16)
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)
    codes = np.clip(np.round(blocks / safe[:, None]), -levels, levels).astype(np.int8).reshape(-1, n)
    if bits <= 4:
        nibbles = (codes & 0x0F).astype(np.uint8)
        codes = nibbles[0::2] | (nibbles[1::2] << 4)
    return codes, scale


def dequantize_blockwise(codes: jax.Array, scale: jax.Array, k: int, bits: int, block: int) -> jax.Array:
    """The float (K, N) matrix back from ``quantize_blockwise``'s codes and scales."""
    if bits <= 4:
        low = (codes & 0x0F).astype(jnp.int8)
        high = (codes >> 4).astype(jnp.int8)
        low, high = jnp.where(low > 7, low - 16, low), jnp.where(high > 7, high - 16, high)
        codes = jnp.stack([low, high], axis=1).reshape(-1, codes.shape[-1])
    n = codes.shape[-1]
    values = codes.astype(jnp.float32).reshape(-1, block, n) * scale.astype(jnp.float32)[:, None, :]
    return values.reshape(-1, n)[:k]


def quantize_bct(module: nn.Module, variables: Any, *, calibration: list, block_size: int = 64, weight_bits: int = 8,
                 act_bits: int = 8, softmax_bits: int = 8, keep_float: str = DEFAULT_KEEP_FLOAT,
                 example: Any = None) -> tuple[QuantizedModel, dict]:
    """The ``"bct"`` scheme (see the module docstring). No calibration is needed (activation grids are
    dynamic); one batch (``calibration[0]`` or ``example``, else the module's ``example_inputs``) is
    traced to find the layers."""
    for name, bits in (("weight_bits", weight_bits), ("act_bits", act_bits), ("softmax_bits", softmax_bits)):
        if not 2 <= bits <= 8:
            raise ValueError(f"bct: {name} must be in [2, 8], got {bits}")
    if block_size < 2 or block_size % 2:
        raise ValueError(f"bct: block_size must be an even number >= 2, got {block_size}")
    config = BCTConfig(block_size, weight_bits, act_bits, softmax_bits, keep_float)
    variables = nn.unbox(dict(variables))
    if hasattr(module, "attention_impl") and module.attention_impl != "xla":
        module = module.clone(attention_impl="xla")
    batch = calibration[0] if calibration else example
    if batch is None:
        if not hasattr(module, "example_inputs"):
            raise ValueError("bct: pass calibration=[batch] or example=batch so the model can be traced once")
        batch = tuple(module.example_inputs(1))
    args, kwargs = as_call(batch)
    observer = _Quantizers("observe", config)
    jax.eval_shape(lambda v: _run(module, v, observer, args, kwargs), variables)

    params = flatten_dict(variables["params"], sep="/")
    keep = re.compile(keep_float)
    layout: dict[str, tuple[tuple[int, ...], type, int]] = {}
    scales: dict[str, jax.Array] = {}
    for path, (kind, _, _) in observer.modules.items():
        leaf = next((_WEIGHT_LEAF[t] for t in _WEIGHT_LEAF if issubclass(kind, t)), None)
        key = f"{path}/{leaf}" if path else leaf
        if leaf is None or keep.fullmatch(path) or key not in params:
            continue
        w = np.asarray(params[key], np.float32)
        # a convolution contracts (kh, kw, in); an attention output projection (heads, head_dim)
        multi = issubclass(kind, nn.Conv) or (issubclass(kind, nn.DenseGeneral) and path.split("/")[-1] == "proj")
        contract = w.ndim - 1 if multi else 1
        codes, scale = quantize_blockwise(_matrix(w, kind, contract), weight_bits, block_size)
        layout[key] = (w.shape, kind, contract)
        params[key], scales[key] = jnp.asarray(codes), jnp.asarray(scale)

    def dequantize(qparams, scales):
        flat = flatten_dict(qparams, sep="/")
        for key, (shape, kind, contract) in layout.items():
            if issubclass(kind, nn.Embed):
                m = dequantize_blockwise(flat[key], scales[key], shape[1], weight_bits, block_size)
                flat[key] = m.T
            else:
                m = dequantize_blockwise(flat[key], scales[key], int(math.prod(shape[:contract])), weight_bits,
                                         block_size)
                flat[key] = m.reshape(shape)
        return unflatten_dict(flat, sep="/")

    def act(name: str, x: jax.Array) -> jax.Array:
        if name.endswith(":probs"):
            return blockwise_fake_quant(x, softmax_bits, block_size, unsigned=True).astype(x.dtype)
        return blockwise_fake_quant(x, act_bits, block_size).astype(x.dtype)

    def run(qvariables, *args, **kwargs):
        rest = {k: v for k, v in qvariables.items() if k != "bct_scale"}
        rest["params"] = dequantize(rest["params"], qvariables["bct_scale"])
        return _run(module, rest, _Quantizers("apply", config, act_fn=act), args, kwargs)

    qvariables = {**{k: v for k, v in variables.items() if k != "params"},
                  "params": unflatten_dict(params, sep="/"), "bct_scale": scales}
    return QuantizedModel(module, "bct", run, original=module), qvariables


register_scheme("bct", quantize_bct, needs_calibration=False,
                description="BCT (Dong & Chen 2023): blockwise post-training compression of weights (int8/int4 with a "
                            "float16 scale per block), activations, Softmax, GELU and LayerNorm, no retraining")
