"""BiDA: bi-directional domain adaptation for cross-domain hyperspectral image classification.

Paper: "Bi-directional Domain Adaptation for Cross-Domain Hyperspectral Image Classification" (BiDA),
Yuxiang Zhang, Wei Li, Wei Sun, Ran Tao, Qian Du, IEEE TCSVT 2025, arXiv 2507.02268. Official code:
YuxiangZhang-BIT/IEEE_TCSVT_BiDA (``models/BiDA.py`` ``BiDAnet``, ``train_pipeline.py``,
``loss/mmd_loss.py``, ``main.py``). Parameter names follow ``BiDAnet`` so its state dicts convert key
for key (``convert_bida``).

Model (``BiDA``):

- **Spectral-spatial semantic tokenizer** (official ``_tokenize``): a ``patch_size`` x ``patch_size``
  patch with ``num_bands`` bands goes through Conv3d(1 -> 8, 3x3x3, padding 1) + BN + ReLU over
  (band, row, column); the 8 x bands responses are stacked as channels (channel-major: channel
  ``c * bands + band``) into Conv2d(-> ``dim``, 3x3, padding 1) + BN + ReLU (the patch keeps its size);
  ``num_tokens`` (L = 4) spatial attention maps (a 1x1 convolution ``conv_a`` without bias, softmax
  over the pixels) pool the map into L semantic tokens. A class token (zeros) is prepended and a
  learned position table of L + 1 rows added, then dropout. ``token_wA`` (1, L, 64) and ``token_wV``
  (1, 64, dim) are parameters of the official model that its forward never reads (the 64 is hard-coded
  there); they are kept so that parameter counts and checkpoints match, and get no gradient.
- **Triple-branch encoder** (official ``Block_triple_branches``, ``depth`` = 3 blocks, dim 64, 8 heads,
  MLP ratio 4, qkv without bias, dropout and attention dropout 0.1, LayerNorm eps 1e-5): every block
  applies the *same* weights (norm1, one fused qkv, proj, norm2, MLP) to four streams. Source branch:
  self-attention of the source tokens; target branch: self-attention of the target tokens; **coupled
  cross-attention**: queries [q_s; q_t] attend keys / values [k_t; k_s] in one batched product, so the
  source queries read the target (s -> t, added as the residual of the *fusion* stream, which starts
  as the target tokens and is carried from block to block) and the target queries read the source
  (t -> s, added as the residual of the block's source input; as in the official code this stream is
  recomputed in every block from the source stream and only the last block's is used). Source and
  target patches are paired by index, so both batches have the same size.
- Heads: a final LayerNorm and one shared classifier ``nn1`` on each stream's class token.
- Calls: ``model.apply(v, cube)`` is the official inference path (the target branch alone, logits
  (B, num_classes)); ``model.apply(v, source, target, train=True)`` returns :class:`BiDAOutput`, the
  logits of the four streams (source, target, s->t fusion, t->s fusion). With BatchNorm in training
  mode the source and the target batch are normalised with their own batch statistics (the official
  tokenizes each domain separately), and the running statistics are updated first with the source,
  then with the target batch, as in the official forward.

Training (:func:`bida_loss`, :func:`ema_update`; the loop is ``train/hyperspectral.py``), as the
official ``train_pipeline.train``:

- cross-entropy of the source logits (label smoothing is an official option, off by default);
- **bi-directional distillation** (weight lambda1 = 0.1): the cross-entropy of the target logits against
  the softmax of the s->t fusion logits, plus that of the source logits against the softmax of the
  t->s fusion logits; as in the official ``distill_loss`` the teacher side is not detached;
- **consistency with an EMA teacher** (weight lambda2 = 1.0): the official ``softmax_mse_loss`` between
  student and teacher logits of each domain, applied (as the official code does) to logits that were
  already softmaxed, i.e. a double softmax, kept for parity; each term is divided by the batch size.
  The teacher is a second ``BiDAnet`` with its own random initialisation (``get_model(..., ema=True)``),
  run in training mode (dropout on, batch statistics), and updated after every optimizer step with
  alpha = min(1 - 1 / (step + 1), 0.999) (``update_ema_variables``, parameters only);
- **alignment** (weight lambda1) after ``align_after`` epochs (official: 100 of 200, and only on full
  batches): the official Gaussian-kernel MMD (5 kernels, bandwidths a factor 2 apart around the mean
  pairwise squared distance, not differentiated) between the source and the target logits. The
  official term is (MMD(source, target) + MMD(fusion_src, fusion_src)) / 2; the second MMD compares a
  batch with itself and is identically zero (value and gradient), so we compute MMD(source, target) / 2.
  Where all logits coincide the official bandwidth is 0 and its loss NaN; ours then uses bandwidth 1.

The official optimizer is plain SGD, lr 1e-2, batch 128, 200 epochs, seed 2100, and 95 % of the
labelled source pixels for training (``main.py``).

Deviations: cubes are channels-last (batch, height, width, bands); the official takes (B, 1, bands, H,
W). Flax's BatchNorm updates the running variance with the biased batch variance (PyTorch: unbiased;
forward passes in either mode are unaffected). With ``target`` given and ``train=False`` ours returns
the four streams with running statistics (the official eval mode always runs the target branch alone).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, batch_norm_params, dense_params, heads_out, norm_params, qkv_fused
from jaxformers.layers import BatchNorm, DropPath, LayerNorm, Mlp, dot_product_attention
from jaxformers.layers.linear import logical, trunc_normal
from jaxformers.registry import ModelInfo, register_model

PAPER = "Bi-directional Domain Adaptation for Cross-Domain Hyperspectral Image Classification"


def check_cube(x: Any, num_bands: int, patch_size: int, name: str = "cube") -> None:
    """A hyperspectral patch batch must be floating point (batch, patch_size, patch_size, num_bands)."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 4:
        raise ValueError(f"{name} must be a hyperspectral patch batch (batch, height, width, bands) with the bands "
                         f"last; got shape {shape}")
    if shape[-1] != num_bands:
        raise ValueError(f"{name} has {shape[-1]} spectral bands but the tokenizer was built for num_bands={num_bands} "
                         f"(its Conv2d reads 8 x num_bands channels); build the model with num_bands={shape[-1]} or "
                         "resample the cube's bands")
    if shape[1:3] != (patch_size, patch_size):
        raise ValueError(f"{name} patches are {shape[1]}x{shape[2]} pixels but the model was built for "
                         f"patch_size={patch_size} ({patch_size}x{patch_size} patches centred on the pixel to classify)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point (reflectances); got {x.dtype}")


