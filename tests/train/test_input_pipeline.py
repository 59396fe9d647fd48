"""Input pipelines: the embedded digits split, deterministic sharded iteration, resume, eval padding,
preprocessing strings, typed fields (exact integer ids, clear mismatch errors), and the tfds path
(on tfds' mock data: no download, no TensorFlow)."""
import ml_collections
import numpy as np
import pytest

from train import input_pipeline
from train.input_pipeline import Field, FieldError
from train.preprocess import parse_pp

PP = "resize(16)|to_rgb|value_range(-1, 1)"
IMAGES = {"image": Field("float32", (None, None, None)), "label": Field("int32", ())}  # ClassificationTask's


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
    make = lambda **kw: input_pipeline.TrainIterator(source, PP, fields=IMAGES, global_batch=32,  # noqa: E731
                                                     seed=0, **kw)
    a = batches(make(), 5)
    b = batches(make(num_threads=3), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert a[0]["image"].shape == (32, 16, 16, 3) and a[0]["image"].dtype == np.float32
    assert a[0]["label"].dtype == np.int32
    other = batches(input_pipeline.TrainIterator(source, PP, fields=IMAGES, global_batch=32, seed=1), 1)[0]
    assert not np.array_equal(other["label"], a[0]["label"])
    it = make()
    batches(it, 3)
    state = it.get_state()
    assert state == {"position": 3, "fields": {"image": ["float32", [16, 16, 3]], "label": ["int32", []]}}
    resumed = make()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], a[3]["image"])
    resumed.set_state({"position": 3})  # a state from before fields were recorded
    np.testing.assert_array_equal(next(resumed)["image"], a[3]["image"])
    other_size = input_pipeline.TrainIterator(source, "resize(8)|to_rgb|value_range(-1, 1)", fields=IMAGES,
                                              global_batch=32, seed=0)
    with pytest.raises(FieldError, match=r"other fields \('image': checkpoint \('float32', \[16, 16, 3\]\) vs now "
                                         r"\('float32', \[8, 8, 3\]\)\)"):
        other_size.set_state(state)


def test_hosts_split_each_global_batch():
    source, _ = digits("train")
    whole = batches(input_pipeline.TrainIterator(source, PP, fields=IMAGES, global_batch=24, seed=5), 3)
    hosts = [batches(input_pipeline.TrainIterator(source, PP, fields=IMAGES, global_batch=24, seed=5, process_index=p,
                                                  process_count=3), 3) for p in range(3)]
    for i in range(3):
        joined = np.concatenate([h[i]["label"] for h in hosts])
        np.testing.assert_array_equal(joined, whole[i]["label"])
        np.testing.assert_array_equal(np.concatenate([h[i]["image"] for h in hosts]), whole[i]["image"])
    with pytest.raises(ValueError, match="multiple of the 5 host"):
        input_pipeline.TrainIterator(source, PP, fields=IMAGES, global_batch=24, seed=5, process_count=5)


def test_every_epoch_is_a_fresh_permutation():
    images = np.zeros((10, 4, 4, 1), np.uint8)
    source = input_pipeline.ArraySource({"image": images, "label": np.arange(10, dtype=np.int32)})
    it = input_pipeline.TrainIterator(source, "value_range(0, 1)", fields=IMAGES, global_batch=5, seed=0)
    labels = np.concatenate([next(it)["label"] for _ in range(6)])  # three epochs
    epochs = labels.reshape(3, 10)
    for e in epochs:
        assert sorted(e) == list(range(10))
    assert not np.array_equal(epochs[0], epochs[1])


def test_random_augmentation_is_per_example_and_reproducible():
    source, _ = digits("train")
    pp = "resize(16)|random_crop(16, pad=2)|flip|to_rgb|value_range(-1, 1)"
    a = next(input_pipeline.TrainIterator(source, pp, fields=IMAGES, global_batch=16, seed=0))
    b = next(input_pipeline.TrainIterator(source, pp, fields=IMAGES, global_batch=16, seed=0))
    plain = next(input_pipeline.TrainIterator(source, PP, fields=IMAGES, global_batch=16, seed=0))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], plain["image"])
    np.testing.assert_array_equal(a["label"], plain["label"])


def test_eval_batches_cover_every_example_once():
    source, info = digits("test")
    seen, total = [], 0
    for p in range(2):
        for batch in input_pipeline.eval_batches(source, PP, fields=IMAGES, global_batch=64, process_index=p,
                                                 process_count=2):
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
    out = parse_pp("rename(target='label')|resize(4)").random_map(ex, rng)
    assert sorted(out) == ["image", "target"] and out["target"] == 3 and out["image"].dtype == np.uint8
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
    with pytest.raises(ValueError, match=r"rename: the example has no field\(s\) \['lable'\]"):
        parse_pp("rename(label='lable')").random_map({"image": np.zeros((2, 2, 1), np.uint8), "label": 0}, None)


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
                                          fields=IMAGES, global_batch=8, seed=0)
        batch = next(it)
        assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].shape == (8,)
        assert sorted(batch) == ["image", "label"] and batch["label"].dtype == np.int32  # tfds' int64, exactly
        assert set(np.unique(batch["label"])) <= set(range(10))
        evals = list(input_pipeline.eval_batches(source, "resize(16)|to_rgb|normalize", fields=IMAGES,
                                                 global_batch=16))
        assert sum(int(b["mask"].sum()) for b in evals) == 40


def test_unknown_tfds_name_suggests():
    pytest.importorskip("tensorflow_datasets")
    config = ml_collections.ConfigDict({"source": "tfds", "dataset": "mnsit", "data_dir": ""})
    with pytest.raises(ValueError, match="knows no dataset 'mnsit'.*'mnist'"):
        input_pipeline.open_source(config, "train")


