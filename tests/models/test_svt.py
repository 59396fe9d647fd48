"""SVT: official parameter counts, the JAX DTCWT against pytorch_wavelets (forward, inverse, J levels,
round trip), live parity with the official badripatro/svt code (where fetched) and a key-for-key
converter test, the dense-feature contract and heads, MixToken + token-label training on digits,
sharding, and input errors."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.convert import CheckpointMismatchError, load_pretrained
from jaxformers.layers.wavelets import biort_filters, dtcwt_forward, dtcwt_inverse, qshift_filters
from jaxformers.models.svt import OFFICIAL_PARAMS, TokenLabelOutput, _box_mask, mix_token_box, token_label_loss
from jaxformers.registry import count_params
from jaxformers.sharding import make_mesh
from tests.helpers import (assert_every_param_has_gradient, digits, fast_jit, image,
                           import_pytorch_wavelets, load_official, model_and_features, numpy_variables,
                           shard_like_init, single_and_sharded)

# Stage 1 is 64 wide so the official mixer (which only defines widths 64/96/128/192) builds too.
TINY = dict(img_size=32, stem_hidden_dim=8, embed_dims=(64, 16, 16, 32), num_heads=(1, 2, 2, 2),
            mlp_ratios=(2, 2, 2, 2), depth=(1, 1, 1, 1), num_classes=5)


@pytest.fixture(scope="module")
def tiny():
    return model_and_features("svt_h_s", image(2, 32), **TINY)


def test_param_counts_equal_official_code():
    # badripatro/svt svt_s/b/l(num_classes=1000, token_label=True), counted with torch (pytorch_wavelets 1.3.0)
    assert {n: count_params(n) for n in OFFICIAL_PARAMS} == OFFICIAL_PARAMS == {
        "svt_h_s": 22_052_592, "svt_h_b": 32_878_544, "svt_h_l": 54_594_000}
    assert count_params("svt_h_s", token_label=False) == 21_603_592
    assert jf.list_models("svt_*") == sorted(OFFICIAL_PARAMS)
    assert jf.model_info("svt_h_b").arxiv == "2311.01310"


def test_dtcwt_matches_pytorch_wavelets():
    pw = import_pytorch_wavelets()
    torch = pytest.importorskip("torch")
    from pytorch_wavelets.dtcwt.coeffs import level1, qshift

    for name in ("near_sym_a", "near_sym_b"):  # our derived filters are the shipped ones
        for ours, ref in zip((biort_filters(name)[k] for k in ("h0o", "g0o", "h1o", "g1o")), level1(name, compact=True)):
            np.testing.assert_allclose(ours, ref.ravel(), atol=1e-15)
    for name in ("qshift_a", "qshift_b"):
        keys = ("h0a", "h0b", "g0a", "g0b", "h1a", "h1b", "g1a", "g1b")
        for ours, ref in zip((qshift_filters(name)[k] for k in keys), qshift(name)):
            np.testing.assert_allclose(ours, ref.ravel(), atol=1e-15)
    rng = np.random.default_rng(0)
    for (h, w, levels, biort, qs) in [(16, 16, 1, "near_sym_b", "qshift_b"), (32, 24, 3, "near_sym_b", "qshift_b"),
                                      (28, 20, 2, "near_sym_a", "qshift_a"), (15, 17, 2, "near_sym_b", "qshift_b")]:
        x = rng.standard_normal((2, 3, h, w)).astype(np.float32)
        yl, yh = pw.DTCWTForward(J=levels, biort=biort, qshift=qs)(torch.from_numpy(x))
        low, highs = dtcwt_forward(jnp.asarray(x.transpose(0, 2, 3, 1)), levels, biort, qs)
        np.testing.assert_allclose(low, yl.numpy().transpose(0, 2, 3, 1), atol=2e-6)
        assert len(highs) == levels
        for ours, ref in zip(highs, yh):  # ours (B, h, w, 6, C, 2); theirs (B, C, 6, h, w, 2)
            np.testing.assert_allclose(np.asarray(ours).transpose(0, 4, 3, 1, 2, 5), ref.numpy(), atol=2e-6)
        ref = pw.DTCWTInverse(biort=biort, qshift=qs)((yl, yh)).numpy().transpose(0, 2, 3, 1)
        rec = np.asarray(dtcwt_inverse(low, highs, biort, qs))
        np.testing.assert_allclose(rec, ref, atol=3e-6)
        if h % 2 == 0 and w % 2 == 0:  # perfect reconstruction
            np.testing.assert_allclose(rec, x.transpose(0, 2, 3, 1), atol=3e-6)


def test_dtcwt_layout_and_round_trip_without_torch():
    x = jax.random.normal(jax.random.key(0), (1, 16, 24, 2))
    low, (h1, h2) = dtcwt_forward(x, 2, "near_sym_b", "qshift_b")
    assert low.shape == (1, 8, 12, 2) and h1.shape == (1, 8, 12, 6, 2, 2) and h2.shape == (1, 4, 6, 6, 2, 2)
    np.testing.assert_allclose(dtcwt_inverse(low, [h1, h2], "near_sym_b", "qshift_b"), x, atol=3e-6)
    # a horizontal edge lands in the near-horizontal (15 / 165 degree) bands, not the vertical ones
    edge = jnp.zeros((1, 16, 16, 1)).at[:, 8:].set(1.0)
    energy = jnp.sum(jnp.square(dtcwt_forward(edge, 1, "near_sym_b")[1][0]), axis=(0, 1, 2, 4, 5))
    assert float(energy[0] + energy[5]) > 100 * float(energy[2] + energy[3])
    with pytest.raises(ValueError, match="unknown level-1 filters 'near_sym_c'"):
        dtcwt_forward(x, 1, "near_sym_c")
    with pytest.raises(ValueError, match="highpasses\\[0\\] must be"):
        dtcwt_inverse(low, [h1[..., 0]], "near_sym_b")


def official_svt_state_dict(cfg, seed=0):
    """Every key of the official ``SVT(...).state_dict()`` (badripatro/svt svt.py) with its shape: the stem
    Sequential ``patch_embed1.conv.{0,1,3,4,6,7}``, ``proj``/``norm`` of each ``patch_embed{i}``, ``block{i}.{j}``
    (stage 1: scatter mixer weights + its DTCWT filter buffers; later: ``q``/``kv``/``proj``; PVTv2 FFN with
    ``dwconv.dwconv``), ``norm{i}``, ``post_network.0``, ``head``, ``aux_head``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}

    def put(name, *shape):
        sd[name] = torch.randn(*shape, generator=g) * 0.1

    def linear(name, cout, cin):
        put(name + ".weight", cout, cin)
        put(name + ".bias", cout)

    def ln(name, c):
        put(name + ".weight", c)
        put(name + ".bias", c)

    def bn(name, c):
        ln(name, c)
        put(name + ".running_mean", c)
        sd[name + ".running_var"] = torch.rand(c, generator=g) + 0.5
        sd[name + ".num_batches_tracked"] = torch.tensor(7)

    e, hid, res = cfg["embed_dims"], cfg["stem_hidden_dim"], cfg["img_size"] // 4
    put("patch_embed1.conv.0.weight", hid, 3, 7, 7)
    bn("patch_embed1.conv.1", hid)
    for t in (3, 6):
        put(f"patch_embed1.conv.{t}.weight", hid, hid, 3, 3)
        bn(f"patch_embed1.conv.{t + 1}", hid)
    filters = {**biort_filters("near_sym_b"), **qshift_filters("qshift_b")}
    for s in range(4):
        c, cin = e[s], (hid if s == 0 else e[s - 1])
        put(f"patch_embed{s + 1}.proj.weight", c, cin, 3, 3)
        put(f"patch_embed{s + 1}.proj.bias", c)
        ln(f"patch_embed{s + 1}.norm", c)
        for j in range(cfg["depth"][s]):
            t = f"block{s + 1}.{j}."
            ln(t + "norm1", c)
            ln(t + "norm2", c)
            if s == 0:
                bs = c // 4
                put(t + "attn.complex_weight_ll", c, res, res)
                put(t + "attn.complex_weight_lh_1", 2, 4, bs, bs)
                put(t + "attn.complex_weight_lh_2", 2, 4, bs, bs)
                put(t + "attn.complex_weight_lh_b1", 2, 4, bs)
                put(t + "attn.complex_weight_lh_b2", 2, 4, bs)
                for k in ("h0o", "h1o", "h0a", "h0b", "h1a", "h1b"):
                    sd[t + f"attn.xfm.{k}"] = torch.tensor(filters[k][::-1].copy()).float().reshape(1, 1, -1, 1)
                for k in ("g0o", "g1o", "g0a", "g0b", "g1a", "g1b"):
                    sd[t + f"attn.ifm.{k}"] = torch.tensor(filters[k][::-1].copy()).float().reshape(1, 1, -1, 1)
            else:
                linear(t + "attn.q", c, c)
                linear(t + "attn.kv", 2 * c, c)
                linear(t + "attn.proj", c, c)
            hidden = int(c * cfg["mlp_ratios"][s])
            linear(t + "mlp.fc1", hidden, c)
            put(t + "mlp.dwconv.dwconv.weight", hidden, 1, 3, 3)
            put(t + "mlp.dwconv.dwconv.bias", hidden)
            linear(t + "mlp.fc2", c, hidden)
        ln(f"norm{s + 1}", c)
    c = e[-1]
    ln("post_network.0.norm1", c)
    ln("post_network.0.norm2", c)
    linear("post_network.0.attn.kv", 2 * c, c)
    linear("post_network.0.attn.q", c, c)
    linear("post_network.0.attn.proj", c, c)
    linear("post_network.0.mlp.fc1", int(c * cfg["mlp_ratios"][-1]), c)
    linear("post_network.0.mlp.fc2", c, int(c * cfg["mlp_ratios"][-1]))
    linear("head", cfg["num_classes"], c)
    linear("aux_head", cfg["num_classes"], c)
    return sd


