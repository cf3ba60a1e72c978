"""Streaming image datasets: read, decoded and augmented by grain, never in memory.

A *source* (:func:`open_source`) is a random-access sequence of records
``{"image": encoded bytes or uint8 HWC, "label": int}`` that holds no images:

- ``imagenet-lt:ROOT``, ``places-lt:ROOT``: the standard split lists
  ``ImageNet_LT_{train,val,test}.txt``, ``Places_LT_{train,val,test}.txt`` in
  ROOT, one ``relative/path.jpg label`` per line, next to the images they name;
- ``list:ROOT,TRAIN_TXT,TEST_TXT``: any dataset in that format (splits ``train``,
  ``test``; list paths relative to ROOT);
- ``i_naturalist2018``: prepared TFDS data, array_record files read through
  TFDS's data source (as ``tfds.data_source``), images left encoded; ``val``
  and ``test`` are TFDS's ``validation`` split (its test split has no labels);
- ``imagenet2012-lt:DIR``: the ImageNet-LT lists in DIR, images from prepared
  TFDS ``imagenet2012`` records (:class:`TfdsListSource`);
- :class:`ArraySource`: images already in memory (``shared.data``), which the
  loaders slice whole batches at a time, as stored (no decoding, no resizing).

A *loader* (:func:`train_loader`, :func:`eval_loader`) is a :class:`Batches`
iterator over this process's rows of a stream of global batches of ``B`` images:
global batch ``s`` holds stream positions ``sB .. sB + B - 1`` and process ``p``
of ``P`` yields the slice ``p B/P .. (p + 1) B/P - 1`` of it, decoded and
augmented in ``workers`` grain processes that each make whole batches. The
processes' batches, concatenated in process order (what
``shared.training.shard_batch`` assembles), are therefore the same arrays for any
process count and any number of workers, and a position (batches consumed) is
the whole iterator state. The training stream is ``num_epochs`` epochs, each the
permutation ``numpy.random.default_rng((seed, epoch)).permutation(N)`` of the
records cut to ``N // B`` whole batches; augmentation draws from
``numpy.random.default_rng((seed, position))``. (grain's ``DataLoader`` with an
``IndexSampler`` sharded by JAX process would give each process a fixed block of
the list, and batches that change with the number of workers.)

An image that does not decode is a ValueError naming its list line and path. With
``skip_unreadable=True`` the loaders log it and go on: a training example takes the
next record that decodes (``index + 1``, ``index + 2``, ... as timm's datasets do,
so batches keep their shape and the stream stays deterministic), a test image
becomes a padding row (``valid`` False, out of the metrics); :attr:`Batches.skipped`
counts them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

import grain
import jax
import numpy as np
from PIL import Image

#: Spec prefix -> (split-list prefix, number of classes).
SPLIT_LISTS = {"imagenet-lt": ("ImageNet_LT", 1000), "places-lt": ("Places_LT", 365)}
#: TFDS datasets read as streams -> {our split: TFDS split}.
TFDS_SPLITS = {
  "i_naturalist2018": {"train": "train", "val": "validation", "test": "validation"}
}
#: RandomResizedCrop's area fraction and aspect-ratio ranges (torchvision's).
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
#: Consecutive undecodable records a skipping training loader tries before failing.
MAX_SKIPPED = 100
#: Evaluation resizes the shorter side to this times the crop (256 for 224).
EVAL_RESIZE = 256 / 224


class Source(Protocol):
  """What the loaders read: records, their labels, the number of classes."""

  num_classes: int

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...

  @property
  def labels(self) -> np.ndarray: ...


def valid_specs() -> tuple[str, ...]:
  """The dataset specs :func:`open_source` accepts."""
  lists = (f"{name}:ROOT" for name in SPLIT_LISTS)
  return (*lists, "list:ROOT,TRAIN_TXT,TEST_TXT", *TFDS_SPLITS, "imagenet2012-lt:DIR")


def is_spec(spec: str) -> bool:
  """Whether ``spec`` has the form of one of :func:`valid_specs` (reads nothing).

  >>> is_spec("imagenet-lt:/data/ImageNet_LT"), is_spec("cifar10")
  (True, False)
  """
  return _kind(spec) is not None


def _kind(spec: str) -> str | None:
  """The spec's kind (its prefix, or the TFDS name); ``None`` for another form."""
  kind, _, rest = spec.partition(":")
  if kind in (*SPLIT_LISTS, "imagenet2012-lt") and rest:
    return kind
  if kind == "list" and len(rest.split(",")) == 3:
    return kind
  return spec if spec in TFDS_SPLITS else None


