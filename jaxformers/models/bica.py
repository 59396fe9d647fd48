"""BiCA: Bi-directional Contextual Attention for 3D dense captioning.

Paper: Minjung Kim, Hyung Suk Lim, Soonyoung Lee, Bumsoo Kim, Gunhee Kim, "Bi-directional Contextual
Attention for 3D Dense Captioning", ECCV 2024 (oral), arXiv 2408.06662. **No official code is public**
(searched GitHub for the title and "BiCA 3D dense captioning"), and the paper's full text was not available
while this was written. Every item below says where it comes from:

- **[abstract]**: the paper's abstract (the authors' own words);
- **[summary]**: a detailed third-party summary of the paper, https://en.papernotes.org/ECCV2024/3d_vision/
  bi-directional_contextual_attention_for_3d_dense_captioning/ (a paraphrase, not the paper; its numbers
  were not checked against the paper);
- **[Vote2Cap-DETR]**: the code BiCA builds on, Vote2Cap-DETR (Chen et al., CVPR 2023, arXiv 2301.02508;
  official code ch3cook-fdu/Vote2Cap-DETR, ``models/detector_Vote2Cap_DETR/*`` and
  ``models/captioner_dcc/captioner.py``) and its 3DETR encoder (Misra et al., ICCV 2021, arXiv 2109.08141;
  facebookresearch/3detr);
- ***Choice***: ours, where no source says.

Construction:

- **Scene encoder** ([summary]: 3DETR's encoder, 1024 tokens of width 256; details [Vote2Cap-DETR]
  ``build_preencoder`` / ``build_encoder``): a set-abstraction tokenizer (2048 FPS centres, radius 0.2, 64
  neighbours, MLP in→64→128→256, ``jaxformers.layers.pointnet.SetAbstraction``), then the *masked* 3DETR
  encoder: 3 pre-norm layers (width 256, 4 heads, FFN 128, ReLU, dropout 0.1) whose self-attention only sees
  points closer than 0.16 / 0.64 / 1.44 (the official code squares the radii 0.4 / 0.8 / 1.2 and compares the
  squares with the *unsquared* distance; we keep the effective radii), with an interim set abstraction after
  the first layer (1024 centres, radius 0.4, 32 neighbours, MLP 256→256→256).
- **Instance queries** ([summary]: 256 queries, an FFN predicts vote offsets, a set abstraction of radius 0.3
  on the *voted* coordinates, unlike Vote2Cap-DETR's "FPS, then voting"): the FFN, feature update and
  L2-normalisation are [Vote2Cap-DETR]'s ``VoteQuery`` (FFN 256→256→256→3+256 with BN + ReLU; set abstraction
  of 16 neighbours, MLP 256×3). The 256 centres are taken by FPS over the **voted** xyz (the summary's
  reading; ``VoteQuery`` runs FPS on the un-voted encoder xyz and groups around those seeds' votes). Their
  Fourier position embedding (3DETR's ``PositionEmbeddingCoordsSine``, Gaussian B of shape (3, 128), scale 1,
  coordinates normalised to the scene's min/max) goes through ``query_projection`` [Vote2Cap-DETR].
- **Context queries** ([abstract]: queries for the "non-object contexts", decoded in parallel with the
  instance queries; [summary]: **512** FPS centres of the encoder tokens and a set abstraction of **radius
  1.2**). *Choice*: 32 neighbours and the MLP 256×3 (as the vote query's), over the L2-normalised encoder
  features, with their own position projection (as ``query_projection``).
- **Two decoders** ([summary]: an Instance Decoder and a Context Decoder of 8 transformer decoder layers
  each, with Fourier position encodings, operating independently): two ``TransformerDecoder``s with their own
  weights, each 3DETR's decoder [Vote2Cap-DETR] (8 pre-norm layers, width 256, 4 heads, FFN 256, dropout 0.1,
  one final LayerNorm applied to every layer's output). The instance and context queries never attend to each
  other; *Choice*: both cross-attend to the same projected encoder tokens (one ``enc_to_dec`` projection).
- **Bi-directional contextual attention** (``BiCAModule``, once, on the last layers of the two decoders,
  [summary]). [abstract]: BiCA forms "object-aware contexts, where the contexts relevant to each object is
  summarized, and context-aware objects, where the objects relevant to the summarized object-aware contexts
  are aggregated". [summary]: O4C ("objects for context"): attention of each instance query over all context
  queries gives a weighted sum of the context features, one object-aware context **V_ac** per object, "scaled
  by a learnable parameter γ"; C4O ("contexts for object"): attention of the object-aware contexts over the
  instance queries gives a weighted sum of the instance features, the context-aware object **V_ao**,
  "regulated by a learnable parameter λ". No source mentions residuals, norms or FFNs, and none gives the
  equations, so the module is attention times the scalar and nothing else:
  V_ac = γ · Attn(V_o + p_o, V_c + p_c, V_c), V_ao = λ · Attn(V_ac + p_o, V_o + p_o, V_o).
  *Choices*: the attention is the shared ``MultiHeadAttention`` (separate q / k / v projections and an output
  projection, width 256) with the decoders' 4 heads and no dropout; the query position embeddings p_o / p_c
  are added to queries and keys as in the 3DETR decoder's attention (the decoded features carry no explicit
  coordinates, and the captions describe spatial relations), V_ac sitting at its object's position; γ and λ
  start at 0 (``bica_scale_init``), as the learnable scale of DANet's attention (Fu et al., CVPR 2019), so
  the model starts as its "V_o only" ablation and learns how much context to take.
- **Box heads** ([summary]: 5 MLP heads on the instance decoder's V_o only; the heads and boxes are
  [Vote2Cap-DETR]'s ``GenericMLP`` 256→256→256→out with BN, ReLU and dropout 0.3): class logits over
  ``num_classes`` + 1 (the last is "no object"; objectness = 1 − its probability), centre = query xyz + sigmoid −
  0.5, size = sigmoid × scene extent, angle class and angle residual with one angle bin (ScanNet is
  axis-aligned: the official code multiplies the angle by 0, so these two heads only add parameters and
  the angle losses). The heads are shared by every decoder layer (``aux_outputs``).
- **Caption head** ([summary]: a GPT-2-style decoder of 2 blocks, whose prefix "in place of the SOS token"
  is the concatenation V_a = (V_o, V_ac, V_ao); beam size 5 at inference): [Vote2Cap-DETR]'s GPT-2 captioner
  (width 256, 4 heads, fixed sinusoidal positions over 64 slots, tied output embedding, ScanRefer vocabulary
  of 3433 words: pad 0, unk 1, sos 2, eos 3; captions carry no sos and end with eos, the prefix predicts the
  first word). *Choice*: the prefix is **one** token, Vote2Cap-DETR's ``feature_projector`` (Linear, LN, ReLU,
  Linear) applied to the 3 × 256 concatenation (the summary does not say one token or three). No
  cross-attention to scene tokens (the summary mentions none; Vote2Cap-DETR's 128 nearest encoder tokens are
  replaced by the BiCA features). ``use_context=False`` is the paper's "V_o only" ablation (no context
  queries, context decoder or BiCA module; the prefix projects V_o alone). Decoding runs through the shared
  ``KVCache``: ``generate`` is greedy, or with ``num_beams=5`` the beam search of Vote2Cap-DETR's evaluation
  (``generation_utils.beam_search_decode``, its quirks included: ``CaptionHead.beam_search``).
- **Losses** (``set_criterion``, ``caption_loss``; [summary]: L = 10 · L_vote + 1 · Σ_layers L_det + 5 · L_cap;
  the terms are [Vote2Cap-DETR]'s ``config.py`` / ``criterion.py``): Hungarian matching on cost 1·(−p(class)) +
  2·(−GIoU) (scipy on the host via ``jaxformers.segmentation.matching.hungarian_match``), done **per decoder
  layer**: each layer's box predictions are matched and scored on their own and the set losses of all 8
  layers are summed (``SetPredictionCriterion`` with ``aux_outputs``). Per layer: class cross-entropy with
  "no object" weight 0.25, 5·L1 of the normalised centres, 1·L1 of the normalised sizes, 10·(1 − GIoU),
  0.1·angle-class CE and 0.5·Huber of the angle residual (targets 0: axis-aligned boxes). The vote loss
  (seeds inside a box regress to its centre) has weight **10** (``VoteQueryCriterion`` multiplies it by 10,
  the summary's β1 = 10). 5·caption cross-entropy on the queries the last layer matched (teacher forcing).
  The three-stage schedule ([summary]: 1080-epoch detector pre-training, 720 epochs MLE, 180 epochs SCST) and
  SCST are not implemented; the optimizer, learning rate and batch size are in no source.
- **Deviations** from [Vote2Cap-DETR]'s code: the pointnet2 CUDA FPS skips points within 0.03 of the origin;
  ours does not. The vote loss regresses each seed to the first box containing it (VoteNet keeps up to 3 and
  takes the nearest). GPT-2's dropout (0.1 on embeddings, attention and residuals) is left out of the
  captioner. BatchNorm is kept where the official MLPs have it (training needs ``mutable=["batch_stats"]``).
- **Parameter count**: the [summary] reports **16.9M** for the paper's model (not checked against the paper).
  ``bica_scanrefer`` (xyz + colour + normal + height input, 18 ScanNet classes, ScanRefer vocabulary) has
  16,692,128 parameters by this construction (``BICA_SCANREFER_PARAMS``): 16.7M, about 0.21M (1.2 %) below
  16.9M. The construction is ours where the sources are silent (the BiCA attention's projections, the context
  generator's MLP, the prefix layout), so the gap is not located; the widths were not tuned to close it.
  ``bica_nr3d`` (the 2937-word Nr3D vocabulary) has 16,565,152.

Use (training and evaluation on generated rooms: ``train/dense_captioning.py``)::

    model = jaxformers.create_model("bica_scanrefer")
    out = model.apply(variables, points)                        # points (B, N, 10), N >= 2048
    captions = model.apply(variables, out["prefix"], method="generate")   # (B, 256, 32) token ids, greedy
    captions = model.apply(variables, out["prefix"], num_beams=5, method="generate")   # Vote2Cap-DETR's beams
    loss, terms, assign = set_criterion(out, gt_center, gt_size, gt_class, gt_valid)
    logits = model.apply(variables, matched_prefix(out["prefix"], assign), gt_tokens, method="caption_logits")
    total = loss + LOSS_WEIGHTS["caption"] * caption_loss(logits, gt_tokens, gt_valid & (assign >= 0))
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.layers.attention import MultiHeadAttention, init_kv_cache
from jaxformers.layers.linear import Dense, logical
from jaxformers.layers.mlp import Mlp
from jaxformers.layers.norm import BatchNorm, LayerNorm
from jaxformers.layers.pointnet import SetAbstraction, farthest_point_sample
from jaxformers.layers.pos_embed import sincos_1d
from jaxformers.models.gpt import DecoderLayer as GPT2Block
from jaxformers.registry import ModelInfo, register_model
from jaxformers.sharding import constrain

PAD_ID, UNK_ID, SOS_ID, EOS_ID = 0, 1, 2, 3
ACT = ("act_batch", "act_len", "act_embed")
NUM_ANGLE_BIN = 1  # ScanNet's boxes are axis-aligned (Vote2Cap-DETR's ScanNet config)
# Parameters of the registered configurations (``jaxformers.count_params``; the summary's 16.9M: see above).
BICA_SCANREFER_PARAMS = 16_692_128
BICA_NR3D_PARAMS = 16_565_152

# ---------------------------------------------------------------------------------------------
# Boxes (axis-aligned: centre (..., 3), size (..., 3))


def box_volume(size: jax.Array) -> jax.Array:
    return jnp.prod(jnp.maximum(size, 0.0), -1)


def pairwise_iou_3d(c1, s1, c2, s2, generalized: bool = False) -> jax.Array:
    """(..., Q, 3) boxes vs (..., S, 3) boxes -> (..., Q, S) IoU (or GIoU) of axis-aligned 3-D boxes."""
    lo1, hi1 = c1 - s1 / 2, c1 + s1 / 2
    lo2, hi2 = c2 - s2 / 2, c2 + s2 / 2
    inter = box_volume(jnp.minimum(hi1[..., :, None, :], hi2[..., None, :, :])
                       - jnp.maximum(lo1[..., :, None, :], lo2[..., None, :, :]))
    union = box_volume(s1)[..., :, None] + box_volume(s2)[..., None, :] - inter
    iou = inter / jnp.maximum(union, 1e-8)
    if not generalized:
        return iou
    hull = box_volume(jnp.maximum(hi1[..., :, None, :], hi2[..., None, :, :])
                      - jnp.minimum(lo1[..., :, None, :], lo2[..., None, :, :]))
    return iou - (hull - union) / jnp.maximum(hull, 1e-8)


# ---------------------------------------------------------------------------------------------
# Building blocks


def fourier_embedding(xyz: jax.Array, lo: jax.Array, hi: jax.Array, dim: int, seed: int = 0) -> jax.Array:
    """3DETR's ``PositionEmbeddingCoordsSine(pos_type="fourier", normalize=True)``: xyz scaled to [0, 1] by
    the scene's (lo, hi), times 2π, projected by a fixed Gaussian B (3, dim / 2) -> [sin, cos]. B is a
    frozen random buffer in the official code; here it is drawn from ``seed`` (no parameter)."""
    b = jnp.asarray(np.random.default_rng(seed).standard_normal((3, dim // 2)), jnp.float32)
    x = (xyz - lo[:, None]) / jnp.maximum(hi - lo, 1e-6)[:, None]
    proj = (2 * np.pi * x) @ b
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], -1)


class GenericMLP(nn.Module):
    """3DETR's ``GenericMLP`` as 1x1 layers: hidden Dense (no bias with BN) -> BN -> ReLU -> dropout, then the
    output Dense (optionally BN + ReLU)."""

    hidden: Sequence[int]
    out: int
    norm: bool = True
    dropout: float = 0.0
    hidden_bias: bool = False
    out_bias: bool = True
    out_act: bool = False
    out_norm: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i, width in enumerate(self.hidden):
            x = Dense(width, axes=(None, "mlp"), use_bias=self.hidden_bias or not self.norm, name=f"fc{i}", **kw)(x)
            if self.norm:
                x = BatchNorm(train=train, axis_name="mlp", name=f"bn{i}", **kw)(x)
            x = nn.Dropout(self.dropout)(nn.relu(x), deterministic=not train)
        x = Dense(self.out, axes=("mlp", None), use_bias=self.out_bias, name="out", **kw)(x)
        if self.out_norm:
            x = BatchNorm(train=train, axis_name=None, name="bn_out", **kw)(x)
        return nn.relu(x) if self.out_act else x


class EncoderLayer(nn.Module):
    """3DETR's pre-norm ``TransformerEncoderLayer`` (no position embedding in the masked encoder)."""

    num_heads: int
    ffn_dim: int
    dropout: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = lambda t: nn.Dropout(self.dropout)(t, deterministic=not train)  # noqa: E731
        y = LayerNorm(1e-5, name="norm1", **kw)(x)
        x = x + drop(MultiHeadAttention(self.num_heads, attention_dropout=self.dropout, name="self_attn", **kw)(
            y, mask=mask, train=train))
        y = LayerNorm(1e-5, name="norm2", **kw)(x)
        return x + Mlp(self.ffn_dim, activation=nn.relu, dropout=self.dropout, name="ffn", **kw)(y, train=train)


