"""Quantizable Transformers (Bondarenko et al. 2023): clipped softmax, gated attention, the official
presets on BERT / OPT / ViT, and the outlier metrics."""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.compress import inf_norm, kurtosis, outlier_metrics, outlier_preset
from jaxformers.layers import MultiHeadAttention, clipped_softmax
from jaxformers.models.bert import Bert
from tests.helpers import OFFICIAL_CODE, fast_jit, numpy_variables

OFFICIAL = OFFICIAL_CODE / "outlier-free-transformers"
H, D = 4, 8
GATE_VARIANTS = {  # ours -> the official BertSelfAttentionWithExtras arguments
    "clipped": (dict(softmax="clipped(-.025:1)"), dict(softmax="clipped(-.025:1)")),
    "gate_mlp": (dict(gate="conditional_per_token", gate_mlp=True), dict(gate="conditional_per_token", mlp=True)),
    "gate_linear": (dict(gate="conditional_per_token", gate_init=0.25), dict(gate="conditional_per_token", init=0.25)),
    "gate_per_head": (dict(gate="conditional_per_head"), dict(gate="conditional_per_head")),
    "gate_unconditional": (dict(gate="unconditional_per_head"), dict(gate="unconditional_per_head")),
}


def _attention_inputs():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 7, H * D).astype(np.float32)
    mask = np.ones((2, 7), np.float32)
    mask[1, 5:] = 0
    return x, mask


def _reference_attention(x, mask, params, gate=None, mlp=False, softmax="softmax", init=None):
    """The official BertSelfAttentionWithExtras.forward, written out in NumPy: separate q/k/v
    Linears, scores / sqrt(d) + the additive -10000 mask, (clipped) softmax, context, then
    context_h *= sigmoid(G_h(x_h)) on the h-th d_head slice of the *input*, heads merged."""
    b, t, e = x.shape
    wq, wk, wv = (params["qkv"]["kernel"][:, i].reshape(e, e) for i in range(3))
    bq, bk, bv = (params["qkv"]["bias"][i].reshape(e) for i in range(3))
    split = lambda y: y.reshape(b, t, H, D).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(x @ wq + bq), split(x @ wk + bk), split(x @ wv + bv)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D) + ((1 - mask) * -10000.0)[:, None, None, :]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if softmax != "softmax":
        probs = np.clip((1.0 + 0.025) * probs - 0.025, 0, 1)
    ctx = probs @ v  # (B, H, T, D)
    if gate is not None:
        g = params["gate"]
        if gate == "unconditional_per_head":
            alpha = g["alpha"][:, None, None]
        else:
            xh = split(x)
            if mlp:
                hidden = np.maximum(np.einsum("bhtd,hdf->bhtf", xh, g["fc1_kernel"]) + g["fc1_bias"][None, :, None], 0)
                alpha = np.einsum("bhtf,hf->bht", hidden, g["fc2_kernel"]) + g["fc2_bias"][None, :, None]
            else:
                alpha = np.einsum("bhtd,hd->bht", xh, g["kernel"]) + g["bias"][None, :, None]
            if gate == "conditional_per_head":
                alpha = alpha.mean(-1, keepdims=True)
            alpha = alpha[..., None]
        ctx = ctx / (1 + np.exp(-alpha))
    return ctx.transpose(0, 2, 1, 3).reshape(b, t, e)


def _identity_proj(params):
    """Output projection = identity, so the module returns the merged context (BertSelfAttention's output)."""
    return {**params, "proj": {"kernel": np.eye(H * D, dtype=np.float32).reshape(H, D, H * D),
                               "bias": np.zeros(H * D, np.float32)}}


def test_clipped_softmax_exact_zeros_ones_and_zero_gradient():
    x = jnp.array([[0.0, 0.1, -0.2, 0.3], [30.0, -30.0, -30.0, 0.0]])
    np.testing.assert_allclose(clipped_softmax(x, 0.0, 1.0), jax.nn.softmax(x), rtol=1e-6)
    y = clipped_softmax(x, -0.1, 1.1)
    assert float(y[1, 0]) == 1.0 and float(y[1, 1]) == 0.0 and float(y[1, 2]) == 0.0  # exact
    stretched = 1.2 * jax.nn.softmax(x) - 0.1
    np.testing.assert_allclose(y, jnp.clip(stretched, 0, 1), rtol=1e-6)
    grads = jax.jacobian(lambda x: clipped_softmax(x, -0.1, 1.1))(x)  # (2, 4, 2, 4)
    for row in (0, 1):
        for col in range(4):
            clipped = stretched[row, col] <= 0 or stretched[row, col] >= 1
            assert (np.abs(np.asarray(grads[row, col])).max() == 0) == bool(clipped), (row, col)


