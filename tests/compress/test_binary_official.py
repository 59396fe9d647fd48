"""Live parity with the official PyTorch code of BiBERT, BiPFT, BiViT and BiPer (fetched to
$JAXFORMERS_EXT, default /work/ext: htqin/BiBERT, Xingrun-Xing/BiPFT, ThisisBillhe/BiViT,
edmav4/BiPer; never committed). Each test skips where its repository is absent (CI); the formulas are
also tested without the official code in test_binary.py."""
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxformers.compress import binary as B  # noqa: E402
from jaxformers.layers import MultiHeadAttention  # noqa: E402
from tests.helpers import OFFICIAL_CODE as EXT, fast_jit, load_official as _module  # noqa: E402

RNG = np.random.default_rng(0)


def _t(x, grad=True):
    return torch.tensor(np.asarray(x), dtype=torch.float32, requires_grad=grad)


def _close(ours, ref, atol=1e-5, err=""):
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy() if hasattr(ref, "detach") else ref, atol=atol,
                               rtol=1e-5, err_msg=err)


def _apply_grads(module, variables, x, cot, **kwargs):
    """(output, d params, d x) of sum(module(x) * cot), one fast-compiled program."""
    def f(p, x):
        out = module.apply({"params": p}, x, **kwargs)
        return jnp.sum(out * cot), out

    (_, out), (gp, gx) = fast_jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(variables["params"], x)
    return out, gp, gx


def test_bibert_quantizers_and_layers_match_official():
    sys.modules.setdefault("seaborn", types.ModuleType("seaborn"))
    uq = _module("BiBERT", "transformer/utils_quant.py", "bibert_utils_quant")
    x = RNG.normal(0, 1.2, (6, 40)).astype(np.float32)
    g = RNG.normal(size=x.shape).astype(np.float32)
    # BinaryQuantizer (sign, gradient 1[|x| < 1]) and ZMeanBinaryQuantizer (bool)
    for fn, ours in ((uq.BinaryQuantizer, lambda t: B.straight_through(jnp.sign(t), t, "clip_open")),
                     (uq.ZMeanBinaryQuantizer, B.bool_ste)):
        xt = _t(x)
        (fn.apply(xt) * _t(g, False)).sum().backward()
        _close(ours(jnp.asarray(x)), fn.apply(_t(x, False)))
        _close(jax.grad(lambda t: jnp.sum(ours(t) * g))(jnp.asarray(x)), xt.grad)
    # QuantizeLinear: rowmean|W|·sign(W − rowmean W) weights, sign inputs, clamp STEs
    cfg = types.SimpleNamespace(quantize_act=True, weight_bits=1, input_bits=1, clip_val=2.5)
    torch.manual_seed(0)
    lin = uq.QuantizeLinear(40, 24, config=cfg)
    xt = _t(x)
    cot = RNG.normal(size=(6, 24)).astype(np.float32)
    (lin(xt) * _t(cot, False)).sum().backward()
    dense = B.BIBERT.dense(24, axes=("embed", "mlp"))
    variables = {"params": {"kernel": jnp.asarray(lin.weight.detach().numpy().T), "bias": jnp.asarray(lin.bias.detach().numpy())}}
    out, gp, gx = _apply_grads(dense, variables, jnp.asarray(x), cot)
    _close(out, lin(_t(x, False)), err="BiBERT QuantizeLinear forward")
    _close(gx, xt.grad, err="input gradient")
    _close(gp["kernel"], lin.weight.grad.numpy().T, err="weight gradient")
    _close(gp["bias"], lin.bias.grad, err="bias gradient")
    # QuantizeEmbedding
    emb = uq.QuantizeEmbedding(30, 20, padding_idx=0, config=cfg)
    ids = np.array([[1, 5, 7, 29], [0, 3, 3, 2]])
    cot = RNG.normal(size=(2, 4, 20)).astype(np.float32)
    (emb(torch.tensor(ids)) * _t(cot, False)).sum().backward()
    ours = B.BIBERT.embed(30, 20)
    variables = {"params": {"embedding": jnp.asarray(emb.weight.detach().numpy())}}
    out = ours.apply(variables, jnp.asarray(ids))
    grad = jax.grad(lambda p: jnp.sum(ours.apply({"params": p}, jnp.asarray(ids)) * cot))(variables["params"])
    _close(out, emb(torch.tensor(ids)), err="QuantizeEmbedding forward")
    # padding_idx 0 gets no gradient in torch; compare the other rows
    _close(grad["embedding"][1:], emb.weight.grad[1:], err="QuantizeEmbedding gradient")


