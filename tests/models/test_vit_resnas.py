"""ViT-ResNAS: official parameter counts of the searched networks, network_def parsing and MACs, residual
spatial reduction, live parity with the official yilunliao/vit-search code (where fetched) and a key-for-key
converter test, the weight-sharing supernet (masked passes equal standalone subnets with inherited weights,
sampling, training), the patch-token mixup, the evolutionary search, sharding and input errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.convert import load_pretrained
from jaxformers.models.vit_resnas import (OFFICIAL_PARAMS, SEARCH_SPACES, SEARCHED_DEFS, Subnet, count_macs,
                                          evolutionary_search, parse_network_def, patch_token_loss,
                                          patch_token_mixup, random_arch, sample_subnets, subnet_network_def,
                                          subnet_params)
from jaxformers.registry import count_params
from jaxformers.sharding import make_mesh
from tests.helpers import (digits, fast_jit, image, load_official, numpy_variables, shard_like_init,
                           single_and_sharded)

SPACE = SEARCH_SPACES["digits"]
SUPERNET = dict(network_def=parse_network_def(SPACE.supernet), img_size=56, num_classes=10)


@pytest.fixture(scope="module")
def supernet():
    model = jf.create_model("vit_resnas_tiny", **SUPERNET)
    return model, numpy_variables(model, image(1, 56))


def test_param_counts_macs_and_network_defs():
    # yilunliao/vit-search flexible_vit_sr_patch14_224_patch_output(network_def=...) counted with torch
    assert {n: count_params(n) for n in OFFICIAL_PARAMS} == OFFICIAL_PARAMS == {
        "vit_resnas_tiny": 41_498_552, "vit_resnas_small": 64_605_108, "vit_resnas_medium": 97_323_672}
    assert count_params("vit_resnas_tiny", patch_output=False) == 41_498_552 - 705_000
    # the search budgets in the official script names: Small 2.9 GMACs, Medium 4.6 GMACs
    assert abs(count_macs(SEARCHED_DEFS["vit_resnas_small"]) / 2.9e9 - 1) < 0.03
    assert abs(count_macs(SEARCHED_DEFS["vit_resnas_medium"]) / 4.6e9 - 1) < 0.03
    net = parse_network_def(SEARCHED_DEFS["vit_resnas_tiny"])
    assert [layer[0] for layer in net].count(1) == 16 and net[6] == (3, 176, 352)
    with pytest.raises(ValueError, match="cannot narrow it"):
        parse_network_def("((4, 32), (3, 32, 16), (2, 16, 10))")
    with pytest.raises(ValueError, match="must be 32 wide"):
        parse_network_def("((4, 32), (1, (48, 2, 8), (48, 64), 1), (2, 32, 10))")


def test_residual_spatial_reduction_is_pooled_and_zero_padded():
    from jaxformers.models.vit_resnas import ResidualSpatialReduction
    x = jax.random.normal(jax.random.key(0), (2, 1 + 16, 8))
    layer = ResidualSpatialReduction(12, (4, 4))
    params = jax.tree_util.tree_map(jnp.zeros_like, layer.init(jax.random.key(1), x)["params"])
    out = layer.apply({"params": params}, x)  # zero weights: only the residual path is left
    grid = np.asarray(x[:, 1:]).reshape(2, 2, 2, 2, 2, 8).mean(axis=(2, 4)).reshape(2, 4, 8)
    np.testing.assert_allclose(out[:, 1:, :8], grid, atol=1e-6)
    np.testing.assert_allclose(out[:, :1, :8], x[:, :1], atol=1e-6)
    assert out.shape == (2, 5, 12) and not np.any(out[..., 8:])


def official_state_dict(net, num_classes, seed=0):
    """Every key of the official ``FlexibleDistillVisionTransformerSR(network_def, patch_output=True)``
    state dict with its shape: ``patch_embed.conv{1,2,3}.{conv,bn}`` + ``conv_proj`` (type 4/5 embeddings),
    ``tokens``, ``pos_embed``, ``blocks.{i}`` (Block: norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2; SR:
    norm/patch_reduce/token_transform/pos_embed; bypassed blocks: nothing), ``norm``, ``cls_head``, ``patch_head``."""
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

    mid, c = (net[0][2] if net[0][0] == 5 else 24), net[0][1]
    for i, cin in ((1, 3), (2, mid), (3, mid)):
        put(f"patch_embed.conv{i}.conv.weight", mid, cin, 3, 3)
        ln(f"patch_embed.conv{i}.bn", mid)
        put(f"patch_embed.conv{i}.bn.running_mean", mid)
        sd[f"patch_embed.conv{i}.bn.running_var"] = torch.rand(mid, generator=g) + 0.5
        sd[f"patch_embed.conv{i}.bn.num_batches_tracked"] = torch.tensor(3)
    put("patch_embed.conv_proj.weight", c, mid, 7, 7)
    put("patch_embed.conv_proj.bias", c)
    grid = SUPERNET["img_size"] // 14
    put("tokens", 1, 1, c)
    put("pos_embed", 1, grid * grid + 1, c)
    for i, layer in enumerate(net[1:-1]):
        t = f"blocks.{i}."
        if layer[0] == 1 and layer[3]:
            (_, h, d), (_, hidden), _ = layer[1:]
            ln(t + "norm1", c)
            linear(t + "attn.qkv", 3 * h * d, c)
            linear(t + "attn.proj", c, h * d)
            ln(t + "norm2", c)
            linear(t + "mlp.fc1", hidden, c)
            linear(t + "mlp.fc2", c, hidden)
        elif layer[0] == 3:
            grid //= 2
            ln(t + "norm", c)
            put(t + "patch_reduce.weight", layer[2], c, 3, 3)
            put(t + "patch_reduce.bias", layer[2])
            linear(t + "token_transform", layer[2], c)
            put(t + "pos_embed", 1, grid * grid, layer[2])
            c = layer[2]
    ln("norm", c)
    linear("cls_head", num_classes, c)
    linear("patch_head", num_classes, c)
    return sd


def test_converter_and_official_parity(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    net = parse_network_def(SPACE.supernet[:-len("(2, 64, 10))")] + "(1, (64, 2, 16), (64, 96), 0), (2, 64, 10))")
    sd = official_state_dict(net, 10)
    torch.save(sd, tmp_path / "resnas.pth")
    cfg = dict(network_def=net, img_size=56, num_classes=10)
    v = load_pretrained("vit_resnas_tiny", tmp_path / "resnas.pth", **cfg)  # strict: every key, every shape
    assert "blocks_5" not in v["params"]  # the bypassed block has no parameters
    w = sd["blocks.0.attn.qkv.weight"].numpy()  # rows [q | k | v] x 4 heads x 8
    np.testing.assert_array_equal(v["params"]["blocks_0"]["attn"]["qkv"]["kernel"][:, 1, 2], w[32 + 16:32 + 24].T)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # the official SR layer calls .cuda()
    official = load_official("vit-search", "nets/vit_sr_supernet.py")
    ref = official.FlexibleDistillVisionTransformerSR(img_size=56, num_classes=10, distill_token=False,
                                                      network_def=net, patch_output=True).eval()
    ref.load_state_dict(sd, strict=True)
    x = np.random.default_rng(0).standard_normal((2, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    model = jf.create_model("vit_resnas_tiny", **cfg)
    out = fast_jit(model.apply)(v, x)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_supernet_pass_equals_standalone_subnet_with_inherited_weights(supernet):
    model, variables = supernet
    x = image(2, 56)
    full = Subnet(jnp.array([[32, 32], [64, 64]]), jnp.full((4, 2), 4), jnp.array([[64] * 2] * 2 + [[128] * 2] * 2),
                  jnp.ones((4, 2), bool))
    apply = fast_jit(lambda v, x, s: model.apply(v, x, subnet=s))
    np.testing.assert_allclose(apply(variables, x, full), model.apply(variables, x), atol=1e-5)
    rng = np.random.default_rng(3)
    archs = [random_arch(rng, SPACE) for _ in range(2)]
    archs[0].update(embed=[24, 48], heads=[3, 2, 4, 3], layer=[True, False, True, True])  # narrower, a dropped block
    sub = Subnet(*(jnp.array([a[k] for a in archs]).T for k in ("embed", "heads", "mlp", "layer")))
    masked = apply(variables, x, sub)
    for i, arch in enumerate(archs[:1]):  # (one standalone compile)
        net = subnet_network_def(SPACE, arch)
        standalone = jf.create_model("vit_resnas_tiny", network_def=net, img_size=56, num_classes=10)
        params = subnet_params(variables["params"], SPACE, arch)
        ref = standalone.apply({"params": params, "batch_stats": variables["batch_stats"]}, x[i:i + 1])
        np.testing.assert_allclose(masked[i:i + 1], ref, atol=2e-5, err_msg=str(net))
    assert not np.allclose(masked[0], masked[1], atol=1e-3)


def test_sampling_supernet_training_and_search(supernet):
    model, variables = supernet
    subnet = sample_subnets(jax.random.key(0), SPACE, batch=8, example_per_arch=2)
    assert subnet.embed.shape == (2, 8) and subnet.heads.shape == (4, 8)
    assert np.array_equal(subnet.embed[:, :4], subnet.embed[:, 4:])  # 4 architectures, each on 2 examples
    assert set(np.asarray(subnet.mlp[3]).tolist()) <= {128, 96, 64} and np.all(np.asarray(subnet.layer)[[0, 2]])
    widest = sample_subnets(jax.random.key(1), SPACE, 8, 1, num_choices=1)
    assert np.all(widest.embed[0] == 32) and np.all(widest.heads == 4)
    # supernet training on digits: every step samples architectures from the dropout rng
    train_model = model.clone(search_space="digits", example_per_arch=4)
    x, y = digits(32, 56)
    params = variables["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @fast_jit
    def step(params, opt, rng):
        def loss_fn(p):
            logits = train_model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                                       rngs={"dropout": rng}, mutable=["batch_stats"])[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    full_loss = fast_jit(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x), y).mean())
    before = float(full_loss(params))
    for i in range(10):
        params, opt, loss = step(params, opt, jax.random.key(i))
        assert np.isfinite(float(loss))
    assert float(full_loss(params)) < 0.9 * before  # the shared weights learn: the full network improves (0.84 measured)
    # evolutionary search within a MAC budget (scored here by a cheap stand-in: fewer MACs is better)
    budget = count_macs(SPACE.supernet, 56) * 0.75  # random archs: 0.65-0.92 of the supernet
    history = evolutionary_search(SPACE, lambda a: -count_macs(subnet_network_def(SPACE, a), 56), macs_budget=budget,
                                  img_size=56, iterations=3, population=20, parents=5, mutations=5, crossovers=5)
    scores = [s for s, _ in history]
    assert scores == sorted(scores, reverse=True) and all(-s <= budget for s in scores)
    assert history[0][1]["embed"] == [16, 32]  # the narrowest embeddings win this score


def test_patch_token_mixup_and_loss():
    images = jnp.arange(4 * 8 * 8 * 1, dtype=jnp.float32).reshape(4, 8, 8, 1)
    out, targets, patch_targets = patch_token_mixup(jax.random.key(5), images, jnp.arange(4), 4, patch_len=4,
                                                    smoothing=0.0)
    assert out.shape == images.shape and targets.shape == (4, 4) and patch_targets.shape == (4, 16, 4)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
    # patch half: each 2x2 pixel patch comes whole from one image of the first half, as its token target says
    for b in range(2):
        for t in range(16):
            src = int(np.argmax(patch_targets[b, t]))
            r, c = divmod(t, 4)
            np.testing.assert_array_equal(out[b, 2 * r:2 * r + 2, 2 * c:2 * c + 2], images[src, 2 * r:2 * r + 2,
                                                                                      2 * c:2 * c + 2])
        np.testing.assert_allclose(targets[b], patch_targets[b].mean(0), atol=1e-6)  # area-weighted labels
    np.testing.assert_allclose(patch_targets[2:], jnp.broadcast_to(targets[2:, None], (2, 16, 4)))
    logits = jax.random.normal(jax.random.key(0), (4, 4))
    loss = patch_token_loss(logits, jnp.zeros((4, 16, 4)), targets, patch_targets)
    ce = optax.softmax_cross_entropy(logits, targets).mean() + np.log(4.0)
    np.testing.assert_allclose(loss, ce, rtol=1e-5)


def test_features_sharding_and_errors(supernet):
    model, variables = supernet
    x = image(4, 56)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="forward_features"), variables, x)
    assert {s: m.shape for s, m in feats.items()} == {14: (4, 4, 4, 32), 28: (4, 2, 2, 64)}
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = shard_like_init(model, variables, x, mesh)
    single, multi = single_and_sharded(jax.jit(model.apply), variables, sharded, x, mesh)
    np.testing.assert_allclose(np.asarray(multi), np.asarray(single), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="divisible by 28"):
        jax.eval_shape(model.clone(img_size=42).init, jax.random.key(0), image(1, 42))
    with pytest.raises(ValueError, match=r"subnet.heads must be \(number of blocks, batch\) = \(4, 4\)"):
        model.apply(variables, x, subnet=Subnet(jnp.zeros((2, 4), int), jnp.zeros((3, 4), int),
                                                jnp.zeros((4, 4), int), jnp.ones((4, 4), bool)))
    with pytest.raises(ValueError, match="search_space 'sr_tiny_mh' belongs to the supernet"):
        model.clone(search_space="sr_tiny_mh").apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)},
                                                     mutable=["batch_stats"])
