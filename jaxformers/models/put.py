"""PUT: pluralistic image inpainting with a patch-based VQ-VAE and an un-quantized transformer.

Paper: "Reduce Information Loss in Transformers for Pluralistic Image Inpainting", Qiankun Liu,
Zhentao Tan, Dongdong Chen, Qi Chu, Xiyang Dai, Yinpeng Chen, Mengchen Liu, Lu Yuan, Nenghai Yu,
CVPR 2022, arXiv 2205.05076 (extended in TPAMI 2024, arXiv 2404.00513). Official code: liuqk3/PUT
(``image_synthesis/modeling/codecs/image_codec/patch_vqgan.py``: ``PatchVQGAN``, ``VectorQuantizer``,
``PatchEncoder2``, ``PatchConvDecoder2``, ``EncoderInPatchConvDecoder2``;
``image_synthesis/modeling/models/masked_image_inpainting_transformer_in_feature.py``;
``configs/put_cvpr2022/{ffhq,naturalscene,imagenet}/*.yaml``). Parameter names follow the official
modules so their state dicts convert one to one (``convert_pvqvae``, ``convert_put_transformer``).

**P-VQVAE** (``put_pvqvae``, 7,401,219 parameters as the official code counts them; the same for
the three data sets):

- Patch encoder: the image (values in [-1, 1]) is cut into **non-overlapping** 8x8 patches (a
  masked pixel can only change the token of its own patch), each flattened (channel-major, as
  ``F.unfold``) -> Linear 192->256 -> 8 residual MLP blocks (ReLU, Linear 256->128, ReLU, Linear
  128->256) -> ReLU, Linear 256->256, ReLU; then ``quant_conv`` (1x1). 256x256 -> 32x32 tokens.
  The official residual blocks (MLP and conv) start with ``nn.ReLU(inplace=True)``, which overwrites
  the tensor the residual then adds: they compute relu(x) + f(relu(x)), not x + f(relu(x)). We do
  the same (the released weights were trained so; the features and tokens then equal the official).
- **Dual codebook** (``VectorQuantizer``, 1024 x 256, EMA updates with decay 0.99, eps 1e-5,
  euclidean nearest neighbour): tokens whose 8x8 patch is fully visible draw from codes [0, 512),
  masked or partially masked ones from [512, 1024). The codebook is not trained by gradients: it
  lives, with its EMA statistics, in the ``batch_stats`` collection (updated in training with
  ``mutable=["batch_stats"]``, like BatchNorm statistics; the official keeps them as buffers).
  Straight-through estimator; the loss is the commitment term ||z - sg(q)||^2.
- **Multi-scale guided decoder** (``PatchConvDecoder2`` with ``up_layer_with_image``): ``post_quant_conv``,
  3x3 conv, 8 residual conv blocks, three ReLU + 4x4 stride-2 transposed convolutions (256->256->128->64)
  and ReLU + 3x3 conv to RGB. A reference encoder (3x3 conv then 4x4 stride-2 convs, ReLU between) reads
  the masked image; before each upsampling and at the end, features are replaced by the reference
  features where the (nearest-resized) mask says visible: ``x * (1 - m) + x_ref * m``.

**UQ-Transformer** (``put_transformer_ffhq`` / ``_places2`` / ``_imagenet``: 30 x 512, 35 x 512 and
35 x 1024, 8 heads, 95,491,072 / 111,252,992 / 442,706,432 parameters): the **un-quantized**
encoder features of the masked image (Linear to the width, plus a learned position table; 1024
tokens) go through bidirectional pre-norm blocks (MLP x4 with GELU2 = x * sigmoid(1.702 x)), a
final LayerNorm and a classifier over the 512 visible-patch codes. Training (``transformer_inputs``):
visible tokens are replaced by their quantized vectors with probability ``random_quantize`` (0.3),
the targets are the codes of the unmasked image, and the cross-entropy counts masked tokens only.
Inference (:func:`inpaint`): the official ``sample_largest``: repeatedly the ``tokens_per_step``
(official ``num_token_per_iter``, default 1) still-masked tokens with the most confident prediction
are sampled from their top-k codes (official ``filter_ratio`` as a count) with probabilities
``softmax(logits * temperature)`` (the official multiplies by its "temperature"), their features
replaced by the embedded code plus position, until none is left; the P-VQVAE decoder then renders
the codes guided by the visible pixels. Different keys give different completions (pluralistic);
``top_k=1`` is the deterministic greedy completion.

Masks follow the official convention: ``mask`` (B, H, W) is 1 (True) on **visible** pixels and 0 on
the holes; masked pixels of the reference image are set to -1 (black).

Deviations: images are NHWC. The official P-VQVAE is trained with EdgeConnect's adversarial,
perceptual and style losses after 5k steps; ``pvqvae_loss`` keeps the reconstruction (L1) and
commitment terms (no discriminator: a deliberate simplification for the offline task in
``train/inpainting.py``). ``inpaint`` runs the transformer over the whole batch every pass (the
official skips finished images; the result is the same) and composites the visible input pixels
into its output (the official returns the decoder's pixels everywhere: its ``combine_rec_and_gt``
is off, and the decoder already copies the visible pixels' features at full resolution).
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.convert.common import StateDict, conv2d, dense_params, heads_out, norm_params
from jaxformers.layers import Conv, Dense, LayerNorm, Mlp, MultiHeadAttention
from jaxformers.layers.linear import logical
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

# torch's Conv2d / Linear default (kaiming uniform, a = sqrt(5))
TORCH_CONV = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def gelu2(x: jax.Array) -> jax.Array:
    """The official GELU2: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def token_types(mask: jax.Array, patch: int = 8) -> jax.Array:
    """(B, H, W) visible-pixel mask -> (B, H/patch, W/patch) int32 token types (official ``get_token_type``):
    1 = fully visible, 0 = fully masked, 2 = partially masked."""
    b, h, w = mask.shape
    visible = mask.astype(jnp.float32).reshape(b, h // patch, patch, w // patch, patch).sum(axis=(2, 4))
    full = patch * patch
    return jnp.where(visible == full, 1, jnp.where(visible == 0, 0, 2)).astype(jnp.int32)


def masked_image(image: jax.Array, mask: jax.Array) -> jax.Array:
    """Visible pixels kept, holes set to -1 (pixel value 0 in [0, 255]; official ``multi_pixels_with_mask``)."""
    return jnp.where(mask[..., None].astype(bool), image, -1.0)


def _check_image_and_mask(image: jax.Array, mask: jax.Array | None, patch: int, who: str) -> None:
    if getattr(image, "ndim", 0) != 4 or image.shape[-1] != 3:
        raise ValueError(f"{who}: image must be NHWC RGB (batch, height, width, 3) in [-1, 1]; got shape "
                         f"{getattr(image, 'shape', None)}")
    if image.shape[1] % patch or image.shape[2] % patch:
        raise ValueError(f"{who}: image {image.shape[1]}x{image.shape[2]} must have sides divisible by the "
                         f"{patch}-px patch size (one token per patch)")
    if mask is not None and tuple(mask.shape) != tuple(image.shape[:3]):
        raise ValueError(f"{who}: mask must be (batch, height, width) = {tuple(image.shape[:3])} with 1 on visible "
                         f"pixels; got shape {tuple(mask.shape)}")


class LinearResBlock(nn.Module):
    """ReLU, Linear(C -> C/2), ReLU, Linear(C/2 -> C), plus the **rectified** input (official
    ``LinearResBlock``: its first ``nn.ReLU(inplace=True)`` overwrites the input the residual adds, so the
    block computes relu(x) + f(relu(x)); the released weights were trained that way)."""

    hidden: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(x)
        kw = dict(param_dtype=self.param_dtype, kernel_init=TORCH_CONV)
        y = Dense(self.hidden, axes=("embed", "mlp"), name="fc1", **kw)(x)
        return x + Dense(x.shape[-1], axes=("mlp", "embed"), name="fc2", **kw)(nn.relu(y))


class ConvResBlock(nn.Module):
    """ReLU, 3x3 conv (C -> C/2), ReLU, 1x1 conv (C/2 -> C), plus the rectified input (official
    ``ConvResBlock``; the same in-place ReLU as :class:`LinearResBlock`)."""

    hidden: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(x)
        y = Conv(self.hidden, (3, 3), padding=1, kernel_init=TORCH_CONV, param_dtype=self.param_dtype,
                 name="conv1")(x)
        return x + Conv(x.shape[-1], (1, 1), padding=0, kernel_init=TORCH_CONV, param_dtype=self.param_dtype,
                        name="conv2")(nn.relu(y))


def _deconv(features: int, name: str, param_dtype) -> nn.Conv:
    """torch ConvTranspose2d(k=4, s=2, p=1) as a convolution of the 2x-dilated input with the flipped kernel
    (our kernel (4, 4, in, out) = torch's (in, out, 4, 4) flipped and transposed; see ``_deconv_kernel``)."""
    return nn.Conv(features, (4, 4), padding=((2, 2), (2, 2)), input_dilation=(2, 2), param_dtype=param_dtype,
                   kernel_init=logical(TORCH_CONV, (None, None, "conv_in", "conv_out")),
                   bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)), name=name)


