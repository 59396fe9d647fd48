"""DeiT names on our ViT: counts equal timm's, the distilled variants (token + second head) match timm."""
import jax
import numpy as np
import pytest

import jaxformers as jf
from tests.helpers import fast_jit, perturbed_torch_model, torch_logits

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)

TIMM_COUNTS = {"deit_tiny_patch16_224": 5_717_416, "deit_small_patch16_224": 22_050_664,
               "deit_base_patch16_224": 86_567_656, "deit_tiny_distilled_patch16_224": 5_910_800,
               "deit_small_distilled_patch16_224": 22_436_432, "deit_base_distilled_patch16_224": 87_338_192}


def test_param_counts_equal_timm():
    for name, count in TIMM_COUNTS.items():
        assert jf.count_params(name) == count, name
        assert jf.model_info(name).params_m == round(count / 1e6, 2)
    assert jf.create_model("deit_small_distilled_patch16_224").num_prefix_tokens == 2


def test_distilled_timm_parity_and_heads(tmp_path):
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    tm = perturbed_torch_model(lambda: timm.models.deit.VisionTransformerDistilled(**TINY))
    torch.save(tm.state_dict(), tmp_path / "deit.pth")
    v = jf.load_pretrained("deit_tiny_distilled_patch16_224", tmp_path / "deit.pth", **TINY)
    model = jf.create_model("deit_tiny_distilled_patch16_224", **TINY)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    logits, state = fast_jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(v, x)
    inter = {k: val[0] for k, val in state["intermediates"].items()}
    ref = torch_logits(tm, x)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
    # Both heads are exposed for distillation training; the logits are their mean (timm / DeiT inference).
    np.testing.assert_allclose(logits, (inter["logits_cls"] + inter["logits_dist"]) / 2, atol=1e-6)
    assert not np.allclose(inter["logits_cls"], inter["logits_dist"])
    assert inter["tokens"].shape == (2, 18, 32)  # [CLS], distillation token, 16 patches
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="forward_features"), v, x)
    assert {s: f.shape for s, f in feats.items()} == {8: (2, 4, 4, 32)}  # patch tokens only
    with pytest.raises(ValueError, match="distilled=True needs class_token"):
        jax.eval_shape(lambda: jf.create_model("deit_tiny_distilled_patch16_224", **TINY, class_token=False,
                                               global_pool="avg").init(jax.random.key(0), x))
