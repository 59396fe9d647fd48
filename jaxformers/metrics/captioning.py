"""Captioning metrics as the (3-D dense) captioning literature computes them.

Pure Python / NumPy re-implementations of the scorers of ``pycocoevalcap`` (the MS-COCO caption evaluation
code, github.com/salaniz/pycocoevalcap) that Scan2Cap (arXiv 2012.02206) and Vote2Cap-DETR (arXiv
2301.02508, ch3cook-fdu/Vote2Cap-DETR) call, on captions that are already tokenized (space-separated
lower-case words, as ScanRefer's captions are):

- ``bleu(candidates, references, n=4)``: ``pycocoevalcap.bleu.bleu_scorer.BleuScorer`` with
  ``option="closest"``: clipped n-gram counts, the reference length closest to the candidate's, the
  corpus score from summed counts and per-sentence scores with its smoothing (``tiny`` = 1e-15 added
  to the matches, ``small`` = 1e-9 to the guesses) and brevity penalty.
- ``cider_d(candidates, references)``: ``pycocoevalcap.cider.cider_scorer.CiderScorer`` (which is
  CIDEr-D): TF-IDF n-gram vectors (n = 1..4) with document frequencies over the references of the
  evaluated set, clipped similarity ``min(hyp, ref) * ref``, Gaussian length penalty (sigma 6, lengths
  counted as that code does: the number of bigrams), averaged over n and references, times 10.
- ``rouge_l(candidates, references)``: ``pycocoevalcap.rouge.rouge.Rouge``: LCS-based F with beta 1.2
  from the best precision and the best recall over the references.
- ``meteor(candidates, references)``: pycocoevalcap calls the METEOR 1.5 Java jar (exact, stem, synonym
  and paraphrase modules). No Java here, so this is METEOR with the **exact-match module only** (no
  WordNet synonyms, no Porter stems, no paraphrase table, no function-word weighting): an alignment
  with the most matches and, among those, the fewest chunks; P = m / |hyp|, R = m / |ref|,
  F = P R / (alpha P + (1 - alpha) R), penalty = gamma (chunks / m) ** beta, score = F (1 - penalty),
  with METEOR 1.5's English defaults alpha 0.85, beta 0.2, gamma 0.6; the best reference per
  candidate; the corpus score is the mean of the per-candidate scores (the jar's aggregate pools the
  statistics instead). It is lower than the jar's METEOR wherever stems or synonyms would match.
- ``dense_caption_scores(...)``: the "m@kIoU" protocol of 3-D dense captioning (Scan2Cap eq. 5): each
  annotated object is paired with the predicted box of highest IoU; its caption's score counts if that
  IoU is >= k and is 0 otherwise; m@kIoU = the mean over the annotated objects of score x [IoU >= k].
  As Vote2Cap-DETR's ``eval_caption`` does, the per-caption scores come from the scorers run over all
  the paired captions at once (CIDEr's document frequencies over that set), then are masked and
  averaged.

Each scorer returns ``(corpus_score, per_candidate_scores)`` like pycocoevalcap's ``compute_score``.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

__all__ = ["bleu", "cider_d", "rouge_l", "meteor", "dense_caption_scores", "box_iou_3d"]


def _ngrams(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _check(candidates, references):
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    for i, (c, refs) in enumerate(zip(candidates, references)):
        if not isinstance(c, str):
            raise TypeError(f"candidate {i} must be a str (one caption), got {type(c).__name__}")
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of captions")


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4):
    """BLEU-1..n: ``(corpus [b1..bn], per-candidate [[b1 per candidate], ..., [bn ...]])``."""
    _check(candidates, references)
    tiny, small = 1e-15, 1e-9
    per = [[] for _ in range(n)]
    guess_tot, correct_tot = [0] * n, [0] * n
    testlen_tot = reflen_tot = 0
    for cand, refs in zip(candidates, references):
        words = cand.split()
        maxcounts: dict = {}
        reflens = []
        for ref in refs:
            r = ref.split()
            reflens.append(len(r))
            for g, c in _ngrams(r, n).items():
                maxcounts[g] = max(maxcounts.get(g, 0), c)
        testlen = len(words)
        reflen = min((abs(length - testlen), length) for length in reflens)[1]
        counts = _ngrams(words, n)
        guess = [max(0, testlen - k) for k in range(n)]
        correct = [0] * n
        for g, c in counts.items():
            correct[len(g) - 1] += min(maxcounts.get(g, 0), c)
        testlen_tot += testlen
        reflen_tot += reflen
        score = 1.0
        for k in range(n):
            guess_tot[k] += guess[k]
            correct_tot[k] += correct[k]
            score *= (correct[k] + tiny) / (guess[k] + small)
            per[k].append(score ** (1.0 / (k + 1)))
        ratio = (testlen + tiny) / (reflen + small)
        if ratio < 1:
            for k in range(n):
                per[k][-1] *= math.exp(1 - 1 / ratio)
    corpus, score = [], 1.0
    for k in range(n):
        score *= (correct_tot[k] + tiny) / (guess_tot[k] + small)
        corpus.append(score ** (1.0 / (k + 1)))
    ratio = (testlen_tot + tiny) / (reflen_tot + small)
    if ratio < 1:
        corpus = [b * math.exp(1 - 1 / ratio) for b in corpus]
    return corpus, per


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0):
    """CIDEr-D (pycocoevalcap's ``Cider``): ``(mean, per-candidate array)``."""
    _check(candidates, references)
    crefs = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    ctest = [_ngrams(c.split(), n) for c in candidates]
    df: Counter = Counter()
    for refs in crefs:
        for g in set(g for ref in refs for g in ref):
            df[g] += 1
    ref_len = np.log(float(len(crefs)))

    def vec(counts):
        v = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = float(tf) * (ref_len - np.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:
                length += tf
        return v, [np.sqrt(x) for x in norm], length

    def sim(vh, vr, nh, nr, lh, lr):
        delta = float(lh - lr)
        val = np.zeros(n)
        for k in range(n):
            for g in vh[k]:
                val[k] += min(vh[k][g], vr[k][g]) * vr[k][g]
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= np.e ** (-(delta ** 2) / (2 * sigma ** 2))
        return val

    scores = []
    for test, refs in zip(ctest, crefs):
        vh, nh, lh = vec(test)
        total = np.zeros(n)
        for ref in refs:
            vr, nr, lr = vec(ref)
            total += sim(vh, vr, nh, nr, lh, lr)
        scores.append(np.mean(total) / len(refs) * 10.0)
    scores = np.asarray(scores)
    return float(np.mean(scores)), scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2):
    """ROUGE-L (pycocoevalcap's ``Rouge``): ``(mean, per-candidate array)``."""
    _check(candidates, references)
    scores = []
    for cand, refs in zip(candidates, references):
        c = cand.split()
        precs, recs = [], []
        for ref in refs:
            r = ref.split()
            lcs = _lcs(r, c)
            precs.append(lcs / float(len(c)) if c else 0.0)
            recs.append(lcs / float(len(r)) if r else 0.0)
        p, r = max(precs), max(recs)
        scores.append(((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p) if p != 0 and r != 0 else 0.0)
    scores = np.asarray(scores)
    return float(np.mean(scores)), scores


def _chunks(pairs: list[tuple[int, int]]) -> int:
    """Number of runs of matches contiguous in both the hypothesis and the reference (pairs sorted by hyp)."""
    chunks = 0
    for i, (h, r) in enumerate(pairs):
        if i == 0 or h != pairs[i - 1][0] + 1 or r != pairs[i - 1][1] + 1:
            chunks += 1
    return chunks


def _best_alignment(hyp: list[str], ref: list[str], budget: int = 20000) -> tuple[int, int]:
    """(matches, chunks) of the exact-match alignment with the most matches and then the fewest chunks
    (depth-first search over the candidate positions of each hypothesis word, bounded by ``budget`` nodes:
    beyond it the best alignment found so far is kept, as METEOR's own beam search does)."""
    positions = defaultdict(list)
    for j, w in enumerate(ref):
        positions[w].append(j)
    need = Counter(hyp) & Counter(ref)
    matches = sum(need.values())
    if matches == 0:
        return 0, 0
    best = [matches + 1]
    nodes = [0]
    remaining_hyp = Counter(hyp)

    def dfs(i, used, pairs, left):
        nodes[0] += 1
        if nodes[0] > budget and best[0] <= matches:
            return
        if i == len(hyp):
            if len(pairs) == matches:
                best[0] = min(best[0], _chunks(pairs))
            return
        if pairs and _chunks(pairs) >= best[0]:
            return
        w = hyp[i]
        remaining_hyp[w] -= 1
        cands = [j for j in positions.get(w, []) if j not in used]
        if pairs:  # try continuing the current chunk first
            cands.sort(key=lambda j: (j != pairs[-1][1] + 1, j))
        if left[w] > 0:
            for j in cands:
                used.add(j)
                left[w] -= 1
                dfs(i + 1, used, pairs + [(i, j)], left)
                left[w] += 1
                used.discard(j)
        if left[w] <= remaining_hyp[w]:  # skipping still leaves enough later copies of w to match
            dfs(i + 1, used, pairs, left)
        remaining_hyp[w] += 1

    dfs(0, set(), [], Counter(need))
    return matches, best[0]


def meteor(candidates: Sequence[str], references: Sequence[Sequence[str]], alpha: float = 0.85,
           beta: float = 0.2, gamma: float = 0.6):
    """Exact-match METEOR (see the module docstring): ``(mean, per-candidate array)``."""
    _check(candidates, references)
    scores = []
    for cand, refs in zip(candidates, references):
        h = cand.split()
        best = 0.0
        for ref in refs:
            r = ref.split()
            m, ch = _best_alignment(h, r)
            if m == 0:
                continue
            p, rec = m / len(h), m / len(r)
            f = p * rec / (alpha * p + (1 - alpha) * rec)
            best = max(best, f * (1 - gamma * (ch / m) ** beta))
        scores.append(best)
    scores = np.asarray(scores)
    return float(np.mean(scores)), scores


def box_iou_3d(centers1, sizes1, centers2, sizes2) -> np.ndarray:
    """(P, 3), (P, 3) vs (G, 3), (G, 3) axis-aligned boxes -> (P, G) IoU (NumPy)."""
    c1, s1, c2, s2 = (np.asarray(a, np.float64) for a in (centers1, sizes1, centers2, sizes2))
    lo = np.maximum(c1[:, None] - s1[:, None] / 2, c2[None] - s2[None] / 2)
    hi = np.minimum(c1[:, None] + s1[:, None] / 2, c2[None] + s2[None] / 2)
    inter = np.prod(np.clip(hi - lo, 0, None), -1)
    union = np.prod(s1, -1)[:, None] + np.prod(s2, -1)[None] - inter
    return inter / np.maximum(union, 1e-12)


SCORERS = {"bleu4": lambda c, r: (lambda s: (s[0][3], np.asarray(s[1][3])))(bleu(c, r)),
           "cider": cider_d, "rouge_l": rouge_l, "meteor": meteor}


def dense_caption_scores(scenes: Sequence[dict], ious: Sequence[float] = (0.25, 0.5),
                         metrics: Sequence[str] = ("cider", "bleu4", "meteor", "rouge_l")) -> dict[str, float]:
    """m@kIoU over ``scenes``: each a dict with ``pred_centers`` / ``pred_sizes`` (P, 3), ``pred_captions`` (P
    str), ``gt_centers`` / ``gt_sizes`` (G, 3) and ``gt_captions`` (G lists of reference captions). Returns
    ``{"cider@0.25": ..., ...}`` (CIDEr and the others as fractions; papers print them x100)."""
    cands, refs, best = [], [], []
    for i, s in enumerate(scenes):
        gc, gs = np.asarray(s["gt_centers"]).reshape(-1, 3), np.asarray(s["gt_sizes"]).reshape(-1, 3)
        if len(s["gt_captions"]) != len(gc):
            raise ValueError(f"scene {i}: {len(gc)} ground-truth boxes but {len(s['gt_captions'])} caption lists")
        pc, ps = np.asarray(s["pred_centers"]).reshape(-1, 3), np.asarray(s["pred_sizes"]).reshape(-1, 3)
        if len(s["pred_captions"]) != len(pc):
            raise ValueError(f"scene {i}: {len(pc)} predicted boxes but {len(s['pred_captions'])} captions")
        if not len(gc):
            continue
        if not len(pc):
            cands += [""] * len(gc)
            best += [0.0] * len(gc)
        else:
            iou = box_iou_3d(pc, ps, gc, gs)
            pick = np.argmax(iou, 0)
            cands += [s["pred_captions"][p] for p in pick]
            best += list(iou[pick, np.arange(len(gc))])
        refs += [list(r) for r in s["gt_captions"]]
    if not cands:
        raise ValueError("no annotated object in the given scenes")
    best = np.asarray(best)
    out = {}
    for name in metrics:
        _, per = SCORERS[name](cands, refs)
        for k in ious:
            out[f"{name}@{k}"] = float(np.mean(np.asarray(per) * (best >= k)))
    return out
