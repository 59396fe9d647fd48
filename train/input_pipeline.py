"""Input pipelines: random-access sources + grain transforms, deterministic, sharded per host.

Sources (``config.input.source``):

* ``"embedded"``: datasets that ship inside an installed package, so training needs no download.
  ``digits`` is scikit-learn's handwritten digits (1,797 real 8x8 grey scans of 0-9, from the UCI
  optical-recognition set), split once and for all into 1,438 train / 359 test images (stratified,
  20% of each class, fixed numpy PCG64 seed).
* ``"tfds"``: ``tfds.data_source(name, split, data_dir)`` for any prepared TFDS dataset (ArrayRecord
  format; reading needs no TensorFlow): imagenet2012, cifar10, mnist, ...

Order: the global example stream is ``source -> shuffle(seed) -> repeat -> preprocess``, reshuffled
every epoch, with per-example randomness derived from the seed and the position. Global batch ``i``
is stream positions ``[i*B, (i+1)*B)``; host ``p`` of ``P`` reads rows ``[p*B/P, (p+1)*B/P)`` of it,
so one process and many processes see exactly the same global batches. The iterator's state is
one integer (batches consumed), saved with every checkpoint, so a resumed run continues with the
very next batch. ``tensorflow_datasets`` and ``grain`` are imported only when a pipeline is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Iterator

import numpy as np

from train.preprocess import parse_pp

__all__ = ["DatasetInfo", "open_source", "TrainIterator", "eval_batches", "load_digits_split", "DIGITS_SPLITS"]

DIGITS_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a split."""

    name: str
    split: str
    num_examples: int
    num_classes: int


class ArraySource:
    """Random-access records over in-memory arrays: ``source[i] -> {"image", "label"}``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}

    def __repr__(self) -> str:
        return f"ArraySource({len(self)} examples)"


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8, 1), labels int32, is_test bool): the fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the embedded 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    rng = np.random.Generator(np.random.PCG64(1797))
    is_test = np.zeros(len(labels), bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_test[idx[: round(0.2 * len(idx))]] = True
    return images, labels, is_test


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 8, 8, 1), labels int32 (N,))`` of the fixed ``train`` / ``test`` split."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f"embedded dataset 'digits' has splits {DIGITS_SPLITS}, got {split!r}")
    images, labels, is_test = _digits_arrays()
    keep = is_test if split == "test" else ~is_test
    return images[keep], labels[keep]


EMBEDDED = {"digits": (load_digits_split, 10)}


def _open_tfds(name: str, split: str, data_dir: str | None, label_key: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("input.source='tfds' needs tensorflow-datasets (pip install tensorflow-datasets "
                          "grain); building a dataset the first time also needs tensorflow") from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        names = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split(":")[0].split("/")[0], names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"input.dataset: tensorflow_datasets knows no dataset {name!r}{hint}") from None
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds; all mean "not readable here"
        raise ValueError(
            f"input.dataset: cannot read tfds dataset {name!r} split {split!r} from data_dir={data_dir!r}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Prepare it once in ArrayRecord "
            f"format, e.g. `tfds build {name} --file_format=array_record"
            f"{' --data_dir=' + data_dir if data_dir else ''}` (needs tensorflow).") from None
    feature = builder.info.features[label_key] if label_key in builder.info.features else None
    num_classes = getattr(feature, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"tfds dataset {name!r} has no class label feature {label_key!r} "
                         f"(features: {list(builder.info.features)})")
    return source, int(num_classes)


def open_source(input_config: Any, split: str) -> tuple[Any, DatasetInfo]:
    """The random-access source and its ``DatasetInfo`` for ``config.input`` and ``split``."""
    kind, name = input_config.source, input_config.dataset
    if kind == "embedded":
        if name not in EMBEDDED:
            raise ValueError(f"input.dataset: no embedded dataset {name!r}; embedded: {sorted(EMBEDDED)} "
                             f"(or set input.source='tfds')")
        load, num_classes = EMBEDDED[name]
        source = ArraySource(*load(split))
    elif kind == "tfds":
        source, num_classes = _open_tfds(name, split, input_config.get("data_dir") or None,
                                         input_config.get("label_key", "label"))
    else:
        raise ValueError(f"input.source must be 'embedded' or 'tfds', got {kind!r}")
    if len(source) == 0:
        raise ValueError(f"input: {name!r} split {split!r} is empty")
    return source, DatasetInfo(name, split, len(source), num_classes)


def _check_batch(global_batch: int, process_count: int, what: str) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"{what}={global_batch} must be a positive multiple of the {process_count} host(s)")
    return global_batch // process_count


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless host-local training batches; ``position`` (batches consumed) is the whole state."""

    def __init__(self, source: Any, pp: str, *, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1, num_threads: int = 2, prefetch: int = 4, position: int = 0,
                 image_key: str = "image", label_key: str = "label"):
        import grain

        local = _check_batch(global_batch, process_count, "batch_size")
        transform = parse_pp(pp, image_key=image_key, label_key=label_key)
        stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None).random_map(transform, seed=seed + 1)
        self._batches = stream.batch(local, drop_remainder=True)[process_index::process_count]
        self._options = grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=max(1, prefetch))
        self.position = position
        self._iter = None

    def _start(self) -> None:
        self._iter = iter(self._batches[self.position:].to_iter_dataset(self._options))

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iter is None:
            self._start()
        batch = next(self._iter)
        self.position += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"position": int(self.position)}

    def set_state(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
        self._iter = None


class _Padded:
    """``source`` padded to ``length`` examples; padding repeats example 0 with ``mask`` 0."""

    def __init__(self, source: Any, length: int):
        self.source, self.length = source, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        real = index < len(self.source)
        return {**self.source[index if real else 0], "mask": np.float32(real)}


def eval_batches(source: Any, pp: str, *, global_batch: int, process_index: int = 0, process_count: int = 1,
                 num_threads: int = 2, image_key: str = "image", label_key: str = "label"
                 ) -> Iterator[dict[str, np.ndarray]]:
    """One pass over ``source`` in host-local batches with a ``mask`` (0 marks padding), so every
    example counts exactly once and every batch has the same shape (one compilation)."""
    import grain

    local = _check_batch(global_batch, process_count, "eval_batch_size")
    n = -(-len(source) // global_batch) * global_batch
    transform = parse_pp(pp, image_key=image_key, label_key=label_key)

    def with_mask(ex, rng):
        return {**transform.random_map(ex, rng), "mask": ex["mask"]}

    ds = grain.MapDataset.source(_Padded(source, n)).random_map(with_mask, seed=0)
    ds = ds.batch(local)[process_index::process_count]
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=2)))
