"""BiCA (3-D dense captioning): parameter counts, output shapes, greedy decoding through the KV cache equal to
teacher forcing, the bi-directional contextual attention (its direction and formula), the two decoders'
independence, the set criterion (per-layer matching, vote weight), sharded == single device, training on the
generated rooms (every parameter gets a gradient, the box and caption losses fall), the generated data, bad
input."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.layers.attention import MultiHeadAttention
from jaxformers.models.bica import (BICA_NR3D_PARAMS, BICA_SCANREFER_PARAMS, EOS_ID, BiCAModule, caption_loss,
                                    layer_set_loss, matched_prefix, pairwise_iou_3d, set_criterion)
from tests.helpers import (assert_every_param_has_gradient, assert_sharded_forward_matches, fast_jit, load_official,
                           numpy_variables)
from train.dense_captioning import evaluate, fit
from train.scenes3d import VOCAB, Rooms, decode, encode

TINY = dict(in_features=3, num_classes=3, dim=32, preenc_npoints=64, preenc_radius=0.4, preenc_nsample=8,
            preenc_mlp=(16,), enc_heads=2, enc_ffn=32, enc_radii=(1.0, 0.0), interim_radius=0.6, interim_nsample=8,
            num_queries=12, vote_radius=0.5, vote_nsample=8, num_context=6, context_radius=1.5, context_nsample=8,
            dec_layers=1, dec_heads=2, dec_ffn=32, vocab_size=len(VOCAB), caption_dim=32, caption_layers=1,
            caption_heads=2, max_caption_len=12, caption_positions=16)
ROOMS = Rooms(num_points=128, max_objects=3)


@pytest.mark.parametrize("name,expected", [("bica_scanrefer", BICA_SCANREFER_PARAMS), ("bica_nr3d", BICA_NR3D_PARAMS)])
def test_param_counts(name, expected):
    """This construction's counts (the summary's 16.9M for the paper's model is not matched: see the docstring)."""
    assert jf.count_params(name) == expected


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model("bica_scanrefer", **TINY)
    data = ROOMS.batch(4, seed=0)
    variables = numpy_variables(model, jnp.asarray(data["points"]))
    apply = fast_jit(model.apply)
    return model, variables, data, apply(variables, jnp.asarray(data["points"])), apply


def test_output_shapes_and_cached_greedy_decoding(tiny):
    """Per-query boxes, class logits, objectness, the angle heads, the earlier decoder layers' boxes and the
    one-token caption prefix; greedy decoding through the KV cache gives, at every step, the argmax of the
    teacher-forced logits of its own output."""
    model, variables, data, out, _ = tiny
    shapes = {k: v.shape for k, v in out.items() if k != "aux_outputs"}
    assert shapes["center"] == shapes["size"] == shapes["query_xyz"] == (4, 12, 3)
    assert shapes["sem_cls_logits"] == (4, 12, 4) and shapes["objectness"] == (4, 12)
    assert shapes["angle_logits"] == shapes["angle_residual_normalized"] == (4, 12, 1)
    assert shapes["prefix"] == (4, 12, 1, 32) and shapes["context_xyz"] == (4, 6, 3)
    assert shapes["seed_xyz"] == shapes["vote_xyz"] == (4, 32, 3)
    assert out["aux_outputs"] == [] and {"instance_decoder", "context_decoder", "bica"} <= set(variables["params"])
    deeper = jf.create_model("bica_scanrefer", **{**TINY, "dec_layers": 3})
    deep_out, abstract = jax.eval_shape(deeper.init_with_output, jax.random.key(0), jnp.asarray(data["points"]))
    assert [layer["center"].shape for layer in deep_out["aux_outputs"]] == [(4, 12, 3)] * 2
    assert {f"layers_{i}" for i in range(3)} | {"norm"} == set(abstract["params"]["context_decoder"])
    ablation = jf.create_model("bica_scanrefer", **TINY, use_context=False)
    ab_out, abstract = jax.eval_shape(ablation.init_with_output, jax.random.key(0), jnp.asarray(data["points"]))
    assert not {"context_sa", "context_decoder", "bica"} & set(abstract["params"])
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