class DecoderLayer(nn.Module):
    """3DETR's pre-norm ``TransformerDecoderLayer``: self-attention (q = k = x + pos, v = x), cross-attention
    to the encoder tokens (k = memory + its pos, v = memory), FFN."""

    num_heads: int
    ffn_dim: int
    dropout: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, pos, memory, memory_pos, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = lambda t: nn.Dropout(self.dropout)(t, deterministic=not train)  # noqa: E731
        attn = dict(separate_qkv=True, attention_dropout=self.dropout, **kw)
        y = LayerNorm(1e-5, name="norm1", **kw)(x)
        x = x + drop(MultiHeadAttention(self.num_heads, name="self_attn", **attn)(y + pos, value=y, train=train))
        y = LayerNorm(1e-5, name="norm2", **kw)(x)
        x = x + drop(MultiHeadAttention(self.num_heads, name="cross_attn", **attn)(
            y + pos, memory + memory_pos, value=memory, train=train))
        y = LayerNorm(1e-5, name="norm3", **kw)(x)
        return x + Mlp(self.ffn_dim, activation=nn.relu, dropout=self.dropout, name="ffn", **kw)(y, train=train)


class TransformerDecoder(nn.Module):
    """3DETR's ``TransformerDecoder(return_intermediate=True)`` (Vote2Cap-DETR's ``build_decoder``): ``num_layers``
    ``DecoderLayer``s and one final LayerNorm applied to every layer's output. Returns the list of the
    ``num_layers`` normalised outputs, each (B, Q, dim); the last is the decoder's output."""

    num_layers: int
    num_heads: int
    ffn_dim: int
    dropout: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, pos, memory, memory_pos, train: bool = False) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = LayerNorm(1e-5, name="norm", **kw)
        # Batch-sharded inputs. Without these constraints XLA's SPMD partitioner computes wrong self-attention
        # outputs for half of the batch on a data x fsdp x tensor = 2 x 2 x 2 CPU mesh (the tiny test model; jax
        # 0.10.2 and 0.12.1), from q / k / v that equal one device's: a partitioner bug, worked around here.
        x, pos, memory, memory_pos = (constrain(t, ACT) for t in (x, pos, memory, memory_pos))
        outputs = []
        for i in range(self.num_layers):
            x = DecoderLayer(self.num_heads, self.ffn_dim, self.dropout, name=f"layers_{i}", **kw)(
                x, pos, memory, memory_pos, train)
            outputs.append(norm(x))
        return outputs


