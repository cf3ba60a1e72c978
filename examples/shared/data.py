"""Datasets of the example applications, held in memory as NumPy arrays.

Specs: ``digits`` (scikit-learn's 8x8 digits), TFDS ``cifar10``, ``cifar100``,
``mnist``, ``fashion_mnist`` (prepared data is read without TensorFlow; missing data
fails fast), ``folder:PATH`` and ``npz:FILE``; ``-lt`` long-tails the training set.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from imbsam_jax._priors import long_tail_counts

#: Imbalance ratio of the ``-lt`` specs when none is given (CIFAR-LT's usual 100).
DEFAULT_LT_IMBALANCE_RATIO = 100.0
_DIGITS = ("digits", "digits-lt")
_TFDS = ("cifar10", "cifar10-lt", "cifar100", "cifar100-lt", "mnist", "fashion_mnist")
_DOWNLOAD_HOSTS = {  # TFDS name -> (scheme, host) of its download; default: GCS
  "cifar10": ("https", "www.cs.toronto.edu"),
  "cifar100": ("https", "www.cs.toronto.edu"),
  "fashion_mnist": ("http", "fashion-mnist.s3-website.eu-central-1.amazonaws.com"),
}
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_SPECS = (*_DIGITS, *_TFDS, "folder:PATH", "npz:FILE")  # the specs load_dataset takes


class Dataset(NamedTuple):
  """``(N, H, W, C)`` images (uint8; float32 from float ``npz:`` data), int32 labels."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  name: str
  imbalance_ratio: float = 1.0

  def __repr__(self) -> str:
    x, t, ratio = self.x_train, self.x_test, self.imbalance_ratio
    return (
      f"Dataset(name={self.name!r}, x_train={x.shape} {x.dtype}, x_test={t.shape}"
      f" {t.dtype}, num_classes={self.num_classes}, imbalance_ratio={ratio:g})"
    )


def check_spec(spec: str) -> None:
  """Raises a ValueError unless ``spec`` names a source (and its path exists).

  >>> check_spec("svhn")
  Traceback (most recent call last):
  ValueError: unknown dataset 'svhn'; valid: digits, digits-lt, cifar10, ...
  """
  if spec in _DIGITS or spec in _TFDS:
    return
  for prefix, kind in (("folder:", "directory"), ("npz:", "file")):
    if spec.startswith(prefix):
      path = Path(spec.removeprefix(prefix))
      if not (path.is_dir() if kind == "directory" else path.is_file()):
        raise ValueError(f"{prefix} {path} is not an existing {kind}")
      return
  raise ValueError(f"unknown dataset {spec!r}; valid: {', '.join(_SPECS)}")


def load_dataset(
  spec: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  imbalance_ratio: float | None = None,
) -> Dataset:
  """Loads a dataset by spec (see the module docstring), long-tailing its train set.

  ``data_dir`` is TFDS's. ``imbalance_ratio`` (:func:`make_long_tailed`) defaults to
  :data:`DEFAULT_LT_IMBALANCE_RATIO` for ``-lt`` specs, else to 1 (as is).

  >>> ds = load_dataset("digits-lt")
  >>> ds.x_train.shape, ds.x_train.dtype, ds.x_test.shape, ds.imbalance_ratio
  ((291, 8, 8, 1), dtype('uint8'), (599, 8, 8, 1), 100.0)
  >>> class_counts(ds.y_train, ds.num_classes).tolist()
  [119, 71, 42, 25, 15, 9, 5, 3, 1, 1]
  """
  check_spec(spec)
  if imbalance_ratio is None:
    imbalance_ratio = DEFAULT_LT_IMBALANCE_RATIO if spec.endswith("-lt") else 1.0
  name = spec
  if spec in _DIGITS:
    arrays = _load_digits()
  elif spec in _TFDS:
    arrays = _load_tfds(spec.removesuffix("-lt"), data_dir)
  else:
    path, folder = Path(spec.partition(":")[2]), spec.startswith("folder:")
    arrays = _load_folder(path) if folder else _load_npz(path)
    name = path.resolve().name if folder else path.stem
  x, y, x_test, y_test, names = arrays
  x, y = make_long_tailed(x, y, imbalance_ratio, num_classes=len(names))
  return Dataset(x, y, x_test, y_test, len(names), names, name, float(imbalance_ratio))


def to_float(x: Any, mean: Any = None, std: Any = None) -> Any:
  """Converts images (NumPy or JAX, also under ``jit``) to float32 (floats: cast).

  .. math::
    x' = (x / 255 - \\mu) / \\sigma \\quad \\text{(uint8; mean and std optional)}

  >>> to_float(np.array([0, 255], np.uint8), mean=0.5, std=0.5).tolist()
  [-1.0, 1.0]
  """
  x = x.astype(np.float32) / np.float32(255.0 if x.dtype == np.uint8 else 1.0)
  if mean is not None:
    x = x - np.asarray(mean, np.float32)
  if std is not None:
    x = x / np.asarray(std, np.float32)
  return x


