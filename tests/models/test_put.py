"""PUT: official parameter counts, the P-VQVAE (patch-encoder locality, dual codebook, EMA updates, the
guided decoder's merge), live parity with the official liuqk3/PUT code (where fetched) and key-for-key
converter tests, the two-stage training and pluralistic sampling on scikit-image photographs with
generated free-form masks, sharding and input errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.convert import load_pretrained
from jaxformers.models.put import PVQVAE_PARAMS, TRANSFORMERS, VectorQuantizer, inpaint, token_types, transformer_inputs
from jaxformers.registry import count_params
from jaxformers.sharding import make_mesh
from tests.helpers import (assert_every_param_has_gradient, fast_jit, load_official, numpy_variables, shard_like_init,
                           single_and_sharded)
from train import inpainting

# e_dim == res_ch as in every official configuration (the official transformer sizes its input projection by
# the P-VQVAE decoder's input width)
TINY = dict(img_size=32, res_ch=32, e_dim=32, n_e=16, masked_embed_start=8, num_res_block=1, decoder_base_ch=8)
TINY_T = dict(num_layers=1, embed_dim=32, num_heads=2, seq_len=16, e_dim=32, num_token=8)


@pytest.fixture(scope="module")
def tiny():
    model = jf.create_model("put_pvqvae", **TINY)
    x = jnp.zeros((2, 32, 32, 3))
    variables = numpy_variables(model, x)
    return model, variables


def test_param_counts_equal_official_code():
    # liuqk3/PUT configs/put_cvpr2022/*.yaml, counted with torch (transformers without their bundled P-VQVAE)
    assert count_params("put_pvqvae") == PVQVAE_PARAMS == 7_401_219
    assert {n: count_params(n) for n in TRANSFORMERS} == {n: c for n, (_, c) in TRANSFORMERS.items()} == {
        "put_transformer_ffhq": 95_491_072, "put_transformer_places2": 111_252_992,
        "put_transformer_imagenet": 442_706_432}


def test_encoder_locality_dual_codebook_and_guided_decoder(tiny):
    model, v = tiny
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    mask = np.ones((2, 32, 32), np.float32)
    mask[:, 0:16, 10:30] = 0  # token (1, 2) fully masked, (0, 1) and (0, 3) partly
    mask = jnp.asarray(mask)
    enc = fast_jit(lambda v, x, m: model.apply(v, x, m, method="encode"))
    other = jnp.where(mask[..., None] > 0, image, jnp.asarray(rng.uniform(-1, 1, image.shape), jnp.float32))
    types = np.asarray(token_types(mask))
    visible = types == 1
    assert types[0, 1, 2] == 0 and types[0, 0, 1] == 2 and visible.sum() == 2 * 10
    f1, f2 = enc(v, image, mask), enc(v, other, mask)
    np.testing.assert_array_equal(np.asarray(f1)[visible], np.asarray(f2)[visible])  # holes never leak
    np.testing.assert_array_equal(enc(v, other, None)[visible], np.asarray(enc(v, image, None))[visible])
    tok = fast_jit(lambda v, x, m: model.apply(v, x, m, method="tokens"))
    tokens = np.asarray(tok(v, image, mask))
    assert np.all(tokens[visible] < 8) and np.all(tokens[~visible] >= 8)  # the dual codebook
    assert np.all(np.asarray(tok(v, image, jnp.ones_like(mask))) < 8)  # no hole: every token visible
    # the decoder's last merge: a visible pixel away from the holes does not depend on the codes
    dec = fast_jit(lambda v, q: model.apply(v, q, image, mask, method="decode"))
    q = jnp.asarray(rng.normal(size=(2, 4, 4, 32)), jnp.float32)
    d1, d2 = np.asarray(dec(v, q)), np.asarray(dec(v, 2 * q + 1))
    np.testing.assert_allclose(d1[:, 20:, :], d2[:, 20:, :], atol=1e-5)
    assert not np.allclose(d1[:, 6:12, 14:26], d2[:, 6:12, 14:26], atol=1e-3)


def test_dual_codebook_ema_update_worked_example():
    # 4 codes in 2-d, codes 0-1 for visible tokens, 2-3 for masked / partially masked ones
    codes = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)
    z = np.array([[[[0.9, 0.1], [0.1, 0.1]], [[0.2, 0.9], [0.9, 0.2]]]], np.float32)  # (1, 2, 2, 2)
    types = jnp.asarray([[[1, 1], [0, 2]]])  # the last is nearest to code 1 but partly masked: code 3
    vq = VectorQuantizer(n_e=4, e_dim=2, masked_embed_start=2)
    stats = {"embedding": codes, "cluster_size": np.array([1.0, 0.0, 0.0, 0.0], np.float32), "embedding_avg": codes}
    (q, idx, loss), new = vq.apply({"batch_stats": stats}, jnp.asarray(z), types, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(idx, [[[1, 0], [2, 3]]])
    np.testing.assert_allclose(q, codes[np.array([[[1, 0], [2, 3]]])], atol=1e-7)  # straight-through value = the codes
    np.testing.assert_allclose(loss, [(0.02 + 0.02 + 0.05 + 0.65) / 8], rtol=1e-6)  # mean ||z - q||^2 per element
    st = new["batch_stats"]
    # cluster_size = 0.99 * [1, 0, 0, 0] + 0.01 * [1, 1, 1, 1]; n = 1.03; Laplace-smoothed sizes (eps 1e-5)
    size = np.array([1.0, 0.01, 0.01, 0.01])
    np.testing.assert_allclose(st["cluster_size"], size, rtol=1e-6)
    avg = 0.99 * codes + 0.01 * np.array([[0.1, 0.1], [0.9, 0.1], [0.2, 0.9], [0.9, 0.2]])
    np.testing.assert_allclose(st["embedding_avg"], avg, rtol=1e-6)
    smoothed = (size + 1e-5) / (1.03 + 4e-5) * 1.03
    np.testing.assert_allclose(st["embedding"], avg / smoothed[:, None], rtol=1e-5)
    np.testing.assert_allclose(st["embedding"][1], [99.9 * 0.01 / smoothed[1], 0.001 / smoothed[1]], rtol=1e-5)
    # the EMA statistics move only in training
    _, same = vq.apply({"batch_stats": stats}, jnp.asarray(z), types, mutable=["batch_stats"])
    np.testing.assert_array_equal(same["batch_stats"]["embedding"], codes)


def _official_pvqvae_config(cfg):
    res = cfg["res_ch"]
    return {"target": "image_synthesis.modeling.codecs.image_codec.patch_vqgan.PatchVQGAN", "params": {
        "trainable": False, "token_shape": [cfg["img_size"] // 8] * 2,
        "quantizer_config": {"target": "image_synthesis.modeling.codecs.image_codec.patch_vqgan.VectorQuantizer",
                             "params": {"n_e": cfg["n_e"], "e_dim": cfg["e_dim"],
                                        "masked_embed_start": cfg["masked_embed_start"], "embed_ema": True,
                                        "get_embed_type": "retrive", "distance_type": "euclidean"}},
        "encoder_config": {"target": "image_synthesis.modeling.codecs.image_codec.patch_vqgan.PatchEncoder2",
                           "params": {"in_ch": 3, "res_ch": res, "out_ch": res, "num_res_block": cfg["num_res_block"],
                                      "res_block_bottleneck": 2, "stride": 8}},
        "decoder_config": {"target": "image_synthesis.modeling.codecs.image_codec.patch_vqgan.PatchConvDecoder2",
                           "params": {"in_ch": res, "out_ch": 3, "res_ch": res, "num_res_block": cfg["num_res_block"],
                                      "res_block_bottleneck": 2, "stride": 8, "up_layer_with_image": True,
                                      "encoder_downsample_layer": "conv"}}}}


def official_pvqvae_keys(cfg):
    """(key, shape) of every tensor of the official ``PatchVQGAN`` state dict for ``cfg`` (64-channel decoder
    base, as the official code fixes it)."""
    r, e, n, k = cfg["res_ch"], cfg["e_dim"], cfg["n_e"], cfg["num_res_block"]
    keys = {"encoder.pre_layers.0.weight": (r, 192), "encoder.pre_layers.0.bias": (r,),
            "encoder.post_layers.1.weight": (r, r), "encoder.post_layers.1.bias": (r,),
            "quant_conv.weight": (e, r, 1, 1), "quant_conv.bias": (e,), "post_quant_conv.weight": (r, e, 1, 1),
            "post_quant_conv.bias": (r,), "quantize.embedding": (n, e), "quantize.cluster_size": (n,),
            "quantize.embedding_avg": (n, e), "decoder.pre_layers.0.weight": (r, r, 3, 3),
            "decoder.pre_layers.0.bias": (r,), "decoder.post_layers.1.weight": (3, 64, 3, 3),
            "decoder.post_layers.1.bias": (3,)}
    for i in range(k):
        keys.update({f"encoder.res_layers.{i}.layers.1.weight": (r // 2, r), f"encoder.res_layers.{i}.layers.1.bias":
                     (r // 2,), f"encoder.res_layers.{i}.layers.3.weight": (r, r // 2),
                     f"encoder.res_layers.{i}.layers.3.bias": (r,), f"decoder.res_layers.{i}.conv.1.weight":
                     (r // 2, r, 3, 3), f"decoder.res_layers.{i}.conv.1.bias": (r // 2,),
                     f"decoder.res_layers.{i}.conv.3.weight": (r, r // 2, 1, 1), f"decoder.res_layers.{i}.conv.3.bias":
                     (r,)})
    for i, (cin, cout) in enumerate(((r, 256), (256, 128), (128, 64))):
        keys.update({f"decoder.up_layers.{i}.deconv.weight": (cin, cout, 4, 4), f"decoder.up_layers.{i}.deconv.bias":
                     (cout,)})
    for i, (cin, cout, ks) in enumerate(((3, 64, 3), (64, 128, 4), (128, 256, 4), (256, r, 4))):
        keys.update({f"decoder.encoder.layers.{i}.weight": (cout, cin, ks, ks), f"decoder.encoder.layers.{i}.bias":
                     (cout,)})
    return keys


def official_transformer_keys(cfg):
    """(key, shape) of the official ``MaskedImageInpaintingTransformer`` state dict for ``cfg`` (without its
    bundled ``content_codec.*`` P-VQVAE)."""
    d, e, L = cfg["embed_dim"], cfg["e_dim"], cfg["num_layers"]
    keys = {"pos_emb": (1, cfg["seq_len"], d), "emb_proj.weight": (d, e), "emb_proj.bias": (d,),
            "layer_norm.weight": (d,), "layer_norm.bias": (d,), "to_logits.weight": (cfg["num_token"], d),
            "to_logits.bias": (cfg["num_token"],)}
    for i in range(L):
        for n, shape in (("ln1.weight", (d,)), ("ln1.bias", (d,)), ("ln2.weight", (d,)), ("ln2.bias", (d,)),
                         ("mlp.0.weight", (4 * d, d)), ("mlp.0.bias", (4 * d,)), ("mlp.2.weight", (d, 4 * d)),
                         ("mlp.2.bias", (d,))) + tuple((f"attn.{m}.{k}", (d, d) if k == "weight" else (d,))
                                                       for m in ("key", "query", "value", "proj")
                                                       for k in ("weight", "bias")):
            keys[f"blocks.{i}.{n}"] = shape
    return keys


PARITY_CFG = {**TINY, "decoder_base_ch": 64}  # the official decoder fixes its narrowest width at 64


@pytest.fixture(scope="module")
def official_state_dicts(tmp_path_factory):
    """Random official-layout state dicts (P-VQVAE; transformer with its bundled P-VQVAE), saved as .pth."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(*s, generator=g) * 0.1 for k, s in official_pvqvae_keys(PARITY_CFG).items()}
    sd["quantize.cluster_size"] = torch.rand(PARITY_CFG["n_e"], generator=g) + 0.5
    tsd = {k: torch.randn(*s, generator=g) * 0.2 for k, s in official_transformer_keys(TINY_T).items()}
    tsd.update({"content_codec." + k: t for k, t in sd.items()})
    path = tmp_path_factory.mktemp("put")
    torch.save(sd, path / "pvqvae.pth")
    torch.save(tsd, path / "transformer.pth")
    return sd, tsd, path