def _bipft_modules():
    import transformers.pytorch_utils as pu

    for name in ("find_pruneable_heads_and_indices", "prune_linear_layer", "apply_chunking_to_forward"):
        if not hasattr(pu, name):
            setattr(pu, name, lambda *a, **k: None)
    uq = _module("BiPFT", "binary_pretraining/utils_quant.py", "utils_quant", path_entry="binary_pretraining")
    try:
        model = _module("BiPFT", "binary_pretraining/bipft.py", "bipft_model", path_entry="binary_pretraining")
    except ImportError as e:  # transformers moved an internal name the official file imports
        pytest.skip(f"BiPFT's bipft.py does not import with this transformers: {e}")
    return uq, model


def test_bipft_quantizers_linear_and_attention_match_official():
    uq, model = _bipft_modules()
    x = RNG.normal(0, 1.0, (4, 7, 48)).astype(np.float32)
    # elastic signed / unsigned with the lazy α and its LSQ gradient
    for signed, data in ((True, x), (False, np.abs(RNG.normal(0, 0.2, (2, 3, 5, 5))).astype(np.float32))):
        alpha = uq.AlphaInit(torch.tensor(1.0))
        fn = uq.ElasticQuantBinarizerSigned if signed else uq.ElasticQuantBinarizerUnsigned
        xt = _t(data)
        g = RNG.normal(size=data.shape).astype(np.float32)
        out = fn.apply(xt, alpha, 1, True)
        (out * _t(g, False)).sum().backward()
        a0 = B.elastic_init(jnp.asarray(data), signed)
        _close(a0, alpha.detach().reshape(()), err="lazy α")
        ours, (gx, ga) = jax.value_and_grad(lambda t, a: jnp.sum(B.elastic_binary(t, a, signed) * g), argnums=(0, 1))(
            jnp.asarray(data), a0)
        _close(B.elastic_binary(jnp.asarray(data), a0, signed), out, err=f"elastic signed={signed}")
        _close(gx, xt.grad, err="elastic input gradient")
        _close(ga, alpha.grad.reshape(()), atol=1e-4, err="elastic α gradient")
    # BWN, per matrix and per row (the official per-row mean is the whole matrix's)
    w = RNG.normal(size=(24, 40)).astype(np.float32)
    for layerwise in (True, False):
        ref = uq.BwnQuantizer.apply(_t(w, False), None, 1, layerwise)
        _close(B.bwn(jnp.asarray(w), None if layerwise else (1,)), ref, err=f"bwn layerwise={layerwise}")
    # QuantizeLinear: shift, elastic input, BWN weight
    torch.manual_seed(0)
    lin = uq.QuantizeLinear(48, 24, weight_bits=1, input_bits=1, learnable=True, symmetric=True,
                            weight_layerwise=True, input_layerwise=True, weight_quant_method="bwn",
                            input_quant_method="elastic")
    with torch.no_grad():
        lin.move.bias.add_(torch.randn(48) * 0.1)
    dense = B.BIPFT.dense(24, axes=("embed", "mlp"))
    variables = dense.init(jax.random.key(0), jnp.asarray(x))
    shift = jnp.asarray(lin.move.bias.detach().numpy())
    xt = _t(x)
    cot = RNG.normal(size=(4, 7, 24)).astype(np.float32)
    (lin(xt) * _t(cot, False)).sum().backward()  # the first forward initialises α from x + shift
    params = {"kernel": jnp.asarray(lin.weight.detach().numpy().T), "bias": jnp.asarray(lin.bias.detach().numpy()),
              "shift": shift, "act_scale": B.elastic_init(jnp.asarray(x) + shift)}
    assert set(params) == set(variables["params"])
    _close(params["act_scale"], lin.input_clip_val.detach().reshape(()), err="lazy α of the linear")
    out, gp, gx = _apply_grads(dense, {"params": params}, jnp.asarray(x), cot)
    _close(out, lin(_t(x, False)), atol=1e-4, err="BiPFT QuantizeLinear forward")
    _close(gx, xt.grad, err="input gradient")
    _close(gp["kernel"], lin.weight.grad.numpy().T, err="weight gradient")
    _close(gp["shift"], lin.move.bias.grad, err="shift gradient")
    _close(gp["act_scale"], lin.input_clip_val.grad.reshape(()), atol=1e-4, err="α gradient")

    # BertSelfAttention (12 heads: the official hard-codes them) + its output dense, against our MHA
    cfg = model.BertConfig(hidden_size=48, num_attention_heads=12, attention_probs_dropout_prob=0.0,
                           intermediate_size=64)
    for k, v in dict(weight_bits=1, input_bits=1, clip_init_val=2.5, sym_quant_ffn_attn=False, sym_quant_qkvo=True,
                     input_layerwise=True, weight_layerwise=True, weight_quant_method="bwn",
                     input_quant_method="elastic", learnable_scaling=True, not_quantize_attention=False).items():
        setattr(cfg, k, v)
    torch.manual_seed(1)
    attn, out_dense = model.BertSelfAttention(cfg).eval(), model.BertSelfOutput(cfg).dense.eval()
    mask = np.ones((4, 7), np.float32)
    mask[1, 5:] = 0
    ext = _t((1.0 - mask)[:, None, None, :] * -10000.0, False)
    ref = out_dense(attn(_t(x, False), ext)[0])
    mha = MultiHeadAttention(12, binary=B.BIPFT)
    ours_vars = jax.eval_shape(mha.init, jax.random.key(0), jnp.asarray(x), mask=jnp.asarray(mask, bool)[:, None, None, :])
    t = lambda m: m.detach().numpy()  # noqa: E731
    qkv = [attn.query, attn.key, attn.value]
    p = {"qkv": {"kernel": np.stack([t(m.weight).T.reshape(48, 12, 4) for m in qkv], axis=1),
                 "bias": np.stack([t(m.bias).reshape(12, 4) for m in qkv]),
                 "shift": np.stack([t(m.move.bias) for m in qkv])},
         "proj": {"kernel": t(out_dense.weight).T.reshape(12, 4, 48), "bias": t(out_dense.bias),
                  "shift": t(out_dense.move.bias).reshape(12, 4)},
         "bi_attention": {n: {"kernel": t(getattr(attn, n).weight).T, "bias": t(getattr(attn, n).bias)}
                          for n in ("q_p", "k_p", "q_m", "k_m", "v_p")}}
    # calibrate takes the lazy α on this forward, as the official first forward did
    jmask = jnp.asarray(mask, bool)[:, None, None, :]
    p = B.calibrate(mha, {"params": p}, jnp.asarray(x), mask=jmask)["params"]
    assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(
        __import__("flax").linen.unbox(ours_vars["params"]))
    for n in ("clip_query", "clip_key", "clip_value", "clip_attn"):
        _close(p["bi_attention"][n], getattr(attn, n).detach().reshape(()), err=n)
    _close(p["qkv"]["act_scale"], np.stack([t(m.input_clip_val).reshape(()) for m in qkv]), err="q/k/v input α")
    _close(p["proj"]["act_scale"], t(out_dense.input_clip_val).reshape(()), err="output dense α")
    out = fast_jit(mha.apply)({"params": p}, jnp.asarray(x), mask=jmask)
    _close(out, ref, atol=2e-4, err="BiPFT attention")


