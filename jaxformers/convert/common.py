"""Checkpoint readers and writers and the tensor layout helpers every converter shares."""
from __future__ import annotations

import difflib
import json
import os
import pathlib
from typing import Any, Iterable, Mapping

import numpy as np

from jaxformers.layers.pos_embed import resample_abs_pos_embed

_NESTED_KEYS = ("model", "state_dict", "model_state", "module")


def _to_numpy(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    import torch

    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


def read_checkpoint(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
    """Tensors of a checkpoint as ``{key: numpy array}``; never unpickles code.

    ``.pth`` / ``.pt`` / ``.bin``: ``torch.load(weights_only=True)``; ``.safetensors``; ``.npz``.
    A state dict nested under ``model`` / ``state_dict`` is unwrapped, or under ``key`` when given
    (e.g. ``"state_dict_ema"`` for the EMA weights that CSWin and timm training scripts save), and a
    ``module.`` prefix dropped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.numpy import load_file

        sd = load_file(path)
    elif ext == ".npz":
        with np.load(path, allow_pickle=False) as z:
            sd = {k: z[k] for k in z.files}
    elif ext in (".pth", ".pt", ".bin", ".ckpt"):
        import torch

        sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unsupported checkpoint type {ext!r} ({path}); expected .pth, .pt, .bin, "
                         f".safetensors or .npz")
    if key is not None:
        if not isinstance(sd, Mapping) or not isinstance(sd.get(key), Mapping):
            found = sorted(k for k, v in sd.items() if isinstance(v, Mapping)) if isinstance(sd, Mapping) else []
            raise KeyError(f"{path} has no state dict under {key!r}; nested state dicts found: {found}")
        sd = sd[key]
    else:
        for nested in _NESTED_KEYS:
            if isinstance(sd, Mapping) and isinstance(sd.get(nested), Mapping):
                sd = sd[nested]
                break
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    out = {}
    for k, v in sd.items():
        if not hasattr(v, "shape"):
            continue  # e.g. an epoch counter
        out[k[len("module."):] if k.startswith("module.") else k] = _to_numpy(v)
    return out


class MissingKeyError(KeyError):
    """A converter asked for a key the checkpoint lacks."""


class StateDict:
    """A checkpoint's tensors that remembers which keys a converter used, so that unused
    (unexpected) keys can be reported by name."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._tensors = dict(tensors)
        self._used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._tensors:
            close = difflib.get_close_matches(key, list(self._tensors), n=3)
            raise MissingKeyError(f"checkpoint has no key {key!r}" + (f"; close: {close}" if close else ""))
        self._used.add(key)
        return self._tensors[key]

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def skip(self, *keys: str) -> None:
        """Mark keys as deliberately unused (e.g. buffers we recompute)."""
        self._used.update(k for k in keys if k in self._tensors)

    def unused(self) -> list[str]:
        return sorted(set(self._tensors) - self._used)


def write_hf_directory(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                       config: Mapping[str, Any], tokenizer: Any = None) -> pathlib.Path:
    """A Hugging Face model directory ``transformers`` loads: ``model.safetensors`` (``tensors`` as float32
    under their HF key names), ``config.json`` (sorted keys) and, when given, ``tokenizer`` (a
    ``jaxformers.text.Tokenizer``) beside them."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in items}
    save_file(arrays, os.fspath(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return np.ascontiguousarray(w.T)


def conv2d(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (out, in/groups, kh, kw) -> Flax Conv kernel (kh, kw, in/groups, out)."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def qkv_fused(w: np.ndarray, num_heads: int, parts: int = 3) -> np.ndarray:
    """A fused torch projection (parts*H*D, E) [or bias (parts*H*D,)] -> (E, parts, H, D) [(parts, H, D)]."""
    if w.ndim == 1:
        return w.reshape(parts, num_heads, -1)
    return np.ascontiguousarray(w.reshape(parts, num_heads, -1, w.shape[1]).transpose(3, 0, 1, 2))


def heads_in(w: np.ndarray, num_heads: int) -> np.ndarray:
    """torch Linear (H*D, E) [bias (H*D,)] -> DenseGeneral kernel (E, H, D) [bias (H, D)]."""
    if w.ndim == 1:
        return w.reshape(num_heads, -1)
    return np.ascontiguousarray(w.reshape(num_heads, -1, w.shape[1]).transpose(2, 0, 1))


def heads_out(w: np.ndarray, num_heads: int) -> np.ndarray:
    """torch Linear (E, H*D) -> DenseGeneral kernel over (heads, head_dim): (H, D, E)."""
    return np.ascontiguousarray(w.T.reshape(num_heads, -1, w.shape[0]))


def fit_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int], num_prefix_tokens: int,
                  old_grid: tuple[int, int] | None = None) -> np.ndarray:
    """A (1, prefix + h*w, D) table resampled to ``new_grid`` when its grid differs."""
    if pos_embed.shape[1] == num_prefix_tokens + new_grid[0] * new_grid[1] and old_grid in (None, new_grid):
        return pos_embed
    return np.asarray(resample_abs_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens))


def norm_params(sd: StateDict, t: str, o: str) -> dict[str, np.ndarray]:
    """torch LayerNorm / affine norm at key prefix ``t`` -> our ``o/scale`` and ``o/bias``."""
    return {o + "/scale": sd[t + ".weight"], o + "/bias": sd[t + ".bias"]}


def batch_norm_params(sd: StateDict, t: str, o: str) -> dict[str, np.ndarray]:
    """torch BatchNorm at key prefix ``t`` -> our ``params/o/{scale,bias}`` and ``batch_stats/o/{mean,var}``
    (``num_batches_tracked`` is skipped: Flax's BatchNorm uses a fixed momentum)."""
    sd.skip(t + ".num_batches_tracked")
    return {f"params/{o}/scale": sd[t + ".weight"], f"params/{o}/bias": sd[t + ".bias"],
            f"batch_stats/{o}/mean": sd[t + ".running_mean"], f"batch_stats/{o}/var": sd[t + ".running_var"]}


def dense_params(sd: StateDict, t: str, o: str) -> dict[str, np.ndarray]:
    """torch Linear at key prefix ``t`` -> our Dense ``o/kernel`` (and ``o/bias`` when present)."""
    out = {o + "/kernel": linear(sd[t + ".weight"])}
    if t + ".bias" in sd:
        out[o + "/bias"] = sd[t + ".bias"]
    return out


def timm_block(sd: StateDict, t: str, o: str, num_heads: int) -> dict[str, np.ndarray]:
    """timm ``vision_transformer.Block`` at key prefix ``t`` (e.g. ``"blocks.0."``) -> our
    ``TransformerBlock`` at ``o`` (e.g. ``"params/blocks_0/"``), LayerScale included when present."""
    out = {**norm_params(sd, t + "norm1", o + "norm1"), **norm_params(sd, t + "norm2", o + "norm2"),
           **dense_params(sd, t + "mlp.fc1", o + "mlp/fc1"), **dense_params(sd, t + "mlp.fc2", o + "mlp/fc2"),
           o + "attn/qkv/kernel": qkv_fused(sd[t + "attn.qkv.weight"], num_heads),
           **dense_params(sd, t + "attn.proj", o + "attn/proj")}
    out[o + "attn/proj/kernel"] = heads_out(sd[t + "attn.proj.weight"], num_heads)
    if t + "attn.qkv.bias" in sd:
        out[o + "attn/qkv/bias"] = qkv_fused(sd[t + "attn.qkv.bias"], num_heads)
    for ls in ("ls1", "ls2"):
        if f"{t}{ls}.gamma" in sd:
            out[f"{o}{ls}/gamma"] = sd[f"{t}{ls}.gamma"]
    return out