class SemanticTokenizer(nn.Module):
    """Official ``_tokenize``: Conv3d-BN-ReLU, Conv2d-BN-ReLU, spatial-attention pooling into L tokens."""

    num_bands: int
    dim: int = 64
    num_tokens: int = 4
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, bands = x.shape
        y = jnp.transpose(x, (0, 3, 1, 2))[..., None]  # (B, bands, H, W, 1): a volume with one channel
        y = nn.Conv(8, (3, 3, 3), padding=1, name="conv3d", kernel_init=logical(
            nn.initializers.lecun_normal(), (None, None, None, None, "conv_out")),
            bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)), **kw)(y)
        y = nn.relu(BatchNorm(train=train, name="bn3d", **kw)(y))
        y = jnp.transpose(y, (0, 2, 3, 4, 1)).reshape(b, h, w, 8 * bands)  # channel-major: c * bands + band
        y = nn.Conv(self.dim, (3, 3), padding=1, name="conv2d", kernel_init=logical(
            nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
            bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)), **kw)(y)
        y = nn.relu(BatchNorm(train=train, name="bn2d", **kw)(y))
        attn = nn.Conv(self.num_tokens, (1, 1), use_bias=False, name="conv_a", kernel_init=logical(
            nn.initializers.lecun_normal(), (None, None, "conv_in", None)), **kw)(y)
        attn = jax.nn.softmax(attn.reshape(b, h * w, self.num_tokens).astype(jnp.float32), axis=1)
        return jnp.einsum("bnl,bnc->blc", attn.astype(y.dtype), y.reshape(b, h * w, self.dim))