def test_bivit_sab_attention_matches_official():
    um = _module("BiViT", "binary_modules/utils_model.py", "binary_modules.utils_model", path_entry="")
    torch.manual_seed(0)
    ref = um.BiAttention_SAB(48, num_heads=4, qkv_bias=True).eval()
    with torch.no_grad():
        ref.qkv.weight.normal_(0, 0.1)
        ref.proj.weight.normal_(0, 0.1)
    x = RNG.normal(size=(2, 9, 48)).astype(np.float32)
    cot = RNG.normal(size=(2, 9, 48)).astype(np.float32)
    xt = _t(x)
    out_ref = ref(xt)
    (out_ref * _t(cot, False)).sum().backward()
    t = lambda m: m.detach().numpy()  # noqa: E731
    params = {"qkv": {"kernel": t(ref.qkv.weight).T.reshape(48, 3, 4, 12), "bias": t(ref.qkv.bias).reshape(3, 4, 12),
                      "weight_scale": t(ref.qkv.scaling_factor).reshape(3, 4, 12)},
              "proj": {"kernel": t(ref.proj.weight).T.reshape(4, 12, 48), "bias": t(ref.proj.bias),
                       "weight_scale": t(ref.proj.scaling_factor).reshape(48)}}
    mha = MultiHeadAttention(4, binary=B.BIVIT)
    init = __import__("flax").linen.unbox(jax.eval_shape(mha.init, jax.random.key(0), jnp.asarray(x))["params"])
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(params)
    out, gp, gx = _apply_grads(mha, {"params": params}, jnp.asarray(x), cot)
    _close(out, out_ref, atol=1e-4, err="BiViT SAB attention forward")
    _close(gx, xt.grad, atol=1e-4, err="input gradient")
    _close(gp["qkv"]["kernel"], t(ref.qkv.weight.grad).T.reshape(48, 3, 4, 12), atol=1e-4, err="qkv weight gradient")
    _close(gp["qkv"]["weight_scale"], t(ref.qkv.scaling_factor.grad).reshape(3, 4, 12), atol=1e-4, err="s gradient")
    _close(gp["proj"]["kernel"], t(ref.proj.weight.grad).T.reshape(4, 12, 48), atol=1e-4, err="proj gradient")


