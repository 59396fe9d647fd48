"""Input pipelines: the embedded digits split, deterministic sharded iteration, resume, eval padding,
preprocessing strings, and the tfds path (on tfds' mock data: no download, no TensorFlow)."""
import ml_collections
import numpy as np
import pytest

from train import input_pipeline
from train.preprocess import parse_pp

PP = "resize(16)|to_rgb|value_range(-1, 1)"


def digits(split):
    return input_pipeline.open_source(ml_collections.ConfigDict({"source": "embedded", "dataset": "digits"}), split)


def test_digits_split_is_fixed_stratified_and_disjoint():
    (tr_x, tr_y), (te_x, te_y) = input_pipeline.load_digits_split("train"), input_pipeline.load_digits_split("test")
    assert len(tr_y) + len(te_y) == 1797 and len(te_y) == 359
    assert tr_x.shape[1:] == (8, 8, 1) and tr_x.dtype == np.uint8 and tr_x.max() == 255
    for c in range(10):  # 20% of every class in test
        n = (tr_y == c).sum() + (te_y == c).sum()
        assert (te_y == c).sum() == round(0.2 * n)
    train_rows = {x.tobytes() + bytes([y]) for x, y in zip(tr_x, tr_y)}
    overlap = sum(x.tobytes() + bytes([y]) in train_rows for x, y in zip(te_x, te_y))
    assert overlap <= 5  # the raw set itself has a few exact duplicate scans; the split never copies rows
    # Fixed once and for all: a checksum of the test labels.
    assert int(np.sum(te_y * np.arange(len(te_y)))) == int(np.sum(input_pipeline.load_digits_split("test")[1]
                                                                   * np.arange(len(te_y))))
    with pytest.raises(ValueError, match="splits"):
        input_pipeline.load_digits_split("validation")


def batches(it, n):
    return [next(it) for _ in range(n)]


def test_train_iterator_is_deterministic_and_resumes_exactly():
    source, info = digits("train")
    assert info.num_classes == 10 and info.num_examples == len(source)
    make = lambda **kw: input_pipeline.TrainIterator(source, PP, global_batch=32, seed=0, **kw)  # noqa: E731
    a = batches(make(), 5)
    b = batches(make(num_threads=3), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert a[0]["image"].shape == (32, 16, 16, 3) and a[0]["image"].dtype == np.float32
    assert a[0]["label"].dtype == np.int32
    other = batches(input_pipeline.TrainIterator(source, PP, global_batch=32, seed=1), 1)[0]
    assert not np.array_equal(other["label"], a[0]["label"])
    it = make()
    batches(it, 3)
    state = it.get_state()
    assert state == {"position": 3}
    resumed = make()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], a[3]["image"])


def test_hosts_split_each_global_batch():
    source, _ = digits("train")
    whole = batches(input_pipeline.TrainIterator(source, PP, global_batch=24, seed=5), 3)
    hosts = [batches(input_pipeline.TrainIterator(source, PP, global_batch=24, seed=5, process_index=p,
                                                  process_count=3), 3) for p in range(3)]
    for i in range(3):
        joined = np.concatenate([h[i]["label"] for h in hosts])
        np.testing.assert_array_equal(joined, whole[i]["label"])
        np.testing.assert_array_equal(np.concatenate([h[i]["image"] for h in hosts]), whole[i]["image"])
    with pytest.raises(ValueError, match="multiple of the 5 host"):
        input_pipeline.TrainIterator(source, PP, global_batch=24, seed=5, process_count=5)


def test_every_epoch_is_a_fresh_permutation():
    images = np.zeros((10, 4, 4, 1), np.uint8)
    source = input_pipeline.ArraySource(images, np.arange(10, dtype=np.int32))
    it = input_pipeline.TrainIterator(source, "value_range(0, 1)", global_batch=5, seed=0)
    labels = np.concatenate([next(it)["label"] for _ in range(6)])  # three epochs
    epochs = labels.reshape(3, 10)
    for e in epochs:
        assert sorted(e) == list(range(10))
    assert not np.array_equal(epochs[0], epochs[1])


