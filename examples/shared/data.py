"""Datasets for the example applications: one loader per source, as NumPy arrays.

:func:`load_dataset` reads a whole dataset into memory as a :class:`Dataset`
(NHWC images, int32 labels). Sources, chosen by a spec string:

* ``digits`` / ``digits-lt``: scikit-learn's 8x8 digits, bundled with
  scikit-learn (no download), with a fixed stratified train/test split.
* ``cifar10`` / ``cifar100`` / ``mnist`` / ``fashion_mnist`` and the long-tailed
  ``cifar10-lt`` / ``cifar100-lt``: TensorFlow Datasets, read with
  ``tfds.data_source`` from prepared ``array_record`` files. Reading needs no
  TensorFlow; *preparing* (download + conversion) does, so when the data is
  missing the loader fails fast with instructions instead of retrying a
  download for minutes.
* ``folder:PATH``: ``PATH/{train,test}/<class name>/*.png|jpg|jpeg``.
* ``npz:FILE``: arrays ``x_train, y_train, x_test, y_test`` (and optionally
  ``class_names``).

Any source can be made long-tailed (``imbalance_ratio``); the test set is never
touched. :func:`iterate_batches` and :func:`iterate_eval_batches` cut the
arrays into batches deterministically, with per-process slices for multi-host
data parallelism.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from imbsam_jax._priors import long_tail_counts

#: Imbalance ratio of the ``-lt`` specs when none is given (CIFAR-LT's usual
#: 100; on digits it leaves 119, 71, 42, 25, 15, 9, 5, 3, 1, 1 training images).
DEFAULT_LT_IMBALANCE_RATIO = 100.0

#: Seed and per-class test fraction of the fixed digits train/test split.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 1 / 3

# spec -> TFDS dataset name.
_TFDS_SPECS = {
  "cifar10": "cifar10",
  "cifar10-lt": "cifar10",
  "cifar100": "cifar100",
  "cifar100-lt": "cifar100",
  "mnist": "mnist",
  "fashion_mnist": "fashion_mnist",
}
_DIGITS_SPECS = ("digits", "digits-lt")
# Where each TFDS builder downloads from: (scheme, host).
_DOWNLOAD_HOSTS = {
  "cifar10": ("https", "www.cs.toronto.edu"),
  "cifar100": ("https", "www.cs.toronto.edu"),
  "mnist": ("https", "storage.googleapis.com"),
  "fashion_mnist": ("http", "fashion-mnist.s3-website.eu-central-1.amazonaws.com"),
}
_REACHABILITY_TIMEOUT_S = 3.0
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class Dataset(NamedTuple):
  """A dataset held in memory.

  Attributes:
    x_train: ``(N, H, W, C)`` images, uint8 in [0, 255] (float32 only for
      ``npz:`` files that store floats).
    y_train: ``(N,)`` int32 labels in ``[0, num_classes)``.
    x_test: ``(M, H, W, C)`` test images, same dtype and image shape.
    y_test: ``(M,)`` int32 test labels.
    num_classes: number of classes.
    class_names: one name per class.
    name: short display name (the spec for built-in sources, the file or
      folder name for ``npz:`` / ``folder:``).
    imbalance_ratio: the ratio used to subsample the training set (1: as is).
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  name: str
  imbalance_ratio: float = 1.0

  def __repr__(self) -> str:
    return (
      f"Dataset(name={self.name!r}, x_train={self.x_train.shape}"
      f" {self.x_train.dtype}, x_test={self.x_test.shape}"
      f" {self.x_test.dtype}, num_classes={self.num_classes},"
      f" imbalance_ratio={self.imbalance_ratio:g})"
    )


def valid_specs() -> tuple[str, ...]:
  """The dataset specs :func:`load_dataset` accepts (prefix specs end in ':')."""
  return (*_DIGITS_SPECS, *_TFDS_SPECS, "folder:PATH", "npz:FILE")