def test_biper_conv_matches_official():
    argv = sys.argv
    sys.argv = ["biper", "--freq", "20"]
    if not (EXT / "BiPer").exists():
        pytest.skip(f"official BiPer not fetched to {EXT}")
    sys.path.insert(0, str(EXT / "BiPer" / "cifar10"))
    try:
        bm = importlib.import_module("modules.binarized_modules")
    finally:
        sys.path.remove(str(EXT / "BiPer" / "cifar10"))
        sys.argv = argv
    x = RNG.normal(size=(2, 9, 9, 8)).astype(np.float32)
    for stage in (1, 2):
        for stride in (1, 2):
            torch.manual_seed(stage)
            conv = bm.BinarizeConv2d(8, 16, kernel_size=3, stride=stride, padding=1, bias=False).train()
            conv.stage2 = stage == 2
            xt = _t(x.transpose(0, 3, 1, 2))
            out_ref = conv(xt)
            cot = RNG.normal(size=out_ref.shape).astype(np.float32)
            (out_ref * _t(cot, False)).sum().backward()
            recipe = B.BIPER.replace(stage=stage)
            ours = recipe.conv(16, (3, 3), strides=stride, padding=1)
            params = {"kernel": conv.weight.detach().numpy().transpose(2, 3, 1, 0), "alpha": conv.alpha.detach().numpy().reshape(16)}

            out, gp, gx = _apply_grads(ours, {"params": params}, jnp.asarray(x), cot.transpose(0, 2, 3, 1), train=True)
            msg = f"stage {stage} stride {stride}"
            _close(out, out_ref.detach().numpy().transpose(0, 2, 3, 1), atol=1e-4, err=msg)
            _close(gx, xt.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4, err=msg + " input gradient")
            _close(gp["kernel"], conv.weight.grad.numpy().transpose(2, 3, 1, 0), atol=2e-3, err=msg + " weight gradient")
            _close(gp["alpha"], conv.alpha.grad.numpy().reshape(16), atol=1e-3, err=msg + " alpha gradient")
    # the regulariser term of main.py
    w = conv.weight.detach()
    ref = 0.037 * torch.mean(0.5 - 0.5 * torch.cos(2 * 20 * w))
    _close(B.biper_penalty({"c": {"kernel": jnp.asarray(w.numpy())}}, [("c",)], 20.0, 0.037), ref)