class TripleBranchBlock(nn.Module):
    """Official ``Block_triple_branches``: one set of weights for the source, target and the two coupled
    cross-attention streams; the target stream alone when ``source`` is None (inference)."""

    num_heads: int
    mlp_ratio: float = 4.0
    drop_rate: float = 0.1
    attn_drop_rate: float = 0.1
    drop_path: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, source: jax.Array | None, target: jax.Array, fusion: jax.Array | None, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = target.shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"BiDA width dim={dim} is not divisible by num_heads={self.num_heads}")
        heads, hd = self.num_heads, dim // self.num_heads
        norm1, norm2 = LayerNorm(1e-5, name="norm1", **kw), LayerNorm(1e-5, name="norm2", **kw)
        qkv = nn.DenseGeneral((3, heads, hd), use_bias=False, name="qkv", kernel_init=logical(
            trunc_normal(0.02), ("embed", None, "heads", "kv")), **kw)
        proj = nn.DenseGeneral(dim, axis=(-2, -1), name="proj", kernel_init=logical(
            trunc_normal(0.02), ("heads", "kv", "embed")), bias_init=logical(nn.initializers.zeros_init(), ("embed",)),
            **kw)
        mlp = Mlp(int(dim * self.mlp_ratio), dropout=self.drop_rate, name="mlp", **kw)
        drop, droppath = nn.Dropout(self.drop_rate), DropPath(self.drop_path)
        rate = self.attn_drop_rate if train else 0.0

        def attend(q, k, v):
            rng = self.make_rng("dropout") if rate > 0 else None
            out = dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=rng)
            return drop(proj(out), deterministic=not train)

        def residual(x, a):
            x = x + droppath(a, train=train)
            return x + droppath(mlp(norm2(x), train=train), train=train)

        if source is None:
            t = qkv(norm1(target))
            return None, residual(target, attend(t[..., 0, :, :], t[..., 1, :, :], t[..., 2, :, :])), None, None
        b = source.shape[0]
        st = qkv(norm1(jnp.concatenate([source, target])))  # (2B, N, 3, H, D): rows [source; target]
        q, k, v = st[..., 0, :, :], st[..., 1, :, :], st[..., 2, :, :]
        a_s, a_t = jnp.split(attend(q, k, v), 2)  # self-attention within each domain
        # coupled cross-attention: queries [q_s; q_t] against keys / values [k_t; k_s]
        a_st, a_ts = jnp.split(attend(q, jnp.roll(k, b, axis=0), jnp.roll(v, b, axis=0)), 2)
        return residual(source, a_s), residual(target, a_t), residual(fusion, a_st), residual(source, a_ts)


class BiDAOutput(NamedTuple):
    """Logits (B, num_classes) of the four streams: source, target, s->t fusion, t->s fusion."""

    source: jax.Array
    target: jax.Array
    fusion: jax.Array
    fusion_source: jax.Array


