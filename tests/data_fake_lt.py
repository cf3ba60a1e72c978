"""Small long-tailed JPEG datasets in the ImageNet-LT layout, for tests.

``write_lt_dataset(root)`` writes JPEGs (random pixels around a colour of their
class) and the split lists ``ImageNet_LT_{train,val,test}.txt``, one
``train/nXXXXXXXX/nXXXXXXXX_i.JPEG label`` per line (val = test): the spec
``imagenet-lt:ROOT`` reads them, and so does ``list:ROOT,ImageNet_LT_train.txt,
ImageNet_LT_test.txt`` (with as many classes as the lists have). As a script it
writes one of about ``--images`` training images over ``--classes`` classes,
imbalance 100::

  python tests/data_fake_lt.py /tmp/lt2k --images 2000
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: Train images per class of the default fixture: long-tailed (Pareto-like).
TRAIN_COUNTS = (20, 12, 7, 4, 2)
TEST_PER_CLASS = 2


def write_jpeg(
  path: Path, rng: np.random.Generator, shape=(40, 48), colour=(128, 128, 128)
) -> None:
  """A JPEG of random pixels around ``colour`` (parent folders made)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  noise = rng.integers(-64, 64, (*shape, 3))
  pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
  Image.fromarray(pixels).save(path, quality=90)


def write_lt_dataset(
  root: Path,
  *,
  train_counts: Sequence[int] = TRAIN_COUNTS,
  test_per_class: int = TEST_PER_CLASS,
  shape=(40, 48),
  seed: int = 0,
) -> Path:
  """Writes the images and split lists into ``root``; returns ``root``."""
  rng = np.random.default_rng(seed)
  colours = rng.integers(40, 216, (len(train_counts), 3))
  lines: dict[str, list[str]] = {"train": [], "test": []}
  for label, count in enumerate(train_counts):
    wnid = f"n{label:08d}"
    for split, n in (("train", count), ("test", test_per_class)):
      for i in range(n):
        name = f"{wnid}_{i}.JPEG" if split == "train" else f"val_{label}_{i}.JPEG"
        write_jpeg(root / split / wnid / name, rng, shape, colours[label])
        lines[split].append(f"{split}/{wnid}/{name} {label}")
  lines["val"] = lines["test"]
  for split, split_lines in lines.items():
    (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(split_lines) + "\n")
  return root


def long_tailed_counts(images: int, classes: int, imbalance: float = 100.0) -> list:
  """About ``images`` per-class counts on an exponential profile, at least 1 each.

  >>> long_tailed_counts(200, 3)
  [180, 18, 2]
  """
  profile = imbalance ** -(np.arange(classes) / max(classes - 1, 1))
  return np.maximum(np.round(images * profile / profile.sum()), 1).astype(int).tolist()


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("root", type=Path)
  parser.add_argument("--images", type=int, default=2000)
  parser.add_argument("--classes", type=int, default=20)
  parser.add_argument("--size", type=int, default=64, help="image height and width")
  args = parser.parse_args()
  counts = long_tailed_counts(args.images, args.classes)
  write_lt_dataset(args.root, train_counts=counts, shape=(args.size, args.size))
  print(f"{args.root}: {sum(counts)} train images, counts {counts}")
