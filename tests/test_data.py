"""Tests of examples/shared/data.py."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_fake_cifar10 import CLASS_NAMES, fake_cifar10, write_fake_cifar10
from PIL import Image

from imbsam_jax._priors import long_tail_counts
from shared import data

FIXTURE_TFDS_DIR = Path(__file__).parent / "data_tfds"


# ------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
  return data.load_dataset("digits")


def test_digits_shapes_dtypes_and_split(digits):
  assert digits.x_train.shape == (1198, 8, 8, 1)
  assert digits.x_test.shape == (599, 8, 8, 1)
  assert digits.x_train.dtype == np.uint8 and digits.x_test.dtype == np.uint8
  assert digits.y_train.dtype == np.int32 and digits.y_test.dtype == np.int32
  assert digits.x_train.max() == 255 and digits.x_train.min() == 0
  assert digits.num_classes == 10 and len(digits.class_names) == 10
  assert digits.name == "digits" and digits.imbalance_ratio == 1.0
  # Stratified: each class sends round(n_c / 3) images to the test set.
  from sklearn.datasets import load_digits

  total = np.bincount(load_digits().target, minlength=10)
  test = data.class_counts(digits.y_test, 10)
  np.testing.assert_array_equal(test, np.round(total / 3).astype(int))
  np.testing.assert_array_equal(data.class_counts(digits.y_train, 10), total - test)


def test_digits_values_are_scaled_sklearn_images(digits):
  from sklearn.datasets import load_digits

  raw = load_digits().images
  scaled = np.rint(raw * 255 / 16).astype(np.uint8)[..., None]
  all_images = np.concatenate([digits.x_train, digits.x_test])
  # Same multiset of images as the scaled originals.
  key = lambda a: np.sort(a.reshape(len(a), -1).view(f"V{a[0].size}").ravel())
  np.testing.assert_array_equal(key(all_images), key(scaled))


def test_digits_is_deterministic(digits):
  again = data.load_dataset("digits")
  for a, b in zip(digits[:4], again[:4], strict=True):
    np.testing.assert_array_equal(a, b)


def test_digits_lt_follows_profile_and_keeps_test_set(digits):
  lt = data.load_dataset("digits-lt")
  assert lt.imbalance_ratio == data.DEFAULT_LT_IMBALANCE_RATIO == 100
  n_max = int(data.class_counts(digits.y_train, 10)[0])
  expected = long_tail_counts(n_max, 10, 100)
  np.testing.assert_array_equal(data.class_counts(lt.y_train, 10), expected)
  np.testing.assert_array_equal(lt.x_test, digits.x_test)
  np.testing.assert_array_equal(lt.y_test, digits.y_test)
  # The first n_c training images of each class, in order.
  for c in range(10):
    np.testing.assert_array_equal(
      lt.x_train[lt.y_train == c], digits.x_train[digits.y_train == c][: expected[c]]
    )


def test_imbalance_ratio_overrides_spec_default(digits):
  balanced = data.load_dataset("digits-lt", imbalance_ratio=1)
  np.testing.assert_array_equal(balanced.y_train, digits.y_train)
  lt10 = data.load_dataset("digits", imbalance_ratio=10)
  assert lt10.imbalance_ratio == 10
  np.testing.assert_array_equal(
    data.class_counts(lt10.y_train, 10), long_tail_counts(119, 10, 10)
  )


def test_unknown_spec_lists_valid_specs():
  with pytest.raises(ValueError, match=r"cifar100-lt.*folder:PATH.*npz:FILE"):
    data.load_dataset("imagenet")


# --------------------------------------------------- long tail and counts


def test_make_long_tailed_keeps_first_examples_in_order():
  y = np.array([2, 0, 1, 0, 2, 1, 0, 2, 0, 1, 2, 2])
  x = np.arange(len(y)) * 10
  x_lt, y_lt = data.make_long_tailed(x, y, imbalance_ratio=4, num_classes=3)
  # n_max = count of class 0 = 4 -> profile [4, 2, 1].
  np.testing.assert_array_equal(y_lt, [2, 0, 1, 0, 1, 0, 0])
  np.testing.assert_array_equal(x_lt, [0, 10, 20, 30, 50, 60, 80])


def test_make_long_tailed_clips_to_available_and_max_count():
  y = np.repeat(np.arange(3), [10, 3, 10])
  _, y_lt = data.make_long_tailed(y, y, imbalance_ratio=2)
  # Profile [10, 7, 5]; class 1 only has 3 images.
  np.testing.assert_array_equal(data.class_counts(y_lt, 3), [10, 3, 5])
  _, y_lt = data.make_long_tailed(y, y, imbalance_ratio=1, max_count=4)
  np.testing.assert_array_equal(data.class_counts(y_lt, 3), [4, 3, 4])


def test_make_long_tailed_identity_and_errors():
  y = np.array([0, 1, 1])
  x = np.arange(3)
  x_lt, y_lt = data.make_long_tailed(x, y, 1)
  np.testing.assert_array_equal(x_lt, x)
  np.testing.assert_array_equal(y_lt, y)
  with pytest.raises(ValueError, match="Class 0 has no examples"):
    data.make_long_tailed(x, np.array([1, 1, 2]), 10)
  with pytest.raises(ValueError, match="differ in length"):
    data.make_long_tailed(x, y[:2], 10)
  with pytest.raises(ValueError, match="imbalance_ratio"):
    data.make_long_tailed(x, y, 0.5)


def test_class_counts():
  np.testing.assert_array_equal(data.class_counts([3, 0, 3], 5), [1, 0, 0, 2, 0])
  assert data.class_counts([3, 0], 5).dtype == np.int64
  with pytest.raises(ValueError, match="num_classes"):
    data.class_counts([0, 5], 5)
  with pytest.raises(ValueError, match="non-negative"):
    data.class_counts([0, -1], 5)
  with pytest.raises(ValueError, match="integers"):
    data.class_counts([0.0, 1.0], 5)


def test_to_float_numpy_and_jit():
  x = np.array([[0, 128, 255]], np.uint8)
  out = data.to_float(x)
  assert out.dtype == np.float32 and isinstance(out, np.ndarray)
  np.testing.assert_allclose(out, x / 255.0, rtol=1e-7)
  floats = np.array([0.5, -2.0], np.float64)
  np.testing.assert_array_equal(data.to_float(floats), floats.astype(np.float32))
  mean, std = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.5, 0.25])
  images = np.arange(12, dtype=np.uint8).reshape(2, 2, 3) * 20
  expected = (images / 255.0 - mean) / std
  np.testing.assert_allclose(data.to_float(images, mean, std), expected, rtol=1e-6)
  jitted = jax.jit(lambda a: data.to_float(a, mean, std))(jnp.asarray(images))
  assert jitted.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(jitted), expected, rtol=1e-6)


# ----------------------------------------------------------------- folder:


def _save(path: Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _rgb(seed: int, size=(5, 4)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_folder_rgb(tmp_path):
  images = {name: _rgb(i) for i, name in enumerate(["a", "b", "c", "d", "e"])}
  _save(tmp_path / "train/dog/2.png", images["a"])
  _save(tmp_path / "train/dog/1.png", images["b"])
  _save(tmp_path / "train/cat/x.png", images["c"])
  _save(tmp_path / "test/cat/y.png", images["d"])
  _save(tmp_path / "test/dog/z.PNG", images["e"])
  (tmp_path / "train/dog/notes.txt").write_text("ignored")
  ds = data.load_dataset(f"folder:{tmp_path}")
  assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
  assert ds.name == tmp_path.name
  assert ds.x_train.shape == (3, 5, 4, 3) and ds.x_train.dtype == np.uint8
  np.testing.assert_array_equal(ds.y_train, [0, 1, 1])
  np.testing.assert_array_equal(ds.y_test, [0, 1])
  np.testing.assert_array_equal(ds.x_train, [images["c"], images["b"], images["a"]])
  np.testing.assert_array_equal(ds.x_test, [images["d"], images["e"]])


def test_folder_grayscale_and_mixed(tmp_path):
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  _save(tmp_path / "g/train/0/a.png", gray)
  _save(tmp_path / "g/test/0/a.jpg", gray)
  ds = data.load_dataset(f"folder:{tmp_path / 'g'}")
  assert ds.x_train.shape == (1, 3, 4, 1) and ds.x_test.shape == (1, 3, 4, 1)
  np.testing.assert_array_equal(ds.x_train[0, ..., 0], gray)
  # One colour image makes every image RGB.
  _save(tmp_path / "m/train/0/a.png", gray)
  _save(tmp_path / "m/test/0/b.png", _rgb(0, (3, 4)))
  ds = data.load_dataset(f"folder:{tmp_path / 'm'}")
  assert ds.x_train.shape == (1, 3, 4, 3) and ds.class_names == ("0",)
  np.testing.assert_array_equal(ds.x_train[0], np.repeat(gray[..., None], 3, -1))


def test_folder_errors(tmp_path):
  _save(tmp_path / "train/a/1.png", _rgb(0, (4, 4)))
  _save(tmp_path / "train/a/2.png", _rgb(1, (4, 5)))
  with pytest.raises(ValueError, match="no test/ directory"):
    data.load_dataset(f"folder:{tmp_path}")
  _save(tmp_path / "test/a/1.png", _rgb(2, (4, 4)))
  with pytest.raises(ValueError, match=r"2\.png is 5x4 .* same size"):
    data.load_dataset(f"folder:{tmp_path}")
  (tmp_path / "train/a/2.png").unlink()
  _save(tmp_path / "test/b/1.png", _rgb(2, (4, 4)))
  with pytest.raises(ValueError, match=r"classes missing from train: \['b'\]"):
    data.load_dataset(f"folder:{tmp_path}")


# -------------------------------------------------------------------- npz:


def test_npz_hw_uint8_and_class_names(tmp_path):
  rng = np.random.default_rng(0)
  x_train = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
  x_test = rng.integers(0, 256, (2, 5, 4), dtype=np.uint8)
  path = tmp_path / "mine.npz"
  np.savez(
    path,
    x_train=x_train,
    y_train=np.array([0, 0, 0, 1, 1, 2]),
    x_test=x_test,
    y_test=np.array([1, 2]),
    class_names=np.array(["x", "y", "z", "w"]),
  )
  ds = data.load_dataset(f"npz:{path}", imbalance_ratio=3)
  assert ds.name == "mine" and ds.class_names == ("x", "y", "z", "w")
  assert ds.num_classes == 4
  assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(ds.x_test, x_test[..., None])
  # Profile floor(3 * 3^(-c/3)) = [3, 2, 1, 1] -> class 1 keeps 2 of 2, class 2 1.
  np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 1, 1, 2])


def test_npz_hwc_float_and_int(tmp_path):
  x = np.random.default_rng(0).normal(size=(4, 3, 3, 2))
  path = tmp_path / "f.npz"
  np.savez(path, x_train=x, y_train=[0, 1, 0, 1], x_test=x[:1], y_test=[1])
  ds = data.load_dataset(f"npz:{path}")
  assert ds.x_train.dtype == np.float32 and ds.x_train.shape == (4, 3, 3, 2)
  np.testing.assert_allclose(ds.x_train, x, rtol=1e-6)
  assert ds.class_names == ("0", "1")
  ints = (np.arange(4 * 9) % 256).reshape(4, 3, 3).astype(np.int64)
  np.savez(path, x_train=ints, y_train=[0, 1, 0, 1], x_test=ints, y_test=[0, 1, 0, 1])
  assert data.load_dataset(f"npz:{path}").x_train.dtype == np.uint8


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(y_test=None), r"lacks arrays \['y_test'\]"),
    (dict(x_test=np.zeros((1, 3, 4))), "differ in image shape"),
    (dict(x_test=np.zeros((1, 3, 3), np.float32)), "differ in image shape or dtype"),
    (dict(y_train=[0, 1]), "has 3 images but y_train 2"),
    (dict(y_train=[0.0, 1.0, 1.0]), "integers"),
    (dict(x_train=np.zeros((3, 3), np.uint8)), r"\(N, H, W\)"),
    (dict(x_train=np.full((3, 3, 3), 300)), "0..255"),
    (dict(class_names=np.array(["a"])), "class_names"),
  ],
)
def test_npz_errors(tmp_path, change, match):
  arrays = dict(
    x_train=np.zeros((3, 3, 3), np.uint8),
    y_train=[0, 1, 1],
    x_test=np.zeros((1, 3, 3), np.uint8),
    y_test=[0],
  )
  arrays.update(change)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=match):
    data.load_dataset(f"npz:{tmp_path / 'bad.npz'}")
  with pytest.raises(ValueError, match="not an existing file"):
    data.load_dataset(f"npz:{tmp_path / 'missing.npz'}")


# ------------------------------------------------------------------- TFDS


@pytest.fixture
def can_prepare(monkeypatch):
  """Pretends TensorFlow is installed and the download host is reachable."""
  monkeypatch.setattr(data, "_tensorflow_available", lambda: True)
  monkeypatch.setattr(data, "_host_reachable", lambda *a: True)


@pytest.mark.parametrize(
  "spec,shape,num_classes",
  [("cifar10", (32, 32, 3), 10), ("mnist", (28, 28, 1), 10)],
)
def test_tfds_with_mock_data(mock_data, can_prepare, spec, shape, num_classes):
  # tfds.testing.mock_data patches DatasetBuilder.as_data_source (so it covers
  # tfds.data_source), points builders at a non-existent data_dir (so the data
  # is "not prepared" and the loader takes the prepare path: `can_prepare`) and
  # makes download_and_prepare a no-op. Its __getitems__ is broken (tfds
  # 4.9.10), which the loader avoids by reading item by item.
  with mock_data(num_examples=12):
    ds = data.load_dataset(spec)
  assert ds.x_train.shape == (12, *shape) and ds.x_test.shape == (12, *shape)
  assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
  assert ds.num_classes == num_classes == len(ds.class_names)
  assert ((ds.y_train >= 0) & (ds.y_train < num_classes)).all()


def test_tfds_prepared_fixture_read_without_tensorflow(tmp_path):
  """Reads real array_record files (the fixture) through tfds.data_source."""
  tfds = pytest.importorskip("tensorflow_datasets")
  if str(tfds.builder("cifar10").version) != "3.0.2":
    pytest.skip("fixture is cifar10 3.0.2; regenerate tests/data_tfds")
  shutil.copytree(FIXTURE_TFDS_DIR, tmp_path / "tfds")
  ds = data.load_dataset("cifar10", data_dir=tmp_path / "tfds")
  x_train, y_train, x_test, y_test = fake_cifar10()
  assert ds.class_names == CLASS_NAMES
  # TFDS shuffles on preparation; the loader restores the file order by id.
  np.testing.assert_array_equal(ds.y_train, y_train)
  np.testing.assert_array_equal(ds.x_train, x_train)
  np.testing.assert_array_equal(ds.y_test, y_test)
  np.testing.assert_array_equal(ds.x_test, x_test)
  lt = data.load_dataset("cifar10-lt", data_dir=tmp_path / "tfds", imbalance_ratio=3)
  np.testing.assert_array_equal(
    data.class_counts(lt.y_train, 10), long_tail_counts(3, 10, 3)
  )
  np.testing.assert_array_equal(lt.x_test, x_test)


def _forbid_download(monkeypatch, tfds):
  def fail(*args, **kwargs):
    raise AssertionError("download_and_prepare must not be attempted")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)


def test_tfds_fails_fast_when_host_unreachable(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  _forbid_download(monkeypatch, tfds)
  monkeypatch.setattr(data, "_tensorflow_available", lambda: True)
  monkeypatch.setattr(data, "_host_reachable", lambda *a: False)
  start = time.monotonic()
  with pytest.raises(RuntimeError) as info:
    data.load_dataset("cifar100-lt", data_dir=tmp_path)
  assert time.monotonic() - start < 10
  message = str(info.value)
  assert "'cifar100' is not prepared" in message
  assert "www.cs.toronto.edu:443 is unreachable" in message
  assert "imbsam_jax[tfds-prepare]" in message
  assert "tfds build cifar100 --file_format=array_record" in message
  assert "npz:FILE" in message and "folder:PATH" in message


def test_tfds_fails_fast_without_tensorflow(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  _forbid_download(monkeypatch, tfds)
  monkeypatch.setattr(data, "_tensorflow_available", lambda: False)
  monkeypatch.setattr(data, "_host_reachable", lambda *a: pytest.fail("no check"))
  with pytest.raises(RuntimeError, match="needs TensorFlow, which is not installed"):
    data.load_dataset("mnist", data_dir=tmp_path)


def test_host_reachable_on_local_sockets():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    assert data._host_reachable("127.0.0.1", port, 1.0)
  # The port is closed now: the connection is refused at once.
  assert not data._host_reachable("127.0.0.1", port, 1.0)


def test_download_endpoint_respects_proxy(monkeypatch):
  for key in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
    monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv(key.upper(), raising=False)
  assert data._download_endpoint("cifar10") == ("www.cs.toronto.edu", 443)
  assert data._download_endpoint("fashion_mnist")[1] == 80
  monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
  assert data._download_endpoint("cifar10") == ("proxy.internal", 3128)
  monkeypatch.setenv("no_proxy", "www.cs.toronto.edu")
  assert data._download_endpoint("cifar10") == ("www.cs.toronto.edu", 443)


def test_real_tfds_cifar10_builder_offline(tmp_path, can_prepare):
  """The real TFDS cifar10 builder on fake binary files, through load_dataset.

  Needs TensorFlow (the builder encodes PNGs with tf.image); skipped otherwise.
  It yields the same arrays as the committed fixture (checked against
  ``fake_cifar10()`` in both tests); the array_record bytes differ per build.
  """
  pytest.importorskip("tensorflow")
  from unittest import mock

  import tensorflow_datasets as tfds

  download_root = write_fake_cifar10(tmp_path / "download")
  with mock.patch.object(
    tfds.download.DownloadManager,
    "download_and_extract",
    lambda self, url: str(download_root),
  ):
    ds = data.load_dataset("cifar10", data_dir=tmp_path / "tfds")
  x_train, y_train, x_test, y_test = fake_cifar10()
  assert ds.class_names == CLASS_NAMES
  np.testing.assert_array_equal(ds.x_train, x_train)
  np.testing.assert_array_equal(ds.y_train, y_train)
  np.testing.assert_array_equal(ds.x_test, x_test)
  np.testing.assert_array_equal(ds.y_test, y_test)