class BiCAModule(nn.Module):
    """Bi-directional contextual attention on the decoded instance features V_o (B, Q, D) and context features
    V_c (B, C, D), at their positions (the decoders' query position embeddings). Returns (V_ac, V_ao), both
    (B, Q, D): one per object.

    - O4C ("objects for context"): each instance query attends over all context queries and takes a weighted
      sum of the context features: the object-aware context V_ac = γ · Attn(q = V_o + pos_o, k = V_c + pos_c,
      v = V_c).
    - C4O ("contexts for object"): each object-aware context attends over the instance queries and takes a
      weighted sum of the instance features: the context-aware object V_ao = λ · Attn(q = V_ac + pos_o,
      k = V_o + pos_o, v = V_o).

    Attention and the learnable scalars only: no residual, norm or FFN (see the module docstring for which
    parts are the paper's and which are our choices)."""

    num_heads: int
    scale_init: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inst, inst_pos, ctx, ctx_pos):
        kw = dict(separate_qkv=True, dtype=self.dtype, param_dtype=self.param_dtype)
        scalar = logical(nn.initializers.constant(self.scale_init), ())
        gamma = self.param("gamma", scalar, (), self.param_dtype)
        lam = self.param("lambda", scalar, (), self.param_dtype)
        object_context = gamma * MultiHeadAttention(self.num_heads, name="objects_for_context", **kw)(
            inst + inst_pos, ctx + ctx_pos, value=ctx)
        context_object = lam * MultiHeadAttention(self.num_heads, name="contexts_for_object", **kw)(
            object_context + inst_pos, inst + inst_pos, value=inst)
        return object_context, context_object