def open_source(
  spec: str, *, split: str, data_dir: str | os.PathLike[str] | None = None
) -> Source:
  """The ``split`` (``train``, ``val``, ``test``) of a dataset spec; reads no image.

  ``data_dir`` is TFDS's.

  >>> open_source("cifar10", split="train")
  Traceback (most recent call last):
  ValueError: unknown streaming dataset 'cifar10'; valid: imagenet-lt:ROOT, ...
  """
  kind, rest = _kind(spec), spec.partition(":")[2]
  if kind in SPLIT_LISTS:
    prefix, num_classes = SPLIT_LISTS[kind]
    _check_split(spec, split, ("train", "val", "test"))
    root = Path(rest)
    return ListSource(root, root / f"{prefix}_{split}.txt", num_classes=num_classes)
  if kind == "list":
    _check_split(spec, split, ("train", "test"))
    root, train, test = rest.split(",")
    num_classes = ListSource(root, Path(root, train)).num_classes
    chosen = train if split == "train" else test
    return ListSource(root, Path(root, chosen), num_classes=num_classes)
  if kind == "imagenet2012-lt":
    _check_split(spec, split, ("train", "val", "test"))
    return TfdsListSource(Path(rest) / f"ImageNet_LT_{split}.txt", data_dir=data_dir)
  if kind in TFDS_SPLITS:
    _check_split(spec, split, tuple(TFDS_SPLITS[spec]))
    return TfdsSource(spec, TFDS_SPLITS[spec][split], data_dir=data_dir)
  raise ValueError(
    f"unknown streaming dataset {spec!r}; valid: {', '.join(valid_specs())}"
  )


def class_counts(
  source: Source | str, *, data_dir: str | os.PathLike[str] | None = None
) -> np.ndarray:
  """Images per class, int64 ``(num_classes,)``, of a source or a spec's train split.

  Reads labels only: the list of a list source; a TFDS source's label column,
  cached once next to its data (:attr:`TfdsSource.labels`). The Many / Medium /
  Few splits are ``shared.metrics.class_splits(class_counts(...))``.
  """
  if isinstance(source, str):
    source = open_source(source, split="train", data_dir=data_dir)
  return np.bincount(source.labels, minlength=source.num_classes).astype(np.int64)


def _check_split(spec: str, split: str, valid: tuple[str, ...]) -> None:
  if split not in valid:
    raise ValueError(f"{spec} has splits {', '.join(valid)}; got {split!r}.")


class _SplitList:
  """A split list read into arrays: ``paths``, int32 ``labels``, line numbers.

  Labels must lie below ``num_classes`` (default: the largest label + 1).
  """

  def __init__(
    self, list_file: str | os.PathLike[str], *, num_classes: int | None = None
  ):
    self.file = Path(list_file)
    if not self.file.is_file():
      raise FileNotFoundError(f"split list {self.file} does not exist.")
    text = self.file.read_bytes()
    paths, self.labels, self.lines = _parse_list(text.decode(), self.file)
    self.paths = np.array(paths, dtype=bytes)
    self.num_classes = num_classes or int(self.labels.max()) + 1
    if (bad := np.flatnonzero(self.labels >= self.num_classes)).size:
      raise ValueError(
        f"{self.file} line {self.lines[bad[0]]}: label {self.labels[bad[0]]} is"
        f" not below the {self.num_classes} classes."
      )
    self.digest = hashlib.sha1(text).hexdigest()[:12]

  def where(self, index: int) -> str:
    """``"FILE line N"`` of entry ``index``, for error messages."""
    return f"{self.file} line {self.lines[index]}"

  def __repr__(self) -> str:
    return (
      f"{self.file.name}: {len(self.labels)} images, {self.num_classes} classes,"
      f" sha1 {self.digest}"
    )


