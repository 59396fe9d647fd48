"""The segmentation platform's data: the generated panoptic set, label maps moving with the image in
the preprocessing, the typed batch of the panoptic task, and clear errors for bad targets."""
from __future__ import annotations

import numpy as np
import pytest

from jaxformers.segmentation import check_panoptic
from train import input_pipeline
from train.preprocess import parse_pp
from train.seg_data import MAX_SEGMENTS, NUM_CLASSES, THING_IDS, VOID, PanopticShapes, photo
from train.tasks_seg import PanopticSegmentationTask


def test_generated_scenes_are_deterministic_consistent_and_varied():
    src = PanopticShapes("train")
    assert len(src) == 4000 and len(PanopticShapes("val")) == 500
    a = src.arrays(48)
    np.testing.assert_array_equal(src[7]["image"], a["image"][7])  # a pure function of the index
    assert not np.array_equal(PanopticShapes("val")[7]["image"], a["image"][7])
    assert a["image"].dtype == np.uint8 and a["image"].shape == (48, 64, 64, 3)
    for i in range(48):
        pan, cls = a["panoptic"][i], a["segment_classes"][i]
        used = int((cls >= 0).sum())
        assert cls.shape == (MAX_SEGMENTS,) and (cls[:used] >= 0).all() and (cls[used:] == -1).all()
        assert set(np.unique(pan)) - {0} == set(range(1, used + 1))  # every listed segment is visible
        expected = np.where(pan > 0, cls[np.maximum(pan - 1, 0)], VOID)
        np.testing.assert_array_equal(a["semantic"][i], expected)
        stuff = cls[(cls >= 0) & ~np.isin(cls, THING_IDS)]
        assert len(stuff) == len(set(stuff.tolist()))  # one segment per stuff class
    present = set(a["segment_classes"][a["segment_classes"] >= 0].tolist())
    assert present == set(range(NUM_CLASSES))
    assert a["segment_crowd"].sum() > 0 and (a["panoptic"] == 0).any()  # crowd regions and void slivers occur
    assert photo("coffee", 32).shape == (32, 32, 3)


def test_geometric_ops_move_label_maps_with_the_image():
    pan = np.kron(np.arange(16).reshape(4, 4) % 5, np.ones((16, 16), np.int32)).astype(np.int32)
    ex = {"image": np.repeat((pan * 40)[..., None], 3, -1).astype(np.uint8), "panoptic": pan,
          "semantic": np.where(pan > 0, pan + 10, VOID).astype(np.int32)}
    pp = parse_pp("scale_jitter(0.5, 1.5)|crop_or_pad(64)|flip")
    padded = 0
    for seed in range(6):
        out = pp.random_map(dict(ex), np.random.default_rng(seed))
        assert out["image"].shape == (64, 64, 3) and out["panoptic"].shape == out["semantic"].shape == (64, 64)
        from_image = np.round(out["image"][..., 0] / 40.0).astype(np.int32)
        agree = (from_image == out["panoptic"]).mean()
        assert agree > 0.9, (seed, agree)  # labels sit where the image content went (edges interpolate)
        np.testing.assert_array_equal(out["semantic"], np.where(out["panoptic"] > 0, out["panoptic"] + 10, VOID))
        padded += int((out["semantic"] == VOID).sum() > (ex["semantic"] == VOID).mean() * 64 * 64 * 1.5)
    assert padded > 0  # a shrunk image is padded with void labels
    flipped = parse_pp("flip").random_map(dict(ex), np.random.default_rng(1))
    if not np.array_equal(flipped["image"], ex["image"]):
        np.testing.assert_array_equal(flipped["panoptic"], pan[:, ::-1])
    with pytest.raises(ValueError, match="label map 'panoptic' is .* but the image is"):
        parse_pp("flip").random_map({**ex, "panoptic": pan[:32]}, np.random.default_rng(1))


def test_panoptic_task_batches_and_bad_targets():
    task = PanopticSegmentationTask(NUM_CLASSES, THING_IDS)
    it = input_pipeline.TrainIterator(PanopticShapes("val", num_examples=8), "flip|normalize", fields=task.fields,
                                      global_batch=4, seed=0, num_threads=1)
    batch = next(it)
    shapes = {k: (v.dtype.name, v.shape) for k, v in batch.items()}
    assert shapes == {"image": ("float32", (4, 64, 64, 3)), "semantic": ("int32", (4, 64, 64)),
                      "panoptic": ("int32", (4, 64, 64)), "segment_classes": ("int32", (4, MAX_SEGMENTS)),
                      "segment_crowd": ("int32", (4, MAX_SEGMENTS))}
    pan, cls = batch["panoptic"], batch["segment_classes"]
    with pytest.raises(ValueError, match="panoptic map is 64x48 but the image is 64x64"):
        check_panoptic(pan[..., :48], cls, image_shape=batch["image"].shape)
    with pytest.raises(ValueError, match=r"class id\(s\) \[6\] outside \[0, 6\)"):
        check_panoptic(pan, np.where(cls == 0, 6, cls), num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="segment ids in .* but the segment table has 2 slots"):
        check_panoptic(pan, cls[:, :2])
    with pytest.raises(ValueError, match=r"thing_classes \[7\] are outside"):
        PanopticSegmentationTask(NUM_CLASSES, (0, 7))