def _beam_reference(next_logits, k: int, max_len: int) -> list[int]:
    """A plain reading of Vote2Cap-DETR's ``beam_search_decode`` for one prefix, without caches:
    ``next_logits(beams)`` gives the next-word logits (len(beams), V) of each hypothesis (a list of words)."""
    def log_softmax(x):
        return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)

    first = next_logits([[]])[0]
    top = np.argsort(-first, kind="stable")[:k]
    beams, scores = [[int(w)] for w in top], log_softmax(first[top])
    best, best_seq = -np.inf, None
    for t in range(1, max_len):
        logp = log_softmax(next_logits(beams))
        if t < max_len - 1:
            cand = (scores[:, None] + logp).ravel()
            pick = np.argsort(-cand, kind="stable")[:k]
            beams, scores = [beams[i // logp.shape[1]] + [int(i % logp.shape[1])] for i in pick], cand[pick]
        else:
            beams, scores = [b + [EOS_ID] for b in beams], scores + logp[:, EOS_ID]
        for b, score in zip(beams, scores):
            if b[-1] == EOS_ID and score / (t + 1) > best:
                best, best_seq = score / (t + 1), b
        scores = np.where([b[-1] == EOS_ID for b in beams], -np.inf, scores)
    end = best_seq.index(EOS_ID) + 1
    return best_seq[:end] + [0] * (max_len - end)


def _next_word_logits(model, variables, prefix, max_len):
    """For one prefix (P, D): hypotheses (lists of words) -> their next-word logits, by teacher forcing."""
    logits_fn = fast_jit(lambda v, p, t: model.apply(v, p, t, method="caption_logits"))

    def next_logits(beams):
        toks = np.array([b + [0] * (max_len - len(b)) for b in beams], np.int32)
        out = np.asarray(logits_fn(variables, jnp.broadcast_to(prefix, (len(beams),) + prefix.shape), toks))
        return out[np.arange(len(beams)), [len(b) for b in beams]].astype(np.float64)
    return next_logits


def _varied_captioner(variables):
    """``variables`` with the captioner's word embedding redrawn (std 0.2, the eos row doubled): the untrained
    captioner then ends its captions at different steps instead of repeating one word."""
    params = jax.tree_util.tree_map(np.array, variables["params"])
    embedding = params["captioner"]["wte"]["embedding"]
    embedding[:] = 0.2 * np.random.default_rng(0).standard_normal(embedding.shape)
    embedding[EOS_ID] *= 2.0
    return {**variables, "params": params}


def test_beam_search_follows_the_official_rules(tiny):
    """``generate(num_beams=3)`` through the KV cache equals a plain reading of Vote2Cap-DETR's
    ``beam_search_decode`` on teacher-forced logits (no cache), for every prefix, with captions that end on
    their own (eos chosen at step 6) for some prefixes and are forced to end at the last step for others."""
    model, variables, _, out, _ = tiny
    variables = _varied_captioner(variables)
    prefix, max_len = out["prefix"][:2, :4], 8
    beams = np.asarray(fast_jit(lambda v, p: model.apply(v, p, max_len, 3, method="generate"))(variables, prefix))
    assert beams.shape == (2, 4, max_len)
    flat = np.asarray(prefix).reshape((8,) + prefix.shape[2:])
    for row, got in enumerate(beams.reshape(8, max_len)):
        want = _beam_reference(_next_word_logits(model, variables, flat[row], max_len), 3, max_len)
        np.testing.assert_array_equal(got, want)
    assert {int(np.argmax(b == EOS_ID)) for b in beams.reshape(8, max_len)} == {6, max_len - 1}
    with pytest.raises(ValueError, match="num_beams"):
        model.apply(variables, prefix, max_len, 0, method="generate")


def test_beam_search_equals_the_official_code(tiny):
    """Against Vote2Cap-DETR's own ``beam_search_decode`` (PyTorch), driven by our captioner's logits."""
    torch = pytest.importorskip("torch")
    official = load_official("ch3cook-fdu+Vote2Cap-DETR", "models/captioner_dcc/generation_utils.py",
                             "vote2cap_generation_utils")
    model, variables, _, out, _ = tiny
    variables = _varied_captioner(variables)
    prefix, max_len = out["prefix"][:2, :4].reshape(8, 1, -1), 8
    logits_fn = fast_jit(lambda v, p, t: model.apply(v, p, t, method="caption_logits"))
    wte = torch.nn.Embedding.from_pretrained(torch.from_numpy(np.asarray(
        variables["params"]["captioner"]["wte"]["embedding"])))

    class Transformer:  # the Hugging Face GPT-2 surface the official function calls
        transformer = type("GPT2", (), {"wte": wte})

        def __call__(self, inputs_embeds, encoder_hidden_states=None):
            embeds = jnp.asarray(inputs_embeds.numpy())  # (R, L, D): the whole sequence as the prefix
            logits = logits_fn(variables, embeds, jnp.zeros((embeds.shape[0], 1), jnp.int32))
            return type("Output", (), {"logits": torch.from_numpy(np.asarray(logits))})

    ids = []
    for row in np.asarray(prefix):
        res = official.beam_search_decode(Transformer(), inputs_embeds=torch.from_numpy(row[None]), max_length=max_len,
                                          num_beams=3, eos_token_id=EOS_ID, encoder_hidden_states=None)
        seq = res["output_ids"][0].numpy()
        end = int(np.argmax(seq == EOS_ID)) + 1
        ids.append(np.concatenate([seq[:end], np.zeros(max_len - end, np.int64)]))
    got = fast_jit(lambda v, p: model.apply(v, p, max_len, 3, method="generate"))(variables, prefix)
    np.testing.assert_array_equal(np.asarray(got), np.stack(ids))
    assert {int(np.argmax(seq == EOS_ID)) for seq in ids} == {6, max_len - 1}


def test_bica_module_direction_and_formula():
    """O4C: each instance query attends over the contexts (V_ac of object i does not change when another object
    changes); C4O: each V_ac attends over all instances (V_ao of object i does). Both are exactly the shared
    attention times the learnable scalars (γ, λ; 0 at initialisation), and neither depends on the contexts'
    order."""
    module = BiCAModule(num_heads=2)
    rng = np.random.default_rng(0)
    inst, inst_pos, ctx, ctx_pos = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                                    for s in ((1, 5, 8), (1, 5, 8), (1, 7, 8), (1, 7, 8)))
    init = nn.unbox(module.init(jax.random.key(0), inst, inst_pos, ctx, ctx_pos))["params"]
    assert init["gamma"].shape == init["lambda"].shape == () and float(init["gamma"]) == float(init["lambda"]) == 0.0
    params = numpy_variables(module, inst, inst_pos, ctx, ctx_pos)["params"]
    v_ac, v_ao = module.apply({"params": params}, inst, inst_pos, ctx, ctx_pos)
    attn = MultiHeadAttention(2, separate_qkv=True)
    want_ac = params["gamma"] * attn.apply({"params": params["objects_for_context"]}, inst + inst_pos, ctx + ctx_pos,
                                          value=ctx)
    want_ao = params["lambda"] * attn.apply({"params": params["contexts_for_object"]}, want_ac + inst_pos,
                                           inst + inst_pos, value=inst)
    np.testing.assert_allclose(v_ac, want_ac, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v_ao, want_ao, rtol=1e-5, atol=1e-6)
    other = inst.at[0, 3].add(1.0)
    ac2, ao2 = module.apply({"params": params}, other, inst_pos, ctx, ctx_pos)
    np.testing.assert_allclose(ac2[0, :3], v_ac[0, :3], rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(ao2[0, :3] - v_ao[0, :3]))) > 1e-3
    perm = np.array([3, 0, 6, 1, 5, 2, 4])
    ac3, ao3 = module.apply({"params": params}, inst, inst_pos, ctx[:, perm], ctx_pos[:, perm])
    np.testing.assert_allclose(ac3, v_ac, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ao3, v_ao, rtol=1e-5, atol=1e-6)


