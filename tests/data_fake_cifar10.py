"""Tiny fake CIFAR-10 in the original binary format, for offline TFDS tests.

``write_fake_cifar10(root)`` writes ``root/cifar-10-batches-bin/`` as the CIFAR
download unpacks it: ``data_batch_1..5.bin`` and ``test_batch.bin`` (records
of 1 label byte + 3072 pixel bytes, channel-major) and ``batches.meta.txt``.

The committed fixture ``tests/data_tfds/cifar10/3.0.2`` is the real TFDS
``cifar10`` builder's output (``file_format="array_record"``) for these files;
``test_data.py::test_real_tfds_cifar10_builder_offline`` runs that builder
through ``load_dataset`` (when TensorFlow is installed) and checks that it gives
the same arrays. To regenerate it, with
TensorFlow installed::

  python tests/data_fake_cifar10.py tests/data_tfds
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CLASS_NAMES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
RECORDS_PER_TRAIN_FILE = 6
NUM_TEST = 10


def fake_split(num: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic ``(images (num, 32, 32, 3) uint8, labels (num,) int32)``."""
  index = np.arange(offset, offset + num)
  labels = ((index * 3 + index // 10) % 10).astype(np.int32)
  rows = np.arange(32)[None, :, None, None]
  cols = np.arange(32)[None, None, :, None]
  channels = np.arange(3)[None, None, None, :]
  images = index[:, None, None, None] * 37 + rows * 4 + cols * 2 + channels * 80
  return (images % 256).astype(np.uint8), labels


def fake_cifar10() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The fake data set in original file order: ``x_train, y_train, x_test, y_test``."""
  x_train, y_train = fake_split(len(TRAIN_FILES) * RECORDS_PER_TRAIN_FILE, 0)
  x_test, y_test = fake_split(NUM_TEST, 1000)
  return x_train, y_train, x_test, y_test


def _write_records(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
  pixels = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  records = np.concatenate([labels[:, None].astype(np.uint8), pixels], axis=1)
  path.write_bytes(records.tobytes())


def write_fake_cifar10(root: Path) -> Path:
  """Writes the unpacked fake CIFAR-10 download under ``root``; returns root."""
  base = Path(root) / "cifar-10-batches-bin"
  base.mkdir(parents=True, exist_ok=True)
  x_train, y_train, x_test, y_test = fake_cifar10()
  n = RECORDS_PER_TRAIN_FILE
  for i, name in enumerate(TRAIN_FILES):
    _write_records(
      base / name, x_train[i * n : (i + 1) * n], y_train[i * n : (i + 1) * n]
    )
  _write_records(base / "test_batch.bin", x_test, y_test)
  (base / "batches.meta.txt").write_text("\n".join(CLASS_NAMES) + "\n\n")
  return Path(root)


def prepare_with_tfds(data_dir: Path, download_root: Path) -> None:
  """Runs the real TFDS cifar10 builder on the fake files (needs TensorFlow)."""
  from unittest import mock

  import tensorflow_datasets as tfds

  write_fake_cifar10(download_root)
  with mock.patch.object(
    tfds.download.DownloadManager,
    "download_and_extract",
    lambda self, url: str(download_root),
  ):
    builder = tfds.builder(
      "cifar10", data_dir=str(data_dir), file_format="array_record"
    )
    builder.download_and_prepare()


if __name__ == "__main__":
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    prepare_with_tfds(Path(sys.argv[1]), Path(tmp))
