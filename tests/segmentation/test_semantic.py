"""The per-pixel loss and prediction shared by the semantic segmentation heads, against PyTorch."""
import numpy as np
import pytest

from jaxformers.segmentation import VOID, semantic_cross_entropy, semantic_prediction


def test_cross_entropy_matches_torch_with_resize_and_void():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 8, 10)).astype(np.int32)
    labels[0, :3] = VOID
    up = F.interpolate(torch.from_numpy(logits).permute(0, 3, 1, 2), size=(8, 10), mode="bilinear",
                       align_corners=False)
    ref = F.cross_entropy(up, torch.from_numpy(labels).long(), ignore_index=VOID)
    np.testing.assert_allclose(semantic_cross_entropy(logits, labels), ref.item(), rtol=1e-5)
    np.testing.assert_array_equal(semantic_prediction(logits, (8, 10)), up.argmax(1).numpy())
    assert float(semantic_cross_entropy(logits, np.full_like(labels, VOID))) == 0.0
    with pytest.raises(ValueError, match="labels"):
        semantic_cross_entropy(logits, labels[0])