def test_converters_key_for_key(official_state_dicts):
    sd, tsd, path = official_state_dicts
    v = load_pretrained("put_pvqvae", path / "pvqvae.pth", **PARITY_CFG)  # strict: every key, every shape
    np.testing.assert_array_equal(v["batch_stats"]["quantize"]["embedding"], sd["quantize.embedding"].numpy())
    np.testing.assert_array_equal(v["params"]["decoder"]["up_layers_0"]["kernel"][3, 0],  # flipped deconv kernel
                                  sd["decoder.up_layers.0.deconv.weight"].numpy()[:, :, 0, 3])
    tv = load_pretrained("put_transformer_ffhq", path / "transformer.pth", **TINY_T)  # content_codec.* skipped
    w = tsd["blocks.0.attn.key.weight"].numpy()  # our fused qkv: [q | k | v] x 2 heads x 16
    np.testing.assert_array_equal(tv["params"]["blocks_0"]["attn"]["qkv"]["kernel"][:, 1, 1], w[16:].T)


def test_official_parity(official_state_dicts):
    """Features, dual-codebook tokens, guided decoding, transformer logits and the greedy ``sample_largest``
    completion equal the official liuqk3/PUT code on random weights."""
    torch = pytest.importorskip("torch")
    sd, tsd, path = official_state_dicts
    load_official("PUT", "image_synthesis/modeling/codecs/image_codec/patch_vqgan.py")
    tr = load_official("PUT", "image_synthesis/modeling/models/masked_image_inpainting_transformer_in_feature.py")
    from image_synthesis.utils.misc import instantiate_from_config
    ref = instantiate_from_config(_official_pvqvae_config(PARITY_CFG)).eval()
    assert {k: tuple(t.shape) for k, t in ref.state_dict().items()} == official_pvqvae_keys(PARITY_CFG)
    ref.load_state_dict(sd)
    v = load_pretrained("put_pvqvae", path / "pvqvae.pth", **PARITY_CFG)
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    mask = inpainting.masks(2, 32, seed=3) > 0
    mask[:, 8:16, 16:24] = False  # strokes and a fully masked patch: every token type
    model = jf.create_model("put_pvqvae", **PARITY_CFG)
    x, m = jnp.asarray(pixels / 127.5 - 1), jnp.asarray(mask, jnp.float32)
    image_t, mask_t = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), torch.from_numpy(mask[:, None].copy())
    with torch.no_grad():  # features and codes of the masked image (dual codebook), decoding given codes
        got = ref.get_features(image_t, mask=mask_t, return_token=True)
        toks = got["token"].numpy()
        rec = ref.decode(torch.from_numpy(toks).view(2, -1), mask_im=image_t * mask_t, mask=mask_t,
                         token_shape=[4, 4]).numpy().transpose(0, 2, 3, 1)
    types = np.asarray(token_types(m))
    assert (types == 0).any() and (types == 1).any() and (types == 2).any()
    feats = model.apply(v, x, m, method="encode")
    np.testing.assert_allclose(feats, got["feature"].numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(model.apply(v, x, m, method="tokens"), toks)
    ours = model.apply(v, jnp.asarray(toks), x, m, method="decode_tokens")
    np.testing.assert_allclose(np.clip((np.asarray(ours) + 1) * 127.5, 0, 255), rec, atol=0.02)  # of 255

    tref = tr.MaskedImageInpaintingTransformer(n_layer=1, content_seq_len=16, n_embd=32, n_head=2, num_token=8,
                                               attn_pdrop=0.0, resid_pdrop=0.0, block_activate="GELU2",
                                               content_codec_config=_official_pvqvae_config(PARITY_CFG)).eval()
    tref.load_state_dict(tsd)
    tv = load_pretrained("put_transformer_ffhq", path / "transformer.pth", **TINY_T)
    t = jf.create_model("put_transformer_ffhq", **TINY_T)
    f = rng.normal(size=(2, 16, 32)).astype(np.float32)
    with torch.no_grad():
        emb = tref.emb_proj(torch.from_numpy(f)) + tref.pos_emb
        expected = tref(batch={"count_flops": True, "embedding": emb})["logits"].numpy()
        # greedy sampling (top-1: filter_ratio 1.0) fills the most confident masked token first, as ours
        done = tref.sample_largest(batch={"image": image_t, "mask": mask_t}, filter_ratio=1.0,
                                   num_token_per_iter=1)["completed"].numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(t.apply(tv, jnp.asarray(f)), expected, rtol=1e-4, atol=1e-4)
    out = inpaint(model, v, t, tv, x, m, jax.random.key(0), num_samples=2, top_k=1)
    hole = ~mask
    for sample in np.asarray(out):  # top-1: both samples are the greedy completion
        np.testing.assert_allclose(((sample + 1) * 127.5)[hole], done[hole], atol=0.05)


def test_two_stage_training_and_pluralistic_inpainting(tiny):
    model, v = tiny
    images = inpainting.photo_crops(24, 32, photo_size=64)
    m = inpainting.masks(8, 32, seed=5)
    assert m.shape == (8, 32, 32) and 0.05 < 1 - m.mean() < 0.9 and set(np.unique(m)) <= {0.0, 1.0}
    stage1 = inpainting.train_pvqvae(model, v, images, steps=20, batch=8, lr=2e-3, data_init=True)
    assert np.mean(stage1.losses[-4:]) < 0.7 * np.mean(stage1.losses[:4]), stage1.losses
    used = np.unique(np.asarray(fast_jit(lambda v, x: model.apply(v, x, method="tokens"))(stage1.variables, images)))
    assert len(used) >= 3 and np.all(used < 8), used  # a live codebook (codes initialised from features)
    # every parameter trained (jit + grad through the straight-through quantizer and the guided decoder)
    assert_every_param_has_gradient(jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b),
                                                           stage1.variables["params"], v["params"]))
    assert not np.allclose(stage1.variables["batch_stats"]["quantize"]["embedding"],
                           v["batch_stats"]["quantize"]["embedding"])  # EMA codebook moved
    t = jf.create_model("put_transformer_ffhq", **TINY_T)
    tv = numpy_variables(t, jnp.zeros((1, 16, 32)))
    stage2 = inpainting.train_transformer(model, stage1.variables, t, tv, images, steps=10, batch=8, lr=3e-3)
    assert np.mean(stage2.losses[-3:]) < 0.8 * np.mean(stage2.losses[:3]), stage2.losses
    x, mask = jnp.asarray(images[:2]), jnp.asarray(m[:2])
    out = inpaint(model, stage1.variables, t, stage2.variables, x, mask, jax.random.key(0), num_samples=3,
                  top_k=8, temperature=0.2, tokens_per_step=2)
    assert out.shape == (3, 2, 32, 32, 3) and np.all(np.isfinite(out))
    keep = np.asarray(mask, bool)
    np.testing.assert_array_equal(np.asarray(out)[:, keep], np.broadcast_to(np.asarray(x)[keep], (3, keep.sum(), 3)))
    assert np.abs(np.asarray(out[0] - out[1]))[~keep].mean() > 1e-3  # pluralistic: the samples differ
    scores = inpainting.evaluate_inpainting(model, stage1.variables, t, stage2.variables, images[:2], m[:2],
                                            num_samples=3, top_k=8, temperature=0.2, tokens_per_step=2)
    assert np.isfinite(scores["psnr_holes"]) and scores["completion_spread"] > 1e-3, scores