def check_spec(spec: str) -> None:
  """Raises a ValueError unless ``spec`` names a source (and its path exists).

  Example:
    >>> check_spec("digits-lt")
    >>> check_spec("svhn")
    Traceback (most recent call last):
    ...
    ValueError: unknown dataset 'svhn'; valid: digits, digits-lt, cifar10, ...
  """
  if spec in _DIGITS_SPECS or spec in _TFDS_SPECS:
    return
  for prefix, exists in (("folder:", Path.is_dir), ("npz:", Path.is_file)):
    if spec.startswith(prefix):
      path = Path(spec.removeprefix(prefix))
      if not exists(path):
        kind = "directory" if prefix == "folder:" else "file"
        raise ValueError(f"{prefix} {path} is not an existing {kind}")
      return
  raise ValueError(f"unknown dataset {spec!r}; valid: {', '.join(valid_specs())}")


def load_dataset(
  spec: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  imbalance_ratio: float | None = None,
) -> Dataset:
  """Loads a dataset by spec, optionally long-tailing its training set.

  Args:
    spec: one of :func:`valid_specs`: ``digits``, ``digits-lt``, ``cifar10``,
      ``cifar10-lt``, ``cifar100``, ``cifar100-lt``, ``mnist``,
      ``fashion_mnist``, ``folder:PATH`` or ``npz:FILE``.
    data_dir: TFDS data directory (default: TFDS's own, ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``). Ignored by the other sources.
    imbalance_ratio: ``n_max / n_min`` of the exponential profile applied to
      the training set with :func:`make_long_tailed`. ``None`` means
      :data:`DEFAULT_LT_IMBALANCE_RATIO` for ``-lt`` specs and 1 (keep the
      training set as is) otherwise. The test set is never subsampled.

  Returns:
    A :class:`Dataset`.

  Raises:
    ValueError: unknown spec, or malformed ``folder:`` / ``npz:`` data.
    RuntimeError: a TFDS dataset is not prepared and cannot be prepared here
      (no TensorFlow or no network); the message says what to do.

  Example:
    >>> ds = load_dataset("digits-lt")
    >>> ds.x_train.shape, ds.x_train.dtype, ds.x_test.shape, ds.imbalance_ratio
    ((291, 8, 8, 1), dtype('uint8'), (599, 8, 8, 1), 100.0)
    >>> class_counts(ds.y_train, ds.num_classes).tolist()
    [119, 71, 42, 25, 15, 9, 5, 3, 1, 1]
  """
  check_spec(spec)
  if spec in _DIGITS_SPECS:
    arrays, class_names, name = _load_digits(), tuple(map(str, range(10))), spec
  elif spec in _TFDS_SPECS:
    *arrays, class_names = _load_tfds(_TFDS_SPECS[spec], data_dir)
    name = spec
  elif spec.startswith("folder:"):
    path = Path(spec.removeprefix("folder:"))
    *arrays, class_names = _load_folder(path)
    name = path.resolve().name
  else:
    path = Path(spec.removeprefix("npz:"))
    *arrays, class_names = _load_npz(path)
    name = path.stem
  x_train, y_train, x_test, y_test = arrays
  num_classes = len(class_names)
  if imbalance_ratio is None:
    lt = spec.endswith("-lt")
    imbalance_ratio = DEFAULT_LT_IMBALANCE_RATIO if lt else 1.0
  x_train, y_train = make_long_tailed(
    x_train, y_train, imbalance_ratio, num_classes=num_classes
  )
  return Dataset(
    x_train=x_train,
    y_train=y_train,
    x_test=x_test,
    y_test=y_test,
    num_classes=num_classes,
    class_names=tuple(class_names),
    name=name,
    imbalance_ratio=float(imbalance_ratio),
  )


