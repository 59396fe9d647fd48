"""Autoregressive decoding for any model with a state: greedy, temperature, top-k and nucleus sampling.

A model plugs in through one function, ``step(ids (B, s), state) -> (logits (B, s, vocab), state)``,
which consumes ``s`` new tokens from ``state`` (a KV cache for a transformer decoder, the conv + scan
states for Mamba...) and returns the next-token logits at each of them. ``generate`` feeds the whole
prompt in one call (prefill), then one token per step inside a single ``lax.scan``, all in one jitted
program; after ``eos_token_id`` a sequence keeps emitting ``pad_token_id``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["generate", "sample_logits"]

Step = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def sample_logits(logits: jax.Array, rng: jax.Array | None, *, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """Next token ids (B,) from logits (B, vocab): argmax when ``temperature`` is 0, else a sample of
    softmax(logits / temperature) restricted to the ``top_k`` largest and/or the smallest set whose
    probability reaches ``top_p``."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng key")
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token if the probability mass before it is below top_p (the first is always kept)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(step: Step, state: Any, input_ids: jax.Array, max_new_tokens: int, *, rng: jax.Array | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, pad_token_id: int = 0) -> jax.Array:
    """``input_ids`` (B, L) followed by ``max_new_tokens`` generated tokens: (B, L + max_new_tokens).

    ``state`` is the model's empty state for batch B (sized for L + max_new_tokens tokens where it
    has a capacity, as a KV cache does)."""
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a (batch, length >= 1) prompt; got shape {input_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    rng = jax.random.key(0) if rng is None else rng
    sample = lambda logits, key: sample_logits(logits, key, temperature=temperature, top_k=top_k,  # noqa: E731
                                               top_p=top_p)

    @jax.jit
    def run(state, input_ids, rng):
        keys = jax.random.split(rng, max_new_tokens)
        logits, state = step(input_ids, state)
        first = sample(logits[:, -1], keys[0])
        done = jnp.zeros(first.shape, bool) if eos_token_id is None else first == eos_token_id

        def body(carry, key):
            token, state, done = carry
            logits, state = step(token[:, None], state)
            nxt = sample(logits[:, -1], key)
            nxt = jnp.where(done, pad_token_id, nxt)
            if eos_token_id is not None:
                done = done | (nxt == eos_token_id)
            return (nxt, state, done), nxt

        if max_new_tokens == 1:
            return jnp.concatenate([input_ids, first[:, None]], axis=1)
        _, rest = jax.lax.scan(body, (first, state, done), keys[1:])
        return jnp.concatenate([input_ids, first[:, None], rest.T.astype(input_ids.dtype)], axis=1)

    return run(state, input_ids, rng)