class PatchEncoder(nn.Module):
    """Official ``PatchEncoder2``: non-overlapping ``patch`` x ``patch`` patches -> MLP -> (B, h, w, out)."""

    patch: int = 8
    res_ch: int = 256
    out_ch: int = 256
    num_res_block: int = 8
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch
        # channel-major patch vectors, as torch's F.unfold: index = c * p * p + row * p + col
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // p, w // p, c * p * p)
        kw = dict(param_dtype=self.param_dtype, kernel_init=TORCH_CONV)
        x = Dense(self.res_ch, axes=("conv_in", "embed"), name="pre_layers_0", **kw)(x)
        for i in range(self.num_res_block):
            x = LinearResBlock(self.res_ch // 2, self.param_dtype, name=f"res_layers_{i}")(x)
        x = Dense(self.out_ch, axes=("embed", "embed"), name="post_layers_1", **kw)(nn.relu(x))
        return nn.relu(x)


class VectorQuantizer(nn.Module):
    """The dual codebook with EMA updates (official ``VectorQuantizer``, ``embed_ema=True``, euclidean,
    ``retrive``). State in ``batch_stats``: ``embedding`` (n_e, e_dim), ``cluster_size`` (n_e,),
    ``embedding_avg`` (n_e, e_dim). Codes [0, masked_embed_start) serve visible tokens (type 1), the rest
    masked and partially masked ones."""

    n_e: int = 1024
    e_dim: int = 256
    masked_embed_start: int = 512
    decay: float = 0.99
    eps: float = 1e-5

    def setup(self):
        init = lambda: jax.random.normal(self.make_rng("params"), (self.n_e, self.e_dim))  # noqa: E731
        self.embedding = self.variable("batch_stats", "embedding", init)
        self.cluster_size = self.variable("batch_stats", "cluster_size", lambda: jnp.zeros((self.n_e,)))
        self.embedding_avg = self.variable("batch_stats", "embedding_avg", lambda: self.embedding.value)

    def codebook(self) -> jax.Array:
        return self.embedding.value

    def indices(self, z: jax.Array, token_type: jax.Array | None = None) -> jax.Array:
        """Nearest code of each (..., e_dim) feature within its half of the dual codebook (``token_type`` 1:
        visible codes [0, masked_embed_start), else the rest; None: every token visible, as the official
        code without a mask)."""
        e = self.embedding.value
        d = (jnp.sum(z * z, -1, keepdims=True) + jnp.sum(e * e, -1)
             - 2.0 * jnp.einsum("...d,nd->...n", z, e, precision=jax.lax.Precision.HIGHEST))
        if self.masked_embed_start >= self.n_e:
            return jnp.argmin(d, -1).astype(jnp.int32)
        visible = jnp.ones(z.shape[:-1], bool) if token_type is None else token_type == 1
        first = jnp.arange(self.n_e) < self.masked_embed_start
        d = jnp.where(visible[..., None] == first, d, jnp.inf)
        return jnp.argmin(d, -1).astype(jnp.int32)

    def lookup(self, indices: jax.Array) -> jax.Array:
        return jnp.take(self.embedding.value, indices, axis=0)

    def __call__(self, z: jax.Array, token_type: jax.Array | None = None, *, train: bool = False):
        """(straight-through quantized z, indices, commitment loss per example (B,)) for z (B, h, w, e_dim)."""
        z32 = z.astype(jnp.float32)
        idx = self.indices(z32, token_type)
        q = self.lookup(idx)
        if train and not self.is_initializing():
            onehot = jax.nn.one_hot(idx.reshape(-1), self.n_e, dtype=jnp.float32)
            counts = onehot.sum(0)
            sums = onehot.T @ z32.reshape(-1, self.e_dim)
            size = self.cluster_size.value * self.decay + counts * (1 - self.decay)
            avg = self.embedding_avg.value * self.decay + sums * (1 - self.decay)
            n = size.sum()
            normed = (size + self.eps) / (n + self.n_e * self.eps) * n
            self.cluster_size.value = size
            self.embedding_avg.value = avg
            self.embedding.value = avg / normed[:, None]
        loss = jnp.mean(jnp.square(jax.lax.stop_gradient(q) - z32), axis=(1, 2, 3))
        q = z32 + jax.lax.stop_gradient(q - z32)
        return q.astype(z.dtype), idx, loss


class ReferenceEncoder(nn.Module):
    """Official ``EncoderInPatchConvDecoder2`` (``downsample_layer='conv'``): 3x3 conv to the last decoder
    width, then 4x4 stride-2 convs; outputs before each ReLU, keyed by resolution (the merge points)."""

    widths: tuple[int, ...] = (64, 128, 256, 256)
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[int, jax.Array]:
        out = {}
        for i, w in enumerate(self.widths):
            k, s, p = (3, 1, 1) if i == 0 else (4, 2, 1)
            x = Conv(w, (k, k), strides=s, padding=p, kernel_init=TORCH_CONV, param_dtype=self.param_dtype,
                     name=f"layers_{i}")(x)
            out[x.shape[1]] = x
            x = nn.relu(x)
        return out


class PatchConvDecoder(nn.Module):
    """Official ``PatchConvDecoder2`` with ``up_layer_with_image``: features + masked image + mask -> image."""

    res_ch: int = 256
    num_res_block: int = 8
    stride: int = 8
    out_ch: int = 3
    base_ch: int = 64  # the official post_layer_in_ch (fixed at 64 there), doubled per upsampling
    param_dtype: Any = jnp.float32

    def _up_widths(self) -> list[tuple[int, int]]:
        """(in, out) of each upsampling, low resolution first: (256, 256), (256, 128), (128, 64) for stride 8."""
        layers, out, s = [], self.base_ch, self.stride
        while s > 1:
            s //= 2
            layers.insert(0, (self.res_ch if s == 1 else out * 2, out))
            out *= 2
        return layers

    @nn.compact
    def __call__(self, x: jax.Array, reference: jax.Array, mask: jax.Array) -> jax.Array:
        kw = dict(param_dtype=self.param_dtype)
        x = Conv(self.res_ch, (3, 3), padding=1, kernel_init=TORCH_CONV, name="pre_layers_0", **kw)(x)
        for i in range(self.num_res_block):
            x = ConvResBlock(self.res_ch // 2, name=f"res_layers_{i}", **kw)(x)
        ups = self._up_widths()
        ref = ReferenceEncoder((ups[-1][1],) + tuple(o for _, o in ups[:-1][::-1]) + (ups[0][0],), name="encoder",
                               **kw)(reference)
        m = mask.astype(x.dtype)[..., None]

        def merge(x):
            size = x.shape[1]
            factor = m.shape[1] // size
            m_ = m[:, ::factor, ::factor]  # nearest resize by an integer factor
            return x * (1 - m_) + ref[size] * m_

        for i, (_, out) in enumerate(ups):
            x = _deconv(out, f"up_layers_{i}", self.param_dtype)(nn.relu(merge(x)))
        x = merge(x)
        return Conv(self.out_ch, (3, 3), padding=1, kernel_init=TORCH_CONV, name="post_layers_1", **kw)(nn.relu(x))


class PVQVAEOutput(NamedTuple):
    """A P-VQVAE pass: the reconstruction (B, H, W, 3), the encoder features and their quantized vectors
    (B, h, w, e_dim), and the commitment loss per example (B,)."""

    reconstruction: jax.Array
    features: jax.Array
    quantized: jax.Array
    commitment: jax.Array


class PVQVAE(nn.Module):
    """The patch-based VQ-VAE (official ``PatchVQGAN`` with the FFHQ / Places2 / ImageNet configuration)."""

    img_size: int = 256
    patch: int = 8
    res_ch: int = 256
    e_dim: int = 256
    n_e: int = 1024
    masked_embed_start: int = 512
    num_res_block: int = 8
    decoder_base_ch: int = 64
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(param_dtype=self.param_dtype)
        self.encoder = PatchEncoder(self.patch, self.res_ch, self.res_ch, self.num_res_block, **kw)
        self.quant_conv = Dense(self.e_dim, axes=("embed", "embed"), kernel_init=TORCH_CONV, **kw)
        self.quantize = VectorQuantizer(self.n_e, self.e_dim, self.masked_embed_start)
        self.post_quant_conv = Dense(self.res_ch, axes=("embed", "embed"), kernel_init=TORCH_CONV, **kw)
        self.decoder = PatchConvDecoder(self.res_ch, self.num_res_block, self.patch, base_ch=self.decoder_base_ch, **kw)

    def example_inputs(self, batch_size: int = 1):
        return (jnp.zeros((batch_size, self.img_size, self.img_size, 3)),
                jnp.ones((batch_size, self.img_size, self.img_size), jnp.float32))

    def encode(self, image: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Encoder features (B, h, w, e_dim) of ``image`` (holes filled with -1 where ``mask`` is given)."""
        _check_image_and_mask(image, mask, self.patch, "PVQVAE")
        x = image if mask is None else masked_image(image, mask)
        return self.quant_conv(self.encoder(x))

    def tokens(self, image: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Codes (B, h, w) int32 of the (masked) image; dual codebook by token type when ``mask`` is given."""
        types = None if mask is None else token_types(mask, self.patch)
        return self.quantize.indices(self.encode(image, mask).astype(jnp.float32), types)

    def quantize_features(self, features: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        types = None if mask is None else token_types(mask, self.patch)
        return self.quantize.lookup(self.quantize.indices(features.astype(jnp.float32), types))

    def embed_tokens(self, indices: jax.Array) -> jax.Array:
        """Codebook vectors of ``indices`` (any shape) -> (..., e_dim)."""
        return self.quantize.lookup(indices)

    def decode(self, quantized: jax.Array, image: jax.Array, mask: jax.Array) -> jax.Array:
        """Render (B, h, w, e_dim) code vectors, guided by the visible pixels of ``image`` (``mask``)."""
        return self.decoder(self.post_quant_conv(quantized), masked_image(image, mask), mask)

    def decode_tokens(self, indices: jax.Array, image: jax.Array, mask: jax.Array) -> jax.Array:
        return self.decode(self.embed_tokens(indices), image, mask)

    def __call__(self, image: jax.Array, mask: jax.Array | None = None, erase: jax.Array | None = None, *,
                 train: bool = False) -> PVQVAEOutput:
        """Reconstruct ``image`` guided by its visible pixels (``mask``, default all visible; an all-zero mask
        gives the decoder no pixels, the codes alone). ``erase`` (B, H, W), 1 where kept: the official data
        pipeline's ``erase_mask`` (applied to 20% of the training images): the image itself is erased (holes
        set to -1; the reconstruction target is the erased image, see :func:`pvqvae_loss`) and the tokens it
        touches draw from the masked half of the codebook. EMA codebook updates with ``train=True``
        (``mutable=["batch_stats"]``)."""
        _check_image_and_mask(image, mask, self.patch, "PVQVAE")
        _check_image_and_mask(image, erase, self.patch, "PVQVAE (erase)")
        if mask is None:
            mask = jnp.ones(image.shape[:3], jnp.float32)
        if erase is not None:
            image = masked_image(image, erase)
        features = self.quant_conv(self.encoder(image))
        types = None if erase is None else token_types(erase, self.patch)
        quantized, _, loss = self.quantize(features, types, train=train)
        rec = self.decode(quantized, image, mask)
        return PVQVAEOutput(rec, features, quantized, loss)


def pvqvae_loss(out: PVQVAEOutput, image: jax.Array, erase: jax.Array | None = None,
                commitment_weight: float = 1.0) -> jax.Array:
    """L1 reconstruction of ``image`` (erased by ``erase`` where given, as the model saw it) plus the
    commitment term (mean over the batch)."""
    target = image if erase is None else masked_image(image, erase)
    return jnp.mean(jnp.abs(out.reconstruction - target)) + commitment_weight * jnp.mean(out.commitment)


class PUTBlock(nn.Module):
    """Official ``Block``: x + Attn(LN(x)) (separate key / query / value Linears), x + MLP(LN(x)) with GELU2."""

    num_heads: int
    mlp_ratio: int = 4
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + MultiHeadAttention(self.num_heads, name="attn", **kw)(LayerNorm(1e-5, name="ln1", **kw)(x))
        y = Mlp(self.mlp_ratio * x.shape[-1], activation=gelu2, name="mlp", **kw)(LayerNorm(1e-5, name="ln2", **kw)(x))
        return constrain(x + y, ("act_batch", "act_len", "act_embed"))


class UQTransformer(nn.Module):
    """The un-quantized transformer (official ``MaskedImageInpaintingTransformer``): P-VQVAE features
    (B, L, e_dim) -> logits over the ``num_token`` visible-patch codes (B, L, num_token)."""

    num_layers: int = 30
    embed_dim: int = 512
    num_heads: int = 8
    seq_len: int = 1024
    e_dim: int = 256
    num_token: int = 512
    mlp_ratio: int = 4
    random_quantize: float = 0.3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.emb_proj = Dense(self.embed_dim, axes=("conv_in", "embed"), **kw)
        self.pos_emb = self.param("pos_emb", logical(nn.initializers.zeros_init(), (None, None, "embed")),
                                  (1, self.seq_len, self.embed_dim), self.param_dtype)
        self.blocks = [PUTBlock(self.num_heads, self.mlp_ratio, name=f"blocks_{i}", **kw)
                       for i in range(self.num_layers)]
        self.layer_norm = LayerNorm(1e-5, **kw)
        self.to_logits = Dense(self.num_token, axes=("embed", "vocab"), **kw)

    def example_inputs(self, batch_size: int = 1):
        return (jnp.zeros((batch_size, self.seq_len, self.e_dim)),)

    def embed(self, features: jax.Array) -> jax.Array:
        """Input embeddings: Linear(features) + position table."""
        return self.emb_proj(features) + self.pos_emb.astype(features.dtype)

    def logits(self, embeddings: jax.Array) -> jax.Array:
        x = embeddings
        for block in self.blocks:
            x = block(x)
        return self.to_logits(self.layer_norm(x))

    def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
        if getattr(features, "ndim", 0) != 3 or features.shape[1:] != (self.seq_len, self.e_dim):
            raise ValueError(f"UQTransformer takes P-VQVAE features (batch, {self.seq_len}, {self.e_dim}); got shape "
                             f"{getattr(features, 'shape', None)}")
        return self.logits(self.embed(features))


class TransformerInputs(NamedTuple):
    """What a UQ-Transformer training step reads: features (B, L, e_dim), target codes (B, L) and the loss
    weights (B, L) (1 on masked and partially masked tokens)."""

    features: jax.Array
    targets: jax.Array
    loss_mask: jax.Array


def transformer_inputs(pvqvae: PVQVAE, pvqvae_variables: Any, image: jax.Array, mask: jax.Array, rng: jax.Array,
                       random_quantize: float = 0.3) -> TransformerInputs:
    """The official ``prepare_data``: features of the masked image, each visible token replaced by its
    quantized vector with probability ``random_quantize``; targets = codes of the full image."""
    _check_image_and_mask(image, mask, pvqvae.patch, "transformer_inputs")
    feats = pvqvae.apply(pvqvae_variables, image, mask, method="encode")
    quant = pvqvae.apply(pvqvae_variables, feats, mask, method="quantize_features")
    types = token_types(mask, pvqvae.patch)
    swap = (jax.random.uniform(rng, types.shape) < random_quantize) & (types == 1)
    feats = jnp.where(swap[..., None], quant, feats)
    targets = pvqvae.apply(pvqvae_variables, image, method="tokens")
    b = image.shape[0]
    return TransformerInputs(feats.reshape(b, -1, feats.shape[-1]), targets.reshape(b, -1),
                             (types != 1).reshape(b, -1).astype(jnp.float32))


def transformer_loss(logits: jax.Array, inputs: TransformerInputs) -> jax.Array:
    """Cross-entropy on the masked tokens only (official ``forward(return_loss=True)``)."""
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), inputs.targets[..., None], -1)[..., 0]
    return jnp.sum(ce * inputs.loss_mask) / (jnp.sum(inputs.loss_mask) + 1e-18)


def inpaint(pvqvae: PVQVAE, pvqvae_variables: Any, transformer: UQTransformer, transformer_variables: Any,
            image: jax.Array, mask: jax.Array, rng: jax.Array, *, num_samples: int = 1, top_k: int = 50,
            temperature: float = 1.0, tokens_per_step: int = 1, num_steps: int | None = None) -> jax.Array:
    """Pluralistic completions (num_samples, B, H, W, 3) of ``image`` (B, H, W, 3) in [-1, 1] with holes where
    ``mask`` (B, H, W) is 0: the official ``sample_largest`` (each pass samples the ``tokens_per_step``
    still-masked tokens whose best logit is largest, from the ``top_k`` codes, with probabilities
    ``softmax(logits * temperature)`` as the official code scales them: a larger ``temperature`` is greedier;
    ``top_k=1`` is greedy), then the guided decoder; visible pixels are taken from the input. ``num_steps``
    (default: enough for every masked token of the batch) bounds the passes. One compiled program per
    configuration (models, sizes and the integer options)."""
    _check_image_and_mask(image, mask, pvqvae.patch, "inpaint")
    b = image.shape[0]
    types = token_types(mask, pvqvae.patch).reshape(b, -1)
    length = types.shape[1]
    if length != transformer.seq_len:
        raise ValueError(f"inpaint: the image gives {length} tokens but the transformer was built for "
                         f"seq_len={transformer.seq_len}")
    if num_steps is None:
        try:
            masked = int(jnp.max(jnp.sum(types != 1, axis=1)))
        except jax.errors.ConcretizationTypeError:
            masked = length
        num_steps = math.ceil(masked / tokens_per_step)
    return _sample_largest(pvqvae, pvqvae_variables, transformer, transformer_variables, image, mask, rng,
                           jnp.float32(temperature), num_samples=num_samples, top_k=min(top_k, transformer.num_token),
                           tokens_per_step=tokens_per_step, num_steps=num_steps)


@functools.partial(jax.jit, static_argnums=(0, 2), static_argnames=("num_samples", "top_k", "tokens_per_step",
                                                                     "num_steps"))
def _sample_largest(pvqvae, pvqvae_variables, transformer, transformer_variables, image, mask, rng, temperature, *,
                    num_samples, top_k, tokens_per_step, num_steps):
    pvqvae_variables, transformer_variables = nn.unbox((pvqvae_variables, transformer_variables))
    b = image.shape[0]
    types = token_types(mask, pvqvae.patch).reshape(b, -1)
    length = types.shape[1]
    feats = pvqvae.apply(pvqvae_variables, image, mask, method="encode")
    start = pvqvae.apply(pvqvae_variables, image, mask, method="tokens").reshape(b, -1)
    emb0 = transformer.apply(transformer_variables, feats.reshape(b, length, -1), method="embed")
    codebook = pvqvae.apply(pvqvae_variables, jnp.arange(transformer.num_token), method="embed_tokens")
    code_emb = transformer.apply(transformer_variables, codebook, method=lambda m, c: m.emb_proj(c))
    pos = transformer_variables["params"]["pos_emb"][0]
    rows = jnp.arange(b)[:, None]

    def one(key):
        def step(i, carry):
            emb, toks, known, key = carry
            key, k_sample = jax.random.split(key)
            logits = transformer.apply(transformer_variables, emb, method="logits").astype(jnp.float32)
            best = jnp.where(known, -jnp.inf, logits.max(-1))
            order = jax.lax.top_k(best, tokens_per_step)[1]  # (B, n) the most confident still-masked tokens
            pick = jnp.take_along_axis(logits, order[..., None], 1)  # (B, n, K)
            kth = jax.lax.top_k(pick, top_k)[0][..., -1:]
            pick = jnp.where(pick < kth, -jnp.inf, pick)
            sample = jax.random.categorical(k_sample, pick * temperature, axis=-1)  # (B, n)
            fill = ~jnp.take_along_axis(known, order, 1)  # (already known when fewer masked tokens are left)
            toks = toks.at[rows, order].set(jnp.where(fill, sample, toks[rows, order]))
            new = code_emb[sample] + pos[order]
            emb = emb.at[rows, order].set(jnp.where(fill[..., None], new, emb[rows, order]))
            known = known.at[rows, order].set(True)
            return emb, toks, known, key

        _, toks, _, _ = jax.lax.fori_loop(0, num_steps, step, (emb0, start, types == 1, key))
        h, w = image.shape[1] // pvqvae.patch, image.shape[2] // pvqvae.patch
        out = pvqvae.apply(pvqvae_variables, toks.reshape(b, h, w), image, mask, method="decode_tokens")
        keep = mask[..., None].astype(bool)
        return jnp.where(keep, image, jnp.clip(out, -1.0, 1.0))

    return jax.lax.map(one, jax.random.split(rng, num_samples))


# ---------------------------------------------------------------------------------------------
# Official checkpoint converters (liuqk3/PUT ``PatchVQGAN.state_dict()``, transformer ``state_dict()``)


def _deconv_kernel(w: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d weight (in, out, kh, kw) -> our dilated-convolution kernel (kh, kw, in, out)."""
    return np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))


def _conv(sd: StateDict, t: str, o: str) -> dict[str, np.ndarray]:
    return {o + "/kernel": conv2d(sd[t + ".weight"]), o + "/bias": sd[t + ".bias"]}


def convert_pvqvae(sd: StateDict, model: PVQVAE, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Official ``PatchVQGAN`` state dict (encoder, quant_conv, quantize buffers, post_quant_conv, decoder) -> ours."""
    out = {}
    p, q = "params/", "batch_stats/"
    out.update(dense_params(sd, "encoder.pre_layers.0", p + "encoder/pre_layers_0"))
    for i in range(model.num_res_block):
        out.update(dense_params(sd, f"encoder.res_layers.{i}.layers.1", p + f"encoder/res_layers_{i}/fc1"))
        out.update(dense_params(sd, f"encoder.res_layers.{i}.layers.3", p + f"encoder/res_layers_{i}/fc2"))
    out.update(dense_params(sd, "encoder.post_layers.1", p + "encoder/post_layers_1"))
    for name in ("quant_conv", "post_quant_conv"):  # 1x1 convolutions = Linears over channels
        out[p + name + "/kernel"] = conv2d(sd[name + ".weight"])[0, 0]
        out[p + name + "/bias"] = sd[name + ".bias"]
    for k in ("embedding", "cluster_size", "embedding_avg"):
        out[q + "quantize/" + k] = sd["quantize." + k]
    d = "decoder/"
    out.update(_conv(sd, "decoder.pre_layers.0", p + d + "pre_layers_0"))
    for i in range(model.num_res_block):
        out.update(_conv(sd, f"decoder.res_layers.{i}.conv.1", p + d + f"res_layers_{i}/conv1"))
        out.update(_conv(sd, f"decoder.res_layers.{i}.conv.3", p + d + f"res_layers_{i}/conv2"))
    for i in range(int(round(math.log2(model.patch)))):
        out[p + d + f"up_layers_{i}/kernel"] = _deconv_kernel(sd[f"decoder.up_layers.{i}.deconv.weight"])
        out[p + d + f"up_layers_{i}/bias"] = sd[f"decoder.up_layers.{i}.deconv.bias"]
        out.update(_conv(sd, f"decoder.encoder.layers.{i}", p + d + f"encoder/layers_{i}"))
    n = int(round(math.log2(model.patch)))
    out.update(_conv(sd, f"decoder.encoder.layers.{n}", p + d + f"encoder/layers_{n}"))
    out.update(_conv(sd, "decoder.post_layers.1", p + d + "post_layers_1"))
    return out


def convert_put_transformer(sd: StateDict, model: UQTransformer, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Official ``MaskedImageInpaintingTransformer`` state dict -> ours; the bundled ``content_codec.*`` keys
    (the P-VQVAE, converted by ``convert_pvqvae``) are skipped."""
    p = "params/"
    out = {p + "pos_emb": sd["pos_emb"]}
    out.update(dense_params(sd, "emb_proj", p + "emb_proj"))
    h = model.num_heads
    for i in range(model.num_layers):
        t, o = f"blocks.{i}.", f"{p}blocks_{i}/"
        out.update(norm_params(sd, t + "ln1", o + "ln1"))
        out.update(norm_params(sd, t + "ln2", o + "ln2"))
        w = np.stack([sd[t + f"attn.{n}.weight"] for n in ("query", "key", "value")])  # (3, C, E)
        out[o + "attn/qkv/kernel"] = np.ascontiguousarray(w.reshape(3, h, -1, w.shape[-1]).transpose(3, 0, 1, 2))
        out[o + "attn/qkv/bias"] = np.stack([sd[t + f"attn.{n}.bias"] for n in ("query", "key", "value")]
                                            ).reshape(3, h, -1)
        out[o + "attn/proj/kernel"] = heads_out(sd[t + "attn.proj.weight"], h)
        out[o + "attn/proj/bias"] = sd[t + "attn.proj.bias"]
        out.update(dense_params(sd, t + "mlp.0", o + "mlp/fc1"))
        out.update(dense_params(sd, t + "mlp.2", o + "mlp/fc2"))
    out.update(norm_params(sd, "layer_norm", p + "layer_norm"))
    out.update(dense_params(sd, "to_logits", p + "to_logits"))
    sd.skip(*(k for k in sd.keys() if k.startswith("content_codec.")))
    return out


# ---------------------------------------------------------------------------------------------
# Variants: configs/put_cvpr2022/*.yaml; params counted with the official code (transformer without its
# bundled P-VQVAE). No top-1: inpainting (FID / LPIPS per mask ratio in the paper).

TRANSFORMERS = {"put_transformer_ffhq": (dict(num_layers=30, embed_dim=512), 95_491_072),
                "put_transformer_places2": (dict(num_layers=35, embed_dim=512), 111_252_992),
                "put_transformer_imagenet": (dict(num_layers=35, embed_dim=1024), 442_706_432)}
PVQVAE_PARAMS = 7_401_219


def _info(params: int, input_size: tuple[int, ...], converter) -> ModelInfo:
    return ModelInfo(paper="Reduce Information Loss in Transformers for Pluralistic Image Inpainting",
                     arxiv="2205.05076", repo="liuqk3/PUT", input_size=input_size, params_m=round(params / 1e6, 2),
                     converter=converter, task="inpainting")


@register_model(_info(PVQVAE_PARAMS, (256, 256, 3), convert_pvqvae))
def put_pvqvae(**overrides: Any) -> PVQVAE:
    """The P-VQVAE of every PUT configuration (8-px patches, dual 1024-code codebook, guided decoder)."""
    return PVQVAE(**overrides)


@register_model(_info(TRANSFORMERS["put_transformer_ffhq"][1], (1024, 256), convert_put_transformer))
def put_transformer_ffhq(**overrides: Any) -> UQTransformer:
    """UQ-Transformer for FFHQ: 30 layers of 512."""
    return UQTransformer(**{**TRANSFORMERS["put_transformer_ffhq"][0], **overrides})


@register_model(_info(TRANSFORMERS["put_transformer_places2"][1], (1024, 256), convert_put_transformer))
def put_transformer_places2(**overrides: Any) -> UQTransformer:
    """UQ-Transformer for Places2 (the official ``naturalscene`` configuration): 35 layers of 512."""
    return UQTransformer(**{**TRANSFORMERS["put_transformer_places2"][0], **overrides})


@register_model(_info(TRANSFORMERS["put_transformer_imagenet"][1], (1024, 256), convert_put_transformer))
def put_transformer_imagenet(**overrides: Any) -> UQTransformer:
    """UQ-Transformer for ImageNet: 35 layers of 1024."""
    return UQTransformer(**{**TRANSFORMERS["put_transformer_imagenet"][0], **overrides})