class BiDA(nn.Module):
    """``BiDAnet``: semantic tokenizer + triple-branch encoder + one shared classifier (see the module
    docstring). Inputs are (batch, patch_size, patch_size, num_bands) patch batches."""

    num_bands: int = 48
    num_classes: int = 7
    patch_size: int = 13
    num_tokens: int = 4
    dim: int = 64
    depth: int = 3
    num_heads: int = 8
    mlp_ratio: float = 4.0
    drop_rate: float = 0.1
    attn_drop_rate: float = 0.1
    drop_path_rate: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def example_inputs(self, batch_size: int = 1):
        return (jnp.zeros((batch_size, self.patch_size, self.patch_size, self.num_bands)),)

    @nn.compact
    def __call__(self, source: jax.Array, target: jax.Array | None = None, *, train: bool = False):
        """``model.apply(v, cube)``: target-branch logits (B, num_classes) (the inference path);
        ``model.apply(v, source, target, train=True)``: :class:`BiDAOutput` of paired source / target batches."""
        check_cube(source, self.num_bands, self.patch_size, "cube" if target is None else "source")
        if target is not None:
            check_cube(target, self.num_bands, self.patch_size, "target")
            if target.shape[0] != source.shape[0]:
                raise ValueError(f"source and target batches must have the same size (the coupled cross-attention "
                                 f"pairs them by index); got {source.shape[0]} and {target.shape[0]}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.param("token_wA", logical(nn.initializers.xavier_normal(), (None, None, None)),
                   (1, self.num_tokens, 64), self.param_dtype)  # official, unused by its forward
        self.param("token_wV", logical(nn.initializers.xavier_normal(), (None, None, "embed")),
                   (1, 64, self.dim), self.param_dtype)  # official, unused by its forward
        pos = self.param("pos_embedding", logical(nn.initializers.normal(0.02), (None, None, "embed")),
                         (1, self.num_tokens + 1, self.dim), self.param_dtype)
        cls = self.param("cls_token", logical(nn.initializers.zeros_init(), (None, None, "embed")),
                         (1, 1, self.dim), self.param_dtype)
        tokenizer = SemanticTokenizer(self.num_bands, self.dim, self.num_tokens, name="tokenizer", **kw)
        drop = nn.Dropout(self.drop_rate)

        def embed(cube):
            t = tokenizer(cube, train)
            t = jnp.concatenate([jnp.broadcast_to(cls.astype(t.dtype), (t.shape[0], 1, self.dim)), t], axis=1)
            return drop(t + pos.astype(t.dtype), deterministic=not train)

        if target is None:
            src, tgt, fusion = None, embed(source), None
        else:  # the source batch first: BatchNorm's running statistics see source, then target
            src = embed(source)
            tgt = embed(target)
            fusion = tgt
        fusion_src = None
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            src, tgt, fusion, fusion_src = TripleBranchBlock(
                self.num_heads, self.mlp_ratio, self.drop_rate, self.attn_drop_rate, float(rates[i]),
                name=f"blocks_{i}", **kw)(src, tgt, fusion, train)
        norm = LayerNorm(1e-5, name="norm", **kw)
        head = nn.Dense(self.num_classes, name="nn1", kernel_init=logical(nn.initializers.xavier_uniform(),
                                                                          ("embed", "classes")),
                        bias_init=logical(nn.initializers.normal(1e-6), ("classes",)), **kw)

        def logits(x):
            return head(norm(x)[:, 0])

        if target is None:
            return logits(tgt)
        return BiDAOutput(logits(src), logits(tgt), logits(fusion), logits(fusion_src))


# ---------------------------------------------------------------------------------------------
# Losses and the EMA teacher (official train_pipeline.py, loss/mmd_loss.py)


def gaussian_mmd(source: jax.Array, target: jax.Array, kernel_mul: float = 2.0, kernel_num: int = 5) -> jax.Array:
    """The official ``MMD_loss``: k = sum_i exp(-|a - b|^2 / (bw * mul^i)), i < ``kernel_num``, with bw the
    mean squared distance over the distinct pairs of [source; target] divided by mul^(num // 2) (not
    differentiated); returns mean(K_ss + K_tt - K_st - K_ts) over equal-size batches."""
    if source.shape != target.shape:
        raise ValueError(f"gaussian_mmd compares equal-size batches (as the official loss); got {source.shape} "
                         f"and {target.shape}")
    n = source.shape[0]
    total = jnp.concatenate([source, target]).astype(jnp.float32)
    d2 = jnp.sum(jnp.square(total[None] - total[:, None]), -1)
    m = total.shape[0]
    bandwidth = jax.lax.stop_gradient(jnp.sum(d2) / (m * m - m))
    bandwidth = jnp.where(bandwidth > 0, bandwidth, 1.0) / kernel_mul ** (kernel_num // 2)
    k = sum(jnp.exp(-d2 / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))
    return jnp.mean(k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n])