def _parse_list(text: str, name: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
  """``(paths, int32 labels, line numbers)`` of a split list; blank lines skipped.

  >>> _parse_list("a/1.jpg 0\\n\\nb/2.jpg 3\\n", Path("x.txt"))
  (['a/1.jpg', 'b/2.jpg'], array([0, 3], dtype=int32), array([1, 3], dtype=int32))
  """
  paths, labels, lines = [], [], []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    parts = line.rsplit(maxsplit=1)
    if len(parts) != 2 or not parts[1].isdigit():
      raise ValueError(
        f"{name} line {number}: expected 'relative/path label' with a"
        f" non-negative integer label, got {line!r}."
      )
    paths.append(parts[0])
    labels.append(int(parts[1]))
    lines.append(number)
  if not paths:
    raise ValueError(f"split list {name} names no images.")
  return paths, np.array(labels, np.int32), np.array(lines, np.int32)


class ListSource:
  """The image files of a split list, paths relative to ``root``.

  Construction reads the list only; :meth:`check_files` looks for every file
  (before training). ``source[i]`` reads image ``i``'s file: ``{"image": bytes,
  "label": int}``; a missing file is a FileNotFoundError naming the list's line.
  """

  def __init__(
    self,
    root: str | os.PathLike[str],
    list_file: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
  ):
    self.root, self._list = Path(root), _SplitList(list_file, num_classes=num_classes)
    self.labels, self.num_classes = self._list.labels, self._list.num_classes

  def check_files(self) -> None:
    """FileNotFoundError with the count and the first few of the missing files
    (one ``stat`` a file: seconds for ImageNet-LT on a local disk)."""
    missing = [
      i
      for i, path in enumerate(self._list.paths)
      if not (self.root / path.decode()).is_file()
    ]
    if missing:
      shown = "; ".join(self.where(i) for i in missing[:3])
      raise FileNotFoundError(
        f"{len(missing)} of the {len(self)} files of {self._list.file} are"
        f" missing, e.g. {shown}."
      )

  def where(self, index: int) -> str:
    """``"FILE line N: PATH"`` of image ``index``, for error messages."""
    return f"{self._list.where(index)}: {self.root / self._list.paths[index].decode()}"

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.root / self._list.paths[index].decode()
    try:
      image = path.read_bytes()
    except FileNotFoundError:
      raise FileNotFoundError(f"{self._list.where(index)}: no file {path}") from None
    return {"image": image, "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"ListSource({self._list!r})"


class TfdsSource:
  """A split of a prepared TFDS dataset; records keep the image encoded."""

  def __init__(
    self, name: str, split: str, *, data_dir: str | os.PathLike[str] | None = None
  ):
    import tensorflow_datasets as tfds

    self.name, self.split = name, split
    data_dir = None if data_dir is None else os.fspath(data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    self._folder = Path(builder.data_dir)
    try:
      self._source = builder.as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()}
      )
    except (NotImplementedError, AssertionError, FileNotFoundError) as e:
      raise RuntimeError(
        f"TFDS dataset {name!r} is not prepared as array_record in {self._folder}:"
        f" prepare it with `tfds build {name} --file_format=array_record"
        " --data_dir=DIR` (needs `pip install 'imbsam_jax[tfds-prepare]'` and the"
        " download) and pass DIR as data_dir."
      ) from e
    self.num_classes = int(builder.info.features["label"].num_classes)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    return {"image": example["image"], "label": int(example["label"])}

  def column(self, feature: str) -> np.ndarray:
    """One feature of every record, read once (no image decoded) and cached.

    Reading costs a pass over the records, so the column is saved as
    ``FEATURE-SPLIT.npy`` next to the split's array_record files (if writable)
    and loaded from there later.
    """
    cache = self._folder / f"{feature}-{self.split}.npy"
    stored = any(self._folder.glob(f"*-{self.split}.array_record*"))
    if stored and cache.is_file() and len(values := np.load(cache)) == len(self):
      return values
    values = np.array([self._source[i][feature] for i in range(len(self))])
    if stored:
      with contextlib.suppress(OSError):
        np.save(cache, values)
    return values

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """int32 labels: the cached ``label`` :meth:`column`."""
    return self.column("label").astype(np.int32)

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}, {self.split}: {len(self)} images)"