def test_decoders_run_independently(tiny):
    """Other weights on the context path (context set abstraction and context decoder) change the caption
    prefix but no box of any decoder layer: the instance and context decoders do not attend to each other."""
    _, variables, data, out, apply = tiny
    params = dict(variables["params"])
    for name in ("context_sa", "context_decoder"):
        params[name] = jax.tree_util.tree_map(lambda x: 1.5 * x + 0.1, params[name])
    new = apply({**variables, "params": params}, jnp.asarray(data["points"]))
    for layer_new, layer in zip([new] + new["aux_outputs"], [out] + out["aux_outputs"]):
        for key in ("center", "size", "sem_cls_logits", "angle_residual_normalized"):
            np.testing.assert_array_equal(layer_new[key], layer[key])
    assert float(jnp.max(jnp.abs(new["prefix"] - out["prefix"]))) > 1e-3


def test_set_criterion_matches_and_losses():
    """Three queries, two targets: query 2 is target 0's box and class, query 0 target 1's: the Hungarian
    assignment finds them, the GIoU / centre / size terms are 0 and the class term is the weighted CE. An earlier
    layer predicting the same boxes in another query order costs the same (it is matched on its own), and the
    vote loss enters 10 times."""
    center = jnp.array([[[1.0, 1, 0.5], [3, 3, 0.5], [0.5, 0.5, 0.25]]])
    size = jnp.array([[[1.0, 1, 1], [1, 1, 1], [0.5, 0.5, 0.5]]])
    lo, hi = jnp.zeros((1, 3)), jnp.full((1, 3), 4.0)
    logits = jnp.array([[[0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]]])
    residual = jnp.array([[[0.5], [2.0], [-0.2]]])
    boxes = dict(sem_cls_logits=logits, center=center, size=size, center_normalized=center / 4,
                 size_normalized=size / 4, angle_logits=jnp.zeros((1, 3, 1)), angle_residual_normalized=residual)
    perm = jnp.array([1, 2, 0])
    aux = {k: v[:, perm] for k, v in boxes.items()}
    out = dict(boxes, aux_outputs=[aux], scene_min=lo, scene_max=hi, seed_xyz=center,
               vote_xyz=center + jnp.array([0.1, 0.0, 0.0]))
    gt = (center[:, jnp.array([2, 0])], size[:, jnp.array([2, 0])], jnp.array([[0, 1]]), jnp.array([[True, True]]))
    loss, terms, assign = fast_jit(set_criterion)(out, *gt)
    np.testing.assert_array_equal(assign, [[2, 0]])
    for name in ("giou", "center", "size", "angle_cls"):
        assert float(terms[name]) == pytest.approx(0.0, abs=1e-6), name
    logp = jax.nn.log_softmax(logits[0], -1)
    ce = -np.array([logp[0, 1], logp[1, 2], logp[2, 0]])
    assert float(terms["sem_cls"]) == pytest.approx((ce[0] + 0.25 * ce[1] + ce[2]) / 2.25, rel=1e-5)
    assert float(terms["angle_reg"]) == pytest.approx((0.5 * 0.2 ** 2 + 0.5 * 0.5 ** 2) / 2, rel=1e-5)
    assert float(terms["vote"]) == pytest.approx(0.1, rel=1e-5)  # seeds 0 and 2 lie in a box, each 0.1 off
    last, _, _ = layer_set_loss(boxes, lo, hi, *gt)
    _, _, aux_assign = layer_set_loss(aux, lo, hi, *gt)
    np.testing.assert_array_equal(aux_assign, [[1, 2]])
    assert float(terms["aux"]) == pytest.approx(float(last), rel=1e-5)
    assert float(loss) == pytest.approx(2 * float(last) + 10 * 0.1, rel=1e-5)
    iou = pairwise_iou_3d(center, size, center, size)
    np.testing.assert_allclose(np.diag(np.asarray(iou[0])), 1.0, rtol=1e-6)
    prefix = jnp.arange(3 * 2 * 4, dtype=jnp.float32).reshape(1, 3, 2, 4)
    np.testing.assert_array_equal(matched_prefix(prefix, assign)[0, 0], prefix[0, 2])
    tokens = jnp.array([[[5, EOS_ID, 0]]])
    logits = jnp.zeros((1, 1, 3, 6))
    assert float(caption_loss(logits, tokens, jnp.array([[True]]))) == pytest.approx(np.log(6), rel=1e-6)