def sinusoid_table(length: int, dim: int) -> np.ndarray:
    """Vote2Cap-DETR's ``position_embedding``: the Transformer sinusoids (``sincos_1d``) with sin on even and cos
    on odd channels (frozen)."""
    sin, cos = np.split(sincos_1d(length, dim), 2, axis=1)
    return np.stack([sin, cos], -1).reshape(length, dim)


class CaptionHead(nn.Module):
    """Vote2Cap-DETR's GPT-2 captioner on a prefix of visual tokens (tied input / output embedding)."""

    vocab_size: int
    dim: int = 256
    depth: int = 2
    num_heads: int = 4
    max_positions: int = 64
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.wte = nn.Embed(self.vocab_size, self.dim, embedding_init=logical(nn.initializers.normal(0.02),
                                                                               ("vocab", "embed")), **kw)
        # GPT-2 blocks (pre-LN, causal attention, 4x tanh-GELU MLP), without GPT-2's dropout (see Deviations)
        self.blocks = [GPT2Block(self.num_heads, 4 * self.dim, dropout=0.0, **kw) for _ in range(self.depth)]
        self.ln_f = LayerNorm(1e-5, **kw)

    def _positions(self, start, length):
        table = jnp.asarray(sinusoid_table(self.max_positions, self.dim))
        return jax.lax.dynamic_slice_in_dim(table, start, length, 0)

    def _logits(self, h):
        return self.wte.attend(self.ln_f(h).astype(jnp.float32))

    def __call__(self, prefix: jax.Array, tokens: jax.Array) -> jax.Array:
        """Teacher forcing. prefix (R, P, D), tokens (R, L) (no sos, eos-terminated, pad 0) -> (R, L, V): the
        logits predicting ``tokens[:, t]`` from the prefix and ``tokens[:, :t]``."""
        p, length = prefix.shape[1], tokens.shape[1]
        if p + length > self.max_positions:
            raise ValueError(f"a {p}-token prefix and {length} caption tokens exceed the captioner's "
                             f"{self.max_positions} positions")
        x = jnp.concatenate([prefix.astype(jnp.float32), self.wte(tokens[:, :-1]).astype(jnp.float32)], 1)
        x = x + self._positions(0, p + length - 1)
        for block in self.blocks:
            x = block(x)
        return self._logits(x[:, p - 1:])

    def _step(self, x, start, caches):
        """Positions ``start``.. of the sequence through the cached blocks: (logits of the last, caches)."""
        x = x.astype(jnp.float32) + self._positions(start, x.shape[1])
        new = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block(x, cache=cache)
            new.append(cache)
        return self._logits(x[:, -1]), new

    def _start(self, prefix: jax.Array, max_len: int):
        """The prefix through empty caches of ``P + max_len`` positions: (logits of the first word, caches)."""
        r, p, _ = prefix.shape
        if p + max_len > self.max_positions:
            raise ValueError(f"a {p}-token prefix and {max_len} caption tokens exceed the captioner's "
                             f"{self.max_positions} positions")
        head_dim = self.dim // self.num_heads
        return self._step(prefix, 0, [init_kv_cache(r, p + max_len, self.num_heads, head_dim) for _ in self.blocks])

    def generate(self, prefix: jax.Array, max_len: int) -> jax.Array:
        """Greedy decoding through the KV cache: (R, P, D) -> (R, max_len) int32, padded with 0 after eos."""
        p = prefix.shape[1]
        logits, caches = self._start(prefix, max_len)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        out = [tok]
        done = tok == EOS_ID
        for t in range(1, max_len):  # unrolled: max_len is small (32) and each step is tiny
            logits, caches = self._step(self.wte(tok)[:, None], p + t - 1, caches)
            tok = jnp.where(done, PAD_ID, jnp.argmax(logits, -1).astype(jnp.int32))
            out.append(tok)
            done = done | (tok == EOS_ID)
        return jnp.stack(out, 1)

    def beam_search(self, prefix: jax.Array, max_len: int, num_beams: int) -> jax.Array:
        """Vote2Cap-DETR's ``beam_search_decode`` (``models/captioner_dcc/generation_utils.py``, the
        evaluation's ``--use_beam_search``, 5 beams) through the KV cache: (R, P, D) -> (R, max_len) int32,
        padded with 0 after the first eos (where the official tokenizer's ``decode`` stops reading). Its rules, quirks included: the first word's ``num_beams`` beams
        are the top logits, scored by a log-softmax over those ``num_beams`` logits only; later steps keep the
        ``num_beams`` best (beam, word) pairs by summed log-probability; a beam that picks eos at step t
        (t >= 1; an eos as the first word is not a finished caption) is finished with the score (its summed
        log-probability) / (t + 1) and drops out; at the last step every beam is forced to eos; the caption is
        the best-scoring finished beam."""
        r, p, _ = prefix.shape
        k, rows = num_beams, jnp.arange(r)
        logits, caches = self._start(prefix, max_len)
        top, words = jax.lax.top_k(logits, k)
        scores = jax.nn.log_softmax(top, -1)
        ids = jnp.zeros((r, k, max_len), jnp.int32).at[:, :, 0].set(words)
        caches = [cache._replace(k=jnp.repeat(cache.k, k, 0), v=jnp.repeat(cache.v, k, 0)) for cache in caches]
        best, best_ids = jnp.full((r,), -jnp.inf), ids[:, 0]
        for t in range(1, max_len):
            logits, caches = self._step(self.wte(words.reshape(-1))[:, None], p + t - 1, caches)
            logp = jax.nn.log_softmax(logits.reshape(r, k, -1), -1)
            if t < max_len - 1:
                scores, pick = jax.lax.top_k((scores[..., None] + logp).reshape(r, -1), k)
                beam, words = pick // logp.shape[-1], (pick % logp.shape[-1]).astype(jnp.int32)
            else:  # the last step ends every beam
                scores = scores + logp[..., EOS_ID]
                beam, words = jnp.broadcast_to(jnp.arange(k), (r, k)), jnp.full((r, k), EOS_ID, jnp.int32)
            ids = jnp.take_along_axis(ids, beam[..., None], 1).at[:, :, t].set(words)
            flat = (rows[:, None] * k + beam).reshape(-1)
            caches = [cache._replace(k=cache.k[flat], v=cache.v[flat]) for cache in caches]
            finished = words == EOS_ID
            final = jnp.where(finished, scores / (t + 1), -jnp.inf)
            j = jnp.argmax(final, -1)
            better = final[rows, j] > best
            best = jnp.where(better, final[rows, j], best)
            best_ids = jnp.where(better[:, None], ids[rows, j], best_ids)
            scores = jnp.where(finished, -jnp.inf, scores)
        is_eos = best_ids == EOS_ID
        return jnp.where(jnp.cumsum(is_eos, -1) - is_eos > 0, PAD_ID, best_ids)