class TfdsListSource:
  """A split list's images read from TFDS ``imagenet2012`` records, by file name.

  List paths ``train/...`` are in TFDS's ``train`` split, ``val/...`` in
  ``validation``; each split's ``file_name`` :meth:`TfdsSource.column` (one pass
  over it, cached) finds the records. Labels are the list's.
  """

  def __init__(
    self,
    list_file: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
  ):
    self._list = _SplitList(list_file, num_classes=1000)
    self.labels, self.num_classes = self._list.labels, self._list.num_classes
    folders = np.array([p.split(b"/")[0] for p in self._list.paths])
    self._sources, self._records = [], np.full(len(self.labels), -1, np.int64)
    self._which = np.zeros(len(self.labels), np.int8)
    for folder, split in ((b"train", "train"), (b"val", "validation")):
      if not (rows := np.flatnonzero(folders == folder)).size:
        continue
      source = TfdsSource("imagenet2012", split, data_dir=data_dir)
      names = source.column("file_name").astype(bytes)
      wanted = np.array(
        [Path(p.decode()).name.encode() for p in self._list.paths[rows]]
      )
      self._records[rows] = _positions(names, wanted)
      self._which[rows] = len(self._sources)
      self._sources.append(source)
    if (missing := np.flatnonzero(self._records < 0)).size:
      raise ValueError(
        f"{self._list.where(missing[0])}: no imagenet2012 record"
        f" {self._list.paths[missing[0]].decode()!r} ({missing.size} missing)."
      )

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._sources[self._which[index]][self._records[index]]
    return {"image": record["image"], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"TfdsListSource({self._list!r})"


def _positions(names: np.ndarray, wanted: np.ndarray) -> np.ndarray:
  """Index in ``names`` of each of ``wanted`` (-1 where absent).

  >>> _positions(np.array([b"b", b"a", b"c"]), np.array([b"a", b"c", b"x"])).tolist()
  [1, 2, -1]
  """
  order = np.argsort(names)
  at = np.minimum(np.searchsorted(names[order], wanted), len(names) - 1)
  return np.where(names[order][at] == wanted, order[at], -1)


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """Images in memory: ``x`` ``(N, H, W, C)`` (any dtype) and int ``labels``.

  The loaders slice whole batches of it at once, as stored.
  ``num_classes`` defaults to the largest label + 1; ``name`` says what the
  arrays are in loader states.

  >>> ArraySource(np.zeros((5, 8, 8, 1), np.uint8), np.arange(5) % 2, name="toy")
  ArraySource('toy', x=(5, 8, 8, 1) uint8, 2 classes)
  """

  x: np.ndarray
  labels: np.ndarray
  num_classes: int | None = None
  name: str = "arrays"

  def __post_init__(self) -> None:
    if len(self.x) != len(self.labels):
      raise ValueError(
        f"x and labels differ in length: {len(self.x)} vs {len(self.labels)}."
      )
    if self.num_classes is None:
      classes = int(np.max(self.labels, initial=-1)) + 1
      object.__setattr__(self, "num_classes", classes)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.x[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    x = self.x
    return (
      f"ArraySource({self.name!r}, x={x.shape} {x.dtype}, {self.num_classes} classes)"
    )


# ---------------------------------------------------------------- transforms


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = SCALE,
  ratio: tuple[float, float] = RATIO,
) -> tuple[int, int, int, int]:
  """``(top, left, h, w)`` of torchvision's RandomResizedCrop: 10 tries, then centre.

  .. math::
    h w \\approx a H W,\\ w / h \\approx r, \\quad a \\sim U(\\text{scale}),\\
    \\log r \\sim U(\\log \\text{ratio})

  >>> random_resized_crop_box(375, 500, np.random.default_rng(0))
  (35, 302, 171, 129)
  >>> random_resized_crop_box(10, 100, np.random.default_rng(0), scale=(1, 1))
  (0, 43, 10, 13)
  """
  area, log_ratio = height * width, np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      return top, int(rng.integers(0, width - w + 1)), h, w
  aspect = width / height
  if aspect < min(ratio):
    w, h = width, round(width / min(ratio))
  elif aspect > max(ratio):
    w, h = round(height * max(ratio)), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_shape(height: int, width: int, shorter: int) -> tuple[int, int]:
  """``(h, w)`` with the shorter side ``shorter`` (torchvision's ``Resize(int)``).

  >>> resized_shape(375, 500, 256)
  (256, 341)
  """
  if height <= width:
    return shorter, int(shorter * width / height)
  return int(shorter * height / width), shorter


class UnreadableImage(ValueError):
  """A record whose image does not decode; the message names it."""


def _decoded(source: Source, index: int) -> tuple[Image.Image, int]:
  """Record ``index`` of ``source`` as an RGB image and its label; an image that
  does not decode is an :class:`UnreadableImage` naming it (its list line, for a
  list)."""
  record = source[index]
  try:
    return _to_image(record["image"]), record["label"]
  except (OSError, ValueError) as error:  # PIL: UnidentifiedImageError, truncated
    where = getattr(source, "where", lambda i: f"record {i} of {source!r}")(index)
    raise UnreadableImage(f"{where}: cannot decode the image ({error}).") from None


def _skipped(error: UnreadableImage) -> None:
  logging.getLogger(__name__).warning("skip_unreadable: skipped %s", error)


def _first_readable(source: Source, index: int) -> tuple[Image.Image, int, int]:
  """``(image, label, skipped)``: the first record from ``index`` on that decodes
  (wrapping around), and how many were skipped to reach it."""
  tries = min(MAX_SKIPPED, len(source))
  for skipped in range(tries):
    try:
      return (*_decoded(source, (index + skipped) % len(source)), skipped)
    except UnreadableImage as error:
      _skipped(error)
      last = error
  raise UnreadableImage(f"{tries} consecutive records do not decode; the last: {last}")


def _to_image(image: bytes | np.ndarray) -> Image.Image:
  """An RGB PIL image from encoded bytes or a uint8 ``(H, W)``/``(H, W, C)`` array."""
  if isinstance(image, bytes):
    image = Image.open(io.BytesIO(image))
    image.load()  # decode now: a broken file fails here, not later
  else:
    pixels = np.asarray(image, np.uint8)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2:] == (1,) else pixels)
  return image if image.mode == "RGB" else image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class _TrainExample:
  """``(position, index)`` -> RandomResizedCrop + flip of record ``index`` (or,
  ``skip_unreadable``, of the first record after it that decodes: ``skipped``)."""

  source: Source
  image_size: int
  seed: int
  skip_unreadable: bool = False

  def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
    position, index = item
    if self.skip_unreadable:
      image, label, skipped = _first_readable(self.source, index)
    else:
      (image, label), skipped = _decoded(self.source, index), None
    rng = np.random.default_rng((self.seed, position))
    top, left, h, w = random_resized_crop_box(image.height, image.width, rng)
    size = (self.image_size, self.image_size)
    image = image.crop((left, top, left + w, top + h)).resize(size, Image.BILINEAR)
    pixels = np.asarray(image)
    if rng.random() < 0.5:
      pixels = pixels[:, ::-1]
    example = {"image": pixels, "label": np.int32(label)}
    return example if skipped is None else {**example, "skipped": np.int32(skipped)}