def to_float(x: Any, mean: Any = None, std: Any = None) -> Any:
  """Converts images to float32 for a model: uint8 is divided by 255.

  .. math::
    x' = (x / 255 - \\mu) / \\sigma

  Float images are only cast. Works on NumPy and JAX arrays, inside ``jit``
  too (keep uint8 on the device and convert in the step).

  Args:
    x: images, uint8 in [0, 255] or float.
    mean: optional per-channel mean (broadcast against the last axis),
      subtracted after scaling.
    std: optional per-channel standard deviation, divided by after that.

  Returns:
    A float32 array of the same shape and kind (NumPy or JAX) as ``x``.

  Example:
    >>> import numpy as np
    >>> to_float(np.array([0, 51, 255], np.uint8)).tolist()
    [0.0, 0.20000000298023224, 1.0]
    >>> to_float(np.array([0, 255], np.uint8), mean=0.5, std=0.5).tolist()
    [-1.0, 1.0]
  """
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / np.float32(255.0)
  else:
    x = x.astype(np.float32)
  if mean is not None:
    x = x - np.asarray(mean, np.float32)
  if std is not None:
    x = x / np.asarray(std, np.float32)
  return x


def class_counts(y: Any, num_classes: int) -> np.ndarray:
  """Number of examples of each class.

  Args:
    y: 1-D integer labels in ``[0, num_classes)``.
    num_classes: number of classes ``C``.

  Returns:
    An int64 array of shape ``(C,)``.

  Example:
    >>> class_counts([0, 2, 2, 1, 2], 4).tolist()
    [1, 1, 3, 0]
  """
  y = _as_labels(y, "labels")
  if y.size and y.max() >= num_classes:
    raise ValueError(
      f"labels must be < num_classes={num_classes}, found {int(y.max())}."
    )
  return np.bincount(y, minlength=num_classes).astype(np.int64)


