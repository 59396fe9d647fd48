"""Mamba: a language model of selective state-space layers (no attention).

Paper: "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", Gu & Dao, 2023,
arXiv 2312.00752. Official code: state-spaces/mamba (``mamba_ssm/modules/mamba_simple.py``,
``models/mixer_seq_simple.py``); released checkpoints state-spaces/mamba-{130m,370m,790m,1.4b,2.8b}
and their Hugging Face ports ``state-spaces/mamba-*-hf`` (transformers ``MambaForCausalLM``).

Architecture: token embedding -> N x [x + Mixer(RMSNorm(x))] -> RMSNorm -> LM head tied to the
embedding. The mixer projects the width D to 2·E (E = expand·D), runs a depthwise causal conv, SiLU
and the selective scan on one half, gates it with SiLU of the other half, and projects back
(``jaxformers.layers.ssm``). The scan runs as ``jax.lax.associative_scan`` (``scan="associative"``,
parallel over the length, for training), chunk by chunk (``"chunked"``: bounded memory for long
sequences) or step by step (``"sequential"``); a call with ``cache=`` continues from a
``MambaCache`` (conv + SSM state per layer), and a one-token call is the recurrent step used by
``generate``. All three and the cached step-by-step path give the same logits (tests).

Parameters keep the official layout and initialisation: ``in_proj`` (D -> 2E, stored as (D, 2, E) so
tensor parallelism splits x and z alike), ``conv1d`` (K, E), ``x_proj`` (E -> R + 2N), ``dt_proj``
(R -> E, uniform ±R^-½ weights, bias = softplus⁻¹ of a log-uniform Δ in [1e-3, 0.1]), ``A_log``
= log(1..N), ``D`` = 1, ``out_proj`` (PyTorch default init divided by sqrt(n_layer): the official
``rescale_prenorm_residual``), embedding N(0, 0.02). Hugging Face directories load and save through
``jaxformers.from_pretrained`` / ``save_pretrained`` (model_type ``mamba``); the official
``pytorch_model.bin`` directories (``d_model`` / ``n_layer`` configs) load through
``jaxformers.models.mamba.from_pretrained``.

Deviations: none in the computation. The residual stream is float32 when ``residual_in_fp32``
(default, as released) whatever ``dtype`` is. Padding: ``attention_mask`` zeros padded positions
before the input projection and after the convolution, as transformers does (left padding then
gives a padded sequence the same outputs as the unpadded one).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.hf import register_hf_family
from jaxformers.layers.checks import check_token_ids
from jaxformers.layers.drop import DropPath
from jaxformers.layers.linear import logical
from jaxformers.layers.norm import RMSNorm
from jaxformers.layers.ssm import SSMState, ScanMethod, init_ssm_state, ssm_branch, torch_linear_init
from jaxformers.models import mamba_convert
from jaxformers.models.gpt import sample_logits
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

__all__ = ["Mamba", "MambaBlock", "MambaCache", "MambaMixer", "from_pretrained", "generate", "save_pretrained"]


class MambaCache(NamedTuple):
    """The decoding state of a whole model: one ``SSMState`` (conv inputs, scan state) per layer, and
    ``index``, the number of tokens consumed so far. A pytree (jit argument, ``lax.scan`` carry)."""

    layers: tuple[SSMState, ...]
    index: jax.Array


@dataclasses.dataclass(frozen=True)
class _MixerConfig:
    state_size: int
    expand: int
    conv_kernel: int
    time_step_rank: int
    use_bias: bool
    use_conv_bias: bool
    time_step_min: float
    time_step_max: float
    time_step_floor: float
    time_step_scale: float
    time_step_init_scheme: str
    out_proj_scale: float  # the official rescale: 1/sqrt(n_layer) on the PyTorch default init
    scan: str
    chunk_size: int


class MambaMixer(nn.Module):
    """Mamba's selective-SSM mixer: (B, L, D) -> (B, L, D), and the updated ``SSMState``.

    ``bidirectional`` (Vision Mamba's "v2" mixer): a second branch with its own ``conv1d_b``,
    ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b`` reads the reversed sequence (x and z reversed);
    its output is reversed back and added, then halved when ``divide_output``; ``in_proj`` and
    ``out_proj`` are shared. A bidirectional mixer has no decoding state."""

    config: _MixerConfig
    bidirectional: bool = False
    divide_output: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, state: SSMState | None = None, mask: jax.Array | None = None):
        c = self.config
        d = x.shape[-1]
        e = c.expand * d
        if self.bidirectional and (state is not None or mask is not None):
            raise ValueError("a bidirectional mixer reads the whole sequence: no decoding state or padding mask")
        if mask is not None:
            x = x * mask[..., None].astype(x.dtype)
        xz = nn.DenseGeneral((2, e), use_bias=c.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=logical(torch_linear_init(), ("embed", None, "mlp")),
                             bias_init=logical(nn.initializers.zeros_init(), (None, "mlp")), name="in_proj")(x)
        xz = constrain(xz, ("act_batch", "act_len", None, "act_mlp"))
        branch = dict(state_size=c.state_size, dt_rank=c.time_step_rank, conv_kernel=c.conv_kernel,
                      use_conv_bias=c.use_conv_bias, dt_min=c.time_step_min, dt_max=c.time_step_max,
                      dt_floor=c.time_step_floor, dt_scale=c.time_step_scale, dt_init=c.time_step_init_scheme,
                      scan=c.scan, chunk_size=c.chunk_size)
        y, state = ssm_branch(self, xz[..., 0, :], xz[..., 1, :], state=state, mask=mask, **branch)
        if self.bidirectional:
            back = xz[:, ::-1]
            y_b, _ = ssm_branch(self, back[..., 0, :], back[..., 1, :], state=None, suffix="_b", a_log_name="A_b_log",
                                **branch)
            y = y + y_b[:, ::-1]
            if self.divide_output:
                y = y / 2
        out_init = nn.initializers.variance_scaling(c.out_proj_scale ** 2 / 3, "fan_in", "uniform")
        out = nn.Dense(d, use_bias=c.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=logical(out_init, ("mlp", "embed")),
                       bias_init=logical(nn.initializers.zeros_init(), ("embed",)), name="out_proj")(y)
        return out, state


class MambaBlock(nn.Module):
    """x + DropPath(Mixer(RMSNorm(x))), the residual in float32 when ``residual_in_fp32``."""

    config: _MixerConfig
    epsilon: float = 1e-5
    residual_in_fp32: bool = True
    bidirectional: bool = False
    drop_path: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, state: SSMState | None = None, mask: jax.Array | None = None,
                 train: bool = False):
        h = RMSNorm(self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        h, state = MambaMixer(self.config, self.bidirectional, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="mixer")(h, state, mask)
        h = DropPath(self.drop_path)(h, train=train)
        residual = x.astype(jnp.float32) if self.residual_in_fp32 else x
        x = residual + h.astype(residual.dtype)
        return constrain(x, ("act_batch", "act_len", "act_embed")), state


class Mamba(nn.Module):
    """Mamba causal language model (``MambaForCausalLM``); field names follow transformers'
    ``MambaConfig``. ``__call__(input_ids)`` -> logits (B, L, vocab) in float32; with ``cache`` ->
    ``(logits, cache)`` continued from ``cache`` (see ``init_cache``)."""

    vocab_size: int = 50280
    hidden_size: int = 768
    num_hidden_layers: int = 24
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int | None = None  # None: ceil(hidden_size / 16) ("auto")
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # the embedding's std (official default)
    rescale_prenorm_residual: bool = True
    time_step_min: float = 1e-3
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_scale: float = 1.0
    time_step_init_scheme: str = "random"
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    scan: ScanMethod = "associative"
    chunk_size: int = 256
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        return self.time_step_rank or math.ceil(self.hidden_size / 16)

    def _mixer_config(self) -> _MixerConfig:
        scale = 1.0 / math.sqrt(self.num_hidden_layers) if self.rescale_prenorm_residual else 1.0
        return _MixerConfig(self.state_size, self.expand, self.conv_kernel, self.dt_rank, self.use_bias,
                            self.use_conv_bias, self.time_step_min, self.time_step_max, self.time_step_floor,
                            self.time_step_scale, self.time_step_init_scheme, scale, self.scan, self.chunk_size)

    def example_inputs(self, batch_size: int = 1) -> tuple[jax.Array]:
        return (jnp.zeros((batch_size, 8), jnp.int32),)

    def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> MambaCache:
        """An empty cache (zeros, index 0): the state before the first token. Its size does not grow
        with the sequence: (K-1)·E + E·N numbers per layer and sequence."""
        layer = init_ssm_state(batch_size, self.intermediate_size, self.state_size, self.conv_kernel, dtype)
        return MambaCache(tuple(layer for _ in range(self.num_hidden_layers)), jnp.zeros((), jnp.int32))

    @nn.compact
    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 cache: MambaCache | None = None, train: bool = False, return_hidden: bool = False):
        del train  # no dropout in Mamba
        check_token_ids(input_ids, vocab_size=self.vocab_size)
        if cache is not None:
            if not isinstance(cache, MambaCache) or len(cache.layers) != self.num_hidden_layers:
                raise ValueError(f"cache must be a MambaCache with {self.num_hidden_layers} layers "
                                 f"(model.init_cache(batch)); got {type(cache).__name__}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {input_ids.shape}; got {attention_mask.shape}")
        embed = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=logical(nn.initializers.normal(self.initializer_range), ("vocab", "embed")),
                         name="embeddings")
        x = embed(input_ids)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        config = self._mixer_config()
        block = nn.remat(MambaBlock, static_argnums=(4,)) if self.remat else MambaBlock
        states = []
        for i in range(self.num_hidden_layers):
            x, state = block(config, self.layer_norm_epsilon, self.residual_in_fp32, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=f"layers_{i}")(
                x, None if cache is None else cache.layers[i], attention_mask, False)
            states.append(state)
        x = RMSNorm(self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="norm_f")(x)
        if return_hidden:
            logits = x
        elif self.tie_word_embeddings:
            logits = embed.attend(x.astype(self.dtype or jnp.float32))
        else:
            logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=logical(torch_linear_init(), ("embed", "vocab")), name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        dtype = cache.layers[0].conv.dtype
        states = tuple(SSMState(s.conv.astype(dtype), s.ssm) for s in states)
        return logits, MambaCache(states, cache.index + input_ids.shape[1])


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "do_sample", "top_k", "top_p",
                                             "eos_token_id", "pad_token_id"))
def _generate(module, variables, input_ids, rng, temperature, *, max_new_tokens, do_sample, top_k, top_p,
              eos_token_id, pad_token_id):
    batch, prompt = input_ids.shape
    sample = functools.partial(sample_logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = jnp.concatenate([input_ids.astype(jnp.int32), jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)],
                             axis=1)
    logits, cache = module.apply(variables, input_ids, cache=module.init_cache(batch))

    def body(i, carry):
        tokens, cache, logits, done = carry
        tok = sample(logits, jax.random.fold_in(rng, i))
        if eos_token_id is not None:
            tok = jnp.where(done, pad_token_id, tok)
            done = done | (tok == eos_token_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], prompt + i, axis=1)
        out, cache = module.apply(variables, tok[:, None], cache=cache)
        return tokens, cache, out[:, -1], done

    tokens, *_ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens, cache, logits[:, -1], jnp.zeros((batch,), bool)))
    return tokens


def generate(module: Mamba, variables: Any, input_ids: Any, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, rng: jax.Array | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None) -> jax.Array:
    """``input_ids`` (B, L) followed by ``max_new_tokens`` generated tokens, (B, L + max_new_tokens) int32;
    the options and the sampling (``sample_logits``, step i drawing with ``fold_in(rng, i)``) are those of
    ``jaxformers.models.gpt.generate``. The prompt is read by the parallel scan, then one recurrent step
    per token from the ``MambaCache``: constant memory and time per token whatever the length. One
    jitted program (a ``lax.fori_loop``) per shape and option set."""
    if not isinstance(module, Mamba):
        raise TypeError(f"generate needs a Mamba; got {type(module).__name__}")
    input_ids = jnp.asarray(input_ids)
    check_token_ids(input_ids, vocab_size=module.vocab_size)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if do_sample:
        if rng is None:
            raise ValueError("do_sample=True needs rng (a jax.random.key)")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0 or top_k > module.vocab_size:
            raise ValueError(f"top_k must be in [0, vocab_size={module.vocab_size}], got {top_k}")
    pad = pad_token_id if pad_token_id is not None else (module.pad_token_id or 0)
    return _generate(module, variables, input_ids, jax.random.key(0) if rng is None else rng, jnp.float32(temperature),
                     max_new_tokens=int(max_new_tokens), do_sample=do_sample, top_k=int(top_k), top_p=float(top_p),
                     eos_token_id=eos_token_id, pad_token_id=int(pad))


# ---------------------------------------------------------------------------------------------
# Hugging Face / official directories


def _read_fields(path: pathlib.Path) -> dict[str, Any]:
    from jaxformers.text.hf_config import read_config

    return mamba_convert.fields_from_config(read_config(path), source=os.fspath(path / "config.json"))


def from_pretrained(path, *, strict: bool = True, mesh: Any = None, rules: Any = None,
                    **overrides: Any) -> tuple[Mamba, dict]:
    """``(module, variables)`` from a Hugging Face Mamba directory (``config.json`` with model_type
    mamba + ``model.safetensors`` / ``pytorch_model.bin``) or an official state-spaces one (``d_model``,
    ``n_layer``...). ``overrides`` replace module fields (e.g. ``scan="chunked"``, ``dtype=jnp.bfloat16``).
    With ``mesh`` the variables are placed in their logical shardings."""
    path = pathlib.Path(path)
    fields = _read_fields(path)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Mamba)}
    if unknown:
        raise TypeError(f"unknown Mamba field(s) {sorted(unknown)}")
    module = Mamba(**{**fields, **overrides})
    return module, mamba_convert.load_directory(module, path, strict=strict, mesh=mesh, rules=rules)


def save_pretrained(module: Mamba, variables: Any, path, *, tokenizer: Any = None) -> pathlib.Path:
    """Writes ``config.json`` + ``model.safetensors`` (float32, HF key names) that transformers'
    ``MambaForCausalLM.from_pretrained`` loads; ``tokenizer`` (a ``jaxformers.text.Tokenizer``) beside them."""
    return mamba_convert.save_directory(module, variables, path, tokenizer=tokenizer)


register_hf_family("mamba", module_type=Mamba, load=from_pretrained, save=save_pretrained)


# ---------------------------------------------------------------------------------------------
# Variants: the released checkpoints (vocabulary 50277 padded to a multiple of 8). Parameter counts
# are transformers' MambaForCausalLM with the head tied (= the official MambaLMHeadModel).

VARIANTS = {
    "mamba_130m": dict(hidden_size=768, num_hidden_layers=24),
    "mamba_370m": dict(hidden_size=1024, num_hidden_layers=48),
    "mamba_790m": dict(hidden_size=1536, num_hidden_layers=48),
    "mamba_1_4b": dict(hidden_size=2048, num_hidden_layers=48),
    "mamba_2_8b": dict(hidden_size=2560, num_hidden_layers=64),
}


def _info(params_m: float) -> ModelInfo:
    return ModelInfo(paper="Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arxiv="2312.00752",
                     repo="state-spaces/mamba", input_size=(2048,), params_m=params_m,
                     converter=mamba_convert.convert_mamba)


def _build(name: str, overrides: dict[str, Any]) -> Mamba:
    return Mamba(**{**VARIANTS[name], **overrides})


@register_model(_info(129.135360))
def mamba_130m(**overrides: Any) -> Mamba:
    """state-spaces/mamba-130m(-hf): d_model 768, 24 layers."""
    return _build("mamba_130m", overrides)


@register_model(_info(371.516416))
def mamba_370m(**overrides: Any) -> Mamba:
    """state-spaces/mamba-370m(-hf): d_model 1024, 48 layers."""
    return _build("mamba_370m", overrides)


@register_model(_info(793.204224))
def mamba_790m(**overrides: Any) -> Mamba:
    """state-spaces/mamba-790m(-hf): d_model 1536, 48 layers."""
    return _build("mamba_790m", overrides)


@register_model(_info(1372.178432))
def mamba_1_4b(**overrides: Any) -> Mamba:
    """state-spaces/mamba-1.4b(-hf): d_model 2048, 48 layers."""
    return _build("mamba_1_4b", overrides)


@register_model(_info(2768.345600))
def mamba_2_8b(**overrides: Any) -> Mamba:
    """state-spaces/mamba-2.8b(-hf): d_model 2560, 64 layers."""
    return _build("mamba_2_8b", overrides)