# ---------------------------------------------------------------------------------------------
# The model


class BiCA(nn.Module):
    """BiCA 3D dense captioner. ``__call__(points (B, N, 3 + in_features))`` -> dict of per-instance-query
    boxes from the last instance-decoder layer (``center``, ``size``, ``center_normalized``, ``size_normalized``,
    ``sem_cls_logits`` (B, Q, K + 1), ``objectness`` (B, Q), ``angle_logits`` / ``angle_residual_normalized``
    (B, Q, 1)), ``aux_outputs`` (the same box predictions of every earlier decoder layer, for the per-layer
    losses), the caption ``prefix`` (B, Q, 1, caption_dim) and the intermediate geometry (``query_xyz``,
    ``seed_xyz``, ``vote_xyz``, ``context_xyz``, ``scene_min`` / ``scene_max``). Captions:
    ``apply(..., method="caption_logits")`` (teacher forcing) or ``method="generate"`` (greedy, or beam search with
    ``num_beams``)."""

    in_features: int = 7
    num_classes: int = 18
    dim: int = 256
    preenc_npoints: int = 2048
    preenc_radius: float = 0.2
    preenc_nsample: int = 64
    preenc_mlp: Sequence[int] = (64, 128)
    enc_heads: int = 4
    enc_ffn: int = 128
    enc_radii: Sequence[float] = (0.16, 0.64, 1.44)
    interim_radius: float = 0.4
    interim_nsample: int = 32
    num_queries: int = 256
    vote_radius: float = 0.3
    vote_nsample: int = 16
    num_context: int = 512
    context_radius: float = 1.2
    context_nsample: int = 32
    dec_layers: int = 8
    dec_heads: int = 4
    dec_ffn: int = 256
    dropout: float = 0.1
    mlp_dropout: float = 0.3
    bica_scale_init: float = 0.0
    vocab_size: int = 3433
    caption_dim: int = 256
    caption_layers: int = 2
    caption_heads: int = 4
    max_caption_len: int = 32
    caption_positions: int = 64
    use_context: bool = True  # False: the "V_o only" ablation (no context queries, context decoder or BiCA)
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def example_inputs(self, batch_size: int = 1):
        return (jnp.zeros((batch_size, self.preenc_npoints, 3 + self.in_features), jnp.float32),)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.dim
        self.tokenizer = SetAbstraction(self.preenc_npoints, self.preenc_radius, self.preenc_nsample,
                                        tuple(self.preenc_mlp) + (d,), **kw)
        self.encoder = [EncoderLayer(self.enc_heads, self.enc_ffn, self.dropout, **kw) for _ in self.enc_radii]
        self.interim = SetAbstraction(self.preenc_npoints // 2, self.interim_radius, self.interim_nsample,
                                      (d, d, d), **kw)
        self.vote_ffn = GenericMLP((d, d), 3 + d, hidden_bias=True, **kw)
        self.vote_sa = SetAbstraction(self.num_queries, self.vote_radius, self.vote_nsample, (d, d, d), **kw)
        self.enc_to_dec = GenericMLP((d,), d, out_bias=False, out_act=True, out_norm=True, **kw)
        self.query_projection = GenericMLP((d,), d, norm=False, hidden_bias=True, out_act=True, **kw)
        decoder = dict(num_layers=self.dec_layers, num_heads=self.dec_heads, ffn_dim=self.dec_ffn,
                       dropout=self.dropout, **kw)
        self.instance_decoder = TransformerDecoder(**decoder)
        if self.use_context:
            self.context_sa = SetAbstraction(self.num_context, self.context_radius, self.context_nsample, (d, d, d),
                                             **kw)
            self.context_projection = GenericMLP((d,), d, norm=False, hidden_bias=True, out_act=True, **kw)
            self.context_decoder = TransformerDecoder(**decoder)
            self.bica = BiCAModule(self.dec_heads, self.bica_scale_init, **kw)
        head = dict(norm=True, dropout=self.mlp_dropout, **kw)
        self.sem_cls_head = GenericMLP((d, d), self.num_classes + 1, **head)
        self.center_head = GenericMLP((d, d), 3, **head)
        self.size_head = GenericMLP((d, d), 3, **head)
        self.angle_cls_head = GenericMLP((d, d), NUM_ANGLE_BIN, **head)
        self.angle_residual_head = GenericMLP((d, d), NUM_ANGLE_BIN, **head)
        c = self.caption_dim
        self.feature_projector = [Dense(c, axes=("embed", "mlp"), **kw), LayerNorm(1e-5, axis_name="mlp", **kw),
                                  Dense(c, axes=("mlp", "embed"), **kw)]
        self.captioner = CaptionHead(self.vocab_size, c, self.caption_layers, self.caption_heads,
                                     self.caption_positions, **kw)

    def check_points(self, points: jax.Array) -> None:
        if points.ndim != 3 or points.shape[-1] != 3 + self.in_features:
            raise ValueError(f"points must be (batch, points, 3 + in_features) = (B, N, {3 + self.in_features}) "
                             f"(xyz then {self.in_features} point features); got shape {tuple(points.shape)}")
        need = max(self.preenc_npoints, self.preenc_nsample)
        if points.shape[1] < need:
            raise ValueError(f"the set-abstraction tokenizer samples {self.preenc_npoints} points; the cloud has "
                             f"only {points.shape[1]}")

    def encode(self, points: jax.Array, train: bool = False):
        """Tokenizer + masked encoder -> (xyz (B, M, 3), features (B, M, dim)), M = preenc_npoints // 2."""
        self.check_points(points)
        xyz, feats = points[..., :3], points[..., 3:] if self.in_features else None
        xyz, h, _ = self.tokenizer(xyz, feats, train=train)
        for i, (layer, radius) in enumerate(zip(self.encoder, self.enc_radii)):
            mask = None
            if radius > 0:
                dist = jnp.sqrt(jnp.maximum(jnp.sum((xyz[:, :, None] - xyz[:, None]) ** 2, -1), 0.0))
                mask = (dist < radius)[:, None]
            h = layer(h, mask, train)
            if i == 0:
                xyz, h, _ = self.interim(xyz, h, train=train)
        return xyz, h

    def box_predictions(self, features: list[jax.Array], query_xyz, lo, hi, train: bool = False) -> list[dict]:
        """Vote2Cap-DETR's ``get_box_predictions``: the five shared heads on every decoder layer's output (run
        once on the layers stacked along the batch, so BatchNorm sees them together as in the official code)
        -> one dict of box predictions per layer."""
        n, (b, q, d) = len(features), features[0].shape
        x = jnp.stack(features).reshape(n * b, q, d)
        split = lambda t: t.reshape((n, b, q, -1))  # noqa: E731
        logits = split(self.sem_cls_head(x, train))
        offset = split(jax.nn.sigmoid(self.center_head(x, train)) - 0.5)
        size_norm = split(jax.nn.sigmoid(self.size_head(x, train)))
        angle_logits = split(self.angle_cls_head(x, train))
        angle_residual = split(self.angle_residual_head(x, train))
        extent = jnp.maximum(hi - lo, 0.1)[:, None]
        out = []
        for i in range(n):
            center = query_xyz + offset[i]
            objectness = 1.0 - jax.nn.softmax(logits[i].astype(jnp.float32), -1)[..., -1]
            out.append(dict(center=center, size=size_norm[i] * extent,
                            center_normalized=(center - lo[:, None]) / extent, size_normalized=size_norm[i],
                            sem_cls_logits=logits[i], objectness=objectness, angle_logits=angle_logits[i],
                            angle_residual_normalized=angle_residual[i]))
        return out

    def __call__(self, points: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        lo, hi = jnp.min(points[..., :3], 1), jnp.max(points[..., :3], 1)
        enc_xyz, enc = self.encode(points, train)
        d = self.dim
        memory = self.enc_to_dec(enc, train)
        memory_pos = fourier_embedding(enc_xyz, lo, hi, d)
        # instance queries: votes, FPS over the voted coordinates, set abstraction around them
        out = self.vote_ffn(enc, train)
        vote_xyz = enc_xyz + out[..., :3]
        voted = enc + out[..., 3:]
        voted = voted / jnp.maximum(jnp.linalg.norm(voted, axis=-1, keepdims=True), 1e-12)
        inds = farthest_point_sample(vote_xyz, self.num_queries)
        query_xyz, query, _ = self.vote_sa(vote_xyz, voted, inds, train=train)
        query_pos = self.query_projection(fourier_embedding(query_xyz, lo, hi, d))
        # the instance decoder (boxes from every layer; V_o = its last layer)
        layers = self.instance_decoder(query, query_pos, memory, memory_pos, train)
        *aux, boxes = self.box_predictions(layers, query_xyz, lo, hi, train)
        inst = layers[-1]
        features, extra = [inst], {}
        if self.use_context:
            # context queries and the context decoder, independent of the instance path
            normed = enc / jnp.maximum(jnp.linalg.norm(enc, axis=-1, keepdims=True), 1e-12)
            context_xyz, context, _ = self.context_sa(enc_xyz, normed, train=train)
            context_pos = self.context_projection(fourier_embedding(context_xyz, lo, hi, d))
            ctx = self.context_decoder(context, context_pos, memory, memory_pos, train)[-1]
            features += list(self.bica(inst, query_pos, ctx, context_pos))  # V_ac, V_ao
            extra["context_xyz"] = context_xyz
        # the caption prefix: one token, the projected concatenation (V_o, V_ac, V_ao)
        f1, ln, f2 = self.feature_projector
        prefix = f2(nn.relu(ln(f1(jnp.concatenate(features, -1)))))[:, :, None]
        if self.is_initializing():  # create the captioner's parameters
            self.captioner(prefix[:1, 0], jnp.zeros((1, 2), jnp.int32))
        return dict(**boxes, aux_outputs=aux, prefix=prefix, query_xyz=query_xyz, seed_xyz=enc_xyz,
                    vote_xyz=vote_xyz, scene_min=lo, scene_max=hi, **extra)

    def caption_logits(self, prefix: jax.Array, tokens: jax.Array) -> jax.Array:
        """prefix (..., P, caption_dim), tokens (..., L) -> (..., L, vocab) teacher-forced logits."""
        if tokens.shape[-1] > self.max_caption_len:
            raise ValueError(f"captions of {tokens.shape[-1]} tokens exceed the model's max_caption_len="
                             f"{self.max_caption_len}")
        if prefix.shape[:-2] != tokens.shape[:-1]:
            raise ValueError(f"prefix (..., P, D) {tuple(prefix.shape)} and tokens (..., L) {tuple(tokens.shape)} "
                             f"disagree on the leading axes")
        lead = tokens.shape[:-1]
        logits = self.captioner(prefix.reshape((-1,) + prefix.shape[-2:]), tokens.reshape(-1, tokens.shape[-1]))
        return logits.reshape(lead + logits.shape[1:])

    def generate(self, prefix: jax.Array, max_len: int | None = None, num_beams: int = 1) -> jax.Array:
        """Captions (..., max_len) for prefixes (..., P, caption_dim): greedy, or with ``num_beams`` > 1
        Vote2Cap-DETR's beam search (its evaluation uses 5 beams; ``CaptionHead.beam_search``)."""
        max_len = self.max_caption_len if max_len is None else max_len
        if max_len > self.max_caption_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_caption_len={self.max_caption_len}")
        if num_beams < 1 or num_beams > self.vocab_size:
            raise ValueError(f"num_beams must be in 1..{self.vocab_size} (the vocabulary), got {num_beams}")
        if num_beams > 1 and max_len < 2:
            raise ValueError(f"beam search needs max_len >= 2 (a word and the eos), got {max_len}")
        lead, flat = prefix.shape[:-2], prefix.reshape((-1,) + prefix.shape[-2:])
        if num_beams == 1:
            out = self.captioner.generate(flat, max_len)
        else:
            out = self.captioner.beam_search(flat, max_len, num_beams)
        return out.reshape(lead + (max_len,))


# ---------------------------------------------------------------------------------------------
# Losses (Vote2Cap-DETR's criterion and captioner)

LOSS_WEIGHTS = dict(giou=10.0, sem_cls=1.0, center=5.0, size=1.0, angle_cls=0.1, angle_reg=0.5, vote=10.0,
                    caption=5.0)
NO_OBJECT_WEIGHT = 0.25
MATCH_COST = dict(cls=1.0, giou=2.0)
SET_TERMS = ("giou", "sem_cls", "center", "size", "angle_cls", "angle_reg")


def huber(error: jax.Array, delta: float = 1.0) -> jax.Array:
    """0.5 x² for |x| <= delta, else 0.5 delta² + delta (|x| - delta) (Vote2Cap-DETR's ``utils.misc.huber_loss``)."""
    quadratic = jnp.minimum(jnp.abs(error), delta)
    return 0.5 * quadratic ** 2 + delta * (jnp.abs(error) - quadratic)


def layer_set_loss(outputs: dict, scene_min: jax.Array, scene_max: jax.Array, gt_center: jax.Array,
                   gt_size: jax.Array, gt_class: jax.Array, gt_valid: jax.Array, weights: dict | None = None):
    """Vote2Cap-DETR's ``SetPredictionCriterion.single_output_forward`` for one decoder layer's box predictions:
    Hungarian matching on that layer's own cost, then its losses. Returns (weighted loss, dict of unweighted
    terms, assignment (B, S): the query matched to each target, -1 for padding). The boxes are axis-aligned
    (angle class 0, residual 0)."""
    from jaxformers.segmentation.matching import hungarian_match, matched_query_targets

    w = {**LOSS_WEIGHTS, **(weights or {})}
    logits = outputs["sem_cls_logits"].astype(jnp.float32)
    b, q, k1 = logits.shape
    prob = jax.nn.softmax(logits, -1)
    gt_index = jnp.broadcast_to(jnp.maximum(gt_class, 0)[:, None], (b, q) + gt_class.shape[1:])
    cls_cost = -jnp.take_along_axis(prob, gt_index, -1)
    giou = pairwise_iou_3d(outputs["center"], outputs["size"], gt_center, gt_size, generalized=True)
    cost = MATCH_COST["cls"] * cls_cost + MATCH_COST["giou"] * -giou
    assign = hungarian_match(cost, gt_valid)
    matched = assign >= 0
    n = jnp.maximum(jnp.sum(matched), 1).astype(jnp.float32)
    q_idx = jnp.maximum(assign, 0)
    take = lambda x: jnp.take_along_axis(x, q_idx[..., None], 1)  # noqa: E731  (B, S, C)
    lo, hi = scene_min[:, None], scene_max[:, None]
    extent = jnp.maximum(hi - lo, 0.1)
    m = matched[..., None].astype(jnp.float32)
    center_l1 = jnp.sum(jnp.abs(take(outputs["center_normalized"]) - (gt_center - lo) / extent) * m) / n
    size_l1 = jnp.sum(jnp.abs(take(outputs["size_normalized"]) - gt_size / extent) * m) / n
    g = jnp.take_along_axis(giou, q_idx[:, None, :], 1)[:, 0]  # (B, S): the matched pair's GIoU
    giou_loss = jnp.sum((1.0 - g) * matched) / n
    target = matched_query_targets(assign, q, jnp.where(gt_valid, gt_class, k1 - 1).astype(jnp.int32), k1 - 1)
    class_w = jnp.ones((k1,)).at[-1].set(NO_OBJECT_WEIGHT)[target]
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[..., None], -1)[..., 0]
    sem_cls = jnp.sum(ce * class_w) / jnp.sum(class_w)
    # angle: class 0 and residual 0 for every axis-aligned target (CE of the class, Huber of the residual)
    angle_ce = -jax.nn.log_softmax(take(outputs["angle_logits"]).astype(jnp.float32), -1)[..., 0]
    angle_cls = jnp.sum(angle_ce * matched) / n
    angle_reg = jnp.sum(huber(take(outputs["angle_residual_normalized"])[..., 0].astype(jnp.float32)) * matched) / n
    terms = dict(giou=giou_loss, sem_cls=sem_cls, center=center_l1, size=size_l1, angle_cls=angle_cls,
                 angle_reg=angle_reg)
    return sum(w[name] * terms[name] for name in SET_TERMS), terms, assign


