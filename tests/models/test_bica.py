"""BiCA (3-D dense captioning): parameter counts, output shapes, greedy decoding through the KV cache equal to
teacher forcing, the set criterion, sharded == single device, training on the generated rooms (every
parameter gets a gradient, the box and caption losses fall), the generated data, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.models.bica import (BICA_NR3D_PARAMS, BICA_SCANREFER_PARAMS, EOS_ID, caption_loss, matched_prefix,
                                    pairwise_iou_3d, set_criterion)
from tests.helpers import assert_every_param_has_gradient, assert_sharded_forward_matches, fast_jit, numpy_variables
from train.dense_captioning import fit
from train.scenes3d import VOCAB, Rooms, decode, encode

TINY = dict(in_features=3, num_classes=3, dim=32, preenc_npoints=64, preenc_radius=0.4, preenc_nsample=8,
            preenc_mlp=(16,), enc_heads=2, enc_ffn=32, enc_radii=(1.0, 0.0), interim_radius=0.6, interim_nsample=8,
            num_queries=12, vote_radius=0.5, vote_nsample=8, num_context=6, context_radius=1.5, context_nsample=8,
            dec_layers=1, dec_heads=2, dec_ffn=32, vocab_size=len(VOCAB), caption_dim=32, caption_layers=1,
            caption_heads=2, max_caption_len=12, caption_positions=16)
ROOMS = Rooms(num_points=128, max_objects=3)


@pytest.mark.parametrize("name,expected", [("bica_scanrefer", BICA_SCANREFER_PARAMS), ("bica_nr3d", BICA_NR3D_PARAMS)])
def test_param_counts(name, expected):
    """The paper gives no count: these are the configurations' own (see the model docstring)."""
    assert jf.count_params(name) == expected


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model("bica_scanrefer", **TINY)
    data = ROOMS.batch(4, seed=0)
    variables = numpy_variables(model, jnp.asarray(data["points"]))
    out = fast_jit(model.apply)(variables, jnp.asarray(data["points"]))
    return model, variables, data, out


def test_output_shapes_and_cached_greedy_decoding(tiny):
    """Per-query boxes, class logits, objectness and the 2-token caption prefix; greedy decoding through the
    KV cache gives, at every step, the argmax of the teacher-forced logits of its own output."""
    model, variables, data, out = tiny
    shapes = {k: v.shape for k, v in out.items()}
    assert shapes["center"] == shapes["size"] == shapes["query_xyz"] == (4, 12, 3)
    assert shapes["sem_cls_logits"] == (4, 12, 4) and shapes["objectness"] == (4, 12)
    assert shapes["prefix"] == (4, 12, 2, 32) and shapes["context_xyz"] == (4, 6, 3)
    assert shapes["seed_xyz"] == shapes["vote_xyz"] == (4, 32, 3)
    ablation = jf.create_model("bica_scanrefer", **TINY, use_context=False)
    ab_out, abstract = jax.eval_shape(ablation.init_with_output, jax.random.key(0), jnp.asarray(data["points"]))
    assert "context_sa" not in abstract["params"] and "bica" not in abstract["params"]
    assert ab_out["prefix"].shape == (4, 12, 1, 32)
    assert bool(jnp.all(out["size"] > 0)) and bool(jnp.all((out["objectness"] >= 0) & (out["objectness"] <= 1)))
    prefix = out["prefix"][:2, :3]
    tokens = fast_jit(lambda v, p: model.apply(v, p, 6, method="generate"))(variables, prefix)
    assert tokens.shape == (2, 3, 6)
    logits = fast_jit(lambda v, p, t: model.apply(v, p, t, method="caption_logits"))(variables, prefix, tokens)
    greedy = np.asarray(jnp.argmax(logits, -1))
    toks = np.asarray(tokens)
    for row in range(6):
        seq, ref = toks.reshape(6, 6)[row], greedy.reshape(6, 6)[row]
        stop = np.flatnonzero(seq == EOS_ID)
        end = stop[0] + 1 if stop.size else 6
        np.testing.assert_array_equal(seq[:end], ref[:end])
        assert np.all(seq[end:] == 0)