def make_long_tailed(
  x: np.ndarray,
  y: np.ndarray,
  imbalance_ratio: float,
  *,
  num_classes: int | None = None,
  max_count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Subsamples a dataset to the exponential long-tail profile.

  Class ``c`` keeps its first ``n_c`` examples in dataset order, as in the
  ImbSAM reference code (LDAM-DRW's ``gen_imbalanced_data`` with its shuffle
  removed), with

  .. math::
    n_c = \\min\\big(\\lfloor n_{max} \\cdot \\mathrm{IR}^{-c / (C - 1)}
    \\rfloor,\\ \\text{available}_c\\big)

  and ``n_max`` = the number of examples of class 0 (the head class keeps all
  its images; on balanced data such as CIFAR this is every class's count). The
  kept examples stay in their original relative order.

  Args:
    x: examples, indexed along the first axis.
    y: 1-D integer labels.
    imbalance_ratio: ``IR = n_max / n_min`` (>= 1). ``1`` returns the inputs
      unchanged (unless ``max_count`` is given).
    num_classes: ``C`` (default ``max(y) + 1``).
    max_count: ``n_max`` (default: the count of class 0).

  Returns:
    ``(x, y)`` restricted to the kept examples.

  Example:
    >>> import numpy as np
    >>> y = np.repeat(np.arange(3), 4)  # 4 examples per class
    >>> x = np.arange(12)
    >>> x_lt, y_lt = make_long_tailed(x, y, imbalance_ratio=4)
    >>> y_lt.tolist(), x_lt.tolist()
    ([0, 0, 0, 0, 1, 1, 2], [0, 1, 2, 3, 4, 5, 8])
  """
  y = _as_labels(y, "y")
  if len(x) != len(y):
    raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}.")
  if num_classes is None:
    num_classes = int(y.max()) + 1 if y.size else 0
  counts = class_counts(y, num_classes)
  if imbalance_ratio == 1 and max_count is None:
    return x, y
  if max_count is None:
    max_count = int(counts[0])
    if max_count == 0:
      raise ValueError("Class 0 has no examples; pass max_count explicitly.")
  target = np.minimum(long_tail_counts(max_count, num_classes, imbalance_ratio), counts)
  # Rank of each example among the examples of its class, in dataset order.
  by_class = np.argsort(y, kind="stable")
  class_start = np.cumsum(counts) - counts
  rank = np.empty(len(y), np.int64)
  rank[by_class] = np.arange(len(y)) - np.repeat(class_start, counts)
  keep = rank < target[y]
  return x[keep], y[keep]


def steps_per_epoch(
  num_examples: int, batch_size: int, *, drop_remainder: bool = True
) -> int:
  """Number of batches :func:`iterate_batches` yields per epoch.

  Example:
    >>> steps_per_epoch(10, 4), steps_per_epoch(10, 4, drop_remainder=False)
    (2, 3)
  """
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def iterate_batches(
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
  *,
  seed: int,
  epoch: int,
  shuffle: bool = True,
  drop_remainder: bool = True,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields one epoch of training batches, deterministically.

  The order is ``np.random.default_rng((seed, epoch)).permutation(N)``: the same
  on every process and every run, different each epoch. For multi-host data
  parallelism ``batch_size`` is the *global* batch size: every process walks
  the same global batches and takes its contiguous slice
  ``[process_index * B / P, (process_index + 1) * B / P)``, so the slices of
  all processes partition each global batch.

  Args:
    x: ``(N, ...)`` examples.
    y: ``(N,)`` labels.
    batch_size: global batch size ``B``, a multiple of ``process_count``.
    seed: base seed of the shuffle.
    epoch: epoch number, mixed into the seed.
    shuffle: if False, batches follow dataset order.
    drop_remainder: drop the last ``N mod B`` examples (every batch then has
      the same shape). If False the last, smaller batch is split across
      processes with ``np.array_split`` (slices may differ by one example);
      use :func:`iterate_eval_batches` for fixed shapes.
    process_index: this process's index (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).

  Yields:
    ``(x_batch, y_batch)`` NumPy arrays with ``B / P`` examples each.

  Example:
    >>> import numpy as np
    >>> x = np.arange(10)
    >>> [b.tolist() for b, _ in iterate_batches(x, x, 4, seed=0, epoch=0,
    ...                                          shuffle=False)]
    [[0, 1, 2, 3], [4, 5, 6, 7]]
  """
  n = _check_batching(x, y, batch_size, process_index, process_count)
  if drop_remainder and batch_size > n:
    raise ValueError(
      f"batch_size={batch_size} exceeds the {n} examples, so"
      " drop_remainder=True would yield no batch."
    )
  if shuffle:
    order = np.random.default_rng((seed, epoch)).permutation(n)
  else:
    order = np.arange(n)
  for step in range(steps_per_epoch(n, batch_size, drop_remainder=drop_remainder)):
    global_batch = order[step * batch_size : (step + 1) * batch_size]
    idx = np.array_split(global_batch, process_count)[process_index]
    yield x[idx], y[idx]


def iterate_eval_batches(
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields evaluation batches in order, all of one shape, with a validity mask.

  The last global batch is padded with zeros (images and labels) to
  ``batch_size`` so a jitted eval step compiles once; ``valid`` is False on the
  padding. Processes take contiguous slices of each global batch, as in
  :func:`iterate_batches`.

  Args:
    x: ``(N, ...)`` examples.
    y: ``(N,)`` labels.
    batch_size: global batch size ``B``, a multiple of ``process_count``.
    process_index: this process's index.
    process_count: number of processes.

  Yields:
    ``(x_batch, y_batch, valid)`` with ``B / P`` rows each; ``valid`` is bool.

  Example:
    >>> import numpy as np
    >>> x = np.arange(1, 6)
    >>> for xb, yb, valid in iterate_eval_batches(x, x, 4):
    ...   print(xb.tolist(), valid.tolist())
    [1, 2, 3, 4] [True, True, True, True]
    [5, 0, 0, 0] [True, False, False, False]
  """
  n = _check_batching(x, y, batch_size, process_index, process_count)
  x, y = np.asarray(x), np.asarray(y)
  local = batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  for start in range(0, n, batch_size):
    size = min(batch_size, n - start)
    x_batch = np.zeros((batch_size, *x.shape[1:]), x.dtype)
    y_batch = np.zeros((batch_size, *y.shape[1:]), y.dtype)
    x_batch[:size] = x[start : start + size]
    y_batch[:size] = y[start : start + size]
    valid = np.arange(batch_size) < size
    yield x_batch[rows], y_batch[rows], valid[rows]


def _check_batching(
  x: Any, y: Any, batch_size: int, process_index: int, process_count: int
) -> int:
  """Validates batching arguments; returns the number of examples."""
  if len(x) != len(y):
    raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"Need 0 <= process_index < process_count, got {process_index}, {process_count}."
    )
  if batch_size % process_count:
    raise ValueError(
      f"The global batch_size={batch_size} must be a multiple of"
      f" process_count={process_count}."
    )
  return len(x)


def _as_labels(y: Any, what: str) -> np.ndarray:
  """Validates 1-D non-negative integer labels; returns them as int32."""
  y = np.asarray(y)
  if y.ndim != 1:
    raise ValueError(f"{what} must be 1-D, got shape {y.shape}.")
  if y.size == 0:
    return y.astype(np.int32)
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{what} must be integers, got dtype {y.dtype}.")
  if y.min() < 0:
    raise ValueError(f"{what} must be non-negative, found {int(y.min())}.")
  return y.astype(np.int32)


# ----------------------------------------------------------------- digits


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn digits as uint8 (values 0..16 scaled by 255/16 and rounded).

  The split is stratified and fixed: with ``DIGITS_SPLIT_SEED``, each class
  sends ``round(n_c * DIGITS_TEST_FRACTION)`` random images to the test set
  (1198 train / 599 test); both sets keep the original order.
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(DIGITS_SPLIT_SEED)
  is_test = np.zeros(len(y), bool)
  for c in range(10):
    members = np.flatnonzero(y == c)
    n_test = round(len(members) * DIGITS_TEST_FRACTION)
    is_test[rng.permutation(members)[:n_test]] = True
  return x[~is_test], y[~is_test], x[is_test], y[is_test]


# ------------------------------------------------------------------- TFDS


def _load_tfds(
  name: str, data_dir: str | os.PathLike[str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
  """Reads a prepared TFDS dataset's train and test splits into memory."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
      f"Loading {name!r} needs tensorflow-datasets: pip install 'imbsam_jax[examples]'."
    ) from e
  data_dir = None if data_dir is None else os.fspath(data_dir)
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    _check_can_prepare(name, builder.data_dir)
  try:
    train, test = tfds.data_source(
      name,
      split=["train", "test"],
      data_dir=data_dir,
      builder_kwargs={"file_format": "array_record"},
    )
  except NotImplementedError as e:  # Prepared, but not as array_record.
    raise RuntimeError(
      f"TFDS dataset {name!r} in {builder.data_dir} was prepared in a format"
      " without random access. Rebuild it with `tfds build"
      f" {name} --file_format=array_record` (needs TensorFlow) or use another"
      " data_dir."
    ) from e
  # The data source's info: class names are only known once prepared.
  info = getattr(train, "dataset_info", builder.info)
  class_names = tuple(info.features["label"].names)
  return (*_read_split(train), *_read_split(test), class_names)


def _read_split(source: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a TFDS data source into ``(images, labels)`` in original order.

  TFDS shuffles examples when it prepares a dataset. Where examples carry an
  ``id`` such as CIFAR's ``train_00042``, the original file order is restored
  by sorting on it, so that "the first n_c images of a class" means the same
  images as in the reference code.
  """
  n = len(source)
  if n == 0:
    raise ValueError("TFDS split is empty.")
  first = source[0]
  images = np.empty((n, *np.shape(first["image"])), np.uint8)
  labels = np.empty(n, np.int32)
  ids = []
  for i in range(n):
    example = first if i == 0 else source[i]
    images[i] = example["image"]
    labels[i] = example["label"]
    if "id" in example:
      ids.append(example["id"])
  if len(ids) == n:
    order = np.argsort(np.asarray(ids), kind="stable")
    images, labels = images[order], labels[order]
  return images, labels


def _tensorflow_available() -> bool:
  """Whether TensorFlow (needed to prepare TFDS data) can be imported."""
  return importlib.util.find_spec("tensorflow") is not None


def _host_reachable(host: str, port: int, timeout: float) -> bool:
  """Whether a TCP connection to ``host:port`` opens within ``timeout`` s."""
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def _download_endpoint(name: str) -> tuple[str, int]:
  """``(host, port)`` a download of ``name`` connects to first (proxy aware)."""
  scheme, host = _DOWNLOAD_HOSTS.get(name, ("https", "storage.googleapis.com"))
  proxy = urllib.request.getproxies().get(scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if parts.hostname:
      return parts.hostname, parts.port or 80
  return host, 443 if scheme == "https" else 80


def _check_can_prepare(name: str, path: Any) -> None:
  """Raises a RuntimeError with instructions unless ``name`` can be prepared.

  Preparing needs TensorFlow and the download host. Both are checked in a few
  seconds, instead of letting a doomed download retry for minutes.
  """
  if not _tensorflow_available():
    reason = (
      "preparing TFDS data needs TensorFlow, which is not installed (reading"
      " prepared data does not need it)"
    )
  else:
    host, port = _download_endpoint(name)
    if _host_reachable(host, port, _REACHABILITY_TIMEOUT_S):
      return
    reason = (
      f"its download host {host}:{port} is unreachable (no connection within"
      f" {_REACHABILITY_TIMEOUT_S:g} s)"
    )
  raise RuntimeError(
    f"TFDS dataset {name!r} is not prepared in {path} and cannot be prepared"
    f" here: {reason}. Either\n"
    "  * on a machine with internet, run `pip install"
    f" 'imbsam_jax[tfds-prepare]'` and `tfds build {name}"
    " --file_format=array_record`, then copy ~/tensorflow_datasets (or the"
    " --data_dir you built into) to this machine and pass its location as"
    " data_dir (or set TFDS_DATA_DIR); or\n"
    "  * use a local copy of the data as `npz:FILE` (arrays x_train, y_train,"
    " x_test, y_test) or `folder:PATH` (PATH/train/<class>/*.png,"
    " PATH/test/<class>/*.png)."
  )


# ---------------------------------------------------------------- folder:


def _load_folder(
  root: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
  """Reads ``root/{train,test}/<class>/*.{png,jpg,jpeg}`` (classes sorted).

  Files are read in sorted order within each class, classes in sorted order.
  Other files are ignored. Grayscale images become ``H x W x 1``; if any image
  has colour, all become RGB. All images must share one size.
  """
  splits = {}
  for split in ("train", "test"):
    split_dir = root / split
    if not split_dir.is_dir():
      raise ValueError(
        f"folder: dataset {root} has no {split}/ directory; expected"
        f" {root}/{{train,test}}/<class name>/*.png|jpg|jpeg."
      )
    splits[split] = sorted(
      p.name for p in split_dir.iterdir() if p.is_dir() and p.name[0] != "."
    )
  class_names = tuple(splits["train"])
  if not class_names:
    raise ValueError(f"folder: dataset {root}/train has no class directories.")
  unknown = sorted(set(splits["test"]) - set(class_names))
  if unknown:
    raise ValueError(
      f"folder: dataset {root}/test has classes missing from train: {unknown}."
    )
  files, labels = {}, {}
  for split in ("train", "test"):
    files[split], labels[split] = [], []
    for label, class_name in enumerate(class_names):
      class_dir = root / split / class_name
      if not class_dir.is_dir():
        continue
      found = sorted(
        p for p in class_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
      )
      files[split] += found
      labels[split] += [label] * len(found)
    if not files[split]:
      raise ValueError(f"folder: dataset {root}/{split} contains no images.")
  images = _read_images(files["train"] + files["test"])
  n_train = len(files["train"])
  return (
    images[:n_train],
    np.asarray(labels["train"], np.int32),
    images[n_train:],
    np.asarray(labels["test"], np.int32),
    class_names,
  )


def _read_images(files: list[Path]) -> np.ndarray:
  """Reads image files into one uint8 ``(N, H, W, C)`` array, C in {1, 3}."""
  from PIL import Image

  arrays, size = [], None
  for path in files:
    with Image.open(path) as image:
      if size is None:
        size, first = image.size, path
      elif image.size != size:
        raise ValueError(
          f"Image {path} is {image.size[0]}x{image.size[1]} but {first} is"
          f" {size[0]}x{size[1]}; all images of a folder: dataset must have"
          " the same size (resize them first)."
        )
      gray = image.mode in ("1", "L", "LA", "I", "I;16", "F")
      arrays.append(np.asarray(image.convert("L" if gray else "RGB")))
  if any(a.ndim == 3 for a in arrays):
    arrays = [a if a.ndim == 3 else np.repeat(a[..., None], 3, -1) for a in arrays]
    return np.stack(arrays)
  return np.stack(arrays)[..., None]


# ------------------------------------------------------------------- npz:


def _load_npz(
  path: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
  """Reads ``x_train, y_train, x_test, y_test`` (+ optional ``class_names``).

  Images may be ``(N, H, W)`` (a channel axis is added) or ``(N, H, W, C)``;
  uint8 (or other integers within 0..255, cast to uint8) or float (cast to
  float32, values kept). ``num_classes`` is ``len(class_names)`` if stored,
  else the largest label + 1.
  """
  with np.load(path, allow_pickle=False) as data:
    missing = [k for k in _NPZ_KEYS if k not in data.files]
    if missing:
      raise ValueError(
        f"npz: file {path} lacks arrays {missing}; it must hold"
        f" {', '.join(_NPZ_KEYS)} (found {sorted(data.files)})."
      )
    arrays = {k: data[k] for k in _NPZ_KEYS}
    names = data["class_names"] if "class_names" in data.files else None
  x_train = _as_images(arrays["x_train"], "x_train")
  x_test = _as_images(arrays["x_test"], "x_test")
  if x_train.shape[1:] != x_test.shape[1:] or x_train.dtype != x_test.dtype:
    raise ValueError(
      f"npz: x_train {x_train.shape[1:]} {x_train.dtype} and x_test"
      f" {x_test.shape[1:]} {x_test.dtype} differ in image shape or dtype."
    )
  y_train = _as_labels(arrays["y_train"], "y_train")
  y_test = _as_labels(arrays["y_test"], "y_test")
  for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
    if len(x) != len(y):
      raise ValueError(
        f"npz: x_{split} has {len(x)} images but y_{split} {len(y)} labels."
      )
  num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
  if names is None:
    class_names = tuple(str(c) for c in range(num_classes))
  else:
    class_names = tuple(str(n) for n in np.asarray(names).reshape(-1))
    if len(class_names) < num_classes:
      raise ValueError(
        f"npz: {len(class_names)} class_names but labels go up to {num_classes - 1}."
      )
  return x_train, y_train, x_test, y_test, class_names


def _as_images(x: np.ndarray, key: str) -> np.ndarray:
  """Validates stored images; returns ``(N, H, W, C)`` uint8 or float32."""
  if x.ndim == 3:
    x = x[..., None]
  elif x.ndim != 4:
    raise ValueError(
      f"npz: {key} must have shape (N, H, W) or (N, H, W, C), got {x.shape}."
    )
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.floating):
    return x.astype(np.float32)
  if np.issubdtype(x.dtype, np.integer):
    if x.size and (x.min() < 0 or x.max() > 255):
      raise ValueError(f"npz: integer {key} must lie in 0..255.")
    return x.astype(np.uint8)
  raise ValueError(f"npz: {key} must be uint8 or float, got dtype {x.dtype}.")
