"""Input pipelines: random-access sources + grain transforms, typed named fields, deterministic,
sharded per host.

Records and batches are dicts of named arrays, each with its own dtype and per-example shape: an
image task reads ``{"image": float32 (H, W, C), "label": int32 ()}``, a text task e.g.
``{"input_ids": int32 (L,), "attention_mask": int32 (L,), "labels": int32 (L,)}``. The task declares
the fields it reads (``Task.fields``: name -> ``Field(dtype, shape)``); every example leaving the
preprocessing is *conformed* to that declaration: exactly the declared fields are kept (anything
else the source carries is dropped), each must have its declared rank and sizes (``None`` = any
size, fixed by the data's first example, see ``resolve_fields``) and its declared dtype. The only
conversions made are exact ones: integer (or bool) -> another integer type when every value fits
(tfds labels are int64); anything else (float ids, uint8 images, an out-of-range value) is a
``FieldError`` naming the field, the expected and the received dtype/shape. So token ids travel as
integers end to end, never through a float.

Sources (``config.input.source``):

* ``"embedded"``: datasets that ship inside an installed package, so training needs no download
  (``EMBEDDED``: name -> ``(load(split) -> {field: array (N, ...)}, num_classes)``).
  ``digits`` is scikit-learn's handwritten digits (1,797 real 8x8 grey scans of 0-9, from the UCI
  optical-recognition set), split once and for all into 1,438 train / 359 test images (stratified,
  20% of each class, fixed numpy PCG64 seed); ``train/tasks_text.py`` adds the text datasets.
* ``"tfds"``: ``tfds.data_source(name, split, data_dir)`` for any prepared TFDS dataset (ArrayRecord
  format; reading needs no TensorFlow): imagenet2012, cifar10, mnist, ...

Order: the global example stream is ``source -> shuffle(seed) -> repeat -> preprocess -> conform``,
reshuffled every epoch, with per-example randomness derived from the seed and the position. Global
batch ``i`` is stream positions ``[i*B, (i+1)*B)``; host ``p`` of ``P`` reads rows
``[p*B/P, (p+1)*B/P)`` of it, so one process and many processes see exactly the same global
batches. The iterator's state is the number of batches consumed plus the fields they hold, saved
with every checkpoint, so a resumed run continues with the very next batch (and a run whose fields
changed is refused). ``tensorflow_datasets`` and ``grain`` are imported only when a pipeline is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Iterator, Mapping

import numpy as np

from train.preprocess import parse_pp

__all__ = ["Field", "Fields", "FieldError", "DatasetInfo", "ArraySource", "open_source", "resolve_fields",
           "conform", "TrainIterator", "eval_batches", "load_digits_split", "DIGITS_SPLITS", "EMBEDDED"]

DIGITS_SPLITS = ("train", "test")
EVAL_MASK = "mask"  # added by eval_batches: 1 for real examples, 0 for padding (a reserved field name)


@dataclasses.dataclass(frozen=True)
class Field:
    """One named array of every example: its dtype and per-example shape (the batch adds a leading
    axis). ``None`` in ``shape`` is a size the data decides (e.g. image height), fixed for the run
    by the first example (``resolve_fields``)."""

    dtype: Any
    shape: tuple[int | None, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(None if d is None else int(d) for d in self.shape))

    def describe(self) -> str:
        return f"{self.dtype.name} {_shape_str(self.shape)}"

    def to_json(self) -> list:
        return [self.dtype.name, list(self.shape)]


Fields = Mapping[str, Field]


class FieldError(ValueError):
    """Data that does not match the fields the task declares (missing field, dtype or shape)."""


def _shape_str(shape) -> str:
    return "(" + ", ".join("*" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _fits(value: np.ndarray, dtype: np.dtype) -> bool:
    """An exact conversion: integer/bool -> integer with every value representable."""
    if not (np.issubdtype(dtype, np.integer) and (value.dtype == bool or np.issubdtype(value.dtype, np.integer))):
        return False
    if value.size == 0 or value.dtype == bool:
        return True
    info = np.iinfo(dtype)
    return info.min <= value.min() and value.max() <= info.max


def conform(example: Mapping[str, Any], fields: Fields, what: str = "the data") -> dict[str, np.ndarray]:
    """``example`` reduced to exactly ``fields``, each checked against its declared shape and dtype
    (exact integer conversions only, see the module docstring). Raises ``FieldError`` naming the
    field, what the task expects and what ``what`` gave."""
    out = {}
    for name, field in fields.items():
        if name not in example:
            raise FieldError(f"field {name!r}: the task expects {field.describe()} but {what} has no field {name!r} "
                             f"(its fields: {sorted(example)})")
        value = np.asarray(example[name])
        shape_ok = value.ndim == len(field.shape) and all(e is None or e == g for e, g in zip(field.shape, value.shape))
        if not shape_ok or (value.dtype != field.dtype and not _fits(value, field.dtype)):
            hint = ""
            if value.dtype == np.uint8 and np.issubdtype(field.dtype, np.floating):
                hint = " (convert images with a value_range(...) or normalize op at the end of the pp)"
            elif shape_ok and np.issubdtype(field.dtype, np.integer) and np.issubdtype(value.dtype, np.integer):
                hint = (f" holding values in [{value.min()}, {value.max()}], outside {field.dtype.name}'s range "
                        f"(integers convert only exactly)")
            elif shape_ok and np.issubdtype(field.dtype, np.integer):
                hint = " (ids and labels must stay integers end to end, never pass through floats)"
            raise FieldError(f"field {name!r}: the task expects {field.describe()} per example, {what} gives "
                             f"{value.dtype.name} {_shape_str(value.shape)}{hint}")
        out[name] = value if value.dtype == field.dtype else value.astype(field.dtype)
    return out


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a split."""

    name: str
    split: str
    num_examples: int
    num_classes: int