@pytest.mark.parametrize("variant", list(GATE_VARIANTS))
def test_gated_and_clipped_attention_match_the_official_formulas(variant):
    ours, ref_kw = GATE_VARIANTS[variant]
    x, mask = _attention_inputs()
    module = MultiHeadAttention(H, **ours)
    params = _identity_proj(numpy_variables(module, jnp.asarray(x), seed=3)["params"])
    out = module.apply({"params": params}, jnp.asarray(x), mask=jnp.asarray(mask > 0)[:, None, None, :])
    ref = _reference_attention(x, mask, jax.tree.map(np.asarray, params), **ref_kw)
    np.testing.assert_allclose(np.asarray(out)[mask > 0], ref[mask > 0], atol=2e-5)


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="the official code is fetched to /work/ext for this check")
def test_reference_formulas_equal_the_official_module():
    """The NumPy reference above is the official BertSelfAttentionWithExtras (live, random weights)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(OFFICIAL))
    from transformers_language.models.bert_attention import AttentionGateType, BertSelfAttentionWithExtras
    from transformers_language.models.softmax import SOFTMAX_MAPPING

    x, mask = _attention_inputs()
    config = transformers.BertConfig(hidden_size=H * D, num_attention_heads=H, attention_probs_dropout_prob=0.0)
    for ref_kw in (dict(softmax="clipped"), dict(gate="conditional_per_token", mlp=True),
                   dict(gate="conditional_per_head", init=0.25)):
        kw = {}
        if "gate" in ref_kw:
            kw = dict(attn_gate_type=AttentionGateType[ref_kw["gate"]], attn_gate_mlp=ref_kw.get("mlp", False),
                      attn_gate_init=ref_kw.get("init"))
        else:
            kw = dict(softmax_fn=SOFTMAX_MAPPING["clipped(-.025:1)"])
        torch.manual_seed(0)
        official = BertSelfAttentionWithExtras(config, **kw).eval()
        sd = {k: v.detach().numpy() for k, v in official.state_dict().items()}
        w = np.stack([sd[f"{n}.weight"] for n in ("query", "key", "value")]).reshape(3, H, D, H * D)
        params = {"qkv": {"kernel": w.transpose(3, 0, 1, 2),
                          "bias": np.stack([sd[f"{n}.bias"] for n in ("query", "key", "value")]).reshape(3, H, D)}}
        if ref_kw.get("mlp"):
            params["gate"] = {"fc1_kernel": np.stack([sd[f"alpha.{h}.0.weight"].T for h in range(H)]),
                              "fc1_bias": np.stack([sd[f"alpha.{h}.0.bias"] for h in range(H)]),
                              "fc2_kernel": np.stack([sd[f"alpha.{h}.2.weight"][0] for h in range(H)]),
                              "fc2_bias": np.stack([sd[f"alpha.{h}.2.bias"][0] for h in range(H)])}
        elif "gate" in ref_kw:
            params["gate"] = {"kernel": np.stack([sd[f"alpha.{h}.weight"][0] for h in range(H)]),
                              "bias": np.stack([sd[f"alpha.{h}.bias"][0] for h in range(H)])}
        with torch.no_grad():
            ref = official(torch.tensor(x), attention_mask=torch.tensor((1 - mask)[:, None, None, :] * -10000.0))[0]
        np.testing.assert_allclose(_reference_attention(x, mask, params, **ref_kw)[mask > 0],
                                   ref.numpy()[mask > 0], atol=2e-5)


def test_gate_forced_open_is_vanilla_attention_and_init_is_pi():
    x, _ = _attention_inputs()
    gated = MultiHeadAttention(H, gate="conditional_per_token", gate_init=0.25)
    params = numpy_variables(gated, jnp.asarray(x))["params"]
    init = nn.unbox(jax.eval_shape(gated.init, jax.random.key(0), jnp.asarray(x)))["params"]["gate"]
    assert init["kernel"].shape == (H, D) and init["bias"].shape == (H,)
    bias = nn.unbox(gated.init(jax.random.key(0), jnp.asarray(x)))["params"]["gate"]["bias"]
    np.testing.assert_allclose(jax.nn.sigmoid(bias), 0.25, rtol=1e-6)
    opened = {**params, "gate": {"kernel": jnp.zeros((H, D)), "bias": jnp.full((H,), 60.0)}}
    vanilla = {k: v for k, v in params.items() if k != "gate"}
    np.testing.assert_allclose(gated.apply({"params": opened}, jnp.asarray(x)),
                               MultiHeadAttention(H).apply({"params": vanilla}, jnp.asarray(x)), atol=1e-6)


def test_presets_build_bert_opt_and_vit():
    """The official settings as config fields: the gate's parameters appear where the paper puts
    them, the clipped softmax changes the output, and HF export refuses what transformers lacks."""
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 50, (2, 9)))
    tiny_bert = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=40,
                     max_position_embeddings=16)
    shapes = {}
    for family, make, x in (("bert", lambda **kw: Bert(**tiny_bert, **kw), ids),
                            ("opt", lambda **kw: jf.create_model("opt_125m", vocab_size=50, hidden_size=32,
                                                                  num_hidden_layers=1, num_attention_heads=4,
                                                                  ffn_dim=40, max_position_embeddings=16, **kw), ids)):
        for method in ("clipped_softmax", "gated_attention"):
            model = make(**outlier_preset(family, method))
            params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
            shapes[family, method] = jax.tree.map(lambda a: a.shape, params["layer_0"]["attn"].get("gate"))
    assert shapes["bert", "gated_attention"] == {"fc1_kernel": (4, 8, 2), "fc1_bias": (4, 2), "fc2_kernel": (4, 2),
                                                 "fc2_bias": (4,)}
    assert shapes["opt", "gated_attention"] == {"kernel": (4, 8), "bias": (4,)}
    assert shapes["bert", "clipped_softmax"] is None
    assert outlier_preset("opt", "clipped_softmax") == {"attn_softmax": "clipped(-0.0234375:1)"}
    vit = jf.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=1,
                          **outlier_preset("opt", "gated_attention"))
    vit_params = nn.unbox(jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    assert vit_params["blocks_0"]["attn"]["gate"]["kernel"].shape == (3, 64)
    bert = Bert(**tiny_bert)
    variables = numpy_variables(bert, ids)
    clipped = Bert(**tiny_bert, **outlier_preset("bert", "clipped_softmax"))
    plain, clip = bert.apply(variables, ids)["last_hidden_state"], clipped.apply(variables, ids)["last_hidden_state"]
    assert 1e-4 < float(jnp.abs(plain - clip).max()) < 1.0
    with pytest.raises(ValueError, match="transformers' BERT has no clipped softmax"):
        jf.save_pretrained(clipped, variables, "/tmp/never-written")


@pytest.mark.parametrize("kw, match", [
    (dict(softmax="sparsemax"), r"unknown attention softmax 'sparsemax'; valid: softmax, clipped\(<gamma>:<zeta>\)"),
    (dict(softmax="clipped(0.1:1)"), "expected gamma <= 0 and zeta >= 1"),
    (dict(gate="per_token"), "unknown attention gate 'per_token'; valid: None, unconditional_per_head, "
                             "conditional_per_head, conditional_per_token"),
    (dict(gate="conditional_per_token", gate_init=1.5), r"must be in \(0, 1\)"),
])
def test_bad_softmax_and_gate_specs(kw, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(H, **kw).init(jax.random.key(0), jnp.zeros((1, 3, H * D)))


def test_kurtosis_and_inf_norm_equal_numpy_and_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = np.random.RandomState(0).standard_t(3, size=(3, 200)).astype(np.float32)
    n = x.shape[1]
    # official: mu4 / (unbiased std^4 + 1e-6); scipy's (fisher=False) uses the biased variance
    expected = stats.kurtosis(x, axis=1, fisher=False, bias=True) * ((n - 1) / n) ** 2
    np.testing.assert_allclose(kurtosis(jnp.asarray(x)), expected, rtol=1e-4)
    np.testing.assert_allclose(inf_norm(jnp.asarray(x)), np.abs(x).max(1))


def test_outlier_metrics_tap_the_official_tensors():
    """BERT: FFN output (fc2), output LayerNorm and its input (= attention LN output + FFN output)."""
    module = Bert(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                  max_position_embeddings=16)
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 50, (4, 9)))
    variables = numpy_variables(module, ids)
    metrics = outlier_metrics(module, variables, [ids[:2], ids[2:]])
    capture = fast_jit(lambda v, x: module.apply(v, x, capture_intermediates=True, mutable=["intermediates"])[1])
    inter = capture(variables, ids)["intermediates"]
    for j in range(2):
        layer = inter[f"layer_{j}"]
        fc2 = layer["mlp"]["fc2"]["__call__"][0].reshape(4, -1)
        ln_out = layer["mlp_norm"]["__call__"][0].reshape(4, -1)
        ln_in = (layer["attn_norm"]["__call__"][0] + layer["mlp"]["fc2"]["__call__"][0]).reshape(4, -1)
        np.testing.assert_allclose(metrics["inf_norm"][f"layer_{j}/mlp/fc2"], np.abs(fc2).max(1).mean(), rtol=1e-5)
        np.testing.assert_allclose(metrics["inf_norm"][f"layer_{j}/mlp_norm.input"], np.abs(ln_in).max(1).mean(),
                                   rtol=1e-5)
        np.testing.assert_allclose(metrics["kurtosis"][f"layer_{j}/mlp_norm"], np.mean(kurtosis(ln_out)), rtol=1e-4)
    assert metrics["max_LN_inp_inf_norm"] == max(metrics["inf_norm"][f"layer_{j}/mlp_norm.input"] for j in range(2))
    assert len(metrics["kurtosis"]) == 4 and metrics["max_kurtosis"] >= metrics["avg_kurtosis"]