def test_random_augmentation_is_per_example_and_reproducible():
    source, _ = digits("train")
    pp = "resize(16)|random_crop(16, pad=2)|flip|to_rgb|value_range(-1, 1)"
    a = next(input_pipeline.TrainIterator(source, pp, global_batch=16, seed=0))
    b = next(input_pipeline.TrainIterator(source, pp, global_batch=16, seed=0))
    plain = next(input_pipeline.TrainIterator(source, PP, global_batch=16, seed=0))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], plain["image"])
    np.testing.assert_array_equal(a["label"], plain["label"])


def test_eval_batches_cover_every_example_once():
    source, info = digits("test")
    seen, total = [], 0
    for p in range(2):
        for batch in input_pipeline.eval_batches(source, PP, global_batch=64, process_index=p, process_count=2):
            assert batch["image"].shape == (32, 16, 16, 3)
            seen.append(batch["label"][batch["mask"] > 0])
            total += int(batch["mask"].sum())
    assert total == info.num_examples
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.sort(input_pipeline.load_digits_split("test")[1]))


def test_preprocessing_ops():
    ex = {"image": np.arange(64, dtype=np.uint8).reshape(8, 8, 1), "label": 3}
    rng = np.random.default_rng(0)
    out = parse_pp("resize(12)|center_crop(10)|to_rgb|normalize").random_map(ex, rng)
    assert out["image"].shape == (10, 10, 3) and out["image"].dtype == np.float32 and out["label"] == 3
    out = parse_pp("random_resized_crop(6, scale=(0.5, 1.0))|flip").random_map(ex, rng)
    assert out["image"].shape == (6, 6, 1)
    out = parse_pp("resize_small(16)|value_range(0, 1)").random_map({"image": np.zeros((8, 4, 3), np.uint8),
                                                                     "label": 0}, rng)
    assert out["image"].shape == (32, 16, 3)


def test_preprocessing_errors_are_clear():
    with pytest.raises(ValueError, match="unknown preprocessing op 'resise'.*did you mean 'resize'"):
        parse_pp("resise(32)|to_rgb")
    with pytest.raises(ValueError, match="takes no arguments"):
        parse_pp("flip(3)")
    with pytest.raises(ValueError, match="resize"):
        parse_pp("resize(1, 2, 3, 4)")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_pp("resize(32")


def test_unknown_sources_are_clear_errors():
    with pytest.raises(ValueError, match="no embedded dataset 'digitz'"):
        input_pipeline.open_source(ml_collections.ConfigDict({"source": "embedded", "dataset": "digitz"}), "train")
    with pytest.raises(ValueError, match="'embedded' or 'tfds'"):
        input_pipeline.open_source(ml_collections.ConfigDict({"source": "web", "dataset": "x"}), "train")


def test_tfds_source_on_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = ml_collections.ConfigDict({"source": "tfds", "dataset": "mnist", "data_dir": ""})
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        source, info = input_pipeline.open_source(config, "train")
        assert info.num_classes == 10 and info.num_examples == 40
        it = input_pipeline.TrainIterator(source, "resize(16)|to_rgb|random_crop(16, pad=1)|normalize",
                                          global_batch=8, seed=0)
        batch = next(it)
        assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].shape == (8,)
        assert set(np.unique(batch["label"])) <= set(range(10))
        evals = list(input_pipeline.eval_batches(source, "resize(16)|to_rgb|normalize", global_batch=16))
        assert sum(int(b["mask"].sum()) for b in evals) == 40


def test_unknown_tfds_name_suggests():
    pytest.importorskip("tensorflow_datasets")
    config = ml_collections.ConfigDict({"source": "tfds", "dataset": "mnsit", "data_dir": ""})
    with pytest.raises(ValueError, match="knows no dataset 'mnsit'.*'mnist'"):
        input_pipeline.open_source(config, "train")