@dataclasses.dataclass(frozen=True)
class _EvalExample:
  """``(position, index)`` -> resize + centre crop of record ``index`` (-1: padding;
  ``skip_unreadable``: an undecodable record is padding too, ``skipped``)."""

  source: Source
  image_size: int
  skip_unreadable: bool = False

  def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
    _, index = item
    size = self.image_size
    skipped = {"skipped": np.int32(0)} if self.skip_unreadable else {}
    blank = {"image": np.zeros((size, size, 3), np.uint8), "label": np.int32(0)}
    if index < 0:
      return {**blank, "valid": np.False_, **skipped}
    try:
      image, label = _decoded(self.source, index)
    except UnreadableImage as error:
      if not self.skip_unreadable:
        raise
      _skipped(error)
      return {**blank, "valid": np.False_, "skipped": np.int32(1)}
    h, w = resized_shape(image.height, image.width, round(size * EVAL_RESIZE))
    top, left = round((h - size) / 2), round((w - size) / 2)
    image = image.resize((w, h), Image.BILINEAR)
    pixels = np.asarray(image.crop((left, top, left + size, top + size)))
    return {"image": pixels, "label": np.int32(label), "valid": np.True_, **skipped}


@dataclasses.dataclass(frozen=True)
class _ArrayBatch:
  """Step -> this process's rows of that global batch, sliced from ``source``;
  padding rows are zeros (``valid`` False, given for ``evaluation``)."""

  source: ArraySource
  stream: _Stream
  evaluation: bool

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    _, index = self.stream.rows(step)
    padding = index < 0
    rows = np.maximum(index, 0)
    image, label = self.source.x[rows], self.source.labels[rows]
    image[padding], label[padding] = 0, 0
    batch = {"image": image, "label": label}
    return {**batch, "valid": ~padding} if self.evaluation else batch


