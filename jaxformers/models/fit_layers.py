"""FIT building blocks: the layer-spec parser, local/global transformer layers with a KV cache,
the latent <-> group cross-attention, and the image <-> groups reshapes.

FIT ("Far-reaching Interleaved Transformers", Chen & Li 2023, arXiv 2305.12689) splits the data
tokens into groups. *Local* layers attend within each group, *global* layers attend over a small set
of latent tokens (``latents_per_group`` per group), and cross-attention moves information between a
group and its own latents. The layout of the data tokens is (B*T, N, C): batch times groups is one
leading axis, so local layers are embarrassingly parallel over groups and the merged axis is
sharded with the ``act_batch`` rule (sequence parallelism for free). Latents live as (B*T, M, D)
for cross-attention and as (B, T*M, D) inside global layers.

Every attention is the shared ``jaxformers.layers.MultiHeadAttention``: local layers plug in
``local_attention`` (``local_global_attention`` with ``group_size=N`` over the flattened (B, T*N)
sequence) as its ``attention_fn``; global layers and the cross-attentions use its default seam
(``dot_product_attention``); cached decoding steps use its ``KVCache``.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers import DropPath, LayerNorm, Mlp, MultiHeadAttention
from jaxformers.layers.attention import AttentionImpl, KVCache
from jaxformers.sharding import constrain

LayerSpec = tuple[tuple[int, int], ...]
GROUP_ACT = ("act_batch", "act_len", "act_embed")  # (B*T, N, C): the merged batch x group axis is sharded
LATENT_ACT = ("act_batch", "act_len", "act_embed")  # (B, T*M, D) inside global layers

_SPEC_RE = re.compile(r"^(\([0-9]+\)[0-9]+)+$")


def parse_layer_spec(spec: str) -> LayerSpec:
    """Parses FIT's layer string into ((local_layers, global_layers), ...) blocks.

    ``"(2)4(2)"`` means 2 local layers, 4 global layers, then 2 local layers: a trailing ``(x)`` is
    read as ``(x)0``. Every block except the last must have at least one global layer (otherwise
    two local stacks would touch with nothing between them). Bad strings raise a ValueError that
    names the spec and the expected form.
    """
    if not isinstance(spec, str):
        raise TypeError(f"layers must be a string like '(2)4(2)', got {type(spec).__name__}: {spec!r}")
    s = spec.replace(" ", "")
    if s.endswith(")"):
        s += "0"
    if not _SPEC_RE.match(s):
        raise ValueError(f"layers={spec!r} is not a FIT layer spec; expected blocks '(local)global' such as "
                         f"'(2)4(2)' or '(4)6(4)6' (digits only, local counts in parentheses)")
    blocks = tuple((int(a), int(b)) for a, b in re.findall(r"\(([0-9]+)\)([0-9]+)", s))
    for i, (_, g) in enumerate(blocks[:-1]):
        if g == 0:
            raise ValueError(f"layers={spec!r}: block {i} has 0 global layers; every block except the last "
                             f"needs at least one (merge adjacent local counts instead)")
    if sum(a + b for a, b in blocks) == 0:
        raise ValueError(f"layers={spec!r} has no layers at all")
    return blocks


def chunk_causal_mask(num_chunks: int, chunk: int) -> jax.Array:
    """(L, L) bool, L = num_chunks*chunk: token i sees token j when chunk(j) <= chunk(i) (full
    attention inside a chunk, causal across chunks; the FIT AR global mask)."""
    ids = jnp.arange(num_chunks * chunk) // chunk
    return ids[None, :] <= ids[:, None]


def local_attention(q, k, v, *, num_groups: int, causal: bool, implementation: str,
                    segment_ids: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Block-diagonal attention for q/k/v laid out (B*T, N, H, D): the groups are flattened to one
    (B, T*N) row per example and attend through ``local_global_attention(group_size=N)``.

    Every implementation keeps this linear in T: the Pallas kernel skips key blocks outside each
    query's group, the ``"xla"`` reference computes group-structured specs group by group (N² per
    group, no (T*N)² mask). The signature fits ``MultiHeadAttention.attention_fn``."""
    from jaxformers.kernels import local_global_attention

    if segment_ids is not None:
        raise ValueError("FIT local attention takes no segment_ids (every group is full)")
    bt, n, h, d = q.shape
    b = bt // num_groups
    flat = lambda t: t.reshape(b, num_groups * n, t.shape[2], t.shape[3])  # noqa: E731
    out = local_global_attention(flat(q), flat(k), flat(v), group_size=n, causal=causal, scale=scale,
                                 implementation=implementation)
    return out.reshape(bt, n, h, v.shape[-1])


def chunk_causal_attention(q, k, v, *, chunk_size: int, segment_ids: jax.Array | None = None,
                           scale: float | None = None) -> jax.Array:
    """The FIT AR global pattern (``chunk_causal_mask``) through the Pallas kernel of
    ``local_global_attention``; the signature fits ``MultiHeadAttention.attention_fn``."""
    from jaxformers.kernels import local_global_attention

    return local_global_attention(q, k, v, causal=True, chunk_size=chunk_size, segment_ids=segment_ids,
                                  scale=scale, implementation="pallas")


