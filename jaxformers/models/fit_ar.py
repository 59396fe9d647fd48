"""FIT as an autoregressive decoder (the official ``FITAR``), with a cached decoding loop.

Paper: "FIT: Far-reaching Interleaved Transformers", arXiv 2305.12689; official code (TF2):
google-research/pix2seq ``architectures/transformers.py`` ``FITAR`` (used by
``models/image_ar_model.py``). Our own implementation following that code.

The sequence of L = T*N tokens is cut into T consecutive groups of N. Local layers are causal inside
each group; the latents of group t read all of group t, global layers run over the T*M latents with
a chunk-causal mask (a latent sees its own and earlier groups' latents), and group t reads back the
latents of group t-1 (group 0 reads zeros), so no token ever sees its future.

``__call__`` is the teacher-forced forward: the input is the target shifted right by one (first
input ``bos_id``; ``shift_right``), logits (B, L, vocab) predict the targets. ``generate`` samples
token by token with key/value caches: per token only the local layers of the current group run (KV
cache of N positions per layer) plus the x2l reads of the previous group's latents; when a group is
complete its latents are computed once (global KV cache of T*M positions per layer). Decoding a
sequence therefore costs O(L*N + T*(T*M)) attention instead of O(L²) per token.

Deviations from the official code: the official ``sample`` is a TODO (it only evaluates the
teacher-forced loss), so the cached loop is ours; the unused ``encoded`` argument is dropped.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxformers.layers import Dense, LayerNorm, check_token_ids, logical, trunc_normal
from jaxformers.layers.attention import AttentionImpl, init_kv_cache
from jaxformers.models.fit import FITCore
from jaxformers.models.fit_layers import parse_layer_spec


class FITAR(nn.Module):
    """Autoregressive FIT over token ids (B, seq_len) -> logits (B, seq_len, vocab_size)."""

    vocab_size: int = 256
    seq_len: int = 1024
    group_size: int = 64
    latents_per_group: int = 4
    layers: str = "(2)2(2)"
    x_dim: int = 256
    latent_dim: int = 256
    x_num_heads: int = 4
    latent_num_heads: int = 4
    mlp_ratio: float = 4.0
    shared_embedding: bool = True
    output_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: bool = False
    attention_impl: AttentionImpl = "xla"
    local_attention_impl: str = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def num_groups(self) -> int:
        if self.seq_len % self.group_size:
            raise ValueError(f"seq_len={self.seq_len} is not divisible by group_size={self.group_size}")
        return self.seq_len // self.group_size

    @nn.nowrap
    def example_inputs(self, batch_size: int = 1):
        return (jnp.zeros((batch_size, self.seq_len), jnp.int32),)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embedding = nn.Embed(self.vocab_size, self.x_dim, embedding_init=logical(trunc_normal(0.02), ("vocab", "embed")),
                                        **kw)
        if not self.shared_embedding:
            self.output_embedding = Dense(self.vocab_size, axes=("embed", "vocab"), use_bias=False, **kw)
        self.x_pos_emb = self.param("x_pos_emb", logical(trunc_normal(0.02), (None, "embed")),
                                    (self.group_size, self.x_dim), self.param_dtype)
        self.core = FITCore(self.layers, self.num_groups, self.latents_per_group, self.x_dim, self.latent_dim,
                            self.x_num_heads, self.latent_num_heads, self.mlp_ratio, autoregressive=True,
                            drop_path=self.drop_path_rate, dropout=self.drop_rate, attention_dropout=self.attn_drop_rate,
                            remat=self.remat, attention_impl=self.attention_impl,
                            local_attention_impl=self.local_attention_impl, **kw)
        self.x_output_ln = LayerNorm(1e-6, **kw)
        self.input_dropout = nn.Dropout(self.drop_rate)
        if self.output_bias:
            self.outp_bias = self.param("outp_bias", logical(nn.initializers.zeros_init(), ("vocab",)),
                                        (self.vocab_size,), self.param_dtype)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.x_output_ln(x)
        logits = self.token_embedding.attend(x) if self.shared_embedding else self.output_embedding(x)
        if self.output_bias:
            logits = logits + self.outp_bias.astype(logits.dtype)
        return logits

    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """Teacher-forced logits (B, L, V) for the *input* ids ``tokens`` (targets shifted right)."""
        check_token_ids(tokens, vocab_size=self.vocab_size, name="tokens")
        if tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens has length {tokens.shape[1]} but the model was built for seq_len={self.seq_len} "
                             f"(learned latents per group fix the number of groups)")
        b, t, n = tokens.shape[0], self.num_groups, self.group_size
        x = self.token_embedding(tokens.reshape(b * t, n)) + self.x_pos_emb.astype(self.dtype or jnp.float32)[None]
        x = self.input_dropout(x, deterministic=not train)
        x, _ = self.core(x, train=train)
        return self._logits(x).reshape(b, t * n, self.vocab_size)

    def decode_token(self, token: jax.Array, position: jax.Array, cache: dict, context: dict):
        """token (B,) int at within-group ``position`` -> (logits (B, V), cache, taps)."""
        x = self.token_embedding(token[:, None])
        pos = jax.lax.dynamic_index_in_dim(self.x_pos_emb, position, keepdims=True)
        x = x + pos.astype(x.dtype)[None]
        x, cache, taps = self.core.decode_token(x, position, cache, context)
        return self._logits(x)[:, 0], cache, taps

    def decode_latents(self, group: jax.Array, taps: dict, cache: dict):
        return self.core.decode_latents(group, taps, cache)


def shift_right(targets: jax.Array, bos_id: int = 0) -> jax.Array:
    """Decoder inputs: ``bos_id`` then targets[:, :-1] (the official ``image2seqs``)."""
    return jnp.concatenate([jnp.full_like(targets[:, :1], bos_id), targets[:, :-1]], axis=1)


def ar_loss(model: FITAR, variables: Any, targets: jax.Array, *, train: bool = False, rngs: Any = None,
            bos_id: int = 0, return_logits: bool = False):
    """Mean next-token cross-entropy (nats) of ``targets`` (B, L); with ``return_logits`` also the logits."""
    logits = model.apply(variables, shift_right(targets, bos_id), train=train, rngs=rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()
    return (loss, logits) if return_logits else loss


def init_decode_cache(model: FITAR, batch_size: int) -> dict:
    """Zero caches for ``generate``: a ``KVCache`` (B, N, H, Dh) per local layer, one (B, T*M, H, Dh)
    per global layer of every block that feeds an x2l, the previous group's latents and taps."""
    spec = parse_layer_spec(model.layers)
    dt = model.dtype or jnp.float32
    n, tm = model.group_size, model.num_groups * model.latents_per_group
    xh, lh = model.x_num_heads, model.latent_num_heads
    kv = lambda length, h, d: init_kv_cache(batch_size, length, h, d // h, dt)  # noqa: E731
    feeds = [i for i, (_, g) in enumerate(spec) if g and i < len(spec) - 1]
    return {
        "local": {f"{i}_{j}": kv(n, xh, model.x_dim) for i, (nl, _) in enumerate(spec) for j in range(nl)},
        "global": {f"{i}_{j}": kv(tm, lh, model.latent_dim) for i in feeds for j in range(spec[i][1])},
        "context": {str(i): jnp.zeros((batch_size, model.latents_per_group, model.latent_dim), dt) for i in feeds},
        "taps": {str(i): jnp.zeros((batch_size, n, model.x_dim), dt) for i in feeds},
    }


def _sample(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("temperature", "top_k", "bos_id", "return_logits"))
def _decode(model, variables, rng, forced, forced_mask, *, temperature, top_k, bos_id, return_logits):
    b = forced.shape[0]
    t_groups, n = model.num_groups, model.group_size
    state = init_decode_cache(model, b)

    def token_step(carry, n_idx):
        local, taps, prev, rng, context, t_idx = carry
        logits, local, new_taps = model.apply(variables, prev, n_idx, local, context, method=FITAR.decode_token)
        taps = {k: jax.lax.dynamic_update_slice_in_dim(taps[k], new_taps[k].astype(taps[k].dtype), n_idx, axis=1)
                for k in taps}
        rng, sub = jax.random.split(rng)
        s = t_idx * n + n_idx
        tok = jnp.where(forced_mask[s], forced[:, s], _sample(logits, sub, temperature, top_k))
        out = (logits if return_logits else jnp.zeros((b, 0), logits.dtype), tok)
        return (local, taps, tok, rng, context, t_idx), out

    def group_step(carry, t_idx):
        local, glob, context, taps, prev, rng = carry
        (local, taps, prev, rng, _, _), (logits, toks) = jax.lax.scan(
            token_step, (local, taps, prev, rng, context, t_idx), jnp.arange(n))
        if taps:
            context, glob = model.apply(variables, t_idx, taps, glob, method=FITAR.decode_latents)
        return (local, glob, context, taps, prev, rng), (logits, toks)

    prev = jnp.full((b,), bos_id, jnp.int32)
    carry = (state["local"], state["global"], state["context"], state["taps"], prev, rng)
    _, (logits, toks) = jax.lax.scan(group_step, carry, jnp.arange(t_groups))
    toks = toks.transpose(2, 0, 1).reshape(b, t_groups * n)  # (T, N, B) -> (B, L)
    logits = jnp.moveaxis(logits, 2, 0).reshape(b, t_groups * n, -1)
    return toks, logits


def generate(model: FITAR, variables: Any, rng: jax.Array, batch_size: int = 1, *, prompt: jax.Array | None = None,
             temperature: float = 1.0, top_k: int | None = None, bos_id: int = 0,
             return_logits: bool = False):
    """Samples (B, seq_len) token ids with the cached decoding loop (jit-compiled, one scan).

    ``prompt`` (B, P) ids are kept as the first P tokens; ``temperature=0`` is greedy; ``top_k``
    restricts sampling to the k most likely ids. With ``return_logits`` also returns the (B, L, V)
    logits the loop computed (with a full-length ``prompt`` this is teacher forcing and equals
    ``model.apply(variables, shift_right(prompt))``).
    """
    if prompt is not None:
        check_token_ids(prompt, vocab_size=model.vocab_size, max_len=model.seq_len, name="prompt")
        batch_size = prompt.shape[0]
        p = prompt.shape[1]
        forced = jnp.zeros((batch_size, model.seq_len), jnp.int32).at[:, :p].set(prompt.astype(jnp.int32))
        mask = jnp.arange(model.seq_len) < p
    else:
        forced = jnp.zeros((batch_size, model.seq_len), jnp.int32)
        mask = jnp.zeros((model.seq_len,), bool)
    toks, logits = _decode(model, variables, rng, forced, mask, temperature=float(temperature), top_k=top_k,
                           bos_id=int(bos_id), return_logits=bool(return_logits))
    return (toks, logits) if return_logits else toks