def test_converter_maps_every_official_key(tmp_path):
    torch = pytest.importorskip("torch")
    sd = official_svt_state_dict(TINY)
    torch.save(sd, tmp_path / "svt.pth")
    v = load_pretrained("svt_h_s", tmp_path / "svt.pth", **TINY)  # strict: every key used, every shape right
    p = v["params"]
    np.testing.assert_array_equal(p["block1_0"]["attn"]["complex_weight_ll"],
                                  sd["block1.0.attn.complex_weight_ll"].numpy().transpose(1, 2, 0))
    w = sd["block3.0.attn.kv.weight"].numpy()  # rows [k | v], 2 heads of 8
    np.testing.assert_array_equal(p["block3_0"]["attn"]["kv"]["kernel"][:, 1, 1], w[16 + 8:32].T)
    np.testing.assert_array_equal(v["batch_stats"]["patch_embed1_bn2"]["var"],
                                  sd["patch_embed1.conv.7.running_var"].numpy())
    bad = dict(sd)
    bad["block1.0.attn.xfm.h0o"] = torch.zeros(1, 1, 13, 1)  # a mixer built with other wavelets
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="other wavelet filters"):
        load_pretrained("svt_h_s", tmp_path / "bad.pth", **TINY)
    del bad["block1.0.attn.xfm.h0o"], bad["aux_head.bias"]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match="aux_head.bias"):
        load_pretrained("svt_h_s", tmp_path / "missing.pth", **TINY)