class ArraySource:
    """Random-access records over in-memory arrays: ``source[i] -> {name: arrays[name][i]}``."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise ValueError(f"ArraySource needs one or more arrays of equal length, got lengths {lengths}")
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}

    def __repr__(self) -> str:
        return f"ArraySource({len(self)} examples: {', '.join(f'{k} {v.dtype.name}' for k, v in self.arrays.items())})"


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


def _digits_fields(split: str) -> dict[str, np.ndarray]:
    images, labels = load_digits_split(split)
    return {"image": images, "label": labels}


# name -> (load(split) -> {field: array with a leading example axis} or a random-access source
# (``len`` + ``[i]``), number of classes or 0)
EMBEDDED = {"digits": (_digits_fields, 10)}


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
        loaded = load(split)  # arrays, or a random-access source (e.g. a generated data set)
        source = ArraySource(loaded) if isinstance(loaded, Mapping) else loaded
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


def _example_transform(pp: str, fields: Fields, what: str):
    """The parsed ``pp`` followed by ``conform(fields)``, as one grain transform."""
    import grain

    preprocess = parse_pp(pp)

    class Example(grain.transforms.RandomMap):
        def random_map(self, element: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
            return conform(preprocess.random_map(element, rng), fields, what)

        def __repr__(self) -> str:
            return f"Example({pp!r} -> {', '.join(fields)})"

    return Example()


def resolve_fields(fields: Fields, source: Any, pp: str, what: str = "the data") -> dict[str, Field]:
    """``fields`` with every ``None`` size replaced by the first preprocessed example's, after
    checking that example against them: a bad ``pp`` or data that does not match the task fails
    here, with a message naming the field, before anything is compiled."""
    if not fields:
        raise FieldError("the task declares no batch fields (Task.fields: name -> Field(dtype, shape))")
    if EVAL_MASK in fields:
        raise FieldError(f"field {EVAL_MASK!r} is reserved for the eval padding mask; rename the task's field")
    example = _example_transform(pp, fields, what).random_map(source[0], np.random.default_rng(0))
    return {name: Field(field.dtype, example[name].shape) for name, field in fields.items()}


def _fields_json(fields: Fields) -> dict[str, list]:
    return {name: field.to_json() for name, field in fields.items()}


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless host-local training batches of exactly the task's ``fields``, each (local_batch,
    *shape) of its dtype; ``self.fields`` holds them resolved (``resolve_fields``: a mismatch fails
    here, when the iterator is built). The state is ``position`` (batches consumed) and the fields,
    checked on restore."""

    def __init__(self, source: Any, pp: str, *, fields: Fields, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1, num_threads: int = 2, prefetch: int = 4,
                 position: int = 0, what: str = "the training data"):
        import grain

        local = _check_batch(global_batch, process_count, "batch_size")
        self.fields = resolve_fields(fields, source, pp, what)
        transform = _example_transform(pp, self.fields, what)
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

    def get_state(self) -> dict[str, Any]:
        return {"position": int(self.position), "fields": _fields_json(self.fields)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue after ``state["position"]`` batches; a state saved for other fields is refused
        (states without fields, from older checkpoints, are accepted)."""
        saved = state.get("fields")
        if saved is not None and saved != _fields_json(self.fields):
            now = _fields_json(self.fields)
            diff = [f"{k!r}: checkpoint {tuple(saved[k]) if k in saved else 'absent'} vs now "
                    f"{tuple(now[k]) if k in now else 'absent'}"
                    for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
            raise FieldError(f"the checkpoint's data position counts batches of other fields ({'; '.join(diff)}); "
                             f"use a new --workdir or the original data settings")
        self.position = int(state["position"])
        self._iter = None


class _Padded:
    """``source`` padded to ``length`` examples; padding repeats example 0."""

    def __init__(self, source: Any, length: int):
        self.source, self.length = source, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, np.float32]:
        real = index < len(self.source)
        return self.source[index if real else 0], np.float32(real)


def eval_batches(source: Any, pp: str, *, fields: Fields, global_batch: int, process_index: int = 0,
                 process_count: int = 1, num_threads: int = 2, what: str = "the eval data"
                 ) -> Iterator[dict[str, np.ndarray]]:
    """One pass over ``source`` in host-local batches of ``fields`` (resolved as in ``TrainIterator``)
    plus ``"mask"`` (float32, 0 marks padding), so every example counts exactly once and every batch
    has the same shape (one compilation)."""
    import grain

    local = _check_batch(global_batch, process_count, "eval_batch_size")
    fields = resolve_fields(fields, source, pp, what)
    n = -(-len(source) // global_batch) * global_batch
    transform = _example_transform(pp, fields, what)

    def with_mask(element, rng):
        ex, real = element
        return {**transform.random_map(ex, rng), EVAL_MASK: real}

    ds = grain.MapDataset.source(_Padded(source, n)).random_map(with_mask, seed=0)
    ds = ds.batch(local)[process_index::process_count]
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=2)))