def test_set_criterion_matches_and_losses():
    """Three queries, two targets: query 2 is target 0's box and class, query 0 target 1's: the Hungarian
    assignment finds them, the GIoU / centre / size terms are 0 and the class term is the weighted CE."""
    center = jnp.array([[[1.0, 1, 0.5], [3, 3, 0.5], [0.5, 0.5, 0.25]]])
    size = jnp.array([[[1.0, 1, 1], [1, 1, 1], [0.5, 0.5, 0.5]]])
    lo, hi = jnp.zeros((1, 3)), jnp.full((1, 3), 4.0)
    logits = jnp.array([[[0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]]])
    out = dict(sem_cls_logits=logits, center=center, size=size, center_normalized=center / 4, size_normalized=size / 4,
               scene_min=lo, scene_max=hi, seed_xyz=center, vote_xyz=center)
    gt_c, gt_s = center[:, jnp.array([2, 0])], size[:, jnp.array([2, 0])]
    loss, terms, assign = fast_jit(set_criterion)(out, gt_c, gt_s, jnp.array([[0, 1]]), jnp.array([[True, True]]))
    np.testing.assert_array_equal(assign, [[2, 0]])
    for name in ("giou", "center", "size", "vote"):
        assert float(terms[name]) == pytest.approx(0.0, abs=1e-6), name
    logp = jax.nn.log_softmax(logits[0], -1)
    ce = -np.array([logp[0, 1], logp[1, 2], logp[2, 0]])
    assert float(terms["sem_cls"]) == pytest.approx((ce[0] + 0.25 * ce[1] + ce[2]) / 2.25, rel=1e-5)
    iou = pairwise_iou_3d(center, size, center, size)
    np.testing.assert_allclose(np.diag(np.asarray(iou[0])), 1.0, rtol=1e-6)
    prefix = jnp.arange(3 * 2 * 4, dtype=jnp.float32).reshape(1, 3, 2, 4)
    np.testing.assert_array_equal(matched_prefix(prefix, assign)[0, 0], prefix[0, 2])
    tokens = jnp.array([[[5, EOS_ID, 0]]])
    logits = jnp.zeros((1, 1, 3, 6))
    assert float(caption_loss(logits, tokens, jnp.array([[True]]))) == pytest.approx(np.log(6), rel=1e-6)


def test_sharded_equals_single_device(tiny):
    model, variables, data, _ = tiny
    assert_sharded_forward_matches(model, variables, jnp.asarray(data["points"]), tol=1e-4)


def test_trains_on_generated_rooms(tiny):
    """jit + grad of the whole objective (Hungarian matching inside), 25 Adam steps on fresh rooms: every
    parameter has moved (Adam without weight decay moves exactly the entries that got a non-zero gradient)
    and the total, box (GIoU) and caption losses fall."""
    model, variables, data, _ = tiny
    trained, history = fit(model, variables, ROOMS, steps=25, batch=4, tx=optax.adam(3e-3), jit=fast_jit)
    assert_every_param_has_gradient(jax.tree_util.tree_map(lambda a, b: a - b, trained["params"], variables["params"]))
    first, last = history[:4], history[-4:]
    for term in ("loss", "giou", "caption"):
        assert np.mean([h[term] for h in last]) < np.mean([h[term] for h in first]), term


def test_generated_rooms():
    """Seeded, the captions name each object's colour and shape and a relation, the tokens round-trip, and the
    boxes enclose their objects' points."""
    a, b = ROOMS.batch(2, seed=3), ROOMS.batch(2, seed=3)
    np.testing.assert_array_equal(a["points"], b["points"])
    assert a["points"].shape == (2, 128, 6) and a["gt_valid"].sum(1).min() >= 2
    for s in range(2):
        for i in np.flatnonzero(a["gt_valid"][s]):
            words = decode(a["gt_tokens"][s, i])
            assert words == a["captions"][s][i][0]
            assert any(r in words for r in ("left of", "right of", "in front of", "behind"))
            lo = a["gt_center"][s, i] - a["gt_size"][s, i] / 2 - 0.05
            hi = a["gt_center"][s, i] + a["gt_size"][s, i] / 2 + 0.05
            inside = np.all((a["points"][s, :, :3] >= lo) & (a["points"][s, :, :3] <= hi), 1)
            assert inside.sum() >= 20
    with pytest.raises(ValueError, match="max_len is 3"):
        encode("the red box is left of the blue sphere", 3)


def test_bad_input(tiny):
    model, variables, data, out = tiny
    pts = jnp.asarray(data["points"])
    with pytest.raises(ValueError, match=r"\(B, N, 6\)"):
        model.apply(variables, pts[..., :5])
    with pytest.raises(ValueError, match="samples 64 points; the cloud has only 40"):
        model.apply(variables, pts[:, :40])
    with pytest.raises(ValueError, match="exceed the model's max_caption_len=12"):
        model.apply(variables, out["prefix"][:, :2], jnp.ones((4, 2, 13), jnp.int32), method="caption_logits")
    with pytest.raises(ValueError, match="max_len=20 exceeds"):
        model.apply(variables, out["prefix"][:, :2], 20, method="generate")
