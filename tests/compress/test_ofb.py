"""OFB: the search space as the official code builds it, the bi-mask against the official modules,
the losses, compression to a finished subnet and its export as a dense ViT, and OFB-DeiT A-E."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.compress import ofb
from jaxformers.models.ofb_deit import OFB_CONFIGS
from jaxformers.sharding import activate, make_mesh, shard_batch
from tests.helpers import FAST_COMPILE, digits, fast_jit, load_official, numpy_variables, shard_like_init

OFB_REPO = "HankYe+Once-for-Both"
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def test_candidate_lists_for_deit_small():
    heads, dims = ofb.attention_candidates(6, 64)
    assert heads == [2, 4, 6] and dims == [16, 24, 32, 40, 48, 56, 64]
    assert ofb.mlp_candidates(1536) == [384, 576, 768, 960, 1152, 1344, 1536]
    assert ofb.embed_candidates(384) == list(range(192, 385, 12)) and len(ofb.embed_candidates(384)) == 17
    assert ofb.attention_candidates(3, 64)[0] == [2]  # DeiT-T: the official range(2, H + 1, 2)


def test_ofb_deit_sizes_match_the_readme():
    for name, (dim, heads, head_dim, hidden, params, readme_m, readme_g, _) in OFB_CONFIGS.items():
        assert jf.count_params(name) == params and abs(params / 1e6 - readme_m) < 0.05, name
        base = (768, 12, 64, 3072) if name == "ofb_deit_e" else (384, 6, 64, 1536)
        assert dim in ofb.embed_candidates(base[0]) and hidden in ofb.mlp_candidates(base[3])
        assert heads in ofb.attention_candidates(base[1], 64)[0] and head_dim in ofb.attention_candidates(base[1], 64)[1]
        spaces = [ofb.Space("embed", ((dim,),), (True,), (dim,), True)]
        spaces += [ofb.Space("attn", ((heads,), (head_dim,)), (True,), (heads, head_dim), True),
                   ofb.Space("mlp", ((hidden,),), (True,), (hidden,), True)] * 12
        search = ofb.OFBSearchViT(tuple(spaces), original=base)
        assert abs(float(ofb.flops(search)[1]) - readme_g) < 0.05, name


def _official_layers():
    timm_layers = pytest.importorskip("timm.layers")
    helpers = types.ModuleType("timm.models.layers.helpers")
    helpers.to_2tuple = timm_layers.to_2tuple
    return load_official(OFB_REPO, "models/layers.py", "ofb_official_layers",
                         stubs={"timm.models.layers.helpers": helpers})


def test_bi_mask_matches_the_official_modules():
    torch = pytest.importorskip("torch")
    L = _official_layers()
    torch.manual_seed(0)
    attn = L.MAESparseAttention(L.Attention(96, 6, qkv_bias=True), attn_search=True)
    attn.w_p = 0.7
    x = torch.randn(2, 5, 96)
    ref = attn(x).detach().numpy()
    space = ofb.Space("attn", (tuple(attn.head_num_list), tuple(int(r * 16) for r in attn.qkv_channel_ratio_list)),
                      (True,) * 21, (6, 16))
    m = ofb.multiplier(space, jnp.asarray(attn.alpha.detach().numpy()), jnp.asarray(attn.score.detach().numpy()), 0.7)
    w = attn.qkv.weight.detach().numpy().reshape(3, 6, 16, 96)
    b = attn.qkv.bias.detach().numpy().reshape(3, 6, 16)
    qkv = jnp.einsum("bnc,thdc->bnthd", jnp.asarray(x.numpy()), w) + b
    q, k, v = (qkv[:, :, t] * m for t in range(3))
    a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * 16 ** -0.5, -1)
    out = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(2, 5, 96) @ attn.proj.weight.detach().numpy().T
    np.testing.assert_allclose(out + attn.proj.bias.detach().numpy(), ref, atol=1e-5)
    mlp = L.MAESparseMlp(L.Mlp(96, 384))
    mlp.w_p = 0.6
    ref = mlp(x).detach().numpy()
    sp = ofb.Space("mlp", (tuple(ofb.mlp_candidates(384)),), (True,) * 7, (384,))
    mm = ofb.multiplier(sp, jnp.asarray(mlp.alpha.detach().numpy()), jnp.asarray(mlp.score.detach().numpy()), 0.6)
    h = (x.numpy() @ mlp.fc1.weight.detach().numpy().T + mlp.fc1.bias.detach().numpy()) * np.asarray(mm)
    out = jax.nn.gelu(h, approximate=False) @ mlp.fc2.weight.detach().numpy().T + mlp.fc2.bias.detach().numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def _reference_losses(alpha, lam, score):
    """get_sparsity_loss for one module, written out (entropy + tan variance term + score norm)."""
    p = np.exp(alpha - alpha.max())
    p /= p.sum()
    n = p.size
    sigma = ((p - p.mean()) ** 2).sum() / (1 - 1 / n)
    return -(p * np.log(p)).sum() + np.tan(np.pi / 2 - np.pi * sigma) / n + lam * (1 / (1 + np.exp(-score))).sum()


def test_losses_compress_and_export_to_a_dense_vit():
    host = jf.create_model("deit_tiny_patch16_224", **TINY)
    x, y = digits(16, 32)
    model, variables = ofb.init_search(host, numpy_variables(host, x[:1]), jax.random.key(0))
    assert [s.grid for s in model.spaces[:3]] == [(17,), (2, 7), (7,)]  # D=64: 32..64 step 2; H=4, d=16
    ofb_vars = variables["ofb"]
    total = float(ofb.flops(model)[0])

    @fast_jit
    def losses(v, x):
        g = jax.grad(lambda o: ofb.flops_loss(model, o, 0.5 * total))(v["ofb"])
        return ofb.sparsity_losses(model, v["ofb"]), ofb.flops(model, v["ofb"])[1], g, model.apply(v, x, 0.5)

    sp, searched, g, logits = losses(variables, x)
    ref = sum(_reference_losses(np.asarray(ofb_vars[f"blocks_{i}_mlp_alpha"]).reshape(-1), 1e-4,
                                np.asarray(ofb_vars[f"blocks_{i}_mlp_score"])) for i in range(2))
    np.testing.assert_allclose(sp["mlp"], ref, rtol=1e-5)
    assert float(searched) < total  # the weighted masks count fewer units than the full model
    assert float(jnp.abs(g["blocks_0_attn_alpha"]).sum()) > 0
    assert logits.shape == (16, 10)
    # The search model carries the host's logical axes: sharded over a mesh it computes the same logits.
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded_vars = shard_like_init(model, variables, x, mesh)
    assert sharded_vars["params"]["blocks_0_mlp_fc1"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
    with activate(mesh):
        sharded = fast_jit(lambda v, x: model.apply(v, x, 0.5))(sharded_vars, shard_batch(x, mesh))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(logits), rtol=1e-5, atol=1e-5)
    # Force every module to a single cell (alpha peaked on one candidate), compress, export.
    peaked = {k: (jnp.full(v.shape, -20.0).at[(0,) * v.ndim].set(20.0) if k.endswith("alpha") else v)
              for k, v in ofb_vars.items()}
    model2, vars2, changed = ofb.compress(model, {**variables, "ofb": peaked}, w_p=0.1)
    assert changed and ofb.finished(model2)
    assert model2.spaces[0].size == (32,) and model2.spaces[1].size == (2, 4) and model2.spaces[2].size == (64,)
    dense, dense_vars = ofb.export(model2, vars2)
    np.testing.assert_allclose(fast_jit(dense.apply)(dense_vars, x), fast_jit(model2.apply)(vars2, x, 0.1),
                               atol=1e-4)
    assert jf.count_params(dense) < jf.count_params(host)
    with pytest.raises(ValueError, match="needs a finished search"):
        ofb.export(model, variables)


def test_search_moves_toward_the_flops_target_and_compresses():
    host = jf.create_model("deit_tiny_patch16_224", **{**TINY, "depth": 1, "embed_dim": 32})
    x, y = digits(32, 32)
    model, variables = ofb.init_search(host, numpy_variables(host, x[:1]), jax.random.key(1))
    total = float(ofb.flops(model)[0])
    target = 0.4 * total

    def batches():
        while True:
            yield x, y

    model, variables, hist = ofb.search(model, variables, batches(), target_gflops=target, steps=12,
                                        steps_per_epoch=8, warmup_epochs=1, lr_arch=0.1, thresh=0.6, compress_every=12,
                                        compiler_options=FAST_COMPILE)
    assert abs(hist[-1]["gflops"] - target) < abs(hist[0]["gflops"] - target)
    assert hist[0]["w_p"] == 0.99 and hist[-1]["w_p"] < 0.2  # the score weight decays over the warm-up
    assert any(s.active < len(s.switch) or s.finished for s in model.spaces)  # cells were switched off
    assert np.isfinite(fast_jit(model.apply)(variables, x, 0.1)).all()
