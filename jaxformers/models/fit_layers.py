"""FIT building blocks: the layer-spec parser, local/global transformer layers with a KV cache,
the latent <-> group cross-attention, and the image <-> groups reshapes.

FIT ("Far-reaching Interleaved Transformers", Chen & Li 2023, arXiv 2305.12689) splits the data
tokens into groups. *Local* layers attend within each group, *global* layers attend over a small set
of latent tokens (``latents_per_group`` per group), and cross-attention moves information between a
group and its own latents. The layout of the data tokens is (B*T, N, C): batch times groups is one
leading axis, so local layers are embarrassingly parallel over groups and the merged axis is
sharded with the ``act_batch`` rule (sequence parallelism for free). Latents live as (B*T, M, D)
for cross-attention and as (B, T*M, D) inside global layers.

Local attention goes through ``jaxformers.kernels.local_global_attention`` with
``group_size=N`` (block-diagonal groups over the flattened (B, T*N) sequence, see
``local_attention``); global attention and the cross-attention go through
``jaxformers.layers.dot_product_attention`` (the shared seam).
"""
from __future__ import annotations

import re
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformers.layers import DropPath, LayerNorm, Mlp, MultiHeadAttention, dot_product_attention, logical, trunc_normal
from jaxformers.layers.attention import AttentionImpl
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


def local_attention(q, k, v, *, num_groups: int, causal: bool, implementation: str) -> jax.Array:
    """Block-diagonal attention for q/k/v laid out (B*T, N, H, D), through
    ``local_global_attention(group_size=N)``.

    For the Pallas kernel the groups are flattened to one (B, T*N) row per example: the kernel
    skips key blocks outside each query's group, so the cost is linear in T. The ``"xla"`` path of
    that op is its reference, which materialises the full (T*N)² mask; there we hand it the groups
    as rows (B*T, N) instead (the same block-diagonal attention, N² per group), which keeps the
    cost linear in the number of groups.
    """
    from jaxformers.kernels import local_global_attention

    impl = implementation
    if impl == "auto":
        impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    bt, n, h, d = q.shape
    if impl == "xla":
        return local_global_attention(q, k, v, group_size=n, causal=causal, implementation="xla")
    b = bt // num_groups
    flat = lambda t: t.reshape(b, num_groups * n, t.shape[2], t.shape[3])  # noqa: E731
    out = local_global_attention(flat(q), flat(k), flat(v), group_size=n, causal=causal, implementation=impl)
    return out.reshape(bt, n, h, v.shape[-1])


class FITSelfAttention(nn.Module):
    """Self-attention with MultiHeadAttention's parameters (``qkv`` (E,3,H,D), ``proj`` (H,D,E)),
    but a pluggable pattern: ``kind='local'`` (block-diagonal groups through the local + global
    kernel, optionally causal inside each group) or ``kind='global'`` (the shared seam, optionally
    chunk-causal). With ``cache`` it runs one decoding step against a KV cache."""

    num_heads: int
    kind: Literal["local", "global"] = "global"
    num_groups: int = 1
    causal: bool = False
    chunk_size: int | None = None
    attention_dropout: float = 0.0
    attention_impl: AttentionImpl = "xla"
    local_attention_impl: str = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, cache: dict | None = None,
                 cache_index: jax.Array | None = None):
        dim = x.shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={self.num_heads}")
        heads = (self.num_heads, dim // self.num_heads)
        qkv = nn.DenseGeneral((3,) + heads, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=logical(trunc_normal(0.02), ("embed", None, "heads", "kv")),
                              bias_init=logical(nn.initializers.zeros_init(), (None, "heads", "kv")), name="qkv")(x)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        new_cache = None
        if cache is not None:
            out, new_cache = self._attend_cached(q, k, v, cache, cache_index)
        elif self.kind == "local":
            out = local_attention(q, k, v, num_groups=self.num_groups, causal=self.causal,
                                  implementation=self.local_attention_impl)
        else:
            names = ("act_batch", "act_len", "act_heads", None)
            q, k, v = (constrain(t, names) for t in (q, k, v))
            mask = None
            if self.chunk_size:
                mask = chunk_causal_mask(q.shape[1] // self.chunk_size, self.chunk_size)[None, None]
            rate = self.attention_dropout if train else 0.0
            out = dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl, dropout_rate=rate,
                                        dropout_rng=self.make_rng("dropout") if rate > 0.0 else None)
        out = nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=logical(trunc_normal(0.02), ("heads", "kv", "embed")),
                              bias_init=logical(nn.initializers.zeros_init(), ("embed",)), name="proj")(out)
        return out if cache is None else (out, new_cache)

    def _attend_cached(self, q, k, v, cache, index):
        """Writes the s new keys/values at ``index`` of the (B, S, H, D) cache and attends to the
        valid prefix: token-causal for local causal layers, the whole new chunk for global ones."""
        s, size = q.shape[1], cache["k"].shape[1]
        zero = jnp.zeros((), jnp.int32)
        idx = jnp.asarray(index, jnp.int32)
        ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (zero, idx, zero, zero))
        cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (zero, idx, zero, zero))
        qpos = idx + jnp.arange(s)[:, None]
        kpos = jnp.arange(size)[None, :]
        token_causal = self.kind == "local" and self.causal
        mask = kpos <= qpos if token_causal else kpos < idx + s
        out = dot_product_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask=mask[None, None],
                                    implementation="xla")
        return out, {"k": ck, "v": cv}


class FITLayer(nn.Module):
    """Pre-norm transformer layer: x + DropPath(Attn(LN(x))), x + DropPath(MLP(LN(x))), with the
    attention pattern of ``FITSelfAttention`` (timm names ``norm1``/``attn``/``norm2``/``mlp``).
    Called as ``layer(x, train)`` (``train`` positional so ``maybe_remat`` can make it static), or
    ``layer(x, False, cache, index)`` for a cached decoding step returning ``(x, cache)``."""

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
    def __call__(self, x: jax.Array, train: bool = False, cache: dict | None = None,
                 cache_index: jax.Array | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = LayerNorm(1e-6, name="norm1", **kw)(x)
        y = FITSelfAttention(self.num_heads, self.kind, self.num_groups, self.causal, self.chunk_size,
                             self.attention_dropout, self.attention_impl, self.local_attention_impl,
                             name="attn", **kw)(y, train, cache, cache_index)
        if cache is not None:
            y, cache = y
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