def test_sharded_equals_single_device(tiny):
    model, variables, data, _, _ = tiny
    assert_sharded_forward_matches(model, variables, jnp.asarray(data["points"]), tol=1e-4)


def test_trains_on_generated_rooms(tiny):
    """jit + grad of the whole objective (Hungarian matching inside), 25 Adam steps on fresh
    rooms: every parameter has moved (Adam without weight decay moves exactly the entries that got a non-zero
    gradient) but the angle-class head (one angle bin: its cross-entropy is identically 0, as in the official
    code on ScanNet), and the total, box (GIoU) and caption losses fall; the m@kIoU evaluation runs on the
    trained model with beam-search captions."""
    model, variables, _, _, _ = tiny
    trained, history = fit(model, variables, ROOMS, steps=25, batch=4, tx=optax.adam(3e-3), jit=fast_jit)
    moved = jax.tree_util.tree_map(lambda a, b: a - b, trained["params"], variables["params"])
    assert not np.any(np.asarray(moved.pop("angle_cls_head")["out"]["kernel"]))
    assert_every_param_has_gradient(moved)
    first, last = history[:4], history[-4:]
    for term in ("loss", "giou", "caption"):
        assert np.mean([h[term] for h in last]) < np.mean([h[term] for h in first]), term
    scores = evaluate(model, trained, ROOMS.batch(2, seed=7), threshold=0.0, num_beams=2)  # every query kept
    assert scores["kept_per_scene"] == 12 and 0 <= scores["mean_best_iou"] <= 1 and "cider@0.5" in scores


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
    model, variables, data, out, _ = tiny
    pts = jnp.asarray(data["points"])
    with pytest.raises(ValueError, match=r"\(B, N, 6\)"):
        model.apply(variables, pts[..., :5])
    with pytest.raises(ValueError, match="samples 64 points; the cloud has only 40"):
        model.apply(variables, pts[:, :40])
    with pytest.raises(ValueError, match="exceed the model's max_caption_len=12"):
        model.apply(variables, out["prefix"][:, :2], jnp.ones((4, 2, 13), jnp.int32), method="caption_logits")
    with pytest.raises(ValueError, match="max_len=20 exceeds"):
        model.apply(variables, out["prefix"][:, :2], 20, method="generate")