def set_criterion(outputs: dict, gt_center: jax.Array, gt_size: jax.Array, gt_class: jax.Array,
                  gt_valid: jax.Array, weights: dict | None = None):
    """The detection objective (Vote2Cap-DETR's ``OverallCriterion`` without the captioner): the set loss of the
    last decoder layer plus that of every layer in ``outputs["aux_outputs"]`` (each matched on its own cost,
    as ``SetPredictionCriterion`` does with ``aux_outputs``), plus 10 x the vote loss. gt_* (B, S, ...) with
    ``gt_valid`` (B, S) bool. Returns (weighted loss, dict of the last layer's unweighted terms plus ``vote``
    and ``aux`` (the weighted set loss summed over the earlier layers), the last layer's assignment (B, S):
    the query matched to each target, -1 for padding; the captions are trained on it)."""
    w = {**LOSS_WEIGHTS, **(weights or {})}
    targets = (outputs["scene_min"], outputs["scene_max"], gt_center, gt_size, gt_class, gt_valid, w)
    loss, terms, assign = layer_set_loss(outputs, *targets)
    aux = sum((layer_set_loss(layer, *targets)[0] for layer in outputs.get("aux_outputs", ())), jnp.zeros(()))
    vote = vote_loss(outputs["seed_xyz"], outputs["vote_xyz"], gt_center, gt_size, gt_valid)
    return loss + aux + w["vote"] * vote, {**terms, "vote": vote, "aux": aux}, assign