def distill_loss(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """Mean over the batch of the cross-entropy of the student against the teacher's softmax (the official
    ``distill_loss``; the teacher side is not detached)."""
    p = jax.nn.softmax(teacher_logits.astype(jnp.float32), -1)
    return jnp.mean(jnp.sum(-p * jax.nn.log_softmax(student_logits.astype(jnp.float32), -1), -1))


def softmax_mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """The official ``softmax_mse_loss``: the summed squared difference of the two softmaxes over the class count."""
    return jnp.sum(jnp.square(jax.nn.softmax(a, 1) - jax.nn.softmax(b, 1))) / a.shape[1]


def bida_loss(out: BiDAOutput, teacher: BiDAOutput, labels: jax.Array, *, lambda1: float = 0.1,
              lambda2: float = 1.0, align: bool | jax.Array = False, label_smoothing: float = 0.0,
              lambda_align: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The official objective CE(source) + lambda1 (alignment + distillation) + lambda2 consistency, with
    the alignment only where ``align`` (official: after epoch 100). ``out`` / ``teacher`` are the student's
    and the EMA teacher's :class:`BiDAOutput` (the teacher's is not differentiated); ``labels`` (B,) int
    are the source labels. ``lambda_align`` weights the alignment apart from the distillation (ablations;
    default ``lambda1``, the official objective). Returns the loss and its terms."""
    out = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), out)
    teacher = jax.tree_util.tree_map(lambda x: jax.lax.stop_gradient(x.astype(jnp.float32)), teacher)
    k = out.source.shape[-1]
    onehot = jax.nn.one_hot(labels, k) * (1 - label_smoothing) + label_smoothing / k
    cls = jnp.mean(jnp.sum(-onehot * jax.nn.log_softmax(out.source, -1), -1))
    distill = distill_loss(out.fusion, out.target) + distill_loss(out.fusion_source, out.source)
    b = out.source.shape[0]
    consistency = (softmax_mse(jax.nn.softmax(out.target, 1), jax.nn.softmax(teacher.target, 1))
                   + softmax_mse(jax.nn.softmax(out.source, 1), jax.nn.softmax(teacher.source, 1))) / b
    alignment = jnp.where(align, gaussian_mmd(out.source, out.target) / 2, 0.0)
    lambda_align = lambda1 if lambda_align is None else lambda_align
    loss = cls + lambda1 * distill + lambda_align * alignment + lambda2 * consistency
    return loss, {"classification": cls, "distillation": distill, "consistency": consistency, "alignment": alignment}


def ema_update(teacher: Any, student: Any, step: jax.Array | int, decay: float = 0.999) -> Any:
    """The official ``update_ema_variables`` after optimizer step ``step`` (1, 2, ...): teacher <- alpha teacher
    + (1 - alpha) student with alpha = min(1 - 1 / (step + 1), decay), leaf by leaf (the parameters)."""
    alpha = jnp.minimum(1.0 - 1.0 / (jnp.asarray(step, jnp.float32) + 1.0), decay)
    return jax.tree_util.tree_map(lambda t, s: (alpha * t + (1 - alpha) * s).astype(t.dtype), teacher, student)


# ---------------------------------------------------------------------------------------------
# Official checkpoint converter (``BiDAnet.state_dict()``)


def convert_bida(sd: StateDict, model: BiDA, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """An official ``BiDAnet`` state dict -> our variables (conv kernels to HWIO / DHWIO, fused qkv to
    (embed, 3, heads, head_dim), BatchNorm statistics to ``batch_stats``)."""
    p = "params/"
    out = {p + k: sd[k] for k in ("token_wA", "token_wV", "pos_embedding", "cls_token")}
    w = sd["conv3d_features.0.weight"]  # (8, 1, 3, 3, 3) over (band, row, column)
    out[p + "tokenizer/conv3d/kernel"] = np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0))
    out[p + "tokenizer/conv3d/bias"] = sd["conv3d_features.0.bias"]
    out.update(batch_norm_params(sd, "conv3d_features.1", "tokenizer/bn3d"))
    out[p + "tokenizer/conv2d/kernel"] = np.ascontiguousarray(sd["conv2d_features.0.weight"].transpose(2, 3, 1, 0))
    out[p + "tokenizer/conv2d/bias"] = sd["conv2d_features.0.bias"]
    out.update(batch_norm_params(sd, "conv2d_features.1", "tokenizer/bn2d"))
    out[p + "tokenizer/conv_a/kernel"] = np.ascontiguousarray(sd["conv_a.weight"].transpose(2, 3, 1, 0))
    for i in range(model.depth):
        t, o = f"blocks.{i}.", f"{p}blocks_{i}/"
        out.update(norm_params(sd, t + "norm1", o + "norm1"))
        out.update(norm_params(sd, t + "norm2", o + "norm2"))
        out[o + "qkv/kernel"] = qkv_fused(sd[t + "attn.qkv.weight"], model.num_heads)
        out[o + "proj/kernel"] = heads_out(sd[t + "attn.proj.weight"], model.num_heads)
        out[o + "proj/bias"] = sd[t + "attn.proj.bias"]
        out.update(dense_params(sd, t + "mlp.fc1", o + "mlp/fc1"))
        out.update(dense_params(sd, t + "mlp.fc2", o + "mlp/fc2"))
    out.update(norm_params(sd, "norm", p + "norm"))
    out.update(dense_params(sd, "nn1", p + "nn1"))
    return out


# ---------------------------------------------------------------------------------------------
# Variants: the official ``BiDA(dataset, opts)`` with main.py's defaults (dim 64, depth 3, 4 tokens,
# 8 heads, 13x13 patches). Parameter counts: the official BiDAnet built with these arguments.

VARIANTS = {"bida_houston": dict(num_bands=48, num_classes=7), "bida_hyrank": dict(num_bands=176, num_classes=12),
            "bida_mjg": dict(num_bands=64, num_classes=5)}
OFFICIAL_PARAMS = {"bida_houston": 376_567, "bida_hyrank": 966_716, "bida_mjg": 450_165}


def _info(name: str) -> ModelInfo:
    bands = VARIANTS[name]["num_bands"]
    return ModelInfo(paper=PAPER, arxiv="2507.02268", repo="YuxiangZhang-BIT/IEEE_TCSVT_BiDA",
                     input_size=(13, 13, bands), params_m=round(OFFICIAL_PARAMS[name] / 1e6, 2),
                     converter=convert_bida, task="hyperspectral classification", metric="OA")


@register_model(_info("bida_houston"))
def bida_houston(**overrides: Any) -> BiDA:
    """Houston 2013 -> Houston 2018 (48 bands, 7 classes), the official default task."""
    return BiDA(**{**VARIANTS["bida_houston"], **overrides})


@register_model(_info("bida_hyrank"))
def bida_hyrank(**overrides: Any) -> BiDA:
    """HyRANK Dioni -> Loukia (176 bands, 12 classes)."""
    return BiDA(**{**VARIANTS["bida_hyrank"], **overrides})


@register_model(_info("bida_mjg"))
def bida_mjg(**overrides: Any) -> BiDA:
    """The official 'MJG' tree-species tasks (64 bands, 5 classes)."""
    return BiDA(**{**VARIANTS["bida_mjg"], **overrides})