def class_counts(y: Any, num_classes: int) -> np.ndarray:
  """Number of examples of each class, int64 ``(num_classes,)``.

  >>> class_counts([0, 2, 2, 1, 2], 4).tolist()
  [1, 1, 3, 0]
  """
  y = _as_labels(y, "labels")
  if y.size and y.max() >= num_classes:
    raise ValueError(f"labels must be < num_classes={num_classes}, found {y.max()}.")
  return np.bincount(y, minlength=num_classes).astype(np.int64)


def make_long_tailed(
  x: np.ndarray,
  y: np.ndarray,
  imbalance_ratio: float,
  *,
  num_classes: int | None = None,
  max_count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Keeps the first ``n_c`` examples of each class, in order (as LDAM-DRW).

  .. math::
    n_c = \\min\\big(\\lfloor n_{max} \\cdot \\mathrm{IR}^{-c / (C - 1)}
    \\rfloor,\\ \\text{available}_c\\big)

  ``n_max``: ``max_count`` (default: count of class 0); ``C``: ``num_classes``.

  >>> y = np.repeat(np.arange(3), 4)  # 4 examples per class
  >>> x_lt, y_lt = make_long_tailed(np.arange(12), y, imbalance_ratio=4)
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
  keep = np.zeros(len(y), bool)
  for c in range(num_classes):
    keep[np.flatnonzero(y == c)[: target[c]]] = True
  return x[keep], y[keep]


def _as_labels(y: Any, what: str) -> np.ndarray:
  """Validates 1-D non-negative integer labels; returns them as int32."""
  y = np.asarray(y)
  if y.ndim != 1:
    raise ValueError(f"{what} must be 1-D, got shape {y.shape}.")
  if y.size and not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{what} must be integers, got dtype {y.dtype}.")
  if y.size and y.min() < 0:
    raise ValueError(f"{what} must be non-negative, found {int(y.min())}.")
  return y.astype(np.int32)


def _load_digits():
  """scikit-learn digits as uint8 (0..16 scaled); a fixed third per class is test."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(0)
  is_test = np.zeros(len(y), bool)
  for c in range(10):
    members = np.flatnonzero(y == c)
    is_test[rng.permutation(members)[: round(len(members) / 3)]] = True
  return x[~is_test], y[~is_test], x[is_test], y[is_test], tuple(map(str, range(10)))


def _load_tfds(name: str, data_dir: str | os.PathLike[str] | None):
  """Reads a prepared TFDS dataset's train and test splits into memory."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("TFDS specs need `pip install 'imbsam_jax[examples]'`.") from e
  data_dir = None if data_dir is None else os.fspath(data_dir)
  kwargs = {"file_format": "array_record"}
  builder = tfds.builder(name, data_dir=data_dir, **kwargs)
  if not builder.is_prepared():
    _check_can_prepare(name, builder.data_dir)
  try:
    train, test = tfds.data_source(
      name, split=["train", "test"], data_dir=data_dir, builder_kwargs=kwargs
    )
  except NotImplementedError as e:  # Prepared, but not as array_record.
    raise RuntimeError(
      f"TFDS dataset {name!r} in {builder.data_dir} lacks random access: rebuild it"
      f" with `tfds build {name} --file_format=array_record` or use another data_dir."
    ) from e
  # Class names are only known once prepared: take the data source's info.
  info = getattr(train, "dataset_info", builder.info)
  return (*_read_split(train), *_read_split(test), tuple(info.features["label"].names))


def _read_split(source: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a TFDS split, restoring the original order (TFDS shuffles) by ``id``."""
  if (n := len(source)) == 0:
    raise ValueError("TFDS split is empty.")
  images = np.empty((n, *np.shape(source[0]["image"])), np.uint8)
  labels, ids = np.empty(n, np.int32), []
  for i in range(n):
    example = source[i]
    images[i], labels[i] = example["image"], example["label"]
    if "id" in example:  # e.g. CIFAR's "train_00042"
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
  """Fails fast, with instructions, unless TensorFlow and the download host are here."""
  host, port = _download_endpoint(name)
  if not _tensorflow_available():
    reason = "preparing TFDS data needs TensorFlow, which is not installed"
  elif not _host_reachable(host, port, 3.0):
    reason = f"its download host {host}:{port} is unreachable (no connection in 3 s)"
  else:
    return
  raise RuntimeError(
    f"TFDS dataset {name!r} is not prepared in {path} and cannot be prepared here:"
    f" {reason}. Either\n  * with internet and `pip install 'imbsam_jax[tfds-prepare]'`"
    f", run `tfds build {name} --file_format=array_record` and pass its data_dir (or"
    " set TFDS_DATA_DIR); or\n  * use a local copy as `npz:FILE` (x_train, y_train,"
    " x_test, y_test) or `folder:PATH` (PATH/{train,test}/<class>/*.png)."
  )


def _load_folder(root: Path):
  """Reads ``root/{train,test}/<class>/*.{png,jpg,jpeg}``, classes and files sorted."""
  classes = {}
  for split in ("train", "test"):
    if not (root / split).is_dir():
      raise ValueError(
        f"folder: {root} has no {split}/ directory ({split}/<class>/*.png|jpg|jpeg)."
      )
    dirs = (root / split).iterdir()
    classes[split] = sorted(d.name for d in dirs if d.is_dir() and d.name[0] != ".")
  if not (names := tuple(classes["train"])):
    raise ValueError(f"folder: dataset {root}/train has no class directories.")
  if unknown := sorted(set(classes["test"]) - set(names)):
    raise ValueError(f"folder: {root}/test has classes missing from train: {unknown}.")
  files, labels = [], {}
  for split in ("train", "test"):
    found = [
      (p, c) for c, name in enumerate(names) for p in _images_in(root / split / name)
    ]
    if not found:
      raise ValueError(f"folder: dataset {root}/{split} contains no images.")
    files += [p for p, _ in found]
    labels[split] = np.asarray([c for _, c in found], np.int32)
  images, n = _read_images(files), len(labels["train"])
  return images[:n], labels["train"], images[n:], labels["test"], names


def _images_in(folder: Path) -> list[Path]:
  files = sorted(folder.iterdir()) if folder.is_dir() else []
  return [p for p in files if p.suffix.lower() in (".png", ".jpg", ".jpeg")]


def _read_images(files: list[Path]) -> np.ndarray:
  """Reads same-size images into uint8 ``(N, H, W, C)``; C is 3 if any has colour."""
  from PIL import Image

  arrays = []
  for path in files:
    with Image.open(path) as image:
      gray = image.mode in ("1", "L", "LA", "I", "I;16", "F")
      arrays.append(np.asarray(image.convert("L" if gray else "RGB")))
    if arrays[-1].shape[:2] != arrays[0].shape[:2]:
      (h, w), (h0, w0) = arrays[-1].shape[:2], arrays[0].shape[:2]
      raise ValueError(
        f"Image {path} is {w}x{h} but {files[0]} is {w0}x{h0}; all images of a"
        " folder: dataset must have the same size (resize them first)."
      )
  if any(a.ndim == 3 for a in arrays):  # some colour: all RGB
    arrays = [a if a.ndim == 3 else np.stack([a] * 3, -1) for a in arrays]
  return np.stack([a.reshape(*a.shape[:2], -1) for a in arrays])


def _load_npz(path: Path):
  """Reads ``x_train, y_train, x_test, y_test`` and optional ``class_names``."""
  with np.load(path, allow_pickle=False) as data:
    if missing := [k for k in _NPZ_KEYS if k not in data.files]:
      raise ValueError(
        f"npz: file {path} lacks arrays {missing} (found {sorted(data.files)})."
      )
    x_train, x_test = (_as_images(data[k], k) for k in ("x_train", "x_test"))
    y_train, y_test = data["y_train"], data["y_test"]
    names = data["class_names"] if "class_names" in data.files else None
  if x_train.shape[1:] != x_test.shape[1:] or x_train.dtype != x_test.dtype:
    raise ValueError(
      f"npz: x_train {x_train.shape[1:]} {x_train.dtype} and x_test"
      f" {x_test.shape[1:]} {x_test.dtype} differ in image shape or dtype."
    )
  y_train, y_test = _as_labels(y_train, "y_train"), _as_labels(y_test, "y_test")
  for x, y, s in ((x_train, y_train, "train"), (x_test, y_test, "test")):
    if len(x) != len(y):
      raise ValueError(f"npz: x_{s} has {len(x)} images but y_{s} {len(y)} labels.")
  num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
  names = range(num_classes) if names is None else np.asarray(names).reshape(-1)
  if len(names) < num_classes:
    raise ValueError(
      f"npz: {len(names)} class_names but labels reach {num_classes - 1}."
    )
  return x_train, y_train, x_test, y_test, tuple(str(n) for n in names)


def _as_images(x: np.ndarray, key: str) -> np.ndarray:
  """Validates stored images; returns ``(N, H, W, C)`` uint8 or float32."""
  if x.ndim not in (3, 4):
    raise ValueError(f"npz: {key} must be (N, H, W) or (N, H, W, C), got {x.shape}.")
  x = x[..., None] if x.ndim == 3 else x
  if np.issubdtype(x.dtype, np.floating):
    return x.astype(np.float32)
  if not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"npz: {key} must be uint8 or float, got dtype {x.dtype}.")
  if x.dtype != np.uint8 and x.size and (x.min() < 0 or x.max() > 255):
    raise ValueError(f"npz: integer {key} must lie in 0..255.")
  return x.astype(np.uint8)