def test_logits_match_official_code(tmp_path):
    import_pytorch_wavelets()
    torch = pytest.importorskip("torch")
    official = load_official("svt", "svt.py", "official_svt")
    torch.manual_seed(0)
    ref = official.SVT(in_chans=3, num_classes=5, stem_hidden_dim=8, embed_dims=list(TINY["embed_dims"]),
                       num_heads=list(TINY["num_heads"]), mlp_ratios=list(TINY["mlp_ratios"]),
                       norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), depths=[1, 1, 1, 1]).eval()
    sd = official_svt_state_dict(TINY, seed=3)  # random values everywhere (BN statistics, norms, the mixer)
    ref.block1[0].attn.complex_weight_ll = torch.nn.Parameter(torch.zeros(64, 8, 8))  # 32 px instead of 224
    ref.load_state_dict(sd, strict=True)
    torch.save(sd, tmp_path / "svt.pth")
    v = load_pretrained("svt_h_s", tmp_path / "svt.pth", **TINY)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
        mixer_in = torch.randn(2, 64, 64)
        mixer_ref = ref.block1[0].attn(mixer_in, 8, 8).numpy()
    model = jf.create_model("svt_h_s", **TINY)
    out = fast_jit(model.apply)(v, x)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(out, expected, atol=2e-4, rtol=1e-4)
    from jaxformers.models.svt import SpectralGatingNetwork
    mixer = SpectralGatingNetwork().apply({"params": v["params"]["block1_0"]["attn"]},
                                          jnp.asarray(mixer_in.numpy().reshape(2, 8, 8, 64)))
    np.testing.assert_allclose(np.asarray(mixer).reshape(2, 64, 64), mixer_ref, atol=1e-5)