# ------------------------------------------------------------------ loaders


class _Stream:
  """Local position -> ``(stream position, record index)``; -1 is padding.

  Epoch ``e`` covers stream positions ``e S B .. (e + 1) S B - 1`` (``S`` steps of
  ``B``); position ``e S B + k`` is record ``order_e[k]`` if ``k < N``, with
  ``order_e`` the epoch's permutation (``seed``) or the records' order (``None``).
  """

  def __init__(
    self,
    num_records: int,
    batch_size: int,
    steps: int,
    num_epochs: int,
    process_index: int,
    process_count: int,
    seed: int | None,
  ):
    self._n, self._batch, self._steps = num_records, batch_size, steps
    self.local = batch_size // process_count
    self._offset = process_index * self.local
    self._len = steps * num_epochs * self.local
    self._seed, self._order = seed, (-1, None)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> tuple[int, int]:
    step, row = divmod(index, self.local)
    positions, records = self.rows(step, slice(row, row + 1))
    return int(positions[0]), int(records[0])

  def rows(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """Stream positions and record indices of this process's ``rows`` of global
    batch ``step``."""
    positions = step * self._batch + self._offset + np.arange(self.local)[rows]
    epoch = step // self._steps
    k = positions - epoch * self._steps * self._batch
    records = k
    if self._seed is not None:
      if self._order[0] != epoch:  # one permutation per epoch, made when first read
        rng = np.random.default_rng((self._seed, epoch))
        self._order = (epoch, rng.permutation(self._n))
      records = self._order[1][np.minimum(k, self._n - 1)]
    return positions, np.where(k < self._n, records, -1)


class Batches:
  """An iterator of one process's batches that knows its position.

  ``len()`` is the number of batches of the whole stream, ``position`` the number
  consumed, ``skipped`` the undecodable records this process skipped since it was
  made (``skip_unreadable``; not part of the state). :meth:`get_state` is
  JSON-ready and the same on every process;
  :meth:`set_state` continues from it with any number of workers or processes.
  Workers start at the first ``next()`` (about 1 s each) and keep 2 batches
  ready each; with 2 or more, batch arrays live in shared memory (grain's
  ``SharedMemoryArray``, an ``ndarray``).
  """

  def __init__(
    self,
    batches: grain.MapDataset,
    *,
    steps_per_epoch: int,
    workers: int,
    threads: int,
    description: str,
  ):
    self.steps_per_epoch = steps_per_epoch
    self.position = self.skipped = 0
    self._batches, self._workers, self._threads = batches, workers, threads
    self._description = description
    self._iterator: grain.DatasetIterator | None = None

  def get_state(self) -> dict[str, Any]:
    """``{"position": batches consumed, "loader": what this loader reads}``."""
    return {"position": self.position, "loader": self._description}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a :meth:`get_state` of a loader of the same data and options."""
    if state["loader"] != self._description:
      raise ValueError(
        f"iterator state of another loader: saved for {state['loader']}, this is"
        f" {self._description}."
      )
    self.close()
    self.position = int(state["position"])

  def __len__(self) -> int:
    return len(self._batches)

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position >= len(self):
      self.close()
      raise StopIteration
    if self._iterator is None:
      self._iterator = self._start()
    batch = next(self._iterator)
    self.position += 1
    if "skipped" in batch:
      self.skipped += int(np.sum(batch.pop("skipped")))
    return batch

  def _start(self) -> grain.DatasetIterator:
    read = grain.ReadOptions(
      num_threads=self._threads, prefetch_buffer_size=2 * self._threads
    )
    dataset = self._batches[self.position :].to_iter_dataset(read)
    if self._workers:
      _mark_absl_flags_parsed()
      options = grain.MultiprocessingOptions(
        num_workers=self._workers, per_worker_buffer_size=2
      )
      dataset = dataset.mp_prefetch(options)
    return iter(dataset)

  def close(self) -> None:
    """Stops the workers; iterating again restarts them at :attr:`position`."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def __enter__(self) -> Batches:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def train_loader(
  source: Source,
  *,
  global_batch_size: int,
  seed: int,
  num_epochs: int = 1,
  image_size: int = 224,
  shuffle: bool = True,
  workers: int = 0,
  threads: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  skip_unreadable: bool = False,
) -> Batches:
  """``num_epochs`` epochs of ``N // B`` training batches of this process.

  Batches: ``{"image": uint8 (B/P, S, S, 3), "label": int32 (B/P,)}``,
  RandomResizedCrop to ``S = image_size`` (scale :data:`SCALE`, ratio
  :data:`RATIO`) and a horizontal flip with probability 1/2 (an
  :class:`ArraySource`'s images as stored). ``workers``: grain processes (0:
  this one), each with ``threads`` reading threads; process index and count
  default to JAX's. ``skip_unreadable``: an undecodable record is replaced by the
  next one that decodes (the module's docstring).
  """
  process_index, process_count = _process(process_index, process_count)
  _check_batching(global_batch_size, process_index, process_count, seed)
  if (steps := len(source) // global_batch_size) == 0:
    raise ValueError(f"global_batch_size={global_batch_size} > {len(source)} images.")
  stream = _Stream(
    len(source),
    global_batch_size,
    steps,
    num_epochs,
    process_index,
    process_count,
    seed if shuffle else None,
  )
  description = (
    f"train_loader({source!r}, global_batch_size={global_batch_size}, seed={seed},"
    f" num_epochs={num_epochs}, image_size={image_size}, shuffle={shuffle})"
  )
  example = _TrainExample(source, image_size, seed, skip_unreadable)
  return _loader(source, stream, example, steps, workers, threads, description)


def eval_loader(
  source: Source,
  *,
  global_batch_size: int,
  image_size: int = 224,
  workers: int = 0,
  threads: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  skip_unreadable: bool = False,
) -> Batches:
  """The records in order, ``ceil(N / B)`` batches on every process, padded.

  Batches: ``{"image": uint8 (B/P, S, S, 3), "label": int32, "valid": bool}``:
  shorter side resized to ``S`` x :data:`EVAL_RESIZE` (256 for 224), centre crop
  ``S`` (an :class:`ArraySource`'s images as stored); padding rows (after the
  last record) are zeros with ``valid`` False, and so are the undecodable
  records with ``skip_unreadable``.
  """
  process_index, process_count = _process(process_index, process_count)
  _check_batching(global_batch_size, process_index, process_count, seed=0)
  steps = -(-len(source) // global_batch_size)
  stream = _Stream(
    len(source), global_batch_size, steps, 1, process_index, process_count, None
  )
  description = (
    f"eval_loader({source!r}, global_batch_size={global_batch_size},"
    f" image_size={image_size})"
  )
  example = _EvalExample(source, image_size, skip_unreadable)
  return _loader(source, stream, example, steps, workers, threads, description)


def _loader(
  source: Source,
  stream: _Stream,
  example: _TrainExample | _EvalExample,
  steps_per_epoch: int,
  workers: int,
  threads: int,
  description: str,
) -> Batches:
  """The stream's batches of this process: sliced whole from an
  :class:`ArraySource` (with ``valid`` for evaluation), else ``example`` made of
  each record, then stacked."""
  if isinstance(source, ArraySource):
    evaluation = isinstance(example, _EvalExample)
    batches = grain.MapDataset.range(len(stream) // stream.local)
    batches = batches.map(_ArrayBatch(source, stream, evaluation))
  else:
    batches = grain.MapDataset.source(stream).map(example).batch(stream.local)
  return Batches(
    batches,
    steps_per_epoch=steps_per_epoch,
    workers=workers,
    threads=threads,
    description=description,
  )


def _process(index: int | None, count: int | None) -> tuple[int, int]:
  """This process's index and the process count (JAX's unless given)."""
  return (
    jax.process_index() if index is None else index,
    jax.process_count() if count is None else count,
  )


def _check_batching(batch_size: int, index: int, count: int, seed: int) -> None:
  valid = 0 <= index < count and batch_size > 0 and batch_size % count == 0
  if not valid or not 0 <= seed < 2**32:
    raise ValueError(
      "Need 0 <= process_index < process_count, a positive global_batch_size"
      f" multiple of process_count and a seed in [0, 2**32); got {batch_size=},"
      f" process_index={index}, process_count={count}, {seed=}."
    )


def _mark_absl_flags_parsed() -> None:
  """grain 0.2.18's workers read an absl flag, failing unless flags are parsed.

  Fixed upstream (google/grain#1355); until then, use the flags' defaults.
  """
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