def _big_id_text(n: int = 32, length: int = 12) -> dict[str, np.ndarray]:
    """Token rows with ids in [2**24, 2**31): most are not float32-representable (a float round trip
    would change them), independent of any vocabulary or embedding table."""
    ids = np.random.default_rng(0).integers(2**24, 2**31 - 1, (n, length)).astype(np.int32)
    ids[:, 1] = 2**24 + 1  # float32(2**24 + 1) == 2**24
    assert (ids.astype(np.float32).astype(np.int64) != ids).any()
    return {"input_ids": ids, "attention_mask": np.ones((n, length), np.int32),
            "token_type_ids": np.zeros((n, length), np.int32), "label": np.arange(n, dtype=np.int32)}


def test_token_ids_above_2_to_24_arrive_exactly_as_int32():
    """Text fields travel as int32 from the source through batching, sharding and the task's model
    inputs: every id >= 2**24 is bit-exact (the label is the row's index, to find the source row)."""
    import jax

    from jaxformers.sharding import make_mesh
    from train import steps
    from train.tasks_text import MaskedLMTask, SequenceClassificationTask

    data = _big_id_text()
    source = input_pipeline.ArraySource(data)
    task = SequenceClassificationTask()
    it = input_pipeline.TrainIterator(source, "", fields=task.fields, global_batch=16, seed=0)
    assert it.fields["input_ids"] == Field("int32", (12,))
    mesh = make_mesh({"data": -1})
    model_inputs = jax.jit(task.model_inputs)
    seen = []
    for _ in range(2):  # one epoch
        batch = next(it)
        assert {k: (v.dtype, v.shape[1:]) for k, v in batch.items()} == {
            "input_ids": (np.int32, (12,)), "attention_mask": (np.int32, (12,)),
            "token_type_ids": (np.int32, (12,)), "label": (np.int32, ())}
        np.testing.assert_array_equal(batch["input_ids"], data["input_ids"][batch["label"]])
        on_device = steps.to_global(batch, mesh, 16)
        assert on_device["input_ids"].dtype == np.int32 and len(on_device["input_ids"].sharding.device_set) == 8
        ids, mask, types = jax.device_get(model_inputs(on_device))
        np.testing.assert_array_equal(ids, data["input_ids"][batch["label"]])
        seen += list(batch["label"])
    assert sorted(seen) == list(range(32))
    # Masked-LM: masking keeps integer ids; the targets are the exact original ids.
    mlm = MaskedLMTask()
    batch = next(input_pipeline.TrainIterator(source, f"mlm_mask(mask_id=4, vocab_size={2**31 - 1})",
                                              fields=mlm.fields, global_batch=32, seed=0))
    assert sorted(batch) == sorted(mlm.fields) and all(v.dtype == np.int32 for v in batch.values())
    assert (batch["labels"] >= 0).any() and (batch["input_ids"] == 4).any()
    restored = np.where(batch["labels"] >= 0, batch["labels"], batch["input_ids"])
    assert {r.tobytes() for r in restored} == {r.tobytes() for r in data["input_ids"]}
    evals = list(input_pipeline.eval_batches(source, "", fields=task.fields, global_batch=24))
    assert all(b["input_ids"].dtype == np.int32 for b in evals)
    real = np.concatenate([b["input_ids"][b["mask"] > 0] for b in evals])
    np.testing.assert_array_equal(real, data["input_ids"])


def test_data_that_does_not_match_the_task_fields_is_named():
    from train.tasks_text import SequenceClassificationTask

    fields = SequenceClassificationTask().fields
    data = _big_id_text(8)
    make = lambda d, f=fields: input_pipeline.TrainIterator(input_pipeline.ArraySource(d), "", fields=f,  # noqa: E731
                                                            global_batch=4, seed=0)
    with pytest.raises(FieldError, match=r"field 'input_ids': the task expects int32 \(\*,\) per example, the "
                                         r"training data gives float32 \(12,\) \(ids and labels must stay integers"):
        make({**data, "input_ids": data["input_ids"].astype(np.float32)})  # the old image-slot layout
    with pytest.raises(FieldError, match=r"field 'label': the task expects int32 \(\) but the training data has no "
                                         r"field 'label' \(its fields: \['attention_mask', 'input_ids', "):
        make({k: v for k, v in data.items() if k != "label"})
    with pytest.raises(FieldError, match=r"field 'input_ids': the task expects int32 \(64,\) per example, the "
                                         r"training data gives int32 \(12,\)"):
        make(data, {**fields, "input_ids": Field("int32", (64,))})
    with pytest.raises(FieldError, match=r"field 'attention_mask': .* gives int32 \(12, 1\)"):
        make({**data, "attention_mask": data["attention_mask"][..., None]})
    wide = {**data, "label": np.arange(8, dtype=np.int64)}
    assert next(make(wide))["label"].dtype == np.int32  # int64 -> int32: exact, so converted
    wide["label"][5] = 2**40  # one bad example past the first: caught when its batch is read
    with pytest.raises(FieldError, match=r"field 'label': .* gives int64 \(\) holding values in "
                                         r"\[1099511627776, 1099511627776\], outside int32's range"):
        it = make(wide)
        [next(it) for _ in range(2)]
    with pytest.raises(FieldError, match="reserved for the eval padding mask"):
        make(data, {**fields, "mask": Field("float32", ())})
    with pytest.raises(FieldError, match="declares no batch fields"):
        make(data, {})