def test_hole_metrics_worked_example():
    target = np.zeros((1, 2, 2, 3))
    mask = np.array([[[1.0, 1.0], [1.0, 0.0]]])  # one hole pixel
    pred = target.copy()
    pred[0, 1, 1] = 0.2  # error 0.1 of the [0, 1] range: MSE 0.01 -> 20 dB; visible errors do not count
    pred[0, 0, 0] = 5.0
    np.testing.assert_allclose(inpainting.hole_psnr(pred, target, mask), [20.0])
    image = np.array([[[[1.0] * 3, [0.0] * 3], [[-1.0] * 3, [9.0] * 3]]])
    np.testing.assert_allclose(inpainting.mean_fill(image, mask)[0, 1, 1], [0.0] * 3)  # mean of 1, 0, -1
    np.testing.assert_allclose(inpainting.mean_fill(image, mask)[0, 0], image[0, 0])


def test_sharding_and_errors(tiny):
    model, v = tiny
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = shard_like_init(model, v, x, mesh)
    single, multi = single_and_sharded(jax.jit(lambda v, x: model.apply(v, x).reconstruction), v, sharded, x, mesh)
    np.testing.assert_allclose(np.asarray(multi), np.asarray(single), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"mask must be \(batch, height, width\) = \(4, 32, 32\)"):
        model.apply(v, x, jnp.ones((4, 32, 32, 1)))
    with pytest.raises(ValueError, match="divisible by the 8-px patch size"):
        model.apply(v, jnp.zeros((1, 36, 36, 3)))
    t = jf.create_model("put_transformer_ffhq", **TINY_T)
    f = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 32)), jnp.float32)
    tv = numpy_variables(t, f[:1])
    single, multi = single_and_sharded(jax.jit(t.apply), tv, shard_like_init(t, tv, f, mesh), f, mesh)
    np.testing.assert_allclose(np.asarray(multi), np.asarray(single), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="built for seq_len=16"):
        inpaint(model, v, t, tv, jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 64, 64)), jax.random.key(0))
    with pytest.raises(ValueError, match=r"features \(batch, 16, 32\)"):
        jax.eval_shape(t.init, jax.random.key(0), jnp.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match="mask must be"):
        transformer_inputs(model, v, x, jnp.ones((4, 16, 16)), jax.random.key(0))
