"""Captioning metrics: BLEU, CIDEr-D, ROUGE-L, exact-match METEOR on worked examples, the m@kIoU rule, and
live equality with pycocoevalcap's Python scorers where it is installed."""
from __future__ import annotations

import math

import numpy as np
import pytest

from jaxformers.metrics.captioning import bleu, box_iou_3d, cider_d, dense_caption_scores, meteor, rouge_l


def test_bleu_worked_examples():
    """cand "a b c d" vs ref "a b c e": p1 = 3/4, p2 = 2/3, so BLEU-2 = sqrt(1/2); cand "a b" vs ref "a b c d":
    all n-grams match but the brevity penalty is exp(1 - 4/2); identical sentences score 1."""
    corpus, per = bleu(["a b c d"], [["a b c e"]], n=2)
    assert corpus[1] == pytest.approx(math.sqrt(0.5), rel=1e-6) and per[1][0] == pytest.approx(math.sqrt(0.5), rel=1e-6)
    corpus, _ = bleu(["a b"], [["a b c d", "x y z w v u"]], n=2)  # the closest reference length is 4
    assert corpus[1] == pytest.approx(math.exp(-1.0), rel=1e-6)
    corpus, per = bleu(["the red box is left of the blue sphere"] * 2, [["the red box is left of the blue sphere"]] * 2)
    assert corpus[3] == pytest.approx(1.0, rel=1e-6) and per[3] == pytest.approx([1.0, 1.0], rel=1e-6)


def test_cider_d_worked_examples():
    """Two images, each candidate equal to its only reference and no n-gram shared between the images:
    idf = log 2 for every n-gram, cosine 1 for n = 1, 2 and 0 for n = 3, 4 (no trigrams) -> 10 x 2 / 4 = 5.
    An n-gram in every image's references has idf 0: candidates made only of those score 0."""
    mean, per = cider_d(["a b", "c d"], [["a b"], ["c d"]])
    np.testing.assert_allclose(per, [5.0, 5.0], rtol=1e-9)
    assert mean == pytest.approx(5.0)
    _, per = cider_d(["a b", "a b"], [["a b"], ["a b c"]])
    np.testing.assert_allclose(per, [0.0, 0.0], atol=1e-12)


def test_rouge_l_and_meteor_worked_examples():
    """ROUGE-L of "a b c d" vs "a c d e f": LCS 3, P 3/4, R 3/5, F_1.2 = 2.44 PR / (R + 1.44 P). Exact METEOR
    (alpha 0.85, beta 0.2, gamma 0.6): "a b c d" vs "c d a b" has 4 matches in 2 chunks (P = R = 1), the
    identical sentence 1 chunk; a repeated word is aligned so as to keep the chunk ("the cat the" vs
    "the cat": 2 matches, 1 chunk)."""
    _, per = rouge_l(["a b c d"], [["a c d e f", "z"]])
    p, r = 0.75, 0.6
    assert per[0] == pytest.approx(2.44 * p * r / (r + 1.44 * p), rel=1e-9)
    _, per = meteor(["a b c d", "a b c d"], [["c d a b"], ["a b c d"]])
    np.testing.assert_allclose(per, [1 - 0.6 * 0.5 ** 0.2, 1 - 0.6 * 0.25 ** 0.2], rtol=1e-9)
    _, per = meteor(["the cat the"], [["the cat"]])
    prec, rec = 2 / 3, 1.0
    f = prec * rec / (0.85 * prec + 0.15 * rec)
    assert per[0] == pytest.approx(f * (1 - 0.6 * 0.5 ** 0.2), rel=1e-9)
    _, per = meteor(["x y"], [["a b"]])
    assert per[0] == 0.0


def test_m_at_k_iou_rule():
    """Object 0 is found exactly, object 1 by a box of IoU 0.3 (a unit cube shifted by 0.7 / 1.3), both with
    the right caption (ROUGE-L 1): m@0.25 counts both, m@0.5 only object 0; the wrongly captioned extra
    box of IoU 0 is never picked."""
    shift = 0.7 / 1.3
    assert box_iou_3d([[shift, 0, 0]], [[1, 1, 1]], [[0, 0, 0]], [[1, 1, 1]])[0, 0] == pytest.approx(0.3)
    scene = dict(pred_centers=[[5, 5, 0], [shift, 0, 0], [9, 9, 9]], pred_sizes=[[1, 1, 1]] * 3,
                 pred_captions=["the red box", "the blue sphere", "nothing here"],
                 gt_centers=[[5, 5, 0], [0, 0, 0]], gt_sizes=[[1, 1, 1]] * 2,
                 gt_captions=[["the red box"], ["the blue sphere"]])
    got = dense_caption_scores([scene], metrics=("rouge_l", "cider"))
    assert got["rouge_l@0.25"] == pytest.approx(1.0) and got["rouge_l@0.5"] == pytest.approx(0.5)
    assert got["cider@0.5"] == pytest.approx(got["cider@0.25"] / 2)
    with pytest.raises(ValueError, match="2 ground-truth boxes but 1 caption lists"):
        dense_caption_scores([{**scene, "gt_captions": [["x"]]}])


def test_equals_pycocoevalcap():
    """BLEU-1..4, CIDEr-D and ROUGE-L equal pycocoevalcap's scorers (corpus and per-caption) on random
    captions with 1-3 references."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    rng = np.random.default_rng(0)
    words = "the a red blue chair table is left right of near sphere box cylinder".split()
    cands = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(25)]
    refs = [[" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(rng.integers(1, 4))] for _ in range(25)]
    gts, res = dict(enumerate(refs)), {i: [c] for i, c in enumerate(cands)}
    want, want_per = Bleu(4).compute_score(gts, res, verbose=0)
    got, got_per = bleu(cands, refs)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    np.testing.assert_allclose(got_per, want_per, rtol=1e-9)
    for ours, theirs in ((cider_d, Cider()), (rouge_l, Rouge())):
        want, want_per = theirs.compute_score(gts, res)
        got, got_per = ours(cands, refs)
        assert got == pytest.approx(want, rel=1e-9)
        np.testing.assert_allclose(got_per, want_per, rtol=1e-9)