class FITLayer(nn.Module):
    """Pre-norm transformer layer: x + DropPath(Attn(LN(x))), x + DropPath(MLP(LN(x))) (timm names
    ``norm1``/``attn``/``norm2``/``mlp``; ``attn`` is the shared ``MultiHeadAttention``).

    ``kind='local'``: block-diagonal groups (``local_attention``, optionally causal inside each
    group); ``kind='global'``: the shared attention seam, chunk-causal with ``chunk_size``. Called as
    ``layer(x, train)`` (``train`` positional so ``maybe_remat`` can make it static), or
    ``layer(x, False, cache)`` for a cached decoding step returning ``(x, cache)``: a local layer's
    cache holds its group's earlier tokens (one token per step: causal), a global layer's the
    latents of earlier groups (a step of one group's M latents sees them all: chunk-causal)."""

    num_heads: int
    mlp_ratio: float = 4.0
    kind: Literal["local", "global"] = "global"
    num_groups: int = 1
    causal: bool = False
    chunk_size: int | None = None
    drop_path: float = 0.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    local_attention_impl: str = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, cache: KVCache | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if x.shape[-1] % self.num_heads:
            raise ValueError(f"width {x.shape[-1]} is not divisible by num_heads={self.num_heads}")
        local = self.kind == "local" and cache is None
        chunked = self.kind == "global" and bool(self.chunk_size) and cache is None
        pattern = None
        if local:
            pattern = functools.partial(local_attention, num_groups=self.num_groups, causal=self.causal,
                                        implementation=self.local_attention_impl)
        elif chunked and self.attention_impl == "pallas":  # the kernel takes the chunk-causal rule, not a mask
            pattern = functools.partial(chunk_causal_attention, chunk_size=self.chunk_size)
        attn = MultiHeadAttention(self.num_heads, attention_dropout=0.0 if local else self.attention_dropout,
                                  attention_impl=self.attention_impl, attention_fn=pattern, name="attn", **kw)
        y = LayerNorm(1e-6, name="norm1", **kw)(x)
        if cache is not None:
            if self.kind == "local" and x.shape[1] != 1:  # a multi-token step would see its own future
                raise ValueError(f"cached local decoding steps take one token; got x of shape {x.shape}")
            y, cache = attn(y, cache=cache)
        else:
            mask = None
            if chunked and pattern is None:
                mask = chunk_causal_mask(y.shape[1] // self.chunk_size, self.chunk_size)[None, None]
            y = attn(y, mask=mask, train=train)
        x = x + DropPath(self.drop_path)(nn.Dropout(self.dropout)(y, deterministic=not train), train=train)
        y = LayerNorm(1e-6, name="norm2", **kw)(x)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), dropout=self.dropout, name="mlp", **kw)(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        if cache is None:
            return constrain(x, GROUP_ACT if self.kind == "local" else LATENT_ACT)
        return x, cache


class FITCrossAttention(nn.Module):
    """x + MHA(LN(x), LN(context)) (+ optional LN/MLP): how latents read their group (``l2x``) and a
    group reads its latents (``x2l``). As in the official code: heads = min of the two streams'
    heads, attention width = min of the two widths, no drop-path, LN on both inputs."""

    num_heads: int
    att_dim: int
    use_mlp: bool = False
    mlp_ratio: float = 4.0
    context_norm: bool = True
    attention_impl: AttentionImpl = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.att_dim % self.num_heads:
            raise ValueError(f"cross-attention width {self.att_dim} is not divisible by {self.num_heads} heads")
        q_in = LayerNorm(1e-6, name="norm_q", **kw)(x)
        kv_in = LayerNorm(1e-6, name="norm_kv", **kw)(context) if self.context_norm else context
        x = x + MultiHeadAttention(self.num_heads, head_dim=self.att_dim // self.num_heads,
                                   attention_impl=self.attention_impl, name="attn", **kw)(q_in, kv_in, train=train)
        if self.use_mlp:
            y = LayerNorm(1e-6, name="norm_mlp", **kw)(x)
            x = x + Mlp(int(x.shape[-1] * self.mlp_ratio), name="mlp", **kw)(y, train=train)
        return x


# ---------------------------------------------------------------------------------------------
# Images <-> groups of patches


def image_to_groups(x: jax.Array, patch_size: int, group_size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, T, N, p*p*C): non-overlapping p×p patches, grouped into windows of
    ``group_size`` = (gh, gw) patches (row-major windows, row-major patches inside a window)."""
    b, h, w, c = x.shape
    p, (gh, gw) = patch_size, group_size
    th, tw = h // (p * gh), w // (p * gw)
    x = x.reshape(b, th, gh, p, tw, gw, p, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # b, th, tw, gh, gw, p, p, c
    return x.reshape(b, th * tw, gh * gw, p * p * c)


def groups_to_image(x: jax.Array, image_hw: tuple[int, int], patch_size: int, group_size: tuple[int, int]) -> jax.Array:
    """Inverse of ``image_to_groups``: (B, T, N, p*p*C) -> (B, H, W, C)."""
    b = x.shape[0]
    h, w = image_hw
    p, (gh, gw) = patch_size, group_size
    th, tw = h // (p * gh), w // (p * gw)
    c = x.shape[-1] // (p * p)
    x = x.reshape(b, th, tw, gh, gw, p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, h, w, c)


def group_grid(img_size: tuple[int, int], patch_size: int, group_size: tuple[int, int]) -> tuple[int, int]:
    """Number of groups along (H, W); a clear error when the image does not tile."""
    h, w = img_size
    gh, gw = group_size
    if h % (patch_size * gh) or w % (patch_size * gw):
        raise ValueError(f"image {h}x{w} does not tile into groups of {gh}x{gw} patches of {patch_size}px "
                         f"(height and width must be multiples of {patch_size * gh}x{patch_size * gw})")
    return h // (patch_size * gh), w // (patch_size * gw)