def test_contract_heads_and_token_label_outputs(tiny):
    model, variables, out = tiny
    assert {s: m.shape for s, m in out.features.items()} == {
        4: (2, 8, 8, 64), 8: (2, 4, 4, 16), 16: (2, 2, 2, 16), 32: (2, 1, 1, 32)}
    p = variables["params"]
    aux = out.features[32] @ p["aux_head"]["kernel"] + p["aux_head"]["bias"]
    head = out.pre_logits @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(out.logits, head + 0.5 * aux.max(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    tl = fast_jit(lambda v, x: model.apply(v, x, token_labels=True))(variables, image(2, 32))  # eval: no MixToken
    assert isinstance(tl, TokenLabelOutput) and tl.token_logits.shape == (2, 1, 1, 5) and not np.any(tl.box)
    np.testing.assert_allclose(tl.logits, head, rtol=1e-5, atol=1e-5)
    labels = jax.nn.one_hot(jnp.array([1, 3]), 5)  # no mixing: the plain soft-target cross-entropies
    ce = lambda z: float(optax.softmax_cross_entropy(z.reshape(-1, 5), jnp.repeat(labels, z.size // 10, 0)).mean())
    np.testing.assert_allclose(token_label_loss(tl, labels), ce(tl.logits) + 0.5 * ce(tl.token_logits), rtol=1e-5)


def test_mix_token_and_token_label_training_on_digits():
    # 64 px: a 2x2 token grid, so MixToken boxes are non-trivial
    cfg = {**TINY, "img_size": 64, "embed_dims": (16, 16, 16, 32), "drop_path_rate": 0.1, "num_classes": 10}
    model = jf.create_model("svt_h_s", **cfg)
    x, y = digits(48, 64)
    variables = numpy_variables(model, x[:2])
    params, stats = variables["params"], variables["batch_stats"]
    labels = jax.nn.one_hot(y, 10)
    tx = optax.adam(2e-3)
    opt = tx.init(params)

    @fast_jit
    def step(params, stats, opt, rng):
        def loss_fn(p):
            out, new = model.apply({"params": p, "batch_stats": stats}, x, train=True, token_labels=True,
                                   mutable=["batch_stats"], rngs={"dropout": rng})
            return token_label_loss(out, labels), (new["batch_stats"], out.box)
        (loss, (stats, box)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), stats, opt, loss, g, box

    losses, boxes = [], []
    for i in range(14):
        params, stats, opt, loss, g, box = step(params, stats, opt, jax.random.key(i))
        losses.append(float(loss))
        boxes.append(np.asarray(box))
        if i == 0:
            assert_every_param_has_gradient(g)
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    boxes = np.stack(boxes)  # on a 2x2 token grid the official boxes are empty (half of floor(2 sqrt(1-lam)) = 0)
    assert np.all((boxes >= 0) & (boxes <= 2)) and np.all(boxes[:, :2] <= boxes[:, 2:])


def test_mix_token_boxes_and_masks():
    boxes = np.stack([np.asarray(mix_token_box(jax.random.key(i), (7, 7))) for i in range(64)])
    assert np.all((boxes >= 0) & (boxes <= 7)) and np.all(boxes[:, :2] <= boxes[:, 2:])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert 0 < np.mean(area > 0) < 1 and area.max() >= 16  # lam ~ Beta(1, 1): empty to large boxes
    mask = np.asarray(_box_mask(jnp.array([1, 2, 3, 5]), (7, 7), 8))  # token box -> 8x8 stage-1 cells
    assert mask.shape == (56, 56) and mask.sum() == 2 * 3 * 64 and mask[8:24, 16:40].all()


def test_sharded_equals_single_device(tiny):
    model, variables, _ = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = image(4, 32)
    sharded = shard_like_init(model, variables, x, mesh)
    single, multi = single_and_sharded(fast_jit(model.apply), variables, sharded, x, mesh)
    np.testing.assert_allclose(np.asarray(multi), np.asarray(single), rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_clear_errors(tiny):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match="built for img_size=32x32"):
        model.apply(variables, image(1, 64))
    with pytest.raises(ValueError, match="divisible by 32"):
        jax.eval_shape(jf.create_model("svt_h_s", img_size=48).init, jax.random.key(0), image(1, 48))
    with pytest.raises(ValueError, match="num_blocks=4; width 18"):
        jax.eval_shape(jf.create_model("svt_h_s", **{**TINY, "embed_dims": (18, 16, 16, 32)}).init,
                       jax.random.key(0), image(1, 32))
    with pytest.raises(ValueError, match="token_labels=True needs"):
        jax.eval_shape(lambda: jf.create_model("svt_h_s", **{**TINY, "token_label": False}).init(
            jax.random.key(0), image(1, 32), token_labels=True))