def vote_loss(seed_xyz, vote_xyz, gt_center, gt_size, gt_valid):
    """VoteNet-style: every seed inside a target box (the first such box) regresses its vote to that box's
    centre (L1 over xyz, mean over such seeds; 0 if none)."""
    rel = jnp.abs(seed_xyz[:, :, None] - gt_center[:, None])  # (B, M, S, 3)
    inside = jnp.all(rel <= gt_size[:, None] / 2, -1) & gt_valid[:, None]
    first = jnp.argmax(inside, -1)
    has = jnp.any(inside, -1)
    target = jnp.take_along_axis(gt_center, first[..., None], 1)
    err = jnp.sum(jnp.abs(vote_xyz - target), -1)
    return jnp.sum(err * has) / jnp.maximum(jnp.sum(has), 1)


def matched_prefix(prefix: jax.Array, assign: jax.Array) -> jax.Array:
    """prefix (B, Q, P, D), assign (B, S) -> (B, S, P, D): the prefix of the query matched to each target."""
    idx = jnp.maximum(assign, 0)
    return jnp.take_along_axis(prefix, idx[:, :, None, None], 1)


def caption_loss(logits: jax.Array, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """Token cross-entropy (mean over the non-pad tokens of the valid captions): logits (..., L, V), tokens
    (..., L) (pad 0), valid (...) bool."""
    mask = (tokens != PAD_ID) & valid[..., None]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), tokens[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


# ---------------------------------------------------------------------------------------------
# Registry

def _info(**kw) -> ModelInfo:
    return ModelInfo(paper="Bi-directional Contextual Attention for 3D Dense Captioning", arxiv="2408.06662",
                     repo=None, input_size=(40000, 10), task="3d dense captioning", metric="CIDEr@0.5IoU", **kw)


@register_model(_info())
def bica_scanrefer(**overrides: Any) -> BiCA:
    """ScanRefer: xyz + colour + normal + height per point (Vote2Cap-DETR's --use_color --use_normal), 18
    ScanNet classes, the 3433-word ScanRefer vocabulary, captions up to 32 tokens."""
    return BiCA(**{**dict(in_features=7, num_classes=18, vocab_size=3433), **overrides})


@register_model(_info())
def bica_nr3d(**overrides: Any) -> BiCA:
    """Nr3D: as ``bica_scanrefer`` with the 2937-word Nr3D vocabulary."""
    return BiCA(**{**dict(in_features=7, num_classes=18, vocab_size=2937), **overrides})
